"""Trace format v1: round trip, digest, and every way a trace can be wrong (one-line TraceError)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import blake3
import numpy as np
import pyarrow as pa
import pytest

from replay import cli
from replay.core.errors import TraceError
from replay.traces.format import (
    COLUMNS,
    META_DIGEST_KEY,
    METADATA_KEYS,
    SCHEMA,
    TraceMeta,
    TraceWriter,
    _metadata,
    compute_digest,
    meta_digest,
    open_trace,
    read_meta,
)

G = 1 << 20  # 256 pages
REPO = Path(__file__).resolve().parents[1]


def cols(n: int, seed: int = 0, vcpus: int = 2):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, 10**9, n, dtype=np.uint64))
    return {
        "t_ns": t,
        "vcpu": (np.arange(n) % vcpus).astype(np.uint16),
        "gpa": rng.integers(0, G // 8, n, dtype=np.uint64) * 8,
        "len": np.full(n, 8, np.uint32),
        "op": rng.integers(0, 4, n, dtype=np.uint8),
        "value": rng.integers(0, 2**63, n, dtype=np.uint64),
    }


def write(path, c, *, batch_rows=1000, compression="zstd", chunk=None, **kw):
    args = dict(guest_bytes=G, vcpus=2, shared_ranges=[(0, 15)], source={"test": 1})
    args.update(kw)
    n = len(c["t_ns"])
    chunk = chunk or max(n, 1)
    with TraceWriter(path, batch_rows=batch_rows, compression=compression, **args) as w:
        for s in range(0, n, chunk):
            w.write(*(c[k][s:s + chunk] for k in COLUMNS))
    return w.meta


def raw_file(path, c, *, batch_sizes=None, meta_over=None, drop=(), schema=SCHEMA, compression=None):
    """A trace written with pyarrow directly, bypassing the writer's checks."""
    n = len(c["t_ns"])
    meta = TraceMeta(str(path), G, 2, ((0, 15),), {"test": 1}, n, "0" * 64)
    md = {k.decode(): v.decode() for k, v in _metadata(meta).items()}
    md.update(meta_over or {})
    for k in drop:
        md.pop(k)
    # Keep the metadata digest consistent with the changes (a buggy or forged writer), so that the checks
    # behind it are what these tests reach; test_meta_digest changes the metadata alone.
    md.pop(META_DIGEST_KEY)
    if all(k in md for k in METADATA_KEYS):
        md[META_DIGEST_KEY] = meta_digest(md)
    sizes = batch_sizes or [n]
    with pa.OSFile(str(path), "wb") as f:
        opts = pa.ipc.IpcWriteOptions(compression=compression)
        with pa.ipc.new_file(f, schema.with_metadata(md), options=opts) as w:
            s = 0
            for k in sizes:
                arrays = [pa.array(c[name][s:s + k], type=fld.type) for name, fld in zip(COLUMNS, schema)]
                w.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
                s += k
    return path


def read_all(path):
    rows = []
    with open_trace(path) as r:
        for first, b in r:
            rows.append((first, b.num_rows))
    return rows


def assert_one_line(exc: TraceError, path, batch=None, row=None):
    msg = str(exc)
    assert "\n" not in msg
    assert str(path) in msg
    if batch is not None:
        assert f"batch {batch}, row {row}:" in msg, msg


