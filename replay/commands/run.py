"""`replay run SCENARIO --out DIR`: replay a scenario under one strategy and write its run directory."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from ..engine import ENGINE_KINDS
from ..errors import ExitCode, InvariantError
from ..scenario import STRATEGIES, load_scenario


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


def scenario_of(args):
    """The scenario of a run/compare command line, with its overrides (``--data`` is one)."""
    return load_scenario(args.scenario, [*args.overrides, *(["migration.data=true"] if args.data else [])])


def configure(p) -> None:
    add_common(p)
    p.add_argument("--strategy", choices=STRATEGIES, help="override migration.strategy")


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over trace events, on a terminal only (records never depend on it)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="ev", unit_scale=True, leave=False, file=sys.stderr) as bar:
        yield bar.update


def execute(scenario, out, *, strategy, engine, trace, show_progress, no_migration_digest=None):
    """Run one strategy and write the run directory; returns the RunResult. ``no_migration_digest`` (from
    another strategy's run of the same scenario) spares the reference replay of the whole trace."""
    from ..migrate import Migration, trace_for
    from ..refdigest import lookup
    from ..trace import read_meta

    if strategy is not None:
        scenario = scenario.with_strategy(strategy)
    path = trace or trace_for(scenario)
    meta = read_meta(path)
    # Two passes over the trace unless the no-migration reference is known (given, or cached by an
    # earlier run of this trace and guest): it, then the migrated run.
    g = scenario.guest
    no_migration_digest = no_migration_digest or lookup(meta, g.asid, g.os_vmpl, engine)
    passes = 1 if no_migration_digest else 2
    with progress_bar(passes * meta.events, scenario.migration.strategy, show_progress) as update:
        result = Migration(scenario, path, engine=engine, progress=update,
                           no_migration_digest=no_migration_digest).run()
    result.write(out)
    return result


def check_invariants(result, out) -> None:
    bad = [k for k, ok in result.summary["invariants"].items() if not ok]
    if bad and result.status == "completed":
        raise InvariantError(f"{out}: invariant(s) violated: {', '.join(bad)} (a bug in snp-replay; the run record is kept)")


def run(args) -> int:
    scenario = scenario_of(args)
    result = execute(scenario, args.out, strategy=args.strategy, engine=args.engine, trace=args.trace,
                     show_progress=not args.no_progress)
    m = result.summary["metrics"]
    print(f"{result.summary['strategy']} {result.summary['mode']}: {result.status}"
          f"{' (' + result.summary['status_reason'] + ')' if result.summary['status_reason'] else ''}; "
          f"total {m['total_ns']} ns, downtime {m['downtime_ns']} ns, {m['rounds']} rounds, "
          f"{m['bytes_sent']} bytes -> {args.out}")
    check_invariants(result, args.out)
    return ExitCode.OK if result.status == "completed" else ExitCode.DIFFERS
