"""Cost terms that are 0 in the other hand-made scenarios, each made non-zero with its exact effect, and the
bandwidth period's boundary (issue 22).

The base is test_precopy's tiny pre-copy run (mirror-vm, hand-computed in test_boundaries): round 0 sends
4 pages at 1000 ns each (5000 bytes on a 5 GB/s link), the guest pauses at 9120, the downtime sends gfn 1
and then one VMSA (one vCPU at VMPL0) with 5000 bytes of device state (2000 ns), resuming at 12240: a
downtime of 3120 ns. Every figure below is derived from docs/costs.md's rule for the key, never from a run.
"""

from __future__ import annotations

import dataclasses

import pytest

from replay.engines.common import ENGINE_KINDS
from replay.migration import run
from test_precopy import tiny_scenario, tiny_trace

BOTH = ("mirror-vm", "shadow-vcpu")
DOWNTIME = 3120
OWNER = {"mirror-vm": "mirror_vm", "shadow-vcpu": "primary_vm_agents"}


@pytest.fixture
def trace(tmp_path):
    return tiny_trace(tmp_path / "tiny.arrow")


def _m(r):
    return r.summary["metrics"]


def _event(r, kind, prefix=""):
    return [e for e in r.events.to_pylist() if e["kind"] == kind and e["detail"].startswith(prefix)]


@pytest.mark.parametrize("engine", ENGINE_KINDS)
@pytest.mark.parametrize("strategy", BOTH)
def test_vmsa_unpack_at_the_resume(trace, strategy, engine):
    # page_unpack_ns = 301 (below the link's 1000 ns a page: the rounds keep the link's pace). The target's
    # agent unpacks the one VMSA before the resume, inside the downtime, on a whole CPU (one agent; the
    # guest does not run on the target yet): +301. Its owner's CPU pays every unpacked page: 4 in round 0,
    # gfn 1 in the downtime, and the VMSA: 6 x 301.
    base = run(tiny_scenario(), strategy=strategy, engine=engine, trace_path=trace)
    r = run(tiny_scenario(costs={"page_unpack_ns": 301}), strategy=strategy, engine=engine, trace_path=trace)
    assert _m(base)["downtime_ns"] == DOWNTIME
    assert _m(r)["downtime_ns"] == DOWNTIME + 301
    owner = OWNER[strategy]
    assert _m(r)["cpu_ns"][owner] - _m(base)["cpu_ns"][owner] == 6 * 301


@pytest.mark.parametrize("engine", ENGINE_KINDS)
@pytest.mark.parametrize("strategy", BOTH)
def test_os_below_vmpl0_sends_two_vmsas_per_vcpu(trace, strategy, engine):
    # os_vmpl = 2: a VMSA for VMPL0 and one for VMPL2: 2 x 5000 + 5000 bytes = 3000 ns on the link instead of
    # 2000, and two VMSAs to unpack (301 each) before the resume.
    r = run(_vmpl_scenario(2, {"page_unpack_ns": 301}), strategy=strategy, engine=engine, trace_path=trace)
    assert _event(r, "vmsas_sent")[0]["detail"] == "vmsas=2 device_state_bytes=5000"
    assert _m(r)["downtime_ns"] == DOWNTIME + 1000 + 2 * 301


def _vmpl_scenario(os_vmpl, costs):
    s = tiny_scenario(costs=costs)
    return dataclasses.replace(s, guest=dataclasses.replace(s.guest, os_vmpl=os_vmpl))


