"""Running scenarios: the checks made before a run replays anything, one strategy's run, and compare's two
strategies in parallel worker processes. ``replay.api`` (and through it ``replay run``/``replay compare``)
calls these; nothing here prints or parses arguments.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..core.errors import InvariantError
from ..core.paths import check_output
from ..scenario.spec import STRATEGIES, Scenario


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Callable[[int], Any] | None]:
    """A tqdm bar over trace events, on a terminal only (records never depend on it)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="ev", unit_scale=True, leave=False, file=sys.stderr) as bar:
        yield bar.update


def prepare(scenario: Scenario, *, trace: str | Path | None, allow_memory: bool = False,
            out_check: str | Path | None = None, processes: int = 1) -> tuple[Path, Any]:
    """Everything refused before a run replays anything: memory and disk for the guest and its generated
    trace, the trace itself, the round budget. Returns (trace path, its metadata).
    ``out_check``: the output the user named, checked again against the trace once it is known.
    ``processes``: runs at the same time (compare's workers), each needing a run's memory."""
    from ..core.errors import TraceError
    from . import trace_for
    from ..core.paths import cache_dir
    from ..traces.format import last_t_ns, open_trace, read_meta
    from ..core.validate import (
        MAX_RUN_GUEST_BYTES,
        RUN_TRACE_END_MAX,
        TRACE_ROW_BYTES,
        check_disk,
        check_memory,
        check_round_budget,
        run_memory_bytes,
    )

    t, g = scenario.trace, scenario.guest
    if trace is None and t.generator:
        # Refuse before generating: a generated trace costs time and disk in proportion to its size.
        check_memory(run_memory_bytes(g.guest_bytes, g.vcpus),
                     f"a run of a {g.guest_bytes}-byte guest with {g.vcpus} vCPUs", allow_memory, processes)
        total = t.events + (g.guest_bytes // 4096 if t.fill else 0)
        check_disk(total * TRACE_ROW_BYTES, cache_dir(), f"generating the scenario's trace ({total} events)")
    path = trace if trace is not None else trace_for(scenario)  # --trace '' is an error, not "absent"
    if out_check is not None:
        check_output(out_check, [path])
    meta = read_meta(path)
    with open_trace(path, verify_digest=False) as reader:  # the last batch only; the run's read verifies all
        last = last_t_ns(reader)
    if last is not None and last > RUN_TRACE_END_MAX:
        # The run's clock goes on past the trace (the migration finishes, the records hold its times in
        # 64 bits): a trace ending in the last half of the clock's range leaves it no room.
        raise TraceError(f"{meta.path}: the trace ends at t_ns {last}: a run replays traces ending by 2^63-1 ns "
                         f"(292 years), so that the migration after it still fits the run's 64-bit clock")
    if meta.guest_bytes > MAX_RUN_GUEST_BYTES:
        raise TraceError(f"{meta.path}: guest of {meta.guest_bytes} bytes is beyond what a run migrates "
                         f"({MAX_RUN_GUEST_BYTES} bytes, 16 TiB - 4 MiB: the SVSM's VMSA pages take the "
                         f"last 1,024 of the 2^32 gfns)")
    check_round_budget(scenario.migration, meta.npages)
    check_memory(run_memory_bytes(meta.guest_bytes, meta.vcpus),
                 f"a run of {meta.path} ({meta.guest_bytes} bytes of guest, {meta.vcpus} vCPUs)", allow_memory,
                 processes)
    return path, meta


def execute(scenario: Scenario, out: str | Path, *, strategy: str | None, engine: str, trace: str | Path | None,
            show_progress: bool, no_migration_digest: str | None = None, allow_memory: bool = False,
            out_check: str | Path | None = None) -> Any:
    """Run one strategy and write the run directory; returns the RunResult. ``no_migration_digest`` (from
    another strategy's run of the same scenario) spares the reference replay of the whole trace."""
    from . import Migration
    from .refdigest import lookup

    if strategy is not None:
        scenario = scenario.with_strategy(strategy)
    path, meta = prepare(scenario, trace=trace, allow_memory=allow_memory, out_check=out_check)
    # Two passes over the trace unless the no-migration reference is known (given, or cached by an
    # earlier run of this trace and guest): it, then the migrated run.
    g = scenario.guest
    no_migration_digest = no_migration_digest or lookup(meta, g.asid, g.os_vmpl, engine)
    passes = 1 if no_migration_digest else 2
    with progress_bar(passes * meta.events, scenario.migration.strategy, show_progress) as update:
        result = Migration(scenario, path, engine=engine, progress=update,
                           no_migration_digest=no_migration_digest).run()
    result.write(out)
    return result


def check_invariants(result: Any, out: str | Path) -> None:
    """An invariant that failed in a completed run (and that no adversary action explains) is a bug:
    InvariantError, after the run record was written."""
    explained = result.summary.get("adversary_effects", {}).get("explains", [])  # reported, not a bug
    bad = [k for k, ok in result.summary["invariants"].items() if not ok and k not in explained]
    if bad and result.status == "completed":
        raise InvariantError(f"{out}: invariant(s) violated: {', '.join(bad)} (a bug in snp-replay; the run record is kept)")


# Set in each worker process by _init_worker (a multiprocessing Event and Queue can only reach a spawned
# process at its creation, not as task arguments).
_STOP = None
_QUEUE = None


class _Stopped(Exception):
    """The other strategy's run failed: this one is not wanted any more."""


def _init_worker(stop: Any, queue: Any) -> None:
    global _STOP, _QUEUE
    _STOP, _QUEUE = stop, queue


def _progress(n: int) -> None:
    # Called by the driver after every record batch: the cheap place to notice that the run is not wanted.
    if _STOP.is_set():
        raise _Stopped
    if _QUEUE is not None:
        _QUEUE.put(n)


def _run_strategy(scenario: Scenario, strategy: str, engine: str, trace_path: Path, no_migration_digest: str | None,
                  plaintext_reference: str | None) -> Any:
    """One strategy's run in a worker process; the record is returned, not written (see ``run``)."""
    from . import Migration

    return Migration(scenario.with_strategy(strategy), trace_path, engine=engine, progress=_progress,
                     no_migration_digest=no_migration_digest, plaintext_reference=plaintext_reference).run()


def _drain(queue: Any, update: Callable[[int], Any]) -> None:
    """Feed the workers' progress reports (event counts; None ends) into the parent's bar."""
    for n in iter(queue.get, None):
        update(n)


def run_parallel(scenario: Scenario, *, engine: str, trace_path: Path, show_progress: bool) -> list[Any]:
    """Run every strategy of ``scenario`` on one trace, each in its own process; returns their RunResults
    in STRATEGIES order. The no-migration reference is read from its cache, or else each worker computes it
    beside its run from its own read of the trace (refdigest.Background: the same digest in both, on the
    core that would otherwise wait for a separate pass first). When one run fails the other is stopped at its next record
    batch and the failure is raised; a worker process that dies is a WorkerError."""
    import multiprocessing
    import threading
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from ..core.errors import WorkerError
    from .refdigest import lookup, plaintext_digest
    from ..traces.format import read_meta

    meta = read_meta(trace_path)
    g = scenario.guest
    known = lookup(meta, g.asid, g.os_vmpl, engine)
    passes = len(STRATEGIES) * (1 + (known is None))
    # spawn, not fork: the parent may hold pyarrow/tqdm threads, which fork would copy mid-flight.
    ctx = multiprocessing.get_context("spawn")
    with progress_bar(passes * meta.events, "compare", show_progress) as update:
        nomig = known  # None: each worker computes it beside its run (refdigest.Background)
        # data mode's reference too, once here rather than once per worker
        plain = plaintext_digest(trace_path, meta) if scenario.migration.data else None
        stop, queue = ctx.Event(), ctx.Queue() if update else None
        drain = threading.Thread(target=_drain, args=(queue, update), daemon=True) if update else None
        if drain:
            drain.start()
        pool = ProcessPoolExecutor(max_workers=len(STRATEGIES), mp_context=ctx, initializer=_init_worker,
                                   initargs=(stop, queue))
        try:
            futures = [pool.submit(_run_strategy, scenario, s, engine, trace_path, nomig, plain) for s in STRATEGIES]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:
                stop.set()
                raise failed[0].exception()
            return [f.result() for f in futures]
        except BrokenProcessPool as exc:
            # A worker died. CPython stops the others itself, but one it was still starting when the death
            # was noticed escapes that and the pool then waits for it forever (seen with a worker killed
            # at start-up): stop every worker of the pool here, so that shutting it down cannot hang.
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
            raise WorkerError(f"a compare worker process died ({exc}); out of memory?") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if drain:
                queue.put(None)
                drain.join()


