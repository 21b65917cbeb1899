"""The run-record reader's and writer's own rules (replay/runs/record.py), each at its exact boundary.

Size limits (a file one byte over is refused, one at the limit is read), what ``replay verify`` checks
about the rows (an equal time or an equal raised/served time is fine, one ns back is not, and the row named
is the first offending one), which table files a summary must list, and the exact one-line messages. The
expected values are written out here from the documented rules, never taken from the writer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc
import pytest
import runfixtures

from replay.core.errors import RunDirError
from replay.runs import record
from replay.runs.record import (EVENTS_SCHEMA, check_run_dir, content_hash, load_run, parse_table,
                                read_record_file, record_digest, write_run)

REPO = Path(__file__).resolve().parent.parent


def _with(table: pa.Table, column: str, values: list) -> pa.Table:
    i = table.schema.get_field_index(column)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


def _run(path: Path, *, rounds: pa.Table | None = None, events: pa.Table | None = None,
         faults: pa.Table | None = None, mode: str = "precopy") -> Path:
    summary = runfixtures.base_summary(mode=mode)
    if mode != "precopy":
        summary["metrics"] = runfixtures.merge(summary["metrics"], runfixtures.postcopy_metrics())
        summary["scenario"]["migration"]["mode"] = mode
    return write_run(path, summary, rounds if rounds is not None else runfixtures.make_rounds(3),
                     events if events is not None else runfixtures.make_events(6), faults)


def _edit_summary(run: Path, change) -> None:
    """Change summary.json and re-seal it (a forged record: only the deeper checks can refuse it)."""
    s = json.loads((run / "summary.json").read_text())
    change(s)
    s["record_digest"] = record_digest(s)
    (run / "summary.json").write_text(json.dumps(s))


def _refused(run: Path, message: str, *, complete: bool = False) -> None:
    with pytest.raises(RunDirError) as e:
        check_run_dir(run, complete=complete)
    assert str(e.value) == message


# ---------------------------------------------------------------------------------------------- writer


def test_the_record_is_format_snp_replay_run_version_1(tmp_path):
    s = json.loads((_run(tmp_path / "r") / "summary.json").read_text())
    assert (s["format"], s["version"]) == ("snp-replay-run", 1)
    run = _run(tmp_path / "v2")
    _edit_summary(run, lambda s: s.update(version=2))
    _refused(run, f"{run / 'summary.json'}: run record version 2 is not understood (this tool reads version 1)")


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, "summary must carry format/version"),
    ({"version": 2}, "summary must carry format/version"),
    ({"status": "paused"}, "summary status must be one of ('completed', 'aborted', 'cancelled', 'failed')"),
])
def test_write_run_refuses_a_summary_it_would_not_read_back(tmp_path, change, message):
    # Either key wrong on its own is enough.
    summary = {**runfixtures.base_summary(), **change}
    with pytest.raises(ValueError) as e:
        write_run(tmp_path / "r", summary, runfixtures.make_rounds(2), runfixtures.make_events(3))
    assert str(e.value) == message
    assert not (tmp_path / "r").exists()


def test_a_value_beyond_its_column_is_one_line_with_the_library_message_cut_to_200(tmp_path):
    rounds = runfixtures.make_rounds(1)
    i = rounds.schema.get_field_index("sync_ns")
    rounds = rounds.set_column(i, "sync_ns", pa.array(["9" * 300]))
    with pytest.raises(RunDirError) as e:
        write_run(tmp_path / "r", runfixtures.base_summary(), rounds, runfixtures.make_events(3))
    quoted = ("Failed to parse string: '" + "9" * 300)[:200]
    assert str(e.value) == (f"rounds.arrow: a value does not fit the run record ({quoted}); "
                            "the scenario's times or sizes are too large")
    assert not (tmp_path / "r").exists()


def test_extra_files_are_written_beside_the_tables(tmp_path):
    run = write_run(tmp_path / "r", runfixtures.base_summary(), runfixtures.make_rounds(2),
                    runfixtures.make_events(3), extra_files={"notes.txt": b"kept\n"})
    assert (run / "notes.txt").read_bytes() == b"kept\n"
    assert sorted(p.name for p in run.iterdir()) == ["events.arrow", "notes.txt", "rounds.arrow", "summary.json"]


def test_a_run_read_back_is_frozen(tmp_path):
    run = load_run(_run(tmp_path / "r"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.summary = {}  # type: ignore[misc]


def test_writing_a_run_record_does_not_import_polars():
    # polars is for reading runs back; every `replay run` writes one and should not pay for the import.
    code = "import sys, replay.runs.record; print(sorted(m for m in sys.modules if m.split('.')[0] == 'polars'))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    p = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, cwd=REPO)
    assert p.returncode == 0 and p.stdout == "[]\n", p.stderr


# ---------------------------------------------------------------------------------------------- file reads


def test_read_record_file_reads_up_to_its_limit_inclusive(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"0123456789")
    assert read_record_file(p, 10) == b"0123456789"
    with pytest.raises(RunDirError) as e:
        read_record_file(p, 9)
    assert str(e.value) == f"{p}: 10 bytes, larger than any run record (9)"
    with pytest.raises(RunDirError) as e:
        read_record_file(tmp_path / "nope")
    assert str(e.value) == f"{tmp_path / 'nope'}: missing (not a complete run directory)"


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def test_a_table_file_over_4_gib_is_refused_before_it_is_read(tmp_path):
    # 8 GiB + 1 byte (sparse: nothing is allocated): over the 4 GiB limit, and the message names the limit.
    run = _run(tmp_path / "r")
    _sparse(run / "rounds.arrow", (8 << 30) + 1)
    _refused(run, f"{run / 'rounds.arrow'}: 8589934593 bytes, larger than any run record (4294967296)")


def test_a_summary_over_64_mib_is_refused_before_it_is_read(tmp_path):
    run = _run(tmp_path / "r")
    _sparse(run / "summary.json", (128 << 20) + 1)
    _refused(run, f"{run / 'summary.json'}: 134217729 bytes, larger than any run record (67108864)")


def test_a_read_error_names_the_system_error_or_the_message_cut_to_200(tmp_path, monkeypatch):
    p = tmp_path / "f"
    p.write_bytes(b"x")

    def failing(exc):
        def open_(*a, **k):
            raise exc
        return open_

    monkeypatch.setattr(record, "open", failing(OSError(5, "Input/output error")), raising=False)
    with pytest.raises(RunDirError) as e:
        read_record_file(p)
    assert str(e.value) == f"{p}: cannot read (Input/output error)"
    monkeypatch.setattr(record, "open", failing(OSError("no\nerrno " + "z" * 300)), raising=False)
    with pytest.raises(RunDirError) as e:
        read_record_file(p)
    assert str(e.value) == f"{p}: cannot read ({('no errno ' + 'z' * 300)[:200]})"


def test_an_arrow_error_is_quoted_cut_to_200(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise pa.ArrowInvalid("bad\nfooter " + "q" * 300)

    monkeypatch.setattr(pyarrow.ipc, "open_file", boom)
    with pytest.raises(RunDirError) as e:
        parse_table(tmp_path / "e.arrow", b"", EVENTS_SCHEMA)
    assert str(e.value) == f"{tmp_path / 'e.arrow'}: not a valid Arrow file ({('bad footer ' + 'q' * 300)[:200]})"


# ---------------------------------------------------------------------------------------------- parse_table


def _ipc(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def test_a_null_in_a_non_null_column_is_refused_by_name(tmp_path):
    # Arrow lets a file declare a column non-null and still carry a validity bitmap with a null in it.
    schema = pa.schema([pa.field("a", pa.uint32(), nullable=False), pa.field("b", pa.uint32(), nullable=False)])
    ok = pa.RecordBatch.from_arrays([pa.array([1, 2], pa.uint32()), pa.array([3, 4], pa.uint32())], schema=schema)
    assert parse_table(tmp_path / "t", _ipc(ok), schema).column("b").to_pylist() == [3, 4]
    bad = pa.RecordBatch.from_arrays([pa.array([1, 2], pa.uint32()), pa.array([3, None], pa.uint32())], schema=schema)
    with pytest.raises(RunDirError) as e:
        parse_table(tmp_path / "t", _ipc(bad), schema)
    assert str(e.value) == f"{tmp_path / 't'}: nulls in column b"


def test_every_batch_of_a_table_is_read(tmp_path):
    schema = pa.schema([pa.field("a", pa.uint32(), nullable=False)])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as w:
        for v in ([1, 2], [3], [4, 5, 6]):
            w.write_batch(pa.RecordBatch.from_arrays([pa.array(v, pa.uint32())], schema=schema))
    got = parse_table(tmp_path / "t", sink.getvalue().to_pybytes(), schema)
    assert got.column("a").to_pylist() == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------- summary


def test_no_summary_and_a_dangling_summary_link_are_told_apart(tmp_path):
    run = _run(tmp_path / "r")
    (run / "summary.json").unlink()
    _refused(run, f"{run}: no summary.json (not a run directory)")
    (run / "summary.json").symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(RunDirError) as e:
        check_run_dir(run)
    assert str(e.value).startswith(f"{run / 'summary.json'}: ") and "no summary.json" not in str(e.value)


def test_a_summary_that_is_not_an_object_is_refused(tmp_path):
    run = _run(tmp_path / "r")
    (run / "summary.json").write_text("[1]")
    _refused(run, f"{run / 'summary.json'}: format is not 'snp-replay-run'")


@pytest.mark.parametrize("tables", [["rounds.arrow"], {"rounds.arrow": 5, "events.arrow": "e"}, None])
def test_table_hashes_must_be_a_map_of_strings(tmp_path, tables):
    run = _run(tmp_path / "r")
    _edit_summary(run, lambda s: s.update(tables=tables) if tables is not None else s.pop("tables"))
    _refused(run, f"{run / 'summary.json'}: no table hashes (a record from an older snp-replay, or tampered with)")


@pytest.mark.parametrize("drop, add", [(None, "x.arrow"), ("rounds.arrow", None), ("events.arrow", None)])
def test_the_summary_lists_rounds_and_events_and_nothing_unknown(tmp_path, drop, add):
    run = _run(tmp_path / "r")

    def change(s):
        if drop:
            del s["tables"][drop]
        if add:
            s["tables"][add] = "0" * 64
    _edit_summary(run, change)
    _refused(run, f"{run / 'summary.json'}: tables must list rounds.arrow, events.arrow and optionally faults.arrow")


@pytest.mark.parametrize("link", [False, True])
def test_a_faults_file_the_summary_does_not_list_is_refused(tmp_path, link):
    run = _run(tmp_path / "r")
    if link:
        (run / "faults.arrow").symlink_to(tmp_path / "nowhere.arrow")
    else:
        (run / "faults.arrow").write_bytes(b"")
    _refused(run, f"{run / 'faults.arrow'}: not listed in summary.json (not part of this run record)")


# ---------------------------------------------------------------------------------------------- row order


def test_row_order_is_checked_only_when_asked(tmp_path):
    events = runfixtures.make_events(4)
    run = _run(tmp_path / "r", events=_with(events, "seq", [0, 1, 3, 2]))
    assert check_run_dir(run)[1]["events"].column("seq").to_pylist() == [0, 1, 3, 2]
    with pytest.raises(TypeError):  # keyword-only: a bare True would not say what it asks for
        check_run_dir(run, True)
    _refused(run, f"{run / 'events.arrow'}: row 2: seq 3, expected 2", complete=True)


def test_events_at_one_time_pass_and_one_ns_back_is_the_row_named(tmp_path):
    events = runfixtures.make_events(5)
    run = _run(tmp_path / "same", events=_with(events, "t_ns", [0, 10, 10, 10, 11]))
    check_run_dir(run, complete=True)
    # Row 3 goes back, yet stays above row 0: the check compares each row with the one before it.
    run = _run(tmp_path / "back", events=_with(events, "t_ns", [0, 10, 10, 9, 11]))
    _refused(run, f"{run / 'events.arrow'}: row 3: t_ns goes back in time", complete=True)


def test_the_first_misnumbered_round_is_named(tmp_path):
    rounds = runfixtures.make_rounds(4)
    run = _run(tmp_path / "r", rounds=_with(rounds, "round", [0, 1, 3, 3]))
    _refused(run, f"{run / 'rounds.arrow'}: row 2: round 3, expected 2", complete=True)


def test_a_fault_served_when_raised_passes_and_one_ns_early_is_the_row_named(tmp_path):
    faults = runfixtures.make_faults(4)
    raised = [100, 200, 300, 400]
    run = _run(tmp_path / "ok", faults=_with(_with(faults, "raised_ns", raised), "served_ns", [100, 250, 300, 400]),
               mode="postcopy")
    assert check_run_dir(run, complete=True)[1]["faults"].num_rows == 4
    run = _run(tmp_path / "bad", faults=_with(_with(faults, "raised_ns", raised), "served_ns", [100, 250, 300, 399]),
               mode="postcopy")
    _refused(run, f"{run / 'faults.arrow'}: row 3: served before it was raised", complete=True)


def test_a_precopy_record_with_faults_listed_reads_them(tmp_path):
    run = _run(tmp_path / "r", faults=runfixtures.make_faults(2))
    assert check_run_dir(run, complete=True)[1]["faults"].column("gfn").to_pylist() == [1000, 1001]
    assert content_hash((run / "faults.arrow").read_bytes()) == json.loads((run / "summary.json").read_text())[
        "tables"]["faults.arrow"]


def test_a_table_of_another_schema_is_refused_naming_the_expected_one(tmp_path):
    schema = pa.schema([pa.field("a", pa.uint32(), nullable=False), pa.field("b", pa.string(), nullable=False)])
    other = pa.schema([pa.field("a", pa.uint64(), nullable=False), pa.field("b", pa.string(), nullable=False)])
    batch = pa.RecordBatch.from_arrays([pa.array([1], pa.uint64()), pa.array(["x"])], schema=other)
    with pytest.raises(RunDirError) as e:
        parse_table(tmp_path / "t", _ipc(batch), schema)
    assert str(e.value) == f"{tmp_path / 't'}: schema differs from the run record's (a: uint32, b: string)"
