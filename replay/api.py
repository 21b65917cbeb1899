"""The Python API: what the ``replay`` command line does, as functions that return objects.

For notebooks and scripts (``docs/api.md`` has runnable examples)::

    import replay

    s = replay.load_scenario("scenarios/quickstart.toml", ["migration.bandwidth=2.5GB"])
    c = replay.compare(s, "runs/qs")
    c.headline                  # ["shadow-vcpu wins on downtime (... vs ...: ...)", ...]
    c["shadow-vcpu"].rounds     # a polars DataFrame, read back from the run record

Every command is a thin layer over these functions (``replay.commands``): the same checks run in the same
order and raise the same exceptions with the same one-line messages (``replay.core.errors``: a ``ScenarioError``
for a bad ``--set``, a ``TraceError`` for a bad trace...). Where the command line exits with status 1 (a
migration that did not complete, a diff that differs), the API returns a result that says so
(``RunResult.status``, ``DiffResult.outcome``) instead of raising.

Scenarios are ``replay.scenario.spec.Scenario`` (frozen dataclasses); overrides are ``--set`` strings
(``"section.key=value"``, the value in TOML syntax, bare words as strings), checked by the same rules.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .scenario.spec import STRATEGIES, Scenario

if TYPE_CHECKING:
    import polars as pl

    from .analysis.diff import DiffResult
    from .traces.lackey import RecordResult
    from .traces.vm import VmResult
    from .runs.record import Run
    from .sweeps.sweep import SweepResult
    from .traces.format import TraceMeta

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "CompareResult", "RunResult", "Status", "SweepOutcome",
    "adversary_matrix", "check_invariants", "compare", "diff", "execute_sweep", "generate", "import_trace",
    "inspect", "load_run", "load_scenario", "make_scenario", "override", "record", "record_vm", "report", "run",
    "scenario_inputs", "sweep", "verify",
]


class Status(str, enum.Enum):
    """How a run ended (``summary.json``'s ``status``). A ``str``: ``status == "completed"`` also holds."""

    COMPLETED = "completed"
    ABORTED = "aborted"
    CANCELLED = "cancelled"
    FAILED = "failed"


# ------------------------------------------------------------------------------------------- scenarios


def load_scenario(path: PathLike, overrides: Sequence[str] = (), *, data: bool = False,
                  adversary: Sequence[str] = ()) -> Scenario:
    """A scenario file with ``--set`` overrides; ``data``: data mode (``--data``); ``adversary``: one-off
    actions as ``--adversary`` takes them (``"flip@30ms,where=header"``; they turn data mode on)."""
    from .scenario.spec import load_scenario as load

    s = load(path, [*overrides, *(["migration.data=true"] if data else [])])
    return _with_adversary(s, adversary)


def make_scenario(doc: Mapping[str, Any] | None = None, overrides: Sequence[str] = (), *,
                  base_dir: PathLike = ".", **sections: Mapping[str, Any]) -> Scenario:
    """A scenario from a dict shaped like the TOML file (``doc``) or from its sections as keywords
    (``make_scenario(guest={"size": "64MiB", "vcpus": 2}, migration={"mode": "postcopy"})``), checked as a
    file is; ``base_dir``: where a ``trace.file`` is looked up."""
    from .scenario.spec import scenario_from_doc

    if doc is not None and sections:
        raise TypeError("make_scenario: give either doc or sections as keywords, not both")
    return scenario_from_doc(dict(doc if doc is not None else sections), "<scenario>", os.fspath(base_dir), overrides)


def override(scenario: Scenario, *overrides: str) -> Scenario:
    """``scenario`` with ``--set``-style overrides applied (``override(s, "migration.mode=postcopy")``)."""
    from .scenario.spec import scenario_from_doc, scenario_to_doc

    return scenario_from_doc(scenario_to_doc(scenario), "<scenario>", scenario.base_dir, overrides)


def _with_adversary(s: Scenario, adversary: Sequence[str]) -> Scenario:
    if not adversary:
        return s
    from .scenario.adversary import parse_adversary
    from .scenario.spec import with_adversary

    return with_adversary(s, [parse_adversary(a) for a in adversary])


def _scenario(scenario: Scenario | PathLike, overrides: Sequence[str], data: bool,
              adversary: Sequence[str]) -> tuple[Scenario, Path | None]:
    """The scenario to run and the file it came from (None: built in Python)."""
    if isinstance(scenario, Scenario):
        s = override(scenario, *overrides, *(["migration.data=true"] if data else [])) if overrides or data else scenario
        return _with_adversary(s, adversary), None
    return load_scenario(scenario, overrides, data=data, adversary=adversary), Path(scenario)


def scenario_inputs(scenario: Scenario, source: PathLike | None, trace: PathLike | None) -> list[PathLike]:
    """The files a run reads: the scenario file (if any) and its trace (``trace``, or ``trace.file``);
    outputs may never be, hold or lie inside one of them. ``trace`` is kept as given: an empty path is
    refused as empty, not taken for the current directory."""
    inputs: list[PathLike] = [source] if source is not None else []
    if trace is not None:
        inputs.append(trace)
    elif scenario.trace.file:
        inputs.append(Path(scenario.base_dir) / scenario.trace.file)
    return inputs


# ----------------------------------------------------------------------------------------------- traces


def generate(kind: str, out: PathLike, *, guest_size: int | str, vcpus: int, events: int, seed: int,
             rate: int | None = None, fill: bool = False, compression: str | None = "zstd",
             progress: Callable[[int], Any] | None = None, **options: Any) -> TraceMeta:
    """Write a synthetic workload trace (``replay gen``): ``guest_size`` in bytes or with a unit ("64MiB");
    ``options``: the workload's own (``hot_fraction_ppm``..., see ``replay gen --help``). Returns the trace's
    metadata (``.path``, ``.events``, ``.digest``...)."""
    from .traces.generators import generate as gen
    from .core.paths import check_output
    from .core.units import parse_size
    from .core.validate import TRACE_ROW_BYTES, check_disk

    check_output(out, [])
    guest_bytes = parse_size(guest_size, "--guest-size")
    total = events + (guest_bytes // 4096 if fill else 0)
    # The writer's first pass is uncompressed (31 bytes a row) beside the output.
    check_disk(total * TRACE_ROW_BYTES, Path(out).parent, f"gen {kind} ({total} events)")
    extra = {} if rate is None else {"rate": rate}
    return gen(kind, out, guest_bytes=guest_bytes, vcpus=vcpus, events=events, seed=seed, fill=fill,
               compression=compression, progress=progress, **extra, **options)


def record(out: PathLike, argv: Sequence[str], *, ns_per_instr: int = 1, reads: bool = True,
           vcpus_from: str = "threads", guest_size: int | str | None = None, region_size: int | str = "1MiB",
           valgrind: str = "valgrind", clean_env: bool = False, progress: bool = False) -> RecordResult:
    """Record a real program under valgrind's lackey into a trace (``replay record``); sizes in bytes or
    with a unit. ``.meta`` is the trace's metadata, ``.stats`` the parser's counts."""
    from .core.errors import UsageError
    from .core.paths import check_output
    from .traces.lackey import RecordOptions, record as rec
    from .core.units import parse_size

    argv = list(argv)
    # The recorded program's existing file arguments are its likely inputs: never the output.
    check_output(out, [a for a in argv if a and "\x00" not in a and os.path.isfile(a)])
    region = parse_size(region_size, "--region-size")
    if region <= 0 or region & (region - 1):
        raise UsageError(f"--region-size: {region_size!r} is not a power of two")
    opts = RecordOptions(argv=tuple(argv), ns_per_instr=ns_per_instr, reads=reads, vcpus_from=vcpus_from,
                         guest_bytes=parse_size(guest_size, "--guest-size") if guest_size is not None else None,
                         region_shift=region.bit_length() - 1, valgrind=valgrind, clean_env=clean_env,
                         progress=None if progress else False)
    return rec(out, opts)


def _shared_range(text: str) -> tuple[int, int]:
    """``FIRST-LAST`` (hex or decimal, inclusive) as the byte range [first, end)."""
    import re

    from .core.errors import UsageError

    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+)\s*-\s*(0x[0-9a-fA-F]+|\d+)\s*", text)
    if not m:
        raise UsageError(f"--shared: {text!r} is not FIRST-LAST (e.g. 0x4000000-0x7ffffff)")
    a, b = int(m.group(1), 0), int(m.group(2), 0)
    if b < a:
        raise UsageError(f"--shared: {text!r}: LAST is below FIRST")
    return a, b + 1


def record_vm(out: PathLike, argv: Sequence[str], *, memory: int | str = "256MiB", vcpus: int = 1,
              kernel: PathLike | None = None, initrd: PathLike | None = None, append: str = "",
              add: Sequence[PathLike] = (), disk: PathLike | None = None, start: str = "command",
              max_stores: int | None = None, max_time: int | str | None = None, epoch: int | str = 0,
              icount_shift: int = 0, shared: Sequence[str] = (), shared_swiotlb: bool = False,
              qemu: str = "qemu-system-x86_64", console: PathLike | None = None, timeout_s: int = 3600,
              progress: bool = False) -> VmResult:
    """Record a whole VM running ``argv`` under QEMU TCG into a trace (``replay record --vm``; QEMU, a
    static busybox and a guest kernel must be installed). Sizes and times in bytes/ns or with a unit;
    ``shared``: ``"FIRST-LAST"`` guest-physical byte ranges classed shared. ``.meta`` is the trace's
    metadata, ``.counts`` what was kept and dropped, ``.stop`` why recording stopped."""
    from .core.paths import check_output
    from .core.units import parse_duration_ns, parse_size
    from .traces.vm import VmOptions, record_vm as rec

    def ns(value: int | str, what: str) -> int:
        return value if isinstance(value, int) else parse_duration_ns(value, what)

    files = [os.fspath(f) for f in [kernel, initrd, disk, *add] if f]
    check_output(out, files)
    opts = VmOptions(
        argv=tuple(argv), memory=memory if isinstance(memory, int) else parse_size(memory, "--memory"),
        vcpus=vcpus, kernel=os.fspath(kernel) if kernel else None, initrd=os.fspath(initrd) if initrd else None,
        append=append, add=tuple(os.fspath(a) for a in add), disk=os.fspath(disk) if disk else None, start=start,
        max_stores=max_stores, max_time_ns=ns(max_time, "--max-time") if max_time is not None else None,
        epoch_ns=ns(epoch, "--epoch"), shift=icount_shift, shared=tuple(_shared_range(r) for r in shared),
        shared_swiotlb=shared_swiotlb, qemu=qemu, timeout_s=timeout_s, progress=None if progress else False,
        console=os.fspath(console) if console else None)
    return rec(out, opts)


def verify(path: PathLike) -> str:
    """Check a trace file or a run directory completely without running anything (``replay verify``): a
    trace's structure, metadata, every row and its content digest; a run directory's table hashes, record
    digest, shape and row order. Returns the one-line description ``replay verify`` prints; raises the
    one-line TraceError / RunDirError on the first failure."""
    from .core.paths import show

    if os.path.isdir(path):
        from .runs.record import check_run_dir

        summary, tables = check_run_dir(path, complete=True)
        rows = ", ".join(f"{name} {t.num_rows}" for name, t in tables.items())
        return (f"{show(path)}: ok: run directory ({summary['strategy']} {summary['mode']}, {summary['status']}; "
                f"{rows} rows; hashes match)")
    from .traces.format import open_trace

    with open_trace(path) as r:
        for _ in r:
            pass
        return f"{show(path)}: ok: trace ({r.meta.events} events, {r.num_batches} batches, digest {r.meta.digest} matches)"


def import_trace(fmt: str, src: PathLike, out: PathLike, *, columns: str | Mapping[str, str] | None = None,
                 guest_size: int | str | None = None, vcpus: int | None = None, sort: bool = False,
                 interval: int | str | None = None) -> TraceMeta:
    """Convert CSV/Parquet accesses or a dirty-page log into a trace (``replay import``). ``columns``: trace
    column -> input column, as ``"t_ns=ts,gpa=addr"`` or a dict; ``interval``: a dirty log's interval (ns,
    or "100ms")."""
    from .core.errors import TraceError, UsageError
    from .traces.importers import ImportOptions, import_trace as imp, parse_columns
    from .core.paths import check_output, require_regular
    from .core.units import parse_duration_ns, parse_size

    require_regular(src, TraceError)
    if isinstance(columns, str) and not columns.strip():
        raise UsageError("--columns: empty (omit it to use the trace's column names)")
    check_output(out, [src])
    opts = ImportOptions(
        fmt=fmt,
        columns=parse_columns(columns) if columns is None or isinstance(columns, str) else tuple(columns.items()),
        # An empty value is a mistake, not an absent option: it goes to the parser, which refuses it.
        guest_bytes=parse_size(guest_size, "--guest-size") if guest_size is not None else None,
        vcpus=vcpus,
        sort=sort,
        interval_ns=parse_duration_ns(interval, "--interval-ns") if interval is not None else None,
    )
    return imp(src, out, opts)


def inspect(trace: PathLike, interval_ns: int | None = None, allow_memory: bool = False) -> dict[str, Any]:
    """A trace's metadata, op counts, write rate and working-set curve (``replay inspect --json``)."""
    from .traces.inspect import inspect_trace

    return inspect_trace(trace, interval_ns, allow_memory)


# ------------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunResult:
    """One run directory, read back from its record. ``rounds``, ``events`` and ``faults`` are read (each
    table's hash, schema and shape checked) the first time one is used, so a caller that wants only the
    status and the metrics never loads polars."""

    path: Path
    status: Status
    status_reason: str
    strategy: str
    mode: str
    metrics: dict[str, Any]  # summary.json's metrics: ns, bytes, pages, ppm (see docs/internals.md)
    summary: dict[str, Any] = dataclasses.field(repr=False)  # the whole summary.json
    _frames: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def completed(self) -> bool:
        return self.status is Status.COMPLETED

    @property
    def name(self) -> str:
        return f"{self.strategy}/{self.mode}"

    def _table(self, name: str) -> Any:
        if not self._frames:
            from .runs.record import load_run as load

            r = load(self.path)
            self._frames.update(rounds=r.rounds, events=r.events, faults=r.faults)
        return self._frames[name]

    @property
    def rounds(self) -> pl.DataFrame:
        """One row per dirty-log sync (pre-copy round), a polars DataFrame."""
        return self._table("rounds")

    @property
    def events(self) -> pl.DataFrame:
        """The run's events in time order, a polars DataFrame."""
        return self._table("events")

    @property
    def faults(self) -> pl.DataFrame | None:
        """Post-copy and hybrid runs' faults (None in pre-copy), a polars DataFrame."""
        return self._table("faults")

    @classmethod
    def of(cls, run: Run) -> RunResult:
        return cls._from_summary(Path(run.path), run.summary,
                                 {"rounds": run.rounds, "events": run.events, "faults": run.faults})

    @classmethod
    def _from_summary(cls, path: Path, s: dict[str, Any], frames: dict[str, Any] | None = None) -> RunResult:
        return cls(path=path, status=Status(s["status"]), status_reason=s.get("status_reason", ""),
                   strategy=s["strategy"], mode=s["mode"], metrics=s["metrics"], summary=s,
                   _frames=dict(frames or {}))

    def record(self) -> Run:
        """The ``replay.runs.record.Run`` the analysis modules (diff, report) take."""
        from .runs.record import Run

        return Run(path=self.path, summary=self.summary, rounds=self.rounds, events=self.events, faults=self.faults)


def load_run(path: PathLike) -> RunResult:
    """A run directory (``replay run --out``, or one strategy of a compare directory)."""
    from .runs.record import load_run as load

    return RunResult.of(load(path))


def check_invariants(result: RunResult, out: PathLike | None = None) -> None:
    """Raise InvariantError if a completed run's invariant failed (no adversary action explaining it)."""
    from .migration.runner import check_invariants as check

    check(result, out if out is not None else result.path)


def run(scenario: Scenario | PathLike, out: PathLike, *, strategy: str | None = None,
        overrides: Sequence[str] = (), data: bool = False, adversary: Sequence[str] = (), engine: str = "cython",
        trace: PathLike | None = None, allow_memory: bool = False, progress: bool = False,
        check: bool = True) -> RunResult:
    """Replay a scenario (a ``Scenario`` or a file) under one strategy into the run directory ``out``
    (``replay run``), replaced atomically; ``trace`` replaces the scenario's trace. A run that did not
    complete is returned (``.status``); ``check``: raise InvariantError on a violated invariant (a bug)."""
    from .core.paths import RUN_DIR_ENTRIES, check_output, check_replaceable_dir
    from .migration.runner import execute

    s, source = _scenario(scenario, overrides, data, adversary)
    check_output(out, scenario_inputs(s, source, trace))
    check_replaceable_dir(out, RUN_DIR_ENTRIES, "run directory")
    execute(s, out, strategy=strategy, engine=engine, trace=trace, show_progress=progress,
            allow_memory=allow_memory, out_check=out)
    # The summary this run just wrote; the tables (and their checks) wait until first used.
    result = RunResult._from_summary(Path(out), json.loads((Path(out) / "summary.json").read_text()))
    if check:
        check_invariants(result, out)
    return result


@dataclass(frozen=True)
class CompareResult:
    """Both strategies' runs of one scenario and trace (``replay compare``), in ``STRATEGIES`` order."""

    path: Path
    name: str  # the scenario's name (or its file's stem)
    runs: tuple[RunResult, ...]
    report: Path  # the HTML report beside the runs

    def __getitem__(self, strategy: str) -> RunResult:
        for r in self.runs:
            if r.strategy == strategy:
                return r
        raise KeyError(f"no {strategy!r} run in {self.path} (strategies: {', '.join(r.strategy for r in self.runs)})")

    @property
    def completed(self) -> bool:
        return all(r.completed for r in self.runs)

    @property
    def headline(self) -> list[str]:
        """Who wins on downtime, guest slowdown, total time and bytes sent, and by how much."""
        from .analysis.headline import headline_lines

        return headline_lines([r.summary for r in self.runs], [r.strategy for r in self.runs])

    def text(self, all_metrics: bool = False) -> str:
        """The table ``replay compare`` prints (metrics zero or absent in both folded unless ``all_metrics``)."""
        from .analysis.comparetext import table

        return table([r.summary for r in self.runs], all_metrics)


def compare(scenario: Scenario | PathLike, out: PathLike, *, overrides: Sequence[str] = (), data: bool = False,
            adversary: Sequence[str] = (), engine: str = "cython", trace: PathLike | None = None,
            allow_memory: bool = False, progress: bool = False, check: bool = True) -> CompareResult:
    """Run a scenario under mirror-vm and shadow-vcpu on one trace, in two worker processes, into
    ``out/<strategy>/`` with ``out/report.html`` (``replay compare``); all three appear together or not
    at all. ``check``: raise InvariantError on a violated invariant (after writing)."""
    from .core.paths import check_output, check_replaceable_dir
    from .core.records import atomic_dir
    from .analysis.report import write_report
    from .migration.runner import prepare, run_parallel
    from .runs.record import load_run as load

    s, source = _scenario(scenario, overrides, data, adversary)
    out = Path(out)
    check_output(out, scenario_inputs(s, source, trace))
    check_replaceable_dir(out, (*STRATEGIES, "report.html"), "compare directory")
    trace_path, _ = prepare(s, trace=trace, allow_memory=allow_memory, out_check=out,
                            processes=len(STRATEGIES))  # both workers run at once
    results = run_parallel(s, engine=engine, trace_path=trace_path, show_progress=progress)
    # Both runs and the report are built in a temporary directory that replaces ``out`` only when all
    # three are complete: a failure of either strategy (or Ctrl-C, or a full disk) leaves nothing.
    with atomic_dir(out) as tmp:
        for r, st in zip(results, STRATEGIES):
            r.write(tmp / st)
        # The report names each run by where it will be, not by the temporary directory.
        runs = [dataclasses.replace(load(tmp / st), path=out / st) for st in STRATEGIES]
        write_report(runs, tmp / "report.html")
    name = s.name or (source.stem if source is not None else "scenario")
    result = CompareResult(out, name, tuple(RunResult.of(r) for r in runs), out / "report.html")
    if check:
        for r in result.runs:
            check_invariants(r)
    return result


# ----------------------------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class SweepOutcome:
    """A sweep's invocation: its table (one row per point) and what this invocation did."""

    path: Path
    name: str
    points: int
    ran: int  # points run now
    skipped: int  # points whose run directory already existed (a resumed sweep)
    table: pl.DataFrame  # results.parquet: parameters, status, error text, key metrics

    def count(self, status: str) -> int:
        """Points with ``status`` (completed, aborted, cancelled, failed, or error)."""
        return int((self.table["status"] == status).sum())


def execute_sweep(sweep_file: PathLike, out: PathLike, *, scheduler: str | None = None, workers: int | None = None,
                  engine: str = "cython", progress: bool = False,
                  on_start: Callable[[str, int], Any] | None = None) -> SweepOutcome:
    """Run a sweep file (a base scenario and axes) into ``out`` on Dask (``replay sweep``): a local
    cluster of ``workers`` processes, or the one at ``scheduler``. Everything is checked before a cluster
    starts; ``on_start(name, points)`` is called once it is up. Points that errored are in the table
    (``status == "error"``); running again retries only them."""
    import polars as pl

    from .core.errors import UsageError
    from .core.paths import check_output
    from .sweeps.sweep import (
        TABLE,
        check_grid_size,
        check_scheduler,
        check_sweep_dir,
        check_sweep_disk,
        check_trace_files,
        check_workers,
        connect,
        load_sweep,
        points,
        run_sweep,
        sweep_inputs,
    )

    # Refused before the sweep file is read: arguments that are wrong whatever it holds.
    if workers is not None and scheduler is not None:
        raise UsageError("--workers sizes the local cluster; it cannot be used with --scheduler")
    check_workers(workers)
    if scheduler is not None:
        check_scheduler(scheduler)  # '' included: an empty address is a mistake, not "run locally"
    sw = load_sweep(sweep_file)
    check_grid_size(sw)  # from the axes' lengths, before a point is made
    pts = points(sw)  # validates every point before a cluster is started
    check_output(out, sweep_inputs(sw, pts))  # the sweep directory never is, holds or lies inside an input
    check_sweep_dir(out)  # and is new, empty or a previous sweep's: never merged into another directory
    check_trace_files(pts)
    check_sweep_disk(pts, out)  # the traces it generates must fit where it writes them
    client = connect(scheduler, workers)  # one line if unreachable, before anything is written
    if on_start is not None:
        on_start(sw.name, len(pts))
    res: SweepResult = run_sweep(sw, out, client=client, engine=engine, show_progress=progress, pts=pts,
                                 own_client=True)
    return SweepOutcome(Path(res.out), sw.name, len(pts), res.ran, res.skipped, pl.read_parquet(Path(res.out) / TABLE))


def sweep(sweep_file: PathLike, out: PathLike, *, scheduler: str | None = None, workers: int | None = None,
          engine: str = "cython", progress: bool = False) -> pl.DataFrame:
    """Run a sweep (see ``execute_sweep``) and return its results table as a polars DataFrame."""
    return execute_sweep(sweep_file, out, scheduler=scheduler, workers=workers, engine=engine,
                         progress=progress).table


# --------------------------------------------------------------------------------------------- analysis

RunLike = Union[RunResult, "Run", PathLike]


def _record_of(run: RunLike) -> Run:
    from .runs.record import Run, load_run as load

    if isinstance(run, RunResult):
        return run.record()
    if isinstance(run, Run):
        return run
    return load(run)


def _path_of(run: RunLike) -> Path:
    return Path(run.path) if hasattr(run, "path") else Path(run)  # type: ignore[arg-type]


def diff(a: RunLike, b: RunLike, *, strict: bool = False,
         max_regress: Mapping[str, int | float] | None = None) -> DiffResult:
    """Compare run A ("before") with run B ("after") (``tools/diff``): ``.outcome``, ``.reasons``,
    ``.metrics`` (rows with delta and ratio), ``.rounds`` (a polars DataFrame), ``.digests``...;
    ``replay.analysis.diff.render_text(result)`` is the text ``tools/diff`` prints. ``max_regress``: metric ->
    percent B may exceed A by."""
    from .analysis.diff import diff_runs

    return diff_runs(_record_of(a), _record_of(b), strict=strict, max_regress=dict(max_regress or {}))


def report(runs: RunLike | CompareResult | Iterable[RunLike], out: PathLike, *, all_metrics: bool = False) -> Path:
    """Write the self-contained HTML report of runs (results, run directories), of a compare's two runs,
    or of a sweep directory given alone (``replay report``); returns its path. ``all_metrics``: show the
    metrics zero or absent in every run instead of folding them."""
    from .core.paths import check_output
    from .analysis.report import write_report
    from .sweeps.report import is_sweep_dir, write_sweep_report

    if isinstance(runs, CompareResult):
        items: list[RunLike] = list(runs.runs)
    elif isinstance(runs, (str, os.PathLike, RunResult)) or hasattr(runs, "summary"):
        items = [runs]  # type: ignore[list-item]
    else:
        items = list(runs)  # type: ignore[arg-type]
    check_output(out, [_path_of(r) for r in items])
    if len(items) == 1 and not hasattr(items[0], "summary") and is_sweep_dir(items[0]):  # type: ignore[arg-type]
        return write_sweep_report(items[0], out)  # type: ignore[arg-type]
    records = [_record_of(r) for r in items]  # all validated before anything is drawn
    return write_report(records, out, all_metrics=all_metrics)


def adversary_matrix(scenario: Scenario | PathLike, out: PathLike | None = None, *, overrides: Sequence[str] = (),
                     kinds: str | Sequence[str] | None = None, modes: str | Sequence[str] = ("precopy", "postcopy"),
                     engine: str = "cython") -> pl.DataFrame:
    """Every adversary kind x strategy x mode against ``scenario`` (its own ``[[adversary]]`` entries are
    replaced), as ``replay adversary-matrix`` runs them: one row per run (kind, strategy, mode, phase,
    outcome, detected_by, corrupted...). ``kinds``/``modes``: names or a comma-separated string (default:
    every kind). With ``out``, also writes matrix.arrow, matrix.md and report.html there. A row with
    ``corrupted`` true is a completed migration whose plain text differs."""
    import polars as pl

    from .core.paths import check_output, check_replaceable_dir
    from .scenario.adversary import parse_kinds
    from .scenario.spec import ADVERSARY_KINDS, MODES
    from .sweeps.adversary_matrix import run_matrix, write_matrix

    def names(value: str | Sequence[str]) -> str:
        return value if isinstance(value, str) else ",".join(value)

    kind_list = parse_kinds(names(kinds if kinds is not None else ADVERSARY_KINDS), ADVERSARY_KINDS, "kinds")
    mode_list = parse_kinds(names(modes), MODES, "modes")
    s, source = _scenario(scenario, overrides, False, ())
    if out is not None:
        check_output(out, [source] if source is not None else [])
        check_replaceable_dir(out, {"matrix.arrow", "matrix.md", "report.html"}, "adversary matrix directory")
    table = run_matrix(s, kinds=kind_list, modes=mode_list, engine=engine)
    if out is not None:
        write_matrix(table, out, s.name)
    return pl.from_arrow(table)
