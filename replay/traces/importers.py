"""Import traces that other tools produced: CSV or Parquet access lists, and page-granular dirty logs.

``replay import csv|parquet IN --out FILE``: one row per access. Columns are found by name, renamed with
``--columns t_ns=ts,gpa=addr,...`` (trace column = input column). ``t_ns`` and ``gpa`` are required;
``len`` defaults to 8, ``op`` to WRITE, ``vcpu`` to 0 and ``value`` to the row's content seed (its row
index in the trace for a WRITE, as the recorder does). Integers may be written in decimal or ``0x`` hex;
``op`` may also be a name (``write``/``w``, ``read``/``r``, ``to_shared``, ``to_private``).

``replay import dirtylog IN --out FILE``: one row per (interval, page) that was dirty in that interval, as
QEMU's dirty-rate tooling or a KVM dirty-ring dump gives it (CSV or Parquet, detected from the content).
Time comes from ``t_ns`` (start of the interval, in ns) or ``interval`` (an index; needs
``--interval-ns``); the page from ``gfn`` or ``gpa`` (rounded down to its page); ``vcpu`` is optional.
Each row becomes one 4 KiB WRITE. The n pages of one interval are spread evenly over it in input order:
the k-th at ``start + k * interval_ns // n`` (all at ``start`` for ``t_ns`` logs without
``--interval-ns``): a dirty log says *that* a page was written in an interval, not when, and spreading is
closer to a running guest than a burst at the interval's start. Deterministic either way.

Inputs are streamed batch by batch (pyarrow's streaming CSV reader, Parquet ``iter_batches``) in two
passes: the first validates and finds the guest size and vCPU count, the second converts and writes. The
input must be sorted by time; ``--sort`` sorts it instead, which loads it whole into memory. Every problem
is a one-line ``TraceError`` naming the input file and the row (0-based data row; CSV also gives the line),
and no output file is left behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.errors import TraceError, UsageError, one_line
from .lackey import GUEST_ALIGN, content_seeds, round_up
from ..model.snp import Op
from ..core.validate import MAX_GUEST_BYTES, clip, short

FORMATS = ("csv", "parquet", "dirtylog")
ACCESS_COLUMNS = ("t_ns", "vcpu", "gpa", "len", "op", "value")
DIRTYLOG_COLUMNS = ("t_ns", "interval", "gfn", "gpa", "vcpu")
DEFAULT_LEN = 8
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
U64_MAX = (1 << 64) - 1
_OP_NAMES = {
    "0": Op.WRITE, "w": Op.WRITE, "write": Op.WRITE, "s": Op.WRITE, "m": Op.WRITE,
    "1": Op.READ, "r": Op.READ, "read": Op.READ, "l": Op.READ,
    "2": Op.TO_SHARED, "to_shared": Op.TO_SHARED, "shared": Op.TO_SHARED,
    "3": Op.TO_PRIVATE, "to_private": Op.TO_PRIVATE, "private": Op.TO_PRIVATE,
}


@dataclass(frozen=True)
class ImportOptions:
    """How to read the input (``columns``: trace column -> input column) and what guest to declare."""

    fmt: str
    columns: tuple[tuple[str, str], ...] = ()
    guest_bytes: int | None = None  # default: covers max gpa+len, rounded up to 2 MiB
    vcpus: int | None = None  # default: max vcpu + 1
    sort: bool = False
    interval_ns: int | None = None  # dirtylog only
    batch_rows: int = 1 << 20

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise UsageError(f"import: unknown format {short(self.fmt)} (use {', '.join(FORMATS)})")
        allowed = DIRTYLOG_COLUMNS if self.fmt == "dirtylog" else ACCESS_COLUMNS
        for key, _ in self.columns:
            if key not in allowed:
                raise UsageError(f"--columns: unknown column {short(key)} for {self.fmt} (known: {', '.join(allowed)})")
        if self.interval_ns is not None and (self.fmt != "dirtylog" or not 1 <= self.interval_ns < 1 << 63):
            raise UsageError("--interval-ns: only for dirtylog, and in 1 ns..2^63-1 ns")
        if self.guest_bytes is not None and (self.guest_bytes <= 0 or self.guest_bytes % PAGE_SIZE
                                             or self.guest_bytes > MAX_GUEST_BYTES):
            raise UsageError(f"--guest-size: {short(self.guest_bytes)} is not a positive multiple of {PAGE_SIZE} "
                             f"up to {MAX_GUEST_BYTES} bytes")
        if self.vcpus is not None and not 1 <= self.vcpus <= 1 << 16:
            raise UsageError(f"--vcpus: {self.vcpus} not in 1..65536")


def parse_columns(text: str | None) -> tuple[tuple[str, str], ...]:
    """``"t_ns=ts,gpa=addr"`` -> ``(("t_ns", "ts"), ("gpa", "addr"))``; UsageError on bad syntax."""
    if not text:
        return ()
    out: dict[str, str] = {}
    for item in text.split(","):
        key, eq, name = item.partition("=")
        key, name = key.strip(), name.strip()
        if not eq or not key or not name:
            raise UsageError(f"--columns: {short(item.strip())} is not TRACE_COLUMN=INPUT_COLUMN (e.g. t_ns=ts,gpa=addr)")
        if key in out:
            raise UsageError(f"--columns: {short(key)} mapped twice")
        out[key] = name
    return tuple(out.items())


# --------------------------------------------------------------------------------------------------
# Reading the input


class _Input:
    """An input file read as record batches of the mapped columns, any number of times."""

    def __init__(self, path: str | os.PathLike, kind: str, batch_rows: int) -> None:
        self.path = str(path)
        self.batch_rows = batch_rows
        p = Path(path)
        if not p.exists():
            raise TraceError(f"{self.path}: no such file")
        if p.is_dir():
            raise TraceError(f"{self.path}: is a directory")
        if kind == "auto":
            with open(p, "rb") as f:
                kind = "parquet" if f.read(4) == b"PAR1" else "csv"
        self.kind = kind
        self.names = self._names()

    def _names(self) -> list[str]:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        try:
            if self.kind == "parquet":
                return list(pq.ParquetFile(self.path).schema_arrow.names)
            with pacsv.open_csv(self.path, read_options=pacsv.ReadOptions(block_size=1 << 16)) as r:
                return list(r.schema.names)
        except UnicodeDecodeError as exc:  # pyarrow decodes column names as UTF-8 when it hands them over
            raise TraceError(f"{self.path}: the {'header' if self.kind == 'csv' else 'schema'}'s column names are "
                             f"not UTF-8 (byte {exc.object[exc.start:exc.start + 1]!r} at offset {exc.start})") from None
        except (pa.ArrowException, OSError) as exc:
            raise TraceError(f"{self.path}: cannot read as {self.kind}: {one_line(exc, 300)}") from None

    def where(self, row: int) -> str:
        line = f" (line {row + 2})" if self.kind == "csv" else ""
        return f"{self.path}: row {row}{line}"

    def batches(self, columns: list[str]) -> Iterator[tuple[int, dict[str, pa.Array]]]:
        """(first data row, {input column: array}) batch by batch."""
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        row = 0
        try:
            if self.kind == "parquet":
                source = pq.ParquetFile(self.path).iter_batches(batch_size=self.batch_rows, columns=columns)
            else:
                # Strings: conversion is ours, so that a bad value is reported with its row and hex works.
                source = pacsv.open_csv(
                    self.path,
                    read_options=pacsv.ReadOptions(block_size=16 << 20),
                    convert_options=pacsv.ConvertOptions(
                        include_columns=columns, column_types={c: pa.string() for c in columns}),
                )
            for batch in source:
                yield row, {c: batch.column(c) for c in columns}
                row += batch.num_rows
        except UnicodeDecodeError as exc:
            raise TraceError(f"{self.where(row)}: cannot read {self.kind}: text is not UTF-8 (offset {exc.start})") from None
        except (pa.ArrowException, OSError) as exc:
            raise TraceError(f"{self.where(row)}: cannot read {self.kind}: {one_line(exc, 300)}") from None


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _to_u64(inp: _Input, name: str, col: pa.Array, first_row: int) -> np.ndarray:
    """An input column as uint64: integers, or strings of decimal / 0x-hex integers; rejects the rest."""
    if col.null_count:
        raise TraceError(f"{inp.where(first_row + _first(np.asarray(col.is_null())))}: empty {name}")
    t = col.type
    if pa.types.is_integer(t):
        a = col.to_numpy(zero_copy_only=False)
        if pa.types.is_signed_integer(t) and len(a) and a.min() < 0:
            i = _first(a < 0)
            raise TraceError(f"{inp.where(first_row + i)}: {name} {int(a[i])} is negative")
        return a.astype(np.uint64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            return pc.cast(pc.utf8_trim_whitespace(col), pa.uint64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            pass  # hex, or a bad value: the slow path finds out which, and where
        out = np.empty(len(col), dtype=np.uint64)
        for i, s in enumerate(col.to_pylist()):
            try:
                v = int(s.strip(), 0)
            except ValueError:
                v = -1
            if not 0 <= v <= U64_MAX:
                raise TraceError(f"{inp.where(first_row + i)}: {name} {short(s.strip())} is not an unsigned 64-bit integer")
            out[i] = v
        return out
    raise TraceError(f"{inp.path}: column {name} has type {t}, expected integers")


def _to_op(inp: _Input, col: pa.Array, first_row: int) -> np.ndarray:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        if col.null_count:
            raise TraceError(f"{inp.where(first_row + _first(np.asarray(col.is_null())))}: empty op")
        low = pc.utf8_lower(pc.utf8_trim_whitespace(col))
        uniq = pc.unique(low).to_pylist()
        table = np.empty(len(uniq), dtype=np.uint8)
        for k, s in enumerate(uniq):
            if s not in _OP_NAMES:
                i = _first(np.asarray(pc.equal(low, s)))
                raise TraceError(f"{inp.where(first_row + i)}: unknown op {short(s)} (0/write, 1/read, 2/to_shared, 3/to_private)")
            table[k] = _OP_NAMES[s]
        return table[pc.index_in(low, value_set=pa.array(uniq, type=pa.string())).to_numpy(zero_copy_only=False)]
    a = _to_u64(inp, "op", col, first_row)
    if len(a) and a.max() > Op.TO_PRIVATE:
        i = _first(a > Op.TO_PRIVATE)
        raise TraceError(f"{inp.where(first_row + i)}: unknown op {int(a[i])} (0 WRITE, 1 READ, 2 TO_SHARED, 3 TO_PRIVATE)")
    return a.astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Checks shared by both passes


@dataclass
class _Scan:
    rows: int = 0
    max_end: int = 0
    max_vcpu: int = 0
    prev_t: int | None = None


def _check(inp: _Input, first_row: int, t, vcpu, gpa, ln, scan: _Scan, guest_bytes: int | None,
           vcpus: int | None, sort_hint: bool = True) -> None:
    """Validate converted columns of one batch; update the running scan (time order, extents)."""
    n = len(t)
    if not n:
        return
    if scan.prev_t is not None and int(t[0]) < scan.prev_t:
        bad, prev = 0, scan.prev_t
    else:
        dec = np.flatnonzero(t[1:] < t[:-1])
        bad, prev = (int(dec[0]) + 1, int(t[dec[0]])) if len(dec) else (None, None)
    if bad is not None:
        hint = " (the input must be sorted by time; --sort sorts it in memory)" if sort_hint else ""
        raise TraceError(f"{inp.where(first_row + bad)}: t_ns {int(t[bad])} < previous {prev}{hint}")
    if ln.min() < 1:
        raise TraceError(f"{inp.where(first_row + _first(ln < 1))}: len 0 (len must be >= 1)")
    if ln.max() > 0xFFFFFFFF:
        i = _first(ln > 0xFFFFFFFF)
        raise TraceError(f"{inp.where(first_row + i)}: len {int(ln[i])} does not fit in 32 bits")
    over = gpa > np.uint64(U64_MAX) - (ln - np.uint64(1))
    if over.any():
        raise TraceError(f"{inp.where(first_row + _first(over))}: gpa + len beyond 2^64")
    end = gpa + ln
    if guest_bytes is not None and int(end.max()) > guest_bytes:
        i = _first(end > np.uint64(guest_bytes))
        raise TraceError(f"{inp.where(first_row + i)}: gpa {int(gpa[i]):#x} + len {int(ln[i])} beyond guest size "
                         f"{guest_bytes:#x}")
    if vcpu.max() > 0xFFFF:
        i = _first(vcpu > 0xFFFF)
        raise TraceError(f"{inp.where(first_row + i)}: vcpu {int(vcpu[i])} does not fit in 16 bits")
    if vcpus is not None and int(vcpu.max()) >= vcpus:
        i = _first(vcpu >= np.uint64(vcpus))
        raise TraceError(f"{inp.where(first_row + i)}: vcpu {int(vcpu[i])} out of range (--vcpus {vcpus})")
    scan.prev_t = int(t[-1])
    scan.max_end = max(scan.max_end, int(end.max()))
    scan.max_vcpu = max(scan.max_vcpu, int(vcpu.max()))
    scan.rows += n


def _resolve(col_map: dict[str, str], inp: _Input, keys, required) -> dict[str, str]:
    """Trace column -> input column for ``keys`` present (mapped explicitly, or by the same name)."""
    out: dict[str, str] = {}
    for key in keys:
        name = col_map.get(key, key)
        if name in inp.names:
            out[key] = name
        elif key in col_map:
            raise TraceError(f"{inp.path}: no column {short(name)} (mapped to {key}); columns are {clip(', '.join(inp.names), 120)}")
    for group in required:
        if not any(k in out for k in group):
            want = " or ".join(repr(k) for k in group)
            raise TraceError(f"{inp.path}: no {want} column (columns are {clip(', '.join(inp.names), 120)}; map one with --columns)")
    return out


# --------------------------------------------------------------------------------------------------
# CSV / Parquet access lists


def _access_batches(inp: _Input, cols: dict[str, str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    for first, raw in inp.batches(sorted(set(cols.values()))):
        n = len(next(iter(raw.values())))
        out = {
            "t_ns": _to_u64(inp, "t_ns", raw[cols["t_ns"]], first),
            "gpa": _to_u64(inp, "gpa", raw[cols["gpa"]], first),
            "len": _to_u64(inp, "len", raw[cols["len"]], first) if "len" in cols else np.full(n, DEFAULT_LEN, np.uint64),
            "vcpu": _to_u64(inp, "vcpu", raw[cols["vcpu"]], first) if "vcpu" in cols else np.zeros(n, np.uint64),
            "op": _to_op(inp, raw[cols["op"]], first) if "op" in cols else np.full(n, Op.WRITE, np.uint8),
        }
        if "value" in cols:
            out["value"] = _to_u64(inp, "value", raw[cols["value"]], first)
        yield first, out


def _sorted_in_memory(batches, key: str) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """All batches concatenated and stably sorted by ``key`` (the --sort path: memory-bound)."""
    parts = [b for _, b in batches]
    if not parts:
        return
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cols[key], kind="stable")
    yield 0, {k: v[order] for k, v in cols.items()}


def _import_accesses(inp: _Input, out: str, opts: ImportOptions, source: dict):
    from .format import TraceWriter

    cols = _resolve(dict(opts.columns), inp, ACCESS_COLUMNS, [("t_ns",), ("gpa",)])

    def batches():
        it = _access_batches(inp, cols)
        return _sorted_in_memory(it, "t_ns") if opts.sort else it

    scan = _Scan()
    for first, b in batches():  # pass 1: validate, and find the guest's extent
        _check(inp, first, b["t_ns"], b["vcpu"], b["gpa"], b["len"], scan, opts.guest_bytes, opts.vcpus)
    guest_bytes, vcpus = _guest(inp, scan, opts)
    source["columns"] = cols
    with TraceWriter(out, guest_bytes=guest_bytes, vcpus=vcpus, source=source, batch_rows=opts.batch_rows) as w:
        for first, b in batches():  # pass 2: write (row checks again: the input could have changed)
            value = b["value"] if "value" in b else content_seeds(first, b["op"])
            w.write(b["t_ns"], b["vcpu"], b["gpa"], b["len"], b["op"], value)
        return w.close()


def _guest(inp: _Input, scan: _Scan, opts: ImportOptions) -> tuple[int, int]:
    if not scan.rows:
        raise TraceError(f"{inp.path}: no rows to import")
    guest_bytes = opts.guest_bytes if opts.guest_bytes is not None else round_up(scan.max_end, GUEST_ALIGN)
    vcpus = opts.vcpus if opts.vcpus is not None else scan.max_vcpu + 1
    return guest_bytes, vcpus


# --------------------------------------------------------------------------------------------------
# Dirty logs


def _dirty_batches(inp: _Input, cols: dict[str, str], opts: ImportOptions):
    """(first row, start time of each row's interval, gfn, vcpu) per batch."""
    for first, raw in inp.batches(sorted(set(cols.values()))):
        n = len(next(iter(raw.values())))
        if "t_ns" in cols:
            start = _to_u64(inp, "t_ns", raw[cols["t_ns"]], first)
        else:
            idx = _to_u64(inp, "interval", raw[cols["interval"]], first)
            if len(idx) and int(idx.max()) * opts.interval_ns > U64_MAX:
                i = _first(idx == idx.max())
                raise TraceError(f"{inp.where(first + i)}: interval {int(idx[i])} x --interval-ns overflows 64 bits")
            start = idx * np.uint64(opts.interval_ns)
        if "gfn" in cols:
            gfn = _to_u64(inp, "gfn", raw[cols["gfn"]], first)
            if len(gfn) and gfn.max() > np.uint64(U64_MAX >> PAGE_SHIFT):
                raise TraceError(f"{inp.where(first + _first(gfn > np.uint64(U64_MAX >> PAGE_SHIFT)))}: gfn beyond 2^52")
        else:
            gfn = _to_u64(inp, "gpa", raw[cols["gpa"]], first) >> np.uint64(PAGE_SHIFT)
        vcpu = _to_u64(inp, "vcpu", raw[cols["vcpu"]], first) if "vcpu" in cols else np.zeros(n, np.uint64)
        yield first, {"start": start, "gfn": gfn, "vcpu": vcpu}


def _spread(batches, interval_ns: int, inp: _Input, check_overlap: bool):
    """Expand rows into timed WRITEs: the k-th of n pages of an interval at start + k*interval_ns//n.

    An interval can straddle input batches, so the rows of the last (possibly incomplete) interval of a
    batch are carried into the next one; only complete intervals are emitted.
    """
    carry: dict[str, np.ndarray] | None = None
    carry_first = 0
    prev_start: int | None = None

    def emit(first: int, b: dict[str, np.ndarray]):
        nonlocal prev_start
        s = b["start"]
        bounds = np.concatenate([[0], np.flatnonzero(s[1:] != s[:-1]) + 1, [len(s)]])
        size = np.diff(bounds)
        group = np.repeat(np.arange(len(size)), size)
        k = np.arange(len(s)) - bounds[:-1][group]
        t = s + (k.astype(np.uint64) * np.uint64(interval_ns)) // size[group].astype(np.uint64)
        if check_overlap:
            starts = s[bounds[:-1]]
            prevs = np.concatenate([[prev_start if prev_start is not None else 0], starts[:-1]]).astype(np.uint64)
            bad = starts < prevs + np.uint64(interval_ns)
            if prev_start is None:
                bad[0] = False
            if bad.any():
                g = _first(bad)
                raise TraceError(f"{inp.where(first + int(bounds[g]))}: interval at t_ns {int(starts[g])} starts "
                                 f"before the previous one (t_ns {int(prevs[g])}) + --interval-ns {interval_ns} ends")
        prev_start = int(s[bounds[-2]])
        return first, t, b

    for first, b in batches:
        if carry is not None:
            b = {k: np.concatenate([carry[k], b[k]]) for k in b}
            first = carry_first
        s = b["start"]
        if not len(s):
            continue
        if len(s) > 1 and (s[1:] < s[:-1]).any():
            i = int(np.flatnonzero(s[1:] < s[:-1])[0]) + 1
            raise TraceError(f"{inp.where(first + i)}: interval start {int(s[i])} < previous {int(s[i - 1])} "
                             "(the log must be sorted by time; --sort sorts it in memory)")
        last = int(np.flatnonzero(s != s[-1])[-1]) + 1 if (s != s[-1]).any() else 0
        carry = {k: v[last:] for k, v in b.items()}
        carry_first = first + last
        if last:
            yield emit(first, {k: v[:last] for k, v in b.items()})
    if carry is not None and len(carry["start"]):
        yield emit(carry_first, carry)


def _import_dirtylog(inp: _Input, out: str, opts: ImportOptions, source: dict):
    from .format import TraceWriter

    cols = _resolve(dict(opts.columns), inp, DIRTYLOG_COLUMNS, [("t_ns", "interval"), ("gfn", "gpa")])
    for a, b in (("t_ns", "interval"), ("gfn", "gpa")):
        if a in cols and b in cols:  # both present: an explicit mapping decides, else the first name
            drop = b if a in dict(opts.columns) or b not in dict(opts.columns) else a
            del cols[drop]
    if "interval" in cols and opts.interval_ns is None:
        raise UsageError(f"import dirtylog: {inp.path} has interval indices; give --interval-ns (e.g. 100ms)")
    interval_ns = opts.interval_ns or 0

    def rows():
        it = _dirty_batches(inp, cols, opts)
        if opts.sort:
            it = _sorted_in_memory(it, "start")
        for first, t, b in _spread(it, interval_ns, inp, check_overlap="t_ns" in cols and interval_ns > 0):
            gpa = b["gfn"] << np.uint64(PAGE_SHIFT)
            yield first, t, b["vcpu"], gpa, np.full(len(t), PAGE_SIZE, np.uint64)

    scan = _Scan()
    for first, t, vcpu, gpa, ln in rows():
        _check(inp, first, t, vcpu, gpa, ln, scan, opts.guest_bytes, opts.vcpus)
    guest_bytes, vcpus = _guest(inp, scan, opts)
    source.update(columns=cols, interval_ns=interval_ns, spread="k-th of n pages at start + k*interval_ns//n")
    with TraceWriter(out, guest_bytes=guest_bytes, vcpus=vcpus, source=source, batch_rows=opts.batch_rows) as w:
        row = 0
        for _first, t, vcpu, gpa, ln in rows():
            op = np.full(len(t), Op.WRITE, np.uint8)
            w.write(t, vcpu, gpa, ln, op, content_seeds(row, op))
            row += len(t)
        return w.close()


def import_trace(src: str | os.PathLike, out: str | os.PathLike, opts: ImportOptions):
    """Convert ``src`` into the trace ``out`` (written atomically); returns its ``TraceMeta``."""
    kind = {"csv": "csv", "parquet": "parquet"}.get(opts.fmt, "auto")
    inp = _Input(src, kind, opts.batch_rows)
    source = {"importer": opts.fmt, "input": Path(src).name, "input_kind": inp.kind, "sorted_by_tool": opts.sort}
    if opts.fmt == "dirtylog":
        return _import_dirtylog(inp, str(out), opts, source)
    return _import_accesses(inp, str(out), opts, source)
