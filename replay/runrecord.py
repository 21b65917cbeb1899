"""Run directories: how a migration run is recorded, and how tools read one back.

A run directory holds ``summary.json`` (canonical JSON: format, version, status, the fully resolved
scenario, trace identity, metrics, digests), ``rounds.arrow`` (one row per migration round),
``events.arrow`` (the migration event log) and, for post-copy runs, ``faults.arrow`` (one row per
remote page fault). The directory appears atomically. Readers (tools/diff, reports) go through
``load_run``, which rejects anything malformed or of a version it does not understand with a one-line
``RunDirError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from .errors import RunDirError
from .records import atomic_dir, canonical_json

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


def _write_table(path: Path, table: pa.Table, schema: pa.Schema) -> None:
    table = table.cast(schema) if table.schema != schema else table
    # Uncompressed, one batch: byte-identical output for identical tables on any machine.
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, schema) as writer:
        writer.write_table(table.combine_chunks(), max_chunksize=max(1, table.num_rows))


def write_run(
    out_dir: str | Path,
    summary: dict,
    rounds: pa.Table,
    events: pa.Table,
    faults: pa.Table | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a complete run directory atomically (an existing one at ``out_dir`` is replaced)."""
    if summary.get("format") != RUN_FORMAT or summary.get("version") != RUN_VERSION:
        raise ValueError("summary must carry format/version")
    if summary.get("status") not in STATUSES:
        raise ValueError(f"summary status must be one of {STATUSES}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "summary.json").write_bytes(canonical_json(summary))
        _write_table(tmp / "rounds.arrow", rounds, ROUNDS_SCHEMA)
        _write_table(tmp / "events.arrow", events, EVENTS_SCHEMA)
        if faults is not None:
            _write_table(tmp / "faults.arrow", faults, FAULTS_SCHEMA)
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


def _read_table(path: Path, schema: pa.Schema) -> pl.DataFrame:
    try:
        with pa.memory_map(str(path)) as source:
            table = ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise RunDirError(f"{path}: not a readable Arrow file ({' '.join(str(exc).split())})") from None
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise RunDirError(f"{path}: missing column(s) {', '.join(missing)}")
    return pl.from_arrow(table.select(schema.names))


def load_run(path: str | Path) -> Run:
    """Read a run directory, validating format, version and the presence of every part."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: not a run directory (does not exist or is not a directory)")
    summary_path = path / "summary.json"
    try:
        summary = json.loads(summary_path.read_bytes())
    except FileNotFoundError:
        raise RunDirError(f"{path}: no summary.json (not a run directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{summary_path}: malformed JSON ({exc})") from None
    if not isinstance(summary, dict) or summary.get("format") != RUN_FORMAT:
        raise RunDirError(f"{summary_path}: format is not {RUN_FORMAT!r}")
    if summary.get("version") != RUN_VERSION:
        raise RunDirError(
            f"{summary_path}: run record version {summary.get('version')!r} is not understood "
            f"(this tool reads version {RUN_VERSION})"
        )
    for key in ("status", "strategy", "mode", "scenario", "trace", "metrics", "digests"):
        if key not in summary:
            raise RunDirError(f"{summary_path}: missing key {key!r}")
    rounds = _read_table(path / "rounds.arrow", ROUNDS_SCHEMA)
    events = _read_table(path / "events.arrow", EVENTS_SCHEMA)
    faults_path = path / "faults.arrow"
    faults = _read_table(faults_path, FAULTS_SCHEMA) if faults_path.exists() else None
    return Run(path, summary, rounds, events, faults)
