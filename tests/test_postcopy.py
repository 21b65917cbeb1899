"""Post-copy and hybrid: a hand-computed tiny run (faults, blocktime, duplicates), per-vCPU blocking,
capability errors, link failures with and without recovery, and the invariants, on both engines.

The tiny guest: 4 private pages, 3 vCPUs, OS at VMPL0. Every page is 5000 bytes on the wire (4096 +
904-byte header) on a 5 GB/s link (1000 ns); packaging a private page costs 500 ns; one-way latency
100 ns. A fault path is: exit 0 + latency 100 + request 0 + wire 1000 + latency 100 + packaging 500 = 1700 ns
(unpack, RMPUPDATE, PVALIDATE cost 0 here).
"""

import pytest
from hypothesis import given, settings, strategies as st

from replay.cli import main
from replay.engines.common import ENGINE_KINDS
from replay.migration import run
from replay.scenario.spec import make_scenario

from test_precopy import COSTS, write_trace

ROWS = [  # (t_ns, vcpu, gfn)
    (0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3),
    (3500, 1, 3),   # vCPU 1 faults on gfn 3
    (3600, 0, 2),   # vCPU 0 faults on gfn 2
    (3620, 2, 2),   # vCPU 2 wants gfn 2 while it is in flight: waits, no second request
    (20000, 0, 0),
]
# Both designs' setup is 2 x 1000 ns: the agent's VMSA on each side (ap_create_ns; no mirror VM cost).
PC_COSTS = {**COSTS, "mirror_vm_create_ns": 0, "postcopy_fault_exit_ns": 0, "postcopy_request_bytes": 0, "postcopy_queue_bytes": 0,
            "fault_lock_ns": 0, "fault_lock_per_waiter_ns": 0, "install_gmem_write_ns": 0}


def pc_trace(path, rows=ROWS, npages=4, vcpus=3):
    return write_trace(path, rows, npages, vcpus)


def pc_scenario(costs=None, faults=(), kernel=None, **migration):
    # Setup is 2000 ns of agent VMSAs plus the handshake's round trip (2 x latency): from 800 the guest
    # reaches v = g = 3000 at the switchover.
    m = {"mode": "postcopy", "start_ns": 800, "bandwidth_bytes_per_s": 5_000_000_000, "latency_ns": 100,
         "downtime_limit_ns": 10_000, "agents_initial": 1, "agents_max": 1, "shadow_apic_id_base": 8,
         "shadow_apic_ids": 1}
    m.update(migration)
    return make_scenario(guest={"os_vmpl": 0}, trace={"file": "x"}, migration=m, costs={**PC_COSTS, **(costs or {})},
                         kernel=kernel or {}, fault=list(faults))


