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
