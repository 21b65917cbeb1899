"""``replay verify PATH...``: check traces and run directories completely, without running anything.

A trace (a file) is read in full: Arrow structure, schema, metadata (types, ranges), every row (time
order, vCPU and address ranges, ops) and the content digest against the metadata's. A run directory is
checked as every reader checks it (each table's content hash against ``summary.json``, the summary's
record digest, shape and types, each table's Arrow structure and schema) and also the rows' numbering
and order. One line per path on stdout; the first failure is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import os


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_RUNDIR", help="trace files and/or run directories")


def verify_path(path: str) -> str:
    """Check one trace or run directory; a one-line description of what was verified."""
    from ..core.paths import show

    if os.path.isdir(path):
        from ..runs.record import check_run_dir

        summary, tables = check_run_dir(path, complete=True)
        rows = ", ".join(f"{name} {t.num_rows}" for name, t in tables.items())
        return (f"{show(path)}: ok: run directory ({summary['strategy']} {summary['mode']}, {summary['status']}; "
                f"{rows} rows; hashes match)")
    from ..traces.format import open_trace

    with open_trace(path) as r:
        for _ in r:
            pass
        return f"{show(path)}: ok: trace ({r.meta.events} events, {r.num_batches} batches, digest {r.meta.digest} matches)"


def run(args: argparse.Namespace) -> int:
    for path in args.paths:
        print(verify_path(path), flush=True)
    return 0
