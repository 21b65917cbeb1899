"""Moving pages on the engine's transfer clock, shared by every phase: the per-page costs each design
pays (packaging, unpacking, RMP operations, the mirror VM's first-touch NPFs, the host's work for shared
pages, write-protect faults), the agents' capacity on each side, and folding a transfer's totals into the
run's tallies and CPU ledger."""

from __future__ import annotations

from ..model.snp import PAGE_SIZE
from ..scenario.strategies import HOST
from .context import Round, Run


def begin(run: Run, guest_side: int | None, *, skip_present: bool = False) -> None:
    """Start a transfer at the guest's clocks; ``guest_side``: where the guest runs (None: paused)."""
    c, s = run.s.costs, run.strategy
    pack, unpack = run.page_ns
    run.eng.begin_transfer(
        run.guest.v, run.guest.g,
        bandwidth_bytes_per_s=run.link.bandwidth_bytes_per_s, page_bytes=PAGE_SIZE, header_bytes=c.page_header_bytes,
        pack_private_ns=pack, pack_zero_ns=c.zero_page_ns, batch_pages=c.batch_pages,
        vmgexit_ns=c.vmgexit_ns, unpack_private_ns=unpack, rmpupdate_ns=c.rmpupdate_ns,
        pvalidate_ns=c.pvalidate_ns, rmpadjust_ns=c.rmpadjust_ns,
        first_touch_ns=c.mirror_npf_ns if s.agents_on_host_cpus else 0,
        host_page_ns=c.host_page_ns, wp_fault_ns=c.dirty_wp_fault_ns if guest_side == 0 else 0,
        skip_present=skip_present, **run.cpu.transfer_params(run.agents, guest_side),
    )


def step(run: Run, gfns, k: int, *, run_host: int, paused: bool, stream: str, until_v=None, deadline_v=None,
         delays=None, ready=None, walk_end=None):
    """One engine transfer call from the source to the target, the guest replaying its trace on
    ``run_host`` unless ``paused``; data mode carries the contents of what it applied and sent. Returns
    (k, the batch replayed or None)."""
    g, eng = run.guest, run.eng
    adv = run.adversary
    v0 = eng.transfer_state()["v_ns"] if adv is not None else None  # the step's first page goes then
    cur = g.cur
    batch = None if (paused or cur.done) else cur.batch
    a = cur.row if batch is not None else 0
    row, k = eng.transfer(0, 1, gfns, k, batch, a, cur.base if batch is not None else 0, run_host, delays, ready,
                          until_v=until_v, deadline_v=deadline_v, walk_end=walk_end)
    try:
        if run.data is not None:
            run.data.after_transfer(run_host, batch, cur.base, a, row if batch is not None else a, stream, v0)
    finally:  # a refused packet stops the migration, not the guest: the rows it ran stay run
        if batch is not None:
            cur.settle(row)
    return k, batch


def account(run: Run, rnd: Round, st: dict, prev: dict | None = None) -> None:
    """Fold a transfer's totals (``st``, less ``prev`` if part of them was folded already) into ``rnd``,
    the phase tallies and the CPU ledger."""
    d = st if prev is None else {k: st[k] - prev[k] for k in st if k not in ("v_ns", "g_ns", "link_dead")}
    t = run.tally
    rnd.pages_sent += d["pages"]
    rnd.zero_pages += d["zero_pages"]
    rnd.private_pages += d["private_pages"]
    rnd.shared_pages += d["shared_pages"]
    rnd.bytes_sent += d["bytes"]
    rnd.agent_cpu_ns += d["agent_cpu_ns"]
    rnd.target_cpu_ns += d["target_cpu_ns"]
    rnd.host_cpu_ns += d["src_host_cpu_ns"] + d["dst_host_cpu_ns"]
    rnd.agents = run.agents
    run.cpu.charge(run.strategy.agent_owner, d["agent_cpu_ns"] + d["target_cpu_ns"])
    run.cpu.charge(HOST, d["src_host_cpu_ns"] + d["dst_host_cpu_ns"])
    t.pages[rnd.phase] += d["pages"]
    t.bytes[rnd.phase] += d["bytes"]
    t.zero_pages += d["zero_pages"]
    t.private_pages += d["private_pages"]
    t.shared_pages += d["shared_pages"]
    t.first_touches += d["first_touches"]


def split(run: Run, until_v: int | None) -> int | None:
    """``until_v``, or earlier: the next time an adversary's action falls due after the transfer clock
    now. A transfer step stops before its first page at or after that time, so the next step begins
    with it and the action acts on the first packet at or after its time, on the phase's own clock. No
    adversary: ``until_v`` as it is (a split never changes what a transfer does, only where its steps
    end)."""
    adv = run.adversary
    if adv is None:
        return until_v
    due = adv.next_due(run.eng.transfer_state()["v_ns"])
    if due is None:
        return until_v
    return due if until_v is None else min(until_v, due)
