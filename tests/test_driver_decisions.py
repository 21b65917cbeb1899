"""The migration driver's own decisions (replay/migration/__init__.py), each on a hand-computed tiny run
(issue 22, tools/mutate survivors): the scenario-vs-trace check, the engine it records and builds, the
separate reference pass, hybrid's switch after ``precopy_rounds``, the downtime limit's two sources,
dirty logging off after a cancel or an abort, and which action a link abort is credited to.

The runs are test_precopy's tiny pre-copy scenario (4 pages of 5000 wire bytes on a 5 GB/s link: 1000 ns
a page; latency 10 ns; sync 100 ns; migration from 1000 ns) and test_postcopy's post-copy one (the guest
pauses at 3000, the target resumes at 7100), whose timelines test_boundaries derives. With bursts and
bandwidth periods of 2000 ns (test_costs_exact's bandwidth-boundary run) round 0 sends gfn 0 and 1
5120..7120; the bandwidth measured then is 10000 B / 2000 ns = 5 GB/s.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from replay.core.errors import ScenarioError
from replay.engines import make_engine
from replay.migration import Migration, run, trace_for
from replay.migration import refdigest
from replay.scenario.spec import AdversarySpec, LinkFault, with_adversary
from test_adversary import START_NS, base
from test_postcopy import pc_scenario, pc_trace
from test_precopy import ROWS, tiny_scenario, tiny_trace, write_trace

FOREVER = -1
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def pre(tmp_path):
    return tiny_trace(tmp_path / "tiny.arrow")


def _m(r):
    return r.summary["metrics"]


def _events(r, kind):
    return [(e["t_ns"], e["detail"]) for e in r.events.to_pylist() if e["kind"] == kind]


# ------------------------------------------------------------------------------ what a run is given


@pytest.mark.parametrize("key, value, have", [("vcpus", 2, 1), ("guest_bytes", 8 * 4096, 4 * 4096)])
def test_a_scenario_guest_that_is_not_the_traces_is_refused(pre, key, value, have):
    s = tiny_scenario()
    s = dataclasses.replace(s, guest=dataclasses.replace(s.guest, **{key: value}))
    with pytest.raises(ScenarioError) as e:
        Migration(s, pre)
    assert str(e.value) == (f"{pre}: the trace's {key} is {have} but the scenario's guest.{key} is {value} "
                            f"(--set guest.{key}={have}, or 0 to take the trace's)")
    # The trace's own figure is accepted, as is 0 (take the trace's).
    for ok in (have, 0):
        Migration(dataclasses.replace(s, guest=dataclasses.replace(s.guest, **{key: ok})), pre)


def test_engine_and_the_rest_are_keyword_arguments(pre):
    with pytest.raises(TypeError):
        Migration(tiny_scenario(), pre, "reference")
    with pytest.raises(TypeError):
        run(tiny_scenario(), "mirror-vm")


def test_the_record_names_the_engine_and_the_run_builds_two_hosts(pre):
    assert run(tiny_scenario(), engine="reference", trace_path=pre).summary["tool"]["engine"] == "reference"
    assert run(tiny_scenario(), engine="cython", trace_path=pre).summary["tool"]["engine"] == "cython"
    built = []

    def plain(**kw):
        built.append(kw["hosts"])
        return make_engine("reference", **kw)

    def named(**kw):
        return make_engine("reference", **kw)

    named.kind = "faulty-test-engine"
    assert run(tiny_scenario(), engine=plain, trace_path=pre).summary["tool"]["engine"] == "custom"
    assert run(tiny_scenario(), engine=named, trace_path=pre).summary["tool"]["engine"] == "faulty-test-engine"
    # A source and a target, nothing more: run_memory_bytes budgets exactly two hosts' state.
    assert built == [2]


def test_a_guest_too_big_for_a_second_engine_gets_the_separate_reference_pass(pre, tmp_path, monkeypatch):
    monkeypatch.setenv("SNP_REPLAY_CACHE", str(tmp_path / "cache"))  # nothing known yet
    monkeypatch.setattr(refdigest.Background, "fits", classmethod(lambda cls, meta: False))
    m = Migration(tiny_scenario(), pre, engine="reference")
    r = m.run()
    d = r.summary["digests"]
    assert len(d["no_migration"]) == 64 and d["no_migration"] == d["end_of_trace"]
    assert refdigest.lookup(m.meta, m.s.guest.asid, m.s.guest.os_vmpl, "reference") == d["no_migration"]


def test_a_metadata_run_does_not_load_data_mode_or_cryptography(pre):
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from test_precopy import tiny_scenario\n"
            "from replay.migration import run\n"
            "assert run(tiny_scenario(), trace_path=sys.argv[2]).status == 'completed'\n"
            "print(sorted(m for m in ('replay.migration.data', 'cryptography') if m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", code, str(TESTS), str(pre)], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ hybrid and the limit


def _hybrid(pre, precopy_rounds):
    # device state 1000 B: the VMSA (5000 B on the wire) and it cross in 1200 ns. Limit 2100 ns: the
    # threshold is 5 GB/s x 2100 ns = 10500 B once round 0's period is measured.
    return run(tiny_scenario(costs={"device_state_bytes": 1000}, mode="hybrid", precopy_rounds=precopy_rounds,
                             burst_ns=2000, bandwidth_period_ns=2000, downtime_limit_ns=2100),
               strategy="mirror-vm", trace_path=pre)


def test_hybrid_switches_after_precopy_rounds_syncs_beyond_the_initial_one(pre):
    # At 7120 2 pages (8192 B) are pending, under 10500: sync (100 ns), which finds gfn 1 (rewritten at
    # 7000 after its send): 3 pages, 12288 B, over the threshold. precopy_rounds = 1: that sync is the one
    # beyond the initial sync: post-copy at 7220, for pending above the threshold.
    one = _hybrid(pre, 1)
    assert _events(one, "precopy_end") == [
        (7220, "max_rounds: postcopy; pending=12288 threshold=10500 bandwidth=5000000000")]
    assert (one.status, _m(one)["rounds"], _m(one)["switchover_ns"]) == ("completed", 3, 7220)
    # The downtime: the discard sync (100), the VMSA and device state (1200), one latency (10): 1310 ns,
    # within the 2100 ns limit; the limit is exceeded all the same, by the pre-copy that could not
    # reach it (12288 B pending above 10500).
    assert _m(one)["downtime_ns"] == 1310
    assert _m(one)["downtime_limit_exceeded"] is True
    assert [d for _, d in _events(one, "trace_end")] == ["host=target"]  # the guest ended its trace there
    # precopy_rounds = 2: round 1 bursts 7220..9220 (gfn 2, 3); the period 7120..9220 measured 10000 B in
    # 2100 ns: 4761904761 B/s, threshold 9999 B; 1 page (4096 B) pending: sync at 9220 finds nothing
    # new (no write in 7120..9220): converged at 9320, stop-and-copy.
    two = _hybrid(pre, 2)
    assert _events(two, "precopy_end") == [
        (9320, "converged: stop-and-copy; pending=4096 threshold=9999 bandwidth=4761904761")]
    assert (two.status, _m(two)["rounds"], _m(two)["switchover_ns"]) == ("completed", 4, 9320)


@pytest.mark.parametrize("limit, exceeded", [(4100, False), (4099, True)])
def test_postcopy_downtime_equal_to_the_limit_is_within_it(tmp_path, limit, exceeded):
    # Post-copy: paused at 3000, resumed at 7100: 4100 ns of downtime; no pre-copy.
    r = run(pc_scenario(downtime_limit_ns=limit), strategy="mirror-vm", trace_path=pc_trace(tmp_path / "p.arrow"))
    assert _m(r)["downtime_ns"] == 4100
    assert _m(r)["downtime_limit_exceeded"] is exceeded


# ------------------------------------------------------------------------------ after a cancel or an abort

WP = 19  # dirty_wp_fault_ns: the guest's loss per write-protect fault while dirty logging is on


def test_a_cancel_turns_dirty_logging_off(pre):
    # Limit 2000 ns: threshold 10000 B; at 7120 8192 B pending: sync to 7220, 3 pages (12288 B) pending at
    # max_rounds 2: cancelled at 7220. Logging ran 5000..7220: gfn 1's write at 7000 faults; gfn 3's at
    # 20000 comes after the cancel: no fault (the run's wp_faults count the whole trace).
    r = run(tiny_scenario(costs={"dirty_wp_fault_ns": WP}, burst_ns=2000, bandwidth_period_ns=2000,
                          downtime_limit_ns=2000, on_max_rounds="cancel"), strategy="mirror-vm", trace_path=pre)
    assert (r.status, _m(r)["completion_ns"]) == ("cancelled", 7220)
    assert _m(r)["wp_faults"] == 1


def test_an_abort_turns_dirty_logging_off(pre):
    # Failure for good at 9500, in the downtime (paused from 9120): the source resumes at 9500 having
    # lost the 380 ns pause and gfn 1's fault at 7000; gfn 3's write at 20000 is after the abort.
    r = run(tiny_scenario(costs={"dirty_wp_fault_ns": WP}, faults=[{"at_ns": 9500, "duration_ns": FOREVER}]),
            strategy="mirror-vm", trace_path=pre)
    assert r.status == "aborted"
    assert (_m(r)["guest_lost_ns"], _m(r)["wp_faults"]) == (380 + WP, 1)


def test_a_failure_before_the_pause_is_waited_for_with_the_guest_running(pre):
    # A failure for good at 9120: round 0's last page (8120..9120, in at 9130) would arrive after it, so
    # the send stops at 8120; the abort comes at the failure, 9120, the guest running throughout.
    r = run(tiny_scenario(faults=[{"at_ns": 9120, "duration_ns": FOREVER}]), strategy="mirror-vm", trace_path=pre)
    m = _m(r)
    assert r.status == "aborted"
    assert (m["completion_ns"], m["downtime_ns"], m["guest_lost_ns"]) == (9120, 0, 0)
    assert _events(r, "abort") == [(9120, "link down at 9120 ns before the target resumed: source runs on")]
    # No time lost: the trace (last write at 20000) ends on time, on the source.
    assert _events(r, "trace_end") == [(20000, "host=source")]


# ------------------------------------------------------------------------------ the adversary's link loss


def test_an_abort_another_fault_caused_is_not_credited_to_a_link_loss_action():
    # A [[fault]] cuts the link for good 1 ms into the migration; the link-loss action is due 3 ms in,
    # after the abort: it never acts.
    s = with_adversary(base(), [AdversarySpec(kind="link-loss", at_ns=START_NS + 3_000_000)])
    s = dataclasses.replace(s, faults=(LinkFault(at_ns=START_NS + 1_000_000),))
    r = Migration(s, trace_for(s)).run()
    assert r.status == "aborted" and f"link down at {START_NS + 1_000_000} ns" in r.summary["status_reason"]
    (a,) = r.summary["adversary"]
    assert (a["outcome"], a["detected_by"], a["applied_ns"]) == ("not_reached", "", 0)



def test_a_trace_that_ends_inside_the_migration_ends_at_the_completion(tmp_path):
    # The tiny trace without its write at 20000: its last event (7000) is behind the guest when the run
    # completes at 12240 (the guest at g = 12240 - 3120 = 9120), so the trace ends right then.
    trace = write_trace(tmp_path / "short.arrow", [(t, 0, gfn) for t, gfn in ROWS if t < 20000], npages=4, vcpus=1)
    r = run(tiny_scenario(), strategy="mirror-vm", trace_path=trace)
    assert (_m(r)["completion_ns"], _m(r)["trace_end_ns"]) == (12240, 12240)
