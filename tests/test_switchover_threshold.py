"""Pre-copy's switchover rule at its exact boundary: pending equal to the threshold, one byte either side
(issue 22's mutation survivors in replay/migration/precopy.py).

The rule (docs/how-it-works.md, QEMU 10.1's migration_iteration_run): each iteration estimates pending =
pages in the bitmap x 4096; only if pending < threshold does it sync the dirty log (a round); it switches
over when pending <= threshold. threshold = bandwidth x downtime_limit // 1 s, the bandwidth being
``avail_switchover_bandwidth`` once the first bandwidth period has ended.

The base is test_costs_exact's bandwidth-boundary run (test_precopy's tiny scenario, mirror-vm, bursts and
bandwidth periods of 2000 ns, downtime limit 2000 ns, max_rounds 2): round 0 starts at 5120 (after the
initial sync at 5000); the first burst sends gfn 0 and gfn 1 (1000 ns each on the link), 5120..7120, and
ends the first period. gfn 1 is rewritten at 7000, after it went: the dirty log holds it. So at 7120
pending is gfn 2 and gfn 3: 8192 bytes. The avail-switchover bandwidth B sets the threshold 2000 x B // 10^9:

- B = 4,096,000,000: threshold 8192 = pending. No sync (8192 < 8192 is false), switch over at once (8192 <=
  8192): converged with 2 rounds (the initial sync and the final one), at 7120.
- B = 4,096,500,000: threshold 8193. It syncs at 7120 (100 ns) and finds gfn 1: pending 12288 > 8193; that
  was sync number 2 = max_rounds: stop-and-copy anyway (reason max_rounds, at 7220; 3 rounds with the final
  sync). Expected downtime 12288 x 10^9 // B = 2999 (2999.63...).
- B = 4,095,999,999: threshold 8191 (8191.999998, rounded down). No sync, no switchover: a second burst sends
  gfn 2 and gfn 3, 7120..9120; then pending 0 < 8191: sync at 9120 (100 ns) finds gfn 1, 4096 <= 8191:
  converged at 9220 after 3 rounds. Expected downtime 4096 x 10^9 // B = 1000 (1000.00000024...).

The downtime: the final sync (100 ns), the pages left at 1000 ns each, the VMSA with device state (2000 ns),
two latencies of 10 ns: 3 pages (gfn 1, 2, 3) in the first two cases, 5120 ns; gfn 1 alone in the third, 3120.
"""

from __future__ import annotations

import pytest

from replay.engines.common import ENGINE_KINDS
from replay.migration import run
from test_costs_exact import trace  # noqa: F401  (fixture)
from test_precopy import tiny_scenario


def _run(trace_path, bw, engine="reference"):
    s = tiny_scenario(burst_ns=2000, bandwidth_period_ns=2000, downtime_limit_ns=2000,
                      avail_switchover_bandwidth_bytes_per_s=bw)
    return run(s, strategy="mirror-vm", engine=engine, trace_path=trace_path)


