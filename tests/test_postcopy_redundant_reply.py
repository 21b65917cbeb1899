"""A fault on a page the push is already sending is served by the push's copy; the fault's own reply is
redundant (never counted as sent) and the migration does not wait for it (issue 22: found while sorting
the survivors of tools/mutate over replay/migration/postcopy.py and clock.py; before the fix a link lost
for good after every page had arrived failed the migration, reporting a page "only on the source", and
the link was recorded as needed until the redundant reply would have arrived).

The run: test_postcopy's costs, 2 vCPUs, 5 private pages written at 0..4:
- switchover at v = g = 3000 (setup 800 + 2 x 1000 agent VMSAs + the handshake's round trip 200); 2 VMSAs
  + the device state = 15000 bytes = 3000 ns, + latency 100: resumed at v = 6100 (v - g = 3100);
- the push sends gfn 0..4 in order, 1000 ns each from 6100: gfn 3 on the wire 9100 -> 10100, gfn 4
  10100 -> 11100; a pushed page is usable when its send ends, its last byte is in a latency later;
- vCPU 1 touches gfn 3 at g 6800 (v 9900), while it is on the wire: the push's copy serves it at 10100;
  vCPU 0 touches gfn 4 at g 6810 (v 9910): the push's copy serves it at 11100 (its own request would
  take at least 1700 ns: 11610).
Complete at 11100; the last page's bytes are in at 11200.
"""

from __future__ import annotations

import pytest

from replay.migration import run
from test_postcopy import pc_scenario, pc_trace

ROWS = [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (4, 0, 4), (6800, 1, 3), (6810, 0, 4), (20000, 0, 0)]
SERVED = [(1, 3, 9900, 10100), (0, 4, 9910, 11100)]


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return pc_trace(tmp_path_factory.mktemp("rr") / "t.arrow", rows=ROWS, npages=5, vcpus=2)


def faults(r):
    return [(f["vcpu"], f["gfn"], f["raised_ns"], f["served_ns"]) for f in r.faults.to_pylist()]


def test_faults_on_pages_in_the_push_are_served_by_its_copies(trace):
    r = run(pc_scenario(), strategy="mirror-vm", trace_path=trace)
    assert r.status == "completed", r.summary["status_reason"]
    assert faults(r) == SERVED
    assert r.summary["metrics"]["completion_ns"] == 11100
    # The link was needed until the push's last byte was in (11100 + 100), not until the redundant replies
    # would have arrived.
    assert [e["t_ns"] for e in r.events.to_pylist() if e["kind"] == "postcopy_data_in"] == [11200]
    # 5 pages, each sent once (by the push): 25000 bytes after the 15000 of the switchover.
    assert r.summary["metrics"]["postcopy_bytes"] == 25000


@pytest.mark.parametrize("down", [11200, 11300])
def test_a_link_lost_for_good_once_every_page_is_in_does_not_fail_the_migration(trace, down):
    # Down for good at 11200 (gfn 4's last byte is in at that very moment) or later: every page is on the
    # target; only the redundant replies were still to come.
    r = run(pc_scenario(faults=[{"at_ns": down, "duration_ns": -1}]), strategy="mirror-vm", trace_path=trace)
    assert r.status == "completed", r.summary["status_reason"]
    assert faults(r) == SERVED and r.summary["metrics"]["completion_ns"] == 11100


def test_a_link_lost_for_good_before_the_last_page_is_in_fails(trace):
    # Down for good at 11199: gfn 4's push copy (in at 11200) is lost; it exists only on the source.
    r = run(pc_scenario(faults=[{"at_ns": 11199, "duration_ns": -1}]), strategy="mirror-vm", trace_path=trace)
    assert r.status == "failed"
    assert r.summary["metrics"]["postcopy"]["source_only_pages"] == 1
