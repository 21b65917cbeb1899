"""`replay run SCENARIO --out DIR`: replay a scenario under one strategy and write its run directory."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from ..engine import ENGINE_KINDS
from ..errors import ExitCode, InvariantError
from ..paths import RUN_DIR_ENTRIES, check_output, check_replaceable_dir
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
    p.add_argument("--allow-memory", action="store_true",
                   help="run even if the estimated memory exceeds what the machine has available")


def scenario_of(args):
    """The scenario of a run/compare command line, with its overrides (``--data`` is one) and one-off
    adversary actions (``--adversary``)."""
    from ..advspec import parse_adversary
    from ..scenario import with_adversary

    s = load_scenario(args.scenario, [*args.overrides, *(["migration.data=true"] if args.data else [])])
    return with_adversary(s, [parse_adversary(a) for a in getattr(args, "adversary", None) or []])


def scenario_inputs(scenario, args) -> list:
    """The files a run reads: the scenario, and its trace (``--trace`` or ``trace.file``)."""
    from pathlib import Path

    inputs = [args.scenario]
    if args.trace is not None:
        inputs.append(args.trace)
    elif scenario.trace.file:
        inputs.append(Path(scenario.base_dir) / scenario.trace.file)
    return inputs


def configure(p) -> None:
    add_common(p)
    p.add_argument("--strategy", choices=STRATEGIES, help="override migration.strategy")
    p.add_argument("--adversary", action="append", default=[], metavar="KIND@WHEN",
                   help="one adversary action (turns data mode on): KIND, KIND@30ms or KIND@stream:sequence, then "
                        "optional ,key=value of [[adversary]] other than kind and the time, each once "
                        "(flip@30ms,where=header); repeatable")


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over trace events, on a terminal only (records never depend on it)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="ev", unit_scale=True, leave=False, file=sys.stderr) as bar:
        yield bar.update


def prepare(scenario, *, trace, allow_memory=False, out_check=None, processes=1):
    """Everything refused before a run replays anything: memory and disk for the guest and its generated
    trace, the trace itself, the round budget. Returns (trace path, its metadata).
    ``out_check``: the output the user named, checked again against the trace once it is known.
    ``processes``: runs at the same time (compare's workers), each needing a run's memory."""
    from ..errors import TraceError
    from ..migrate import cache_dir, trace_for
    from ..trace import last_t_ns, open_trace, read_meta
    from ..validate import (
        MAX_GUEST_BYTES,
        RUN_TRACE_END_MAX,
        TRACE_ROW_BYTES,
        check_disk,
        check_memory,
        check_round_budget,
        run_memory_bytes,
    )

    t, g = scenario.trace, scenario.guest
    if trace is None and t.generator:
        # Refuse before generating: a generated trace costs time and disk in proportion to its size.
        check_memory(run_memory_bytes(g.guest_bytes, g.vcpus),
                     f"a run of a {g.guest_bytes}-byte guest with {g.vcpus} vCPUs", allow_memory, processes)
        total = t.events + (g.guest_bytes // 4096 if t.fill else 0)
        check_disk(total * TRACE_ROW_BYTES, cache_dir(), f"generating the scenario's trace ({total} events)")
    path = trace if trace is not None else trace_for(scenario)  # --trace '' is an error, not "absent"
    if out_check is not None:
        check_output(out_check, [path])
    meta = read_meta(path)
    with open_trace(path, verify_digest=False) as reader:  # the last batch only; the run's read verifies all
        last = last_t_ns(reader)
    if last is not None and last > RUN_TRACE_END_MAX:
        # The run's clock goes on past the trace (the migration finishes, the records hold its times in
        # 64 bits): a trace ending in the last half of the clock's range leaves it no room.
        raise TraceError(f"{meta.path}: the trace ends at t_ns {last}: a run replays traces ending by 2^63-1 ns "
                         f"(292 years), so that the migration after it still fits the run's 64-bit clock")
    if meta.guest_bytes > MAX_GUEST_BYTES:
        raise TraceError(f"{meta.path}: guest of {meta.guest_bytes} bytes is beyond what the page engines hold "
                         f"({MAX_GUEST_BYTES} bytes, 2^32 - 1 pages)")
    check_round_budget(scenario.migration, meta.npages)
    check_memory(run_memory_bytes(meta.guest_bytes, meta.vcpus),
                 f"a run of {meta.path} ({meta.guest_bytes} bytes of guest, {meta.vcpus} vCPUs)", allow_memory,
                 processes)
    return path, meta


def execute(scenario, out, *, strategy, engine, trace, show_progress, no_migration_digest=None,
            allow_memory=False, out_check=None):
    """Run one strategy and write the run directory; returns the RunResult. ``no_migration_digest`` (from
    another strategy's run of the same scenario) spares the reference replay of the whole trace."""
    from ..migrate import Migration
    from ..refdigest import lookup

    if strategy is not None:
        scenario = scenario.with_strategy(strategy)
    path, meta = prepare(scenario, trace=trace, allow_memory=allow_memory, out_check=out_check)
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
    explained = result.summary.get("adversary_effects", {}).get("explains", [])  # reported, not a bug
    bad = [k for k, ok in result.summary["invariants"].items() if not ok and k not in explained]
    if bad and result.status == "completed":
        raise InvariantError(f"{out}: invariant(s) violated: {', '.join(bad)} (a bug in snp-replay; the run record is kept)")


def run(args) -> int:
    scenario = scenario_of(args)
    check_output(args.out, scenario_inputs(scenario, args))
    check_replaceable_dir(args.out, RUN_DIR_ENTRIES, "run directory")
    result = execute(scenario, args.out, strategy=args.strategy, engine=args.engine, trace=args.trace,
                     show_progress=not args.no_progress, allow_memory=args.allow_memory, out_check=args.out)
    m = result.summary["metrics"]
    print(f"{result.summary['strategy']} {result.summary['mode']}: {result.status}"
          f"{' (' + result.summary['status_reason'] + ')' if result.summary['status_reason'] else ''}; "
          f"total {m['total_ns']} ns, downtime {m['downtime_ns']} ns, {m['rounds']} rounds, "
          f"{m['bytes_sent']} bytes -> {args.out}")
    check_invariants(result, args.out)
    return ExitCode.OK if result.status == "completed" else ExitCode.DIFFERS
