"""`replay compare SCENARIO --out DIR`: run mirror-vm and shadow-vcpu on one trace, side by side."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import ExitCode
from ..paths import check_output, check_replaceable_dir
from ..records import atomic_dir
from ..scenario import STRATEGIES, load_scenario
from ..units import format_bytes, format_ns
from .run import add_common, check_invariants, execute, scenario_inputs

# (label, path into metrics, formatter)
ROWS = [
    ("status", ("status",), str),
    ("total time", ("metrics", "total_ns"), format_ns),
    ("setup time", ("metrics", "setup_ns"), format_ns),
    ("downtime", ("metrics", "downtime_ns"), format_ns),
    ("expected downtime", ("metrics", "expected_downtime_ns"), format_ns),
    ("downtime limit exceeded", ("metrics", "downtime_limit_exceeded"), str),
    ("switchover reason", ("metrics", "switchover_reason"), str),
    ("pre-copy rounds", ("metrics", "rounds"), str),
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
    ("guest slowdown", ("metrics", "guest_slowdown_ppm"), lambda v: f"{v / 10_000:.2f} %"),
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


def _get(summary: dict, path: tuple[str, ...]):
    for key in path:
        summary = summary[key]
    return summary


def _invariants(s: dict) -> str:
    """A failed migration has no end of trace to check: say so rather than "NO"."""
    if s["status"] == "failed":
        return "n/a (failed)"
    return "yes" if all(s["invariants"].values()) else "NO"


def table(summaries: list[dict]) -> str:
    rows = ROWS + (POSTCOPY_ROWS if summaries[0]["mode"] != "precopy" else [])
    head = ["metric"] + [s["strategy"] for s in summaries]
    body = [[label] + [fmt(_get(s, path)) for s in summaries] for label, path, fmt in rows]
    faults = [sum(s["metrics"]["faults"].values()) for s in summaries]
    body.append(["RMP faults"] + [str(f) for f in faults])
    body.append(["invariants hold"] + [_invariants(s) for s in summaries])
    ends = {s["digests"]["end_of_trace"] for s in summaries}
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "" in ends:
        lines.append("end of trace not reached by every run (a failed migration stops the guest)")
    else:
        lines.append(f"end-of-trace digests {'equal' if len(ends) == 1 else 'DIFFER'} across strategies"
                     f" ({sorted(ends)[0][:16]}...)")
    return "\n".join(lines)


def configure(p) -> None:
    add_common(p)


def run(args) -> int:
    from ..report import write_report
    from ..runrecord import load_run

    scenario = load_scenario(args.scenario, args.overrides)
    out = Path(args.out)
    check_output(out, scenario_inputs(scenario, args))
    check_replaceable_dir(out, (*STRATEGIES, "report.html"), "compare directory")
    results = []
    # Both runs and the report are built in a temporary directory that replaces ``out`` only when all
    # three are complete: a failure of the second strategy (or Ctrl-C, or a full disk) leaves nothing.
    with atomic_dir(out) as tmp:
        for strategy in STRATEGIES:
            known = results[0].summary["digests"]["no_migration"] if results else None  # same trace, same guest
            results.append(execute(scenario, tmp / strategy, strategy=strategy, engine=args.engine, trace=args.trace,
                                   show_progress=not args.no_progress, no_migration_digest=known,
                                   allow_memory=args.allow_memory, out_check=out))
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
    return ExitCode.OK
