"""Sweeps: many runs of one base scenario over axes of parameters, executed on a Dask cluster.

A sweep file (TOML) names a base scenario -- ``scenario = "path.toml"`` (relative to the sweep file) or
an inline ``[scenario]`` table holding a whole scenario document -- and axes::

    strategies = ["mirror-vm", "shadow-vcpu"]          # shorthand for the axis migration.strategy
    modes = ["precopy", "postcopy"]                     # ... migration.mode
    seeds = [1, 2, 3]                                   # ... seed (the trace generator's seed follows it)
    [grid]                                              # every combination of these
    "migration.bandwidth_bytes_per_s" = [1_250_000_000, 3_125_000_000]
    guest.vcpus = [2, 4]                                # dotted keys and nested tables both work
    [[zip]]                                             # these vary together (equal lengths)
    "migration.downtime_limit_ns" = ["5ms", "50ms"]
    "migration.max_rounds" = [10, 30]

Any scenario key in ``section.key`` form can be an axis. The points are the product of the grid axes
and the zip groups, in file order. Every point is parsed and validated with the scenario loader before
anything runs, so a misspelt axis key fails at once with the loader's did-you-mean message.

Execution (``run_sweep``): the distinct traces are generated first, one Dask task per distinct trace
spec, into ``DIR/traces`` (so no two workers ever write the same trace, and a sweep directory on a shared
filesystem is all a remote cluster needs); each such task also computes the no-migration reference digest
of its trace (``replay.migration.refdigest``), and data mode's plain-text one if a point on it runs in data mode. Then each point is keyed by a hash of its resolved scenario (canonical
JSON) and its trace's content digest, and runs as one Dask task writing ``DIR/runs/<key>/`` atomically. A
point whose run directory exists is never run again, so an interrupted sweep resumes where it stopped. A
point that raises, or whose worker dies, is recorded in ``DIR/errors/<key>.txt`` (one line) and the sweep
goes on; the next invocation retries exactly those. ``DIR/results.parquet`` (one row per point: the
parameters, status, error text and key metrics; see ``METRICS``) and ``DIR/sweep.json`` (the axes and
points) are rewritten, atomically, at the end of every invocation, also an interrupted one. A sweep
directory an invocation created is removed if it fails (not if it is interrupted: that one resumes).

Limits, refused before anything runs with the figure: ``MAX_POINTS`` points (from the axes' lengths,
never by enumerating), ``WORKERS_PER_CORE`` local workers per core, a ``--scheduler`` of the form
SCHEME://HOST:PORT reached within ``CONNECT_TIMEOUT_S``. The local workers log into ``DIR/worker.log``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa

from ..core.errors import (
    ReplayError,
    ResourceError,
    RunDirError,
    ScenarioError,
    TraceError,
    UsageError,
    one_line,
)
from ..core.records import canonical_json, write_atomic
from ..runs.record import check_run_dir, content_hash
from ..scenario.spec import Scenario, hint, read_input_text, scenario_from_doc
from ..core.validate import short

SWEEP_FORMAT = "snp-replay-sweep"
SWEEP_VERSION = 1
TABLE = "results.parquet"
SWEEP_JSON = "sweep.json"

# The shorthand axes and the scenario keys they stand for; in the table they are the columns
# "strategy", "mode" and "seed", present for every point whether swept or not.
SHORTHANDS = {"strategies": "migration.strategy", "modes": "migration.mode", "seeds": "seed"}
FIXED_COLUMNS = {"migration.strategy": "strategy", "migration.mode": "mode", "seed": "seed"}
_TOP_KEYS = ("name", "description", "scenario", "grid", "zip", *SHORTHANDS)

# The metrics the table carries: column -> path into a run summary's "metrics". The ONE place that knows
# the summary's metric names (the sweep report reads the table's columns, never the summaries).
METRICS: dict[str, tuple[str, ...]] = {
    "total_ns": ("total_ns",),
    "downtime_ns": ("downtime_ns",),
    "expected_downtime_ns": ("expected_downtime_ns",),
    "setup_ns": ("setup_ns",),
    "bytes_sent": ("bytes_sent",),
    "pages_sent": ("pages_sent",),
    "rounds": ("rounds",),
    "agents_max": ("agents_max",),
    "guest_slowdown_ppm": ("guest_slowdown_ppm",),
    "downtime_limit_exceeded": ("downtime_limit_exceeded",),
    "postcopy_requests": ("postcopy", "requests"),
    "postcopy_blocktime_ns": ("postcopy", "blocktime_ns"),
    "postcopy_latency_p99_ns": ("postcopy", "latency_p99_ns"),
}
_METRIC_TYPES = {"downtime_limit_exceeded": pa.bool_()}

# Limits, refused before anything is validated or started (the figure is in the message): the points of
# one sweep (each is validated, keyed and tabled in this process: 10,000 take a few seconds), the worker
# processes of a local cluster per core (each holds a guest's engine; more only queue for the cores), and
# how long reaching a --scheduler may take.
MAX_POINTS = 10_000
WORKERS_PER_CORE = 4
CONNECT_TIMEOUT_S = 5
SCHEDULER_SCHEMES = ("tcp", "tls", "ws", "wss")
WORKER_LOG = "worker.log"
# What a sweep directory holds; an existing --out must hold sweep.json and nothing else than these.
SWEEP_DIR_ENTRIES = (TABLE, SWEEP_JSON, "runs", "errors", "traces", WORKER_LOG)


# ------------------------------------------------------------------------------------------ the file

@dataclass(frozen=True)
class Axis:
    """One grid axis (one key) or one zip group (several keys varying together): ``values[i]`` is the
    i-th setting, one value per key."""

    keys: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    src: str  # the sweep file, for messages
    base_doc: Mapping[str, Any]  # the base scenario document (parsed TOML)
    base_src: str  # where the base scenario came from, for the loader's messages
    base_dir: str  # trace.file of the base scenario is relative to this
    axes: tuple[Axis, ...]

    @property
    def keys(self) -> list[str]:
        return [k for a in self.axes for k in a.keys]


@dataclass(frozen=True)
class Point:
    index: int
    params: tuple[tuple[str, Any], ...]  # (axis key, value) in axis order
    scenario: Scenario


def _label(params: Sequence[tuple[str, Any]]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params) or "(base scenario)"


def _flatten_axes(table: Mapping[str, Any], where: str, prefix: str = "") -> dict[str, list]:
    """``{"migration": {"bandwidth_bytes_per_s": [..]}}`` and ``{"migration.bandwidth_bytes_per_s": [..]}``
    alike -> ``{"migration.bandwidth_bytes_per_s": [..]}``."""
    out: dict[str, list] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten_axes(value, where, full + "."))
        elif isinstance(value, list) and value:
            out[full] = value
        else:
            raise ScenarioError(f"{where}: axis {short(full, 80)}: expected a non-empty array of values, got {short(value)}")
    return out


def _check_value(where: str, key: str, value: Any) -> Any:
    # Records hold integers; a float parameter would also be rejected by the scenario loader's types.
    if isinstance(value, (bool, int, str)):
        return value
    raise ScenarioError(f"{where}: axis {short(key, 80)}: value {short(value)} is not an integer, string or boolean")


def load_sweep(path: str | Path) -> Sweep:
    """Parse a sweep file (see the module docstring). Points are validated by ``points()``."""
    path = Path(path)
    src = str(path)
    try:
        doc = tomllib.loads(read_input_text(path, "sweep"))
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{src}: invalid TOML ({exc})") from None
    for key in doc:
        if key not in _TOP_KEYS:
            raise ScenarioError(f"{src}: unknown key {key!r}{hint(key, _TOP_KEYS)}")
    base = doc.get("scenario")
    if isinstance(base, str):
        base_path = path.parent / base
        try:
            base_doc = tomllib.loads(read_input_text(base_path))
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"{base_path}: invalid TOML ({exc})") from None
        base_src, base_dir = str(base_path), str(base_path.parent)
    elif isinstance(base, Mapping):
        base_doc, base_src, base_dir = dict(base), f"{src} [scenario]", str(path.parent)
    else:
        raise ScenarioError(f"{src}: 'scenario' must be a scenario file path or a [scenario] table")

    axes: list[Axis] = []
    for word, key in SHORTHANDS.items():
        if word in doc:
            values = _flatten_axes({key: doc[word]}, src)[key]
            axes.append(Axis((key,), tuple((_check_value(src, key, v),) for v in values)))
    grid = doc.get("grid", {})
    if not isinstance(grid, Mapping):
        raise ScenarioError(f"{src}: 'grid' must be a table of axes")
    for key, values in _flatten_axes(grid, f"{src}: grid").items():
        axes.append(Axis((key,), tuple((_check_value(src, key, v),) for v in values)))
    zips = doc.get("zip", [])
    zips = [zips] if isinstance(zips, Mapping) else zips
    if not isinstance(zips, list):
        raise ScenarioError(f"{src}: 'zip' must be a table or an array of tables ([[zip]])")
    for i, group in enumerate(zips):
        if not isinstance(group, Mapping):
            raise ScenarioError(f"{src}: zip[{i}] must be a table of axes")
        flat = _flatten_axes(group, f"{src}: zip[{i}]")
        lengths = {k: len(v) for k, v in flat.items()}
        if len(set(lengths.values())) > 1:
            raise ScenarioError(f"{src}: zip[{i}]: axes must have equal lengths, got "
                                + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
        if flat:
            keys = tuple(flat)
            axes.append(Axis(keys, tuple(tuple(_check_value(src, k, flat[k][j]) for k in keys)
                                         for j in range(len(flat[keys[0]])))))
    seen: set[str] = set()
    for a in axes:
        for k in a.keys:
            if k in seen:
                raise ScenarioError(f"{src}: axis {k!r} is given twice")
            seen.add(k)
    name = doc.get("name", path.stem)
    return Sweep(str(name), str(doc.get("description", "")), src, base_doc, base_src, base_dir, tuple(axes))


def grid_size(sweep: Sweep) -> int:
    """The number of points, from the axes' lengths alone (nothing is enumerated)."""
    n = 1
    for a in sweep.axes:
        n *= len(a.values)
    return n


