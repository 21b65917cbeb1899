"""The lackey recorder: stream parsing on captured output, the address layout, and real recordings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from replay.cli import main
from replay.core.errors import RecordError, UsageError
from replay.traces.lackey import AddressMap, LackeyParser, RecordOptions, content_seeds, record
from replay.model.snp import Op
from replay.traces.format import compute_digest, open_trace, read_meta

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
HAVE_VALGRIND = shutil.which("valgrind") is not None
needs_valgrind = pytest.mark.skipif(not HAVE_VALGRIND, reason="valgrind not installed (apt-get install valgrind)")


def parse(data: bytes, step: int | None = None, reads: bool = True):
    """Feed ``data`` whole or in ``step``-byte pieces; return (parser, concatenated columns)."""
    p = LackeyParser(reads=reads)
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    chunks = [p.feed(x) for x in pieces] + [p.finish()]
    cols = {k: np.concatenate([getattr(c, k) for c in chunks]) for k in ("vaddr", "size", "op", "instr", "tid")}
    return p, cols


# ------------------------------------------------------------------------------------------------
# Parsing captured lackey output


def test_captured_single_thread_fragment():
    p, cols = parse((DATA / "lackey_true_head.txt").read_bytes())
    s = p.stats
    assert s.skipped == {"banner": 26}  # the ==pid== banner and the end-of-run summary
    assert (s.instructions, s.stores, s.modifies, s.loads) == (11, 3, 0, 0)
    assert cols["vaddr"].tolist()[:2] == [0x1FFF000778, 0x1FFF000770]
    assert cols["size"].tolist() == [8] * 3
    assert set(cols["op"].tolist()) == {Op.WRITE}
    # t: instructions executed before the accessing one (the store after the 2nd I line -> 1)
    assert cols["instr"].tolist()[:2] == [1, 2]
    assert s.pids == {3511}


def test_captured_threads_fragment_switches_vcpu():
    p, cols = parse((DATA / "lackey_threads.txt").read_bytes())
    assert p.stats.thread_switches == 3 and p.stats.max_tid == 3
    assert p.stats.skipped == {"debug": 7, "banner": 6}
    # Accesses before "SCHED[3]:  acquired lock" belong to thread 1, the last one to thread 3.
    assert cols["tid"].tolist() == [1, 1, 1, 3]
    assert cols["op"].tolist() == [Op.WRITE, Op.READ, Op.READ, Op.READ]


ODD = (
    b"==42== Lackey, an example Valgrind tool\n"
    b"\n"
    b"I  0401ab70,3\n"
    b" S 1fff000778,8\n"
    b"garbage line\n"
    b"I  zz01ab73,5\n"  # not hex
    b" X 1000,4\n"  # unknown access kind
    b" M 00000000DEADBEEF,4\n"  # upper-case hex is fine
    b" L 123456789abcdef012,8\n"  # 18 hex digits: longer than an address
    b" S ffffffffffffffff,8\n"  # runs past 2^64
    b" S 1000,0\n"  # size 0
    b" S 1000,999999\n"  # size too long
    b" L 2000\n"  # no comma
    b" S 1000,8\r\n"  # CRLF
    b"--42-- some debug line\n"
    b"I  0401ab75,2\n"
    b" L 3000,2\n"
    b" S 4000,1"  # truncated last line (no newline) but complete: kept
)


def test_odd_lines_are_skipped_and_counted_never_fatal():
    p, cols = parse(ODD)
    assert cols["vaddr"].tolist() == [0x1FFF000778, 0xDEADBEEF, 0x3000, 0x4000]
    assert cols["op"].tolist() == [Op.WRITE, Op.WRITE, Op.READ, Op.WRITE]
    assert cols["instr"].tolist() == [0, 0, 1, 1]
    assert p.stats.skipped == {"banner": 1, "blank": 1, "unknown": 1, "malformed": 6, "address_overflow": 1,
                               "bad_size": 1, "debug": 1}
    assert p.stats.instructions == 2


def test_truncated_last_line_is_counted():
    p, cols = parse(b"I  0401ab70,3\n S 1fff0007")
    assert len(cols["vaddr"]) == 0 and p.stats.skipped == {"truncated": 1}
    p, cols = parse(b"I  0401ab70,3\n S 1fff0007,8")  # cut after a complete line: parsed
    assert cols["vaddr"].tolist() == [0x1FFF0007] and not p.stats.skipped


@pytest.mark.parametrize("step", [1, 7, 64, 1000])
def test_chunking_does_not_change_the_result(step):
    data = (DATA / "lackey_threads.txt").read_bytes() + ODD
    whole_p, whole = parse(data)
    p, cols = parse(data, step=step)
    for k in whole:
        assert cols[k].tolist() == whole[k].tolist(), k
    assert p.stats.to_json() == whole_p.stats.to_json()


def test_no_reads_drops_loads_but_counts_them():
    p, cols = parse((DATA / "lackey_threads.txt").read_bytes(), reads=False)
    assert cols["op"].tolist() == [Op.WRITE] and p.stats.loads == 3


# ------------------------------------------------------------------------------------------------
# Address layout and content seeds


def test_address_map_keeps_layout_and_offsets():
    shift = 20
    chunks = np.array([0x4, 0x5, 0x6, 0x40, 0x1FFEF], dtype=np.uint64)
    m = AddressMap.from_chunks(chunks, shift)
    assert m.vstart.tolist() == [0x400000, 0x4000000, 0x1FFEF00000]
    assert m.gstart.tolist() == [0, 3 << 20, 4 << 20]
    assert m.nbytes.tolist() == [3 << 20, 1 << 20, 1 << 20]
    v = np.array([0x400000, 0x5FFFFF, 0x4000123, 0x1FFEF00ABC], dtype=np.uint64)
    assert m.gpa(v).tolist() == [0, 0x1FFFFF, (3 << 20) + 0x123, (4 << 20) + 0xABC]
    # neighbours stay neighbours; page offsets kept
    assert (m.gpa(v) & 0xFFF).tolist() == (v & 0xFFF).tolist()
    with pytest.raises(RecordError):
        m.gpa(np.array([0x300000], dtype=np.uint64))
    assert m.summary()["regions"] == 3 and m.mapped_bytes == 5 << 20


def test_content_seeds_are_row_positions_for_writes():
    op = np.array([Op.WRITE, Op.READ, Op.WRITE], dtype=np.uint8)
    assert content_seeds(10, op).tolist() == [10, 0, 12]


# ------------------------------------------------------------------------------------------------
# record() on captured output (no valgrind needed)


def fake_stream(data: bytes, status: int = 0):
    def stream(opts, consume):
        for i in range(0, len(data), 97):
            consume(data[i:i + 97])
        return status
    return stream


def test_record_from_captured_stream(tmp_path):
    out = tmp_path / "t.arrow"
    data = (DATA / "lackey_threads.txt").read_bytes()
    opts = RecordOptions(argv=("./mt",), ns_per_instr=3, progress=False)
    res = record(out, opts, stream=fake_stream(data))
    meta = read_meta(out)
    assert meta.vcpus == 3 and meta.events == 4 and meta.guest_bytes % (2 << 20) == 0
    src = meta.source
    assert src["recorder"] == "lackey" and src["argv"] == ["./mt"] and src["ns_per_instr"] == 3
    assert src["reads"] is True and src["instructions"] == res.stats["instructions"]
    with open_trace(out) as r:
        rows = next(iter(r))[1].to_pydict()
    assert rows["vcpu"] == [0, 0, 0, 2]
    assert all(t % 3 == 0 for t in rows["t_ns"])
    assert rows["value"] == [0, 0, 0, 0]  # one WRITE at row 0, the rest READs
    assert compute_digest(out) == meta.digest
    again = tmp_path / "again.arrow"
    record(again, opts, stream=fake_stream(data))
    assert read_meta(again).digest == meta.digest  # same lackey output, same trace


def test_record_single_vcpu_and_no_reads(tmp_path):
    out = tmp_path / "t.arrow"
    opts = RecordOptions(argv=("./mt",), vcpus_from="single", reads=False, progress=False)
    record(out, opts, stream=fake_stream((DATA / "lackey_threads.txt").read_bytes()))
    meta = read_meta(out)
    assert meta.vcpus == 1 and meta.events == 1 and meta.source["reads"] is False


def test_record_failures_leave_no_file(tmp_path):
    out = tmp_path / "t.arrow"
    data = (DATA / "lackey_true_head.txt").read_bytes()
    with pytest.raises(RecordError, match="exit status 3"):
        record(out, RecordOptions(argv=("prog",), progress=False), stream=fake_stream(data, status=3))
    with pytest.raises(RecordError, match="signal SIGSEGV"):
        record(out, RecordOptions(argv=("prog",), progress=False), stream=fake_stream(data, status=-11))
    with pytest.raises(RecordError, match="too small"):
        record(out, RecordOptions(argv=("prog",), guest_bytes=4096, progress=False), stream=fake_stream(data))
    with pytest.raises(RecordError, match="no memory accesses"):
        record(out, RecordOptions(argv=("prog",), progress=False), stream=fake_stream(b"==1== hi\n"))
    assert list(tmp_path.iterdir()) == []  # no output, no spool, no temporaries


def test_record_options_validation():
    with pytest.raises(UsageError):
        RecordOptions(argv=())
    with pytest.raises(UsageError):
        RecordOptions(argv=("x",), ns_per_instr=0)
    with pytest.raises(UsageError):
        RecordOptions(argv=("x",), vcpus_from="cores")


def test_cli_missing_valgrind_names_the_install(tmp_path, capsys):
    out = tmp_path / "t.arrow"
    assert main(["record", "--out", str(out), "--valgrind", "no-such-valgrind", "--", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "apt-get install valgrind" in err
    assert not out.exists()


def test_cli_record_without_command(tmp_path, capsys):
    assert main(["record", "--out", str(tmp_path / "t.arrow")]) == 2
    assert "no command" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Real recordings (CI installs valgrind)


@needs_valgrind
def test_real_recording_is_reproducible(tmp_path, capsys):
    a, b = tmp_path / "a.arrow", tmp_path / "b.arrow"
    for out in (a, b):
        assert main(["record", "--out", str(out), "--no-reads", "--no-progress", "--clean-env", "--rate-ns-per-instr", "2",
                     "--", "true"]) == 0
    ma, mb = read_meta(a), read_meta(b)
    assert ma.digest == mb.digest and ma.events > 1000
    assert ma.source["valgrind"].startswith("valgrind-") and ma.source["argv"] == ["true"]
    assert ma.source["instructions"] > 10000 and ma.vcpus == 1
    assert compute_digest(a) == ma.digest
    assert "recorded" in capsys.readouterr().err


@needs_valgrind
def test_real_recording_with_reads(tmp_path):
    out = tmp_path / "r.arrow"
    assert main(["record", "--out", str(out), "--no-progress", "--", "true"]) == 0
    meta = read_meta(out)
    assert meta.source["reads"] is True and meta.source["lackey"]["loads"] > 0
    ops = set()
    with open_trace(out) as r:
        for _, batch in r:
            ops |= set(np.unique(batch.column("op").to_numpy()).tolist())
    assert ops == {Op.WRITE, Op.READ}


@needs_valgrind
def test_real_program_failure_is_an_error(tmp_path, capsys):
    out = tmp_path / "f.arrow"
    assert main(["record", "--out", str(out), "--no-progress", "--", "false"]) == 2
    err = capsys.readouterr().err.strip()
    assert "exit status 1" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# The shipped traces


MANIFEST = json.loads((ROOT / "traces" / "MANIFEST.json").read_text())


@pytest.mark.parametrize("entry", MANIFEST["traces"], ids=lambda e: e["name"])
def test_shipped_traces_match_manifest(entry):
    path = ROOT / entry["file"]
    meta = read_meta(path)
    assert meta.digest == entry["digest"] == compute_digest(path)
    assert meta.events == entry["events"] and meta.guest_bytes == entry["guest_bytes"]
    assert meta.source["recorder"] in ("lackey", "qemu-tcg") and meta.source["argv"] == entry["argv"]
    assert path.stat().st_size < 2_500_000


def test_thread_switches_become_idle_intervals():
    from replay.traces.lackey import idle_intervals

    # Thread 1 runs instructions [0, 10), [30, 50), [70, 100); thread 2 [10, 30), [50, 70) (a switch to the
    # thread already running changes nothing). 3 ns an instruction.
    got = idle_intervals([(10, 2), (30, 1), (50, 2), (60, 2), (70, 1)], 100, 2, 3)
    assert got == [[30, 90, 150, 210], [0, 30, 90, 150, 210, 300]]
    assert idle_intervals([], 100, 1, 1) is None  # one thread, always running: no idle time, a v1 trace
    assert idle_intervals([(0, 2)], 100, 2, 1) == [[0, 100], []]  # thread 1 never ran


def test_lackey_parser_records_switches_on_the_instruction_clock():
    from replay.traces.lackey import LackeyParser

    p = LackeyParser()
    p.feed(b"I  1000,3\nI  1003,3\n--1-- SCHED[2]:  acquired lock\nI  2000,2\n S 5000,8\n"
           b"I  2002,2\n--1-- SCHED[1]:  acquired lock\nI  1006,1\n")
    p.finish()
    assert p.switches == [(2, 2), (4, 1)]
