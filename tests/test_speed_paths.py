"""The end-to-end shortcuts: the no-migration reference digest cached on disk (replay.migration.refdigest) and
`replay compare` running its strategies in parallel processes. Neither may change a record."""

from __future__ import annotations

from pathlib import Path

import pytest

from replay.migration import refdigest
from replay.cli import main
from replay.migration import Migration
from replay.traces.format import read_meta

from test_precopy import ROWS, tiny_scenario, tiny_trace


@pytest.fixture
def trace(tmp_path):
    return tiny_trace(tmp_path / "tiny.arrow")


def _counter():
    seen = []
    return seen, seen.append


def test_reference_digest_is_computed_once_then_read_back(trace, tmp_path):
    meta = read_meta(trace)
    cache = tmp_path / "cache"
    seen, progress = _counter()
    first = refdigest.no_migration_digest(trace, meta, 1, 0, "cython", progress, cache=cache)
    assert sum(seen) == len(ROWS)  # one full replay of the 8-event trace
    entry = cache / "refdigest" / refdigest.cache_key(meta, 1, 0, "cython")
    assert entry.read_text() == first + "\n" and len(first) == 64
    seen.clear()
    assert refdigest.no_migration_digest(trace, meta, 1, 0, "cython", progress, cache=cache) == first
    assert seen == []  # read back: no replay at all
    assert refdigest.lookup(meta, 1, 0, "cython", cache) == first


def test_reference_digest_key_covers_guest_and_engine(trace):
    meta = read_meta(trace)
    keys = {refdigest.cache_key(meta, asid, vmpl, eng)
            for asid, vmpl, eng in ((1, 0, "cython"), (2, 0, "cython"), (1, 2, "cython"), (1, 0, "reference"))}
    assert len(keys) == 4
    # ... and the trace's layout, not only its content digest.
    import dataclasses

    other = dataclasses.replace(meta, shared_ranges=((0, 0),))
    assert refdigest.cache_key(other, 1, 0, "cython") != refdigest.cache_key(meta, 1, 0, "cython")


def test_damaged_cache_entry_is_recomputed(trace, tmp_path):
    meta = read_meta(trace)
    cache = tmp_path / "cache"
    good = refdigest.no_migration_digest(trace, meta, 1, 0, "cython", cache=cache)
    entry = cache / "refdigest" / refdigest.cache_key(meta, 1, 0, "cython")
    entry.write_text(good[:40])  # truncated
    assert refdigest.lookup(meta, 1, 0, "cython", cache) is None
    seen, progress = _counter()
    assert refdigest.no_migration_digest(trace, meta, 1, 0, "cython", progress, cache=cache) == good
    assert sum(seen) == len(ROWS) and entry.read_text() == good + "\n"


@pytest.mark.parametrize("engine", ["cython", "reference"])
def test_a_run_uses_the_cache_and_its_invariant_can_fail(trace, tmp_path, monkeypatch, engine):
    monkeypatch.setenv("SNP_REPLAY_CACHE", str(tmp_path / "cache"))
    seen, progress = _counter()
    r1 = Migration(tiny_scenario(), trace, engine=engine, progress=progress).run()
    assert sum(seen) == 2 * len(ROWS)  # the reference replay, then the migrated one
    assert r1.summary["invariants"]["end_of_trace_equals_no_migration"] is True
    seen.clear()
    r2 = Migration(tiny_scenario(), trace, engine=engine, progress=progress).run()
    assert sum(seen) == len(ROWS)  # the reference came from the cache
    assert r2.summary == r1.summary
    # Injected fault: a wrong cached reference is used as is, and the invariant says so.
    meta = read_meta(trace)
    entry = tmp_path / "cache" / "refdigest" / refdigest.cache_key(meta, 1, 0, engine)
    entry.write_text("0" * 64 + "\n")
    r3 = Migration(tiny_scenario(), trace, engine=engine).run()
    assert r3.summary["digests"]["no_migration"] == "0" * 64
    assert r3.summary["invariants"]["end_of_trace_equals_no_migration"] is False


