"""The run record's post-copy statistics and its no-negative check, computed by hand from fault intervals
(issue 22's mutation survivors in replay/migration/record.py).

The rules (docs/how-it-works.md, QEMU's query-migrate): a fault's latency is the time its vCPU was
blocked; percentiles are nearest-rank (the ceil(n x p)-th smallest); the histogram has QEMU's buckets
[2^N us, 2^(N+1) us), a latency below 2 us in bucket 0 and one of 2^24 us or more in the last (23);
means are integer (rounded down); the time from the switchover to completion counts only for a completed
post-copy. Every count the record holds is >= 0.

The faults below, per vCPU ((raised, served) in ns, latency in brackets):

- vCPU 0: (10, 2009) [1999: 1 us, bucket 0], (3000, 5000) [2000: 2 us, bucket 1], (6000, 6000) [0: bucket 0]
- vCPU 1: (100, 4099) [3999: 3 us, bucket 1], (5000, 9000) [4000: 4 us, bucket 2]
- vCPU 2: (0, 8388607999) [8388607 us: bucket 22], (8388608000, 25165824005) [16777216005: 16777216 us =
  2^24 us, past the last bucket's top: bucket 23]
- vCPU 3: none.
"""

from __future__ import annotations

import pytest

from replay.core.errors import InvariantError
from replay.migration.postcopy import PostcopyStats
from replay.migration.record import HIST_BUCKETS, Outcome, _no_negative, _postcopy_metrics

BLOCKED = [[(10, 2009), (3000, 5000), (6000, 6000)],
           [(100, 4099), (5000, 9000)],
           [(0, 8388607999), (8388608000, 25165824005)],
           []]
SORTED = [0, 1999, 2000, 3999, 4000, 8388607999, 16777216005]


def _metrics(status="completed", postcopy=True):
    pc = PostcopyStats(requests=9, duplicates=2, bytes=45000, blocked=BLOCKED, source_only_pages=3)
    out = Outcome(status=status, postcopy=pc if postcopy else None)
    out.times.update(switchover_ns=7100, completion_ns=11101)
    return _postcopy_metrics(None, out, pc, [pc.latencies(v) for v in range(len(BLOCKED))])


def test_percentiles_are_nearest_rank():
    m = _metrics()
    # 7 latencies: p50 is the ceil(3.5) = 4th smallest, p99 the ceil(6.93) = 7th.
    assert (m["latency_p50_ns"], m["latency_p99_ns"], m["latency_max_ns"]) == (3999, 16777216005, 16777216005)
    assert sorted(SORTED) == SORTED and m["latency_p50_ns"] == SORTED[3]


def test_latency_histogram_buckets_at_their_edges():
    m = _metrics()
    hist = m["latency_hist"]
    assert len(hist) == HIST_BUCKETS == 24
    counts = [0] * 24
    counts[0], counts[1], counts[2], counts[22], counts[23] = 2, 2, 1, 1, 1
    assert [b["count"] for b in hist] == counts
    assert m["qemu"]["postcopy-latency-dist"] == counts
    assert hist[0] == {"bucket_us_lo": 0, "bucket_us_hi": 2, "count": 2}
    assert hist[1] == {"bucket_us_lo": 2, "bucket_us_hi": 4, "count": 2}
    assert hist[2] == {"bucket_us_lo": 4, "bucket_us_hi": 8, "count": 1}
    assert hist[22] == {"bucket_us_lo": 4194304, "bucket_us_hi": 8388608, "count": 1}
    assert hist[23] == {"bucket_us_lo": 8388608, "bucket_us_hi": 16777216, "count": 1}


def test_means_and_blocktimes_round_down():
    m = _metrics()
    q = m["qemu"]
    assert q["postcopy-latency"] == 25165836002 // 7 == 3595119428
    # per vCPU: 3999 // 3, 7999 // 2 (3999.5), 25165824004 // 2, and 0 for a vCPU that never faulted
    assert q["postcopy-vcpu-latency"] == [1333, 3999, 12582912002, 0]
    per_vcpu = [3999, 7999, 25165824004, 0]
    assert m["blocktime_ns_per_vcpu"] == q["postcopy-vcpu-blocktime"] == per_vcpu
    assert m["blocktime_ns"] == sum(per_vcpu) == 25165836002
    # vCPU 3 was never blocked: never were all four at once
    assert m["blocktime_all_vcpus_ns"] == q["postcopy-blocktime"] == 0
    assert (m["requests"], m["duplicate_requests"], m["bytes"], m["source_only_pages"]) == (9, 2, 45000, 3)


@pytest.mark.parametrize("status, postcopy, want", [("completed", True, 11101 - 7100), ("failed", True, 0),
                                                    ("completed", False, 0)])
def test_switchover_to_complete_only_for_a_completed_postcopy(status, postcopy, want):
    assert _metrics(status, postcopy)["switchover_to_complete_ns"] == want


def test_no_latencies_give_zeros():
    pc = PostcopyStats.empty(2)
    m = _postcopy_metrics(None, Outcome(), pc, [[], []])
    assert (m["latency_p50_ns"], m["latency_p99_ns"], m["latency_max_ns"], m["qemu"]["postcopy-latency"]) == (0, 0, 0, 0)
    assert m["qemu"]["postcopy-vcpu-latency"] == [0, 0]
    assert sum(b["count"] for b in m["latency_hist"]) == 0


def test_a_negative_count_anywhere_in_the_record_is_an_internal_error():
    _no_negative({"a": {"b": [0, 3, True, False]}, "c": 0, "d": "x"}, "metrics")  # nothing negative
    with pytest.raises(InvariantError) as e:
        _no_negative({"a": {"b": [0, 3, -1]}, "c": 5}, "metrics")
    assert str(e.value) == ("run record: metrics.a.b[2] is -1 (negative): the driver's accounting is "
                            "inconsistent")
    with pytest.raises(InvariantError, match=r"^run record: metrics\.c is -7 "):
        _no_negative({"a": [1], "c": -7}, "metrics")


def _pct_metrics(latencies):
    blocked = [[(0, lat) for lat in latencies]]
    pc = PostcopyStats(requests=len(latencies), duplicates=0, bytes=0, blocked=blocked, source_only_pages=0)
    return _postcopy_metrics(None, Outcome(status="completed", postcopy=pc), pc, [pc.latencies(0)])


def test_percentiles_at_exact_ranks():
    # Nearest rank: p50 of 2 latencies is the ceil(2 x 0.5) = 1st smallest (not the 2nd); p99 of 100 is the
    # ceil(100 x 0.99) = 99th (not the 100th).
    m = _pct_metrics([3200, 1200])
    assert (m["latency_p50_ns"], m["latency_p99_ns"]) == (1200, 3200)
    m = _pct_metrics(list(range(1, 101)))
    assert (m["latency_p50_ns"], m["latency_p99_ns"]) == (50, 99)


def test_percentile_rank_is_exact_integer_arithmetic_at_a_million():
    # 1,000,001 latencies 0 .. 1,000,000: p50 is the ceil(500,000.5) = 500,001st smallest, 500,000. Only exact
    # integer arithmetic gets this: 500,000.5 is within a millionth of 500,000.
    m = _pct_metrics(range(1_000_001))
    assert m["latency_p50_ns"] == 500_000
