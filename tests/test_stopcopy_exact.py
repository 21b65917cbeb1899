"""Stop-and-copy and the run's event log, by hand on test_precopy's tiny scenario (issue 22's mutation
survivors in replay/migration/stopcopy.py, setup.py, precopy.py and record.py).

The timeline (mirror-vm; derived in test_boundaries and test_costs_exact): setup 1000..5120 (two mirror VMs
and their agents' VMSAs, 1000 ns each; the initial sync 5000..5100 finds the 4 pages; the handshake's round
trip 2 x 10 ns); round 0 sends the 4 pages 5120..9120; converged with nothing pending; the guest pauses at
9120; the final sync (100 ns) finds gfn 1; gfn 1 10220; the VMSA (one vCPU at VMPL0: 4096 + 904 bytes) with
5000 bytes of device state, 2000 ns on the 5 GB/s link, until 12220; one latency for the last byte, one for
the token: the target resumes at 12240, a downtime of 3120 ns.

The rules (docs/costs.md, "Downtime"): the VMSAs and device state cross in the slower of their link time and
their packaging by the agents (a whole CPU each while the guest is paused); the VMSAs are one per vCPU per
VMPL in use (the SVSM's VMPL0, and the OS's when it runs below it); dirty logging stops at the pause, so a
source that runs on after an abort takes no more write-protect faults.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from replay.engines.common import ENGINE_KINDS
from replay.migration import run
from replay.migration.stopcopy import Switchover, vmpls_in_use
from test_costs_exact import trace  # noqa: F401  (fixture: test_precopy's 4-page trace)
from test_precopy import tiny_scenario

PAUSE, VMSA_SEND, RESUME = 9120, 10220, 12240
INVARIANTS_HOLD = {"end_of_trace_equals_no_migration": True, "target_equals_source_at_switchover": True,
                   "no_faults": True}


def _details(r, *kinds):
    return [(e["t_ns"], e["kind"], e["detail"]) for e in r.events.to_pylist() if e["kind"] in kinds]


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_the_event_log_by_hand(trace, engine):  # noqa: F811
    r = run(tiny_scenario(), strategy="mirror-vm", engine=engine, trace_path=trace)
    assert _details(r, "handshake", "setup_done", "round_start", "round_end", "precopy_end", "vmsas_sent",
                    "validation_token", "resume") == [
        (5100, "handshake", "attested handshake (20 ns; PSP wait 0 ns, cpu 0 ns per side)"),
        (5120, "setup_done", "setup_ns=4120 agents=1"),
        (5120, "round_start", "round=0 dirty_pages=4 agents=1"),
        (9120, "round_end", "round=0 pages=4 bytes=20000"),
        (9120, "precopy_end", "converged: stop-and-copy; pending=0 threshold=0 bandwidth=5000000000"),
        (12220, "vmsas_sent", "vmsas=1 device_state_bytes=5000"),
        (12240, "validation_token", "pages=5 match=True"),  # 4 pages in round 0, gfn 1 in the downtime
        (12240, "resume", "target resumed; downtime_ns=3120"),
    ]
    assert r.summary["invariants"] == INVARIANTS_HOLD
    # Each side's agent VMSA page: created (RMPUPDATE, PVALIDATE, RMPADJUST vmsa=1) and torn down (RMPADJUST
    # vmsa=0); the target also assigns and validates each private page on its first arrival (4 in round 0;
    # gfn 1 again in the downtime needs neither). Pre-copy has no fault table.
    assert r.summary["metrics"]["rmp"] == {
        "source": {"rmpupdate": 1, "pvalidate": 1, "rmpadjust": 2, "psmash": 0, "psc": 0},
        "target": {"rmpupdate": 5, "pvalidate": 5, "rmpadjust": 2, "psmash": 0, "psc": 0}}
    assert r.faults is None
    d = r.summary["digests"]
    assert d["target_at_switchover"] == d["source_at_switchover"] != ""


def test_precopy_end_names_pending_threshold_and_bandwidth(trace):  # noqa: F811
    # test_switchover_threshold's pending = threshold run: 8192 bytes pending, threshold 8192, 4.096 GB/s.
    s = tiny_scenario(burst_ns=2000, bandwidth_period_ns=2000, downtime_limit_ns=2000,
                      avail_switchover_bandwidth_bytes_per_s=4_096_000_000)
    r = run(s, strategy="mirror-vm", trace_path=trace)
    assert _details(r, "precopy_end") == [
        (7120, "precopy_end", "converged: stop-and-copy; pending=8192 threshold=8192 bandwidth=4096000000")]


def test_host_cpus_taken_and_the_guests_loss(trace):  # noqa: F811
    # Window 1000..12240 = 11240 ns. The mirror VM's CPU: its two agents' VMSAs (2 x 1000) and packaging 4 +
    # 1 pages and the VMSA (6 x 500): 5000; the host's: two mirror VMs (2 x 1000) and two syncs (2 x 100):
    # 2200. 7200 ns of CPU over 11240 ns: 640 milli-CPUs (640.57). The guest (one vCPU, its whole quota
    # demanded) ran all but the downtime: 11240 - 3120 = 8120; slowdown 3120 / 11240 = 277580 ppm (.07).
    m = run(tiny_scenario(), strategy="mirror-vm", trace_path=trace).summary["metrics"]
    assert (m["cpu_ns"]["mirror_vm"], m["cpu_ns"]["host"], m["total_ns"]) == (5000, 2200, 11240)
    d = m["cpu_demand"]
    assert (d["host_cpus_taken_milli"], d["demanded_ns"], d["ran_ns"]) == (640, 11240, 8120)
    assert (m["guest_lost_ns"], m["guest_slowdown_ppm"], m["guest_slowdown_ppm_per_vcpu"]) == (3120, 277580, [277580])
    assert all(type(x) is int for x in (*m["cpu_ns"].values(), *d.values(), m["guest_lost_ns"]) if x != "trace-span")


@pytest.mark.parametrize("engine", ENGINE_KINDS)
@pytest.mark.parametrize("pack, vmsa_ns", [(199, 200), (200, 200), (201, 201), (500, 500)])
def test_vmsa_send_takes_the_slower_of_link_and_packaging(trace, engine, pack, vmsa_ns):  # noqa: F811
    # A 96-byte VMSA with its 904-byte header and no device state: 1000 bytes, 200 ns on the link. Packaging
    # it takes page_pack_ns on the one agent (a whole CPU: the guest is paused). The pages keep the link's
    # pace (pack < 1000 ns), so only the VMSA send changes: downtime 3120 - 2000 + max(200, pack).
    s = tiny_scenario(costs={"page_pack_ns": pack, "vmsa_bytes": 96, "device_state_bytes": 0})
    r = run(s, strategy="mirror-vm", engine=engine, trace_path=trace)
    assert _details(r, "vmsas_sent") == [(VMSA_SEND + vmsa_ns, "vmsas_sent", "vmsas=1 device_state_bytes=0")]
    assert r.summary["metrics"]["downtime_ns"] == RESUME - 2000 + vmsa_ns - PAUSE
    assert r.summary["metrics"]["downtime_bytes"] == 5000 + 1000


def test_dirty_logging_stops_at_the_pause(trace):  # noqa: F811
    # One write-protect fault before the pause (gfn 1 at 7000). A link failure for good at the VMSA send
    # aborts: the source runs on, dirty logging off, so gfn 3's write at 20000 (at 21100, after the pause
    # of 10220 - 9120 ns) takes no fault.
    base = run(tiny_scenario(), strategy="mirror-vm", trace_path=trace).summary["metrics"]
    r = run(tiny_scenario(faults=[{"at_ns": VMSA_SEND, "duration_ns": -1}]), strategy="mirror-vm",
            trace_path=trace)
    assert r.status == "aborted"
    assert base["wp_faults"] == r.summary["metrics"]["wp_faults"] == 1


@pytest.mark.parametrize("os_vmpl, vmpls", [(0, [0]), (1, [0, 1]), (2, [0, 2]), (3, [0, 3])])
def test_vmpls_with_a_vmsa(os_vmpl, vmpls):
    assert vmpls_in_use(SimpleNamespace(s=SimpleNamespace(guest=SimpleNamespace(os_vmpl=os_vmpl)))) == vmpls


def test_a_switchover_is_immutable():
    sw = Switchover(12240, "a" * 64, "a" * 64, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sw.vmsas = 2


RECORD_KEYS = ("total_ns", "setup_ns", "downtime_ns", "expected_downtime_ns", "downtime_limit_exceeded",
               "switchover_reason", "switchover_ns", "completion_ns", "trace_end_ns", "rounds", "vmsas_sent",
               "device_state_bytes", "guest_lost_ns")


def test_a_run_aborted_in_setup_records_nothing_of_the_later_phases(trace):  # noqa: F811
    # The link fails for good at the migration's start (1000). Setup's steps need no link; the handshake
    # does: it starts after the initial sync, at 5100, and sees the failure then: abort at 5100, window 4100
    # ns. No setup time (setup never finished), no rounds, no switchover, no VMSA, no device state; the guest
    # never paused (nothing lost) and its trace ends at its last write, 20000.
    r = run(tiny_scenario(faults=[{"at_ns": 1000, "duration_ns": -1}]), strategy="mirror-vm", trace_path=trace)
    m = r.summary["metrics"]
    assert r.status == "aborted"
    assert tuple(m[k] for k in RECORD_KEYS) == (4100, 0, 0, 0, False, "", 0, 5100, 20000, 0, 0, 0, 0)
    assert m["precopy"] == {} and m["postcopy"]["switchover_to_complete_ns"] == 0
    # no switchover: nothing for its two sides to agree on, the invariant holds trivially
    assert r.summary["digests"]["target_at_switchover"] == "" and r.summary["invariants"] == INVARIANTS_HOLD


def test_a_cancelled_run_records_its_precopy_and_no_switchover(trace):  # noqa: F811
    # test_switchover_threshold's threshold-8193 run with on_max_rounds = cancel: at max_rounds (the sync at
    # 7120, 100 ns) it cancels at 7220: 2 rounds (no final sync), window 6220, expected downtime 2999, over
    # the limit (12288 pending > 8193); no switchover, no VMSA; the guest ran on the source throughout.
    s = tiny_scenario(burst_ns=2000, bandwidth_period_ns=2000, downtime_limit_ns=2000,
                      avail_switchover_bandwidth_bytes_per_s=4_096_500_000, on_max_rounds="cancel")
    r = run(s, strategy="mirror-vm", trace_path=trace)
    m = r.summary["metrics"]
    assert (r.status, r.summary["status_reason"]) == ("cancelled", "not converged after 2 rounds: cancelled (on_max_rounds)")
    assert tuple(m[k] for k in RECORD_KEYS) == (6220, 4120, 0, 2999, True, "max_rounds", 0, 7220, 20000, 2, 0, 0, 0)
    assert m["precopy"]["action"] == "cancel"


def test_a_migration_over_at_its_start_has_a_window_of_zero(trace):  # noqa: F811
    # Every setup cost and the latency 0, the migration starting at 0 and the link down for good from 0: the
    # handshake sees it at 0 and aborts there. A window of 0 ns: no total time, no demand, no loss, no CPU
    # rate (nothing divided by the empty window).
    s = tiny_scenario(costs={"mirror_vm_create_ns": 0, "dirty_sync_ns": 0, "ap_create_ns": 0}, start_ns=0,
                      latency_ns=0, faults=[{"at_ns": 0, "duration_ns": -1}])
    r = run(s, strategy="mirror-vm", trace_path=trace)
    m = r.summary["metrics"]
    assert (r.status, m["completion_ns"], m["total_ns"], m["guest_lost_ns"], m["guest_slowdown_ppm"]) == (
        "aborted", 0, 0, 0, 0)
    d = m["cpu_demand"]
    assert (d["demanded_ns"], d["ran_ns"], d["host_cpus_taken_milli"]) == (0, 0, 0)


def test_shared_pages_cost_the_host_on_both_sides(tmp_path):
    # gfn 0..2 shared (the inclusive range (0, 2)), host_page_ns 7: a shared page costs 7 ns of host CPU on
    # the source and again on the target. Round 0 sends gfn 0..2 (shared) and gfn 3: 3 x 2 x 7 = 42 ns; the
    # downtime sends gfn 1 (shared): 14 ns; the host's ledger: the base 2200 (two mirror VMs, two syncs) + 56.
    # The link paces everything (7 ns per page is far below its 1000), so no time changes.
    from test_precopy import tiny_trace

    t = tiny_trace(tmp_path / "shared.arrow", shared=((0, 2),))
    r = run(tiny_scenario(costs={"host_page_ns": 7}), strategy="mirror-vm", trace_path=t)
    rows = [(x["phase"], x["shared_pages"], x["private_pages"], x["host_cpu_ns"]) for x in r.rounds.to_pylist()]
    assert rows == [("precopy", 3, 1, 42), ("downtime", 1, 0, 14)]
    m = r.summary["metrics"]
    assert (m["cpu_ns"]["host"], m["downtime_ns"], m["shared_pages_sent"]) == (2256, 3120, 4)


def test_the_handshakes_psp_wait_and_cpu(trace):  # noqa: F811
    # attestation_psp_ns 29, attestation_cpu_ns 13: each side's agent (the mirror VM's, on the host CPUs: not
    # the guest's) waits 29 for its PSP and computes 13, both sides at once: 42 ns, plus the round trip of 2 x
    # 10: 62 ns; setup 4120 + 42. The mirror VM pays 2 x 13 of CPU; the guest loses nothing more.
    base = run(tiny_scenario(), strategy="mirror-vm", trace_path=trace).summary["metrics"]
    r = run(tiny_scenario(costs={"attestation_psp_ns": 29, "attestation_cpu_ns": 13}), strategy="mirror-vm",
            trace_path=trace)
    assert _details(r, "handshake") == [
        (5100, "handshake", "attested handshake (62 ns; PSP wait 29 ns, cpu 13 ns per side)")]
    m = r.summary["metrics"]
    assert m["setup_ns"] == 4120 + 42
    assert m["cpu_ns"]["mirror_vm"] - base["cpu_ns"]["mirror_vm"] == 2 * 13
    assert m["guest_lost_ns"] == base["guest_lost_ns"] == 3120


@pytest.mark.parametrize("at, setup_ns, completion", [(5119, 0, 5119), (5120, 4120, None)])
def test_the_handshake_needs_the_link_to_its_end(trace, at, setup_ns, completion):  # noqa: F811
    # The handshake runs 5100..5120 and needs the link for its whole length: a failure for good at 5119
    # aborts it (setup never finishes: no setup time; the abort at the failure); one at 5120 is after it:
    # setup completes (4120 ns) and pre-copy's first page meets the failure instead.
    r = run(tiny_scenario(faults=[{"at_ns": at, "duration_ns": -1}]), strategy="mirror-vm", trace_path=trace)
    m = r.summary["metrics"]
    assert r.status == "aborted" and m["setup_ns"] == setup_ns
    assert ("setup_done" in [e["kind"] for e in r.events.to_pylist()]) == (setup_ns > 0)
    if completion is not None:
        assert m["completion_ns"] == completion


@pytest.mark.parametrize("strategy, touches, cpu", [("mirror-vm", 8, 5000 + 8 * 7), ("shadow-vcpu", 0, 5000)])
def test_first_touch_npfs_only_for_the_mirror_vm(trace, strategy, touches, cpu):  # noqa: F811
    # mirror_npf_ns 7: the mirror VM's agent touches each private page first on each side (4 pages sent in
    # round 0: 8 NPFs, 8 x 7 ns of its CPU, below the link's pace); gfn 1 in the downtime was touched
    # already. Shadow vCPUs run in the guest's own context: no such NPF. (5000: the agents' base CPU.)
    r = run(tiny_scenario(costs={"mirror_npf_ns": 7}), strategy=strategy, trace_path=trace)
    m = r.summary["metrics"]
    owner = "mirror_vm" if strategy == "mirror-vm" else "primary_vm_agents"
    assert (m["mirror_first_touch_npfs"], m["cpu_ns"][owner], m["downtime_ns"]) == (touches, cpu, 3120)


def test_plain_postcopy_pauses_without_a_sync(trace):  # noqa: F811
    # No dirty log in plain post-copy: the downtime round finds no dirty pages; the post-copy round's are the
    # 4 the target lacks.
    r = run(tiny_scenario(mode="postcopy"), strategy="mirror-vm", trace_path=trace)
    assert [(x["phase"], x["dirty_pages"]) for x in r.rounds.to_pylist()] == [("downtime", 0), ("postcopy", 4)]
    assert r.faults is not None and r.faults.num_rows == r.summary["metrics"]["postcopy"]["requests"]
