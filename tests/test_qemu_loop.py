"""Pre-copy against an independent model of QEMU's loop and the documented costs.

``model`` below is this test's own statement of docs/how-it-works.md "Pre-copy": a send bitmap walked
cyclically in bursts, the pending estimate, a sync only when the estimate falls below the threshold, the
threshold from the bandwidth measured per period, switchover at pending <= threshold, on_max_rounds; each
page costs the slowest of its link time and its agents' CPU at their capacity; the guest's writes land
before any page whose slot starts after them. It shares no code with replay.migration: every sync time,
dirty count, switchover, downtime and byte count of the driver must equal the model's, on both engines,
for several links, limits, agent capacities (including agents slower than the link) and both CPU-sharing
policies; and the window, the guest's lost time, its slowdown and the CPU each owner paid.
"""

from __future__ import annotations

import pytest

from replay.engines.common import ENGINE_KINDS
from replay.migration import run
from replay.scenario.spec import make_scenario
from test_precopy import COSTS, write_trace

NS = 1_000_000_000
PAGE = 4096
HDR = 64


def ceil_div(a, b):
    return -(-a // b)


def model(rows, npages, vcpus, *, start, latency, bw, pack, cap, charge, burst, period, limit, max_rounds,
          sync_ns, avail=0, device=5000, vmsa=4096):
    """QEMU's pre-copy + stop-and-copy for private pages, mirror VM or shadow vCPUs with zero setup costs.
    ``cap`` = (num, den) CPUs of the agents while the guest runs, ``charge``: the agents use the guest's CPU."""
    versions = [0] * npages
    dirty: set[int] = set()
    rows = sorted(rows)
    ri = 0

    def run_to(g):
        nonlocal ri
        while ri < len(rows) and rows[ri][0] < g:
            gfn = rows[ri][2]
            versions[gfn] += 1
            dirty.add(gfn)
            ri += 1

    run_to(start)
    dirty.clear()
    v = g = start  # every setup cost is 0 but the initial sync's and the handshake's round trip
    syncs = [(v, npages)]  # setup's initial sync (ram_init_bitmaps): every page in the bitmap
    bitmap = set(range(npages))
    v += sync_ns + 2 * latency
    g += sync_ns + 2 * latency
    run_to(g)
    rounds, cursor = 1, 0
    bw_meas = 0
    thr = 0  # until the first period has passed, even with avail-switchover-bandwidth
    since, mbytes = v, 0
    sent = []
    while True:
        pending = len(bitmap) * PAGE
        synced = False
        if pending < thr:
            syncs.append((v, len(dirty)))
            bitmap |= dirty
            dirty.clear()
            v += sync_ns
            g += sync_ns
            run_to(g)
            rounds += 1
            pending = len(bitmap) * PAGE
            synced = True
        if pending <= thr:
            reason = "converged"
            break
        if synced and rounds >= max_rounds:
            reason = "max_rounds"
            break
        v0, g0, until, nb, nc = v, g, v + burst, 0, 0
        while bitmap and v < until:
            run_to(g)
            while cursor not in bitmap:
                cursor = (cursor + 1) % npages
            gfn = cursor
            nb += HDR + (PAGE if versions[gfn] else 0)
            nc += pack
            el = max(ceil_div(nb * NS, bw), ceil_div(nc * cap[1], cap[0]))
            v = v0 + el
            g = max(g, g0 + el - (nc // vcpus if charge else 0))
            sent.append((gfn, versions[gfn]))
            bitmap.discard(gfn)
            cursor = (gfn + 1) % npages
        run_to(g)
        mbytes += nb
        if v - since >= period:
            bw_meas = avail or mbytes * NS // (v - since)
            thr = bw_meas * limit // NS
            since, mbytes = v, 0
    switch, g_switch = v, g  # the guest is paused from here to the resume
    expected = pending * NS // (bw_meas or bw)
    # stop-and-copy: final sync (paused), the rest, VMSAs + device state, latency, token, resume (0)
    syncs.append((v, len(dirty)))
    rounds += 1  # QEMU's dirty-sync-count counts the completion's sync
    bitmap |= dirty
    v += sync_ns
    paused_cap = (min(cap[0] // cap[1] if cap[1] == 1 else vcpus, vcpus), 1) if charge else cap
    nb = nc = 0
    v0 = v
    down_pages = len(bitmap)
    for gfn in sorted(bitmap, key=lambda x: (x - cursor) % npages):
        nb += HDR + (PAGE if versions[gfn] else 0)
        nc += pack
        v = v0 + max(ceil_div(nb * NS, bw), ceil_div(nc * paused_cap[1], paused_cap[0]))
    down_bytes = nb + vcpus * (vmsa + HDR) + device
    v += max(ceil_div((vcpus * (vmsa + HDR) + device) * NS, bw), ceil_div(vcpus * pack * paused_cap[1], paused_cap[0]))
    v += 2 * latency
    return {
        "syncs": syncs, "reason": reason, "switchover_ns": switch, "downtime_ns": v - switch, "rounds": rounds,
        "precopy_pages": len(sent), "downtime_pages": down_pages, "downtime_bytes": down_bytes,
        "expected_downtime_ns": expected, "completion_ns": v, "guest_g_at_switch": g_switch,
        "precopy_bytes": sum(HDR + (PAGE if ver else 0) for _, ver in sent),
    }


def scenario(strategy, *, bw, limit, pack, burst, period, max_rounds=30, sharing="fair", agents=1, avail=0,
             latency=10, sync_ns=100, host_cpus=64, demand="trace"):
    costs = {**COSTS, "page_pack_ns": pack, "page_header_bytes": HDR, "dirty_sync_ns": sync_ns,
             "mirror_vm_create_ns": 0, "ap_create_ns": 0, "vmgexit_ns": 0, "cpu_sharing": sharing}
    m = {"start_ns": 1000, "bandwidth_bytes_per_s": bw, "latency_ns": latency, "downtime_limit_ns": limit,
         "max_rounds": max_rounds, "agents_initial": agents, "agents_max": agents, "shadow_apic_id_base": 8,
         "shadow_apic_ids": 8, "burst_ns": burst, "bandwidth_period_ns": period, "host_cpus": host_cpus,
         "avail_switchover_bandwidth_bytes_per_s": avail}
    return make_scenario(guest={"os_vmpl": 0, "memslots": 1, "cpu_demand": demand}, trace={"file": "unused.arrow"},
                         migration=m, costs=costs)


def workload(npages):
    """Fill, then a hot page rewritten every 700 ns and a sweep over the rest every 9000 ns."""
    rows = [(i, 0, i) for i in range(npages)]
    rows += [(2000 + 700 * k, 0, 3) for k in range(200)]
    rows += [(2500 + 9000 * k, 1, 5 + k % (npages - 5)) for k in range(30)]
    return sorted(rows)


CASES = [
    # (strategy, bw, limit, pack, burst, period, max_rounds, sharing, agents, avail)
    ("mirror-vm", 5_000_000_000, 3_000, 500, 4_000, 3_000, 30, "fair", 1, 0),
    ("mirror-vm", 5_000_000_000, 1_000, 500, 2_500, 10_000, 30, "fair", 1, 0),
    ("mirror-vm", 2_000_000_000, 9_000, 500, 50_000, 5_000, 30, "fair", 1, 0),
    ("mirror-vm", 5_000_000_000, 4_000, 3_000, 6_000, 3_000, 30, "fair", 1, 0),  # agents slower than the link
    ("mirror-vm", 5_000_000_000, 1, 500, 4_000, 1, 4, "fair", 1, 0),  # never converges: max_rounds
    ("shadow-vcpu", 5_000_000_000, 3_000, 1_500, 4_000, 3_000, 30, "fair", 2, 0),
    ("shadow-vcpu", 5_000_000_000, 3_000, 1_500, 4_000, 3_000, 30, "agents-first", 2, 0),
    ("mirror-vm", 5_000_000_000, 2_000, 500, 4_000, 100_000, 30, "fair", 1, 4_096_000_000),  # fixed bandwidth
]


@pytest.mark.parametrize("engine", ENGINE_KINDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-bw{c[1]}-lim{c[2]}-pack{c[3]}-{c[7]}" for c in CASES])
def test_driver_matches_the_model(tmp_path, engine, case):
    strategy, bw, limit, pack, burst, period, max_rounds, sharing, agents, avail = case
    npages, vcpus = 16, 2
    rows = workload(npages)
    trace = write_trace(tmp_path / "t.arrow", [(t, v, gfn) for t, v, gfn in rows], npages=npages, vcpus=vcpus)
    s = scenario(strategy, bw=bw, limit=limit, pack=pack, burst=burst, period=period, max_rounds=max_rounds,
                 sharing=sharing, agents=agents, avail=avail)
    r = run(s, strategy=strategy, engine=engine, trace_path=trace)
    shadow = strategy == "shadow-vcpu"
    if shadow:
        cap = (agents * vcpus, vcpus + agents) if sharing == "fair" else (min(agents, vcpus), 1)
    else:
        cap = (agents, 1)
    want = model(rows, npages, vcpus, start=1000, latency=10, bw=bw, pack=pack, cap=cap, charge=shadow, burst=burst,
                 period=period, limit=limit, max_rounds=max_rounds, sync_ns=100, avail=avail)
    m = r.summary["metrics"]
    syncs = [(e["t_ns"], int(e["detail"].split("=")[1])) for e in r.events.to_pylist() if e["kind"] == "dirty_sync"]
    rounds = r.rounds.to_pylist()
    assert [(x["sync_ns"], x["dirty_pages"]) for x in rounds] == want["syncs"]
    assert syncs == want["syncs"]
    assert m["switchover_reason"] == want["reason"]
    assert m["rounds"] == want["rounds"]
    assert m["switchover_ns"] == want["switchover_ns"]
    assert m["downtime_ns"] == want["downtime_ns"]
    assert m["expected_downtime_ns"] == want["expected_downtime_ns"]
    assert (m["precopy_pages"], m["precopy_bytes"]) == (want["precopy_pages"], want["precopy_bytes"])
    assert (m["downtime_pages"], m["downtime_bytes"]) == (want["downtime_pages"], want["downtime_bytes"])
    # What the comparison rests on: the window, the guest's lost time (each vCPU loses the window less the
    # guest clock's advance; paused from the switchover on), the slowdown, and who paid the CPU (the agents
    # ``pack`` per page and per VMSA, the host each sync, the guest the rest of its vCPUs' time).
    window = want["completion_ns"] - 1000
    lost = vcpus * (window - (want["guest_g_at_switch"] - 1000))
    assert (m["completion_ns"], m["total_ns"]) == (want["completion_ns"], window)
    assert (m["guest_lost_ns"], m["guest_slowdown_ppm"]) == (lost, lost * 1_000_000 // (vcpus * window))
    agents_cpu = pack * (want["precopy_pages"] + want["downtime_pages"] + vcpus)
    assert m["cpu_ns"] == {"guest": vcpus * window - lost, "host": 100 * len(want["syncs"]),
                           "primary_vm_agents": agents_cpu if shadow else 0, "mirror_vm": 0 if shadow else agents_cpu}
    assert r.status == "completed" and all(r.summary["invariants"].values())


def test_estimate_equal_to_threshold_completes_without_a_sync(tmp_path):
    # Fixed switchover bandwidth 4.096 GB/s x 1000 ns = a threshold of exactly one page (from the end of the
    # first bandwidth period: here the first burst). The bitmap drains
    # to one page: the estimate (4096) is not below the threshold, so QEMU does not sync, yet 4096 <= 4096
    # completes. No write after the fill: the final sync finds nothing.
    rows = [(i, 0, i) for i in range(8)]
    trace = write_trace(tmp_path / "t.arrow", rows, npages=8, vcpus=1)
    s = scenario("mirror-vm", bw=4_096_000_000, limit=1000, pack=0, burst=1_000 * 7 + 1, period=1_000,
                 avail=4_096_000_000)
    # one burst = 7 pages (1016 ns each at 4.096 GB/s: 4160 bytes = 1015.6.. -> cumulative ceilings)
    r = run(s, strategy="mirror-vm", trace_path=trace)
    m = r.summary["metrics"]
    want = model(rows, 8, 1, start=1000, latency=10, bw=4_096_000_000, pack=0, cap=(1, 1), charge=False,
                 burst=7001, period=1_000, limit=1000, max_rounds=30, sync_ns=100, avail=4_096_000_000)
    assert want["rounds"] == 2 and want["downtime_pages"] == 1  # the model agrees: no sync before the switch
    assert m["rounds"] == 2 and m["switchover_reason"] == "converged" and m["downtime_pages"] == 1
    assert m["switchover_ns"] == want["switchover_ns"]


def test_sharing_policies_trade_speed_for_exposure(tmp_path):
    # A guest busy throughout (the migration starts after the trace's last event: "busy" keeps it so).
    # 2 vCPUs, 2 shadow agents, 8 private pages of 3000 ns packaging on a fast link. fair: the agents get
    # 2*2/(2+2) = 1 CPU: 8 pages take 24000 ns and the guest advances 24000 - 24000/2 = 12000. agents-first:
    # 2 CPUs: 12000 ns, and 12000 - 24000/2 = 0: no progress at all. Either way the guest loses 24000 ns
    # of CPU (2 vCPUs x (elapsed - progress)).
    rows = [(i, 0, i) for i in range(8)]
    trace = write_trace(tmp_path / "t.arrow", rows, npages=8, vcpus=2)
    out = {}
    for sharing in ("fair", "agents-first"):
        s = scenario("shadow-vcpu", bw=10**15, limit=10**9, pack=3000, burst=10**9, period=10**9, sharing=sharing,
                     agents=2, sync_ns=0, latency=0, demand="busy")
        r = run(s, strategy="shadow-vcpu", trace_path=trace)
        out[sharing] = r.rounds.to_pylist()[0]
    assert (out["fair"]["end_ns"] - out["fair"]["start_ns"], out["fair"]["guest_progress_ns"]) == (24000, 12000)
    assert (out["agents-first"]["end_ns"] - out["agents-first"]["start_ns"],
            out["agents-first"]["guest_progress_ns"]) == (12000, 0)


def test_avail_switchover_bandwidth_waits_for_the_first_period(tmp_path):
    # A huge avail-switchover-bandwidth would make the threshold cover the whole guest at once; QEMU only
    # applies it when its first bandwidth period has passed. With a period longer than the whole pre-copy,
    # the threshold stays 0: the bitmap drains in bursts first, and the downtime carries only what the
    # guest dirtied meanwhile, not the 16 pages the guest has.
    npages = 16
    rows = workload(npages)
    trace = write_trace(tmp_path / "t.arrow", rows, npages=npages, vcpus=2)
    s = scenario("mirror-vm", bw=5_000_000_000, limit=3000, pack=500, burst=4000, period=10**12, avail=10**15)
    m = run(s, strategy="mirror-vm", trace_path=trace).summary["metrics"]
    want = model(rows, npages, 2, start=1000, latency=10, bw=5_000_000_000, pack=500, cap=(1, 1), charge=False,
                 burst=4000, period=10**12, limit=3000, max_rounds=30, sync_ns=100, avail=10**15)
    assert m["precopy_pages"] == want["precopy_pages"] >= npages
    assert m["downtime_pages"] == want["downtime_pages"] < npages