@pytest.fixture
def trace(tmp_path):
    return pc_trace(tmp_path / "pc.arrow")


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_postcopy_by_hand(trace, engine):
    r = run(pc_scenario(), strategy="mirror-vm", engine=engine, trace_path=trace)
    m, pc = r.summary["metrics"], r.summary["metrics"]["postcopy"]
    assert r.status == "completed", r.summary["status_reason"]
    # Setup 2000 + 200 (v = g = 3000); switchover at once: 3 VMSAs + device state = 20000 bytes = 4000 ns, latency
    # 100: downtime 4100, the target resumes at v = 7100 with the guest at g = 3000.
    assert (m["switchover_ns"], m["downtime_ns"]) == (3000, 4100)
    # Push: gfn 0 (v 8100, g 4000; the clocks are 4100 apart). vCPU 1 faults on gfn 3 at g 3500 (v 7600):
    # request 7600 + 100 latency; the agent packages it 7700 -> 8200; the reply is on the wire 8200 -> 9200
    # (5000 bytes), lands at 9300: served at g 5200 (1700 ns). Its bytes share the push's link (v 9100).
    # The push sends gfn 1 (v 10100, g 6000). vCPU 0 faults on gfn 2 at g 3600 (v 7700): request lands
    # 7800, the agent is busy until 8200 (vCPU 1's page): packaged 8200 -> 8700; the reply channel is busy
    # until 9200: on the wire 9200 -> 10200, lands 10300: served at g 6200 (2600 ns: it queued behind
    # vCPU 1's fault twice). vCPU 2 touches gfn 2 at 3620 while it is in flight: waits for that arrival
    # (2580 ns), no second request. gfn 2 and 3 are present: the push skips them. Complete at v = 11100.
    assert pc["requests"] == 2 and pc["duplicate_requests"] == 1
    assert pc["blocktime_ns_per_vcpu"] == [2600, 1700, 2580]
    assert pc["blocktime_ns"] == 6880
    assert pc["blocktime_all_vcpus_ns"] == 5200 - 3620  # every vCPU blocked at once
    assert (pc["latency_p50_ns"], pc["latency_p99_ns"], pc["latency_max_ns"]) == (2580, 2600, 2600)
    assert pc["latency_hist"][0] == {"bucket_us_lo": 0, "bucket_us_hi": 2, "count": 1}
    assert pc["latency_hist"][1] == {"bucket_us_lo": 2, "bucket_us_hi": 4, "count": 2}
    assert sum(b["count"] for b in pc["latency_hist"]) == 3
    q = pc["qemu"]
    assert q["postcopy-blocktime"] == 1580 and q["postcopy-vcpu-blocktime"] == [2600, 1700, 2580]
    assert q["postcopy-latency"] == (1700 + 2600 + 2580) // 3
    assert q["postcopy-vcpu-latency"] == [2600, 1700, 2580]
    assert q["postcopy-latency-dist"][:3] == [1, 2, 0]
    assert pc["bytes"] == 10000
    assert pc["switchover_to_complete_ns"] == 11100 - 3000
    assert m["completion_ns"] == 11100 and m["total_ns"] == 11100 - 800
    assert (m["postcopy_pages"], m["postcopy_bytes"]) == (4, 20000)
    assert m["trace_end_ns"] == 11100 + (20000 + 2600 - 7000)
    faults = r.faults.to_pylist()
    assert [(f["vcpu"], f["gfn"], f["raised_ns"], f["served_ns"], f["event_index"]) for f in faults] == [
        (1, 3, 3500 + 4100, 5200 + 4100, 4), (0, 2, 3600 + 4100, 6200 + 4100, 5), (2, 2, 3620 + 4100, 6200 + 4100, 6)]
    d = r.summary["digests"]
    assert d["end_of_trace"] == d["no_migration"] and d["target_at_switchover"] == d["source_at_switchover"]
    assert all(r.summary["invariants"].values())


def test_a_blocked_vcpu_does_not_stop_the_others(tmp_path):
    # vCPU 1 faults at 3500 on gfn 3 and is blocked 1700 ns; vCPU 0 keeps writing gfn 0 (pushed first) at
    # 4000..4400 and is never blocked.
    rows = [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (3500, 1, 3)] + [(4000 + 100 * i, 0, 0) for i in range(5)]
    trace = pc_trace(tmp_path / "t.arrow", rows=rows, vcpus=2)
    r = run(pc_scenario(), strategy="mirror-vm", trace_path=trace)
    pc = r.summary["metrics"]["postcopy"]
    assert pc["blocktime_ns_per_vcpu"] == [0, 1700]
    assert pc["blocktime_all_vcpus_ns"] == 0
    assert all(r.summary["invariants"].values())


def test_preempt_channel_skips_the_push_queue(trace):
    slow = run(pc_scenario(costs={"postcopy_queue_bytes": 5000}), strategy="mirror-vm", trace_path=trace)
    fast = run(pc_scenario(costs={"postcopy_queue_bytes": 5000}, postcopy_preempt=True), strategy="mirror-vm",
               trace_path=trace)
    # vCPU 1's fault (the first): without preempt its reply waits behind the push's 5000 queued bytes
    # (1000 ns at 5 GB/s); with preempt it has a channel of its own.
    first = [r.faults.to_pylist()[0] for r in (slow, fast)]
    assert [f["served_ns"] - f["raised_ns"] for f in first] == [1700 + 1000, 1700]


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_hybrid_sends_a_round_then_faults_only_on_stale_pages(tmp_path, engine):
    # Setup ends at v = g = 3000; the initial sync takes 100. The pass sends gfn 0..3 (1000 ns each, to
    # 7100); the write to gfn 1 at 7050 lands after gfn 1 was sent. The bitmap is empty: estimate 0 < the
    # threshold (5 GB/s measured x 1 ns = 5 bytes): sync (7100..7200) finds {1}; 4096 > 5 and the second
    # sync reaches precopy_rounds + 1: switch to post-copy at 7200. The final sync discards the target's
    # stale gfn 1. The target resumes at v = 11400 (sync 100, VMSAs + device 4000, latency 100) with the
    # guest at g = 7200; the push sends gfn 1 (usable from g = 8200); vCPU 0 wants it at 7250: it faults and
    # is served by the push's copy at 8200, 950 ns later.
    rows = [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (7050, 1, 1), (7250, 0, 1), (20000, 2, 0)]
    trace = pc_trace(tmp_path / "t.arrow", rows=rows)
    s = pc_scenario(mode="hybrid", precopy_rounds=1, downtime_limit_ns=1, bandwidth_period_ns=1)
    r = run(s, strategy="mirror-vm", engine=engine, trace_path=trace)
    m, pc = r.summary["metrics"], r.summary["metrics"]["postcopy"]
    assert r.status == "completed"
    # rounds is QEMU's dirty-sync-count: the initial sync, the one pre-copy round's, and the discard sync
    assert m["rounds"] == 3 and m["precopy_pages"] == 4 and m["switchover_ns"] == 7200
    assert m["switchover_reason"] == "postcopy"
    assert pc["requests"] == 1 and pc["latency_max_ns"] == 950
    assert [(f["vcpu"], f["gfn"]) for f in r.faults.to_pylist()] == [(0, 1)]
    assert m["postcopy_pages"] == 1
    assert all(r.summary["invariants"].values())


