"""The migration link's rules at their edges (replay/migration/link.py; survivors of tools/mutate over
link.py, dirtylog.py and the post-copy fault path's link handling).

The scenarios are test_precopy's tiny pre-copy run and test_postcopy's tiny post-copy run, with the figures
each test needs derived in its comments from the documented rules: a page counts as delivered only if its
last byte arrives (send end + latency) at or before the moment the link dies; failures are half-open
intervals [at, at + duration); an adversary's link loss is recorded at the moment the link went down.
"""

from __future__ import annotations

import pytest

import dataclasses

from replay.engines.common import ENGINE_KINDS
from replay.migration import run
from replay.scenario.spec import AdversarySpec
from test_postcopy import pc_scenario, pc_trace
from test_precopy import tiny_scenario, tiny_trace

FOREVER = -1
# Setup free of cost, no latency: the migration starts at 0 and its first round starts at 0 too.
FREE_SETUP = {"mirror_vm_create_ns": 0, "ap_create_ns": 0, "dirty_sync_ns": 0, "page_pack_ns": 0}


@pytest.fixture
def pre(tmp_path):
    return tiny_trace(tmp_path / "tiny.arrow")


@pytest.mark.parametrize("engine", ENGINE_KINDS)
@pytest.mark.parametrize("at, pages", [(0, 0), (1, 4)])
def test_a_link_dead_at_the_migrations_first_instant_delivers_nothing(pre, engine, at, pages):
    # Migration from 0, no latency, setup free: the handshake takes 0 ns and its check (down strictly before
    # its end, 0) lets it through. Round 0 sends the 4 pages, still zero at trace time 0: headers alone,
    # 904 bytes each on a 5 TB/s link: 3616 bytes, 0.72 ns, so every send ends by 1 ns. A link dead from 0
    # lets no page end at or before 0: nothing is delivered (a deadline of 1 ns would let all 4 through).
    # Dead from 1: all 4 are in; the run aborts either way, at the failure.
    s = tiny_scenario(costs=FREE_SETUP, start_ns=0, latency_ns=0, bandwidth_bytes_per_s=5_000_000_000_000,
                      faults=[{"at_ns": at, "duration_ns": FOREVER}])
    r = run(s, strategy="mirror-vm", engine=engine, trace_path=pre)
    m = r.summary["metrics"]
    assert r.status == "aborted"
    assert f"link down at {at} ns" in r.summary["status_reason"]
    assert (m["setup_ns"], m["precopy_pages"], m["bytes_sent"]) == (0, pages, 904 * pages)


@pytest.mark.parametrize("duration, status, effect", [(1000, "completed", "recovered: re-keyed, stalled 1555 ns"),
                                                      (FOREVER, "failed", "")])
def test_a_link_loss_during_the_push_is_recorded_when_the_link_went_down(tmp_path, duration, status, effect):
    # test_postcopy's tiny run in data mode, an adversary's link loss 1000 ns after the target resumed (the
    # push is running then). A loss that comes back is re-keyed (PSP 222 + CPU 333 ns) before anything
    # crosses: the stall is its 1000 ns plus the re-handshake's 555. One for good fails the migration; the
    # action is recorded either way, at the moment the link went down, in the push's phase.
    trace = pc_trace(tmp_path / "pc.arrow")
    plain = pc_scenario(costs={"attestation_psp_ns": 222, "attestation_cpu_ns": 333}, data=True)
    resumed = [e["t_ns"] for e in run(plain, strategy="mirror-vm", trace_path=trace).events.to_pylist()
               if e["kind"] == "resume"][0]
    at = resumed + 1000
    s = dataclasses.replace(plain, adversary=(AdversarySpec(kind="link-loss", at_ns=at, duration_ns=duration),))
    r = run(s, strategy="mirror-vm", trace_path=trace)
    assert r.status == status
    (a,) = r.summary["adversary"]
    assert (a["outcome"], a["detected_by"], a["applied_ns"], a["phase"], a["effect"]) == (
        "detected", "link", at, "postcopy", effect)


def test_a_link_loss_after_the_migration_completed_was_not_reached(tmp_path):
    # The same run with the loss due at 1 s, long after post-copy completed: the link never went down
    # while the migration needed it; the action is not reached (nor recorded as a loss at the end).
    trace = pc_trace(tmp_path / "pc.arrow")
    s = dataclasses.replace(pc_scenario(data=True), adversary=(
        AdversarySpec(kind="link-loss", at_ns=1_000_000_000, duration_ns=1000),))
    r = run(s, strategy="mirror-vm", trace_path=trace)
    assert r.status == "completed"
    (a,) = r.summary["adversary"]
    assert (a["outcome"], a["detected_by"], a["phase"]) == ("not_reached", "", "")


def test_the_resume_counts_the_pages_the_target_lacks(tmp_path):
    # test_postcopy's hybrid run: the pre-copy round sent gfn 0..3, the switchover discards the target's
    # stale gfn 1: it lacks 1 page of 4. Paused at 7200 (sync 100, VMSAs + device state 4000, latency 100):
    # resumed at 11400, a downtime of 4200.
    rows = [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (7050, 1, 1), (7250, 0, 1), (20000, 2, 0)]
    trace = pc_trace(tmp_path / "t.arrow", rows=rows)
    s = pc_scenario(mode="hybrid", precopy_rounds=1, downtime_limit_ns=1, bandwidth_period_ns=1)
    r = run(s, strategy="mirror-vm", trace_path=trace)
    assert [(e["t_ns"], e["detail"]) for e in r.events.to_pylist() if e["kind"] == "resume"] == [
        (11400, "target resumed; downtime_ns=4200 userfault_pages=1")]