# -- round trip and digest -------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", None])
def test_round_trip(tmp_path, compression):
    c = cols(2500)
    meta = write(tmp_path / "t.arrow", c, compression=compression)
    assert meta.events == 2500 and meta.vcpus == 2 and meta.guest_bytes == G and meta.npages == 256
    assert meta.shared_ranges == ((0, 15),)
    assert read_meta(tmp_path / "t.arrow") == meta
    got = {k: [] for k in COLUMNS}
    with open_trace(tmp_path / "t.arrow") as r:
        assert r.num_batches == 3
        firsts = []
        for first, b in r:
            firsts.append(first)
            assert b.schema.equals(SCHEMA)
            for k in COLUMNS:
                got[k].append(b.column(k).to_numpy())
    assert firsts == [0, 1000, 2000]
    for k in COLUMNS:
        np.testing.assert_array_equal(np.concatenate(got[k]), c[k])
    md = pa.ipc.open_file(pa.memory_map(str(tmp_path / "t.arrow"))).schema.metadata
    assert md[b"format"] == b"snp-replay-trace" and md[b"version"] == b"3" and md[b"page_size"] == b"4096"
    assert json.loads(md[b"shared_ranges"]) == [[0, 15]]
    assert json.loads(md[b"source"]) == {"test": 1}
    assert meta.to_json()["events"] == 2500
    assert [p.name for p in tmp_path.iterdir()] == ["t.arrow"]  # no temporaries left


def test_compression_actually_differs(tmp_path):
    c = cols(5000)
    write(tmp_path / "z.arrow", c)
    write(tmp_path / "u.arrow", c, compression=None)
    assert os.path.getsize(tmp_path / "z.arrow") < os.path.getsize(tmp_path / "u.arrow")
    f = pa.ipc.open_file(pa.memory_map(str(tmp_path / "u.arrow")))
    assert f.get_batch(0).num_rows == 1000


def _model_digest(c, version):
    """The documented rule: H over the per-column H of little-endian bytes; H = BLAKE3-256 in version 3,
    blake2b-256 in versions 1 and 2."""
    def h(data=b""):
        return blake3.blake3(data) if version == 3 else hashlib.blake2b(data, digest_size=32)

    outer = h()
    for k in COLUMNS:
        outer.update(h(c[k].astype(c[k].dtype.newbyteorder("<")).tobytes()).digest())
    return outer.hexdigest()


@pytest.mark.parametrize("version", [3, 1])
def test_digest_independent_of_batching_compression_name(tmp_path, version):
    c = cols(3001)
    digests = {
        write(tmp_path / "a.arrow", c, batch_rows=1 << 20, version=version).digest,
        write(tmp_path / "b.arrow", c, batch_rows=7, compression=None, chunk=100, version=version).digest,
        write(tmp_path / "other-name.arrow", c, batch_rows=1000, chunk=333, version=version).digest,
        compute_digest(tmp_path / "a.arrow"),
        compute_digest(tmp_path / "b.arrow"),
    }
    assert len(digests) == 1
    assert read_meta(tmp_path / "a.arrow").version == version
    c2 = dict(c, value=c["value"].copy())
    c2["value"][5] ^= 1
    assert write(tmp_path / "c.arrow", c2, version=version).digest not in digests
    assert _model_digest(c, version) in digests
    assert _model_digest(c, 4 - version) not in digests  # the other hash: the version decides which


@pytest.mark.parametrize("version,idle,want", [(1, None, "1"), (2, None, "1"), (1, [[0, 5], []], "2"),
                                                (3, None, "3"), (3, [[0, 5], []], "3")])
def test_versions_written_and_read(tmp_path, version, idle, want):
    """A writer asked for an old version writes it (blake2b; 2 only with idle intervals); every version reads
    back with the digest verified, and one changed row is refused whichever hash the version uses."""
    c = cols(500)
    path = tmp_path / "v.arrow"
    meta = write(path, c, version=version, vcpu_idle=idle, compression=None)
    md = pa.ipc.open_file(pa.memory_map(str(path))).schema.metadata
    assert md[b"version"] == want.encode() and meta.version == int(want)
    assert (b"vcpu_idle" in md) == (idle is not None)
    assert meta.digest == _model_digest(c, int(want)) == compute_digest(path)
    assert read_meta(path) == meta and read_meta(path).vcpu_idle == meta.vcpu_idle
    read_all(path)
    # Corrupt one value byte in place (uncompressed: the bytes are in the file as written).
    data = bytearray(path.read_bytes())
    needle = c["value"][250].astype("<u8").tobytes()
    at = data.find(needle)
    assert at > 0
    data[at] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(TraceError, match="content digest .* does not match") as ei:
        read_all(path)
    assert_one_line(ei.value, path)