@pytest.mark.parametrize("host_cpus, round0_ns", [(4, 4 * 1000), (2, 4 * 2000), (3, -(-4 * 4000 // 3))])
def test_mirror_agents_share_the_host_cpus(trace, host_cpus, round0_ns):
    # Four mirror agents from the start, 4000 ns of packaging a page: they get min(4, host_cpus) CPUs, so a
    # page takes max(1000 on the link, 4000 / min(4, H)); with H = 3 the round's 16000 ns of work on 3 CPUs
    # is 5333.3 ns, rounded up once for the round (the clock runs on the CPU total, not per page).
    r = run(tiny_scenario(costs={"page_pack_ns": 4000}, agents_initial=4, agents_max=4, host_cpus=host_cpus),
            strategy="mirror-vm", trace_path=trace)
    start = _event(r, "round_start", "round=0")[0]["t_ns"]
    end = _event(r, "round_end", "round=0")[0]["t_ns"]
    assert end - start == round0_ns


@pytest.mark.parametrize("pack, vmgexit, agents", [(2000, 0, 2), (2001, 0, 3), (2000, 63, 2), (2000, 64, 3),
                                                   (2000, 127, 3)])
def test_agents_on_demand_round_up(trace, pack, vmgexit, agents):
    # Post-copy sizes its agents before the switchover: ceil((page_pack_ns + vmgexit_ns // batch_pages) /
    # link time of a page), here over 1000 ns; batch_pages = 64, so the VMGEXIT adds 0 ns a page below 64 ns.
    s = tiny_scenario(costs={"page_pack_ns": pack, "vmgexit_ns": vmgexit}, agents_max=8, host_cpus=8,
                      mode="postcopy")
    r = run(s, strategy="mirror-vm", trace_path=trace)
    assert _m(r)["agents_max"] == agents


def test_mirror_agents_on_demand_stop_at_the_host_cpus(trace):
    # 4000 ns a page wants 4 agents; three host CPUs cap the mirror VM at 3 (a fourth would share them).
    r = run(tiny_scenario(costs={"page_pack_ns": 4000}, agents_max=8, host_cpus=3, mode="postcopy"),
            strategy="mirror-vm", trace_path=trace)
    assert _m(r)["agents_max"] == 3


@pytest.mark.parametrize("engine", ENGINE_KINDS)
@pytest.mark.parametrize("period, downtime", [(2000, 5120), (2001, DOWNTIME)])
def test_bandwidth_period_ending_exactly_with_a_burst(trace, engine, period, downtime):
    # Bursts of 2000 ns carry exactly 2 pages. Downtime limit 2000 ns: once measured (5 GB/s), the threshold
    # is 10000 bytes, and QEMU's pending counts 4096 bytes a page.
    # period 2000: the period ends exactly with the first burst (at 7120): bandwidth 10000 B / 2000 ns, so
    # 2 pages pending (8192 <= 10000) sync at once; the sync adds gfn 1 (rewritten at 7000): 3 pending after
    # max_rounds (2 syncs): stop-and-copy at 7220 sends 3 pages (3000) + VMSA (2000) + 2 x 10 after the
    # 100 ns sync: downtime 5120.
    # period 2001: no estimate until the second burst (9120): the round sends all 4 pages, the sync finds
    # gfn 1 (4096 <= 10000): converged, the base run's downtime.
    r = run(tiny_scenario(burst_ns=2000, bandwidth_period_ns=period, downtime_limit_ns=2000), strategy="mirror-vm",
            engine=engine, trace_path=trace)
    end = _event(r, "round_end", "round=0")[0]
    assert (end["t_ns"], end["detail"]) == ((7120, "round=0 pages=2 bytes=10000") if period == 2000
                                            else (9120, "round=0 pages=4 bytes=20000"))
    assert _m(r)["downtime_ns"] == downtime


def _run(trace, strategy, **costs):
    return run(tiny_scenario(costs=costs), strategy=strategy, trace_path=trace)


@pytest.mark.parametrize("strategy", BOTH)
def test_setup_costs_one_by_one(trace, strategy):
    # Setup steps run one after another on the migration's clock (docs/costs.md, "Setup"); each key's
    # share, with one agent a side and 2 memslots, on top of the base run's setup:
    base = _m(_run(trace, strategy))
    mirror = strategy == "mirror-vm"
    per_gib = 7 * (1 << 30) // (4 * 4096)  # 7 ns for the tiny guest's 16 KiB, exactly
    cases = [
        ({"gmem_link_ns": 7}, 2 * 2 * 7 if mirror else 0),  # mirror only: per memslot per side
        ({"vcpu_create_ns": 11}, 2 * 11),  # per agent per side, both designs
        ({"rmpupdate_ns": 13}, 2 * 13),  # the agent's VMSA page, per side
        ({"dirty_log_start_ns_per_gib": per_gib}, 7),
        ({"dirty_log_start_ns_per_gib": per_gib + per_gib // 7 - 1}, 7),  # 7.99... ns: whole ns, rounded down
        ({"dirty_sync_ns_per_gib": per_gib}, 7),  # the initial sync
    ]
    for costs, extra in cases:
        m = _m(_run(trace, strategy, **costs))
        assert m["setup_ns"] - base["setup_ns"] == extra, costs


@pytest.mark.parametrize("strategy", BOTH)
def test_downtime_costs_one_by_one(trace, strategy):
    base = _m(_run(trace, strategy))
    assert base["downtime_ns"] == DOWNTIME
    per_gib = 7 * (1 << 30) // (4 * 4096)
    assert _m(_run(trace, strategy, resume_ns=13))["downtime_ns"] == DOWNTIME + 13
    # The final sync (inside the downtime) walks the bitmap too.
    assert _m(_run(trace, strategy, dirty_sync_ns_per_gib=per_gib))["downtime_ns"] == DOWNTIME + 7
    # device state crosses with the VMSA: 1000 more bytes, 200 ns on the 5 GB/s link.
    assert _m(_run(trace, strategy, device_state_bytes=6000))["downtime_ns"] == DOWNTIME + 200


def test_write_protect_fault_is_the_guests_own_loss(trace):
    # Dirty logging starts at 5000 (after the mirror VMs and agents); of the writes after it, only gfn 1's at
    # 7000 comes while logging is on (gfn 3's at 20000 is after the resume): one fault, 19 ns of the guest's.
    base = _m(_run(trace, "mirror-vm"))
    m = _m(_run(trace, "mirror-vm", dirty_wp_fault_ns=19))
    assert base["guest_lost_ns"] == DOWNTIME
    assert m["guest_lost_ns"] == DOWNTIME + 19
    assert m["downtime_ns"] == DOWNTIME


ROUND_KEYS = ("round", "phase", "sync_ns", "dirty_pages", "start_ns", "end_ns", "pages_sent", "zero_pages",
              "private_pages", "shared_pages", "bytes_sent", "agents", "agent_cpu_ns", "target_cpu_ns",
              "host_cpu_ns", "guest_progress_ns")


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_the_rounds_table_by_hand(trace, engine):
    # The base run: the initial sync at 5000 finds the 4 pages; round 0 sends them 5120..9120 (packaging
    # 4 x 500 ns of agent CPU; the guest runs throughout: 4000 ns of progress); the downtime round (its sync
    # at the pause, 9120) sends gfn 1 and the VMSA with device state (5000 + 5000 + 5000 bytes) until the
    # resume at 12240, the guest paused. A round counts its pages' CPU; the VMSA's packing is in the
    # run's CPU ledger.
    r = run(tiny_scenario(), strategy="mirror-vm", engine=engine, trace_path=trace)
    rows = [tuple(row[k] for k in ROUND_KEYS) for row in r.rounds.to_pylist()]
    assert rows == [(0, "precopy", 5000, 4, 5120, 9120, 4, 0, 4, 0, 20000, 1, 2000, 0, 0, 4000),
                    (1, "downtime", 9120, 1, 9120, 12240, 1, 0, 1, 0, 15000, 1, 500, 0, 0, 0)]
    # The bandwidth-boundary run: round 0 stops after 2 pages (7120), round 1 syncs then and ends at once
    # (max_rounds), the downtime sends the 3 pending pages.
    r = run(tiny_scenario(burst_ns=2000, bandwidth_period_ns=2000, downtime_limit_ns=2000), strategy="mirror-vm",
            engine=engine, trace_path=trace)
    rows = [tuple(row[k] for k in ROUND_KEYS) for row in r.rounds.to_pylist()]
    assert rows == [(0, "precopy", 5000, 4, 5120, 7120, 2, 0, 2, 0, 10000, 1, 1000, 0, 0, 2000),
                    (1, "precopy", 7120, 1, 7220, 7220, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0),
                    (2, "downtime", 7220, 0, 7220, 12340, 3, 0, 3, 0, 25000, 1, 1500, 0, 0, 0)]


@pytest.mark.parametrize("pack, agents", [(1000, 1), (1001, 2)])
def test_precopy_grows_agents_only_when_they_pace_the_burst(trace, pack, agents):
    # A page is 1000 ns on the link. Packaging it in exactly 1000 ns keeps pace: the link paces the burst,
    # no agent is added. 1001 ns: the agents pace it, and the next burst gets ceil(1001 / 1000) = 2.
    r = run(tiny_scenario(costs={"page_pack_ns": pack}, agents_max=4, host_cpus=4), strategy="mirror-vm",
            trace_path=trace)
    assert _m(r)["agents_max"] == agents


def test_all_vcpus_blocked_counts_every_overlap():
    # (tools/mutate survivor) QEMU's overlapped blocktime: the time during which every vCPU is blocked at
    # once. vCPU 0 blocked [0, 10) and [12, 20), vCPU 1 [5, 15): all blocked in [5, 10) and [12, 15): 8 ns.
    from replay.migration.record import _all_blocked_ns

    assert _all_blocked_ns([[(0, 10), (12, 20)], [(5, 15)]]) == 8
    assert _all_blocked_ns([[(0, 10)], [(10, 20)]]) == 0  # one ends exactly when the other starts
    assert _all_blocked_ns([[(0, 10)], []]) == 0
