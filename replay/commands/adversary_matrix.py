"""`replay adversary-matrix SCENARIO --out DIR`: every adversary kind x strategy x mode, one Arrow table
and an HTML page (replay.sweeps.adversary_matrix)."""

from __future__ import annotations

from ..engines.common import ENGINE_KINDS
from ..core.errors import ExitCode
from ..core.paths import check_replaceable_dir
from ..scenario.spec import ADVERSARY_KINDS, MODES, load_scenario


def configure(p) -> None:
    p.add_argument("scenario", help="scenario TOML file (its own [[adversary]] entries are replaced)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write matrix.arrow, matrix.md and report.html")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a scenario key (TOML value syntax; repeatable)")
    p.add_argument("--kinds", default=",".join(ADVERSARY_KINDS), help="comma-separated kinds (default: all)")
    p.add_argument("--modes", default="precopy,postcopy", help="comma-separated modes (default: precopy,postcopy)")
    p.add_argument("--engine", choices=ENGINE_KINDS, default="cython", help="page engine")


def run(args) -> int:
    from ..sweeps.adversary_matrix import run_matrix, write_matrix

    from ..scenario.adversary import parse_kinds
    from ..core.paths import check_output

    kinds = parse_kinds(args.kinds, ADVERSARY_KINDS, "kinds")
    modes = parse_kinds(args.modes, MODES, "modes")
    scenario = load_scenario(args.scenario, args.overrides)
    check_output(args.out, [args.scenario])
    check_replaceable_dir(args.out, {"matrix.arrow", "matrix.md", "report.html"}, "adversary matrix directory")
    table = run_matrix(scenario, kinds=kinds, modes=modes, engine=args.engine)
    write_matrix(table, args.out, scenario.name)
    bad = sum(table.column("corrupted").to_pylist())
    detected = table.column("outcome").to_pylist().count("detected")
    print(f"{table.num_rows} runs: {detected} detected, {bad} completed with a corrupted plaintext -> {args.out}")
    return ExitCode.OK if bad == 0 else ExitCode.DIFFERS
