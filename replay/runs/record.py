"""Run directories: how a migration run is recorded, and how tools read one back.

A run directory holds ``summary.json`` (canonical JSON: format, version, status, the fully resolved
scenario, trace identity, metrics, digests), ``rounds.arrow`` (one row per migration round),
``events.arrow`` (the migration event log) and, for post-copy runs, ``faults.arrow`` (one row per
remote page fault). The directory appears atomically. ``summary.json`` records the content hash
(blake2b-256) of each table file under ``tables`` and the hash of the rest of the summary as
``record_digest``. Readers (tools/diff, reports, ``replay verify``) go through ``load_run`` /
``check_run_dir``, which read every file whole (regular files only, never memory-mapped), check the
hashes, the summary's shape and every table's Arrow structure and schema before polars sees it, and
reject anything malformed, tampered with or of a version they do not understand with a one-line
``RunDirError``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.ipc as ipc

from ..core.errors import RunDirError, one_line
from ..core.paths import require_regular
from ..core.records import atomic_dir, canonical_json
from ..scenario.spec import MODES, STRATEGIES
from ..core.validate import check_summary, load_json, short

if TYPE_CHECKING:  # polars is for reading runs back: writing one (every `replay run`) does without it
    import polars as pl

RUN_FORMAT = "snp-replay-run"
RUN_VERSION = 1

STATUSES = ("completed", "aborted", "cancelled", "failed")

ROUNDS_SCHEMA = pa.schema(
    [
        pa.field("round", pa.uint32(), nullable=False),
        pa.field("phase", pa.string(), nullable=False),  # precopy | downtime | postcopy
        pa.field("sync_ns", pa.uint64(), nullable=False),  # virtual time of the dirty-log sync
        pa.field("dirty_pages", pa.uint64(), nullable=False),  # dirty at that sync
        pa.field("start_ns", pa.uint64(), nullable=False),
        pa.field("end_ns", pa.uint64(), nullable=False),
        pa.field("pages_sent", pa.uint64(), nullable=False),
        pa.field("zero_pages", pa.uint64(), nullable=False),
        pa.field("private_pages", pa.uint64(), nullable=False),
        pa.field("shared_pages", pa.uint64(), nullable=False),
        pa.field("bytes_sent", pa.uint64(), nullable=False),
        pa.field("agents", pa.uint32(), nullable=False),
        pa.field("agent_cpu_ns", pa.uint64(), nullable=False),  # source agents
        pa.field("target_cpu_ns", pa.uint64(), nullable=False),  # target agents (unpack, PVALIDATE, RMPADJUST)
        pa.field("host_cpu_ns", pa.uint64(), nullable=False),  # both hosts' migration threads (shared pages, RMPUPDATE)
        pa.field("guest_progress_ns", pa.uint64(), nullable=False),  # guest (trace) time advanced in the round
    ]
)

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("seq", pa.uint64(), nullable=False),
        pa.field("t_ns", pa.uint64(), nullable=False),  # virtual time
        pa.field("kind", pa.string(), nullable=False),
        pa.field("gfn", pa.int64(), nullable=False),  # -1: not about one page
        pa.field("vcpu", pa.int32(), nullable=False),  # -1: not about one vCPU
        pa.field("detail", pa.string(), nullable=False),
    ]
)

FAULTS_SCHEMA = pa.schema(
    [
        pa.field("vcpu", pa.uint16(), nullable=False),
        pa.field("gfn", pa.uint64(), nullable=False),
        pa.field("private", pa.bool_(), nullable=False),
        pa.field("raised_ns", pa.uint64(), nullable=False),
        pa.field("served_ns", pa.uint64(), nullable=False),
        pa.field("event_index", pa.uint64(), nullable=False),
    ]
)

TABLES = {"rounds": ROUNDS_SCHEMA, "events": EVENTS_SCHEMA, "faults": FAULTS_SCHEMA}
MAX_RECORD_FILE = 1 << 32  # bytes: a table file beyond 4 GiB is not a run record
MAX_SUMMARY = 64 << 20


def _write_table(path: Path, table: pa.Table, schema: pa.Schema) -> None:
    try:
        table = table.cast(schema) if table.schema != schema else table
    except (pa.ArrowInvalid, OverflowError) as exc:
        # A value beyond the record's column type (virtual time past 2^64 ns): parameters too extreme.
        raise RunDirError(f"{path.name}: a value does not fit the run record ({one_line(exc, 200)}); "
                          "the scenario's times or sizes are too large") from None
    # Uncompressed, one batch: byte-identical output for identical tables on any machine.
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, schema) as writer:
        writer.write_table(table.combine_chunks(), max_chunksize=max(1, table.num_rows))


def content_hash(data: bytes) -> str:
    """blake2b-256 of a record file's bytes (run records are byte-deterministic, so this identifies them)."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def record_digest(summary: dict) -> str:
    """The hash of a summary's canonical JSON without its own ``record_digest`` key."""
    return content_hash(canonical_json({k: v for k, v in summary.items() if k != "record_digest"}))


