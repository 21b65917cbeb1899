"""``replay report RUN... --out FILE.html``: one self-contained HTML report of one or more runs."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (the first is A in a comparison)")
    parser.add_argument("--out", "-o", required=True, metavar="FILE.html", help="where to write the report")


def run(args: argparse.Namespace) -> int:
    from ..paths import check_output
    from ..report import write_report
    from ..runrecord import load_run

    check_output(args.out, args.runs)
    runs = [load_run(p) for p in args.runs]  # all validated before anything is drawn
    out = write_report(runs, args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0
