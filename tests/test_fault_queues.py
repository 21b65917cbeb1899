"""The post-copy fault path's queues and its latency jitter at their edges (replay/migration/faultpath.py;
survivors of tools/mutate): a booking that fits a gap only if every interval after it is looked at, a
zero-length booking on a busy server, pruning that forgets only what is over, and the jitter drawn from
its own documented stream, derived here from the scenario's seed by the test's own generator."""

from __future__ import annotations

import numpy as np
import pytest

from replay.migration import run
from replay.migration.faultpath import Timeline
from test_faultpath import FILL, faults
from test_postcopy import pc_scenario, pc_trace


def test_a_booking_checks_every_interval_it_would_overlap():
    # Busy [0, 10), [11, 12), [13, 20). Two ns from 10: [10, 12) hits [11, 12), so from 12; [12, 14) hits
    # [13, 20), so from 20: it ends at 22 (a walk that skipped [13, 20) would end at 14, inside it).
    t = Timeline(1)
    assert [t.book(0, 10), t.book(11, 1), t.book(13, 7)] == [10, 12, 20]
    assert t.book(10, 2) == 22


def test_a_zero_length_booking_on_a_busy_server_waits_for_it():
    # A zero-cost stage (a zero page's check with no cost, say) behind a busy server still waits for it:
    # at the very start of a busy interval and inside it alike, it ends where the interval ends.
    t = Timeline(1)
    assert t.book(0, 10) == 10
    assert (t.book(0, 0), t.book(5, 0), t.book(10, 0)) == (10, 10, 10)



def test_prune_forgets_only_intervals_over_before_it():
    # prune(before) promises that no booking starts earlier than ``before``: it may forget what ends at or
    # before it, never an interval still busy then. Busy [0, 10) and [12, 20):
    t = Timeline(1)
    assert (t.book(0, 10), t.book(12, 8)) == (10, 20)
    t.prune(5)  # [0, 10) is still busy at 5: one ns from 5 waits for it
    assert t.book(5, 1) == 11
    t = Timeline(1)
    assert (t.book(0, 10), t.book(12, 8)) == (10, 20)
    t.prune(15)  # [0, 10) is over, [12, 20) busy at 15: one ns from 15 waits for it
    assert t.book(15, 1) == 21
    assert t.busy == [[(12, 20), (20, 21)]]

# The plain path of test_faultpath's fault without a push: latency 100 + packaging 500 + the reply 1000 +
# latency 100.
PLAIN = 1700
JITTER_NS = 10_000
STREAM = 0x6A17  # the jitter's stream beside the scenario's seed (docs: "one stream"; fixed, so records stay)


def _draws(seed: int, n: int) -> list[int]:
    bits = np.random.PCG64(np.random.SeedSequence([seed, STREAM]))
    return [int(bits.random_raw()) for _ in range(n)]


@pytest.mark.parametrize("kind", ["uniform", "exponential"])
def test_jitter_is_drawn_from_its_own_stream_per_crossing(tmp_path, kind):
    # One fault, no push: two crossings (the request, the reply), each drawing one 64-bit value. Uniform:
    # the value modulo 10001; exponential: -10000 x ln(U), U = (the value's top 53 bits + 1) / 2^53,
    # truncated to whole ns.
    trace = pc_trace(tmp_path / "t.arrow", rows=FILL + [(3500, 0, 2)], vcpus=1)
    s = pc_scenario(postcopy_background_push=False, latency_jitter=kind, latency_jitter_ns=JITTER_NS)
    u = _draws(s.seed, 2)
    if kind == "uniform":
        extra = [x % (JITTER_NS + 1) for x in u]
    else:
        extra = [int(-JITTER_NS * np.log(((x >> 11) + 1) / float(1 << 53))) for x in u]
    r = run(s, strategy="mirror-vm", trace_path=trace)
    assert faults(r) == [(0, 2, PLAIN + sum(extra))]


def test_no_jitter_kind_means_no_jitter_whatever_its_size(tmp_path):
    # latency_jitter = "none" with a latency_jitter_ns set: the size is ignored, every crossing takes the
    # plain latency.
    trace = pc_trace(tmp_path / "t.arrow", rows=FILL + [(3500, 0, 2)], vcpus=1)
    s = pc_scenario(postcopy_background_push=False, latency_jitter="none", latency_jitter_ns=JITTER_NS)
    assert faults(run(s, strategy="mirror-vm", trace_path=trace)) == [(0, 2, PLAIN)]


