"""`replay import`: CSV/Parquet access lists, dirty-log expansion, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from replay.cli import main
from replay.core.errors import TraceError, UsageError
from replay.traces.importers import ImportOptions, import_trace, parse_columns
from replay.model.snp import Op
from replay.traces.format import open_trace, read_meta

DATA = Path(__file__).parent / "data"


def rows(path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    with open_trace(path) as r:
        for _, batch in r:
            for k, v in batch.to_pydict().items():
                out.setdefault(k, []).extend(v)
    return out


def write(tmp_path, name, text) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------------
# CSV / Parquet


def test_csv_with_mapping_hex_and_op_names(tmp_path):
    src = DATA / "accesses.csv"
    out = tmp_path / "t.arrow"
    assert main(["import", "csv", str(src), "--out", str(out),
                 "--columns", "t_ns=ts,gpa=addr,len=size,op=kind,vcpu=cpu"]) == 0
    r = rows(out)
    assert r["t_ns"] == [0, 5, 5, 9, 12]
    assert r["gpa"] == [0x1000, 0x2000, 0x3000, 100, 0x1FFFF8]
    assert r["len"] == [8, 4, 8, 1, 8]
    assert r["op"] == [Op.WRITE, Op.READ, Op.WRITE, Op.READ, Op.TO_SHARED]
    assert r["vcpu"] == [0, 1, 1, 0, 1]
    assert r["value"] == [0, 0, 2, 0, 0]  # WRITE rows: their row index
    meta = read_meta(out)
    assert meta.guest_bytes == 2 << 20 and meta.vcpus == 2
    assert meta.source["importer"] == "csv" and meta.source["columns"]["gpa"] == "addr"


def test_csv_defaults(tmp_path):
    src = write(tmp_path, "a.csv", "t_ns,gpa\n1,0\n2,4096\n2,3000000\n")
    out = tmp_path / "t.arrow"
    meta = import_trace(src, out, ImportOptions("csv"))
    r = rows(out)
    assert r["op"] == [Op.WRITE] * 3 and r["len"] == [8] * 3 and r["vcpu"] == [0] * 3
    assert r["value"] == [0, 1, 2]
    assert meta.vcpus == 1 and meta.guest_bytes == 4 << 20  # 3000008 rounded up to 2 MiB


def test_parquet_streams_in_batches_and_matches_csv(tmp_path):
    n = 5000
    rng = np.random.default_rng(7)
    t = np.sort(rng.integers(0, 10**6, n)).astype(np.uint64)
    table = pa.table({"time": t, "gpa": rng.integers(0, 1 << 24, n).astype(np.int64),
                      "vcpu": rng.integers(0, 4, n).astype(np.uint16), "op": rng.integers(0, 2, n).astype(np.uint8)})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=700)
    a, b = tmp_path / "a.arrow", tmp_path / "b.arrow"
    ma = import_trace(tmp_path / "a.parquet", a, ImportOptions("parquet", columns=(("t_ns", "time"),), batch_rows=333))
    _to_csv(table, tmp_path / "a.csv")
    mb = import_trace(tmp_path / "a.csv", b, ImportOptions("csv", columns=(("t_ns", "time"),)))
    assert ma.digest == mb.digest and ma.events == n and ma.vcpus == 4
    assert rows(a)["t_ns"] == t.tolist()


def _to_csv(table, path):
    import pyarrow.csv as pacsv

    pacsv.write_csv(table, path)


def test_sort_is_stable(tmp_path):
    src = write(tmp_path, "u.csv", "t_ns,gpa\n5,1\n1,2\n5,3\n0,4\n")
    out = tmp_path / "t.arrow"
    assert main(["import", "csv", str(src), "--out", str(out), "--sort"]) == 0
    r = rows(out)
    assert r["t_ns"] == [0, 1, 5, 5] and r["gpa"] == [4, 2, 1, 3]
    assert r["value"] == [0, 1, 2, 3]  # seeds follow the sorted position


def test_explicit_guest_size_and_vcpus(tmp_path):
    src = write(tmp_path, "a.csv", "t_ns,gpa,vcpu\n1,0,0\n")
    out = tmp_path / "t.arrow"
    assert main(["import", "csv", str(src), "--out", str(out), "--guest-size", "64MiB", "--vcpus", "8"]) == 0
    meta = read_meta(out)
    assert meta.guest_bytes == 64 << 20 and meta.vcpus == 8


# ------------------------------------------------------------------------------------------------
# Dirty logs


def test_dirtylog_interval_expansion_exact_rows(tmp_path):
    src = DATA / "dirtylog.csv"
    out = tmp_path / "d.arrow"
    assert main(["import", "dirtylog", str(src), "--out", str(out), "--interval-ns", "1us"]) == 0
    r = rows(out)
    # interval 0 has 3 pages -> at 0, 333, 666; interval 1 one page; interval 3 two pages -> 3000, 3500
    assert r["t_ns"] == [0, 333, 666, 1000, 3000, 3500]
    assert r["gpa"] == [g << 12 for g in (1, 2, 3, 2, 7, 5)]
    assert r["len"] == [4096] * 6 and r["op"] == [Op.WRITE] * 6
    assert r["vcpu"] == [0, 1, 0, 0, 1, 1]
    assert r["value"] == list(range(6))
    meta = read_meta(out)
    assert meta.vcpus == 2 and meta.source["importer"] == "dirtylog" and meta.source["interval_ns"] == 1000


def test_dirtylog_same_result_across_batch_boundaries(tmp_path):
    src = DATA / "dirtylog.csv"
    whole = import_trace(src, tmp_path / "a.arrow", ImportOptions("dirtylog", interval_ns=1000))
    small = import_trace(src, tmp_path / "b.arrow", ImportOptions("dirtylog", interval_ns=1000, batch_rows=1))
    assert whole.digest == small.digest


def test_dirtylog_parquet_with_t_ns_and_gpa(tmp_path):
    table = pa.table({"ts": [100, 100, 200], "addr": [0x1234, 0x5000, 0x1FFF]})
    pq.write_table(table, tmp_path / "d.parquet")
    out = tmp_path / "d.arrow"
    cols = parse_columns("t_ns=ts,gpa=addr")
    import_trace(tmp_path / "d.parquet", out, ImportOptions("dirtylog", columns=cols))
    r = rows(out)
    assert r["t_ns"] == [100, 100, 200]  # no --interval-ns: each interval's pages at its start
    assert r["gpa"] == [0x1000, 0x5000, 0x1000]
    import_trace(tmp_path / "d.parquet", out, ImportOptions("dirtylog", columns=cols, interval_ns=100))
    assert rows(out)["t_ns"] == [100, 150, 200]


def test_dirtylog_overlapping_intervals(tmp_path):
    src = write(tmp_path, "d.csv", "t_ns,gfn\n0,1\n50,2\n")
    with pytest.raises(TraceError, match="row 1 .*before the previous one"):
        import_trace(src, tmp_path / "o.arrow", ImportOptions("dirtylog", interval_ns=100))
    assert not (tmp_path / "o.arrow").exists()


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no output


BAD = [
    ("csv", "t_ns,addr\n1,0\n", [], "no 'gpa' column"),
    ("csv", "t_ns,gpa\n5,0\n1,0\n", [], "row 1 (line 3): t_ns 1 < previous 5"),
    ("csv", "t_ns,gpa\n1,0\n", ["--columns", "t_ns:ts"], "not TRACE_COLUMN=INPUT_COLUMN"),
    ("csv", "t_ns,gpa\n1,0\n", ["--columns", "speed=x"], "unknown column 'speed'"),
    ("csv", "t_ns,gpa\n1,0\n", ["--columns", "gpa=addr"], "no column 'addr'"),
    ("csv", "t_ns,gpa\n1,0\n2,4194304\n", ["--guest-size", "4MiB"], "row 1 (line 3): gpa 0x400000 + len 8 beyond guest size"),
    ("csv", "t_ns,gpa\n1,abc\n", [], "row 0 (line 2): gpa 'abc' is not an unsigned 64-bit integer"),
    ("csv", "t_ns,gpa\n1,-4\n", [], "gpa '-4' is not an unsigned"),
    ("csv", "t_ns,gpa,op\n1,0,jump\n", [], "unknown op 'jump'"),
    ("csv", "t_ns,gpa,op\n1,0,7\n", [], "unknown op '7'"),
    ("csv", "t_ns,gpa,len\n1,0,0\n", [], "len 0"),
    ("csv", "t_ns,gpa,vcpu\n1,0,3\n", ["--vcpus", "2"], "vcpu 3 out of range"),
    ("csv", "t_ns,gpa\n1,\n", [], "row 0 (line 2): gpa '' is not"),
    ("csv", "t_ns,gpa\n", [], "no rows"),
    ("dirtylog", "interval,gfn\n0,1\n", [], "--interval-ns"),
    ("dirtylog", "interval,gfn\n2,1\n1,1\n", ["--interval-ns", "10"], "row 1 (line 3): interval start 10 < previous 20"),
    ("dirtylog", "when,gfn\n0,1\n", [], "no 't_ns' or 'interval' column"),
]


@pytest.mark.parametrize("fmt,text,extra,message", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_input(tmp_path, capsys, fmt, text, extra, message):
    src = write(tmp_path, "in.csv", text)
    out = tmp_path / "out.arrow"
    assert main(["import", fmt, str(src), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]  # no output, no temporaries


def test_nonexistent_file(tmp_path, capsys):
    out = tmp_path / "o.arrow"
    assert main(["import", "parquet", str(tmp_path / "missing.parquet"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.parquet: no such file" in err and not out.exists()


def test_not_a_parquet_file(tmp_path, capsys):
    src = write(tmp_path, "x.parquet", "t_ns,gpa\n1,2\n")
    assert main(["import", "parquet", str(src), "--out", str(tmp_path / "o.arrow")]) == 2
    assert "cannot read as parquet" in capsys.readouterr().err


def test_parquet_float_column_rejected(tmp_path):
    pq.write_table(pa.table({"t_ns": [1.5], "gpa": [0]}), tmp_path / "f.parquet")
    with pytest.raises(TraceError, match="column t_ns has type double, expected integers"):
        import_trace(tmp_path / "f.parquet", tmp_path / "o.arrow", ImportOptions("parquet"))


def test_options_validation():
    with pytest.raises(UsageError):
        ImportOptions("xml")
    with pytest.raises(UsageError):
        ImportOptions("csv", interval_ns=5)
    with pytest.raises(UsageError):
        parse_columns("t_ns=a,t_ns=b")