def test_shipped_old_traces_verify_as_before():
    """The traces shipped in traces/ (versions 1 and 2, blake2b) read and verify with the digests the
    manifest pins."""
    root = Path(__file__).resolve().parent.parent
    manifest = json.loads((root / "traces" / "MANIFEST.json").read_text())
    seen = set()
    for entry in manifest["traces"]:
        meta = read_meta(root / entry["file"])
        assert meta.version in (1, 2) and meta.digest == entry["digest"]
        assert compute_digest(root / entry["file"]) == entry["digest"]
        seen.add(meta.version)
    assert seen == {1, 2}


def test_writer_version_refused(tmp_path):
    with pytest.raises(TraceError, match="version must be one of 1, 2, 3, not 4"):
        TraceWriter(tmp_path / "x.arrow", guest_bytes=G, vcpus=1, source={}, version=4)
    assert list(tmp_path.iterdir()) == []


def test_write_batch_and_slices(tmp_path):
    c = cols(2000)
    batch = pa.RecordBatch.from_arrays([pa.array(c[k], type=f.type) for k, f in zip(COLUMNS, SCHEMA)], schema=SCHEMA)
    with TraceWriter(tmp_path / "s.arrow", guest_bytes=G, vcpus=2, source={"test": 1}) as w:
        w.write_batch(batch.slice(0, 700))  # slices have array offsets
        w.write_batch(batch.slice(700))
    assert w.meta.digest == write(tmp_path / "t.arrow", c).digest


def test_empty_trace_and_scalars(tmp_path):
    meta = write(tmp_path / "e.arrow", {k: np.zeros(0, np.uint64) for k in COLUMNS})
    assert meta.events == 0 and read_all(tmp_path / "e.arrow") == []
    with TraceWriter(tmp_path / "s.arrow", guest_bytes=G, vcpus=1, source={}) as w:
        w.write(np.arange(5, dtype=np.uint64), 0, np.arange(5, dtype=np.uint64) * 4096, 8, 0, 7)
    assert w.meta.events == 5


def test_verify_digest(tmp_path):
    c = cols(100)
    raw_file(tmp_path / "r.arrow", c)  # digest in metadata is all zeros
    with open_trace(tmp_path / "r.arrow", verify_digest=True) as r:
        with pytest.raises(TraceError, match="digest"):
            list(r)
    write(tmp_path / "ok.arrow", c)
    with open_trace(tmp_path / "ok.arrow", verify_digest=True) as r:
        assert sum(b.num_rows for _, b in r) == 100


# -- reader validation ----------------------------------------------------------------------------


def bad(c, **changes):
    c = {k: v.copy() for k, v in c.items()}
    for key, (idx, val) in changes.items():
        c[key][idx] = val
    return c


ROW_CASES = {
    "t_ns within batch": (dict(t_ns=(25, 0)), 25, "t_ns must be non-decreasing"),
    "t_ns across batches": (dict(t_ns=(30, 0)), 30, "t_ns must be non-decreasing"),
    "vcpu": (dict(vcpu=(17, 2)), 17, "vcpu 2 out of range"),
    "gpa+len": (dict(gpa=(33, G - 4)), 33, "beyond guest_bytes"),
    "gpa overflow": (dict(gpa=(12, 2**64 - 4)), 12, "beyond guest_bytes"),
    "len 0": (dict(len=(14, 0)), 14, "len 0"),
    "len huge": (dict(len=(14, 2**32 - 1)), 14, "beyond guest_bytes"),
    "op": (dict(op=(38, 4)), 38, "unknown op 4"),
}


@pytest.mark.parametrize("case", ROW_CASES)
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_row_errors_name_file_batch_row(tmp_path, case, compression):
    changes, row, text = ROW_CASES[case]
    c = cols(40)
    c["t_ns"] = np.arange(40, dtype=np.uint64) * 10 + 5
    path = raw_file(tmp_path / "bad.arrow", bad(c, **changes), batch_sizes=[10, 20, 10], compression=compression)
    batch = 0 if row < 10 else 1 if row < 30 else 2
    with pytest.raises(TraceError, match=text) as ei:
        read_all(path)
    assert_one_line(ei.value, path, batch, row)