def test_prepaging_pushes_pages_after_the_fault_first(tmp_path):
    # 64 pages; vCPU 0 faults on gfn 40; with prepaging gfn 41.. are pushed next (usable from g = 6000,
    # 7000, ...), so its later accesses to 41 and 42 do not fault; in gfn order they would come much later.
    rows = [(i, 0, i) for i in range(64)] + [(3500, 0, 40), (8000, 0, 41), (9000, 0, 42)]
    trace = pc_trace(tmp_path / "t.arrow", rows=rows, npages=64, vcpus=1)
    plain = run(pc_scenario(), strategy="mirror-vm", trace_path=trace).summary["metrics"]["postcopy"]
    pre = run(pc_scenario(prepaging=True, prepage_pages=8), strategy="mirror-vm", trace_path=trace).summary["metrics"]["postcopy"]
    assert plain["requests"] == 3
    assert pre["requests"] == 1


@pytest.mark.parametrize(
    "strategy, caps, message",
    [
        ("mirror-vm", {"kvm_userfault": False}, "post-copy needs kernel capability 'kvm_userfault'"),
        ("shadow-vcpu", {"kvm_userfault": False}, "post-copy needs kernel capability 'kvm_userfault'"),
        ("mirror-vm", {"gmem_link_userfault": False}, "needs kernel capability 'gmem_link_userfault'"),
        ("mirror-vm", {"gmem_link": False}, "needs kernel capability 'gmem_link'"),
    ],
)
def test_capability_errors(tmp_path, capsys, strategy, caps, message):
    pc_trace(tmp_path / "t.arrow")
    scen = tmp_path / "s.toml"
    scen.write_text('[trace]\nfile = "t.arrow"\n[migration]\nmode = "postcopy"\nstart_ns = 1000\n')
    args = ["run", str(scen), "--out", str(tmp_path / "o"), "--strategy", strategy, "--no-progress"]
    for k, v in caps.items():
        args += ["--set", f"kernel.{k}={str(v).lower()}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_shadow_postcopy_needs_no_link_capabilities(trace):
    s = pc_scenario(kernel={"gmem_link": False, "gmem_link_userfault": False, "gmem_dirty_log": False})
    assert run(s, strategy="shadow-vcpu", trace_path=trace).status == "completed"


def test_link_lost_for_good_during_postcopy_fails_truthfully(trace):
    r = run(pc_scenario(faults=[{"at_ns": 9000, "duration_ns": -1}]), strategy="mirror-vm", trace_path=trace)
    pc = r.summary["metrics"]["postcopy"]
    assert r.status == "failed"
    assert "exist only on the source" in r.summary["status_reason"]
    # gfn 0 was pushed before the link went; gfn 3's reply (its last byte in at 9300) was still on the wire
    # at 9000: lost with the link, like gfns 1 and 2 the push had not sent.
    assert pc["source_only_pages"] == 3
    assert r.summary["digests"]["end_of_trace"] == ""
    assert r.summary["invariants"]["end_of_trace_equals_no_migration"] is False


def test_link_recovers_during_postcopy(trace):
    r = run(pc_scenario(faults=[{"at_ns": 9000, "duration_ns": 1000}]), strategy="mirror-vm", trace_path=trace)
    assert r.status == "completed"
    kinds = [e["kind"] for e in r.events.to_pylist()]
    assert kinds.count("link_down") == 1 and kinds.count("link_up") == 1
    ok = run(pc_scenario(), strategy="mirror-vm", trace_path=trace).summary["metrics"]
    assert r.summary["metrics"]["completion_ns"] > ok["completion_ns"]
    assert all(r.summary["invariants"].values())


def test_link_lost_during_postcopy_downtime_aborts(trace):
    # The link fails while VMSAs cross (3000..7000): the target never ran, so the source resumes.
    r = run(pc_scenario(faults=[{"at_ns": 5000, "duration_ns": -1}]), strategy="shadow-vcpu", trace_path=trace)
    assert r.status == "aborted"
    d = r.summary["digests"]
    assert d["end_of_trace"] == d["no_migration"]


@pytest.mark.parametrize("strategy", ["mirror-vm", "shadow-vcpu"])
@pytest.mark.parametrize("mode", ["postcopy", "hybrid"])
def test_engines_agree_on_postcopy(tmp_path, strategy, mode):
    rows = [(i, i % 3, i % 32) for i in range(32)] + [(3000 + 37 * i, i % 3, (i * 7) % 32) for i in range(200)]
    trace = pc_trace(tmp_path / "t.arrow", rows=rows, npages=32)
    s = pc_scenario(mode=mode, precopy_rounds=1, prepaging=(strategy == "shadow-vcpu"), prepage_pages=3,
                    downtime_limit_ns=1, bandwidth_period_ns=1)  # hybrid must not converge in pre-copy
    a = run(s, strategy=strategy, engine="cython", trace_path=trace)
    b = run(s, strategy=strategy, engine="reference", trace_path=trace)
    a.summary["tool"]["engine"] = b.summary["tool"]["engine"] = ""
    assert a.summary == b.summary
    assert a.faults.equals(b.faults) and a.rounds.equals(b.rounds) and a.events.equals(b.events)
    assert a.summary["metrics"]["postcopy_pages"] > 0
    if mode == "postcopy":
        assert a.summary["metrics"]["postcopy"]["requests"] > 0
    assert all(a.summary["invariants"].values())


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.data())
def test_no_fault_is_served_after_completion_and_no_metric_is_negative(tmp_path_factory, data):
    # Random post-copy and hybrid runs, slow and fast links, agents slower or faster than the link, push or
    # not, preempt or not, small and large in-flight windows, jitter: every fault's page is usable by the
    # migration's completion, and the record holds no negative number (build() raises InvariantError).
    tmp_path = tmp_path_factory.mktemp("pc")
    vcpus = data.draw(st.integers(1, 3))
    npages = data.draw(st.integers(4, 24))
    rows = [(i, 0, i) for i in range(npages) if data.draw(st.booleans())]
    times = sorted(data.draw(st.lists(st.integers(3000, 200_000), min_size=1, max_size=30)))
    rows += [(t, data.draw(st.integers(0, vcpus - 1)), data.draw(st.integers(0, npages - 1))) for t in times]
    trace = pc_trace(tmp_path / "p.arrow", rows=sorted(rows), npages=npages, vcpus=vcpus)
    costs = {"page_pack_ns": data.draw(st.sampled_from([0, 2000, 50_000])),
             "postcopy_queue_bytes": data.draw(st.sampled_from([0, 4096, 1 << 22])),
             "vmgexit_ns": data.draw(st.sampled_from([0, 5000])), "mirror_npf_ns": data.draw(st.sampled_from([0, 2000]))}
    m = dict(mode=data.draw(st.sampled_from(["postcopy", "hybrid"])),
             bandwidth_bytes_per_s=data.draw(st.sampled_from([20_000_000, 5_000_000_000])),
             postcopy_preempt=data.draw(st.booleans()), postcopy_background_push=data.draw(st.booleans()),
             latency_jitter=data.draw(st.sampled_from(["none", "uniform", "exponential"])),
             latency_jitter_ns=data.draw(st.sampled_from([0, 1000, 100_000])), agents_max=2, shadow_apic_ids=2,
             host_cpus=data.draw(st.integers(1, 2)))
    strategy = data.draw(st.sampled_from(["mirror-vm", "shadow-vcpu"]))
    r = run(pc_scenario(costs=costs, **m), strategy=strategy, trace_path=trace)
    assert r.status == "completed"
    done = r.summary["metrics"]["completion_ns"]
    for f in r.faults.to_pylist():
        assert f["raised_ns"] <= f["served_ns"] <= done
    assert r.summary["metrics"]["cpu_ns"]["guest"] >= 0