def check_grid_size(sweep: Sweep) -> int:
    n = grid_size(sweep)
    if n > MAX_POINTS:
        sizes = " x ".join(str(len(a.values)) for a in sweep.axes)
        raise ScenarioError(f"{sweep.src}: {n} points ({sizes}): a sweep has at most {MAX_POINTS} points; "
                            f"split it into several sweeps")
    return n


def max_workers() -> int:
    return WORKERS_PER_CORE * (os.cpu_count() or 1)


def check_workers(workers: int | None) -> None:
    if workers is None:
        return
    if workers < 1:
        raise UsageError(f"--workers {workers}: must be >= 1")
    if workers > max_workers():
        raise UsageError(f"--workers {workers}: at most {max_workers()} ({WORKERS_PER_CORE} per core on this "
                         f"machine's {os.cpu_count() or 1}); use --scheduler for a bigger cluster")


def check_scheduler(address: str) -> str:
    """A Dask scheduler address as ``SCHEME://HOST:PORT`` (tcp, tls, ws, wss); UsageError otherwise."""
    import re

    what = f"--scheduler {short(address)}"
    if address.strip() == "":
        raise UsageError("--scheduler: empty address (expected tcp://HOST:PORT)")
    m = re.fullmatch(r"([a-z]+)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})", address)
    if m is None:
        hint = f" (did you mean tcp://{address}?)" if re.fullmatch(r"[A-Za-z0-9._-]+:[0-9]{1,5}", address) else ""
        raise UsageError(f"{what}: expected SCHEME://HOST:PORT, e.g. tcp://10.0.0.1:8786{hint}")
    if m.group(1) not in SCHEDULER_SCHEMES:
        raise UsageError(f"{what}: unknown scheme {m.group(1)!r} (one of {', '.join(SCHEDULER_SCHEMES)})")
    if not 1 <= int(m.group(3)) <= 65535:
        raise UsageError(f"{what}: port {m.group(3)} is not in 1..65535")
    return address