def test_error_message_format(tmp_path):
    c = cols(40)
    c["t_ns"] = np.arange(40, dtype=np.uint64) * 10
    c["t_ns"][30] = 5
    path = raw_file(tmp_path / "trace.arrow", c, batch_sizes=[10, 20, 10])
    with pytest.raises(TraceError) as ei:
        read_all(path)
    assert str(ei.value) == f"{path}: batch 2, row 30: t_ns 5 < previous 290 (t_ns must be non-decreasing)"


def test_earliest_bad_row_wins(tmp_path):
    c = bad(cols(40), op=(20, 9), vcpu=(11, 7))
    path = raw_file(tmp_path / "b.arrow", c)
    with pytest.raises(TraceError, match="vcpu 7") as ei:
        read_all(path)
    assert_one_line(ei.value, path, 0, 11)


def test_nullable_columns_without_nulls_are_accepted(tmp_path):
    # ordinary pyarrow / pandas / polars code declares columns nullable; what matters is that none is null
    c = cols(10)
    schema = pa.schema([pa.field(f.name, f.type, nullable=True) for f in SCHEMA])
    path = tmp_path / "n.arrow"
    raw_file(path, c, schema=schema)
    raw_file(path, c, schema=schema, meta_over={"digest": compute_digest(path)})
    assert read_all(path) == [(0, 10)]


def test_nulls_rejected(tmp_path):
    c = cols(10)
    schema = pa.schema([pa.field(f.name, f.type, nullable=True) for f in SCHEMA])
    path = tmp_path / "n.arrow"
    meta = TraceMeta(str(path), G, 2, ((0, 15),), {"test": 1}, 10, "0" * 64)
    md = {k.decode(): v.decode() for k, v in _metadata(meta).items()}
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, schema.with_metadata(md)) as w:
        arrays = [pa.array(c[name], type=fld.type) for name, fld in zip(COLUMNS, schema)]
        arrays[2] = pa.array([None] + list(c["gpa"][1:]), type=pa.uint64())
        w.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
    with pytest.raises(TraceError, match="null") as ei:
        read_all(path)
    assert_one_line(ei.value, path, 0, 0)


def test_meta_digest(tmp_path):
    """The writer records a hash of the metadata: one changed character there is refused; a trace without
    it (written before it existed) is read as before."""
    path = tmp_path / "m.arrow"
    write(path, cols(10))
    with pa.memory_map(str(path)) as f:
        table = pa.ipc.open_file(f).read_all()
    md = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    model = hashlib.blake2b(digest_size=32)  # the documented rule: key NUL value NUL, in METADATA_KEYS order
    for key in METADATA_KEYS:
        model.update(f"{key}\0{md[key]}\0".encode())
    assert md[META_DIGEST_KEY] == model.hexdigest() == meta_digest(md)
    changed = dict(md, shared_ranges=md["shared_ranges"].replace("15", "16"))
    assert changed != md

    def rewrite(metadata):
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema.with_metadata(metadata)) as w:
            w.write_table(table)

    rewrite(changed)
    with pytest.raises(TraceError, match="meta_digest does not match the metadata") as ei:
        read_meta(path)
    assert_one_line(ei.value, path)
    rewrite({k: v for k, v in changed.items() if k != META_DIGEST_KEY})
    assert read_meta(path).shared_ranges == ((0, 16),)


def test_events_mismatch(tmp_path):
    path = raw_file(tmp_path / "e.arrow", cols(10), meta_over={"events": "11"})
    with pytest.raises(TraceError, match="events=11") as ei:
        read_all(path)
    assert_one_line(ei.value, path, 1, 10)


