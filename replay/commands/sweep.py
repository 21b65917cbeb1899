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
                   help="use this Dask scheduler, SCHEME://HOST:PORT (tcp, tls, ws, wss; e.g. tcp://host:8786), reached within "
                        "5 s; DIR must be on a filesystem its workers share")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes of the local cluster (default: one per core; at most 4 per core)")
    p.add_argument("--engine", choices=ENGINE_KINDS, default="cython", help="page engine")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")


def run(args) -> int:
    from ..paths import check_output
    from ..sweep import (
        TABLE,
        check_grid_size,
        check_scheduler,
        check_sweep_dir,
        check_sweep_disk,
        check_trace_files,
        check_workers,
        connect,
        load_sweep,
        points,
        run_sweep,
        sweep_inputs,
    )

    # Refused before the sweep file is read: arguments that are wrong whatever it holds.
    if args.workers is not None and args.scheduler is not None:
        raise UsageError("--workers sizes the local cluster; it cannot be used with --scheduler")
    check_workers(args.workers)
    if args.scheduler is not None:
        check_scheduler(args.scheduler)  # '' included: an empty address is a mistake, not "run locally"
    sweep = load_sweep(args.sweep)
    check_grid_size(sweep)  # from the axes' lengths, before a point is made
    pts = points(sweep)  # validates every point before a cluster is started
    n = len(pts)
    check_output(args.out, sweep_inputs(sweep, pts))  # the sweep directory never is, holds or lies inside an input
    check_sweep_dir(args.out)  # and is new, empty or a previous sweep's: never merged into another directory
    check_trace_files(pts)
    check_sweep_disk(pts, args.out)  # the traces it generates must fit where it writes them
    client = connect(args.scheduler, args.workers)  # one line if unreachable, before anything is written
    print(f"{sweep.name}: {n} points", flush=True)  # stdout: stderr holds errors only, one line each
    res = run_sweep(sweep, args.out, client=client, engine=args.engine, show_progress=not args.no_progress,
                    pts=pts, own_client=True)
    counts = ", ".join(f"{res.count(s)} {s}" for s in ("completed", "aborted", "cancelled", "failed", "error") if res.count(s))
    print(f"{sweep.name}: {n} points ({res.ran} run now, {res.skipped} already done): {counts or 'none'}; "
          f"table {res.out / TABLE}")
    if res.count("error"):
        print(f"replay: {res.count('error')} point(s) errored (see the 'error' column); "
              f"rerun the same command to retry only those", file=sys.stderr)
        return ExitCode.DIFFERS
    return ExitCode.OK