def check_sweep_dir(out: str | Path) -> None:
    """An existing ``--out`` must be empty or a previous sweep's directory (its sweep.json says so, and it
    holds nothing else than a sweep writes): anything else is refused, never merged into."""
    from ..core.paths import show

    p = Path(out)
    if not p.exists() and not p.is_symlink():
        return
    if p.is_symlink() or not p.is_dir():
        raise UsageError(f"--out {show(out)} exists and is not a directory: refusing to replace it")
    entries = sorted(e.name for e in p.iterdir() if not (e.name.startswith(".") and e.name.endswith(".tmp")))
    if not entries:
        return
    record = p / SWEEP_JSON
    try:
        fmt = json.loads(record.read_bytes()).get("format") if record.is_file() else None
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != SWEEP_FORMAT:
        raise UsageError(f"--out {show(out)} exists and is not a sweep directory (no {SWEEP_JSON} of a sweep; it "
                         f"holds {short(entries[0], 40)}): refusing to write into it; choose a new directory")
    extra = [e for e in entries if e not in SWEEP_DIR_ENTRIES]
    if extra:
        raise UsageError(f"--out {show(out)} is a sweep directory that also holds {short(extra[0], 40)}: refusing "
                         f"to write among other files; move it out or choose a new directory")


def sweep_inputs(sweep: Sweep, pts: Sequence[Point]) -> list[str]:
    """The files a sweep reads: the sweep file, its base scenario file, every point's trace file."""
    inputs = [sweep.src]
    if not sweep.base_src.endswith(" [scenario]"):
        inputs.append(sweep.base_src)
    inputs += sorted({str(Path(p.scenario.base_dir) / p.scenario.trace.file) for p in pts if p.scenario.trace.file})
    return inputs