def write_run(
    out_dir: str | Path,
    summary: dict,
    rounds: pa.Table,
    events: pa.Table,
    faults: pa.Table | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a complete run directory atomically (an existing one at ``out_dir`` is replaced).

    ``summary.json`` gains ``tables`` (the content hash of each table file) and ``record_digest`` (the
    hash of the rest of the summary), so that readers refuse a tampered or truncated record.
    """
    if summary.get("format") != RUN_FORMAT or summary.get("version") != RUN_VERSION:
        raise ValueError("summary must carry format/version")
    if summary.get("status") not in STATUSES:
        raise ValueError(f"summary status must be one of {STATUSES}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        parts = [("rounds", rounds, ROUNDS_SCHEMA), ("events", events, EVENTS_SCHEMA)]
        if faults is not None:
            parts.append(("faults", faults, FAULTS_SCHEMA))
        hashes = {}
        for name, table, schema in parts:
            _write_table(tmp / f"{name}.arrow", table, schema)
            hashes[f"{name}.arrow"] = content_hash((tmp / f"{name}.arrow").read_bytes())
        record = {k: v for k, v in summary.items() if k not in ("tables", "record_digest")}
        record["tables"] = hashes
        record["record_digest"] = record_digest(record)
        (tmp / "summary.json").write_bytes(canonical_json(record))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out_dir


@dataclass(frozen=True)
class Run:
    """A run directory as read back: the summary dict and its tables as polars DataFrames."""

    path: Path
    summary: dict
    rounds: pl.DataFrame
    events: pl.DataFrame
    faults: pl.DataFrame | None

    @property
    def metrics(self) -> dict:
        return self.summary["metrics"]

    @property
    def name(self) -> str:
        return f"{self.summary['strategy']}/{self.summary['mode']}"


def read_record_file(path: Path, limit: int = MAX_RECORD_FILE) -> bytes:
    """A run-directory file's bytes: a regular file (never a FIFO or device, which could block or be
    endless), read whole into memory (never memory-mapped: the bytes checked are the bytes parsed)."""
    if not os.path.lexists(path):
        raise RunDirError(f"{path}: missing (not a complete run directory)")
    size = require_regular(path, RunDirError).stat().st_size
    if size > limit:
        raise RunDirError(f"{path}: {size} bytes, larger than any run record ({limit})")
    try:
        with open(path, "rb") as f:
            # The size read, not the limit: read(n) allocates n bytes first, and the limit is far above
            # any real record (a file grown since the stat is caught by its content hash).
            return f.read(size + 1)
    except OSError as exc:
        raise RunDirError(f"{path}: cannot read ({exc.strerror or one_line(exc, 200)})") from None


def parse_table(path: Path, data: bytes, schema: pa.Schema) -> pa.Table:
    """An Arrow IPC file's bytes as a table of exactly ``schema``, validated in full (structure, buffers,
    offsets) before anything else touches it; RunDirError otherwise."""
    try:
        reader = ipc.open_file(pa.BufferReader(data))
        if not reader.schema.remove_metadata().equals(schema):
            raise RunDirError(f"{path}: schema differs from the run record's {_schema_text(schema)}")
        batches = []
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            batch.validate(full=True)
            batches.append(batch)
        table = pa.Table.from_batches(batches, schema=schema)
    except RunDirError:
        raise
    except (pa.ArrowException, OSError, ValueError, IndexError) as exc:
        raise RunDirError(f"{path}: not a valid Arrow file ({one_line(exc, 200)})") from None
    for name in schema.names:
        if table.column(name).null_count:
            raise RunDirError(f"{path}: nulls in column {name}")
    return table


def _schema_text(schema: pa.Schema) -> str:
    return "(" + ", ".join(f"{f.name}: {f.type}" for f in schema) + ")"


def _check_order(path: Path, tables: dict[str, pa.Table]) -> None:
    """What the writer guarantees about the rows: events numbered 0..n-1 in time order, rounds numbered
    0..n-1, every fault served no earlier than raised."""
    import numpy as np

    ev = tables["events"]
    seq = ev.column("seq").to_numpy()
    bad = np.flatnonzero(seq != np.arange(len(seq), dtype=np.uint64))
    if len(bad):
        raise RunDirError(f"{path / 'events.arrow'}: row {int(bad[0])}: seq {int(seq[bad[0]])}, expected {int(bad[0])}")
    t = ev.column("t_ns").to_numpy()
    back = np.flatnonzero(t[1:] < t[:-1])
    if len(back):
        raise RunDirError(f"{path / 'events.arrow'}: row {int(back[0]) + 1}: t_ns goes back in time")
    rn = tables["rounds"].column("round").to_numpy()
    bad = np.flatnonzero(rn != np.arange(len(rn), dtype=np.uint32))
    if len(bad):
        raise RunDirError(f"{path / 'rounds.arrow'}: row {int(bad[0])}: round {int(rn[bad[0]])}, expected {int(bad[0])}")
    if "faults" in tables:
        f = tables["faults"]
        early = np.flatnonzero(f.column("served_ns").to_numpy() < f.column("raised_ns").to_numpy())
        if len(early):
            raise RunDirError(f"{path / 'faults.arrow'}: row {int(early[0])}: served before it was raised")


def check_run_dir(path: str | Path, *, complete: bool = False) -> tuple[dict, dict[str, pa.Table]]:
    """Everything ``load_run`` checks, without polars: the summary (shape, version, record digest) and
    every table (content hash, Arrow structure, schema). ``complete`` (``replay verify``) also checks the
    rows' numbering and order. Returns the summary and the tables."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: not a run directory (does not exist or is not a directory)")
    summary_path = path / "summary.json"
    if not summary_path.exists() and not summary_path.is_symlink():
        raise RunDirError(f"{path}: no summary.json (not a run directory)")
    raw = read_record_file(summary_path, MAX_SUMMARY)
    try:
        summary = load_json(raw, str(summary_path))
    except UnicodeDecodeError:
        raise RunDirError(f"{summary_path}: not UTF-8") from None
    if not isinstance(summary, dict) or summary.get("format") != RUN_FORMAT:
        raise RunDirError(f"{summary_path}: format is not {RUN_FORMAT!r}")
    if summary.get("version") != RUN_VERSION:
        raise RunDirError(
            f"{summary_path}: run record version {short(summary.get('version'))} is not understood "
            f"(this tool reads version {RUN_VERSION})"
        )
    tables = summary.get("tables")
    if not isinstance(tables, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tables.items()):
        raise RunDirError(f"{summary_path}: no table hashes (a record from an older snp-replay, or tampered with)")
    try:
        digest = record_digest(summary)
    except (TypeError, ValueError):  # floats or non-string keys: no record this tool writes has them
        raise RunDirError(f"{summary_path}: holds a float (run records hold integers only)") from None
    if summary.get("record_digest") != digest:
        raise RunDirError(f"{summary_path}: record digest mismatch (the summary was changed after it was written)")
    check_summary(summary, str(summary_path), strategies=STRATEGIES, modes=MODES, statuses=STATUSES)
    unknown = sorted(set(tables) - {f"{n}.arrow" for n in TABLES})
    if unknown or "rounds.arrow" not in tables or "events.arrow" not in tables:
        raise RunDirError(f"{summary_path}: tables must list rounds.arrow, events.arrow and optionally faults.arrow")
    out: dict[str, pa.Table] = {}
    for name, schema in TABLES.items():
        fname = f"{name}.arrow"
        fpath = path / fname
        if fname not in tables:
            if fpath.exists() or fpath.is_symlink():
                raise RunDirError(f"{fpath}: not listed in summary.json (not part of this run record)")
            continue
        data = read_record_file(fpath)
        if content_hash(data) != tables[fname]:
            raise RunDirError(f"{fpath}: content hash mismatch (the file was changed or truncated after it was written)")
        out[name] = parse_table(fpath, data, schema)
    if complete:
        _check_order(path, out)
    return summary, out


def load_run(path: str | Path) -> Run:
    """Read a run directory, validating it completely (``check_run_dir``) before polars sees a table."""
    import polars as pl

    summary, tables = check_run_dir(path)
    frames = {name: pl.from_arrow(t) for name, t in tables.items()}
    return Run(Path(path), summary, frames["rounds"], frames["events"], frames.get("faults"))
