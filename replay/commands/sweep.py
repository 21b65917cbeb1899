"""`replay sweep SWEEP.toml --out DIR`: run a sweep of scenarios on Dask (see replay.sweep)."""

from __future__ import annotations

import sys

from ..engine import ENGINE_KINDS
from ..errors import ExitCode, UsageError


def configure(p) -> None:
    p.add_argument("sweep", help="sweep TOML file (a base scenario and axes)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="sweep directory: results.parquet, runs/, errors/, traces/ (resumed if it exists)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="use this Dask scheduler (e.g. tcp://host:8786); DIR must be on a filesystem its workers share")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes of the local cluster (default: one per core)")
    p.add_argument("--engine", choices=ENGINE_KINDS, default="cython", help="page engine")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")


def run(args) -> int:
    from ..sweep import TABLE, load_sweep, points, run_sweep

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be >= 1")
    if args.workers is not None and args.scheduler:
        raise UsageError("--workers sizes the local cluster; it cannot be used with --scheduler")
    from ..paths import check_output

    sweep = load_sweep(args.sweep)
    pts = points(sweep)  # validates every point before a cluster is started
    n = len(pts)
    check_output(args.out, [args.sweep])  # the sweep directory never is, holds or lies inside its input
    print(f"{sweep.name}: {n} points", file=sys.stderr)
    res = run_sweep(sweep, args.out, scheduler=args.scheduler, workers=args.workers, engine=args.engine,
                    show_progress=not args.no_progress, pts=pts)
    counts = ", ".join(f"{res.count(s)} {s}" for s in ("completed", "aborted", "cancelled", "failed", "error") if res.count(s))
    print(f"{sweep.name}: {n} points ({res.ran} run now, {res.skipped} already done): {counts or 'none'}; "
          f"table {res.out / TABLE}")
    if res.count("error"):
        print(f"replay: {res.count('error')} point(s) errored (see the 'error' column); "
              f"rerun the same command to retry only those", file=sys.stderr)
        return ExitCode.DIFFERS
    return ExitCode.OK
