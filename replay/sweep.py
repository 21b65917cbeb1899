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
of its trace (``replay.refdigest``), and data mode's plain-text one if a point on it runs in data mode. Then each point is keyed by a hash of its resolved scenario (canonical
JSON) and its trace's content digest, and runs as one Dask task writing ``DIR/runs/<key>/`` atomically. A
point whose run directory exists is never run again, so an interrupted sweep resumes where it stopped. A
point that raises, or whose worker dies, is recorded in ``DIR/errors/<key>.txt`` (one line) and the sweep
goes on; the next invocation retries exactly those. ``DIR/results.parquet`` (one row per point: the
parameters, status, error text and key metrics; see ``METRICS``) and ``DIR/sweep.json`` (the axes and
points) are rewritten, atomically, at the end of every invocation, also an interrupted one.
"""

from __future__ import annotations

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

from .errors import ReplayError, RunDirError, ScenarioError, one_line
from .records import canonical_json, write_atomic
from .runrecord import check_run_dir, content_hash
from .scenario import Scenario, _hint, read_input_text, scenario_from_doc

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
            raise ScenarioError(f"{where}: axis {full!r}: expected a non-empty array of values, got {value!r}")
    return out


def _check_value(where: str, key: str, value: Any) -> Any:
    # Records hold integers; a float parameter would also be rejected by the scenario loader's types.
    if isinstance(value, (bool, int, str)):
        return value
    raise ScenarioError(f"{where}: axis {key!r}: value {value!r} is not an integer, string or boolean")


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
            raise ScenarioError(f"{src}: unknown key {key!r}{_hint(key, _TOP_KEYS)}")
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
    for short, key in SHORTHANDS.items():
        if short in doc:
            values = _flatten_axes({key: doc[short]}, src)[key]
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
    meta: Any  # replay.trace.TraceMeta
    no_migration: Mapping[tuple[int, int], str]  # (asid, os_vmpl) -> reference digest
    plaintext: str  # data mode's plain-text reference ("" when no point on this trace is in data mode)


def prepare_trace(scenario: Scenario, cache: str, guests: Sequence[tuple[int, int]], engine: str,
                  data: bool = False) -> PreparedTrace:
    """(A Dask task.) Generate or find the trace of ``scenario`` in ``cache`` and compute its reference
    digests for each (asid, os_vmpl) the sweep's points use, and the plain-text one if ``data``."""
    from .migrate import trace_for
    from .refdigest import no_migration_digest, plaintext_digest
    from .trace import read_meta

    path = trace_for(scenario, Path(cache))
    meta = read_meta(path)
    refs = {g: no_migration_digest(path, meta, g[0], g[1], engine, cache=Path(cache)) for g in guests}
    return PreparedTrace(str(path), meta, refs, plaintext_digest(path, meta, cache=Path(cache)) if data else "")


def run_point(scenario: Scenario, trace_path: str, no_migration: str, engine: str, out_dir: str,
              plaintext: str = "") -> dict:
    """(A Dask task.) Run one point and write its run directory atomically; returns the summary."""
    from .migrate import Migration

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
    """A point's run summary if its run directory is complete and intact (``runrecord.check_run_dir``),
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
              pts: Sequence[Point] | None = None) -> SweepResult:
    """Run every point of ``sweep`` not already run into ``out`` (see the module docstring) on ``client``,
    else on the cluster at ``scheduler``, else on a new local cluster. ``on_result(point, status)`` is
    called in this process as each point finishes (an exception from it stops the sweep: the table is
    still written, with the points not finished as "pending"). ``pts``: ``points(sweep)`` if the caller
    has them already."""
    pts = points(sweep) if pts is None else pts  # every point validated before anything runs
    out = Path(out)
    own = None
    if client is None:  # before anything is written: a cluster that cannot be reached leaves nothing
        if scheduler:
            from dask.distributed import Client

            client = own = Client(scheduler)
        else:
            client = own = local_client(workers)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "errors").mkdir(parents=True, exist_ok=True)
    for stale in (out / "runs").glob(".*.tmp"):  # run directories a killed worker never finished
        shutil.rmtree(stale, ignore_errors=True)
    keys: dict[int, str] = {}
    trace_errors: dict[int, str] = {}
    ran = skipped = errors = 0
    try:
        traces = _prepare_traces(client, pts, out, engine, show_progress)
        todo = []
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
            g = p.scenario.guest
            todo.append((p, key, prepared.path, prepared.no_migration[(g.asid, g.os_vmpl)], prepared.plaintext))
        ran, errors = _run_points(client, todo, out, engine, show_progress, on_result, errors)
    finally:
        table = build_table(sweep, pts, keys, out, trace_errors)
        digest = write_table(table, out / TABLE)
        write_atomic(out / SWEEP_JSON, canonical_json({**_sweep_record(sweep, pts, keys), "tables": {TABLE: digest}}))
        if own is not None:
            cluster = own.cluster
            own.close()
            if cluster is not None:
                cluster.close()
    return SweepResult(out, table, ran, skipped, errors)


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
                result[futures[fut]] = f"trace: {one_line(exc)}"
            bar.update(1)
    return result


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
