"""Data mode's capture batches (replay/migration/data.py) at a small scale: with the capture buffer cut to
4 pages (``CAPTURE_PAGES``, 2048 in a run), a pre-copy round whose sends the guest keeps touching fills the
buffer exactly (4 captured pages in one batch), after a group too big for it went out sealed where it lay,
and at a transfer's start. Cutting a transfer's packets into batches must not change what crosses: the
run's security facts and digests are those of the same run with the full-size buffer, and no batch writes
past the buffer's end (a batch that started its rows at 1 instead of 0 would)."""

from __future__ import annotations

import pytest

import replay.migration.data as data
import replay.security.memory as memory
from replay.migration import run
from test_precopy import tiny_scenario, write_trace

SMALL = 4


@pytest.mark.parametrize("cache", [None, 0])
@pytest.mark.parametrize("start", [20000, 35000])
def test_small_capture_batches_send_the_same_as_one_batch(tmp_path, monkeypatch, start, cache):
    # 16 written pages; from `start` the guest rewrites gfn 5k mod 16 every 500 ns while round 0 sends.
    # 20000: the round's first batch captures 4 pages; 35000: the first sends form a group of 7 untouched
    # pages (more than 4: sealed in place in batches of 4 and 3), then a batch captures 4.
    rows = [(i, 0, i) for i in range(16)] + [(start + 500 * k, 0, (k * 5) % 16) for k in range(200)]
    trace = write_trace(tmp_path / "t.arrow", rows, npages=16, vcpus=1)
    s = tiny_scenario(data=True, max_rounds=3, downtime_limit_ns=10**6)
    full = run(s, strategy="mirror-vm", trace_path=trace)

    used = []
    send_captured = data.DataMode._send_captured

    def spy(self, groups, gfns, versions, at, private, n_used, stream):
        used.append(n_used)
        return send_captured(self, groups, gfns, versions, at, private, n_used, stream)

    monkeypatch.setattr(data, "CAPTURE_PAGES", SMALL)
    if cache is not None:
        monkeypatch.setattr(memory, "CACHE_PAGES", cache)
    monkeypatch.setattr(data.DataMode, "_send_captured", spy)
    small = run(s, strategy="mirror-vm", trace_path=trace)
    assert SMALL in used  # the case this test is for: a batch that fills the buffer
    assert full.status == small.status == "completed"
    assert small.summary["metrics"]["security"] == full.summary["metrics"]["security"]
    assert small.summary["digests"] == full.summary["digests"]
    assert small.summary["invariants"] == full.summary["invariants"] and all(small.summary["invariants"].values())