def check_trace_files(pts: Sequence[Point]) -> None:
    """Every trace file the points replay, read and checked completely (a missing, truncated or altered
    trace is the user's input: one line before anything runs, not an error per point)."""
    from ..core.paths import require_regular
    from ..traces.format import open_trace

    for path in sorted({str(Path(p.scenario.base_dir) / p.scenario.trace.file) for p in pts if p.scenario.trace.file}):
        require_regular(path, TraceError, "trace")
        with open_trace(path) as r:
            for _ in r:
                pass


def connect(scheduler: str | None = None, workers: int | None = None):
    """A Dask client: of the cluster at ``scheduler`` (reached within CONNECT_TIMEOUT_S, else a one-line
    UsageError), else of a new local cluster."""
    import logging

    if not scheduler:
        check_workers(workers)
        return local_client(workers)
    check_scheduler(scheduler)
    import dask
    from dask.distributed import Client

    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the failure is reported once, below, not also by Dask's loggers
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": f"{CONNECT_TIMEOUT_S}s"}):
            return Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise UsageError(f"--scheduler {short(scheduler)}: cannot reach a Dask scheduler within "
                         f"{CONNECT_TIMEOUT_S} s ({one_line(exc, 160)})") from None
    except (MemoryError, ValueError, TypeError, EOFError) as exc:
        # Something answered, but not Dask's protocol (e.g. a frame length of exabytes from another server).
        raise UsageError(f"--scheduler {short(scheduler)}: what answers there is not a Dask scheduler "
                         f"({type(exc).__name__}: {one_line(exc, 120)})") from None
    finally:
        quiet.setLevel(level)


