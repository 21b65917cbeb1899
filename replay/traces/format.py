"""Trace format (versions 1, 2 and 3): writing, reading and validating workload traces.

A trace is an Arrow IPC *file* with one row per guest memory access (``SCHEMA``) and schema metadata
describing the guest (``TraceMeta``). Everything that reads or writes a trace goes through this module:

- ``TraceWriter`` validates what it is given, computes the content digest as it goes, and makes the
  file appear atomically on ``close()``: ``events`` and ``digest`` are only known at the end, and the
  IPC file stores its schema (with the metadata) in front of the data, so the rows first go uncompressed
  to a temporary file, which ``close()`` then streams batch by batch (memory-mapped, zero-copy) into the
  final file under the full metadata, compressing each batch with zstd. A failed or interrupted write
  leaves no file behind (neither the trace nor the temporaries).
- ``open_trace`` memory-maps a trace, checks schema, metadata and version on open, and yields record
  batches lazily and zero-copy, validating each with vectorized numpy checks on views of its buffers
  (this is the engine's hot path). Every problem, including a truncated or corrupt file, is a
  ``TraceError`` whose message is one line naming the file and, where a row is at fault, the batch and
  the global row index.

The digest identifies a trace by content: a 256-bit hash over, for each column in schema order, the
256-bit hash of that column's little-endian values in row order. It is therefore the same whatever the
file name, batch size or compression. The hash is BLAKE3 in version 3 (what writers write) and blake2b in
versions 1 and 2 (read and verified as before): every read recomputes the digest, and blake2b over the
31 bytes of a row capped a validated read at ~41M rows/s on one core, below the engine's speed; BLAKE3
(SIMD) hashes ~10x faster.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import blake3
import numpy as np
import pyarrow as pa

from ..core.errors import TraceError, one_line
from ..core.records import canonical_json, publish_mode
from ..core.validate import load_json, short

FORMAT = "snp-replay-trace"
# Version 2 = version 1 + the ``vcpu_idle`` metadata key (when each vCPU was halted); a trace without idle
# intervals is still written as version 1, so traces that say nothing about activity keep their bytes.
# Version 3 = the content digest in BLAKE3 instead of blake2b (same structure), ``vcpu_idle`` optional; what
# writers write. Versions 1 and 2 (blake2b) are still read and verified as before, and written on request.
VERSION = 3
VERSIONS = (1, 2, 3)
PAGE_SIZE = 4096
PAGE_SHIFT = 12
MAX_VCPUS = 1 << 16  # the vcpu column is uint16
DEFAULT_BATCH_ROWS = 1 << 20
COMPRESSIONS = ("zstd", None)

SCHEMA = pa.schema(
    [
        pa.field("t_ns", pa.uint64(), nullable=False),
        pa.field("vcpu", pa.uint16(), nullable=False),
        pa.field("gpa", pa.uint64(), nullable=False),
        pa.field("len", pa.uint32(), nullable=False),
        pa.field("op", pa.uint8(), nullable=False),
        pa.field("value", pa.uint64(), nullable=False),
    ]
)
COLUMNS = tuple(SCHEMA.names)
# Little-endian numpy dtypes of the columns, in schema order (the digest hashes these bytes).
DTYPES = tuple(np.dtype(f.type.to_pandas_dtype()).newbyteorder("<") for f in SCHEMA)
METADATA_KEYS = ("format", "version", "page_size", "guest_bytes", "vcpus", "shared_ranges", "source", "events", "digest")
# Optional in format v1 (written since issue 14; traces written before lack it and are read as before).
META_DIGEST_KEY = "meta_digest"
# Version 2's key: per vCPU, the intervals of trace time during which it was idle (halted, demanding no CPU).
IDLE_KEY = "vcpu_idle"
MAX_IDLE_INTERVALS = 1 << 22  # over all vCPUs: the metadata stays a few tens of MiB at most
MAX_OP = 3
OP_NAMES = ("WRITE", "READ", "TO_SHARED", "TO_PRIVATE")

_ARROW_MAGIC = b"ARROW1"


@dataclass(frozen=True)
class TraceMeta:
    """What a trace's schema metadata says about it (all integers and strings, no floats)."""

    path: str
    guest_bytes: int
    vcpus: int
    shared_ranges: tuple[tuple[int, int], ...]  # inclusive [first_gfn, last_gfn], sorted, disjoint
    source: dict = field(hash=False)
    events: int
    digest: str
    page_size: int = PAGE_SIZE
    # Per vCPU, a flat tuple (start0, end0, start1, end1, ...) of half-open idle intervals [start, end) in
    # trace time, sorted and disjoint; None: the trace says nothing about activity (version 1).
    vcpu_idle: tuple[tuple[int, ...], ...] | None = field(default=None, hash=False, compare=False)
    # The content digest's hash: "blake3" (version 3) or "blake2b" (versions 1 and 2).
    digest_hash: str = field(default="blake3", hash=False, compare=False)

    @property
    def version(self) -> int:
        if self.digest_hash == "blake3":
            return 3
        return 1 if self.vcpu_idle is None else 2

    @property
    def npages(self) -> int:
        return self.guest_bytes // self.page_size

    @property
    def has_private(self) -> bool:
        """Whether any page starts private (not every page lies in ``shared_ranges``)."""
        return sum(last - first + 1 for first, last in self.shared_ranges) < self.npages

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "format": FORMAT,
            "version": self.version,
            "page_size": self.page_size,
            "guest_bytes": self.guest_bytes,
            "vcpus": self.vcpus,
            "shared_ranges": [list(r) for r in self.shared_ranges],
            "source": self.source,
            "events": self.events,
            "digest": self.digest,
            **({} if self.vcpu_idle is None else {"idle_intervals": sum(len(x) // 2 for x in self.vcpu_idle)}),
        }


# ----------------------------------------------------------------------------------------------------
# Validation shared by the writer and the reader


def _check_guest(where: str, guest_bytes: Any, vcpus: Any) -> tuple[int, int]:
    if isinstance(guest_bytes, bool) or not isinstance(guest_bytes, int) or guest_bytes <= 0 or guest_bytes % PAGE_SIZE:
        raise TraceError(f"{where}: guest_bytes {short(guest_bytes)} must be a positive multiple of {PAGE_SIZE}")
    if guest_bytes >= 1 << 64:
        raise TraceError(f"{where}: guest_bytes {guest_bytes} does not fit in 64 bits")
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= MAX_VCPUS:
        raise TraceError(f"{where}: vcpus {short(vcpus)} must be an integer in 1..{MAX_VCPUS}")
    return guest_bytes, vcpus


def _check_ranges(where: str, ranges: Any, npages: int) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    if not isinstance(ranges, (list, tuple)):
        raise TraceError(f"{where}: shared_ranges must be a list of [first_gfn, last_gfn]")
    for r in ranges:
        if (
            not isinstance(r, (list, tuple))
            or len(r) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        ):
            raise TraceError(f"{where}: shared_ranges entry {short(r)} is not [first_gfn, last_gfn]")
        first, last = r
        if not 0 <= first <= last < npages:
            raise TraceError(f"{where}: shared_ranges entry [{first}, {last}] outside gfn 0..{npages - 1}")
        if out and first <= out[-1][1]:
            raise TraceError(f"{where}: shared_ranges must be sorted and disjoint ([{first}, {last}] after {list(out[-1])})")
        out.append((first, last))
    return tuple(out)


def _check_idle(where: str, idle: Any, vcpus: int) -> tuple[tuple[int, ...], ...]:
    """Per-vCPU idle intervals: a list of ``vcpus`` entries, each a flat list [start, end, ...] of sorted,
    disjoint, non-empty half-open intervals in ns (0 <= start < end < 2^64; adjacent ones merged), or the
    index of an earlier vCPU whose list it shares (so a periodic pattern common to every vCPU is written
    once)."""
    if not isinstance(idle, (list, tuple)) or len(idle) != vcpus:
        raise TraceError(f"{where}: {IDLE_KEY} must be a list of {vcpus} entries (one per vCPU)")
    out: list[tuple[int, ...]] = []
    total = 0
    for v, iv in enumerate(idle):
        if isinstance(iv, int) and not isinstance(iv, bool):
            if not 0 <= iv < v or isinstance(idle[iv], int):
                raise TraceError(f"{where}: {IDLE_KEY}[{v}] refers to vCPU {iv}: only an earlier vCPU's own list")
            out.append(out[iv])
            continue
        if not isinstance(iv, (list, tuple)) or len(iv) % 2:
            raise TraceError(f"{where}: {IDLE_KEY}[{v}] must be a flat list [start, end, ...] of even length")
        total += len(iv) // 2
        if total > MAX_IDLE_INTERVALS:
            raise TraceError(f"{where}: {IDLE_KEY} holds more than {MAX_IDLE_INTERVALS} intervals")
        prev_end = -1
        for i in range(0, len(iv), 2):
            a, b = iv[i], iv[i + 1]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b)):
                raise TraceError(f"{where}: {IDLE_KEY}[{v}] interval {i // 2} is not two integers")
            if not 0 <= a < b < 1 << 64:
                raise TraceError(f"{where}: {IDLE_KEY}[{v}] interval {i // 2} [{a}, {b}) is empty or outside 0..2^64-1")
            if a <= prev_end:
                raise TraceError(f"{where}: {IDLE_KEY}[{v}] interval {i // 2} [{a}, {b}) overlaps or touches the one "
                                 "before (intervals must be sorted, disjoint and merged)")
            prev_end = b
        out.append(tuple(iv))
    return tuple(out)


