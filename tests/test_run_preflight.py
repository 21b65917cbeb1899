"""What a run checks and finds before and after it replays anything, each rule at its edge (issue 22's
mutation survivors in replay/migration/runner.py, traces.py and refdigest.py):

- the disk a generated trace needs: its events, plus one per guest page when the generator fills memory
  first (31 bytes a row, replay.core.validate.TRACE_ROW_BYTES);
- a completed run whose invariant fails is a bug (InvariantError naming every failed invariant in order),
  unless an adversary's action explains it; a run that did not complete is not judged;
- a compare worker reports progress to the parent's queue and stops once the other run failed;
- a scenario's trace: its file (which must exist, relative to the scenario's directory) or its generator's,
  which needs the guest's size and vCPUs;
- the no-migration reference beside the run only when its engine's state (8 bytes a page) fits in a quarter
  of the memory available; an abandoned helper thread is stopped.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from types import SimpleNamespace

import pytest

from replay.core.errors import InvariantError, ScenarioError
from replay.migration import refdigest, runner
from replay.migration.traces import trace_for
from replay.scenario.spec import make_scenario
from replay.traces.format import read_meta
from test_costs_exact import trace  # noqa: F401  (fixture: test_precopy's 4-page trace)


class _Refused(Exception):
    pass


@pytest.mark.parametrize("fill, events", [(True, 100 + 5), (False, 100)])
def test_generated_trace_disk_check_counts_the_fill(tmp_path, monkeypatch, fill, events):
    # A 5-page guest (20480 bytes): the fill writes each page once before the generator's 100 events.
    asked = []

    def check_disk(need, directory, what):
        asked.append((need, what))
        raise _Refused

    monkeypatch.setattr("replay.core.validate.check_disk", check_disk)
    monkeypatch.setenv("SNP_REPLAY_CACHE", str(tmp_path / "cache"))
    s = make_scenario(guest={"guest_bytes": 5 * 4096, "vcpus": 1},
                      trace={"generator": "hotcold", "events": 100, "fill": fill})
    with pytest.raises(_Refused):
        runner.prepare(s, trace=None)
    assert asked == [(events * 31, f"generating the scenario's trace ({events} events)")]


def _result(status, invariants, explains=None):
    summary = {"invariants": invariants}
    if explains is not None:
        summary["adversary_effects"] = {"explains": explains}
    return SimpleNamespace(summary=summary, status=status)


def test_a_failed_invariant_of_a_completed_run_is_a_bug():
    ok = {"a": True, "b": True}
    runner.check_invariants(_result("completed", ok), "out")  # nothing to say
    bad = {"a": False, "b": True, "c": False}
    with pytest.raises(InvariantError) as e:
        runner.check_invariants(_result("completed", bad), "runs/x")
    assert str(e.value) == "runs/x: invariant(s) violated: a, c (a bug in snp-replay; the run record is kept)"
    # an adversary's action that explains one of them: only the other is a bug
    with pytest.raises(InvariantError, match=r"^runs/x: invariant\(s\) violated: c \(a bug"):
        runner.check_invariants(_result("completed", bad, explains=["a"]), "runs/x")
    runner.check_invariants(_result("completed", bad, explains=["a", "c"]), "runs/x")  # all explained
    for status in ("aborted", "cancelled", "failed"):  # not completed: not judged
        runner.check_invariants(_result(status, bad), "runs/x")


def test_a_compare_worker_reports_progress_until_it_is_not_wanted(monkeypatch):
    stop, q = threading.Event(), queue.Queue()
    monkeypatch.setattr(runner, "_STOP", stop)
    monkeypatch.setattr(runner, "_QUEUE", q)
    runner._progress(7)
    runner._progress(3)
    assert [q.get_nowait(), q.get_nowait()] == [7, 3]
    monkeypatch.setattr(runner, "_QUEUE", None)  # no bar in the parent: nothing is queued
    runner._progress(5)
    assert q.empty()
    stop.set()
    monkeypatch.setattr(runner, "_QUEUE", q)
    with pytest.raises(runner._Stopped):
        runner._progress(1)
    assert q.empty()  # stopped before reporting


def test_trace_file_relative_to_the_scenario_and_missing(tmp_path):
    (tmp_path / "t.arrow").write_bytes(b"x")
    s = dataclasses.replace(make_scenario(trace={"file": "t.arrow"}), base_dir=str(tmp_path))
    assert trace_for(s, tmp_path / "cache") == tmp_path / "t.arrow"
    s = dataclasses.replace(make_scenario(trace={"file": "gone.arrow"}), base_dir=str(tmp_path))
    with pytest.raises(ScenarioError) as e:
        trace_for(s, tmp_path / "cache")
    assert str(e.value) == f"trace.file 'gone.arrow': no such file (looked in {tmp_path / 'gone.arrow'})"


@pytest.mark.parametrize("guest", [{}, {"guest_bytes": 4 * 4096}, {"vcpus": 1}])
def test_a_generator_needs_the_guests_size_and_vcpus(tmp_path, guest):
    s = make_scenario(guest=guest, trace={"generator": "hotcold", "events": 10})
    cache = tmp_path / "new" / "cache"  # made, with its parents, and made again without complaint
    for _ in range(2):
        with pytest.raises(ScenarioError) as e:
            trace_for(s, cache)
        assert str(e.value) == "a [trace] generator needs guest.guest_bytes (or guest.size) and guest.vcpus"
    assert list(cache.iterdir()) == []  # nothing generated


def test_the_traces_last_event(trace):  # noqa: F811
    from replay.migration.traces import last_event_ns

    assert last_event_ns(trace) == 20000  # test_precopy's last write


@pytest.mark.parametrize("available, fits", [(127, False), (128, True), (131, True), (132, True)])
def test_background_reference_fits_in_a_quarter_of_the_memory(trace, monkeypatch, available, fits):  # noqa: F811
    # 4 pages x 8 bytes = 32 bytes of second engine: it fits when 32 <= available // 4 (128 and up).
    meta = read_meta(trace)
    assert meta.npages == 4
    monkeypatch.setattr("replay.core.validate.available_memory_bytes", lambda: available)
    assert refdigest.Background.fits(meta) is fits


def test_an_abandoned_background_reference_stops_its_thread(trace):  # noqa: F811
    bg = refdigest.Background(read_meta(trace), 1, 0, "reference")
    assert bg._thread.is_alive()
    bg.abandon()
    assert not bg._thread.is_alive()
    bg.abandon()  # twice: nothing left to stop