def toml_value(value: Any) -> str:
    """A Python value in TOML value syntax (the form ``--set`` overrides take)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of printable text is a TOML basic string
    raise TypeError(f"no TOML form for {value!r}")


def points(sweep: Sweep) -> list[Point]:
    """Every point of the sweep as a validated scenario; the first invalid one raises ScenarioError
    naming the sweep, the point and (from the scenario loader) the key, with a did-you-mean hint."""
    check_grid_size(sweep)
    out = []
    for index, combo in enumerate(itertools.product(*(a.values for a in sweep.axes))):
        params = tuple((k, v) for a, setting in zip(sweep.axes, combo) for k, v in zip(a.keys, setting))
        overrides = [f"{k}={toml_value(v)}" for k, v in params]
        try:
            scenario = scenario_from_doc(sweep.base_doc, sweep.base_src, sweep.base_dir, overrides)
        except ScenarioError as exc:
            raise ScenarioError(f"{sweep.src}: point {_label(params)}: {one_line(exc)}") from None
        out.append(Point(index, params, scenario))
    return out


# ------------------------------------------------------------------------------------- keys, traces

def _trace_spec(s: Scenario) -> str:
    """What makes two points replay the same trace file: the file, or the generator spec and guest."""
    t = s.trace
    if t.file:
        return json.dumps({"file": str(Path(s.base_dir) / t.file)})
    spec = {"generator": t.generator, "events": t.events, "rate": t.rate, "fill": t.fill, "seed": s.trace_seed,
            "guest_bytes": s.guest.guest_bytes, "vcpus": s.guest.vcpus,
            "options": {k: repr(v) for k, v in sorted(t.options.items())}}
    return json.dumps(spec, sort_keys=True)


def point_key(scenario: Scenario, meta) -> str:
    """A point's identity: its resolved scenario (as a run records it) and its trace's content digest."""
    resolved = scenario.resolved(guest_bytes=meta.guest_bytes, vcpus=meta.vcpus)
    ident = canonical_json({"scenario": resolved, "trace_digest": meta.digest})
    return hashlib.blake2b(ident, digest_size=12).hexdigest()


@dataclass(frozen=True)
class PreparedTrace:
    path: str
    meta: Any  # replay.traces.format.TraceMeta
    no_migration: Mapping[tuple[int, int], str]  # (asid, os_vmpl) -> reference digest
    plaintext: str  # data mode's plain-text reference ("" when no point on this trace is in data mode)


def prepare_trace(scenario: Scenario, cache: str, guests: Sequence[tuple[int, int]], engine: str,
                  data: bool = False) -> PreparedTrace:
    """(A Dask task.) Generate or find the trace of ``scenario`` in ``cache`` and compute its reference
    digests for each (asid, os_vmpl) the sweep's points use, and the plain-text one if ``data``."""
    from ..migration import trace_for
    from ..migration.refdigest import no_migration_digest, plaintext_digest
    from ..traces.format import read_meta

    path = trace_for(scenario, Path(cache))
    meta = read_meta(path)
    refs = {g: no_migration_digest(path, meta, g[0], g[1], engine, cache=Path(cache)) for g in guests}
    return PreparedTrace(str(path), meta, refs, plaintext_digest(path, meta, cache=Path(cache)) if data else "")


def run_point(scenario: Scenario, trace_path: str, no_migration: str, engine: str, out_dir: str,
              plaintext: str = "") -> dict:
    """(A Dask task.) Run one point and write its run directory atomically; returns the summary."""
    from ..migration import Migration

    result = Migration(scenario, trace_path, engine=engine, no_migration_digest=no_migration,
                       plaintext_reference=plaintext or None).run()
    result.write(out_dir)
    return result.summary


# ----------------------------------------------------------------------------------------- the table

def metrics_of(summary: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for column, path in METRICS.items():
        value: Any = summary.get("metrics", {})
        for part in path:
            value = value.get(part) if isinstance(value, Mapping) else None
        out[column] = value
    return out


def _param_columns(sweep: Sweep) -> list[str]:
    return [k for k in sweep.keys if k not in FIXED_COLUMNS]


def _column(values: list, name: str) -> pa.Array:
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) > 1:  # a TOML array may mix types ("10ms" and 5000000): keep them as text
        return pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.array(values, _METRIC_TYPES.get(name, pa.int64()) if kinds <= {int} else None)


