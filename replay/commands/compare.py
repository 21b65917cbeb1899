"""`replay compare SCENARIO --out DIR`: run mirror-vm and shadow-vcpu on one trace, side by side."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import ExitCode
from ..paths import check_output, check_replaceable_dir
from ..records import atomic_dir
from ..scenario import STRATEGIES
from ..units import format_bytes, format_ns
from .run import add_common, check_invariants, prepare, progress_bar, scenario_inputs, scenario_of

# (label, path into metrics, formatter)
ROWS = [
    ("status", ("status",), str),
    ("total time", ("metrics", "total_ns"), format_ns),
    ("setup time", ("metrics", "setup_ns"), format_ns),
    ("downtime", ("metrics", "downtime_ns"), format_ns),
    ("guest slowdown (trade-off)", ("metrics", "guest_slowdown_ppm"), lambda v: f"{v / 10_000:.2f} %"),
    ("expected downtime", ("metrics", "expected_downtime_ns"), format_ns),
    ("downtime limit exceeded", ("metrics", "downtime_limit_exceeded"), str),
    ("switchover reason", ("metrics", "switchover_reason"), str),
    ("dirty syncs (rounds)", ("metrics", "rounds"), str),
    ("pages sent", ("metrics", "pages_sent"), str),
    ("zero pages", ("metrics", "zero_pages"), str),
    ("bytes sent", ("metrics", "bytes_sent"), format_bytes),
    ("  pre-copy bytes", ("metrics", "precopy_bytes"), format_bytes),
    ("  downtime bytes", ("metrics", "downtime_bytes"), format_bytes),
    ("  post-copy bytes", ("metrics", "postcopy_bytes"), format_bytes),
    ("agents (max)", ("metrics", "agents_max"), str),
    ("CPU: guest", ("metrics", "cpu_ns", "guest"), format_ns),
    ("CPU: primary-VM agents", ("metrics", "cpu_ns", "primary_vm_agents"), format_ns),
    ("CPU: mirror VM", ("metrics", "cpu_ns", "mirror_vm"), format_ns),
    ("CPU: host", ("metrics", "cpu_ns", "host"), format_ns),
    ("guest CPU demanded (window)", ("metrics", "cpu_demand", "demanded_ns"), format_ns),
    ("host CPUs taken by migration", ("metrics", "cpu_demand", "host_cpus_taken_milli"), lambda v: f"{v / 1000:.2f}"),
    ("RMPUPDATE (target)", ("metrics", "rmp", "target", "rmpupdate"), str),
    ("PVALIDATE (target)", ("metrics", "rmp", "target", "pvalidate"), str),
    ("page-state changes (source)", ("metrics", "rmp", "source", "psc"), str),
]
POSTCOPY_ROWS = [
    ("post-copy requests", ("metrics", "postcopy", "requests"), str),
    ("blocktime (total)", ("metrics", "postcopy", "blocktime_ns"), format_ns),
    ("fault latency p50", ("metrics", "postcopy", "latency_p50_ns"), format_ns),
    ("fault latency p99", ("metrics", "postcopy", "latency_p99_ns"), format_ns),
    ("fault latency max", ("metrics", "postcopy", "latency_max_ns"), format_ns),
    ("switchover -> complete", ("metrics", "postcopy", "switchover_to_complete_ns"), format_ns),
    ("source-only pages", ("metrics", "postcopy", "source_only_pages"), str),
]


DATA_ROWS = [
    ("handshake", ("metrics", "security", "handshake_verdict"), str),
    ("validation token", ("metrics", "security", "token"), str),
    ("page bytes before compression", ("metrics", "security", "source", "payload_bytes"), format_bytes),
    ("page bytes after compression", ("metrics", "security", "source", "compressed_bytes"), format_bytes),
    ("sealed bytes on the wire", ("metrics", "security", "source", "wire_bytes"), format_bytes),
    ("shared pages sent unprotected", ("metrics", "security", "shared_pages_unprotected"), str),
    ("packets accepted by the target", ("metrics", "security", "target", "outcomes", "accepted"), str),
    ("plaintext end == no migration", ("invariants", "plaintext_end_equals_no_migration"), str),
]


MISSING = object()


def _get(summary: dict, path: tuple[str, ...]):
    """The value at ``path``, or MISSING: a run refused before any page moved (a failed handshake) has no
    per-host traffic to report."""
    for key in path:
        if not isinstance(summary, dict) or key not in summary:
            return MISSING
        summary = summary[key]
    return summary


def _invariants(s: dict) -> str:
    """A failed migration has no end of trace to check: say so rather than "NO"."""
    if s["status"] == "failed":
        return "n/a (failed)"
    explained = (s.get("adversary_effects") or {}).get("explains", [])  # the adversary's, expected
    return "yes" if all(ok or k in explained for k, ok in s["invariants"].items()) else "NO"


DEMAND_MODELS = {
    "trace-idle": "the trace's idle intervals",
    "trace-span": "every vCPU busy until the trace's last event, idle after (the trace records no idle time)",
    "busy": "every vCPU busy at all times",
    "fraction": "a constant fraction of the vCPUs busy until the trace's last event",
}


def demand_line(summary: dict) -> str:
    """What the guest's CPU demand was taken to be: every slowdown figure rests on it."""
    d = summary["metrics"].get("cpu_demand") or {}
    what = DEMAND_MODELS.get(d.get("model", ""), d.get("model", "?"))
    return (f"guest CPU demand: {what}; quota {d.get('quota_cpus_milli', 0) / 1000:g} CPUs "
            f"(guest.cpu_demand = {summary['scenario']['guest'].get('cpu_demand', 'trace')!r})")


