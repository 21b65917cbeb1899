"""Faults raised while the link is down during the push (issue 22, survivors of tools/mutate over
replay/migration/postcopy.py): their replies wait for the link and then cross with the restarted push,
counted once in the bytes sent and the agents' CPU; a fault raised after the link is back is not held
for it (it starts at its own time).

test_postcopy's outage run (``test_faults_raised_during_an_outage_of_the_push_wait_for_the_link_not_for
_the_push``): the tiny guest (3 vCPUs, 4 private pages, 5000 bytes = 1000 ns a page on the link, 500 ns
packaging), a 5000-byte push queue, the link down at v 7500 for 1000 ns (re-keying free): up at 8500.
vCPU 1's fault (gfn 3, v 7600) is served 10200, vCPU 0's (gfn 2, v 7700) 11700, vCPU 2 waits for that.
"""

from __future__ import annotations

from replay.migration import run
from test_postcopy import ROWS, pc_scenario, pc_trace

OUTAGE = dict(costs={"postcopy_queue_bytes": 5000}, faults=[{"at_ns": 7500, "duration_ns": 1000}])


def test_a_reply_held_during_the_outage_crosses_once_with_the_restarted_push(tmp_path):
    r = run(pc_scenario(**OUTAGE), strategy="mirror-vm", trace_path=pc_trace(tmp_path / "t.arrow"))
    assert r.status == "completed", r.summary["status_reason"]
    m = r.summary["metrics"]
    # The push's gfn 0 could not end before the link died (7100 -> 8100 > 7400): nothing crossed before
    # 8500. From 8500 the link carries 4 x 5000 bytes one after another: vCPU 1's held reply, the push's
    # gfn 0, vCPU 0's reply, the push's gfn 1: complete at 8500 + 4 x 1000.
    assert m["completion_ns"] == 12500
    # 3 VMSAs + the device state (20000 bytes) at the switchover, then the 4 pages, none twice.
    assert (m["downtime_bytes"], m["postcopy_bytes"], m["bytes_sent"]) == (20000, 20000, 40000)
    # The mirror VM's CPU: 2 x 1000 for the agent VMSAs at setup, 500 packaging for each of the 3 VMSAs
    # and the 4 pages (the held reply's packaging counted once, no more).
    assert m["cpu_ns"]["mirror_vm"] == 2000 + 7 * 500


def test_a_fault_after_the_link_is_back_starts_at_its_own_time(tmp_path):
    # Six pages (gfn 4 and 5 written at 4 and 5 too) and one more row: vCPU 1 touches gfn 5 at trace 5000.
    # vCPU 1 was blocked 7600 -> 10200 (2600 ns), so the row is effective at 7600: v 7600 + 4100 = 11700,
    # long after the link came back (8500); gfn 5 is the push's last page, not sent yet. Request lands 11800;
    # packaged 11800 -> 12300 (the agent idle since 9600); the push is link-bound (500 ns of packaging
    # against 1000 on the link), so its 5000-byte window is on the channel ahead of the reply: + 1000; the
    # reply channel is free (vCPU 0's reply left it at 11600): on the wire 13300 -> 14300, in at 14400.
    rows = sorted(ROWS + [(4, 0, 4), (5, 0, 5), (5000, 1, 5)])
    r = run(pc_scenario(**OUTAGE), strategy="mirror-vm", trace_path=pc_trace(tmp_path / "t.arrow", rows=rows, npages=6))
    assert r.status == "completed", r.summary["status_reason"]
    assert [(f["vcpu"], f["gfn"], f["raised_ns"], f["served_ns"]) for f in r.faults.to_pylist()] == [
        (1, 3, 7600, 10200), (0, 2, 7700, 11700), (2, 2, 7720, 11700), (1, 5, 11700, 14400)]


def test_the_push_has_no_more_to_send_than_the_pages_no_fault_brought(tmp_path):
    # A bigger push queue (8000 bytes), the link down at v 8500 for 100 ns. vCPU 1 faults on gfn 2 at g 4450
    # (v 8550, in the outage): held until 8600, served at g 10300. vCPU 0 faults on gfn 3 at g 6000
    # (v 10100): by then the push sent gfn 0 and 1 and the fault brought gfn 2, so the push has gfn 3 left,
    # 5000 bytes (not 20000 - 10000 = 10000: the push skips a page a fault brought). The request lands
    # 10200, packaged 10200 -> 10700; ahead of the reply min(8000, 5000) bytes = 1000 ns, then its own 1000
    # ns on the wire and 100 latency: served at 12800 (with 8000 bytes ahead it would be 13400).
    rows = [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (4450, 1, 2), (6000, 0, 3), (20000, 2, 0)]
    sc = pc_scenario(costs={"postcopy_queue_bytes": 8000}, faults=[{"at_ns": 8500, "duration_ns": 100}])
    r = run(sc, strategy="mirror-vm", trace_path=pc_trace(tmp_path / "t.arrow", rows=rows))
    assert r.status == "completed", r.summary["status_reason"]
    assert [(f["vcpu"], f["gfn"], f["raised_ns"], f["served_ns"]) for f in r.faults.to_pylist()] == [
        (1, 2, 8550, 10300), (0, 3, 10100, 12800)]
    assert r.summary["metrics"]["completion_ns"] == 12800