@pytest.mark.parametrize(
    "kind,kw,text",
    [
        ("wrong type", dict(schema=pa.schema([pa.field("gpa", pa.int64(), False) if f.name == "gpa" else f for f in SCHEMA])), "column gpa is int64"),
        ("wrong names", dict(schema=pa.schema([pa.field("addr" if f.name == "gpa" else f.name, f.type, False) for f in SCHEMA])), "schema: columns"),
        ("missing key", dict(drop=("digest",)), "missing key digest"),
        ("wrong version", dict(meta_over={"version": "4"}), "unsupported trace version '4'"),
        ("wrong format", dict(meta_over={"format": "parquet-ish"}), "not a snp-replay trace"),
        ("bad guest", dict(meta_over={"guest_bytes": "12345"}), "guest_bytes"),
        ("bad ranges", dict(meta_over={"shared_ranges": "[[3, 1]]"}), "shared_ranges"),
        ("bad source", dict(meta_over={"source": "{"}), "source: malformed JSON"),
    ],
)
def test_header_errors(tmp_path, kind, kw, text):
    path = tmp_path / "h.arrow"
    raw_file(path, cols(10), **kw)
    with pytest.raises(TraceError, match=text) as ei:
        open_trace(path)
    assert_one_line(ei.value, path)


def test_not_arrow_truncated_corrupt(tmp_path):
    good = tmp_path / "good.arrow"
    write(good, cols(3000), batch_rows=1000)
    data = good.read_bytes()
    cases = {
        "empty.arrow": (b"", "empty file"),
        "text.arrow": (b"t_ns,vcpu\n1,2\n" * 10, "not an Arrow IPC file"),
        "cut.arrow": (data[: len(data) * 2 // 3], "truncated"),
        "footer.arrow": (data[:-40] + b"\x13" * 30 + data[-10:], "corrupt"),
    }
    for name, (content, text) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(TraceError, match=text) as ei:
            read_all(p)
        assert_one_line(ei.value, p)
    with pytest.raises(TraceError, match="cannot open") as ei:
        open_trace(tmp_path / "missing.arrow")
    assert_one_line(ei.value, tmp_path / "missing.arrow")
    # An Arrow *stream* is not a trace file.
    stream = tmp_path / "stream.arrow"
    with pa.OSFile(str(stream), "wb") as f, pa.ipc.new_stream(f, SCHEMA) as w:
        w.write_batch(pa.RecordBatch.from_arrays([pa.array([0], type=f.type) for f in SCHEMA], schema=SCHEMA))
    with pytest.raises(TraceError, match="not an Arrow IPC file"):
        open_trace(stream)


def test_corrupt_batch_bytes(tmp_path):
    """Flipping bytes inside compressed batches: a TraceError naming a batch, never a crash."""
    good = tmp_path / "good.arrow"
    write(good, cols(3000), batch_rows=1000)
    data = bytearray(good.read_bytes())
    rng = np.random.default_rng(5)
    seen_batch_error = False
    for trial in range(40):
        d = bytearray(data)
        lo, hi = 400, len(d) - 1200  # past the schema, before the footer: inside the batches
        for pos in rng.integers(lo, hi, 8):
            d[pos] ^= 0xFF
        p = tmp_path / f"c{trial}.arrow"
        p.write_bytes(bytes(d))
        try:
            read_all(p)
        except TraceError as exc:
            assert_one_line(exc, p)
            seen_batch_error |= "batch " in str(exc)
    assert seen_batch_error


def test_cli_bad_trace_exit_2(tmp_path, capsys):
    p = tmp_path / "x.arrow"
    p.write_bytes(b"hello")
    assert cli.main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(p) in err
    c = bad(cols(40), vcpu=(17, 9))
    raw_file(tmp_path / "v.arrow", c, batch_sizes=[10, 30])
    assert cli.main(["inspect", str(tmp_path / "v.arrow")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch 1, row 17" in err and "Traceback" not in err


def test_cli_subprocess_one_line(tmp_path):
    p = tmp_path / "cut.arrow"
    write(tmp_path / "g.arrow", cols(100))
    p.write_bytes((tmp_path / "g.arrow").read_bytes()[:300])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "replay.cli", "inspect", str(p)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == "" and r.stderr.count("\n") == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr


# -- writer validation: same rules, nothing left on disk -------------------------------------------


@pytest.mark.parametrize("case", [c for c in ROW_CASES if c != "gpa overflow" and c != "len huge"])
def test_writer_rejects_and_leaves_nothing(tmp_path, case):
    changes, row, text = ROW_CASES[case]
    c = cols(40)
    c["t_ns"] = np.arange(40, dtype=np.uint64) * 10 + 5
    path = tmp_path / "w.arrow"
    with pytest.raises(TraceError, match=text) as ei:
        write(path, bad(c, **changes), batch_rows=10, chunk=7)
    assert_one_line(ei.value, path, row // 10, row)
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_input_types(tmp_path):
    path = tmp_path / "w.arrow"
    with pytest.raises(TraceError, match="does not fit"):
        with TraceWriter(path, guest_bytes=G, vcpus=2, source={}) as w:
            w.write(np.array([0, 1]), np.array([0, -1]), 0, 8, 0, 0)
    with pytest.raises(TraceError, match="unequal length"):
        with TraceWriter(path, guest_bytes=G, vcpus=2, source={}) as w:
            w.write(np.array([0, 1]), np.array([0]), 0, 8, 0, 0)
    with pytest.raises(TraceError, match="dtype float"):
        with TraceWriter(path, guest_bytes=G, vcpus=2, source={}) as w:
            w.write(np.array([0.5]), 0, 0, 8, 0, 0)
    with pytest.raises(TraceError, match="guest_bytes"):
        TraceWriter(path, guest_bytes=1000, vcpus=2, source={})
    with pytest.raises(TraceError, match="vcpus"):
        TraceWriter(path, guest_bytes=G, vcpus=0, source={})
    with pytest.raises(TraceError, match="shared_ranges"):
        TraceWriter(path, guest_bytes=G, vcpus=1, shared_ranges=[(0, 300)], source={})
    with pytest.raises(TraceError, match="canonical JSON"):
        TraceWriter(path, guest_bytes=G, vcpus=1, source={"rate": 0.5})
    with pytest.raises(TraceError, match="schema"):
        with TraceWriter(path, guest_bytes=G, vcpus=2, source={}) as w:
            w.write_batch(pa.record_batch({"t_ns": pa.array([1], pa.int64())}))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing(tmp_path):
    path = tmp_path / "i.arrow"
    with pytest.raises(KeyboardInterrupt):
        with TraceWriter(path, guest_bytes=G, vcpus=2, source={}, batch_rows=10) as w:
            c = cols(100)
            w.write(*(c[k] for k in COLUMNS))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    w = TraceWriter(path, guest_bytes=G, vcpus=2, source={})
    w.write(*(cols(10)[k] for k in COLUMNS))
    w.abort()
    assert list(tmp_path.iterdir()) == []
    # A failed write does not clobber an existing trace either.
    meta = write(path, cols(10))
    with pytest.raises(TraceError):
        write(path, bad(cols(10), op=(3, 7)))
    assert read_meta(path) == meta and [p.name for p in tmp_path.iterdir()] == ["i.arrow"]


_ABANDON = r"""
import sys, threading
from replay.traces.format import open_trace

it = iter(open_trace(sys.argv[1]))
next(it)  # a batch read, the next one reading ahead and this one hashing: both helper threads started
# The garbage collector can close an abandoned reader inside another thread's start-up, which holds this lock
# (threading._maintain_shutdown_locks); closing it there must not join a thread (that needs the same lock).
with threading._shutdown_locks_lock:
    it.close()
print("closed")
"""


def test_an_abandoned_reader_closes_without_joining_its_threads(tmp_path):
    """A run that stops early leaves its reader to the garbage collector; the reader's clean-up used to join
    its helper threads, which hung a run forever when the collector ran inside a starting thread."""
    path = tmp_path / "t.arrow"
    write(path, cols(5000), batch_rows=1000)
    p = subprocess.run([sys.executable, "-c", _ABANDON, str(path)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0 and p.stdout == "closed\n", p.stderr
