"""`replay adversary-matrix SCENARIO --out DIR`: every adversary kind x strategy x mode, one Arrow table
and an HTML page (replay.sweeps.adversary_matrix)."""

from __future__ import annotations

from ..engines.common import ENGINE_KINDS
from ..core.errors import ExitCode
from ..scenario.spec import ADVERSARY_KINDS


def configure(p) -> None:
    p.add_argument("scenario", help="scenario TOML file (its own [[adversary]] entries are replaced)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write matrix.arrow, matrix.md and report.html")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a scenario key (TOML value syntax; repeatable)")
    p.add_argument("--kinds", default=",".join(ADVERSARY_KINDS), help="comma-separated kinds (default: all)")
    p.add_argument("--modes", default="precopy,postcopy", help="comma-separated modes (default: precopy,postcopy)")
    p.add_argument("--engine", choices=ENGINE_KINDS, default="cython", help="page engine")


def run(args) -> int:
    from ..api import adversary_matrix

    df = adversary_matrix(args.scenario, args.out, overrides=args.overrides, kinds=args.kinds, modes=args.modes,
                          engine=args.engine)
    bad = int(df["corrupted"].sum())
    detected = int((df["outcome"] == "detected").sum())
    print(f"{df.height} runs: {detected} detected, {bad} completed with a corrupted plaintext -> {args.out}")
    return ExitCode.OK if bad == 0 else ExitCode.DIFFERS