def _idle_json(idle: tuple[tuple[int, ...], ...]) -> str:
    """Canonical text of ``vcpu_idle``: a vCPU whose list equals an earlier one's refers to it."""
    first: dict[tuple[int, ...], int] = {}
    items: list[Any] = []
    for v, iv in enumerate(idle):
        if iv in first:
            items.append(first[iv])
        else:
            first[iv] = v
            items.append(list(iv))
    return json.dumps(items, separators=(",", ":"))


def _find_violation(
    cols: Sequence[np.ndarray], prev_t: int | None, guest_bytes: int, vcpus: int
) -> tuple[int, str] | None:
    """The first bad row of a chunk (offset within it, message), or None. Vectorized: cheap reductions
    first; only a failing check pays for locating its row. Among several, the earliest row wins."""
    t, vcpu, gpa, ln, op = cols[0], cols[1], cols[2], cols[3], cols[4]
    n = t.shape[0]
    if n == 0:
        return None
    found: list[tuple[int, str]] = []
    if prev_t is not None and int(t[0]) < prev_t:
        found.append((0, f"t_ns {int(t[0])} < previous {prev_t} (t_ns must be non-decreasing)"))
    elif n > 1:
        dec = t[1:] < t[:-1]
        if dec.any():
            i = int(dec.argmax()) + 1
            found.append((i, f"t_ns {int(t[i])} < previous {int(t[i - 1])} (t_ns must be non-decreasing)"))
    if int(vcpu.max()) >= vcpus:
        i = int((vcpu >= vcpus).argmax())
        found.append((i, f"vcpu {int(vcpu[i])} out of range (trace has {vcpus} vcpus)"))
    lmin, lmax = int(ln.min()), int(ln.max())
    if lmin < 1:
        i = int((ln == 0).argmax())
        found.append((i, "len 0 (len must be >= 1)"))
    # Exact in Python integers: gpa + len can overflow uint64, so the slow path compares gpa with
    # guest_bytes - len instead, after ruling out len > guest_bytes.
    if int(gpa.max()) + lmax > guest_bytes:
        g = np.uint64(guest_bytes)
        ln64 = ln.astype(np.uint64)
        bad = (ln64 > g) | (gpa > g - ln64)
        if bad.any():
            i = int(bad.argmax())
            end = int(gpa[i]) + int(ln[i])
            found.append((i, f"gpa {int(gpa[i]):#x} + len {int(ln[i])} = {end:#x} beyond guest_bytes {guest_bytes:#x}"))
    if int(op.max()) > MAX_OP:
        i = int((op > MAX_OP).argmax())
        found.append((i, f"unknown op {int(op[i])} (0 WRITE, 1 READ, 2 TO_SHARED, 3 TO_PRIVATE)"))
    if not found:
        return None
    return min(found, key=lambda f: f[0])  # stable: ties keep check order


