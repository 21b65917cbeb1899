"""The push's window ahead of a fault's reply after the push has stopped for an outage and restarted
(issue 22, survivors of tools/mutate over replay/migration/postcopy.py): what the push still has to send
counts what it sent before the outage as sent, and a fault reply that shared its clock before the outage
is not push data.

test_postcopy's tiny guest (3 vCPUs, 4 pages, 5000 bytes = 1000 ns a page on the link, packaging 500 ns;
the push link-bound, so its whole window is ahead of a reply, up to what it has left): switchover at
v = g = 3000, resumed at v = 7100 with v - g = 4100; the guest runs through an outage, so v - g stays 4100.
The push sends the pages the target lacks in gfn order; before each page the guest replays up to the
push's clock, and a blocked vCPU's row holds back the rows after it.
"""

from __future__ import annotations

from replay.migration import run
from test_postcopy import pc_scenario, pc_trace


def served(tmp_path, rows, queue, at, duration=100):
    r = run(pc_scenario(costs={"postcopy_queue_bytes": queue}, faults=[{"at_ns": at, "duration_ns": duration}]),
            strategy="mirror-vm", trace_path=pc_trace(tmp_path / "t.arrow", rows=rows))
    assert r.status == "completed", r.summary["status_reason"]
    return [(f["vcpu"], f["gfn"], f["raised_ns"], f["served_ns"]) for f in r.faults.to_pylist()], r


def test_push_data_sent_before_the_outage_counts_as_sent(tmp_path):
    # No fault before the outage. gfn 0 7100 -> 8100; the link dies at 8500 for 100 ns: gfn 1 (8100 -> 9100)
    # cannot arrive before it (deadline 8400); up at 8600 (re-keying free). gfn 1 8600 -> 9600, gfn 2 ->
    # 10600; before gfn 3 (g 6500) vCPU 0's row at 6000 (v 10100) touches gfn 3: request lands 10200,
    # packaged 10200 -> 10700. The push has only gfn 3 left (5000 bytes; gfn 0 sent before the outage, 1 and
    # 2 after): 5000 of the 8000-byte window are ahead, 1000 ns: 11700; on the wire to 12700, in at 12800.
    rows = [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (6000, 0, 3), (20000, 2, 0)]
    got, _ = served(tmp_path, rows, 8000, 8500)
    assert got == [(0, 3, 10100, 12800)]


def test_a_zero_page_reply_before_the_outage_is_not_push_data(tmp_path):
    # gfn 1 never written: a zero page (904 bytes, 181 ns; no packaging). gfn 0 7100 -> 8100; before gfn 1
    # vCPU 1 touches it at 3500 (v 7600): request 7700, the 5000-byte window ahead (1000 ns), on the wire
    # 8700 -> 8881, in at 8981 (the rows after it wait for g 4881); its 181 ns go onto the push's clock
    # (8281). gfn 2 8281 -> 9281 cannot arrive before the link dies at 9000 (for 100 ns): up at 9100, gfn 2
    # 9100 -> 10100. Before gfn 3 (g 6000) vCPU 0's row at 5500 (v 9600) touches gfn 3: request 9700,
    # packaged 9700 -> 10200; the push has gfn 3 left (5000 bytes): the whole 5000-byte window ahead,
    # 11200; on the wire to 12200, in at 12300.
    rows = [(0, 0, 0), (2, 0, 2), (3, 0, 3), (3500, 1, 1), (5500, 0, 3), (20000, 2, 0)]
    got, _ = served(tmp_path, rows, 5000, 9000)
    assert got == [(1, 1, 7600, 8981), (0, 3, 9600, 12300)]

