"""`replay import FORMAT IN --out FILE`: convert CSV/Parquet accesses or a dirty-page log into a trace.

See replay.traces.importers for the column conventions and how a dirty log is expanded into writes.
"""

from __future__ import annotations

import sys



def configure(p) -> None:
    p.add_argument("format", choices=("csv", "parquet", "dirtylog"),
                   help="csv/parquet: one row per access; dirtylog: one row per (interval, dirty page), CSV or Parquet")
    p.add_argument("input", metavar="IN", help="input file")
    p.add_argument("--out", required=True, metavar="FILE", help="trace file to write (appears atomically)")
    p.add_argument("--columns", metavar="COL=NAME,...",
                   help="map trace columns to input columns, e.g. t_ns=ts,gpa=addr (default: same names). "
                        "csv/parquet: t_ns, gpa required; vcpu (default 0), len (8), op (WRITE), value (row index). "
                        "dirtylog: t_ns or interval, gfn or gpa, optional vcpu")
    p.add_argument("--guest-size", metavar="SIZE", help="guest memory size (default: max gpa+len rounded up to 2 MiB)")
    p.add_argument("--vcpus", type=int, metavar="N", help="number of vCPUs (default: max vcpu + 1)")
    p.add_argument("--sort", action="store_true",
                   help="sort the input by time (stable) instead of requiring it sorted; loads the whole input into memory")
    p.add_argument("--interval-ns", metavar="DURATION",
                   help="dirtylog: length of one interval (e.g. 100ms); required with an interval column, and with "
                        "t_ns spreads each interval's pages evenly over it")


def run(args) -> int:
    from ..api import import_trace

    meta = import_trace(args.format, args.input, args.out, columns=args.columns, guest_size=args.guest_size,
                        vcpus=args.vcpus, sort=args.sort, interval=args.interval_ns)
    print(f"imported {meta.path}: {meta.events} events, {meta.vcpus} vcpu(s), guest {meta.guest_bytes} bytes, "
          f"digest {meta.digest}", file=sys.stderr)
    return 0
