"""Pre-copy, as QEMU's migration thread does it (migration/migration.c migration_iteration_run, ram.c).

The migration keeps its own bitmap of pages still to send (all of them at the start). Each iteration:

1. estimate: pending = pages in the bitmap x page size (no headers; a dirty zero page counts in full);
2. if pending < threshold, sync the dirty log into the bitmap (this is a round: QEMU's dirty-sync-count,
   which the initial sync at setup, ram_init_bitmaps, starts at 1) and take the exact pending;
3. complete (switch over) when pending <= threshold (QEMU 10.1's rule; earlier versions used <);
4. otherwise send one burst: pages in bitmap order, walking on cyclically from where the last burst
   stopped, for at most ``burst_ns`` (QEMU's ~50 ms MAX_WAIT), then update the bandwidth estimate once
   ``bandwidth_period_ns`` (100 ms) have passed since the last update.

threshold = bandwidth x downtime_limit, with bandwidth the rate measured over the last period (bytes
delivered / time), or ``avail_switchover_bandwidth`` if set; it is 0 until the first period ends (QEMU
updates it only then, whichever bandwidth it uses). The run's ``rounds`` is QEMU's dirty-sync-count: the
initial sync, every sync of the loop and the completion's final sync (stop-and-copy, or the discard sync
of a switch to post-copy). So a run
whose agents (or the target's unpacking) cannot keep up with the link gets a lower measured bandwidth and
a lower threshold, never a switchover promised at link speed.

QEMU never caps rounds; at ``max_rounds`` syncs without convergence the scenario's ``on_max_rounds``
applies: cancel, stop-and-copy anyway, or switch to post-copy. Hybrid mode is this loop with a switch to
post-copy after ``precopy_rounds`` syncs beyond the initial one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.snp import PAGE_SIZE
from ..scenario.strategies import SOURCE
from . import transfer
from .context import Round, Run
from .link import NS_PER_S, LinkDown
from .dirtylog import sync
from .setup import agents_wanted, grow_agents

SWITCHOVER_RULE = "qemu-10.1: pending <= threshold; threshold = measured bandwidth x downtime_limit"


@dataclass(frozen=True)
class PrecopyEnd:
    """How pre-copy ended: ``action`` is "stop-and-copy", "postcopy" or "cancel"; ``reason`` is
    "converged" or "max_rounds"."""

    action: str
    reason: str
    rounds: int
    pending_bytes: int
    threshold_bytes: int
    bandwidth_bytes_per_s: int  # the one the threshold used
    expected_downtime_ns: int


class _Meter:
    """QEMU's bandwidth estimate: bytes delivered over the last period of at least ``period_ns``."""

    def __init__(self, run: Run):
        m = run.s.migration
        self.limit_ns = m.downtime_limit_ns
        self.period_ns = m.bandwidth_period_ns
        self.fixed = m.avail_switchover_bandwidth_bytes_per_s
        # QEMU's migration_update_counters returns early until BUFFER_DELAY has passed: the threshold is 0
        # until the first period ends, even with avail-switchover-bandwidth set.
        self.bandwidth = 0
        self.since_v = run.guest.v
        self.bytes = 0

    @property
    def threshold(self) -> int:
        return self.bandwidth * self.limit_ns // NS_PER_S

    def add(self, nbytes: int, now_v: int) -> None:
        self.bytes += nbytes
        if now_v - self.since_v >= self.period_ns:
            self.bandwidth = self.fixed or self.bytes * NS_PER_S // (now_v - self.since_v)
            self.since_v, self.bytes = now_v, 0


def precopy(run: Run, *, max_rounds: int, on_max_rounds: str, initial_sync_ns: int) -> PrecopyEnd:
    """Run the pre-copy loop after setup's initial sync (at ``initial_sync_ns``); raises LinkDown on a link
    failure (nothing arrives after it)."""
    eng, g = run.eng, run.guest
    npages = run.npages
    rounds = 1
    rnd = _new_round(run, npages, initial_sync_ns)
    meter = _Meter(run)
    cursor = 0
    while True:
        pending = eng.send_count(SOURCE) * PAGE_SIZE
        threshold = meter.threshold
        synced = False
        if pending < threshold:
            _close_round(run, rnd)
            t_sync = g.v
            dirty = sync(run)
            rounds += 1
            rnd = _new_round(run, dirty, t_sync)
            pending = eng.send_count(SOURCE) * PAGE_SIZE
            synced = True
        if pending <= threshold:
            return _end(run, rnd, "stop-and-copy", "converged", rounds, pending, meter)
        if synced and rounds >= max_rounds:
            return _end(run, rnd, on_max_rounds, "max_rounds", rounds, pending, meter)
        cursor, sent = _burst(run, rnd, cursor)
        meter.add(sent, g.v)


def _burst(run: Run, rnd: Round, cursor: int) -> tuple[int, int]:
    """One burst of the bitmap walk, guest running; returns the new cursor and the bytes delivered."""
    eng, g, link = run.eng, run.guest, run.link
    until = g.v + run.s.migration.burst_ns
    down = link.down_at()
    transfer.begin(run, SOURCE)
    while True:
        lim = transfer.split(run, until)  # an adversary's action due within: a step ends there
        cursor, batch = transfer.step(run, None, cursor, run_host=SOURCE, paused=False, stream="precopy",
                                      until_v=lim, deadline_v=link.deadline(down))
        st = eng.transfer_state()
        if st["link_dead"] or st["v_ns"] >= until or eng.send_count(SOURCE) == 0 or (batch is None and lim == until):
            break
    transfer.account(run, rnd, st)
    v0 = until - run.s.migration.burst_ns
    g.adopt(st["v_ns"], st["g_ns"])
    if st["link_dead"]:
        raise LinkDown(down)
    # Agents on demand: a burst the agents (not the link) paced asks for as many more as its pace says
    # the link could take (agents x burst time / link time), up to what keeps pace with the link and the
    # design's limit; creating them takes the migration's clock (the sender waits for them).
    link_ns = run.link.wire_ns(st["bytes"])
    if st["v_ns"] - v0 > link_ns and run.agents < agents_wanted(run):
        grow_agents(run, min(agents_wanted(run), -(-run.agents * (st["v_ns"] - v0) // max(1, link_ns))))
    return cursor, st["bytes"]


def _new_round(run: Run, dirty: int, sync_ns: int) -> Round:
    rnd = run.new_round("precopy", sync_ns, dirty)
    run.log("round_start", f"round={rnd.round} dirty_pages={dirty} agents={run.agents}")
    return rnd


def _close_round(run: Run, rnd: Round) -> None:
    g = run.guest
    rnd.end_ns, rnd.guest_progress_ns = g.v, g.g - rnd.guest_start_ns
    run.log("round_end", f"round={rnd.round} pages={rnd.pages_sent} bytes={rnd.bytes_sent}")


def _end(run: Run, rnd: Round, action: str, reason: str, rounds: int, pending: int, meter: _Meter) -> PrecopyEnd:
    _close_round(run, rnd)
    bw = meter.bandwidth or run.link.bandwidth_bytes_per_s  # no period measured yet: the link's capacity
    expected = pending * NS_PER_S // bw
    run.log("precopy_end", f"{reason}: {action}; pending={pending} threshold={meter.threshold} bandwidth={bw}")
    return PrecopyEnd(action, reason, rounds, pending, meter.threshold, bw, expected)