def test_faults_raised_during_an_outage_of_the_push_wait_for_the_link_not_for_the_push(trace):
    # The link fails at v 7500 (the push is sending gfn 0, 7100 -> 8100) for 1000 ns: up at 8500 (the
    # re-keying costs 0 here), with a 5000-byte push queue. vCPU 1's fault (gfn 3, v 7600) is handled while
    # the guest runs through the outage: no push data is queued while the link is down, so its request
    # starts at 8500: lands 8600, packaged 8600 -> 9100, on the wire 9100 -> 10100, in at 10200 (2600 ns).
    # vCPU 0's (gfn 2, v 7700) is handled once the push has restarted at 8500: it waits for the agent
    # (9100 -> 9600), then behind the push's 5000 queued bytes (1000 ns: 10600), on the wire until 11600,
    # in at 11700; vCPU 2 (v 7720) waits for that arrival.
    r = run(pc_scenario(costs={"postcopy_queue_bytes": 5000}, faults=[{"at_ns": 7500, "duration_ns": 1000}]),
            strategy="mirror-vm", trace_path=trace)
    assert r.status == "completed", r.summary["status_reason"]
    got = [(f["vcpu"], f["gfn"], f["raised_ns"], f["served_ns"]) for f in r.faults.to_pylist()]
    assert got == [(1, 3, 7600, 10200), (0, 2, 7700, 11700), (2, 2, 7720, 11700)]
    assert all(r.summary["invariants"].values())


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_a_target_agent_exactly_as_fast_as_the_link_is_not_a_bottleneck(trace, engine):
    # Unpacking costs 1000 ns, the push's page time on the link is 1000 ns too: the target agent keeps
    # pace with the link, so a reply finds it idle. The resume comes 3 x 1000 ns later (the three VMSAs
    # are unpacked first): vCPU 1's fault is raised at v 7600 + 3000; request +100, packaged +500, on the
    # wire +1000, in +100, unpacked +1000: 2700 ns (the push queue is 0 bytes here). One ns more of unpack
    # makes the agent the push's bottleneck: one push packet is on the link ahead of the reply (5000 bytes,
    # 1000 ns) and the reply waits for the page the agent is on (1001 ns): 100 + 500 + 1000 + 1000 + 100 +
    # 1001 + 1001.
    for unpack, latency in ((1000, 2700), (1001, 4702)):
        r = run(pc_scenario(costs={"page_unpack_ns": unpack}), strategy="mirror-vm", engine=engine, trace_path=trace)
        assert r.status == "completed", r.summary["status_reason"]
        f = r.faults.to_pylist()[0]
        assert (f["vcpu"], f["gfn"], f["raised_ns"], f["served_ns"] - f["raised_ns"]) == (1, 3, 7600 + 3 * unpack,
                                                                                          latency), unpack


def test_a_blocked_vcpu_loses_its_blocked_time_of_demand(trace):
    # The by-hand run: every vCPU busy up to the trace's last event (g 20000), so the demand is 1 CPU per
    # vCPU. Window: 800 -> completion 11100 (10300 ns per vCPU demanded). At completion the guest is at
    # g 11100 - 4100 = 7000; a vCPU ran from 800 up to 7000 less its blocked time: vCPU 0 (2600) 3600,
    # vCPU 1 (1700) 4500, vCPU 2 (2580) 3620; lost: 6700, 5800, 6680 of 10300 each.
    r = run(pc_scenario(), strategy="mirror-vm", trace_path=trace)
    m = r.summary["metrics"]
    assert m["cpu_demand"]["demanded_ns"] == 3 * 10300
    assert m["cpu_demand"]["ran_ns"] == 3600 + 4500 + 3620
    assert m["guest_lost_ns"] == 6700 + 5800 + 6680
    assert m["guest_slowdown_ppm_per_vcpu"] == [x * 1_000_000 // 10300 for x in (6700, 5800, 6680)]
    assert m["guest_slowdown_ppm"] == (6700 + 5800 + 6680) * 1_000_000 // (3 * 10300)
