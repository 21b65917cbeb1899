"""Setup: the strategy's own steps (mirror VM and gmem links, or shadow APs with their VMSA pages), the
attested handshake, and agents added on demand later. The guest runs meanwhile, losing the CPU of any
step that runs on its own quota on its side."""

from __future__ import annotations

from ..core.errors import InvariantError
from ..model.snp import PAGE_SIZE, Rc
from ..scenario.strategies import SIDES, SOURCE, TARGET, Step
from .context import Run
from .dirtylog import initial_sync

def do_step(run: Run, step: Step, *, guest_side: int | None = SOURCE, kind: str = "setup_step") -> None:
    """One step on the clock, the guest running on ``guest_side`` (None: paused): it loses the step's CPU
    beyond its spare quota if the step runs on its quota on that side."""
    cpu = run.cpu
    dur = cpu.step_ns(step, guest_side, run.guest.g)
    cpu.charge(step.owner, step.cpu_ns)
    run.log(kind, f"{step.name} ({dur} ns; cpu {step.cpu_ns} ns {step.owner}; wait {step.wait_ns} ns)")
    if step.vmsa_pages:
        _vmsa_rmp(run, step.side, step.vmsa_pages)
    if guest_side is None:
        run.guest.pause(dur)
    else:
        run.guest.elapse(dur, step.cpu_ns if cpu.takes_guest_cpu(step.owner, step.side, guest_side) else 0)


def teardown(run: Run) -> None:
    """Both designs tear their agents down once the migration no longer needs them, the guest running on
    the target: off the downtime, inside the migration's window."""
    for side in (SOURCE, TARGET):
        for step in run.strategy.teardown_steps(side, run.agents):
            do_step(run, step, guest_side=TARGET, kind="teardown_step")


def _vmsa_rmp(run: Run, side: int, delta: int) -> None:
    """A shadow AP's VMSA page on ``side``'s RMP: created (RMPUPDATE to the guest's ASID, PVALIDATE,
    RMPADJUST vmsa=1) or retired (RMPADJUST vmsa=0). VMSA pages live past the guest's pages (SVSM memory)."""
    eng, asid = run.eng, run.s.guest.asid
    live = run.vmsa_live[side]
    if delta > 0:
        gfn = run.npages + live
        spa = eng.spa(side, 0) + gfn
        rcs = (eng.rmpupdate(side, spa, assigned=True, asid=asid, gfn=gfn),
               eng.pvalidate(side, spa, asid=asid, gfn=gfn, vmpl=0, validate=True),
               eng.rmpadjust(side, spa, asid=asid, gfn=gfn, caller_vmpl=0, target_vmpl=1, perms=0, vmsa=True))
        run.vmsa_live[side] = live + 1
    else:
        gfn = run.npages + live - 1
        spa = eng.spa(side, 0) + gfn
        rcs = (eng.rmpadjust(side, spa, asid=asid, gfn=gfn, caller_vmpl=0, target_vmpl=1, perms=0, vmsa=False),)
        run.vmsa_live[side] = live - 1
    if any(rc != Rc.SUCCESS for rc in rcs):
        raise InvariantError(f"{SIDES[side]}: VMSA page RMP operation failed: {[Rc(r).name for r in rcs]}")


def setup(run: Run, *, dirty_logging: bool) -> tuple[int, int | None]:
    """Strategy setup, dirty-log start and the initial bitmap sync (pre-copy), and the handshake; returns
    the setup time and when the initial sync began (None without dirty logging)."""
    g, s = run.guest, run.strategy
    v0 = g.v
    run.agents = run.s.migration.agents_initial
    for step in s.setup_steps():
        do_step(run, step)
    synced = None
    if dirty_logging:
        ns = run.s.costs.dirty_log_start_ns_per_gib * run.meta.guest_bytes // (1 << 30)
        do_step(run, Step("source: start dirty logging (write-protect guest memory)", SOURCE, "host", cpu_ns=ns))
        synced = initial_sync(run)
    handshake(run)
    run.log("setup_done", f"setup_ns={g.v - v0} agents={run.agents}")
    return g.v - v0, synced


def handshake(run: Run) -> None:
    """The attested handshake: both sides' agents get a report from their PSP and check each other's, in
    parallel; nothing moves before both accept. Needs the link for its whole length."""
    g, cpu = run.guest, run.cpu
    steps = [run.strategy.attestation_step(side) for side in (SOURCE, TARGET)]
    dur = max(cpu.step_ns(st, SOURCE, g.g) for st in steps) + 2 * run.link.latency_ns  # reports cross both ways
    run.link.check(g.v + dur)
    if run.data is not None:
        run.data.handshake()  # nothing moves before both sides accept
    lost = 0
    for st in steps:
        cpu.charge(st.owner, st.cpu_ns)
        lost += st.cpu_ns if cpu.takes_guest_cpu(st.owner, st.side, SOURCE) else 0
    run.log("handshake", f"attested handshake ({dur} ns; PSP wait {steps[0].wait_ns} ns, cpu {steps[0].cpu_ns} ns per side)")
    g.elapse(dur, lost)


def agents_wanted(run: Run) -> int:
    """On demand: enough agents (one CPU each) that a private page's packaging and unpacking keep pace with
    its time on the link, within the strategy's limit; mirror agents beyond the host CPUs given to
    migration would add no capacity (they share those CPUs), so no more are made."""
    c = run.s.costs
    link_ns = max(1, run.link.wire_ns(PAGE_SIZE + c.page_header_bytes))
    touch = c.mirror_npf_ns if run.strategy.agents_on_host_cpus else 0
    src = run.page_ns[0] + c.vmgexit_ns // c.batch_pages + touch
    dst = run.target_page_ns + touch
    need = -(-max(src, dst) // link_ns)
    limit = run.strategy.agent_limit()
    if run.strategy.agents_on_host_cpus:
        limit = min(limit, run.s.migration.host_cpus)
    return min(limit, max(run.agents, need))


def grow_agents(run: Run, want: int) -> None:
    while run.agents < want:
        for side in (SOURCE, TARGET):
            for step in run.strategy.agent_steps(side):
                do_step(run, step)
        run.agents += 1
        run.log("agent_added", f"agents={run.agents}")