def _le(a: np.ndarray) -> np.ndarray:
    """``a`` as little-endian bytes (a no-op view on little-endian machines)."""
    if sys.byteorder == "little" or a.dtype.byteorder in ("<", "|"):
        return a
    return a.astype(a.dtype.newbyteorder("<"))


def _batch_arrays(batch: pa.RecordBatch) -> list[np.ndarray]:
    """Zero-copy numpy views of a batch's columns (array offsets handled by pyarrow)."""
    return [c.to_numpy(zero_copy_only=True) for c in batch.columns]


DIGEST_HASHES = ("blake3", "blake2b")


def _hasher(kind: str) -> Any:
    return blake3.blake3() if kind == "blake3" else hashlib.blake2b(digest_size=32)


def _digest(hashers: Sequence[Any], kind: str) -> str:
    outer = _hasher(kind)
    for h in hashers:
        outer.update(h.digest())
    return outer.hexdigest()


def _hash_into(hashers: Sequence[Any], cols: Sequence[np.ndarray]) -> None:
    for h, c in zip(hashers, cols):
        # Bytes, as blake3 wants them (hashlib takes any buffer); a view, no copy.
        h.update(_le(c).view(np.uint8))


def _new_hashers(kind: str) -> list[Any]:
    return [_hasher(kind) for _ in COLUMNS]


def _metadata(meta: TraceMeta) -> dict[bytes, bytes]:
    md = {
        "format": FORMAT,
        "version": str(VERSION),
        "page_size": str(meta.page_size),
        "guest_bytes": str(meta.guest_bytes),
        "vcpus": str(meta.vcpus),
        "shared_ranges": json.dumps([list(r) for r in meta.shared_ranges], separators=(",", ":")),
        "source": canonical_json(meta.source).decode(),
        "events": str(meta.events),
        "digest": meta.digest,
    }
    md["version"] = str(meta.version)
    if meta.vcpu_idle is not None:
        md[IDLE_KEY] = _idle_json(meta.vcpu_idle)
    md[META_DIGEST_KEY] = meta_digest(md)
    return {k.encode(): v.encode() for k, v in md.items()}


