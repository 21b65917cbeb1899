"""What the push has on the channel ahead of a fault's reply (issue 22, a survivor of tools/mutate over
replay/migration/postcopy.py): the whole in-flight window while the push still has at least that much to
send; the fault replies that shared the push's clock are not push data (they never shrink what it has
left).

The run: test_postcopy's tiny guest (3 vCPUs, 4 private pages, 1000 ns a page on the link) with a
5000-byte push window; gfn 1 is never written before the switchover (a zero page: its 904-byte header
only, 181 ns on the link, no packaging):
- switchover at v = g = 3000; resumed at v = 7100 (3 VMSAs + the device state, 4000 ns, + latency 100),
  v - g = 4100;
- the push sends gfn 0, 7100 -> 8100. Before gfn 1 the guest runs to g 4000: vCPU 1 touches gfn 1 at 3500
  (v 7600): request lands 7700, nothing to package, the push's 5000-byte window (1000 ns) ahead, on the
  wire 904 bytes = 181 ns: 8881, in at 8981. Its 181 ns go onto the push's clock (8281), and the rows
  after it wait for its effective time (g 4881);
- gfn 2 8281 -> 9281; before gfn 3 (g 5181) vCPU 0's row at 4200 touches gfn 3 (v 8300): request lands
  8400, packaged 8400 -> 8900; the push still has gfn 3's 5000 bytes to send: its whole window is ahead
  (1000 ns, 9900); the reply channel is free: on the wire 9900 -> 10900, in at 11000.
Complete at 11000 (the push's clock ends at 9281 + gfn 3's reply, 10281; gfn 3 came by fault).
"""

from __future__ import annotations

from replay.migration import run
from test_postcopy import pc_scenario, pc_trace


def test_a_replys_queue_is_the_whole_window_while_the_push_has_that_much_left(tmp_path):
    rows = [(0, 0, 0), (2, 0, 2), (3, 0, 3), (3500, 1, 1), (4200, 0, 3), (20000, 2, 0)]
    trace = pc_trace(tmp_path / "t.arrow", rows=rows)
    r = run(pc_scenario(costs={"postcopy_queue_bytes": 5000}), strategy="mirror-vm", trace_path=trace)
    assert r.status == "completed", r.summary["status_reason"]
    assert [(f["vcpu"], f["gfn"], f["raised_ns"], f["served_ns"]) for f in r.faults.to_pylist()] == [
        (1, 1, 7600, 7700 + 1000 + 181 + 100), (0, 3, 8300, 8900 + 1000 + 1000 + 100)]
    m = r.summary["metrics"]
    assert m["completion_ns"] == 11000
    # Bytes after the switchover: gfn 0, 2 and 3 (5000 each) and gfn 1's header.
    assert m["postcopy_bytes"] == 3 * 5000 + 904
