"""`replay run SCENARIO --out DIR`: replay a scenario under one strategy and write its run directory
(``replay.api.run``)."""

from __future__ import annotations

from ..engines.common import ENGINE_KINDS
from ..core.errors import ExitCode
from ..scenario.spec import STRATEGIES


def add_common(p) -> None:
    p.add_argument("scenario", help="scenario TOML file")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write (replaced atomically)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a scenario key (TOML value syntax; repeatable)")
    p.add_argument("--engine", choices=ENGINE_KINDS, default="cython",
                   help="page engine (the reference engine is slow; for cross-checking)")
    p.add_argument("--trace", metavar="FILE", help="replay this trace instead of the scenario's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.add_argument("--data", action="store_true",
                   help="data mode: real page contents, encrypted per host, through the attested sealed channel "
                        "(same as --set migration.data=true)")
    p.add_argument("--allow-memory", action="store_true",
                   help="run even if the estimated memory exceeds what the machine has available")


def configure(p) -> None:
    add_common(p)
    p.add_argument("--strategy", choices=STRATEGIES, help="override migration.strategy")
    p.add_argument("--adversary", action="append", default=[], metavar="KIND@WHEN",
                   help="one adversary action (turns data mode on): KIND, KIND@30ms or KIND@stream:sequence, then "
                        "optional ,key=value of [[adversary]] other than kind and the time, each once "
                        "(flip@30ms,where=header); repeatable")


def run(args) -> int:
    from ..api import check_invariants, run as run_scenario

    result = run_scenario(args.scenario, args.out, strategy=args.strategy, overrides=args.overrides, data=args.data,
                          adversary=args.adversary, engine=args.engine, trace=args.trace,
                          allow_memory=args.allow_memory, progress=not args.no_progress, check=False)
    m = result.metrics
    print(f"{result.strategy} {result.mode}: {result.status.value}"
          f"{' (' + result.status_reason + ')' if result.status_reason else ''}; "
          f"total {m['total_ns']} ns, downtime {m['downtime_ns']} ns, {m['rounds']} rounds, "
          f"{m['bytes_sent']} bytes -> {args.out}")
    check_invariants(result, args.out)  # after the line above: the run record is kept and described
    return ExitCode.OK if result.completed else ExitCode.DIFFERS
