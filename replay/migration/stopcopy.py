"""Stop-and-copy: pause the guest, final sync, send what is left, the VMSAs (one per vCPU per VMPL in use)
and device state; the target unpacks, checks the end-of-migration token and resumes. Downtime runs from
the pause to the resume. A link failure at any moment before the resume aborts: the source (paused, with
its memory intact) runs on."""

from __future__ import annotations

from dataclasses import dataclass

from ..scenario.strategies import SOURCE, TARGET
from . import transfer
from .context import Round, Run
from .link import LinkDown
from .dirtylog import sync


@dataclass(frozen=True)
class Switchover:
    resume_ns: int
    source_digest: str  # set digest of the source's memory at the pause
    target_digest: str  # the same over what the target received (pre-copy: at the resume)
    vmsas: int  # VMSAs sent


def vmpls_in_use(run: Run) -> list[int]:
    """The VMPLs with a VMSA per vCPU: the SVSM's VMPL0, and the OS's when it runs below it."""
    return [0, run.s.guest.os_vmpl] if run.s.guest.os_vmpl else [0]


def pause_and_drain(run: Run, *, final_sync: bool = True, note: str = "guest paused") -> tuple[int, Round]:
    """Pause, final sync (unless there is no dirty log to read: plain post-copy), dirty logging off.
    Returns (pause time, the downtime round)."""
    v_pause = run.guest.v
    run.log("pause", note)
    dirty = sync(run, paused=True) if final_sync else 0
    run.eng.set_dirty_logging(SOURCE, False)
    return v_pause, run.new_round("downtime", v_pause, dirty, start_ns=v_pause)


def send_paused(run: Run, rnd: Round) -> None:
    """Send the rest of the bitmap while paused (target unpacking paces it like the link)."""
    eng, g, link = run.eng, run.guest, run.link
    down = link.down_at()
    transfer.begin(run, None)
    while eng.send_count(SOURCE):
        lim = transfer.split(run, None)  # an adversary's action due within: a step ends there
        transfer.step(run, None, 0, run_host=SOURCE, paused=True, stream="downtime", until_v=lim,
                      deadline_v=link.deadline(down))
        if lim is None or eng.transfer_state()["link_dead"]:
            break
    st = eng.transfer_state()
    transfer.account(run, rnd, st)
    g.adopt(st["v_ns"], None)
    if st["link_dead"]:
        raise LinkDown(down)


def send_vmsas_and_devices(run: Run, rnd: Round) -> int:
    """VMSAs go through an agent like private pages; device state goes plain from the host. Returns the
    number of VMSAs sent."""
    c, g, cpu, link = run.s.costs, run.guest, run.cpu, run.link
    vmpls = vmpls_in_use(run)
    nvmsa = run.vcpus * len(vmpls)
    vmsa_bytes = nvmsa * (c.vmsa_bytes + c.page_header_bytes)
    pack = nvmsa * run.page_ns[0]
    t0 = g.v
    dur = max(link.wire_ns(vmsa_bytes + c.device_state_bytes), cpu.agent_work_ns(pack, run.agents, SOURCE, None))
    link.check(t0 + dur + link.latency_ns)
    cpu.charge(run.strategy.agent_owner, pack)
    g.pause(dur)
    if run.data is not None:
        run.data.vmsas(run.vcpus, vmpls, t0)
    rnd.bytes_sent += vmsa_bytes + c.device_state_bytes
    run.tally.bytes["downtime"] += vmsa_bytes + c.device_state_bytes
    run.log("vmsas_sent", f"vmsas={nvmsa} device_state_bytes={c.device_state_bytes}")
    return nvmsa


def resume_target(run: Run, rnd: Round, nvmsa: int, *, token: bool) -> None:
    """The last byte lands one latency later; the target unpacks the VMSAs, checks the end-of-migration
    token (stop-and-copy; post-copy checks it when the last page is in), resumes. Any link failure before
    the resume aborts. (The agents are torn down after the migration, off the downtime: setup.teardown.)"""
    c, g, cpu, link = run.s.costs, run.guest, run.cpu, run.link
    g.pause(link.latency_ns)
    unpack = nvmsa * run.page_ns[1]
    cpu.charge(run.strategy.agent_owner, unpack)
    g.pause(cpu.agent_work_ns(unpack, run.agents, TARGET, None))
    if token:
        g.pause(link.latency_ns)  # the validation token crosses
        if run.data is not None:
            run.data.token()  # the target resumes only if it matches its own
    g.pause(c.resume_ns)
    link.check(g.v)  # a failure before the target runs: abort
    rnd.end_ns = g.v


def stop_and_copy(run: Run) -> Switchover:
    v_pause, rnd = pause_and_drain(run)
    source_digest = run.eng.set_digest(SOURCE)
    if run.data is not None:
        run.data.snapshot("source_at_switchover", SOURCE)
    send_paused(run, rnd)
    nvmsa = send_vmsas_and_devices(run, rnd)
    resume_target(run, rnd, nvmsa, token=True)
    target_digest = run.eng.received_digest(TARGET)
    if run.data is not None:
        run.data.snapshot("target_at_switchover", TARGET)
    run.log("validation_token", f"pages={run.tally.pages['precopy'] + run.tally.pages['downtime']} "
            f"match={target_digest == source_digest}")
    run.guest.host = TARGET
    run.log("resume", f"target resumed; downtime_ns={run.guest.v - v_pause}")
    return Switchover(run.guest.v, source_digest, target_digest, nvmsa)
