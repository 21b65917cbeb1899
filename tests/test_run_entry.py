"""The run entry points of replay/migration/runner.py at their edges (issue 22's mutation survivors there):

- the progress bar: shown only when asked for and on a terminal, counting events in k/M units and gone
  from the terminal when it closes; its total is the events the run will read (two passes while the
  no-migration reference is not cached, one once it is or is given), so it ends at exactly 100%;
  compare's bar counts both strategies' passes and its drain thread never keeps the interpreter alive;
- compare computes data mode's plaintext reference once in the parent only in data mode;
- what ``prepare`` refuses, each at its exact boundary: a trace ending after 2^63-1 ns, a guest beyond
  16 TiB - 4 MiB, an output that is the trace, the memory a run needs (one process by default; refused
  unless allowed) and, only when it is about to generate the trace, the disk the generation needs;
- every option after the scenario (and the output) is keyword-only;
- a run record written by either engine (the reference engine once handed numpy integers to the JSON
  summary: `replay run --engine reference` failed writing every record).
"""

from __future__ import annotations

import io
import json
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from replay.core import validate
from replay.core.errors import ResourceError, TraceError, UsageError
from replay.engines.common import ENGINE_KINDS
from replay.migration import refdigest, runner
from replay.scenario.spec import make_scenario
from test_costs_exact import trace  # noqa: F401  (fixture: test_precopy's 4-page trace, 8 events)
from test_precopy import tiny_scenario, write_trace

EVENTS = 8  # test_precopy's trace: 4 fill writes and 4 more


class _Tty(io.StringIO):
    def isatty(self):
        return True


class _Refused(Exception):
    pass


@pytest.mark.parametrize("enabled, tty, shown", [(True, True, True), (True, False, False),
                                                 (False, True, False), (False, False, False)])
def test_the_bar_only_on_a_terminal_when_asked(monkeypatch, enabled, tty, shown):
    monkeypatch.setattr(sys, "stderr", _Tty() if tty else io.StringIO())
    with runner.progress_bar(2500, "precopy", enabled) as update:
        assert (update is not None) is shown
        if update:
            update(1000)
            update(1500)
    if not shown:
        assert sys.stderr.getvalue() == ""


def test_the_bar_counts_in_k_units_and_leaves_no_trace(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Tty())
    with runner.progress_bar(2500, "precopy", True) as update:
        update(2500)
    text = sys.stderr.getvalue()
    assert text.startswith("\rprecopy:   0%")
    assert "0.00/2.50k" in text  # unit_scale: 2500 events shown as 2.50k
    # leave=False: the bar is erased at the end (overwritten with blanks, the cursor back at the start of
    # the line): nothing of it stays, no line is ended
    assert text.endswith(" \r") and "\n" not in text


@contextmanager
def _recording_bar(bars):
    @contextmanager
    def bar(total, desc, enabled):
        got = []
        bars.append((total, desc, enabled, got))
        yield got.append
    yield bar


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_a_runs_bar_ends_at_its_total(trace, tmp_path, monkeypatch, engine):  # noqa: F811
    monkeypatch.setenv("SNP_REPLAY_CACHE", str(tmp_path / "cache"))
    bars = []
    with _recording_bar(bars) as bar:
        monkeypatch.setattr(runner, "progress_bar", bar)
        first = runner.execute(tiny_scenario(), tmp_path / "a", strategy="mirror-vm", engine=engine, trace=trace,
                               show_progress=True)
        # the reference is cached now: one pass
        runner.execute(tiny_scenario(), tmp_path / "b", strategy="mirror-vm", engine=engine, trace=trace,
                       show_progress=True)
        # given (a fresh cache: nothing to look up): one pass, the given digest recorded
        monkeypatch.setenv("SNP_REPLAY_CACHE", str(tmp_path / "cache2"))
        digest = first.summary["digests"]["no_migration"]
        third = runner.execute(tiny_scenario(), tmp_path / "c", strategy="shadow-vcpu", engine=engine, trace=trace,
                               show_progress=True, no_migration_digest=digest)
    # not cached: the reference pass (8 events) and the run's read (8) = 16; then 8 and 8
    assert [(total, desc, sum(got)) for total, desc, _, got in bars] == [
        (2 * EVENTS, "mirror-vm", 2 * EVENTS), (EVENTS, "mirror-vm", EVENTS), (EVENTS, "shadow-vcpu", EVENTS)]
    assert third.summary["digests"]["no_migration"] == digest
    for out in ("a", "b", "c"):  # every record written, its summary plain JSON
        assert json.loads((tmp_path / out / "summary.json").read_text())["status"] == "completed"