@pytest.mark.parametrize("engine", ENGINE_KINDS)
@pytest.mark.parametrize("bw, threshold, want", [
    # (reason, switchover_ns, rounds, pending_bytes, expected_downtime_ns, downtime_ns)
    (4_096_000_000, 8192, ("converged", 7120, 2, 8192, 2000, 5120)),
    (4_096_500_000, 8193, ("max_rounds", 7220, 3, 12288, 12288 * 10**9 // 4_096_500_000, 5120)),
    (4_095_999_999, 8191, ("converged", 9220, 3, 4096, 1000, 3120)),
])
def test_pending_equal_to_the_threshold_switches_over_without_a_sync(trace, engine, bw, threshold, want):  # noqa: F811
    m = _run(trace, bw, engine).summary["metrics"]
    pre = m["precopy"]
    assert (pre["threshold_bytes"], pre["bandwidth_bytes_per_s"]) == (threshold, bw)
    got = (m["switchover_reason"], m["switchover_ns"], m["rounds"], pre["pending_bytes"],
           m["expected_downtime_ns"], m["downtime_ns"])
    assert got == want
    assert type(m["expected_downtime_ns"]) is int


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_measured_bandwidth_over_two_periods(trace, engine):  # noqa: F811
    # No avail-switchover bandwidth, downtime limit 500 ns. Each 2000-ns burst carries 2 pages (10000 bytes)
    # and ends a bandwidth period: 10000 x 10^9 // 2000 = 5 GB/s, measured afresh each period (the bytes
    # count starts at 0 again); threshold 5 GB/s x 500 ns = 2500 bytes. At 7120 pending 8192 > 2500: no
    # sync, a second burst (gfn 2, 3) until 9120; pending 0 < 2500: sync at 9120 finds gfn 1, 4096 > 2500,
    # and that was sync 2 = max_rounds: stop-and-copy at 9220 over the limit; expected downtime 4096 x 10^9
    # // 5 GB/s = 819 (819.2). Downtime: sync 100, gfn 1 1000, VMSA 2000, 2 x 10: 3120.
    r = run(tiny_scenario(burst_ns=2000, bandwidth_period_ns=2000), strategy="mirror-vm", engine=engine,
            trace_path=trace)
    m = r.summary["metrics"]
    assert m["precopy"] == {"rounds": 3, "pending_bytes": 4096, "threshold_bytes": 2500,
                            "bandwidth_bytes_per_s": 5_000_000_000, "action": "stop-and-copy"}
    assert all(type(v) is int for k, v in m["precopy"].items() if k != "action")
    assert (m["switchover_reason"], m["switchover_ns"], m["expected_downtime_ns"], m["downtime_ns"]) == (
        "max_rounds", 9220, 819, 3120)
    assert m["downtime_limit_exceeded"] is True
    assert [(e["t_ns"], e["detail"]) for e in r.events.to_pylist() if e["kind"] == "round_end"] == [
        (9120, "round=0 pages=4 bytes=20000"), (9220, "round=1 pages=0 bytes=0")]


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_bandwidth_measured_over_the_first_period(trace, engine):  # noqa: F811
    # test_costs_exact's bandwidth-boundary run (downtime limit 2000 ns): the first period's 10000 bytes in
    # 2000 ns give 5 GB/s, threshold 10000; pending 8192 < 10000 syncs at 7120, finds gfn 1 (12288 > 10000)
    # at max_rounds. Expected downtime 12288 x 10^9 // 5 GB/s = 2457 (2457.6).
    r = run(tiny_scenario(burst_ns=2000, bandwidth_period_ns=2000, downtime_limit_ns=2000), strategy="mirror-vm",
            engine=engine, trace_path=trace)
    m = r.summary["metrics"]
    assert m["precopy"] == {"rounds": 3, "pending_bytes": 12288, "threshold_bytes": 10000,
                            "bandwidth_bytes_per_s": 5_000_000_000, "action": "stop-and-copy"}
    assert (m["switchover_reason"], m["expected_downtime_ns"]) == ("max_rounds", 2457)


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_a_sync_below_max_rounds_goes_on_sending(trace, engine):  # noqa: F811
    # The threshold-8193 run with max_rounds 3: the sync at 7120 (sync 2) leaves 12288 > 8193 pending, below
    # max_rounds: another burst, 7220..9220, sends gfn 2 and gfn 3 (the walk goes on after gfn 1); pending
    # 4096 < 8193 syncs at 9220 (sync 3, nothing new): 4096 <= 8193, converged at 9320 with 4 rounds.
    # Expected downtime 4096 x 10^9 // 4,096,500,000 = 999 (999.88); downtime: sync 100, gfn 1 1000, VMSA
    # 2000, 2 x 10: 3120.
    s = tiny_scenario(burst_ns=2000, bandwidth_period_ns=2000, downtime_limit_ns=2000,
                      avail_switchover_bandwidth_bytes_per_s=4_096_500_000, max_rounds=3)
    m = run(s, strategy="mirror-vm", engine=engine, trace_path=trace).summary["metrics"]
    assert (m["switchover_reason"], m["switchover_ns"], m["rounds"], m["precopy"]["pending_bytes"],
            m["expected_downtime_ns"], m["downtime_ns"]) == ("converged", 9320, 4, 4096, 999, 3120)


def test_no_bandwidth_period_ended_records_the_links_capacity(trace):  # noqa: F811
    # The base run converges at 9120, long before the first 100-ms period: no bandwidth measured, threshold
    # 0; the record names the link's 5 GB/s as the bandwidth, and pending 0 gives an expected downtime of 0.
    m = run(tiny_scenario(), strategy="mirror-vm", trace_path=trace).summary["metrics"]
    assert m["precopy"] == {"rounds": 2, "pending_bytes": 0, "threshold_bytes": 0,
                            "bandwidth_bytes_per_s": 5_000_000_000, "action": "stop-and-copy"}
    assert (m["switchover_reason"], m["expected_downtime_ns"]) == ("converged", 0)


def test_how_precopy_ended_is_immutable():
    import dataclasses

    from replay.migration.precopy import PrecopyEnd

    end = PrecopyEnd("stop-and-copy", "converged", 2, 0, 0, 5_000_000_000, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        end.rounds = 3


def test_max_rounds_counts_only_syncs(trace):  # noqa: F811
    # max_rounds 1 = the initial sync alone: the loop still sends until its estimate asks for a sync; the
    # base run's single burst sends all 4 pages (5120..9120), pending 0 <= threshold 0: converged, never
    # "max_rounds" before a sync of the loop.
    m = run(tiny_scenario(max_rounds=1), strategy="mirror-vm", trace_path=trace).summary["metrics"]
    assert (m["switchover_reason"], m["switchover_ns"], m["rounds"]) == ("converged", 9120, 2)
