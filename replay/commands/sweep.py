"""`replay sweep SWEEP.toml --out DIR`: run a sweep of scenarios on Dask (``replay.api.execute_sweep``;
see replay.sweeps.sweep)."""

from __future__ import annotations

import sys

from ..engines.common import ENGINE_KINDS
from ..core.errors import ExitCode


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
    from ..api import execute_sweep
    from ..sweeps.sweep import TABLE

    def started(name: str, n: int) -> None:
        print(f"{name}: {n} points", flush=True)  # stdout: stderr holds errors only, one line each

    res = execute_sweep(args.sweep, args.out, scheduler=args.scheduler, workers=args.workers, engine=args.engine,
                        progress=not args.no_progress, on_start=started)
    counts = ", ".join(f"{res.count(s)} {s}" for s in ("completed", "aborted", "cancelled", "failed", "error") if res.count(s))
    print(f"{res.name}: {res.points} points ({res.ran} run now, {res.skipped} already done): {counts or 'none'}; "
          f"table {res.path / TABLE}")
    if res.count("error"):
        print(f"replay: {res.count('error')} point(s) errored (see the 'error' column); "
              f"rerun the same command to retry only those", file=sys.stderr)
        return ExitCode.DIFFERS
    return ExitCode.OK
