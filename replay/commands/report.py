"""``replay report RUN... --out FILE.html``: one self-contained HTML report of one or more runs, or of a
sweep directory (``replay sweep --out DIR``) given alone."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directories (the first is A in a comparison), or one sweep directory")
    parser.add_argument("--out", "-o", required=True, metavar="FILE.html", help="where to write the report")
    parser.add_argument("--all-metrics", action="store_true",
                        help="show the metrics that are zero or absent in every run (folded by default)")


def run(args: argparse.Namespace) -> int:
    from ..api import report

    out = report(args.runs, args.out, all_metrics=args.all_metrics)
    print(f"wrote {out}", file=sys.stderr)
    return 0
