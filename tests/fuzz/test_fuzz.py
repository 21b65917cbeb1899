"""The fuzz suite: >= 12,000 generated bad and edge-case inputs per CI run, each checked against the
contract (tests/fuzz/fuzzlib.py), plus the corpus of every case that once failed, plus a few cases in
real subprocesses for what only a process shows (Ctrl-C, a FIFO that would block).

Per-class counts go to the terminal summary. ``FUZZ_CASES`` / ``FUZZ_SEED`` change the campaign (CI uses
the defaults; ``tools/fuzz`` runs longer ones).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzzlib

CASES = int(os.environ.get("FUZZ_CASES", "12000"))  # 10,000 on the original families, 2,000 on issue 19's
SEED = int(os.environ.get("FUZZ_SEED", "0"))


def _report(request, title: str, res: dict) -> None:
    lines = [f"{title}: {res['total']} cases: " + ", ".join(f"{k} {v}" for k, v in res["counts"].items() if v)]
    for fam, c in sorted(res["by_family"].items()):
        lines.append(f"  {fam}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    request.config._fuzz_summary = getattr(request.config, "_fuzz_summary", []) + lines


def _describe(failures: list[dict]) -> str:
    return "\n".join(f"[{f['class']}] {f['family']}:{f['index']} seed {f.get('seed')} {str(f.get('argv', ''))[:200]} "
                     f"({f.get('note', '')}): {str(f.get('detail', ''))[:300]}" for f in failures[:20])


@pytest.mark.slow
def test_campaign(request):
    res = fuzzlib.run_campaign(CASES, SEED)
    _report(request, f"fuzz campaign (seed {SEED})", res)
    assert res["total"] == len(fuzzlib.plan(CASES)) >= CASES
    assert sum(res["counts"].values()) == res["total"]
    assert not res["failures"], f"{len(res['failures'])} case(s) broke the contract " \
        f"(add them to the corpus with tools/fuzz --seed {SEED} -n {CASES} --save):\n" + _describe(res["failures"])


def test_corpus(request):
    """Every case that once failed, replayed (seed, family, index reproduce it exactly)."""
    corpus = fuzzlib.load_corpus()
    if not corpus:
        pytest.skip("empty corpus")
    failures, total = [], 0
    counts: dict[str, int] = {}
    for seed, cases in sorted(corpus.items()):
        res = fuzzlib.run_campaign(len(cases), seed, cases=cases)
        total += res["total"]
        failures += res["failures"]
        for k, v in res["counts"].items():
            counts[k] = counts.get(k, 0) + v
    _report(request, "fuzz corpus", {"total": total, "counts": counts, "by_family": {}})
    assert not failures, _describe(failures)


def test_contract_catches_a_traceback(tmp_path):
    """The classifier itself: an escaped exception, a changed input, a partial output and a long message
    are each caught (a fuzzer that cannot fail proves nothing)."""
    case = fuzzlib.Case("unit", 0, ["x"], "bad", [])
    before = {"in.txt": ("file", "a")}
    assert fuzzlib.classify(case, None, "", "ValueError: boom", before, before, tmp_path)["class"] == "traceback"
    assert fuzzlib.classify(case, 2, "replay: error: x\n", None, before, {"in.txt": ("file", "b")}, tmp_path)["class"] == "input-changed"
    assert fuzzlib.classify(case, 2, "replay: error: x\n", None, before, {**before, "out": ("dir", "")}, tmp_path)["class"] == "partial-output"
    assert fuzzlib.classify(case, 2, "replay: error: " + "x" * 500 + "\n", None, before, before, tmp_path)["class"] == "bad-message"
    assert fuzzlib.classify(case, 2, "a\nb\n", None, before, before, tmp_path)["class"] == "bad-message"
    assert fuzzlib.classify(case, 0, "", None, before, before, tmp_path)["class"] == "wrong-success"
    assert fuzzlib.classify(case, 2, "replay: error: x\n", None, before, before, tmp_path)["class"] == "clean-error"
    good = fuzzlib.Case("unit", 0, ["x"], "good", ["out"])
    assert fuzzlib.classify(good, 2, "replay: error: x\n", None, before, before, tmp_path)["class"] == "wrong-refusal"
    assert fuzzlib.classify(good, 0, "", None, before, {**before, ".out.x.tmp": ("dir", "")}, tmp_path)["class"] == "partial-output"


def _replay(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "replay.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(fuzzlib.REPO)})


@pytest.mark.slow
def test_ctrl_c_leaves_nothing(tmp_path):
    """SIGINT in the middle of a compare: exit 130, one line, and no run, report or temporary left."""
    trace = tmp_path / "t.arrow"
    assert subprocess.run([sys.executable, "-m", "replay.cli", "gen", "hotcold", "--out", str(trace), "--guest-size",
                           "1GiB", "--vcpus", "2", "--events", "6M", "--seed", "1", "--fill"], cwd=fuzzlib.REPO,
                          capture_output=True, check=False).returncode == 0
    (tmp_path / "s.toml").write_text(fuzzlib.SCENARIO.format(mode="precopy").replace("trace.arrow", "t.arrow"))
    before = sorted(p.name for p in tmp_path.iterdir())
    p = _replay("compare", "s.toml", "--out", "cmp", "--no-progress", cwd=tmp_path)
    deadline = time.monotonic() + 60
    # Interrupt once the compare is under way: both strategies' worker processes are running (they take
    # seconds on this trace; the parent then waits for them, and writes nothing).
    under_way = False
    while time.monotonic() < deadline and p.poll() is None and not under_way:
        kids = [c for c in psutil.Process(p.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        under_way = len(kids) == 2
        time.sleep(0.02)
    assert under_way, "the compare ended (or never got under way) before it could be interrupted"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err)
    assert err.decode().strip() == "replay: interrupted"
    assert sorted(x.name for x in tmp_path.iterdir()) == before


def test_fifo_trace_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "fifo.arrow")
    p = _replay("inspect", "fifo.arrow", cwd=tmp_path)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.decode().count("\n") == 1 and "not a regular file" in err.decode()
