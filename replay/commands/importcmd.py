"""`replay import FORMAT IN --out FILE`: convert CSV/Parquet accesses or a dirty-page log into a trace.

See replay.importers for the column conventions and how a dirty log is expanded into writes.
"""

from __future__ import annotations

import sys

from ..units import parse_duration_ns, parse_size


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
    from ..errors import TraceError
    from ..importers import ImportOptions, import_trace, parse_columns
    from ..paths import check_output, require_regular

    require_regular(args.input, TraceError)
    if args.columns is not None and not args.columns.strip():
        from ..errors import UsageError

        raise UsageError("--columns: empty (omit it to use the trace's column names)")
    check_output(args.out, [args.input])
    opts = ImportOptions(
        fmt=args.format,
        columns=parse_columns(args.columns),
        # An empty value is a mistake, not an absent option: it goes to the parser, which refuses it.
        guest_bytes=parse_size(args.guest_size, "--guest-size") if args.guest_size is not None else None,
        vcpus=args.vcpus,
        sort=args.sort,
        interval_ns=parse_duration_ns(args.interval_ns, "--interval-ns") if args.interval_ns is not None else None,
    )
    meta = import_trace(args.input, args.out, opts)
    print(f"imported {meta.path}: {meta.events} events, {meta.vcpus} vcpu(s), guest {meta.guest_bytes} bytes, "
          f"digest {meta.digest}", file=sys.stderr)
    return 0
