"""`replay compare SCENARIO --out DIR`: run mirror-vm and shadow-vcpu on one trace, side by side
(``replay.api.compare``; the table is ``replay.analysis.comparetext``)."""

from __future__ import annotations

from ..core.errors import ExitCode
from ..core.units import format_bytes
from .run import add_common


def configure(p) -> None:
    add_common(p)
    p.add_argument("--all-metrics", action="store_true",
                   help="show the metrics that are zero or absent in both runs (folded by default)")


def run(args) -> int:
    from ..api import check_invariants, compare

    c = compare(args.scenario, args.out, overrides=args.overrides, data=args.data, engine=args.engine,
                trace=args.trace, allow_memory=args.allow_memory, progress=not args.no_progress, check=False)
    s0 = c.runs[0].summary
    print(f"{c.name}: {s0['mode']}, trace {s0['trace']['digest'][:16]}... "
          f"({s0['trace']['events']} events, {format_bytes(s0['trace']['guest_bytes'])}, {s0['trace']['vcpus']} vCPUs)")
    print(c.text(args.all_metrics))
    print(f"runs: {', '.join(str(r.path) for r in c.runs)}; report: {c.report}")
    for r in c.runs:
        check_invariants(r)
    return ExitCode.OK if c.completed else ExitCode.DIFFERS