def build_table(sweep: Sweep, pts: Sequence[Point], keys: Mapping[int, str], out: Path,
                trace_errors: Mapping[int, str] | None = None) -> pa.Table:
    """One row per point from what is on disk: its run directory's summary, its error file, or
    neither (status "pending": not run yet). A point whose trace could not be made has no key; its
    error is in ``trace_errors``."""
    rows = []
    for p in pts:
        key = keys.get(p.index, "")
        summary, error = None, (trace_errors or {}).get(p.index)
        if key:
            summary = _read_summary(out / "runs" / key)
            if summary is None and (out / "errors" / f"{key}.txt").exists():
                error = (out / "errors" / f"{key}.txt").read_text().strip()
        s = p.scenario
        row: dict[str, Any] = {"point": p.index, "key": key, "strategy": s.migration.strategy,
                               "mode": s.migration.mode, "seed": s.seed}
        params = dict(p.params)
        row.update({k: params[k] for k in _param_columns(sweep)})
        row["status"] = summary["status"] if summary else "error" if error is not None else "pending"
        row["error"] = error
        row["invariants_hold"] = all(summary["invariants"].values()) if summary else None
        row.update(metrics_of(summary) if summary else dict.fromkeys(METRICS))
        row["trace_digest"] = summary["trace"]["digest"] if summary else None
        row["run_dir"] = f"runs/{key}" if summary else None
        rows.append(row)
    names = ["point", "key", "strategy", "mode", "seed", *_param_columns(sweep), "status", "error",
             "invariants_hold", *METRICS, "trace_digest", "run_dir"]
    types = {"point": pa.int64(), "key": pa.string(), "strategy": pa.string(), "mode": pa.string(),
             "seed": pa.int64(), "status": pa.string(), "error": pa.string(), "invariants_hold": pa.bool_(),
             "trace_digest": pa.string(), "run_dir": pa.string()}
    arrays = [pa.array([r[n] for r in rows], types[n]) if n in types else _column([r[n] for r in rows], n)
              for n in names]
    return pa.Table.from_arrays(arrays, names=names)


def _read_summary(run_dir: Path) -> dict | None:
    """A point's run summary if its run directory is complete and intact (``replay.runs.record.check_run_dir``),
    else None: the point counts as not run, and running it again replaces whatever is there."""
    try:
        return check_run_dir(run_dir)[0]
    except RunDirError:
        return None


def write_table(table: pa.Table, path: Path) -> str:
    """Write the results table atomically; returns its content hash (recorded in sweep.json)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    write_atomic(path, data)
    return content_hash(data)


def _sweep_record(sweep: Sweep, pts: Sequence[Point], keys: Mapping[int, str]) -> dict:
    return {
        "format": SWEEP_FORMAT, "version": SWEEP_VERSION, "name": sweep.name, "description": sweep.description,
        "axes": [{"keys": list(a.keys), "values": [list(v) for v in a.values]} for a in sweep.axes],
        "points": [{"point": p.index, "key": keys.get(p.index, ""), "params": [[k, v] for k, v in p.params]}
                   for p in pts],
    }


# ----------------------------------------------------------------------------------------- execution

@dataclass(frozen=True)
class SweepResult:
    out: Path
    table: pa.Table
    ran: int  # points run (successfully) by this invocation
    skipped: int  # points whose run directory already existed
    errors: int  # points that errored in this invocation

    def count(self, status: str) -> int:
        return self.table.column("status").to_pylist().count(status)


def _bar(total: int, unit: str, enabled: bool):
    """A tqdm bar on a terminal only (nothing recorded depends on it)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{unit}s", unit=unit, leave=False, file=sys.stderr,
                disable=not (enabled and sys.stderr.isatty()))


def local_client(workers: int | None = None):
    """A Dask client of a new local cluster: one single-threaded worker process per core."""
    import logging

    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                           dashboard_address=":0", silence_logs=logging.ERROR)
    return Client(cluster)


