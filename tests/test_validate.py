"""The validation layer and the write-safety rules of issue 14, on small hand-built cases.

Each rule has a test at its exact boundary (the last value accepted, the first refused) and, for the
integrity and no-partial-output guarantees, a test that injects the fault the rule is there to catch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pytest

from replay.core import validate
from replay.cli import main
from replay.core.errors import ScenarioError, TraceError
from replay.scenario.spec import MigrationSpec, make_scenario, parse_scenario_text
from replay.traces.format import TraceWriter, open_trace

GEN = {"generator": "uniform", "events": 10}
SCENARIO = """\
name = "v"
seed = 1
[trace]
file = "t.arrow"
[migration]
start_ns = 100
max_rounds = 3
"""


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("replay: error: "), err
    assert len(err) <= 400 and "Traceback" not in err
    return err.strip()


def write_small_trace(path: Path, rows: int = 64, value_of=lambda i: i) -> None:
    """64 writes, one per page of a 64-page guest, 1 us apart (all valid)."""
    with TraceWriter(path, guest_bytes=64 * 4096, vcpus=1, source={"test": "validate"}) as w:
        import numpy as np

        i = np.arange(rows, dtype=np.uint64)
        w.write(i * 1000, 0, (i % 64) * 4096, 8, 0, np.array([value_of(k) for k in range(rows)], dtype=np.uint64))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_small_trace(tmp_path / "t.arrow")
    (tmp_path / "s.toml").write_text(SCENARIO)
    return tmp_path


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# ----------------------------------------------------------------------------------------- quoting


def test_short_quotes_a_prefix_and_says_how_long():
    assert validate.short("abc") == "'abc'"
    text = validate.short("x" * 1000)
    assert text == "'" + "x" * 59 + "... (1002 chars)"
    assert validate.short([[1]] * 3) == "[[1], [1], [1]]"


def test_long_bad_value_is_quoted_short():
    with pytest.raises(ScenarioError) as ei:
        make_scenario(trace=GEN, migration={"strategy": "y" * 3_000})
    assert len(str(ei.value)) < 200 and "(3002 chars) is not one of mirror-vm, shadow-vcpu" in str(ei.value)


# ----------------------------------------------------------------------------------------- key rules


@pytest.mark.parametrize(
    "section, key, ok, bad",
    [
        ("migration", "max_rounds", 100_000, 100_001),
        ("migration", "max_rounds", 1, 0),
        ("migration", "precopy_rounds", 100_000, 100_001),
        ("migration", "bandwidth_bytes_per_s", (1 << 62) - 1, 1 << 62),
        ("migration", "latency_ns", 1 << 41, (1 << 41) + 1),
        ("guest", "vcpus", 65_536, 65_537),
        ("guest", "guest_bytes", (1 << 44) - (1 << 22), (1 << 44) - (1 << 22) + 4096),  # room for 1,024 VMSA gfns
        ("guest", "os_vmpl", 3, 4),
        ("guest", "asid", 1, 0),
        ("costs", "page_pack_ns", 1 << 41, (1 << 41) + 1),
        ("trace", "seed", -1, -2),
        ("fault", "duration_ns", -1, -2),
    ],
)
def test_integer_key_boundaries(section, key, ok, bad):
    def build(value):
        if section == "fault":
            return make_scenario(trace=GEN, fault=[{"at_ns": 1, key: value}])
        if section == "trace":
            return make_scenario(trace={**GEN, key: value})
        return make_scenario(trace=GEN, **{section: {key: value}})

    build(ok)
    with pytest.raises(ScenarioError, match=rf"{section}(\[0\])?\.{key}: must be"):
        build(bad)


def test_unit_is_named_in_the_message():
    with pytest.raises(ScenarioError, match=r"migration\.max_rounds: must be <= 100000 rounds, got 100001"):
        make_scenario(trace=GEN, migration={"max_rounds": 100_001})
    with pytest.raises(ScenarioError, match=r"costs\.vmsa_bytes: expected an integer \(bytes\), got 'x'"):
        make_scenario(trace=GEN, costs={"vmsa_bytes": "x"})


def test_a_new_field_gets_checks_from_its_default(monkeypatch):
    """Keys are checked from the dataclass fields: a field the lead adds is typed and ranged by name."""
    assert validate.key_rule("migration", "new_timeout_ns") == (0, validate.ENGINE_MAX, "ns")
    assert validate.key_rule("costs", "new_cost_ns") == (0, validate.COST_MAX, "ns")
    with pytest.raises(ScenarioError, match="expected true or false"):
        validate.check_key("kernel", "new_cap", 1, True, "x")
    with pytest.raises(ScenarioError, match="NUL"):
        validate.check_key("trace", "new_name", "a\x00b", "", "x")


@pytest.mark.parametrize(
    "override, message",
    [
        ("migration.mode.x=1", r"migration\.mode is a single value, not a table"),
        ("migration..mode=precopy", "empty key name"),
        ("migration.mode=", "empty value"),
        ("migration.max_rounds=18446744073709551616", r"must be <= 100000 rounds"),
        ("costs.batch_pages=" + "[" * 3000, "nested too deeply"),
        ("migration.stratgy=mirror-vm", r"did you mean 'strategy'"),
    ],
)
def test_set_errors(override, message):
    with pytest.raises(ScenarioError, match=message):
        parse_scenario_text('[trace]\ngenerator = "uniform"\nevents = 10\n', overrides=[override])


def test_deep_toml_is_a_scenario_error_not_a_recursion_error():
    deep = "x = " + "[" * 5000 + "]" * 5000
    with pytest.raises(ScenarioError, match="nested"):
        parse_scenario_text(deep)


# ----------------------------------------------------------------------------------------- resources


def test_memory_estimate_refuses_with_both_figures(workdir, capsys, monkeypatch):
    need = validate.run_memory_bytes(64 * 4096, 1)
    assert need == 64 * 24 + 64 + (256 << 20)
    monkeypatch.setattr(validate, "available_memory_bytes", lambda: need - 1)
    assert main(["run", "s.toml", "--out", "run", "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert "needs about 256.0 MiB of memory but this machine has 256.0 MiB available (--allow-memory" in err
    assert not (workdir / "run").exists()
    assert main(["run", "s.toml", "--out", "run", "--no-progress", "--allow-memory"]) == 0
    monkeypatch.setattr(validate, "available_memory_bytes", lambda: need)  # exactly enough: no refusal
    assert main(["run", "s.toml", "--out", "run2", "--no-progress"]) == 0


def test_inspect_memory_check(workdir, capsys, monkeypatch):
    monkeypatch.setattr(validate, "available_memory_bytes", lambda: 1)
    assert main(["inspect", "t.arrow"]) == 2
    assert "of memory but this machine has" in one_line_error(capsys)
    assert main(["inspect", "t.arrow", "--allow-memory"]) == 0


# ----------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "s.toml", "--out", "t.arrow", "--no-progress"],
        ["run", "s.toml", "--out", "s.toml", "--no-progress"],
        ["run", "s.toml", "--out", ".", "--no-progress"],
        ["run", "s.toml", "--out", "t.arrow/run", "--no-progress"],
        ["compare", "s.toml", "--out", ".", "--no-progress"],
        ["import", "csv", "in.csv", "--out", "in.csv"],
        ["import", "csv", "in.csv", "--out", "link/in.csv"],
        ["report", "r", "--out", "r/summary.json"],
        ["report", "r", "--out", "r"],
        ["report", "r", "--out", "."],
        ["run", "s.toml", "--out", "keep", "--no-progress"],
    ],
)
def test_outputs_never_overwrite_inputs(workdir, capsys, argv):
    (workdir / "in.csv").write_text("t_ns,gpa\n0,0\n")
    (workdir / "link").symlink_to(workdir)
    (workdir / "keep").mkdir()
    (workdir / "keep" / "notes.txt").write_text("mine")
    assert main(["run", "s.toml", "--out", "r", "--no-progress"]) == 0
    capsys.readouterr()
    before = snapshot(workdir)
    assert main(argv) == 2
    one_line_error(capsys)
    assert snapshot(workdir) == before


def test_a_previous_run_directory_is_replaced(workdir, capsys):
    assert main(["run", "s.toml", "--out", "r", "--no-progress"]) == 0
    assert main(["run", "s.toml", "--out", "r", "--no-progress", "--strategy", "shadow-vcpu"]) == 0
    assert json.loads((workdir / "r" / "summary.json").read_text())["strategy"] == "shadow-vcpu"


def test_fifo_inputs_are_refused(workdir, capsys):
    os.mkfifo(workdir / "f")
    for argv in (["inspect", "f"], ["run", "f", "--out", "o"], ["import", "csv", "f", "--out", "o.arrow"]):
        assert main(argv) == 2
        assert "not a regular file" in one_line_error(capsys)


def test_compare_failing_on_the_second_strategy_leaves_nothing(workdir, capsys):
    # shadow APIC IDs overlapping the guest's: only the shadow-vcpu run (in its own worker process) fails
    before = snapshot(workdir)
    assert main(["compare", "s.toml", "--out", "cmp", "--no-progress", "--set", "migration.shadow_apic_id_base=0"]) == 2
    assert "overlap the guest's APIC IDs" in one_line_error(capsys)
    assert snapshot(workdir) == before  # no cmp/, no cmp/mirror-vm, no temporary directory
    assert main(["compare", "s.toml", "--out", "cmp", "--no-progress"]) == 0
    assert sorted(p.name for p in (workdir / "cmp").iterdir()) == ["mirror-vm", "report.html", "shadow-vcpu"]
    assert "cmp/mirror-vm" in (workdir / "cmp" / "report.html").read_text()  # not the temporary path


def test_empty_strings_are_not_absent(workdir, capsys):
    assert main(["run", "s.toml", "--out", "o", "--trace", "", "--no-progress"]) == 2
    assert "trace path is empty" in one_line_error(capsys)
    assert main(["import", "csv", "s.toml", "--out", "o.arrow", "--guest-size", ""]) == 2
    assert "--guest-size: cannot parse ''" in one_line_error(capsys)


# ----------------------------------------------------------------------------------------- integrity


def _same_metadata_other_rows(src: Path, dst: Path) -> None:
    """Rewrite ``src`` with one value changed but its metadata (and so its recorded digest) kept."""
    with pa.memory_map(str(src)) as f:
        table = pa.ipc.open_file(f).read_all()
    values = table.column("value").to_pylist()
    values[5] += 1
    table = table.set_column(5, table.schema.field(5), pa.array(values, pa.uint64()))
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


def test_digest_is_checked_on_every_full_read(workdir, capsys):
    _same_metadata_other_rows(workdir / "t.arrow", workdir / "bad.arrow")
    with open_trace(workdir / "bad.arrow") as r, \
            pytest.raises(TraceError, match=r"bad\.arrow: content digest [0-9a-f]{16}\.\.\. does not match"):
        for _ in r:
            pass
    for argv in (["inspect", "bad.arrow"], ["verify", "bad.arrow"],
                 ["run", "s.toml", "--trace", "bad.arrow", "--out", "o", "--no-progress"]):
        assert main(argv) == 2
        assert "does not match the metadata's" in one_line_error(capsys)
    assert not (workdir / "o").exists()


def test_verify_trace_and_run_dir(workdir, capsys):
    assert main(["run", "s.toml", "--out", "r", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["verify", "t.arrow", "r"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("t.arrow: ok: trace (64 events, 1 batches, digest ")
    assert out[1].startswith("r: ok: run directory (mirror-vm precopy, completed; rounds ")


def _rewrite_summary(run: Path, change) -> None:
    from replay.runs.record import record_digest

    s = json.loads((run / "summary.json").read_text())
    change(s)
    s["record_digest"] = record_digest(s)
    (run / "summary.json").write_text(json.dumps(s))


def test_verify_checks_row_order(workdir, capsys):
    """A record whose hashes were recomputed after reordering its events passes the loader's checks but
    not verify's (events numbered 0..n-1 in time order)."""
    from replay.runs.record import EVENTS_SCHEMA, content_hash

    assert main(["run", "s.toml", "--out", "r", "--no-progress"]) == 0
    capsys.readouterr()
    run = workdir / "r"
    with pa.memory_map(str(run / "events.arrow")) as f:
        ev = pa.ipc.open_file(f).read_all()
    ev = pa.concat_tables([ev.slice(1), ev.slice(0, 1)]).combine_chunks()
    with pa.OSFile(str(run / "events.arrow"), "wb") as sink, pa.ipc.new_file(sink, EVENTS_SCHEMA) as w:
        w.write_table(ev)
    _rewrite_summary(run, lambda s: s["tables"].update({"events.arrow": content_hash((run / "events.arrow").read_bytes())}))
    assert main(["diff", "r", "r"]) == 0
    capsys.readouterr()
    assert main(["verify", "r"]) == 2
    assert "events.arrow: row 0: seq 1, expected 0" in one_line_error(capsys)


