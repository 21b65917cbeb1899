"""Post-copy without the background push (``postcopy_background_push = false``; issue 22, survivors of
tools/mutate over replay/migration/postcopy.py): faults alone bring pages while the guest runs its trace,
a blocked vCPU's row holding back the rows after it; the rest is sent once the guest stands 1 ns past the
last row's effective time (its trace time plus its vCPU's blocked time), and the fault replies' agent work
(packaging and unpacking) is charged to the agents' owner.

The run: test_postcopy's tiny guest with 2 vCPUs and 4 pages (written at 0..3):
- setup from 800: two agent VMSAs (2 x 1000) and the handshake's round trip (200): switchover at v = g =
  3000; 2 VMSAs + the device state, 3 x 5000 bytes = 3000 ns, + latency 100: resumed at v = 6100 (v - g =
  3100 while no vCPU is blocked);
- vCPU 1 touches gfn 3 at g = 3500 (v 6600): request + 100, packaged + 500, on the wire + 1000, in + 100:
  usable at g = 5200 (v 8300), 1700 ns blocked;
- vCPU 0 touches gfn 2 at g = 5000 (v 8100; its row waits behind vCPU 1's, effective at 5200, but the
  fault is raised at its own time): request lands 8200, the agent and the reply channel are free again
  (7200, 8200): packaged 8200 -> 8700, on the wire 8700 -> 9700, in 9800: usable at g = 6700, 1700 ns
  blocked; its row replays at 6700.
"""

from __future__ import annotations

import pytest

from replay.migration import run
from test_postcopy import pc_scenario, pc_trace

ROWS = [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (3500, 1, 3), (5000, 0, 2)]


@pytest.mark.parametrize("rows, last", [(ROWS, 6700), (ROWS + [(5001, 0, 2)], 6701)])
def test_the_rest_goes_once_the_guest_is_past_its_last_row(tmp_path, rows, last):
    # The last row's effective time: gfn 2's row at 5000 + 1700 = 6700, or (a second row 1 ns later on the
    # same vCPU) 5001 + 1700 = 6701. The guest then stands at last + 1; gfn 0 and 1 are still on the source:
    # 2 x 1000 ns from v = last + 1 + 3100. The trace ended before: it ends with the migration.
    trace = pc_trace(tmp_path / "t.arrow", rows=rows, vcpus=2)
    r = run(pc_scenario(postcopy_background_push=False), strategy="mirror-vm", trace_path=trace)
    assert r.status == "completed", r.summary["status_reason"]
    assert [(f["vcpu"], f["gfn"], f["raised_ns"], f["served_ns"]) for f in r.faults.to_pylist()] == [
        (1, 3, 6600, 8300), (0, 2, 8100, 9800)]
    m = r.summary["metrics"]
    done = last + 1 + 3100 + 2 * 1000
    assert (m["completion_ns"], m["trace_end_ns"], m["postcopy_pages"]) == (done, done, 4)


def test_fault_replies_after_the_push_charge_packaging_and_unpacking_to_the_agents(tmp_path):
    # Unpacking 70 ns a page besides packaging 500: the mirror VM's CPU is its two agent VMSAs at setup
    # (2 x 1000), then 570 for each of the 2 VMSAs, the 2 pushed pages and the 2 faulted ones: 2000 + 6 x 570.
    trace = pc_trace(tmp_path / "t.arrow", rows=ROWS, vcpus=2)
    r = run(pc_scenario(costs={"page_unpack_ns": 70}, postcopy_background_push=False), strategy="mirror-vm",
            trace_path=trace)
    assert r.status == "completed", r.summary["status_reason"]
    assert r.summary["metrics"]["postcopy"]["requests"] == 2
    assert r.summary["metrics"]["cpu_ns"]["mirror_vm"] == 2000 + 6 * 570


@pytest.mark.parametrize("down, source_only, requests", [(8299, 4, 0), (8300, 3, 1)])
def test_a_reply_lost_for_good_without_the_push_fails_the_migration(tmp_path, down, source_only, requests):
    # Nobody else watches the link: vCPU 1's reply for gfn 3 (requested at v 6600) lands at 8300. The link
    # down for good at 8299 loses it: no page reached the target, all 4 exist only on the source, the
    # guest stopped at its fault (g 3500 + 1 -> v 6601). Down at 8300, the moment it lands: it is
    # delivered; vCPU 0's reply for gfn 2 (requested at 8100, in at 9800) is lost then: 3 pages remain.
    trace = pc_trace(tmp_path / "t.arrow", rows=ROWS, vcpus=2)
    r = run(pc_scenario(postcopy_background_push=False, faults=[{"at_ns": down, "duration_ns": -1}]),
            strategy="mirror-vm", trace_path=trace)
    assert r.status == "failed"
    pc = r.summary["metrics"]["postcopy"]
    assert (pc["source_only_pages"], pc["requests"]) == (source_only, requests)
    assert [e["t_ns"] for e in r.events.to_pylist() if e["kind"] == "link_down"] == [down]
