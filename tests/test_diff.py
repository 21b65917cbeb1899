"""tools/diff / `replay diff`: exit statuses, parameter and metric differences, --max-regress, --json,
the event-divergence finder, and bad input (exit 2, one line on stderr, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from replay.cli import main
from replay.analysis.diff import Outcome, diff_runs, render_text, to_json
from replay.core.records import canonical_json
from replay.runs.record import load_run
from runfixtures import DIGEST_B, make_run

REPO = Path(__file__).resolve().parent.parent


def run_diff(capsys, *args) -> tuple[int, str, str]:
    rc = main(["diff", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def pair(tmp_path):
    return make_run(tmp_path / "a"), make_run(tmp_path / "b")


# --------------------------------------------------------------------------------------- exit statuses


def test_identical_runs_are_identical_even_strict(capsys, pair):
    a, b = pair
    for extra in ([], ["--strict"]):
        rc, out, err = run_diff(capsys, a, b, *extra)
        assert rc == 0, err
        assert "Outcome: IDENTICAL" in out
        assert err.count("\n") == 1 and err.startswith("diff: identical")
    assert "Event logs: identical (120 events)" in out
    assert "records identical" in err


def test_end_of_trace_digest_differs_is_exit_1(capsys, tmp_path):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", strategy="shadow-vcpu", digests={"end_of_trace": DIGEST_B})
    rc, out, err = run_diff(capsys, a, b)
    assert rc == 1
    assert err.count("\n") == 1 and "end_of_trace digest differs" in err
    line = next(l for l in out.splitlines() if l.strip().startswith("end_of_trace"))
    assert line.rstrip().endswith("NO")


def test_other_strategy_same_trace_is_same_end_state(capsys, tmp_path):
    # Two strategies on one trace: metrics differ, but the end-of-trace memory must not, so exit 0.
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", strategy="shadow-vcpu", metrics={"downtime_ns": 99_000_000}, rounds=7)
    rc, out, err = run_diff(capsys, a, b)
    assert rc == 0
    # never "equivalent" when metrics differ: the verdict lists them, largest relative change first
    assert err.startswith("diff: same end state (end_of_trace digests match); ") and "equivalent" not in err
    assert "downtime_ns -17.50%" in err and "Outcome: SAME END STATE" in out
    row = next(l for l in out.splitlines() if l.strip().startswith("downtime_ns"))
    assert "120,000,000" in row and "99,000,000" in row and "-21,000,000" in row and "-17.50%" in row
    assert row.rstrip().endswith("*")
    # rounds outer-joined: B's extra rounds appear with "-" for A
    r6 = next(l for l in out.splitlines() if l.strip().startswith("6 "))
    assert " - " in r6


def test_status_difference_is_exit_1(capsys, tmp_path):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", status="aborted", status_reason="downtime limit never met")
    rc, _, err = run_diff(capsys, a, b)
    assert rc == 1 and "status differs (completed vs aborted)" in err


def test_strict_catches_metric_only_difference(capsys, tmp_path):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", metrics={"cpu_ns": {"host": 50_000_001}})
    assert run_diff(capsys, a, b)[0] == 0
    rc, _, err = run_diff(capsys, a, b, "--strict")
    assert rc == 1 and "summary.json differs at 1 key(s): metrics.cpu_ns.host" in err


def test_strict_ignores_tool_block_but_not_tables(capsys, tmp_path):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", summary_changes={"tool": {"version": "9.9.9", "engine": "reference"}})
    assert run_diff(capsys, a, b, "--strict")[0] == 0
    c = make_run(tmp_path / "c", rounds_scale=2)
    rc, _, err = run_diff(capsys, a, c, "--strict")
    assert rc == 1 and "rounds.arrow differs (first at row 0)" in err


def test_strict_faults_presence(capsys, tmp_path):
    a = make_run(tmp_path / "a", mode="postcopy")
    b = make_run(tmp_path / "b", mode="postcopy")
    assert run_diff(capsys, a, b, "--strict")[0] == 0
    r = load_run(b)
    write = __import__("replay.runs.record", fromlist=["write_run"]).write_run
    write(tmp_path / "c", r.summary, r.rounds.to_arrow(), r.events.to_arrow(), None)
    rc, _, err = run_diff(capsys, a, tmp_path / "c", "--strict")
    assert rc == 1 and "faults.arrow present in A only" in err


# ------------------------------------------------------------------------------------ divergence finder


def test_divergence_at_known_event(capsys, tmp_path):
    a = make_run(tmp_path / "a", events=200)
    b = make_run(tmp_path / "b", events=200, event_changes={57: {"detail": "round=11 agents=3"}})
    res = diff_runs(load_run(a), load_run(b))
    d = res.divergence
    assert d is not None and d.index == 57 and d.seq_a == 57 and d.seq_b == 57
    assert [e["index"] for e in d.context_a] == list(range(54, 61))
    assert d.context_b[3]["detail"] == "round=11 agents=3" and d.context_a[3]["detail"] == "round=11"
    assert res.outcome is Outcome.IDENTICAL  # same digests; only --strict cares about the event log
    rc, out, err = run_diff(capsys, a, b)
    assert rc == 0
    assert "first divergence at event #57" in out
    assert any(l.lstrip().startswith("> ") and "#57" in l and "agents=3" in l for l in out.splitlines())
    rc, _, err = run_diff(capsys, a, b, "--strict")
    assert rc == 1 and "events.arrow differs (first divergence at event #57)" in err


def test_divergence_each_column_and_prefix(tmp_path):
    a = load_run(make_run(tmp_path / "a"))
    for col, val in (("t_ns", 1), ("kind", "other"), ("gfn", 5), ("vcpu", 3), ("detail", "x")):
        b = load_run(make_run(tmp_path / col, event_changes={10: {col: val}}))
        assert diff_runs(a, b).divergence.index == 10, col
    # seq is the order key, not compared: renumbering the log is not a divergence (but --strict sees it)
    renum = load_run(make_run(tmp_path / "renum", event_changes={i: {"seq": 1000 + i} for i in range(120)}))
    assert diff_runs(a, renum).divergence is None
    assert any("events.arrow differs" in r for r in diff_runs(a, renum, strict=True).reasons)
    # one log a prefix of the other: diverges where the shorter ends, context shows the end
    short = load_run(make_run(tmp_path / "short", events=100))
    d = diff_runs(a, short).divergence
    assert d.index == 100 and d.seq_b is None and d.seq_a == 100
    assert "(end of log)" in render_text(diff_runs(a, short))


def test_no_divergence_search_across_scenarios(tmp_path):
    a = load_run(make_run(tmp_path / "a"))
    b = load_run(make_run(tmp_path / "b", strategy="shadow-vcpu", event_changes={3: {"gfn": 9}}))
    res = diff_runs(a, b)
    assert not res.same_scenario and res.divergence is None
    assert "Event logs" not in render_text(res)


# ---------------------------------------------------------------------------------- parameter differences


def test_parameter_difference_in_nested_key(capsys, tmp_path):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", scenario={"migration": {"bandwidth_bytes_per_s": 2_500_000_000}})
    res = diff_runs(load_run(a), load_run(b))
    assert [(p.key, p.a, p.b) for p in res.params] == [
        ("migration.bandwidth_bytes_per_s", 1_250_000_000, 2_500_000_000)
    ]
    assert not res.same_scenario and res.divergence is None
    rc, out, _ = run_diff(capsys, a, b)
    assert "Parameters: 1 differ" in out
    row = next(l for l in out.splitlines() if "migration.bandwidth_bytes_per_s" in l)
    assert "1,250,000,000" in row and "2,500,000,000" in row


def test_parameter_present_on_one_side_and_lists(tmp_path):
    a = load_run(make_run(tmp_path / "a"))
    b = load_run(make_run(tmp_path / "b", scenario={"guest": {"numa": 2}, "host": {"shared_ranges": [[0, 127]]}}))
    got = {p.key: (p.a, p.b) for p in diff_runs(a, b).params}
    assert got["host.shared_ranges[0][1]"] == (255, 127)
    text = render_text(diff_runs(a, b))
    assert "guest.numa" in text and "(absent)" in text


def test_strategy_difference_shown_as_parameter(tmp_path):
    a = load_run(make_run(tmp_path / "a"))
    b = load_run(make_run(tmp_path / "b", strategy="shadow-vcpu"))
    keys = {p.key: (p.a, p.b) for p in diff_runs(a, b).params}
    assert keys["run.strategy"] == ("mirror-vm", "shadow-vcpu")


# ------------------------------------------------------------------------------------------ max-regress


def test_max_regress_pass_and_fail(capsys, tmp_path):
    a = make_run(tmp_path / "a")  # downtime 120 ms
    b = make_run(tmp_path / "b", metrics={"downtime_ns": 132_000_000, "cpu_ns": {"host": 40_000_000}})
    rc, out, err = run_diff(capsys, a, b, "--max-regress", "downtime_ns=10")  # exactly +10%: allowed
    assert rc == 0 and "1 --max-regress bound(s) held" in err
    rc, out, err = run_diff(capsys, a, b, "--max-regress", "downtime_ns=9.99")
    assert rc == 1 and "downtime_ns regressed +10.00% (allowed +9.99%)" in err and "CROSSED" in out
    # one-directional: an improvement never fails, even with a 0% bound
    rc, _, _ = run_diff(capsys, a, b, "--max-regress", "cpu_ns.host=0")
    assert rc == 0
    rc, _, err = run_diff(capsys, b, a, "--max-regress", "cpu_ns.host=0%", "--max-regress", "downtime_ns=0")
    assert rc == 1 and "cpu_ns.host regressed +25.00%" in err and "downtime_ns" not in err


def test_max_regress_from_zero(tmp_path):
    a = load_run(make_run(tmp_path / "a"))
    b = load_run(make_run(tmp_path / "b", metrics={"faults": {"host_rmp_pf": 1}}))
    res = diff_runs(a, b, max_regress={"faults.host_rmp_pf": 1000})
    assert res.outcome is Outcome.DIFFERENT and res.regressions[0].crossed


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("downtime_ns", "expected METRIC=PCT"),
        ("downtime_ns=ten", "expected METRIC=PCT"),
        ("downtime_ns=-5", "expected METRIC=PCT"),
        ("downtme_ns=5", "did you mean 'downtime_ns'?"),
        ("cpu_ns.hots=5", "did you mean 'cpu_ns.host'?"),
        ("downtime_limit_exceeded=5", "unknown metric"),  # a bool is not a metric one can regress
    ],
)
def test_bad_max_regress_is_exit_2(capsys, pair, spec, needle):
    a, b = pair
    rc, out, err = run_diff(capsys, a, b, "--max-regress", spec)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------- json


def test_json_shape(capsys, tmp_path):
    a = make_run(tmp_path / "a", mode="postcopy")
    b = make_run(tmp_path / "b", mode="postcopy", strategy="shadow-vcpu",
                 metrics={"downtime_ns": 60_000_000, "postcopy": {"blocktime_ns_per_vcpu": [1, 2, 3, 4, 5]}})
    rc, out, err = run_diff(capsys, a, b, "--json", "--max-regress", "downtime_ns=5")
    assert rc == 0
    doc = json.loads(out)
    assert canonical_json(doc).decode() == out  # canonical: sorted keys, no floats
    assert doc["format"] == "snp-replay-diff" and doc["outcome"] == "same end state" and doc["exit_code"] == 0
    assert {"a", "b", "params", "metrics", "regressions", "rounds", "latency_hist", "digests", "invariants",
            "divergence", "reasons", "same_scenario", "strict", "strict_differences"} <= set(doc)
    m = {r["name"]: r for r in doc["metrics"]}
    assert m["downtime_ns"] == {"name": "downtime_ns", "group": "time", "a": 120_000_000, "b": 60_000_000,
                                "delta": -60_000_000, "ratio_ppm": 500_000, "change": "-50.00%", "differs": True}
    assert m["rmp.target.psc"]["group"] == "security" and m["faults.npf_asid"]["group"] == "security"
    assert m["cpu_ns.mirror_vm"]["group"] == "cpu"
    assert m["postcopy.blocktime_ns_per_vcpu[4]"]["a"] is None  # element-wise, absent on A
    assert m["postcopy_bytes"]["ratio_ppm"] == 1_000_000
    assert {d["name"] for d in doc["digests"]} == {"no_migration", "end_of_trace", "source_at_switchover",
                                                   "target_at_switchover"}
    assert doc["latency_hist"][1] == {"bucket_us_lo": 50, "bucket_us_hi": 100, "count_a": 350, "count_b": 350}
    r0 = doc["rounds"][0]
    assert {"round", "pages_sent_a", "pages_sent_b", "dirty_pages_a", "bytes_sent_b", "duration_ns_a",
            "differs"} <= set(r0)
    assert doc["params"][0]["key"] == "run.strategy"


def test_to_json_is_canonical_for_every_fixture(tmp_path):
    a = load_run(make_run(tmp_path / "a", events=10))
    b = load_run(make_run(tmp_path / "b", events=12, event_changes={4: {"kind": "x"}}))
    canonical_json(to_json(diff_runs(a, b, strict=True, max_regress={"total_ns": 1.5})))


def test_only_diff_hides_equal_rows(capsys, tmp_path):
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", metrics={"setup_ns": 41_000_000})
    _, full, _ = run_diff(capsys, a, b)
    _, short, _ = run_diff(capsys, a, b, "--only-diff")
    assert "total_ns" in full and "total_ns" not in short and "setup_ns" in short
    assert len(short.splitlines()) < len(full.splitlines()) / 2


# -------------------------------------------------------------------------------------------- bad input


def _corrupt_arrow(p: Path) -> None:
    (p / "rounds.arrow").write_bytes(b"ARROW1\x00\x00garbage")


def _bad_version(p: Path) -> None:
    s = json.loads((p / "summary.json").read_text())
    s["version"] = 99
    (p / "summary.json").write_text(json.dumps(s))


def _missing_column(p: Path) -> None:
    t = pa.table({"seq": pa.array([0], pa.uint64())})
    with pa.OSFile(str(p / "events.arrow"), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        w.write_table(t)


def _rehash(p: Path) -> None:
    """Recompute the integrity keys after a breakage, as a buggy or forged writer would: the reader's
    deeper checks (Arrow structure, schema, summary shape) must still refuse the record."""
    from replay.runs.record import content_hash, record_digest

    s = json.loads((p / "summary.json").read_text())
    s["tables"] = {f.name: content_hash(f.read_bytes()) for f in sorted(p.glob("*.arrow"))}
    s["record_digest"] = record_digest(s)
    (p / "summary.json").write_text(json.dumps(s))


def _rehashed(breakage):
    return lambda p: (breakage(p), _rehash(p))


def _retype(p: Path) -> None:
    s = json.loads((p / "summary.json").read_text())
    s["metrics"]["downtime_ns"] = "12"
    (p / "summary.json").write_text(json.dumps(s))


def _flip_byte(p: Path) -> None:
    data = bytearray((p / "events.arrow").read_bytes())
    data[len(data) // 2] ^= 0x10
    (p / "events.arrow").write_bytes(bytes(data))


@pytest.mark.parametrize(
    "breakage, needle",
    [
        (lambda p: __import__("shutil").rmtree(p), "not a run directory"),
        (lambda p: (p / "summary.json").unlink(), "no summary.json"),
        (lambda p: (p / "summary.json").write_text("{not json"), "malformed JSON"),
        (_bad_version, "version 99 is not understood"),
        (lambda p: (p / "rounds.arrow").unlink(), "rounds.arrow"),
        (_corrupt_arrow, "rounds.arrow: content hash mismatch"),
        (_missing_column, "events.arrow: content hash mismatch"),
        (_flip_byte, "events.arrow: content hash mismatch"),
        (_retype, "record digest mismatch"),
        (_rehashed(_corrupt_arrow), "rounds.arrow: not a valid Arrow file"),
        (_rehashed(_missing_column), "events.arrow: schema differs"),
        (_rehashed(_retype), "metrics.downtime_ns is '12', expected an integer"),
        (lambda p: (p / "summary.json").write_text('{"format": "something-else"}'), "format is not"),
        (lambda p: (p / "summary.json").write_text("[" * 100_000), "nested deeper than"),
        (lambda p: ((p / "rounds.arrow").unlink(), __import__("os").mkfifo(p / "rounds.arrow")), "not a regular file"),
    ],
    ids=["missing-dir", "no-summary", "malformed-json", "version-99", "missing-rounds", "corrupt-arrow",
         "missing-column", "flipped-byte", "retyped-metric", "rehashed-corrupt-arrow", "rehashed-missing-column",
         "rehashed-retyped-metric", "wrong-format", "deep-json", "fifo"],
)
@pytest.mark.parametrize("side", ["A", "B"])
def test_bad_input_is_exit_2_one_line(capsys, tmp_path, breakage, needle, side):
    good, bad = make_run(tmp_path / "good"), make_run(tmp_path / "bad")
    breakage(bad)
    args = (bad, good) if side == "A" else (good, bad)
    rc, out, err = run_diff(capsys, *args)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("replay: error:") and needle in err, err
    assert "Traceback" not in err


def test_missing_argument_is_exit_2(capsys, tmp_path):
    rc, _, err = run_diff(capsys, make_run(tmp_path / "a"))
    assert rc == 2 and err.count("\n") == 1


def test_tools_diff_script(tmp_path):
    """The executable script works from a checkout (it puts the repo on sys.path itself)."""
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", digests={"end_of_trace": DIGEST_B})
    script = REPO / "tools" / "diff"
    assert os.access(script, os.X_OK) and script.read_text().startswith("#!/usr/bin/env python3")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, str(script), str(a), str(b)], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert p.returncode == 1 and "Outcome: DIFFERENT" in p.stdout and p.stderr.count("\n") == 1
    p = subprocess.run([sys.executable, str(script), str(a), str(tmp_path / "nope")], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1
