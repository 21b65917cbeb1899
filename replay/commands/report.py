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
    from ..paths import check_output
    from ..report import write_report
    from ..runrecord import load_run
    from ..sweepreport import is_sweep_dir, write_sweep_report

    check_output(args.out, args.runs)
    if len(args.runs) == 1 and is_sweep_dir(args.runs[0]):
        print(f"wrote {write_sweep_report(args.runs[0], args.out)}", file=sys.stderr)
        return 0
    runs = [load_run(p) for p in args.runs]  # all validated before anything is drawn
    out = write_report(runs, args.out, all_metrics=args.all_metrics)
    print(f"wrote {out}", file=sys.stderr)
    return 0
