"""Link failures at the exact instants where a phase ends, and one nanosecond either side (issue 22).

Two hand-computed timelines, both from the tests that derive them line by line:

- pre-copy (test_precopy's tiny scenario, mirror-vm): setup 1000..5120 (a mirror VM and an agent VMSA per
  side, 1000 ns each, then the handshake's round trip of 2 x 10 ns); round 0 sends the 4 pages at 1000 ns
  each, 5120..9120; the guest pauses at 9120, the final sync costs 100 ns and finds gfn 1 (rewritten at
  7000, after it was sent at 5120..6120): 1000 ns, until 10220; the VMSA (one vCPU at VMPL0) and device
  state are 5000 + 5000 bytes, 2000 ns: the VMSA send runs 10220..12220; one latency (10), the token's
  latency (10), resume_ns 0: the target resumes at 12240.
- post-copy (test_postcopy's tiny scenario, mirror-vm): the guest pauses at 3000; three VMSAs and device
  state cross 3000..7000, one latency: the target resumes at 7100. The push sends gfn 0 7100..8100 (its
  last byte in at 8200); vCPU 1's fault on gfn 3 has its reply on the wire 8200..9200 (in at 9300), vCPU
  0's fault on gfn 2 9200..10200 (in at 10300); the push's gfn 1 ends at 10100; complete at 11100.

The rules (replay/migration/link.py): a failure at any moment from the migration's start until strictly
before the resume aborts; a failure ending exactly at an instant is over at it (the outage is half-open,
[at, at + duration)); a page counts as delivered when its last byte arrives at or before the failure.
"""

from __future__ import annotations

import pytest

from replay.engines.common import ENGINE_KINDS
from replay.migration import run
from test_postcopy import pc_scenario, pc_trace
from test_precopy import tiny_scenario, tiny_trace

FOREVER = -1
PRE_RESUME, PRE_VMSA_SEND, PRE_PAUSE, PRE_START = 12240, 10220, 9120, 1000
PC_RESUME, PC_GFN0_IN = 7100, 8200


@pytest.fixture
def pre(tmp_path):
    return tiny_trace(tmp_path / "tiny.arrow")


@pytest.fixture
def pc(tmp_path):
    return pc_trace(tmp_path / "pc.arrow")


def _kinds(r):
    return [e["kind"] for e in r.events.to_pylist()]


def _events(r, kind):
    return [e for e in r.events.to_pylist() if e["kind"] == kind]


def test_the_precopy_timeline_is_the_one_computed_by_hand(pre):
    r = run(tiny_scenario(), strategy="mirror-vm", trace_path=pre)
    assert r.status == "completed"
    m = r.summary["metrics"]
    assert (m["switchover_ns"], m["downtime_ns"]) == (PRE_PAUSE, PRE_RESUME - PRE_PAUSE)
    assert _events(r, "vmsas_sent")[0]["t_ns"] == PRE_VMSA_SEND + 2000
    assert _events(r, "resume")[0]["t_ns"] == PRE_RESUME


@pytest.mark.parametrize("engine", ENGINE_KINDS)
@pytest.mark.parametrize("at, status", [(PRE_RESUME, "completed"), (PRE_RESUME - 1, "aborted"),
                                        (PRE_VMSA_SEND, "aborted"), (PRE_VMSA_SEND - 1, "aborted"),
                                        (PRE_PAUSE, "aborted"), (PRE_START, "aborted")])
def test_precopy_failure_for_good_around_the_resume(pre, engine, at, status):
    r = run(tiny_scenario(faults=[{"at_ns": at, "duration_ns": FOREVER}]), strategy="mirror-vm", engine=engine,
            trace_path=pre)
    assert r.status == status
    if status == "aborted":
        assert f"link down at {at} ns" in r.summary["status_reason"]
        assert "resume" not in _kinds(r)
        d = r.summary["digests"]
        assert d["end_of_trace"] == d["no_migration"]
    else:  # the target already runs: nothing after the resume needs the link
        assert _events(r, "resume")[0]["t_ns"] == PRE_RESUME
        assert r.summary["metrics"]["downtime_ns"] == PRE_RESUME - PRE_PAUSE


