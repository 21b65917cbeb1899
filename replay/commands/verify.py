"""``replay verify PATH...``: check traces and run directories completely, without running anything.

A trace (a file) is read in full: Arrow structure, schema, metadata (types, ranges), every row (time
order, vCPU and address ranges, ops) and the content digest against the metadata's. A run directory is
checked as every reader checks it (each table's content hash against ``summary.json``, the summary's
record digest, shape and types, each table's Arrow structure and schema) and also the rows' numbering
and order. One line per path on stdout; the first failure is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_RUNDIR", help="trace files and/or run directories")


def run(args: argparse.Namespace) -> int:
    from ..api import verify

    for path in args.paths:
        print(verify(path), flush=True)
    return 0
