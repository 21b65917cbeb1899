"""One post-copy fault through ``FaultPath`` (replay/migration/faultpath.py) by hand, on a stand-in run
with round numbers: every stage's time, the reply's moments and the CPU each side pays, for a private page
and a shared zero page; the agents' busy time defaulting to none; which vCPUs count as blocked at a moment
(a blocked interval is [start, end): the end is free again, a vCPU never waits behind itself, and none is
blocked before any fault); and the exponential jitter as the documented draw -ln(U), U = (top 53 bits + 1)
/ 2^53 in (0, 1], whose exact value matters once the mean is large."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from replay.migration.faultpath import JITTER_STREAM, FaultPath, Served

COSTS = SimpleNamespace(
    postcopy_fault_exit_ns=10, postcopy_request_bytes=64, zero_page_ns=3, vmgexit_ns=7, mirror_npf_ns=1000,
    host_page_ns=40, page_header_bytes=100, install_gmem_write_ns=1000, install_uffd_copy_ns=0,
    install_uffd_continue_ns=0, rmpupdate_ns=50, fault_lock_ns=17, fault_lock_per_waiter_ns=5,
    uffd_handler_ns=0, uffd_handler_per_waiter_sq_ns=0)


def path(vcpus=2, jitter="none", jitter_ns=0, seed=1):
    m = SimpleNamespace(latency_jitter=jitter, latency_jitter_ns=jitter_ns, postcopy_preempt=False,
                        page_install="gmem-write", fault_delivery="kvm-exit")
    run = SimpleNamespace(
        s=SimpleNamespace(costs=COSTS, migration=m, seed=seed), agents=1, vcpus=vcpus,
        link=SimpleNamespace(latency_ns=100, wire_ns=lambda n: n),  # 1 byte per ns
        strategy=SimpleNamespace(agents_on_host_cpus=False), eng=None,
        page_ns=(500, 0), target_page_ns=333,
        cpu=SimpleNamespace(agent_capacity=lambda agents, side, guest_side, g: (1, 1)))  # an agent: a full CPU
    return FaultPath(run)


def test_a_private_page_fault_stage_by_stage():
    # Raised at 0: exit 10; latency 100 + the 64-byte request 64 -> 174. Packaging 500 + VMGEXIT 7 = 507 on
    # the source agent -> 681. The reply, header 100 + page 4096 = 4196 bytes, on the link 681 -> 4877;
    # latency 100 -> 4977 (arrives). Unpacking 333 -> 5310. Install 1000 + RMPUPDATE 50 + lock 17 + 5 x 1
    # waiter (itself) = 1072 -> 6382.
    sv = path().serve(0, 5, 0, private=True, zero=False, queued_ahead_bytes=0, g=0)
    assert sv == Served(done_ns=6382, reply_bytes=64 + 4196, pack_ns=507, unpack_ns=333, host_ns=1072,
                        arrive_ns=4977, sent_ns=681)


def test_agents_busy_adds_exactly_its_wait_on_each_side():
    # The source agent's 2 ns wait moves everything after it by 2; the target agent's 3 ns only the unpacking.
    sv = path().serve(0, 5, 0, private=True, zero=False, queued_ahead_bytes=0, g=0, agents_busy_ns=(2, 0))
    assert (sv.sent_ns, sv.arrive_ns, sv.done_ns) == (683, 4979, 6384)
    sv = path().serve(0, 5, 0, private=True, zero=False, queued_ahead_bytes=0, g=0, agents_busy_ns=(0, 3))
    assert (sv.sent_ns, sv.arrive_ns, sv.done_ns) == (681, 4977, 6385)


def test_a_shared_zero_page_fault_pays_no_agent():
    # 174 as above; the source host's thread 40 -> 214; the reply is the 100-byte header: 214 -> 314, + 100
    # latency -> 414; no unpacking; install 1000 + lock 17 + 5 x 1 (no RMPUPDATE) = 1022 -> 1436.
    sv = path().serve(1, 9, 0, private=False, zero=True, queued_ahead_bytes=0, g=0)
    assert sv == Served(done_ns=1436, reply_bytes=64 + 100, pack_ns=0, unpack_ns=0, host_ns=40 + 1022,
                        arrive_ns=414, sent_ns=214)


def test_blocked_vcpus_are_counted_on_start_to_end_excluding_the_end():
    fp = path(vcpus=3)
    assert [fp.waiters(v, 0) for v in range(3)] == [1, 1, 1]  # nobody is blocked before any fault
    fp.block(0, 100, 200)
    assert [fp.waiters(1, t) for t in (99, 100, 199, 200)] == [1, 2, 2, 1]
    assert fp.waiters(0, 150) == 1  # its own interval does not count
    fp.block(2, 150, 300)
    assert [fp.waiters(1, t) for t in (149, 150, 199, 200, 299, 300)] == [2, 3, 3, 2, 2, 1]


def test_exponential_jitter_is_the_documented_draw():
    # A mean of 2^53 ns makes the draw's exact U visible: with U' = U +- 1/2^53 (one step of the 53 bits),
    # -ln differs by about 2^53 x 1/(2^53 U) = 1/U >= 1 ns, so an off-by-one U changes the ns.
    j = 1 << 53
    fp = path(jitter="exponential", jitter_ns=j, seed=7)
    bits = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, JITTER_STREAM]))).bit_generator
    want = []
    for _ in range(8):
        u = int(bits.random_raw())
        want.append(int(-j * np.log(((u >> 11) + 1) / float(1 << 53))))  # numpy's log, as the driver
    assert [fp.jitter_ns() for _ in range(8)] == want
    assert all(w >= 0 for w in want)


def test_blocked_intervals_over_before_the_horizon_are_dropped_in_batches():
    # vCPU 0 blocked [10i, 10i + 5) for i = 0..199, the horizon moving to each start as faults are served.
    # Intervals ending at or before the horizon hold nobody (no install comes before it): once more than
    # 64 of them are over they are dropped, so the list stays short however long the run; vCPU 1 counts
    # vCPU 0 as waiting only inside an interval, also after the drops.
    p = path()
    for i in range(200):
        p.prune(10 * i)
        p.block(0, 10 * i, 10 * i + 5)
        assert len(p.busy[0][0]) == len(p.busy[0][1]) <= 66
    assert p.busy[0][0][-1] == 1990 and p.busy[0][0] == sorted(p.busy[0][0])
    assert (p.waiters(1, 1992), p.waiters(1, 1995), p.waiters(1, 1980)) == (2, 1, 2)