def test_compare_counts_both_strategies_passes(trace, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SNP_REPLAY_CACHE", str(tmp_path / "cache"))
    bars, plain, threads = [], [], []
    real_plain, real_thread = refdigest.plaintext_digest, threading.Thread

    def plaintext_digest(*args, **kwargs):
        plain.append(args)
        return real_plain(*args, **kwargs)

    class Thread(real_thread):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            threads.append((kwargs.get("target"), self.daemon))

    monkeypatch.setattr(refdigest, "plaintext_digest", plaintext_digest)
    monkeypatch.setattr(threading, "Thread", Thread)
    with _recording_bar(bars) as bar:
        monkeypatch.setattr(runner, "progress_bar", bar)
        results = runner.run_parallel(tiny_scenario(), engine="reference", trace_path=trace, show_progress=True)
    assert [r.status for r in results] == ["completed", "completed"]
    ((total, desc, _, got),) = bars
    # not cached: 2 strategies x (reference + run) x 8 events = 32. (A worker that starts after the other
    # has cached the reference reads it instead of replaying: the bar may then stop at 24; once cached, a
    # compare's total is 2 x 8 = 16.)
    assert (total, desc) == (32, "compare") and sum(got) in (24, 32)
    assert plain == []  # metadata mode: no plaintext reference
    # the drain thread, a daemon: were the parent interrupted in the pool's shutdown, the thread would
    # wait on the queue for an end marker that never comes
    assert [daemon for target, daemon in threads if target is runner._drain] == [True]


def test_the_drain_feeds_the_bar_until_the_end_marker():
    import queue

    q = queue.Queue()
    for n in (8, 5, None, 7):
        q.put(n)
    got = []
    runner._drain(q, got.append)
    assert got == [8, 5] and q.get_nowait() == 7  # stops at None, leaves what follows


@pytest.mark.parametrize("last, refused", [((1 << 63) - 1, False), (1 << 63, True)])
def test_a_trace_ending_after_2_63_minus_1_is_refused(tmp_path, last, refused):
    p = write_trace(tmp_path / "late.arrow", [(0, 0, 0), (last, 0, 1)], npages=2, vcpus=1)
    if not refused:
        path, meta = runner.prepare(tiny_scenario(), trace=p)
        assert path == p and meta.events == 2
        return
    with pytest.raises(TraceError) as e:
        runner.prepare(tiny_scenario(), trace=p)
    assert str(e.value).startswith(f"{p}: the trace ends at t_ns {last}: a run replays traces ending by 2^63-1 ns")


@pytest.mark.parametrize("pages, refused", [((1 << 32) - 1024, False), ((1 << 32) - 1023, True)])
def test_a_guest_beyond_16_tib_less_4_mib_is_refused(tmp_path, pages, refused):
    # 2^32 gfns less the SVSM's 1,024 VMSA pages: 2^44 - 2^22 bytes at most
    p = write_trace(tmp_path / "big.arrow", [(0, 0, 0)], npages=pages, vcpus=1)
    if not refused:  # (its memory allowed: only the size rule is under test)
        _, meta = runner.prepare(tiny_scenario(), trace=p, allow_memory=True)
        assert meta.guest_bytes == (1 << 44) - (1 << 22)
        return
    with pytest.raises(TraceError, match=rf"^{p}: guest of {pages * 4096} bytes is beyond what a run migrates "
                                         rf"\({(1 << 44) - (1 << 22)} bytes"):
        runner.prepare(tiny_scenario(), trace=p, allow_memory=True)


def test_an_output_that_is_the_trace_is_refused(trace):  # noqa: F811
    with pytest.raises(UsageError, match="is the input"):
        runner.prepare(tiny_scenario(), trace=trace, out_check=trace)


def _memory(monkeypatch, have):
    monkeypatch.setattr(validate, "available_memory_bytes", lambda: have)
    monkeypatch.setattr(validate, "machine_available_bytes", lambda: have)


def test_a_runs_memory_is_one_process_and_refused_unless_allowed(trace, tmp_path, monkeypatch):  # noqa: F811
    # 4 pages x 24 bytes + 1 vCPU x 64 + the 256 MiB batch allowance (docs: run_memory_bytes)
    need = 4 * 24 + 64 + (256 << 20)
    assert validate.run_memory_bytes(4 * 4096, 1) == need
    _memory(monkeypatch, need)  # exactly enough for one run
    assert runner.prepare(tiny_scenario(), trace=trace)[0] == trace
    with pytest.raises(ResourceError, match="2 processes of"):  # compare's two workers do not fit
        runner.prepare(tiny_scenario(), trace=trace, processes=2)
    _memory(monkeypatch, need - 1)
    with pytest.raises(ResourceError, match=r"\(--allow-memory to try anyway\)$"):
        runner.prepare(tiny_scenario(), trace=trace)
    with pytest.raises(ResourceError):
        runner.execute(tiny_scenario(), tmp_path / "out", strategy=None, engine="cython", trace=trace,
                       show_progress=False)
    assert not (tmp_path / "out").exists()
    assert runner.prepare(tiny_scenario(), trace=trace, allow_memory=True)[0] == trace


def test_the_generation_checks_only_when_generating(trace, monkeypatch):  # noqa: F811
    def refuse(*args):
        raise _Refused

    monkeypatch.setattr(validate, "check_disk", refuse)
    gen = make_scenario(guest={"guest_bytes": 4 * 4096, "vcpus": 1}, trace={"generator": "hotcold", "events": 8})
    assert runner.prepare(gen, trace=trace)[0] == trace  # a trace given: nothing generated, no disk needed
    with pytest.raises(_Refused):
        runner.prepare(gen, trace=None)


def test_the_options_are_keyword_only(tmp_path):
    nowhere = tmp_path / "none.arrow"  # were an option taken positionally, the call would fail on it instead
    s = tiny_scenario()
    with pytest.raises(TypeError, match="positional argument"):
        runner.prepare(s, nowhere)
    with pytest.raises(TypeError, match="positional argument"):
        runner.execute(s, tmp_path / "out", None, engine="cython", trace=nowhere, show_progress=False)
    with pytest.raises(TypeError, match="positional argument"):
        runner.run_parallel(s, "cython", trace_path=nowhere, show_progress=False)
    assert not Path(tmp_path / "out").exists()