def test_a_hybrid_reply_waits_for_what_the_push_still_has_not_for_what_precopy_sent(tmp_path):
    # test_postcopy's hybrid run with gfn 2 rewritten too (7060, after it was sent at 5100..6100): the target
    # lacks gfn 1 and 2 at the resume (v 11400, g 7200: the clocks 4200 apart), 10000 bytes of push. The
    # push sends gfn 1 (11400..12400); vCPU 0 faults on gfn 2 at g 7300 (v 11500), with 5000 bytes of the
    # push left (the 20000 sent in pre-copy are not the push's): behind those, 1000 ns. Request in at 11600,
    # packaged until 12100, 1000 queued, its own page until 14100, in at 14200: 2700 ns.
    rows = [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (7050, 1, 1), (7060, 1, 2), (7300, 0, 2), (20000, 2, 0)]
    trace = pc_trace(tmp_path / "t.arrow", rows=rows)
    s = pc_scenario(costs={"postcopy_queue_bytes": 20000}, mode="hybrid", precopy_rounds=1, downtime_limit_ns=1,
                    bandwidth_period_ns=1)
    r = run(s, strategy="mirror-vm", trace_path=trace)
    assert r.status == "completed"
    assert faults(r) == [(0, 2, 2700)]


def test_the_push_left_ahead_of_a_reply_counts_every_byte(tmp_path):
    # test_faultpath's fault behind a partly drained push, on a 1 GB/s link (a byte is a ns). Paused at
    # 3000, one VMSA + device state (10000 bytes) and a latency: resumed at v 13100, g 3000. The push sends
    # gfn 0 (to 18100, g 8000) and gfn 1 (to 23100); vCPU 0 faults on gfn 3 at g 9000 (v 19100) with 10000
    # of the push's 20000 bytes left (window 20000): request in at 19200, packaged until 19700, 10000 ns
    # behind the push, its page until 34700, in at 34800: 15700 ns.
    trace = pc_trace(tmp_path / "t.arrow", rows=FILL + [(9000, 0, 3)], vcpus=1)
    s = pc_scenario(costs={"postcopy_queue_bytes": 20000}, bandwidth_bytes_per_s=1_000_000_000)
    assert faults(run(s, strategy="mirror-vm", trace_path=trace)) == [(0, 3, 15700)]


def test_an_install_counts_a_vcpu_blocked_by_an_earlier_fault_than_its_latest(tmp_path):
    # Two vCPUs, no background push, packaging 2000 ns, 10 ns of install lock per blocked vCPU; gfn 1
    # shared. vCPU 0 faults on gfn 3 at g 3500 (v 7600) and is blocked until 10810, then on gfn 2 (raised
    # 10910, served 14120): both are served before vCPU 1's fault on gfn 1, raised earlier (g 3700, v 7800)
    # but later in the trace. Its request lands 7900; a shared page goes from the source host without an
    # agent: on the wire 7900 -> 8900 (5000 bytes), in at 9000. vCPU 0 is blocked then (by its first
    # fault, not its latest): 2 vCPUs wait on the install lock, 2 x 10 ns: served at 9020 (not 9010).
    from test_precopy import write_trace
    rows = [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (3500, 0, 3), (3600, 0, 2), (3700, 1, 1), (20000, 0, 0)]
    sc = pc_scenario(costs={"page_pack_ns": 2000, "fault_lock_per_waiter_ns": 10}, postcopy_background_push=False)
    r = run(sc, strategy="mirror-vm", trace_path=write_trace(tmp_path / "t.arrow", rows, 4, 2, shared=[(1, 1)]))
    assert r.status == "completed", r.summary["status_reason"]
    got = [(f["vcpu"], f["gfn"], f["raised_ns"], f["served_ns"]) for f in r.faults.to_pylist()]
    assert got[:3] == [(0, 3, 7600, 10810), (0, 2, 10910, 14120), (1, 1, 7800, 9020)]
