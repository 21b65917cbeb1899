"""Pre-paging's window (issue 22, survivors of tools/mutate over replay/migration/postcopy.py): after a
fault on gfn F the push sends gfn F+1 .. F+prepage_pages next (clipped to the guest), then resumes its
walk in gfn order; a row touching a window page exactly when its copy becomes usable does not fault, one
ns earlier it waits for that copy.

The run: test_postcopy's costs, 1 vCPU, 16 pages written at 0..15, ``prepage_pages = 2``:
- switchover at v = g = 3000 (setup 800 + 2 x 1000 agent VMSAs + the handshake's round trip 200); 1 VMSA
  + the device state = 10000 bytes = 2000 ns, + latency 100: resumed at v = 5100, v - g = 2100;
- the push: gfn 0, 5100 -> 6100 (a pushed page is usable when its send ends);
- the vCPU touches gfn 8 at g = 3500 (v 5600): request + 100, packaged + 500, on the wire + 1000, in + 100:
  usable at v 7300 (g 5200), so its later rows come 1700 ns late; the reply's 5000 bytes share the push's
  link: the push's clock goes to 7100;
- the window: gfn 9, 7100 -> 8100, and gfn 10, 8100 -> 9100 (usable from g 7000); then the walk goes on
  from gfn 1: gfn 1..7 to 16100, gfn 11 to 17100.
"""

from __future__ import annotations

import pytest

from replay.migration import run
from test_postcopy import pc_scenario, pc_trace


@pytest.mark.parametrize("touch10, faulted", [
    (5300, [(8, 5600, 7300), (11, 10200, 11900)]),
    (5299, [(8, 5600, 7300), (10, 9099, 9100)]),
])
def test_the_pages_right_after_the_fault_come_next_and_no_more(tmp_path, touch10, faulted):
    # gfn 10 at trace 5300: effective 5300 + 1700 = 7000, the moment its copy is usable: no fault; gfn 11
    # at trace 6400 (effective 8100, v 10200) is outside the window, far ahead of the walk: a fault, served
    # by its own path, 1700 ns. At 5299 (v 6999 + 2100 = 9099) gfn 10 waits 1 ns for the push's copy (usable
    # at 9100), and that fault moves the window to gfn 11 and 12: gfn 11 is sent 9100 -> 10100, usable from
    # g 8000, before its row's effective 6400 + 1700 + 1 = 8101: no fault.
    rows = [(i, 0, i) for i in range(16)] + [(3500, 0, 8), (touch10, 0, 10), (6400, 0, 11)]
    trace = pc_trace(tmp_path / "t.arrow", rows=rows, npages=16, vcpus=1)
    r = run(pc_scenario(prepaging=True, prepage_pages=2), strategy="mirror-vm", trace_path=trace)
    assert r.status == "completed", r.summary["status_reason"]
    assert [(f["gfn"], f["raised_ns"], f["served_ns"]) for f in r.faults.to_pylist()] == faulted
    assert r.summary["metrics"]["postcopy"]["requests"] == len(faulted)