def last_t_ns(reader: "TraceReader") -> int | None:
    """The t_ns of a trace's last row (read from its last non-empty record batch only), or None if empty."""
    for i in range(reader.num_batches - 1, -1, -1):
        b = reader.batch(i)
        if b.num_rows:
            t = b.column("t_ns")[b.num_rows - 1].as_py()
            if t is None:  # a nullable column holding a null: the trace is bad, whoever peeks first says so
                raise TraceError(f"{reader.path}: batch {i}, row {b.num_rows - 1} of the batch: null in column t_ns")
            return int(t)
    return None


def meta_digest(md: dict[str, str]) -> str:
    """blake2b-256 over the metadata keys of format v1 (name, NUL, value, NUL each, in METADATA_KEYS
    order, then ``vcpu_idle`` where the trace has it: always in v2, optionally in v3): the rows have
    ``digest``, this covers what describes them (guest size, vCPUs, shared ranges, source, events, digest),
    so that a changed digit there is an error too. blake2b in every version: it hashes a few hundred bytes."""
    h = hashlib.blake2b(digest_size=32)
    idle = md.get("version") == "2" or (md.get("version") == "3" and IDLE_KEY in md)
    for key in METADATA_KEYS + ((IDLE_KEY,) if idle else ()):
        h.update(key.encode() + b"\0" + md[key].encode() + b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Writer


class TraceWriter:
    """Write a trace; the file appears atomically on ``close()`` (a context manager).

    ``write`` takes numpy arrays (or scalars, broadcast) of equal length, ``write_batch`` a record batch
    with ``SCHEMA``. Rows are re-batched into ``batch_rows``-row record batches, so the output does not
    depend on how the caller chunked its calls. Any invalid input raises ``TraceError`` (same rules and
    messages as the reader) and aborts the writer: nothing is left on disk.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        guest_bytes: int,
        vcpus: int,
        shared_ranges: Sequence[Sequence[int]] = (),
        source: dict,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        compression: str | None = "zstd",
        vcpu_idle: Sequence[Sequence[int]] | None = None,
        version: int = VERSION,
    ):
        self.path = Path(path)
        self._name = str(path)
        self.guest_bytes, self.vcpus = _check_guest(self._name, guest_bytes, vcpus)
        self.shared_ranges = _check_ranges(self._name, shared_ranges, guest_bytes // PAGE_SIZE)
        if not isinstance(source, dict):
            raise TraceError(f"{self._name}: source must be a dict, not {type(source).__name__}")
        try:
            canonical_json(source)
        except (TypeError, ValueError) as exc:
            raise TraceError(f"{self._name}: source is not canonical JSON: {exc}") from None
        self.source = source
        self.vcpu_idle: tuple[tuple[int, ...], ...] | None = None
        if vcpu_idle is not None:
            self.set_vcpu_idle(vcpu_idle)
        if compression == "none":
            compression = None
        if compression not in COMPRESSIONS:
            raise TraceError(f"{self._name}: compression must be 'zstd' or None, not {short(compression)}")
        self.compression = compression
        if not isinstance(batch_rows, int) or batch_rows < 1:
            raise TraceError(f"{self._name}: batch_rows must be a positive integer")
        self.batch_rows = batch_rows
        # 3: BLAKE3 digest. 1 or 2 (the old formats, for tools that read only those): blake2b, written as
        # version 2 if the trace has idle intervals, else version 1.
        if version not in VERSIONS:
            raise TraceError(f"{self._name}: version must be one of {', '.join(map(str, VERSIONS))}, not {short(version)}")
        self.digest_hash = "blake3" if version == 3 else "blake2b"

        self.rows = 0  # rows accepted so far (validated, hashed)
        self._prev_t: int | None = None
        self._hashers = _new_hashers(self.digest_hash)
        self._pool: ThreadPoolExecutor | None = None
        self._hash_job: Future | None = None
        self._pending: list[list[np.ndarray]] = []
        self._pending_rows = 0
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._sink: pa.NativeFile | None = None
        self._state = "open"
        self._tmp1: str | None = None
        self._tmp2: str | None = None
        fd, self._tmp1 = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".pass1.tmp", dir=self.path.parent or ".")
        os.close(fd)
        try:
            self._sink = pa.OSFile(self._tmp1, "wb")
            self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        except BaseException:
            self.abort()
            raise

    def set_vcpu_idle(self, vcpu_idle: Sequence[Sequence[int]] | None) -> None:
        """Per-vCPU idle intervals (see ``TraceMeta.vcpu_idle``), known to a recorder only at its end: any time
        before ``close()``. A trace with them is written as version 2."""
        try:
            self.vcpu_idle = None if vcpu_idle is None else _check_idle(self._name, vcpu_idle, self.vcpus)
        except TraceError:
            self.abort()
            raise

    # -- context manager ---------------------------------------------------------------------------
    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()

    def __del__(self) -> None:  # a writer dropped without close() leaves nothing behind
        with contextlib.suppress(Exception):
            if getattr(self, "_state", None) == "open":
                self.abort()

    # -- input -------------------------------------------------------------------------------------
    def _fail(self, msg: str) -> TraceError:
        self.abort()
        return TraceError(msg)

    def _where(self, row: int) -> str:
        return f"{self._name}: batch {row // self.batch_rows}, row {row}"

    def write(self, t_ns, vcpu, gpa, len, op, value) -> None:  # noqa: A002 - the column is called len
        """Append rows given as columns (numpy arrays of equal length; scalars are broadcast)."""
        if self._state != "open":
            raise TraceError(f"{self._name}: write after the writer was {self._state}")
        raw = (t_ns, vcpu, gpa, len, op, value)
        n = None
        for x in raw:
            if np.ndim(x) > 1:
                raise self._fail(f"{self._where(self.rows)}: columns must be one-dimensional")
            if np.ndim(x) == 1:
                if n is None:
                    n = np.shape(x)[0]
                elif np.shape(x)[0] != n:
                    lengths = [np.shape(y)[0] if np.ndim(y) else "scalar" for y in raw]
                    raise self._fail(f"{self._where(self.rows)}: columns of unequal length {lengths}")
        if n is None:
            n = 1
        cols = []
        for name, dt, x in zip(COLUMNS, DTYPES, raw):
            cols.append(self._coerce(name, dt, x, n))
        self._accept(cols, n)

    def _coerce(self, name: str, dt: np.dtype, x: Any, n: int) -> np.ndarray:
        a = np.asarray(x)
        if a.dtype == dt:
            out = a
        elif a.dtype.kind in "ui":
            # Range-check before narrowing: a silent wrap-around would turn -1 into a valid-looking value.
            if a.size:
                lo, hi = int(a.min()), int(a.max())
                info = np.iinfo(dt)
                if lo < 0 or hi > info.max:
                    bad = lo if lo < 0 else hi
                    i = int(np.argmax(a == bad)) if a.ndim else 0
                    raise self._fail(f"{self._where(self.rows + i)}: {name} {bad} does not fit in {dt.name}")
            out = a.astype(dt)
        else:
            raise self._fail(f"{self._where(self.rows)}: column {name} has dtype {a.dtype}, expected an integer array")
        if out.ndim == 0:
            out = np.full(n, out, dtype=dt)
        return np.ascontiguousarray(out)

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Append a record batch with ``SCHEMA`` (field names and types; it may be a slice)."""
        if self._state != "open":
            raise TraceError(f"{self._name}: write after the writer was {self._state}")
        if not isinstance(batch, pa.RecordBatch):
            raise self._fail(f"{self._where(self.rows)}: write_batch needs a pyarrow.RecordBatch, not {type(batch).__name__}")
        problem = _schema_problem(batch.schema)
        if problem:
            raise self._fail(f"{self._where(self.rows)}: {problem}")
        for name, col in zip(COLUMNS, batch.columns):
            if col.null_count:
                i = int(np.asarray(col.is_null()).argmax())
                raise self._fail(f"{self._where(self.rows + i)}: null in column {name}")
        self._accept(_batch_arrays(batch), batch.num_rows)

    def _accept(self, cols: list[np.ndarray], n: int) -> None:
        if n == 0:
            return
        bad = _find_violation(cols, self._prev_t, self.guest_bytes, self.vcpus)
        if bad is not None:
            raise self._fail(f"{self._where(self.rows + bad[0])}: {bad[1]}")
        self._prev_t = int(cols[0][-1])
        self.rows += n
        # Own the rows: callers (generators) may reuse their buffers once write() returns.
        owned = [np.array(c, copy=True) for c in cols]
        # Hash in a helper thread (hashlib releases the GIL), overlapping the caller's next chunk;
        # at most one job in flight, so updates stay in row order.
        self._wait_hash()
        self._hash_job = self._hash_pool().submit(_hash_into, self._hashers, owned)
        self._pending.append(owned)
        self._pending_rows += n
        try:
            while self._pending_rows >= self.batch_rows:
                self._flush(self.batch_rows)
        except BaseException:
            self.abort()
            raise

    def _hash_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-digest")
        return self._pool

    def _wait_hash(self) -> None:
        if self._hash_job is not None:
            job, self._hash_job = self._hash_job, None
            job.result()

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` pending rows as one record batch of the temporary file."""
        take: list[list[np.ndarray]] = []
        got = 0
        while got < rows:
            cols = self._pending[0]
            k = cols[0].shape[0]
            if got + k <= rows:
                take.append(cols)
                self._pending.pop(0)
                got += k
            else:
                cut = rows - got
                take.append([c[:cut] for c in cols])
                self._pending[0] = [c[cut:] for c in cols]
                got = rows
        self._pending_rows -= rows
        merged = take[0] if len(take) == 1 else [np.concatenate([t[j] for t in take]) for j in range(len(COLUMNS))]
        arrays = [pa.array(c, type=f.type) for c, f in zip(merged, SCHEMA)]
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=SCHEMA))

    # -- output ------------------------------------------------------------------------------------
    def close(self) -> TraceMeta:
        """Finish the trace: rewrite it with full metadata (compressed) and move it into place."""
        if self._state != "open":
            raise TraceError(f"{self._name}: close after the writer was {self._state}")
        try:
            if self._pending_rows:
                self._flush(self._pending_rows)
            self._wait_hash()
            self._shutdown_pool()
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None
            meta = TraceMeta(
                path=str(self.path),
                guest_bytes=self.guest_bytes,
                vcpus=self.vcpus,
                shared_ranges=self.shared_ranges,
                source=self.source,
                events=self.rows,
                digest=_digest(self._hashers, self.digest_hash),
                vcpu_idle=self.vcpu_idle,
                digest_hash=self.digest_hash,
            )
            fd, self._tmp2 = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent or ".")
            os.close(fd)
            codec = pa.Codec("zstd", compression_level=1) if self.compression else None  # fast; reading dominates
            options = pa.ipc.IpcWriteOptions(compression=codec, use_threads=True)
            with pa.memory_map(self._tmp1, "r") as src:
                reader = pa.ipc.open_file(src)
                with pa.OSFile(self._tmp2, "wb") as dst:
                    with pa.ipc.new_file(dst, SCHEMA.with_metadata(_metadata(meta)), options=options) as w:
                        for i in range(reader.num_record_batches):
                            w.write_batch(reader.get_batch(i))
            fd = os.open(self._tmp2, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            publish_mode(self._tmp2)
            os.replace(self._tmp2, self.path)
            self._tmp2 = None
            os.unlink(self._tmp1)
            self._tmp1 = None
            self._state = "closed"
            self.meta = meta
            return meta
        except BaseException:
            self.abort()
            raise

    def _shutdown_pool(self) -> None:
        # wait=False: abort() also runs from __del__, where joining a thread can deadlock (see TraceReader);
        # the pool's jobs were all awaited before (close) or are moot (abort).
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def abort(self) -> None:
        """Discard everything written so far (no file appears). Safe to call more than once."""
        if self._state == "closed":
            return
        self._state = "aborted"
        for obj in (self._writer, self._sink):
            with contextlib.suppress(Exception):
                if obj is not None:
                    obj.close()
        self._writer = self._sink = None
        self._pending = []
        with contextlib.suppress(Exception):
            self._wait_hash()
        self._shutdown_pool()
        for tmp in (self._tmp1, self._tmp2):
            if tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        self._tmp1 = self._tmp2 = None


# ----------------------------------------------------------------------------------------------------
# Reader


def _schema_problem(schema: pa.Schema) -> str | None:
    """Column names and types; a column declared nullable is fine (ordinary pyarrow, pandas and polars code
    writes them so): each batch is checked to hold no nulls."""
    names = list(schema.names)
    if names != list(COLUMNS):
        return f"schema: columns {names}, expected {list(COLUMNS)}"
    for got, want in zip(schema, SCHEMA):
        if got.type != want.type:
            return f"schema: column {got.name} is {got.type}, expected {want.type}"
    return None


def _int_key(name: str, md: dict[str, str], key: str, lo: int = 0) -> int:
    text = md[key]
    try:
        value = int(text)
    except ValueError:
        raise TraceError(f"{name}: metadata: {key} {short(text)} is not an integer") from None
    if value < lo or text.strip() != str(value):
        raise TraceError(f"{name}: metadata: {key} {short(text)} is not an integer >= {lo}")
    return value


def _parse_meta(name: str, path: str, schema: pa.Schema) -> TraceMeta:
    raw = schema.metadata or {}
    try:
        md = {k.decode(): v.decode() for k, v in raw.items()}
    except UnicodeDecodeError:
        raise TraceError(f"{name}: metadata: not UTF-8") from None
    missing = [k for k in METADATA_KEYS if k not in md]
    if md.get("format") != FORMAT and "format" in md:
        raise TraceError(f"{name}: metadata: format {short(md['format'])} is not {FORMAT!r} (not a snp-replay trace)")
    if missing:
        raise TraceError(f"{name}: metadata: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if md["version"] not in tuple(str(v) for v in VERSIONS):
        raise TraceError(f"{name}: metadata: unsupported trace version {short(md['version'])} (this tool reads versions "
                         f"{', '.join(str(v) for v in VERSIONS)})")
    if md["version"] == "2" and IDLE_KEY not in md:  # v3 may have it or not
        raise TraceError(f"{name}: metadata: version 2 without its key {IDLE_KEY}")
    if md["version"] == "1" and IDLE_KEY in md:
        raise TraceError(f"{name}: metadata: {IDLE_KEY} in a version 1 trace (it needs version 2)")
    if META_DIGEST_KEY in md and md[META_DIGEST_KEY] != meta_digest(md):
        raise TraceError(f"{name}: metadata: meta_digest does not match the metadata (it was changed after the "
                         "trace was written)")
    page_size = _int_key(name, md, "page_size", 1)
    if page_size != PAGE_SIZE:
        raise TraceError(f"{name}: metadata: page_size {short(page_size)} unsupported (only {PAGE_SIZE})")
    guest_bytes = _int_key(name, md, "guest_bytes", 1)
    vcpus = _int_key(name, md, "vcpus", 1)
    _check_guest(f"{name}: metadata", guest_bytes, vcpus)
    # Depth-bounded, no NaN/Infinity (replay.core.validate.load_json), so no RecursionError reaches the user.
    ranges = load_json(md["shared_ranges"], f"{name}: metadata: shared_ranges", TraceError)
    shared = _check_ranges(f"{name}: metadata", ranges, guest_bytes // PAGE_SIZE)
    source = load_json(md["source"], f"{name}: metadata: source", TraceError)
    if not isinstance(source, dict):
        raise TraceError(f"{name}: metadata: source is not a JSON object")
    try:
        canonical_json(source)  # run records embed it: integers and strings only, as the writer requires
    except (TypeError, ValueError):
        raise TraceError(f"{name}: metadata: source holds a float (traces record integers only)") from None
    events = _int_key(name, md, "events")
    digest = md["digest"]
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise TraceError(f"{name}: metadata: digest {short(digest)} is not 64 lowercase hex digits")
    idle = None
    if IDLE_KEY in md:
        idle = _check_idle(f"{name}: metadata", load_json(md[IDLE_KEY], f"{name}: metadata: {IDLE_KEY}", TraceError), vcpus)
    return TraceMeta(
        path=path, guest_bytes=guest_bytes, vcpus=vcpus, shared_ranges=shared, source=source,
        events=events, digest=digest, page_size=page_size, vcpu_idle=idle,
        digest_hash="blake3" if md["version"] == "3" else "blake2b",
    )


class TraceReader:
    """An open trace: ``meta``, ``num_batches``, and lazy validated iteration over its record batches.

    Iterating yields ``(index of the batch's first row, batch)``; batches are zero-copy views of the
    memory-mapped file (uncompressed) or freshly decompressed (zstd). Iteration can be repeated. Every
    full iteration recomputes the content digest (in a helper thread, overlapping the consumer; see
    ``content_digest``) and, with ``verify_digest`` (the default), compares it with the metadata's at the
    end: a changed row is an error naming the file, even where every row is individually valid.
    """

    def __init__(self, path: str | os.PathLike, *, verify_digest: bool = True):
        self.path = str(path)
        self.verify_digest = verify_digest
        self.content_digest: str | None = None  # set by a full iteration
        name = self.path
        from ..core.paths import require_regular

        require_regular(path, TraceError, "trace")  # a FIFO or device would block or never end
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                f.seek(max(0, size - 6))
                tail = f.read(6)
        except IsADirectoryError:
            raise TraceError(f"{name}: is a directory, not a trace file") from None
        except OSError as exc:
            raise TraceError(f"{name}: cannot open: {exc.strerror or exc}") from None
        if size == 0:
            raise TraceError(f"{name}: empty file (not an Arrow IPC trace)")
        if not head.startswith(_ARROW_MAGIC):
            hint = " (an Arrow IPC stream? traces are Arrow IPC files)" if head[:4] == b"\xff\xff\xff\xff" else ""
            raise TraceError(f"{name}: not an Arrow IPC file (bad magic){hint}")
        if tail != _ARROW_MAGIC or size < 12:
            raise TraceError(f"{name}: truncated (no Arrow footer: the file was cut short or never closed)")
        try:
            self._mm = pa.memory_map(self.path, "r")
            self._reader = pa.ipc.open_file(self._mm, options=pa.ipc.IpcReadOptions(use_threads=True))
            schema = self._reader.schema
        except (pa.ArrowException, OSError, ValueError) as exc:
            self.close()
            raise TraceError(f"{name}: corrupt Arrow footer: {one_line(exc, 300)}") from None
        try:
            try:
                problem = _schema_problem(schema)
            except UnicodeDecodeError:
                raise TraceError(f"{name}: schema: a column name is not UTF-8") from None
            if problem:
                raise TraceError(f"{name}: {problem}")
            self.meta = _parse_meta(name, self.path, schema)
        except BaseException:
            self.close()
            raise
        self.num_batches = self._reader.num_record_batches

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        mm = getattr(self, "_mm", None)
        if mm is not None:
            mm.close()
        self._mm = None

    def _read(self, i: int, first_row: int) -> pa.RecordBatch:
        try:
            batch = self._reader.get_batch(i)
            batch.validate()  # buffer sizes against lengths: a corrupt message must not read out of bounds
        except (pa.ArrowException, OSError, ValueError, IndexError) as exc:
            raise TraceError(f"{self.path}: batch {i}, row {first_row}: corrupt record batch: {one_line(exc, 300)}") from None
        return batch

    def batch(self, i: int) -> pa.RecordBatch:
        """Record batch ``i`` alone, read but not validated (for peeking, e.g. the last timestamp)."""
        return self._read(i, -1)

    def __iter__(self) -> Iterator[tuple[int, pa.RecordBatch]]:
        if self._mm is None:
            raise TraceError(f"{self.path}: trace is closed")
        meta = self.meta
        prev_t: int | None = None
        row = 0
        # A file this process has already verified (same device, inode, size, mtime and digest) is not
        # hashed again: a run reads its trace twice (reference and migrated pass), compare three times.
        identity = self._identity()
        skip = self.verify_digest and identity in _VERIFIED
        hashers = None if skip else _new_hashers(meta.digest_hash)
        # Hash batch i in a helper thread (hashlib releases the GIL) while the consumer works on it; one
        # job at a time, so the hashers see the rows in order.
        hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-digest")
        hashing: Future | None = None
        # Read (decompress) batch i+1 in a helper thread while the consumer works on batch i:
        # pyarrow releases the GIL there, and on zstd traces decompression is the reader's main cost.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-read") if self.num_batches > 1 else None
        ahead: Future | None = None
        try:
            for i in range(self.num_batches):
                if ahead is not None:
                    job, ahead = ahead, None
                    batch = job.result()
                else:
                    batch = self._read(i, row)
                n = batch.num_rows
                if pool is not None and i + 1 < self.num_batches:
                    ahead = pool.submit(self._read, i + 1, row + n)
                prev_t = self._check(i, row, batch, prev_t)
                if hashing is not None:
                    job, hashing = hashing, None
                    job.result()
                if batch.num_rows and hashers is not None:
                    hashing = hash_pool.submit(_hash_into, hashers, _batch_arrays(batch))
                yield row, batch
                row += n
            if hashing is not None:
                job, hashing = hashing, None
                job.result()
        finally:
            # Never join a thread here: an abandoned reader is closed by the garbage collector, which can run
            # inside another thread's start-up while it holds the interpreter's thread-shutdown lock, and a
            # join there waits on that lock forever (seen: a run hung in Thread.start). The jobs are awaited
            # (no thread lock involved); the idle workers then exit on their own.
            if ahead is not None:
                with contextlib.suppress(BaseException):
                    ahead.result()
            if pool is not None:
                pool.shutdown(wait=False)
            if hashing is not None:
                with contextlib.suppress(BaseException):
                    hashing.result()
            hash_pool.shutdown(wait=False)
        if row != meta.events:
            raise TraceError(
                f"{self.path}: batch {self.num_batches}, row {row}: file has {row} rows but metadata says events={meta.events}"
            )
        self.content_digest = meta.digest if hashers is None else _digest(hashers, meta.digest_hash)
        if self.verify_digest and self.content_digest != meta.digest:
            raise TraceError(f"{self.path}: content digest {self.content_digest[:16]}... does not match the metadata's "
                             f"{meta.digest[:16]}... (the file was changed after it was written)")
        if self.verify_digest and identity is not None:
            if len(_VERIFIED) >= 64:
                _VERIFIED.clear()
            _VERIFIED.add(identity)

    def _identity(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, self.meta.digest)

    def _check(self, i: int, row: int, batch: pa.RecordBatch, prev_t: int | None) -> int | None:
        """Validate batch ``i`` (first row ``row``) against the rows before it; the new previous t_ns."""
        if not batch.num_rows:
            return prev_t
        for name, col in zip(COLUMNS, batch.columns):
            if col.null_count:
                j = int(np.asarray(col.is_null()).argmax())
                raise TraceError(f"{self.path}: batch {i}, row {row + j}: null in column {name}")
        cols = _batch_arrays(batch)
        bad = _find_violation(cols, prev_t, self.meta.guest_bytes, self.meta.vcpus)
        if bad is not None:
            raise TraceError(f"{self.path}: batch {i}, row {row + bad[0]}: {bad[1]}")
        return int(cols[0][-1])


# Traces whose content digest this process has verified (see TraceReader.__iter__).
_VERIFIED: set[tuple] = set()


def open_trace(path: str | os.PathLike, *, verify_digest: bool = True) -> TraceReader:
    """Open a trace (schema, metadata and version checked now; rows checked as batches are read, and the
    content digest at the end of a full read)."""
    return TraceReader(path, verify_digest=verify_digest)


def read_meta(path: str | os.PathLike) -> TraceMeta:
    """A trace's metadata, checked, without reading its rows."""
    with TraceReader(path) as r:
        return r.meta


def compute_digest(path: str | os.PathLike) -> str:
    """Recompute a trace's content digest from its rows (validating them, but not comparing the result
    with the metadata's digest: this is how that digest is checked)."""
    with TraceReader(path, verify_digest=False) as r:
        for _ in r:
            pass
        return r.content_digest