def run_sweep(sweep: Sweep, out: str | Path, *, client=None, scheduler: str | None = None,
              workers: int | None = None, engine: str = "cython", show_progress: bool = False,
              on_result: Callable[[Point, str], None] | None = None,
              pts: Sequence[Point] | None = None, own_client: bool = False) -> SweepResult:
    """Run every point of ``sweep`` not already run into ``out`` (see the module docstring) on ``client``,
    else on the cluster at ``scheduler``, else on a new local cluster. ``on_result(point, status)`` is
    called in this process as each point finishes (an exception from it stops the sweep: the table is
    still written, with the points not finished as "pending"). ``pts``: ``points(sweep)`` if the caller
    has them already. ``own_client``: ``client`` was made for this sweep (``connect``): closed at the end,
    and its local workers log into the sweep directory."""
    pts = points(sweep) if pts is None else pts  # every point validated before anything runs
    out = Path(out)
    own = client if own_client else None
    if client is None:  # before anything is written: a cluster that cannot be reached leaves nothing
        client = own = connect(scheduler, workers)
    local = own is not None and getattr(own, "cluster", None) is not None
    created = not out.exists()
    failed = False
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        (out / "errors").mkdir(parents=True, exist_ok=True)
        with _worker_logs(client, out / WORKER_LOG, local):
            result = _run(sweep, pts, client, out, engine, show_progress, on_result)
    except KeyboardInterrupt:
        raise  # an interrupted sweep keeps what it did (its table says what is pending): it resumes
    except BaseException:
        failed = True
        raise
    finally:
        if own is not None:  # first: no worker writes into the directory once it is removed
            cluster = own.cluster
            own.close()
            if cluster is not None:
                cluster.close()
        if failed and created:  # nothing partial: a sweep directory this invocation made goes with its failure
            shutil.rmtree(out, ignore_errors=True)
    return result


def _run(sweep: Sweep, pts: Sequence[Point], client, out: Path, engine: str, show_progress: bool,
         on_result) -> SweepResult:
    for stale in (out / "runs").glob(".*.tmp"):  # run directories a killed worker never finished
        shutil.rmtree(stale, ignore_errors=True)
    keys: dict[int, str] = {}
    trace_errors: dict[int, str] = {}
    ran = skipped = errors = 0
    _DISK_FULL.clear()
    try:
        traces = _prepare_traces(client, pts, out, engine, show_progress)
        todo = []
        scheduled: set[str] = set()
        for p in pts:
            prepared = traces[_trace_spec(p.scenario)]
            if isinstance(prepared, str):  # the trace itself could not be made: every point on it errors
                errors += 1
                trace_errors[p.index] = prepared
                continue
            key = keys[p.index] = point_key(p.scenario, prepared.meta)
            if _read_summary(out / "runs" / key) is not None:
                skipped += 1
                continue
            if key in scheduled:  # an equal point (a value repeated on an axis): one run serves both rows
                continue
            scheduled.add(key)
            g = p.scenario.guest
            todo.append((p, key, prepared.path, prepared.no_migration[(g.asid, g.os_vmpl)], prepared.plaintext))
        ran, errors = _run_points(client, todo, out, engine, show_progress, on_result, errors)
        if _DISK_FULL:
            # Not the points' fault: the machine's. One line and exit 2 (a new sweep directory goes, a
            # resumed one keeps its table: the points that failed for it are retried next time).
            raise ResourceError(f"{out}: the disk filled up while the sweep ran ({_DISK_FULL[0]}); "
                                f"free space and rerun the same command")
    finally:
        table = build_table(sweep, pts, keys, out, trace_errors)
        digest = write_table(table, out / TABLE)
        write_atomic(out / SWEEP_JSON, canonical_json({**_sweep_record(sweep, pts, keys), "tables": {TABLE: digest}}))
    return SweepResult(out, table, ran, skipped, errors)


def _log_to(path: str) -> None:
    """(Run on each worker.) Send the worker's logs and its stderr to ``path``: Dask logs a failed task
    with its traceback ("Compute Failed"), which belongs in the sweep directory, not on the terminal; the
    point's error is recorded (one line) in its errors/ file and the table anyway."""
    import logging

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    handler = logging.StreamHandler(open(path, "a", buffering=1))  # noqa: SIM115 - lives as long as the worker
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("distributed", "dask"):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@contextlib.contextmanager
def _worker_logs(client, path: Path, own_workers: bool):
    """Workers' logs into ``path`` while the sweep runs (``own_workers``: the worker processes of the
    local cluster this sweep started), and this process's Dask loggers too (another cluster's workers log
    where their own configuration says)."""
    import logging

    if own_workers:
        # A plugin, not a one-off call: a worker that dies is restarted by its nanny, and logs there too.
        client.register_plugin(_log_plugin(str(path.resolve())), name="snp-replay-sweep-log")
    handler = logging.FileHandler(path, delay=True)
    loggers = [logging.getLogger(n) for n in ("distributed", "dask", "tornado", "asyncio")]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.handlers[:] = [handler]
        lg.propagate = False
    try:
        yield
    finally:
        for lg, (handlers, propagate, level) in zip(loggers, saved):
            lg.handlers[:] = handlers
            lg.propagate = propagate
            lg.setLevel(level)
        handler.close()