@pytest.mark.parametrize("duration, status", [(1, "completed"), (2, "aborted")])
def test_an_outage_ending_exactly_at_the_migrations_start_does_not_concern_it(pre, duration, status):
    # [999, 1000) is over when the migration starts at 1000; [999, 1001) is down at 1000.
    r = run(tiny_scenario(faults=[{"at_ns": PRE_START - 1, "duration_ns": duration}]), strategy="mirror-vm",
            trace_path=pre)
    assert r.status == status
    if status == "aborted":
        assert f"link down at {PRE_START} ns" in r.summary["status_reason"]
    else:
        assert r.summary["metrics"]["downtime_ns"] == PRE_RESUME - PRE_PAUSE


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_postcopy_failure_exactly_at_the_resume_is_a_postcopy_failure(pc, engine):
    at = run(pc_scenario(faults=[{"at_ns": PC_RESUME, "duration_ns": FOREVER}]), strategy="mirror-vm",
             engine=engine, trace_path=pc)
    before = run(pc_scenario(faults=[{"at_ns": PC_RESUME - 1, "duration_ns": FOREVER}]), strategy="mirror-vm",
                 engine=engine, trace_path=pc)
    # At the resume the target runs: post-copy fails with every page still on the source.
    assert at.status == "failed"
    assert at.summary["metrics"]["postcopy"]["source_only_pages"] == 4
    assert _events(at, "resume")[0]["t_ns"] == PC_RESUME
    # One nanosecond before, the target never ran: the source runs on.
    assert before.status == "aborted"
    assert f"link down at {PC_RESUME - 1} ns" in before.summary["status_reason"]
    assert "resume" not in _kinds(before)


@pytest.mark.parametrize("engine", ENGINE_KINDS)
@pytest.mark.parametrize("at, source_only", [(PC_GFN0_IN, 3), (PC_GFN0_IN - 1, 4), (PC_GFN0_IN + 1, 3)])
def test_postcopy_page_delivered_when_its_last_byte_lands_at_the_failure(pc, engine, at, source_only):
    # gfn 0's last byte is in at 8200: a failure then still delivers it (the engine's link deadline is
    # 8200 - latency = 8100, the page's send end); at 8199 it is lost. gfn 3's reply lands at 9300: lost.
    r = run(pc_scenario(faults=[{"at_ns": at, "duration_ns": FOREVER}]), strategy="mirror-vm", engine=engine,
            trace_path=pc)
    assert r.status == "failed"
    assert r.summary["metrics"]["postcopy"]["source_only_pages"] == source_only


def test_postcopy_outage_is_over_at_its_end(pc):
    # [9000, 10000), no re-keying cost: the link is up again at exactly 10000, a stall of 1000 ns.
    r = run(pc_scenario(faults=[{"at_ns": 9000, "duration_ns": 1000}]), strategy="mirror-vm", trace_path=pc)
    assert r.status == "completed"
    assert [(e["t_ns"], e["detail"]) for e in _events(r, "link_up")] == [(10000, "recovered; re-keyed; stalled_ns=1000")]
    # A second failure starting exactly where the first ends is a new failure at 10000 (for good here).
    r2 = run(pc_scenario(faults=[{"at_ns": 9000, "duration_ns": 1000}, {"at_ns": 10000, "duration_ns": FOREVER}]),
             strategy="mirror-vm", trace_path=pc)
    assert r2.status == "failed"
    assert [e["t_ns"] for e in _events(r2, "link_down")] == [9000, 10000]


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_two_back_to_back_postcopy_outages_are_one_outage(pc, engine):
    # With no re-keying cost, [9000, 10000) then [10000, 11000) leave the link exactly as [9000, 11000) does:
    # the same pages, the same fault service, the same end; only the events tell them apart.
    two = run(pc_scenario(faults=[{"at_ns": 9000, "duration_ns": 1000}, {"at_ns": 10000, "duration_ns": 1000}]),
              strategy="mirror-vm", engine=engine, trace_path=pc)
    one = run(pc_scenario(faults=[{"at_ns": 9000, "duration_ns": 2000}]), strategy="mirror-vm", engine=engine,
              trace_path=pc)
    assert two.status == one.status == "completed"
    for key in ("completion_ns", "postcopy_pages", "postcopy_bytes"):
        assert two.summary["metrics"][key] == one.summary["metrics"][key], key
    for key in ("blocktime_ns_per_vcpu", "requests", "source_only_pages"):
        assert two.summary["metrics"]["postcopy"][key] == one.summary["metrics"]["postcopy"][key], key
    assert [e["t_ns"] for e in _events(two, "link_up")] == [10000, 11000]
    assert [e["t_ns"] for e in _events(one, "link_up")] == [11000]
    assert all(two.summary["invariants"].values())