SCENARIO = """
name = "small"
seed = 5
[guest]
size = "4MiB"
vcpus = 2
[trace]
generator = "hotcold"
events = 30_000
fill = true
[trace.options]
hot_bytes = 262_144
[migration]
mode = "{mode}"
start_ns = "5ms"
"""


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_parallel_compare_writes_what_sequential_runs_write(tmp_path, mode, capsys):
    scen = tmp_path / "s.toml"
    scen.write_text(SCENARIO.format(mode=mode))
    assert main(["compare", str(scen), "--out", str(tmp_path / "cmp"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "end-of-trace digests equal across strategies" in out
    for strategy in ("mirror-vm", "shadow-vcpu"):
        alone = tmp_path / f"run-{strategy}"
        assert main(["run", str(scen), "--out", str(alone), "--strategy", strategy, "--no-progress"]) == 0
        assert _files(tmp_path / "cmp" / strategy) == _files(alone)
    assert (tmp_path / "cmp" / "report.html").is_file()


def test_compare_error_in_a_worker_is_one_line_and_writes_nothing(trace, tmp_path, capsys):
    scen = tmp_path / "s.toml"
    scen.write_text(f'[trace]\nfile = "{trace.name}"\n[guest]\nos_vmpl = 0\n')
    out = tmp_path / "cmp"
    assert main(["compare", str(scen), "--out", str(out), "--set", "guest.vcpus=3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the trace's vcpus is 1 but the scenario's guest.vcpus is 3" in err
    assert not out.exists()


def test_compare_where_one_strategy_is_refused_is_one_line_and_writes_nothing(tmp_path, capsys):
    """mirror-vm needs KVM_LINK_GUEST_MEMFD; without it that run fails while shadow-vcpu's runs: the
    comparison stops at the first error and leaves no half of itself behind."""
    scen = tmp_path / "s.toml"
    scen.write_text(SCENARIO.format(mode="precopy"))
    out = tmp_path / "cmp"
    assert main(["compare", str(scen), "--out", str(out), "--set", "kernel.gmem_link=false", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gmem_link" in err
    assert not out.exists()


def test_compare_worker_that_dies_is_a_one_line_error(tmp_path, capsys):
    """A strategy's process killed from outside (as the OOM killer would) ends the comparison with one
    line, exit 2, and nothing written."""
    import threading
    import time

    import psutil

    scen = tmp_path / "s.toml"
    scen.write_text(SCENARIO.format(mode="precopy").replace("events = 30_000", "events = 3_000_000"))
    out = tmp_path / "cmp"
    killed = []

    def kill_a_worker():
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for child in psutil.Process().children(recursive=True):
                try:
                    if "spawn_main" in " ".join(child.cmdline()):
                        child.kill()
                        killed.append(child.pid)
                        break
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.01)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    rc = main(["compare", str(scen), "--out", str(out), "--no-progress"])
    killer.join()
    assert killed and rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a compare worker process died" in err
    assert not out.exists()


_ESCAPED_WORKER = """
import faulthandler, sys, threading, time
faulthandler.dump_traceback_later(100, exit=True)  # a hang shows where (stderr), before the test's limit
import multiprocessing.process
import psutil
from replay.cli import main

# CPython's clean-up of a broken pool stops the other workers (terminate(), then a stop sentinel each);
# a worker it was still starting can escape both (a race, seen in CI). Make every worker escape them,
# then kill one worker once both run.
import concurrent.futures.process as cfp
multiprocessing.process.BaseProcess.terminate = lambda self: None
cfp._ExecutorManagerThread.shutdown_workers = lambda self: None

def cmdline(proc):
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # a short-lived child (the resource tracker's start...) gone meanwhile
        return ""

def kill_one():
    while True:
        kids = [c for c in psutil.Process().children() if "spawn_main" in cmdline(c)]
        if len(kids) == 2:  # both started (they take far longer to import than this to notice)
            kids[0].kill()
            return
        time.sleep(0.01)

threading.Thread(target=kill_one, daemon=True).start()
sys.exit(main(["compare", sys.argv[1], "--out", sys.argv[2], "--no-progress"]))
"""


def test_a_worker_the_pool_fails_to_stop_cannot_hang_compare(tmp_path):
    """When one worker dies and another escapes the pool's own clean-up, ``compare`` still ends (it stops
    the pool's workers itself): one line, exit 2, nothing written, well within the time limit."""
    import subprocess
    import sys

    scen = tmp_path / "s.toml"
    scen.write_text(SCENARIO.format(mode="precopy").replace("events = 30_000", "events = 3_000_000"))
    out = tmp_path / "cmp"
    p = subprocess.run([sys.executable, "-c", _ESCAPED_WORKER, str(scen), str(out)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "a compare worker process died" in p.stderr
    assert not out.exists()


def test_background_reference_equals_the_separate_pass(trace, tmp_path):
    """refdigest.Background, fed the batches of a read, computes what refdigest.compute does, and stores it;
    an abandoned one stores nothing. (A cold run feeds it from its own read: see the test above.)"""
    from replay.traces.format import open_trace

    meta = read_meta(trace)
    want = refdigest.compute(trace, meta, 1, 0, "cython")
    cache = tmp_path / "cache"
    bg = refdigest.Background(meta, 1, 0, "cython")
    bg.abandon()
    assert refdigest.lookup(meta, 1, 0, "cython", cache) is None
    for kind in ("cython", "reference"):
        bg = refdigest.Background(meta, 1, 0, kind)
        with open_trace(trace, verify_digest=True) as r:
            for base, batch in r:
                bg.feed(base, batch)
        assert bg.result(cache) == refdigest.compute(trace, meta, 1, 0, kind)
        assert refdigest.lookup(meta, 1, 0, kind, cache) == refdigest.compute(trace, meta, 1, 0, kind)
    assert refdigest.lookup(meta, 1, 0, "cython", cache) == want
    # Injected fault: a batch fed twice is a different replay, so a different digest.
    bg = refdigest.Background(meta, 1, 0, "cython")
    with open_trace(trace) as r:
        for base, batch in r:
            bg.feed(base, batch)
            bg.feed(base, batch)
    assert bg.result(tmp_path / "other") != want


def test_background_reference_error_reaches_the_run(trace):
    """A failure in the helper thread (here: a batch that is not one) is raised to the feeder, not lost."""
    meta = read_meta(trace)
    bg = refdigest.Background(meta, 1, 0, "cython")
    bg.feed(0, "not a batch")
    with pytest.raises(Exception):
        for _ in range(2 * refdigest.Background.DEPTH + 2):
            bg.feed(0, "not a batch")
        bg.result()
    bg.abandon()