def table(summaries: list[dict]) -> str:
    rows = ROWS + (POSTCOPY_ROWS if summaries[0]["mode"] != "precopy" else [])
    rows += DATA_ROWS if all("data" in s for s in summaries) else []
    head = ["metric"] + [s["strategy"] for s in summaries]
    body = [[label] + ["-" if (v := _get(s, path)) is MISSING else fmt(v) for s in summaries]
            for label, path, fmt in rows]
    faults = [sum(s["metrics"]["faults"].values()) for s in summaries]
    body.append(["RMP faults"] + [str(f) for f in faults])
    body.append(["invariants hold"] + [_invariants(s) for s in summaries])
    ends = {s["digests"]["end_of_trace"] for s in summaries}
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for s in summaries:
        lines.append(f"kernel ({s['strategy']}, profile {s['kernel']['profile']}): {s['kernel']['verdict']}")
    lines.append(demand_line(summaries[0]))
    if "" in ends:
        lines.append("end of trace not reached by every run (a failed migration stops the guest)")
    else:
        lines.append(f"end-of-trace digests {'equal' if len(ends) == 1 else 'DIFFER'} across strategies"
                     f" ({sorted(ends)[0][:16]}...)")
    return "\n".join(lines)


def configure(p) -> None:
    add_common(p)


# Set in each worker process by _init_worker (a multiprocessing Event and Queue can only reach a spawned
# process at its creation, not as task arguments).
_STOP = None
_QUEUE = None


class _Stopped(Exception):
    """The other strategy's run failed: this one is not wanted any more."""


def _init_worker(stop, queue) -> None:
    global _STOP, _QUEUE
    _STOP, _QUEUE = stop, queue


def _progress(n: int) -> None:
    # Called by the driver after every record batch: the cheap place to notice that the run is not wanted.
    if _STOP.is_set():
        raise _Stopped
    if _QUEUE is not None:
        _QUEUE.put(n)


def _run_strategy(scenario, strategy, engine, trace_path, no_migration_digest, plaintext_reference):
    """One strategy's run in a worker process; the record is returned, not written (see ``run``)."""
    from ..migrate import Migration

    return Migration(scenario.with_strategy(strategy), trace_path, engine=engine, progress=_progress,
                     no_migration_digest=no_migration_digest, plaintext_reference=plaintext_reference).run()


def _drain(queue, update) -> None:
    """Feed the workers' progress reports (event counts; None ends) into the parent's bar."""
    for n in iter(queue.get, None):
        update(n)


def run_parallel(scenario, *, engine: str, trace_path, show_progress: bool):
    """Run every strategy of ``scenario`` on one trace, each in its own process; returns their RunResults
    in STRATEGIES order. The no-migration reference is read from its cache, or else each worker computes it
    beside its run from its own read of the trace (refdigest.Background: the same digest in both, on the
    core that would otherwise wait for a separate pass first). When one run fails the other is stopped at its next record
    batch and the failure is raised; a worker process that dies is a WorkerError."""
    import multiprocessing
    import threading
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from ..errors import WorkerError
    from ..refdigest import lookup, plaintext_digest
    from ..trace import read_meta

    meta = read_meta(trace_path)
    g = scenario.guest
    known = lookup(meta, g.asid, g.os_vmpl, engine)
    passes = len(STRATEGIES) * (1 + (known is None))
    # spawn, not fork: the parent may hold pyarrow/tqdm threads, which fork would copy mid-flight.
    ctx = multiprocessing.get_context("spawn")
    with progress_bar(passes * meta.events, "compare", show_progress) as update:
        nomig = known  # None: each worker computes it (see above)
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


def run(args) -> int:
    from ..report import write_report
    from ..runrecord import load_run

    scenario = scenario_of(args)
    out = Path(args.out)
    check_output(out, scenario_inputs(scenario, args))
    check_replaceable_dir(out, (*STRATEGIES, "report.html"), "compare directory")
    trace_path, _ = prepare(scenario, trace=args.trace, allow_memory=args.allow_memory, out_check=out,
                            processes=len(STRATEGIES))  # both workers run at once
    results = run_parallel(scenario, engine=args.engine, trace_path=trace_path, show_progress=not args.no_progress)
    # Both runs and the report are built in a temporary directory that replaces ``out`` only when all
    # three are complete: a failure of either strategy (or Ctrl-C, or a full disk) leaves nothing.
    with atomic_dir(out) as tmp:
        for r, s in zip(results, STRATEGIES):
            r.write(tmp / s)
        # The report names each run by where it will be, not by the temporary directory.
        runs = [dataclasses.replace(load_run(tmp / s), path=out / s) for s in STRATEGIES]
        write_report(runs, tmp / "report.html")
    s0 = results[0].summary
    print(f"{scenario.name or Path(args.scenario).stem}: {s0['mode']}, trace {s0['trace']['digest'][:16]}... "
          f"({s0['trace']['events']} events, {format_bytes(s0['trace']['guest_bytes'])}, {s0['trace']['vcpus']} vCPUs)")
    print(table([r.summary for r in results]))
    print(f"runs: {out / STRATEGIES[0]}, {out / STRATEGIES[1]}; report: {out / 'report.html'}")
    for r, s in zip(results, STRATEGIES):
        check_invariants(r, out / s)
    return ExitCode.OK if all(r.status == "completed" for r in results) else ExitCode.DIFFERS