@pytest.mark.parametrize("psp, cpu", [(0, 333), (222, 0), (222, 333)])
def test_postcopy_recovery_pays_the_re_handshake(tmp_path, psp, cpu):
    # The handshake at setup waits psp + cpu more: start that much earlier so the guest pauses at 3000 as
    # before. A recovered outage [9000, 10000) is then re-keyed: up at 10000 + psp + cpu, which leaves the
    # run exactly as an outage [9000, 10000 + psp + cpu) without re-keying cost.
    trace = pc_trace(tmp_path / "pc.arrow")
    costly = run(pc_scenario(costs={"attestation_psp_ns": psp, "attestation_cpu_ns": cpu}, start_ns=800 - psp - cpu,
                             faults=[{"at_ns": 9000, "duration_ns": 1000}]), strategy="mirror-vm", trace_path=trace)
    longer = run(pc_scenario(faults=[{"at_ns": 9000, "duration_ns": 1000 + psp + cpu}]), strategy="mirror-vm",
                 trace_path=trace)
    assert costly.status == "completed"
    assert [(e["t_ns"], e["detail"]) for e in _events(costly, "link_up")] == [
        (10000 + psp + cpu, f"recovered; re-keyed; stalled_ns={1000 + psp + cpu}")]
    assert costly.summary["metrics"]["switchover_ns"] == 3000
    assert costly.summary["metrics"]["completion_ns"] == longer.summary["metrics"]["completion_ns"]
    assert (costly.summary["metrics"]["postcopy"]["blocktime_ns_per_vcpu"]
            == longer.summary["metrics"]["postcopy"]["blocktime_ns_per_vcpu"])


@pytest.mark.parametrize("at, noticed", [(9500, 9500), (PRE_VMSA_SEND, PRE_VMSA_SEND), (PRE_VMSA_SEND + 1, PRE_VMSA_SEND + 1),
                                         (12225, 12225), (PRE_RESUME - 1, PRE_RESUME)])
def test_a_downtime_failure_keeps_the_source_paused_until_it_is_noticed(pre, at, noticed):
    # The source stays paused from 9120 until the abort; the VMSA send's own check sees a failure anywhere
    # up to its last byte's arrival (12230) at once, a later one only the resume's check (12240). Then the
    # source resumes: the guest lost exactly that pause, and its trace (last write at 20000) ends that late.
    r = run(tiny_scenario(faults=[{"at_ns": at, "duration_ns": FOREVER}]), strategy="mirror-vm", trace_path=pre)
    m = r.summary["metrics"]
    assert r.status == "aborted"
    assert (m["completion_ns"], m["downtime_ns"], m["guest_lost_ns"]) == (noticed, noticed - PRE_PAUSE, noticed - PRE_PAUSE)
    assert m["trace_end_ns"] == 20000 + noticed - PRE_PAUSE


