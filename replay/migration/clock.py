"""The guest on the virtual clock: where it is in the trace, where it runs, and how far it has got.

``v`` is virtual time; ``g`` is the guest's progress in trace time. They move together until migration
work takes the guest's CPU (shadow agents on its quota, write-protect faults of dirty tracking) or stops it
(the pause of a switchover). Post-copy adds per-vCPU delays (time blocked on remote faults) and page-ready
times; the guest then stops at a userfault and asks ``on_userfault`` to serve it.
"""

from __future__ import annotations

from typing import Callable

import pyarrow as pa

from ..model.snp import Fault

ProgressFn = Callable[[int], None]


class Cursor:
    """Where the guest is in the trace: the current record batch and row."""

    def __init__(self, reader, progress: ProgressFn | None):
        self._it = iter(reader)
        self._progress = progress
        self.batch: pa.RecordBatch | None = None
        self.base = 0
        self.row = 0
        self._next()

    def _next(self) -> None:
        if self.batch is not None and self._progress:
            self._progress(self.batch.num_rows)
        nxt = next(self._it, None)
        if nxt is None:
            self.batch = None
        else:
            self.base, self.batch = nxt
            self.row = 0

    def drain(self) -> None:
        """Read the rest of the trace without replaying it (its digest is checked at the end)."""
        while self.batch is not None:
            self.batch = None
            self._next()

    @property
    def done(self) -> bool:
        return self.batch is None

    def settle(self, row: int) -> None:
        self.row = row
        while self.batch is not None and self.row >= self.batch.num_rows:
            self._next()


class Guest:
    """The guest's replay and clocks. Phases move it with ``elapse`` (running) or ``pause``; transfers move it
    through the engine's transfer clock and hand the result back with ``adopt``."""

    def __init__(self, eng, reader, vcpus: int, wp_fault_ns: int, demand, progress: ProgressFn | None = None):
        self.eng = eng
        self.demand = demand  # replay.model.demand.Demand: when the vCPUs want CPU, and the VM's quota
        self.cur = Cursor(reader, progress)
        self.vcpus = vcpus
        self.wp_fault_ns = wp_fault_ns
        self.v = 0
        self.g = 0
        self.host = 0  # where it runs: the source until it resumes on the target
        self.delays = None  # post-copy: per-vCPU time blocked so far
        self.ready = None  # post-copy: guest time from which each page is usable on the target
        self.on_userfault: Callable[[], bool] | None = None
        self.data = None  # data mode (replay.migration.data.DataMode): the rows' contents
        self._wp_seen = 0

    def run_to(self, g_stop: int) -> bool:
        """Replay on ``host`` up to guest time ``g_stop``; False if a userfault cannot be served (the link is
        gone for good)."""
        cur, eng = self.cur, self.eng
        while not cur.done:
            n = cur.batch.num_rows
            row = eng.replay(self.host, cur.batch, cur.row, cur.base, g_stop, self.delays, self.ready)
            if self.data is not None:
                self.data.rows(self.host, cur.batch, cur.row, row)
            cur.settle(row)
            if eng.last_stop[0] == Fault.USERFAULT:
                if not self.on_userfault():
                    return False
                continue
            if row < n:
                break  # stopped by time
        return True

    def wp_debt_ns(self) -> int:
        """Guest CPU lost to write-protect faults taken since last charged (first writes after a sync)."""
        now = sum(self.eng.wp_faults(h) for h in range(self.eng.hosts))
        debt, self._wp_seen = (now - self._wp_seen) * self.wp_fault_ns, now
        return debt

    def elapse(self, dv: int, lost_cpu_ns: int = 0) -> None:
        """``dv`` of virtual time passes with the guest running; ``lost_cpu_ns`` of its quota goes to agents
        meanwhile (it slows the guest only beyond its spare quota), besides the write-protect faults it took
        since last charged (its own time)."""
        direct = self.wp_debt_ns()
        self.v += dv
        self.g = self.demand.advance(self.g, dv, lost_cpu_ns, direct)
        self.run_to(self.g)

    def pause(self, dv: int) -> None:
        """``dv`` passes with the guest stopped (a switchover's downtime)."""
        self.v += dv

    def adopt(self, v: int, g: int | None) -> bool:
        """Take a transfer's clock: ``g`` None while the guest is paused."""
        self.v = v
        if g is None:
            return True
        self.wp_debt_ns()  # the transfer clock already charged these
        self.g = g
        # The engine replays lazily before each page: bring the guest up to the clock.
        return self.run_to(self.g)