def test_tampered_run_dirs_are_refused_by_every_reader(workdir, capsys):
    assert main(["run", "s.toml", "--out", "r", "--no-progress"]) == 0
    capsys.readouterr()
    data = bytearray((workdir / "r" / "rounds.arrow").read_bytes())
    data[len(data) // 2] ^= 1
    (workdir / "r" / "rounds.arrow").write_bytes(bytes(data))
    for argv in (["diff", "r", "r"], ["report", "r", "--out", "x.html"], ["verify", "r"]):
        assert main(argv) == 2
        assert "rounds.arrow: content hash mismatch" in one_line_error(capsys)
    assert not (workdir / "x.html").exists()


def test_write_run_records_hashes(tmp_path):
    import runfixtures

    from replay.runs.record import load_run

    def blake(data: bytes) -> str:
        return hashlib.blake2b(data, digest_size=32).hexdigest()

    run = runfixtures.make_run(tmp_path / "a")
    s = json.loads((run / "summary.json").read_text())
    assert s["tables"] == {n: blake((run / n).read_bytes()) for n in ("events.arrow", "rounds.arrow")}
    # The summary's canonical JSON (sorted keys, 2-space indent, a final newline) without record_digest.
    rest = {k: v for k, v in s.items() if k != "record_digest"}
    assert s["record_digest"] == blake((json.dumps(rest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode())
    assert dataclasses.is_dataclass(load_run(run))


def test_hybrid_rounds_are_bounded():
    """precopy_rounds = 2^64 once ran forever; it is now refused at load, naming the bound."""
    with pytest.raises(ScenarioError, match=r"migration\.precopy_rounds: must be <= 100000 rounds, got 18446744073709551616"):
        make_scenario(trace=GEN, migration={"mode": "hybrid", "precopy_rounds": 1 << 64})
    assert MigrationSpec().max_rounds <= validate.MAX_ROUNDS


def test_a_verified_trace_is_not_hashed_again_in_the_same_process(workdir, monkeypatch):
    from replay.traces import format as trace

    calls = []
    real = trace._hash_into
    monkeypatch.setattr(trace, "_hash_into", lambda h, cols: (calls.append(1), real(h, cols)))
    monkeypatch.setattr(trace, "_VERIFIED", set())
    for _ in range(2):
        with open_trace(workdir / "t.arrow") as r:
            for _ in r:
                pass
            assert r.content_digest == r.meta.digest
    assert len(calls) == 1  # one batch, hashed by the first read only
    _same_metadata_other_rows(workdir / "t.arrow", workdir / "t2.arrow")
    os.replace(workdir / "t2.arrow", workdir / "t.arrow")  # a new file: verified afresh, and refused
    with open_trace(workdir / "t.arrow") as r, pytest.raises(TraceError, match="does not match"):
        for _ in r:
            pass
    assert len(calls) == 2


def test_round_budget_scales_with_the_guest():
    """Each round scans every page: rounds x pages is bounded (2^35), but any guest may have 1,000 rounds."""
    assert validate.max_rounds_for(64) == 100_000
    assert validate.max_rounds_for(1 << 22) == 8192  # 16 GiB
    assert validate.max_rounds_for(1 << 32) == 1000  # the largest guest the engines hold
    m = MigrationSpec(mode="hybrid", precopy_rounds=8193)
    with pytest.raises(ScenarioError, match=r"migration\.precopy_rounds 8193 is too many for a guest of 4194304 pages: at most 8192"):
        validate.check_round_budget(m, 1 << 22)
    validate.check_round_budget(dataclasses.replace(m, precopy_rounds=8192), 1 << 22)


def test_failed_write_leaves_no_parent_directories(workdir, capsys, monkeypatch):
    from replay.migration import runner

    def fails(*a, **kw):
        raise TraceError("injected failure")

    monkeypatch.setattr(runner, "run_parallel", fails)
    before = snapshot(workdir)
    assert main(["compare", "s.toml", "--out", "new/deeper/cmp", "--no-progress"]) == 2
    assert snapshot(workdir) == before  # neither new/ nor new/deeper/ is left


def test_require_regular_names_a_directory_by_what_was_expected(tmp_path):
    # (issue 22) A directory where a trace is expected says "not a trace file"; elsewhere "not a file".
    from replay.core.errors import TraceError, UsageError
    from replay.core.paths import require_regular

    with pytest.raises(TraceError) as e:
        require_regular(tmp_path, TraceError)
    assert str(e.value).endswith(": is a directory, not a trace file")
    with pytest.raises(UsageError) as e:
        require_regular(tmp_path, UsageError)
    assert str(e.value).endswith(": is a directory, not a file")


def test_run_record_tables_have_no_nullable_columns():
    # (issue 22) Every column of every run-record table is declared non-null: a reader of an older record
    # compares schemas exactly, so a column turning nullable would make every older record unreadable.
    from replay.runs.record import TABLES

    for name, schema in TABLES.items():
        assert [f.name for f in schema if f.nullable] == [], name


@pytest.mark.parametrize("section, key, lo, hi", [
    ("guest", "vcpus", 0, None), ("migration", "latency_ns", 0, None),
    ("migration", "agents_max", 1, 1 << 16), ("migration", "shadow_apic_ids", 0, 1 << 16),
    ("adversary", "stream", -1, (1 << 16) - 1)])
def test_key_ranges_at_both_ends(section, key, lo, hi):
    # (issue 22, tools/mutate survivors) Each bound accepted, one past it refused: 0 vCPUs and 0 latency
    # mean "the trace's" and "no latency"; an agent count or APIC range fits 16 bits (65536 included); an
    # adversary's stream is a 16-bit stream number or -1 (none named).
    assert validate.check_key(section, key, lo, 0, "x") == lo
    with pytest.raises(ScenarioError, match=f"must be >= {lo}"):
        validate.check_key(section, key, lo - 1, 0, "x")
    if hi is not None:
        assert validate.check_key(section, key, hi, 0, "x") == hi
        with pytest.raises(ScenarioError, match=f"must be <= {hi}"):
            validate.check_key(section, key, hi + 1, 0, "x")


def test_a_tables_non_finite_floats_are_refused_and_finite_ones_pass():
    # (tools/mutate survivor) trace.options is a free table: a finite float (or a string) passes, NaN and
    # infinities are refused with the key named.
    import math

    s = make_scenario(trace={**GEN, "options": {"share": 0.5, "name": "x"}})
    assert dict(s.trace.options) == {"share": 0.5, "name": "x"}
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ScenarioError, match=r"trace\.options\.share: .* is not a finite number"):
            make_scenario(trace={**GEN, "options": {"share": bad}})


def test_depth_counts_every_level_past_scalars():
    # (tools/mutate survivors) A scalar is depth 0, each dict or list one level; a scalar before a deeper
    # sibling does not stop the count.
    assert validate.depth(5) == 0
    assert validate.depth({"a": 1}) == 1
    assert validate.depth({"a": [1, {"b": 2}]}) == 3
    assert validate.depth([{"x": 1}, 7]) == 2  # the scalar is popped first: the dict still counts
    assert validate.depth({"a": [[[[1]]]]}, limit=3) == 4  # stops past the limit


def test_gib_formats_sizes_from_mib_to_gib():
    assert validate._gib(3 << 20) == "3.0 MiB"
    assert validate._gib((1 << 30) - 1) == "1024.0 MiB"
    assert validate._gib(3 << 30) == "3.00 GiB"


# ---------------------------------------------------------- summary shape and estimates (issue 22 mutants)


def _golden_summary() -> dict:
    return json.loads((Path(__file__).parent / "golden" / "postcopy" / "mirror-vm" / "summary.json").read_text())


def _check(summary):
    from replay.runs.record import MODES, STATUSES, STRATEGIES

    return validate.check_summary(summary, "s.json", strategies=STRATEGIES, modes=MODES, statuses=STATUSES)


def test_summary_first_faults_are_event_kind_gfn():
    s = _golden_summary()
    s["first_faults"] = [[3, "npf", 7], [-1, "rmp", 2]]
    assert _check(s)["first_faults"] == [[3, "npf", 7], [-1, "rmp", 2]]
    for bad in ([3, 4, 7], [3, "npf", "7"], ["3", "npf", 7], [3, "npf"]):
        s["first_faults"] = [bad]
        with pytest.raises(validate.RunDirError, match=r"first_faults\[0\] is not \[event, kind, gfn\]"):
            _check(s)


def test_summary_latency_buckets_need_all_three_integers():
    s = _golden_summary()
    hist = s["metrics"]["postcopy"]["latency_hist"]
    assert hist and _check(s)
    for bad in ({"bucket_us_lo": 0, "bucket_us_hi": 1}, {"bucket_us_lo": 0, "count": 1}, [0, 1, 1], 5):
        s["metrics"]["postcopy"]["latency_hist"] = [hist[0], bad]
        with pytest.raises(validate.RunDirError, match=r"latency_hist\[1\] is not a bucket"):
            _check(s)


def test_inspect_memory_estimate_counts_whole_pages():
    # 3 pages and one byte: 3 whole pages x 2 bitmaps x 1 B, 2 intervals x 16 B, plus the batch overhead.
    got = validate.inspect_memory_bytes(3 * 4096 + 1, intervals=2)
    assert got == 3 * 2 + 2 * 16 + (256 << 20) and type(got) is int


def test_a_run_table_with_bytes_a_cheap_check_passes_is_refused(tmp_path):
    # Structure and buffer sizes are right; only the string bytes are not UTF-8, which the full validation
    # of every batch finds (a cheaper check would hand the bytes on to polars).
    from replay.runs.record import parse_table

    schema = pa.schema([("kind", pa.utf8())])
    bad = pa.Array.from_buffers(pa.utf8(), 2, [None, pa.py_buffer(np.array([0, 2, 4], np.int32).tobytes()),
                                               pa.py_buffer(b"ok\xff\xfe")])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as w:
        w.write_batch(pa.record_batch([bad], schema=schema))
    with pytest.raises(validate.RunDirError, match=r"events\.arrow: not a valid Arrow file \(.*UTF8"):
        parse_table(tmp_path / "events.arrow", sink.getvalue().to_pybytes(), schema)
    good = pa.BufferOutputStream()
    with pa.ipc.new_file(good, schema) as w:
        w.write_batch(pa.record_batch([pa.array(["ok", "no"])], schema=schema))
    assert parse_table(tmp_path / "e.arrow", good.getvalue().to_pybytes(), schema).column(0).to_pylist() == ["ok", "no"]


# Every scenario key's range by hand (issue 22): the numbers are written out here, not taken from the
# module, so a changed limit (a constant, or the table) fails. U64 = 2^64 - 1, I64 = 2^63 - 1, ENGINE =
# 2^62 - 1 (the engine's clock operands), COST = 2^41 (a step of ~36 min or 2 TiB), a run's guest 16 TiB
# - 4 MiB (the SVSM's 1,024 VMSA gfns after it), 2^32 - 1 for APIC IDs and ASIDs.
_U64, _I64, _ENGINE, _COST = 18446744073709551615, 9223372036854775807, 4611686018427387903, 2199023255552
_HAND_RULES = {
    ("", "seed"): (0, _U64, ""),
    ("guest", "guest_bytes"): (0, 17592181850112, "bytes"),
    ("guest", "vcpus"): (0, 65536, "vCPUs"),
    ("guest", "os_vmpl"): (0, 3, "VMPL"),
    ("guest", "apic_id_first"): (0, 4294967295, ""),
    ("guest", "apic_id_last"): (-1, 4294967295, ""),
    ("guest", "asid"): (1, 4294967295, ""),
    ("trace", "events"): (0, _I64, "events"),
    ("trace", "rate"): (1, _I64, "accesses per second"),
    ("trace", "seed"): (-1, _U64, ""),
    ("migration", "bandwidth_bytes_per_s"): (1, _ENGINE, "bytes per second"),
    ("migration", "latency_ns"): (0, _COST, "ns"),
    ("migration", "latency_jitter_ns"): (0, _COST, "ns"),
    ("migration", "max_rounds"): (1, 100000, "rounds"),
    ("migration", "precopy_rounds"): (0, 100000, "rounds"),
    ("migration", "agents_initial"): (1, 65536, "agents"),
    ("migration", "agents_max"): (1, 65536, "agents"),
    ("migration", "shadow_apic_id_base"): (0, 4294967295, ""),
    ("migration", "shadow_apic_ids"): (0, 65536, "APIC IDs"),
    ("migration", "prepage_pages"): (0, 4294967296, "pages"),
    ("costs", "batch_pages"): (1, 4294967296, "pages"),
    ("fault", "duration_ns"): (-1, _ENGINE, "ns"),
    ("adversary", "at_ns"): (-1, _ENGINE, "ns"),
    ("adversary", "stream"): (-1, 65535, ""),
    ("adversary", "sequence"): (-1, _ENGINE, ""),
    ("adversary", "duration_ns"): (-1, _ENGINE, "ns"),
    # keys not in the table: the rule of their name, costs capped at COST, everything else at ENGINE
    ("costs", "rmpadjust_ns"): (0, _COST, "ns"),
    ("costs", "stream_bytes"): (0, _COST, "bytes"),
    ("costs", "agents"): (0, _COST, ""),
    ("kernel", "zero_ns_per_gib"): (0, _ENGINE, "ns"),
    ("kernel", "buffer_bytes_per_s"): (0, _ENGINE, "bytes"),
    ("migration", "downtime_limit_ns"): (0, _ENGINE, "ns"),
    ("migration", "xbzrle_cache_bytes"): (0, _ENGINE, "bytes"),
    ("guest", "something"): (0, _ENGINE, ""),
}


def test_every_listed_key_has_a_hand_checked_range():
    assert set(validate.KEY_RULES) <= set(_HAND_RULES)


@pytest.mark.parametrize("section, key", sorted(_HAND_RULES))
def test_every_key_range_at_both_ends_with_its_unit(section, key):
    lo, hi, unit = _HAND_RULES[(section, key)]
    u = f" {unit}" if unit else ""
    assert validate.check_key(section, key, lo, 0, "w") == lo
    assert validate.check_key(section, key, hi, 0, "w") == hi
    with pytest.raises(ScenarioError) as e:
        validate.check_key(section, key, lo - 1, 0, "w")
    assert str(e.value) == f"w: must be >= {lo}{u}, got {lo - 1}"
    with pytest.raises(ScenarioError) as e:
        validate.check_key(section, key, hi + 1, 0, "w")
    assert str(e.value) == f"w: must be <= {hi}{u}, got {validate.short(hi + 1)}"
    with pytest.raises(ScenarioError) as e:
        validate.check_key(section, key, "1", 0, "w")
    assert str(e.value) == f"w: expected an integer{' (' + unit + ')' if unit else ''}, got '1'"


def test_string_keys_at_their_length_limit():
    # 4,096 characters pass, 4,097 are refused with both figures; a NUL is refused at any length
    assert validate.check_key("", "name", "x" * 4096, "", "w") == "x" * 4096
    with pytest.raises(ScenarioError, match=r"^w: string of 4097 characters \(at most 4096\)$"):
        validate.check_key("", "name", "x" * 4097, "", "w")
    with pytest.raises(ScenarioError, match="NUL"):
        validate.check_key("", "name", "a\x00", "", "w")


def test_quotes_and_nesting_at_their_limits():
    # a bad value is quoted up to 60 characters of its repr; a run record or scenario may nest 32 deep
    assert validate.short("x" * 58) == repr("x" * 58)                     # 60 characters with the quotes
    assert validate.short("x" * 59) == repr("x" * 59)[:60] + "... (61 chars)"
    assert validate.load_json("[" * 32 + "]" * 32, "w") is not None
    with pytest.raises(validate.RunDirError, match="^w: nested deeper than 32 levels$"):
        validate.load_json("[" * 33 + "]" * 33, "w")
    assert validate.depth([[[1]]], limit=32) == 3
    doc = {"a": 1}
    for _ in range(39):
        doc = {"a": doc}
    assert validate.depth(doc) == 33   # 40 deep, past the default limit of 32: it stops counting at 33


def test_clip_keeps_200_characters():
    assert validate.clip("x" * 200) == "x" * 200
    assert validate.clip("x" * 201) == "x" * 200 + "... (201 chars)"


def test_an_import_guest_up_to_16_tib_less_a_page():
    from replay.core.errors import UsageError
    from replay.traces.importers import ImportOptions

    top = (1 << 44) - 4096
    assert ImportOptions(fmt="csv", guest_bytes=top).guest_bytes == 17592186040320
    with pytest.raises(UsageError, match="up to 17592186040320 bytes"):
        ImportOptions(fmt="csv", guest_bytes=top + 4096)


# ------------------------------------------------------------------ paths: how messages show them (issue 22)


def test_paths_are_shown_as_given_up_to_256_printable_characters():
    from replay.core.paths import show

    assert show("a" * 256) == "a" * 256
    assert show("a" * 257) == validate.short("a" * 257)
    assert show("tab\there") == repr("tab\there")      # not printable: quoted, whatever its length
    assert show(Path("x/y")) == "x/y"


def test_an_unreadable_path_names_the_system_error(tmp_path):
    from replay.core.errors import UsageError
    from replay.core.paths import require_regular

    too_long = tmp_path / ("n" * 300)           # a name longer than NAME_MAX: stat fails with ENAMETOOLONG
    with pytest.raises(UsageError) as e:
        require_regular(too_long)
    assert str(e.value).endswith(": cannot open: File name too long")


def test_check_output_sees_every_input_and_the_working_directory(tmp_path, monkeypatch):
    from replay.core.errors import UsageError
    from replay.core.paths import check_output

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(UsageError, match="is the input"):
        check_output("out.json", [None, "", "out.json"])     # absent inputs skipped, the rest still checked
    for cwd_or_parent in (".", "..", str(tmp_path)):
        with pytest.raises(UsageError, match="is or contains the current directory"):
            check_output(cwd_or_parent, [])
    assert check_output("sub/new", []) == Path("sub/new")


def test_a_replaced_directory_must_be_a_real_directory_of_that_kind(tmp_path):
    from replay.core.errors import UsageError
    from replay.core.paths import check_replaceable_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        check_replaceable_dir(tmp_path / "file", [], "run directory")
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        check_replaceable_dir(tmp_path / "link", [], "run directory")
    check_replaceable_dir(tmp_path / "d", [], "run directory")          # empty: fine
    name = "e" * 50
    (tmp_path / "d" / name).write_text("x")
    with pytest.raises(UsageError) as e:
        check_replaceable_dir(tmp_path / "d", ["summary.json"], "run directory")
    # the stray entry quoted to 40 characters of its repr, with its full length
    assert f"(it holds {repr(name)[:40]}... (52 chars))" in str(e.value)


def test_json_nesting_counts_brackets_outside_strings_only():
    # the cheap pre-scan before json.loads: brackets inside strings (also after an escaped quote) do not
    # nest; siblings close what they opened; 32 levels pass and 33 do not, wherever the deep branch is
    deep = "[" * 40 + "]" * 40
    assert validate.load_json(json.dumps({"a": deep}), "w") == {"a": deep}
    assert validate.load_json(json.dumps({"a": '\\"' + deep}), "w") == {"a": '\\"' + deep}
    assert validate.load_json(json.dumps(['"' + deep, "x"]), "w") == ['"' + deep, "x"]
    ok = "[[], " + "[" * 31 + "]" * 31 + "]"
    assert validate.load_json(ok, "w") is not None
    for bad in ("[[], " + "[" * 32 + "]" * 32 + "]", "[" * 33 + "]" * 33,
                '{"a": "[[", "b": ' + "[" * 32 + "]" * 32 + "}"):
        with pytest.raises(validate.RunDirError, match="^w: nested deeper than 32 levels$"):
            validate.load_json(bad, "w")
    with pytest.raises(validate.RunDirError, match=r"^w: malformed JSON \(NaN is not a number\)$"):
        validate.load_json('{"a": NaN}', "w")


# validate.py survivors of the full pass (issue 22)
#
# Every figure below is worked out by hand from the rule in validate.py's comments and docstrings, not
# taken from the module: a changed constant, bound or loop fails here.


def test_a_tables_nesting_stops_at_four_levels():
    # a free table (trace.options) may nest 4 levels (the table itself is the first); the 5th is refused
    four = {"a": {"b": {"c": {"d": 1}}}}
    assert validate.check_key("trace", "options", four, {}, "w") == four
    assert dict(make_scenario(trace={**GEN, "options": four}).trace.options) == four
    with pytest.raises(ScenarioError, match=r"^w: nested deeper than 4 levels$"):
        validate.check_key("trace", "options", {"a": four}, {}, "w")


def test_round_budget_rounds_down_when_pages_do_not_divide_it():
    # a 12 GiB guest: 3 x 2^20 pages; 2^35 / (3 x 2^20) = 32768 / 3 = 10922.67, so at most 10,922 rounds
    assert validate.max_rounds_for(3 << 20) == 10922 and type(validate.max_rounds_for(3 << 20)) is int
    for key in ("max_rounds", "precopy_rounds"):
        m = MigrationSpec(mode="hybrid", **{key: 10922})
        validate.check_round_budget(m, 3 << 20)
        with pytest.raises(ScenarioError) as e:
            validate.check_round_budget(dataclasses.replace(m, **{key: 10923}), 3 << 20)
        assert str(e.value) == (f"migration.{key} 10923 is too many for a guest of 3145728 pages: at most 10922 "
                                f"(rounds x pages <= 2^35, so that a run ends in bounded time)")


def test_run_memory_estimate_counts_whole_pages():
    # 3 pages and one byte: 3 whole pages x 24 B, 2 vCPUs x 64 B, plus the 256 MiB batch overhead
    got = validate.run_memory_bytes(3 * 4096 + 1, 2)
    assert got == 72 + 128 + 268435456 and type(got) is int


def test_inspect_memory_estimate_without_intervals():
    # no intervals by default: 5 pages x 2 bitmaps x 1 B plus the batch overhead only
    assert validate.inspect_memory_bytes(5 * 4096) == 10 + 268435456


def test_generating_a_trace_needs_31_bytes_a_row_of_disk(tmp_path, monkeypatch):
    # the writer's uncompressed first pass: 8 + 2 + 8 + 4 + 1 + 8 = 31 B a row; 10 events plus a fill of
    # the 64-page guest = 74 rows = 2,294 bytes, checked against the free space of the output's directory
    from collections import namedtuple

    from replay import api

    free = {}
    asked = []
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(validate.shutil, "disk_usage", lambda p: (asked.append(p), usage(1 << 40, 0, free["b"]))[1])
    free["b"] = 2293
    with pytest.raises(validate.ResourceError) as e:
        api.generate("uniform", tmp_path / "t.arrow", guest_size=64 * 4096, vcpus=1, events=10, seed=1, fill=True)
    assert str(e.value) == f"gen uniform (74 events) needs about 0.0 MiB of disk in {tmp_path} but only 0.0 MiB is free"
    assert asked == [tmp_path] and not (tmp_path / "t.arrow").exists()
    free["b"] = 2294  # exactly enough
    meta = api.generate("uniform", tmp_path / "t.arrow", guest_size=64 * 4096, vcpus=1, events=10, seed=1, fill=True)
    assert meta.events == 74


def test_disk_check_passes_at_exactly_the_free_space(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(validate.shutil, "disk_usage", lambda p: usage(1 << 40, 0, 3 << 30))
    validate.check_disk(3 << 30, tmp_path, "x")
    with pytest.raises(validate.ResourceError) as e:
        validate.check_disk((3 << 30) + 1, tmp_path, "x")
    assert str(e.value) == f"x needs about 3.00 GiB of disk in {tmp_path} but only 3.00 GiB is free"


def test_gib_switches_to_gib_at_exactly_one_gib():
    assert validate._gib(1 << 30) == "1.00 GiB"
    assert validate._gib(3 << 29) == "1.50 GiB"
    assert validate._gib((1 << 30) - (1 << 20)) == "1023.0 MiB"


# /proc/meminfo as the kernel writes it (values in kB); the first MemAvailable line is the one read
_MEMINFO = b"MemTotal:        1000 kB\nMemFree:          500 kB\nMemAvailable:     750 kB\nMemAvailable:     999 kB\n"


def _fake_machine(monkeypatch, meminfo, sysconf):
    import io

    def fake_open(path, mode="r", *a, **kw):
        assert (path, mode) == ("/proc/meminfo", "rb")
        if meminfo is None:
            raise FileNotFoundError(2, "No such file or directory")
        return io.BytesIO(meminfo)

    def fake_sysconf(name):
        if sysconf is None:
            raise ValueError(f"unrecognized configuration name {name}")
        return sysconf[name]

    monkeypatch.setattr(validate, "open", fake_open, raising=False)
    monkeypatch.setattr(validate.os, "sysconf", fake_sysconf)


def test_machine_memory_is_memavailable_in_kib(monkeypatch):
    # 750 kB x 1024; MemTotal, MemFree and a second MemAvailable line are not read
    _fake_machine(monkeypatch, _MEMINFO, {"SC_AVPHYS_PAGES": 3, "SC_PAGE_SIZE": 4096})
    assert validate.machine_available_bytes() == 768000


def test_machine_memory_falls_back_to_sysconf_then_to_2_pow_62(monkeypatch):
    # no MemAvailable line (kernels before 3.14), or no /proc at all: free pages x page size = 3 x 4096
    _fake_machine(monkeypatch, b"MemTotal:        1000 kB\nMemFree:          500 kB\n",
                  {"SC_AVPHYS_PAGES": 3, "SC_PAGE_SIZE": 4096})
    assert validate.machine_available_bytes() == 12288
    _fake_machine(monkeypatch, None, {"SC_AVPHYS_PAGES": 3, "SC_PAGE_SIZE": 4096})
    assert validate.machine_available_bytes() == 12288
    _fake_machine(monkeypatch, None, None)  # nothing to ask: no limit (2^62)
    assert validate.machine_available_bytes() == 4611686018427387904


def _memory(monkeypatch, have, machine):
    monkeypatch.setattr(validate, "available_memory_bytes", lambda: have)
    monkeypatch.setattr(validate, "machine_available_bytes", lambda: machine)


def test_memory_check_refuses_by_default_and_one_process_is_checked_once(monkeypatch):
    need = 3 << 20
    _memory(monkeypatch, need, need)
    validate.check_memory(need, "x")                  # exactly enough, one process (the default)
    _memory(monkeypatch, need - 1, need - 1)
    with pytest.raises(validate.ResourceError) as e:
        validate.check_memory(need, "x")              # not allowed by default
    # one process: the single-process message, not "(1 processes of ...)"
    assert str(e.value) == "x needs about 3.0 MiB of memory but this machine has 3.0 MiB available (--allow-memory to try anyway)"
    validate.check_memory(need, "x", allow=True)


def test_memory_check_of_two_processes_counts_both_against_the_machine(monkeypatch):
    need = 3 << 20
    _memory(monkeypatch, 6 << 20, 6 << 20)
    validate.check_memory(need, "x", processes=2)     # 2 x 3 MiB = 6 MiB: exactly enough
    _memory(monkeypatch, 5 << 20, 5 << 20)
    with pytest.raises(validate.ResourceError) as e:
        validate.check_memory(need, "x", processes=2)
    assert str(e.value) == ("x needs about 6.0 MiB of memory (2 processes of 3.0 MiB) but this machine has "
                            "5.0 MiB available (--allow-memory to try anyway)")
    validate.check_memory(need, "x", processes=1)     # one of them fits
    _memory(monkeypatch, 6 << 20, (6 << 20) - 1)      # the machine one byte short: refused
    with pytest.raises(validate.ResourceError, match=r"\(2 processes of 3\.0 MiB\)"):
        validate.check_memory(need, "x", processes=2)


# ---- run records: summary.json's shape, key by key (the golden record is a valid one to start from)


def _refused(summary, message):
    with pytest.raises(validate.RunDirError) as e:
        _check(summary)
    assert str(e.value) == f"s.json: {message}"


def test_summary_takes_its_allowed_values_by_keyword_only():
    from replay.runs.record import MODES, STATUSES, STRATEGIES

    s = _golden_summary()
    assert validate.check_summary(summary=s, where="w", strategies=STRATEGIES, modes=MODES, statuses=STATUSES) is s
    with pytest.raises(TypeError):
        validate.check_summary(s, "w", STRATEGIES, MODES, STATUSES)


def test_summary_nesting_up_to_32_levels():
    # the summary is level 1, its scenario level 2: 30 more levels make 32 (accepted), 31 make 33
    s = _golden_summary()
    deep = 1
    for _ in range(30):
        deep = {"a": deep}
    s["scenario"]["deep"] = deep
    assert _check(s) is s
    s["scenario"]["deep"] = {"a": deep}
    _refused(s, "nested deeper than 32 levels")


@pytest.mark.parametrize("key", ["status", "strategy", "mode", "scenario", "trace", "metrics", "digests",
                                 "invariants"])
def test_summary_required_keys(key):
    s = _golden_summary()
    del s[key]
    _refused(s, f"missing key {key!r}")


def test_summary_optional_keys_may_be_absent():
    s = _golden_summary()
    for key in ("format", "version", "status_reason", "tool", "first_faults", "adversary", "adversary_effects"):
        s.pop(key, None)
    assert _check(s) is s


@pytest.mark.parametrize("key, bad, message", [
    ("format", 1, "format is 1, expected a str"),
    ("version", "1", "version is '1', expected a int"),
    ("version", True, "version is True, expected a int"),
    ("status", 1, "status is 1, expected a str"),
    ("status_reason", None, "status_reason is None, expected a str"),
    ("strategy", ["mirror-vm"], "strategy is ['mirror-vm'], expected a str"),
    ("mode", 2, "mode is 2, expected a str"),
    ("scenario", [], "scenario is [], expected a dict"),
    ("trace", "t", "trace is 't', expected a dict"),
    ("metrics", [], "metrics is [], expected a dict"),
    ("digests", [], "digests is [], expected a dict"),
    ("invariants", True, "invariants is True, expected a dict"),
    ("tool", "replay", "tool is 'replay', expected a dict"),
    ("first_faults", {}, "first_faults is {}, expected a list"),
    ("adversary", {}, "adversary is {}, expected a list"),
    ("adversary_effects", [], "adversary_effects is [], expected a dict"),
])
def test_summary_top_level_types(key, bad, message):
    s = _golden_summary()
    s[key] = bad
    _refused(s, message)


@pytest.mark.parametrize("key, t, bad", [("digest", "str", 1), ("events", "int", "3"), ("events", "int", False),
                                         ("guest_bytes", "int", 1.0), ("vcpus", "int", None),
                                         ("source", "dict", [])])
def test_summary_trace_keys(key, t, bad):
    s = _golden_summary()
    s["trace"][key] = bad
    _refused(s, f"trace.{key} is missing or not a {t}")
    del s["trace"][key]
    _refused(s, f"trace.{key} is missing or not a {t}")


def test_summary_digests_are_empty_or_32_or_64_lowercase_hex():
    s = _golden_summary()
    for good in ("", "0123456789abcdef" * 2, "f" * 64):
        s["digests"]["x"] = good
        assert _check(s) is s
    for bad in ("0" * 31, "0" * 33, "0" * 63, "0" * 65, "abc", "g" * 32, "A" * 32, "z" * 64):
        s["digests"]["x"] = bad
        # quoted as short() does: the repr (the string and its 2 quotes) cut to 60 characters past 58
        shown = repr(bad) if len(bad) <= 58 else repr(bad)[:60] + f"... ({len(bad) + 2} chars)"
        _refused(s, f"digests.x {shown} is not a hex digest")
    s["digests"]["x"] = 5
    _refused(s, "digests.x 5 is not a hex digest")


def test_summary_invariants_are_true_or_false():
    s = _golden_summary()
    s["invariants"]["extra"] = False
    assert _check(s) is s
    for bad, shown in ((1, "1"), ("true", "'true'"), (None, "None")):
        s["invariants"]["extra"] = bad
        _refused(s, f"invariants.extra {shown} is not true/false")


def test_summary_metric_leaves_from_0_to_2_pow_64_less_1_in_lists_too():
    s = _golden_summary()
    s["metrics"]["bytes_sent"] = 0
    s["metrics"]["guest_slowdown_ppm_per_vcpu"] = [0, 18446744073709551615]
    assert _check(s) is s
    s["metrics"]["bytes_sent"] = 18446744073709551615
    assert _check(s) is s
    s["metrics"]["bytes_sent"] = 18446744073709551616
    _refused(s, "metrics.bytes_sent 18446744073709551616 is out of range 0..2^64-1")
    s["metrics"]["bytes_sent"] = -1
    _refused(s, "metrics.bytes_sent -1 is out of range 0..2^64-1")
    s["metrics"]["bytes_sent"] = 0
    s["metrics"]["guest_slowdown_ppm_per_vcpu"] = [3, -1]
    _refused(s, "metrics.guest_slowdown_ppm_per_vcpu[1] -1 is out of range 0..2^64-1")
    s["metrics"]["guest_slowdown_ppm_per_vcpu"] = [3, "4"]
    _refused(s, "metrics.guest_slowdown_ppm_per_vcpu[1] is '4', expected an integer")
    s["metrics"]["guest_slowdown_ppm_per_vcpu"] = [3]
    s["metrics"]["precopy"]["switchover_reason"] = 5   # a named string leaf, wherever it is
    _refused(s, "metrics.precopy.switchover_reason is 5, expected a str")


@pytest.mark.parametrize("key", ["cpu_ns", "faults", "rmp"])
def test_summary_metric_groups_are_objects(key):
    s = _golden_summary()
    del s["metrics"][key]
    assert _check(s) is s          # absent: an older record
    s["metrics"][key] = 5
    _refused(s, f"metrics.{key} is not an object")


def test_summary_adversary_actions_have_four_strings():
    s = _golden_summary()
    ok = {"kind": "replay", "at": "switchover", "outcome": "refused", "detected_by": ""}
    s["adversary"] = [ok]
    assert _check(s) is s
    for k in ok:
        for bad in ({key: v for key, v in ok.items() if key != k}, {**ok, k: 1}):
            s["adversary"] = [ok, bad]
            _refused(s, "adversary[1] is not an action (kind, at, outcome, detected_by)")
    s["adversary"] = ["replay"]
    _refused(s, "adversary[0] is not an action (kind, at, outcome, detected_by)")
