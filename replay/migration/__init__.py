"""The migration driver: replays a whole trace on one virtual clock and migrates the guest inside it.

A run is a sequence of phases over shared services (``context.Run``: engine, guest clock, link, CPU
ledger, event log), each phase a module that returns a small result the next one takes:

  setup (setup.py) -> pre-copy (precopy.py, QEMU's loop) -> stop-and-copy (stopcopy.py)
                                                         \\-> post-copy (postcopy.py)
  -> the guest runs on (at the target after a completed migration) to the end of the trace
  -> the record (record.py).

``clock.py`` holds the guest's replay and clocks, ``link.py`` the link and its failures, ``cpu.py`` who
pays for what, ``transfer.py`` the per-page costs on the engine's transfer clock. Nothing here reads a wall
clock or an unseeded random source.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..model.demand import build_demand
from ..engines.common import U64_MAX
from ..engines import make_engine
from ..core.errors import ScenarioError
from ..scenario.spec import Scenario
from ..scenario.strategies import SOURCE, TARGET, make_strategy
from ..traces.format import TraceMeta, open_trace, read_meta
from .clock import Guest, ProgressFn
from .context import Run
from .cpu import Cpu
from .link import Link, LinkDown
from .postcopy import postcopy, switch_to_postcopy
from .precopy import precopy
from .record import Outcome, RunResult, build
from .setup import agents_wanted, grow_agents, setup, teardown
from .stopcopy import stop_and_copy
from .traces import cache_dir, last_event_ns, trace_for

if TYPE_CHECKING:
    from .data import DataRefused

__all__ = ["Migration", "RunResult", "run", "trace_for", "cache_dir"]


class _NeverRaised(Exception):
    """Stands for data mode's DataRefused in a metadata run, which does not import data mode (nor the
    cryptography behind it): a metadata run starts ~0.1 s sooner without them."""


class Migration:
    """One run: a scenario, a trace and a strategy. ``run()`` returns a RunResult.

    ``engine``: an engine kind, or a callable ``(**engine_args) -> engine`` (tests inject faulty engines).
    ``no_migration_digest`` (and in data mode ``plaintext_reference``): the reference digests if already
    known (another strategy's run of the same scenario, a sweep's prepared trace), saving a replay of the
    whole trace; otherwise they come from the reference cache or are computed into it."""

    def __init__(self, scenario: Scenario, trace_path: str | Path, *, engine: str | Callable = "cython",
                 progress: ProgressFn | None = None, no_migration_digest: str | None = None,
                 plaintext_reference: str | None = None):
        self.trace_path = Path(trace_path)
        self.meta: TraceMeta = read_meta(self.trace_path)
        g = scenario.guest
        for key, want, have in (("guest_bytes", g.guest_bytes, self.meta.guest_bytes), ("vcpus", g.vcpus, self.meta.vcpus)):
            if want and want != have:
                raise ScenarioError(f"{self.trace_path}: the trace's {key} is {have} but the scenario's guest.{key} is "
                                    f"{want} (--set guest.{key}={have}, or 0 to take the trace's)")
        self.s = scenario
        self.strategy = make_strategy(scenario)
        self.engine = engine
        self.engine_kind = engine if isinstance(engine, str) else getattr(engine, "kind", "custom")
        self.progress = progress
        self._no_migration = no_migration_digest
        self._plaintext = plaintext_reference
        # Everything that can be refused is refused before any replay work.
        self.strategy.check(self.meta.has_private, self.meta.vcpus)
        self.trace_last_ns = last_event_ns(self.trace_path)
        self.demand = build_demand(g.cpu_demand, g.cpu_quota, self.meta.vcpus,
                                   self.trace_last_ns if self.meta.events else None, self.meta.vcpu_idle)

    def _engine(self, hosts: int):
        g, kw = self.s.guest, dict(npages=self.meta.npages, vcpus=self.meta.vcpus, hosts=hosts)
        kw.update(asid=g.asid, os_vmpl=g.os_vmpl)
        return make_engine(self.engine, **kw) if isinstance(self.engine, str) else self.engine(**kw)

    def run(self) -> RunResult:
        out = Outcome()
        g = self.s.guest
        ref = None
        if not self._no_migration:
            from .refdigest import Background, lookup  # replayed once per trace and guest, then cached

            kind = self.engine if isinstance(self.engine, str) else "cython"
            self._no_migration = lookup(self.meta, g.asid, g.os_vmpl, kind)
            if not self._no_migration and Background.fits(self.meta):
                # Not known yet: replayed beside this run, from this run's own read of the trace.
                ref = Background(self.meta, g.asid, g.os_vmpl, kind)
            elif not self._no_migration:  # a second engine would not fit: a separate pass first
                from .refdigest import no_migration_digest

                self._no_migration = no_migration_digest(self.trace_path, self.meta, g.asid, g.os_vmpl, kind,
                                                         self.progress)
        try:
            return self._run(out, ref)
        finally:
            if ref is not None:
                ref.abandon()

    def _run(self, out: Outcome, ref) -> RunResult:
        out.digests["no_migration"] = self._no_migration or ""
        eng = self._engine(2)
        data = None
        refusal: type[Exception] = _NeverRaised
        if self.s.migration.data:
            from .refdigest import plaintext_digest
            from .data import DataMode, DataRefused

            refusal = DataRefused

            data = DataMode(self.s.seed, eng, self.meta, self.s.migration.data_zstd_level, self.s.attestation)
            data.plaintext["no_migration"] = self._plaintext or plaintext_digest(self.trace_path, self.meta)
        adversary = None
        with open_trace(self.trace_path) as reader:
            eng.launch(SOURCE, list(self.meta.shared_ranges))
            eng.reset_counters()  # launch is not part of the migration
            rows = reader if ref is None else _Tee(reader, ref, self.progress)
            guest = Guest(eng, rows, self.meta.vcpus, self.s.costs.dirty_wp_fault_ns, self.demand, self.progress)
            guest.data = data
            faults = self.s.faults
            if self.s.adversary:  # the scenario turned data mode on for it
                from .adversary import Adversary, link_faults

                faults = link_faults(self.s)
                adversary = data.adversary = Adversary(self.s.adversary, data, eng, guest, self.s.seed,
                                                       self.s.migration.start_ns, self.trace_path)
            start = self.s.migration.start_ns
            guest.run_to(start)
            guest.v = guest.g = start
            run = Run(self.s, self.meta, eng, self.strategy, guest, Link.of(self.s.migration, faults, start),
                      Cpu(self.s, self.strategy, self.meta.vcpus, self.demand), data=data)
            out.times["migration_start_ns"] = start
            run.log("migration_start", f"strategy={self.strategy.name} mode={self.s.migration.mode}")
            try:
                self._migrate(run, out)
            except LinkDown as down:
                self._aborted(run, out, down.at_ns)
                if adversary is not None:
                    f = run.link.outage(down.at_ns)  # the fault that cut it: a link-loss action's, or not
                    adversary.link_down(down.at_ns, f.at_ns if f is not None else None)
            except refusal as refused:
                self._refused(run, out, refused)  # the action it saw was named where the check ran
            out.guest_g_at_end = guest.g  # the end of the migration window: the guest has not run past it
            if out.status != "failed":
                self._finish_trace(run, out)
            if ref is not None:
                guest.cur.drain()  # the rest of the trace (a failed run stops early), read and verified
                self._no_migration = out.digests["no_migration"] = ref.result()
        return build(run, out, self.engine_kind)

    def _migrate(self, run: Run, out: Outcome) -> None:
        m, g = self.s.migration, run.guest
        out.times["setup_ns"], synced = setup(run, dirty_logging=m.mode != "postcopy")
        if m.mode == "postcopy":
            # Post-copy's push cannot wait for agents: they are sized before the switchover. Pre-copy adds
            # them on demand, one per burst its agents paced (precopy._burst).
            grow_agents(run, agents_wanted(run))
        action = "postcopy"
        if m.mode != "postcopy":
            hybrid = m.mode == "hybrid"
            pe = precopy(run, max_rounds=m.precopy_rounds + 1 if hybrid else m.max_rounds,
                         on_max_rounds="postcopy" if hybrid else m.on_max_rounds, initial_sync_ns=synced)
            action = pe.action
            out.switchover_reason = pe.reason
            out.times["expected_downtime_ns"] = pe.expected_downtime_ns
            # QEMU's dirty-sync-count: the completion's final sync counts too (not a cancel's: it has none).
            final = 0 if pe.action == "cancel" else 1
            out.precopy = {"rounds": pe.rounds + final, "pending_bytes": pe.pending_bytes,
                           "threshold_bytes": pe.threshold_bytes, "bandwidth_bytes_per_s": pe.bandwidth_bytes_per_s,
                           "action": pe.action}
            out.downtime_limit_exceeded = pe.reason == "max_rounds" and pe.pending_bytes > pe.threshold_bytes
        if action == "cancel":
            run.eng.set_dirty_logging(SOURCE, False)
            out.status, out.reason = "cancelled", f"not converged after {pe.rounds} rounds: cancelled (on_max_rounds)"
            out.times["completion_ns"] = g.v
            run.log("cancel", out.reason)
            return
        out.times["switchover_ns"] = g.v
        if action == "stop-and-copy":
            sw = stop_and_copy(run)
            out.vmsas_sent = sw.vmsas
            out.digests["source_at_switchover"], out.digests["target_at_switchover"] = sw.source_digest, sw.target_digest
            out.times["resume_ns"] = sw.resume_ns
            teardown(run)
            out.times["completion_ns"] = g.v
        else:
            if m.mode != "precopy":  # pre-copy reaches post-copy only through on_max_rounds: reason max_rounds
                out.switchover_reason = "postcopy"
            sw = switch_to_postcopy(run, hybrid=m.mode != "postcopy")
            out.vmsas_sent = sw.vmsas
            out.times["resume_ns"] = sw.resume_ns
            out.digests["source_at_switchover"] = sw.source_digest
            pe2 = postcopy(run, sw)
            out.postcopy = pe2.stats
            if pe2.completed:
                teardown(run)
            out.times["completion_ns"] = g.v
            out.digests["target_at_switchover"] = pe2.target_digest
            if not pe2.completed:
                out.status = "failed"
                out.reason = (f"link lost for good during post-copy: {pe2.stats.source_only_pages} pages exist only on "
                              "the source; the target cannot run on and the source is stopped")
                run.log("postcopy_failed", out.reason)
        out.times["downtime_ns"] = out.times["resume_ns"] - out.times["switchover_ns"]
        out.downtime_limit_exceeded |= out.times["downtime_ns"] > m.downtime_limit_ns

    def _aborted(self, run: Run, out: Outcome, at_ns: int) -> None:
        """A link failure before the target runs: abort; the source runs on with its memory intact."""
        run.log("link_down", "migration link lost", t=at_ns)
        self._source_runs_on(run, out, f"link down at {at_ns} ns before the target resumed: source runs on", at_ns)

    def _refused(self, run: Run, out: Outcome, refused: DataRefused) -> None:
        """Data mode's checks stopped the migration: before the target runs, an abort (the source runs on,
        intact); after it (post-copy's token), a failure."""
        out.detected_by = refused.detected_by
        if run.guest.host == TARGET:
            out.status, out.reason = "failed", f"{refused.reason}: the target ran on unverified memory"
            run.log("postcopy_failed", out.reason)
            return
        self._source_runs_on(run, out, f"{refused.reason}: the target does not run; the source runs on", run.guest.v)

    @staticmethod
    def _source_runs_on(run: Run, out: Outcome, reason: str, at_ns: int) -> None:
        """Status aborted: the target never runs; the source (paused since the switchover, if any, until
        ``at_ns``) goes on with its memory intact."""
        g = run.guest
        out.status, out.reason = "aborted", reason
        run.eng.set_dirty_logging(SOURCE, False)
        if at_ns > g.v:
            if out.times["switchover_ns"]:
                g.pause(at_ns - g.v)
            else:
                g.elapse(at_ns - g.v)
        out.times["completion_ns"] = g.v
        out.times["downtime_ns"] = g.v - out.times["switchover_ns"] if out.times["switchover_ns"] else 0
        out.digests["target_at_switchover"] = ""
        g.host = SOURCE
        run.log("abort", reason)

    def _finish_trace(self, run: Run, out: Outcome) -> None:
        """The guest runs on (at the target after a completed migration) to the end of the trace."""
        g = run.guest
        g.run_to(U64_MAX)
        out.digests["end_of_trace"] = run.eng.digest(g.host)
        if run.data is not None:
            run.data.snapshot("end_of_trace", g.host)
        lag = int(g.delays.max()) if g.delays is not None else 0  # the most-blocked vCPU ends last
        out.times["trace_end_ns"] = g.v + max(0, self.trace_last_ns + lag - g.g)
        run.log("trace_end", f"host={'target' if g.host == TARGET else 'source'}", t=out.times["trace_end_ns"])


class _Tee:
    """The trace's validated batches, each also fed to a background reference replay (refdigest.Background)
    as the run reads it; the progress callback counts them once more (the reference's pass)."""

    def __init__(self, reader, ref, progress: ProgressFn | None):
        self.reader, self.ref, self.progress = reader, ref, progress

    def __iter__(self):
        for base, batch in self.reader:
            self.ref.feed(base, batch)
            if self.progress:
                self.progress(batch.num_rows)
            yield base, batch


def run(scenario: Scenario, *, strategy: str | None = None, engine: str | Callable = "cython",
        trace_path: str | Path | None = None, progress: ProgressFn | None = None) -> RunResult:
    """Run ``scenario`` (optionally under another strategy) and return its record (not yet written)."""
    if strategy is not None:
        scenario = scenario.with_strategy(strategy)
    path = Path(trace_path) if trace_path is not None else trace_for(scenario)
    return Migration(scenario, path, engine=engine, progress=progress).run()