@pytest.mark.parametrize("at, status, source_only", [(9700, "completed", 0), (9699, "failed", 1)])
def test_postcopy_last_reply_landing_exactly_at_the_failure(tmp_path, at, status, source_only):
    # One vCPU: one VMSA, the target resumes at 5100 (g = v - 2100). The push sends gfn 0, 1, 2 until 8100;
    # the vCPU faults on gfn 3 at g 5900 (v 8000): request in at 8100, packaged until 8600, on the wire
    # until 9600, in at 9700, after the push's end. A failure for good at 9700 still delivers it; at 9699
    # the reply is lost with the link and gfn 3 exists only on the source.
    trace = pc_trace(tmp_path / "f.arrow", rows=[(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (5900, 0, 3)], vcpus=1)
    ok = run(pc_scenario(), strategy="mirror-vm", trace_path=trace)
    assert [(f["gfn"], f["raised_ns"], f["served_ns"]) for f in ok.faults.to_pylist()] == [(3, 8000, 9700)]
    r = run(pc_scenario(faults=[{"at_ns": at, "duration_ns": FOREVER}]), strategy="mirror-vm", trace_path=trace)
    assert r.status == status
    assert r.summary["metrics"]["postcopy"]["source_only_pages"] == source_only
    if status == "completed":
        assert r.summary["metrics"]["completion_ns"] == 9700
    else:
        assert [e["t_ns"] for e in _events(r, "link_down")] == [9699]
    # Recovered instead: the lost reply comes again once the link is back; the run completes later.
    back = run(pc_scenario(faults=[{"at_ns": 9699, "duration_ns": 100}]), strategy="mirror-vm", trace_path=trace)
    assert back.status == "completed" and back.summary["metrics"]["completion_ns"] > 9799


def test_a_fault_reply_lost_after_the_push_is_requested_again_at_the_recovery(tmp_path):
    # No background push, one vCPU: the target resumes at 5100 (g = v - 2100). The fault on gfn 2 at g 3500
    # (v 5600) takes its path, 1700 ns (latency 100, packaging 500, the reply 1000, latency 100): in at 7300.
    # An outage [7000, 7200) loses the reply; re-keyed at 7200 (no cost here), the request goes again and
    # takes the same path: served at 8900. An outage ending exactly at the arrival loses it too.
    trace = pc_trace(tmp_path / "np.arrow", rows=[(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (3500, 0, 2)], vcpus=1)
    for faults, served in (([], 7300), ([{"at_ns": 7000, "duration_ns": 200}], 8900),
                           ([{"at_ns": 7299, "duration_ns": 1}], 7300 + 1700),
                           ([{"at_ns": 7300, "duration_ns": 1}], 7300)):
        r = run(pc_scenario(postcopy_background_push=False, faults=faults), strategy="mirror-vm", trace_path=trace)
        assert r.status == "completed"
        assert [(f["gfn"], f["raised_ns"], f["served_ns"]) for f in r.faults.to_pylist()] == [(2, 5600, served)], faults


def test_nothing_of_the_vmsas_is_counted_when_the_run_aborts_before_them(pre):
    done = run(tiny_scenario(), strategy="mirror-vm", trace_path=pre).summary["metrics"]
    early = run(tiny_scenario(faults=[{"at_ns": 9500, "duration_ns": FOREVER}]), strategy="mirror-vm",
                trace_path=pre).summary["metrics"]
    assert (done["vmsas_sent"], done["device_state_bytes"]) == (1, 5000)
    assert (early["vmsas_sent"], early["device_state_bytes"]) == (0, 0)


def test_a_generated_trace_is_made_once_and_then_read_from_the_cache(tmp_path):
    # (tools/mutate survivor in replay/migration/traces.py) The first call generates into the cache, the
    # second finds it there and leaves it untouched.
    from replay.migration import trace_for
    from replay.scenario.spec import make_scenario

    s = make_scenario(guest={"size": "1MiB", "vcpus": 1}, trace={"generator": "uniform", "events": 100, "rate": 1_000_000})
    cache = tmp_path / "cache"
    first = trace_for(s, cache)
    assert first.is_file() and first.parent == cache
    stamp = first.stat().st_mtime_ns
    first.chmod(0o444)
    assert trace_for(s, cache) == first and first.stat().st_mtime_ns == stamp