def _log_plugin(path: str):
    """A Dask worker plugin: ``_log_to(path)`` in every worker process, also those started later."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class LogPlugin(WorkerPlugin):
        def setup(self, worker) -> None:
            _log_to(path)

    return LogPlugin()


def _prepare_traces(client, pts: Sequence[Point], out: Path, engine: str, show_progress: bool) -> dict:
    """One task per distinct trace spec; spec -> PreparedTrace, or the one-line error that stopped it."""
    from dask.distributed import as_completed

    groups: dict[str, list[Point]] = {}
    for p in pts:
        groups.setdefault(_trace_spec(p.scenario), []).append(p)
    cache = str(out / "traces")
    futures = {}
    for spec, members in groups.items():
        guests = sorted({(m.scenario.guest.asid, m.scenario.guest.os_vmpl) for m in members})
        data = any(m.scenario.migration.data for m in members)
        fut = client.submit(prepare_trace, members[0].scenario, cache, guests, engine, data, pure=False)
        futures[fut] = spec
    result: dict[str, Any] = {}
    with _bar(len(futures), "trace", show_progress) as bar:
        for fut in as_completed(list(futures)):
            try:
                result[futures[fut]] = fut.result()
            except Exception as exc:  # noqa: BLE001 - recorded against the points, the sweep goes on
                _note_disk_full(exc)
                result[futures[fut]] = f"trace: {one_line(exc)}"
            bar.update(1)
    return result


_DISK_FULL: list[str] = []  # set by _note_disk_full during one _run


def _note_disk_full(exc: BaseException) -> None:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        _DISK_FULL.append(os.strerror(exc.errno))


def check_sweep_disk(pts: Sequence[Point], out: str | Path) -> None:
    """Refuse (ResourceError, with the figure) a sweep whose generated traces cannot fit the free space
    where ``out`` will be: each distinct generated trace is written once into ``out/traces``."""
    from ..core.validate import TRACE_ROW_BYTES, check_disk

    rows = {}
    for p in pts:
        t, g = p.scenario.trace, p.scenario.guest
        if t.generator:
            rows[_trace_spec(p.scenario)] = t.events + (g.guest_bytes // 4096 if t.fill else 0)
    where = Path(out).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    check_disk(sum(rows.values()) * TRACE_ROW_BYTES, where,
               f"generating the sweep's {len(rows)} trace(s) ({sum(rows.values())} events)")


def _record_error(out: Path, key: str, text: str) -> None:
    write_atomic(out / "errors" / f"{key}.txt", (" ".join(text.split()) + "\n").encode())


def _run_points(client, todo, out: Path, engine: str, show_progress: bool, on_result, errors: int) -> tuple[int, int]:
    from dask.distributed import as_completed

    futures = {}
    for p, key, trace_path, nomig, plaintext in todo:
        fut = client.submit(run_point, p.scenario, trace_path, nomig, engine, str(out / "runs" / key), plaintext,
                            pure=False)
        futures[fut] = (p, key)
    ran = 0
    try:
        with _bar(len(futures), "run", show_progress) as bar:
            for fut in as_completed(list(futures)):
                p, key = futures[fut]
                try:
                    summary = fut.result()
                    status = summary["status"]
                    ran += 1
                    (out / "errors" / f"{key}.txt").unlink(missing_ok=True)
                except Exception as exc:  # noqa: BLE001 - a point's error (or its worker's death) is data
                    _note_disk_full(exc)
                    status = "error"
                    errors += 1
                    _record_error(out, key, f"{type(exc).__name__}: {one_line(exc)}"
                                  if not isinstance(exc, ReplayError) else one_line(exc))
                bar.update(1)
                if on_result:
                    on_result(p, status)
    finally:
        for fut in futures:
            fut.cancel()
    return ran, errors
