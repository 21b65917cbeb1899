"""``replay diff RUN_A RUN_B`` (also ``tools/diff``): compare two run directories.

Exit status: 0 same end state (identical, or only metrics differ), 1 different, 2 bad input; a one-line verdict always goes to stderr, the
comparison (text, or canonical JSON with ``--json``) to stdout. A is "before", B is "after":
``--max-regress downtime_ns=10`` fails when B's downtime exceeds A's by more than 10 % (one-directional;
an improvement never fails).
"""

from __future__ import annotations

import argparse
import re
import sys

from ..core.errors import UsageError

_BOUND = re.compile(r"^([A-Za-z0-9_.\[\]]+)=(\d+(?:\.\d+)?)%?$")


def parse_bounds(specs: list[str]) -> dict[str, int | float]:
    """``["downtime_ns=10", "cpu_ns.host=2.5%"]`` -> ``{"downtime_ns": 10, "cpu_ns.host": 2.5}``."""
    bounds: dict[str, int | float] = {}
    for spec in specs:
        m = _BOUND.match(spec.strip())
        if not m:
            raise UsageError(f"--max-regress {spec!r}: expected METRIC=PCT, e.g. downtime_ns=10")
        text = m.group(2)
        bounds[m.group(1)] = float(text) if "." in text else int(text)
    return bounds


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A", help='run directory A ("before")')
    parser.add_argument("run_b", metavar="RUN_B", help='run directory B ("after")')
    parser.add_argument("--strict", action="store_true",
                        help="also require identical records: summary (except the tool block) and every table")
    parser.add_argument("--json", action="store_true", help="print the comparison as canonical JSON")
    parser.add_argument("--only-diff", action="store_true", help="hide metrics, rounds and buckets that are equal")
    parser.add_argument("--all-metrics", action="store_true",
                        help="show the metrics that are zero or absent in both runs (folded by default)")
    parser.add_argument("--max-regress", action="append", default=[], metavar="METRIC=PCT",
                        help="fail if B's METRIC exceeds A's by more than PCT percent (repeatable)")


def run(args: argparse.Namespace) -> int:
    from ..api import diff
    from ..analysis.diff import render_text, to_json
    from ..core.records import canonical_json

    bounds = parse_bounds(args.max_regress)  # syntax first: cheap, and no point loading runs otherwise
    result = diff(args.run_a, args.run_b, strict=args.strict, max_regress=bounds)
    if args.json:
        sys.stdout.buffer.write(canonical_json(to_json(result)))
        sys.stdout.flush()
    else:
        sys.stdout.write(render_text(result, only_diff=args.only_diff, all_metrics=args.all_metrics))
    print(result.verdict(), file=sys.stderr)
    return result.exit_code
