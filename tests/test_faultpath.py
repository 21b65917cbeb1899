"""The post-copy fault path as queues: hand-computed cases (a fault behind a partly drained push queue,
after the push, on a zero page, two vCPUs at once on one shared userfaultfd), the delivery axis's
capability rules, and a property: no fault is served later than its path plus what can be queued ahead."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from replay.core.errors import CapabilityError
from replay.migration import run
from test_postcopy import PC_COSTS, pc_scenario, pc_trace

FILL = [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3)]


def faults(r):
    return [(f["vcpu"], f["gfn"], f["served_ns"] - f["raised_ns"]) for f in r.faults.to_pylist()]


def test_fault_waits_only_for_what_the_push_still_has(tmp_path):
    # The push sends gfn 0, 1, 2 (v 8100, 9100, 10100; g = v - 4100). vCPU 0 faults on gfn 3 at g 5500
    # (v 9600): the window is 20000 bytes but the push has one page left (5000 bytes): the reply waits
    # behind those 1000 ns, not 4000. 100 + 500 (packaging) + 1000 (queued) + 1000 (its page) + 100.
    trace = pc_trace(tmp_path / "t.arrow", rows=FILL + [(5500, 0, 3)], vcpus=1)
    r = run(pc_scenario(costs={"postcopy_queue_bytes": 20000}), strategy="mirror-vm", trace_path=trace)
    assert faults(r) == [(0, 3, 2700)]


def test_fault_without_a_push_pays_its_path_and_nothing_else(tmp_path):
    # No background push: exit 1234 + latency 100 + the 64-byte request 13 (12.8 ns) + packaging 500 +
    # the reply 1000 (5000 bytes) + latency 100 + unpack 333 + PVALIDATE 77 + install 1111 + lock 17 +
    # 5 x 1 blocked vCPU = 4490.
    trace = pc_trace(tmp_path / "t.arrow", rows=FILL + [(3500, 0, 2)], vcpus=1)
    costs = {"postcopy_fault_exit_ns": 1234, "postcopy_request_bytes": 64, "page_unpack_ns": 333,
             "pvalidate_ns": 77, "install_gmem_write_ns": 1111, "fault_lock_ns": 17, "fault_lock_per_waiter_ns": 5}
    r = run(pc_scenario(costs=costs, postcopy_background_push=False), strategy="mirror-vm", trace_path=trace)
    assert faults(r) == [(0, 2, 4490)]
    assert r.summary["metrics"]["postcopy"]["bytes"] == 64 + 5000
    assert r.status == "completed" and all(r.summary["invariants"].values())


def test_zero_page_fault_is_a_header(tmp_path):
    # gfn 3 was never written: its reply is the 904-byte header (181 ns), its packaging the zero check.
    trace = pc_trace(tmp_path / "t.arrow", rows=FILL[:3] + [(3500, 0, 3)], vcpus=1)
    r = run(pc_scenario(costs={"zero_page_ns": 37}, postcopy_background_push=False), strategy="mirror-vm",
            trace_path=trace)
    assert faults(r) == [(0, 3, 100 + 37 + 181 + 100)]
    assert r.summary["metrics"]["postcopy"]["bytes"] == 904


def test_two_vcpus_on_one_shared_userfaultfd(tmp_path):
    # Both fault at g 3500 (v 7600). A: request lands 7700, packaged 8200, on the wire to 9200, lands 9300;
    # the handler takes 1000 + 10 x 1^2 = 1010: 10310 (2710 ns). B: the agent is free at 8200 (8700), the
    # channel at 9200 (10200), lands 10300; the handler is busy until 10310 and A is blocked:
    # 1000 + 10 x 2^2 = 1040: 11350 (3750 ns).
    trace = pc_trace(tmp_path / "t.arrow", rows=FILL + [(3500, 0, 2), (3500, 1, 3)], vcpus=2)
    costs = {"uffd_handler_ns": 1000, "uffd_handler_per_waiter_sq_ns": 10}
    r = run(pc_scenario(costs=costs, fault_delivery="uffd-shared", postcopy_background_push=False),
            strategy="mirror-vm", trace_path=trace)
    assert faults(r) == [(0, 2, 2710), (1, 3, 3750)]


@pytest.mark.parametrize("migration, kernel, message", [
    ({"fault_delivery": "uffd-shared"}, {"uffd_gmem": False}, "needs kernel capability 'uffd_gmem'"),
    ({"page_install": "uffd-copy"}, {"uffd_gmem": False}, "needs kernel capability 'uffd_gmem'"),
    ({}, {"gmem_write": False}, "needs kernel capability 'gmem_write'"),
])
def test_delivery_axis_needs_its_capabilities(tmp_path, migration, kernel, message):
    trace = pc_trace(tmp_path / "t.arrow", rows=FILL, vcpus=1)
    with pytest.raises(CapabilityError, match=message):
        run(pc_scenario(kernel=kernel, **migration), strategy="shadow-vcpu", trace_path=trace)


def test_shared_pages_may_use_userfaultfd_without_gmem_support(tmp_path):
    from test_precopy import write_trace

    trace = write_trace(tmp_path / "t.arrow", FILL + [(3500, 0, 2)], 4, 1, shared=[(0, 3)])
    r = run(pc_scenario(kernel={"uffd_gmem": False, "gmem_write": False}, fault_delivery="uffd-per-vcpu",
                        page_install="uffd-copy"), strategy="shadow-vcpu", trace_path=trace)
    assert r.status == "completed"


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_fault_is_served_later_than_its_path_and_queue(tmp_path, data):
    vcpus = data.draw(st.integers(1, 3))
    npages = 12
    n = data.draw(st.integers(1, 25))
    times = sorted(data.draw(st.lists(st.integers(3000, 30000), min_size=n, max_size=n)))
    rows = [(i, 0, i) for i in range(npages) if i % 5] + [
        (t, data.draw(st.integers(0, vcpus - 1)), data.draw(st.integers(0, npages - 1))) for t in times]
    trace = pc_trace(tmp_path / "p.arrow", rows=rows, npages=npages, vcpus=vcpus)
    costs = {k: data.draw(st.integers(0, 3000)) for k in (
        "postcopy_fault_exit_ns", "page_pack_ns", "zero_page_ns", "page_unpack_ns", "pvalidate_ns", "rmpupdate_ns",
        "install_gmem_write_ns", "install_uffd_copy_ns", "fault_lock_ns", "fault_lock_per_waiter_ns",
        "uffd_handler_ns", "uffd_handler_per_waiter_sq_ns", "host_page_ns", "vmgexit_ns", "mirror_npf_ns")}
    costs["postcopy_queue_bytes"] = data.draw(st.sampled_from([0, 4096, 20000, 1 << 20]))
    costs["postcopy_request_bytes"] = data.draw(st.integers(0, 200))
    m = dict(fault_delivery=data.draw(st.sampled_from(["kvm-exit", "uffd-shared", "uffd-per-vcpu"])),
             page_install=data.draw(st.sampled_from(["gmem-write", "uffd-copy"])),
             postcopy_preempt=data.draw(st.booleans()), postcopy_background_push=data.draw(st.booleans()),
             agents_max=2, shadow_apic_ids=2)
    r = run(pc_scenario(costs=costs, **m), strategy=data.draw(st.sampled_from(["mirror-vm", "shadow-vcpu"])),
            trace_path=trace)
    assert r.status == "completed"
    c = {**PC_COSTS, **costs}
    wire = lambda b: -(-b * 10**9 // 5_000_000_000)  # noqa: E731
    lat, v = 100, vcpus
    install = max(c["install_gmem_write_ns"], c["install_uffd_copy_ns"]) + c["rmpupdate_ns"]
    hold = install + max(c["fault_lock_ns"] + c["fault_lock_per_waiter_ns"] * v,
                         c["uffd_handler_ns"] + c["uffd_handler_per_waiter_sq_ns"] * v * v)
    # An agent runs at its share of its design's CPUs: at worst 1/2 of a CPU here (2 agents on the mirror's 2
    # host CPUs, or beside busy vCPUs under fair sharing: (v + 2) / v).
    slow = max(2, -(-(v + 2) // v))
    stage = slow * (max(c["page_pack_ns"], c["zero_page_ns"]) + c["vmgexit_ns"] + c["mirror_npf_ns"])
    stage = max(stage, c["host_page_ns"])
    unpack = slow * (c["page_unpack_ns"] + c["pvalidate_ns"] + c["mirror_npf_ns"])
    # each vCPU has at most one fault outstanding: at every queue at most vcpus - 1 others are ahead, and a
    # busy push's page on each agent
    bound = (c["postcopy_fault_exit_ns"] + lat + wire(c["postcopy_request_bytes"]) + (v + 2) * stage
             + v * wire(c["postcopy_queue_bytes"] + 4096 + 904) + lat + (v + 2) * unpack + v * hold)
    first: dict[int, dict] = {}
    for f in r.faults.to_pylist():
        assert f["served_ns"] >= f["raised_ns"]
        if f["gfn"] in first:  # in flight already: waits for that arrival, no second request
            assert f["served_ns"] == max(f["raised_ns"], first[f["gfn"]]["served_ns"])
        else:
            first[f["gfn"]] = f
            assert f["served_ns"] - f["raised_ns"] <= bound


# shadow-vcpu: no NPF, but its target agent shares the 1-CPU quota with the busy vCPU: half a CPU, so the
# unpack + PVALIDATE (410 ns) take 820.
@pytest.mark.parametrize("strategy, extra", [("mirror-vm", 5000 + 2 * 2000), ("shadow-vcpu", 5000 + 410)])
def test_a_fault_pays_its_vmgexit_and_the_mirrors_first_touch(tmp_path, strategy, extra):
    # The same fault as test_fault_without_a_push_pays_its_path_and_nothing_else (4490 ns), plus a VMGEXIT
    # (5000: the agent takes the request and hands back one page) and, for the mirror VM, its agents'
    # first-touch NPF on each side (2 x 2000): they have never mapped gfn 2. (Each side's agent creation
    # pays a VMGEXIT too: the switchover comes 10000 ns later, so the row does too.)
    trace = pc_trace(tmp_path / "t.arrow", rows=FILL + [(13500, 0, 2)], vcpus=1)
    costs = {"postcopy_fault_exit_ns": 1234, "postcopy_request_bytes": 64, "page_unpack_ns": 333,
             "pvalidate_ns": 77, "install_gmem_write_ns": 1111, "fault_lock_ns": 17, "fault_lock_per_waiter_ns": 5,
             "vmgexit_ns": 5000, "mirror_npf_ns": 2000}
    r = run(pc_scenario(costs=costs, postcopy_background_push=False), strategy=strategy, trace_path=trace)
    assert faults(r) == [(0, 2, 4490 + extra)]


def test_a_reply_behind_an_agent_bound_push_waits_one_packet_not_the_window(tmp_path):
    # Packaging 5000 ns a page against 1000 ns on the link: the push is agent-bound, so the channel holds at
    # most the packet being sent (5000 bytes: 1000 ns), not the 20000-byte window the link-bound case waits
    # behind. And the request waits for the page the agent is packaging (5000 ns) before its own (5000).
    # gfn 3 at g 5500: 100 (request) + 5000 (the push's page on the agent) + 5000 (its packaging) + 1000
    # (one packet ahead) + 1000 (its page) + 100 = 12200.
    trace = pc_trace(tmp_path / "t.arrow", rows=FILL + [(5500, 0, 3)], vcpus=1)
    r = run(pc_scenario(costs={"postcopy_queue_bytes": 20000, "page_pack_ns": 5000}), strategy="mirror-vm",
            trace_path=trace)
    assert faults(r) == [(0, 3, 12200)]


def test_latency_jitter_is_seeded_and_only_adds(tmp_path):
    # Uniform jitter of up to 10 us on each crossing: every fault's latency is its jitter-free latency plus
    # 0..20 us; the same seed draws the same values, another seed others.
    rows = FILL + [(3500 + 4000 * k, 0, k % 4) for k in range(1, 12)]
    trace = pc_trace(tmp_path / "t.arrow", rows=sorted(rows), vcpus=1)
    base = dict(postcopy_background_push=False)
    plain = faults(run(pc_scenario(**base), strategy="mirror-vm", trace_path=trace))
    jit = dict(base, latency_jitter="uniform", latency_jitter_ns=10_000)
    a = faults(run(pc_scenario(**jit), strategy="mirror-vm", trace_path=trace))
    b = faults(run(pc_scenario(**jit), strategy="mirror-vm", trace_path=trace))
    import dataclasses

    other = dataclasses.replace(pc_scenario(**jit), seed=7)
    c = faults(run(other, strategy="mirror-vm", trace_path=trace))
    assert a == b != c
    assert [f[:2] for f in a] == [f[:2] for f in plain]
    assert all(0 <= x[2] - y[2] <= 20_000 for x, y in zip(a, plain)) and a != plain


def test_shared_page_fault_pays_no_rmpupdate(tmp_path):
    # (The agents' VMSA pages take an RMPUPDATE each at setup: the guest pauses at 4998, so it faults at 6000.)
    # gfn 2 is shared: no agent, no RMPUPDATE. Without a push: exit 0 + latency 100 + the host's copy
    # (host_page_ns 7) + the reply 1000 (5000 bytes) + latency 100 + install 1111 (no RMPUPDATE, however
    # dear) = 2318; the same path on a private page adds packaging 500 and the RMPUPDATE 999.
    from test_precopy import write_trace

    costs = {"install_gmem_write_ns": 1111, "rmpupdate_ns": 999, "host_page_ns": 7}
    shared = write_trace(tmp_path / "s.arrow", FILL + [(6000, 0, 2)], 4, 1, shared=[(2, 2)])
    r = run(pc_scenario(costs=costs, postcopy_background_push=False), strategy="mirror-vm", trace_path=shared)
    assert faults(r) == [(0, 2, 2318)]
    private = pc_trace(tmp_path / "p.arrow", rows=FILL + [(6000, 0, 2)], vcpus=1)
    r = run(pc_scenario(costs=costs, postcopy_background_push=False), strategy="mirror-vm", trace_path=private)
    assert faults(r) == [(0, 2, 100 + 500 + 1000 + 100 + 1111 + 999)]


def test_timeline_books_the_earliest_gap_that_fits():
    from replay.migration.faultpath import Timeline

    t = Timeline(1)
    assert (t.book(0, 10), t.book(20, 10)) == (10, 30)  # busy [0, 10) and [20, 30)
    assert t.book(5, 15) == 45  # [10, 25) would overlap [20, 30): after it
    assert t.book(10, 10) == 20  # [10, 20) fits the gap exactly
    two = Timeline(2)
    assert (two.book(0, 10), two.book(0, 10), two.book(0, 5)) == (10, 10, 15)  # both busy: the first free
