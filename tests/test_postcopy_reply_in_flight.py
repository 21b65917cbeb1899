"""A fault's reply still on the wire when the push has ended and the link goes down (issue 22, survivors of
tools/mutate over replay/migration/postcopy.py): a link that comes back is re-keyed (the attestation's PSP
and CPU time) and the lost reply crosses again (its request a latency out, the reply a latency back),
then the page is unpacked again; the migration completes when that page is usable.

The run: test_postcopy's tiny guest with 2 vCPUs and 4 pages, attestation PSP 222 ns and CPU 333 ns, and
unpacking 70 ns a page (so that a page's arrival and the moment it is usable differ):
- setup from 800: two agent VMSAs (2 x 1000) to 2800, the handshake (round trip 200 + 222 + 333) to
  3555 = the switchover (v = g = 3555);
- downtime: 2 VMSAs + the device state, 3 x 5000 bytes = 3000 ns on the link, + latency 100, + 2 x 70 ns
  unpacking the VMSAs: the target resumes at v = 6795 (v - g = 3240);
- the push sends gfn 0, 1, 2 (1000 ns each): 7795, 8795, 9795. vCPU 1 touches gfn 3 at g = 5900
  (v = 9140): request lands 9240, packaged 9240 -> 9740, on the wire 9740 -> 10740, in at 10840,
  unpacked by 10910. Its 5000 bytes share the push's clock: the push ends at 9795 + 1000 = 10795;
  gfn 3 is on the target now, so the push has nothing more to send.
"""

from __future__ import annotations

import pytest

from replay.migration import run
from test_postcopy import pc_scenario, pc_trace

ROWS = [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (5900, 1, 3), (20000, 0, 0)]
COSTS = {"attestation_psp_ns": 222, "attestation_cpu_ns": 333, "page_unpack_ns": 70}


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return pc_trace(tmp_path_factory.mktemp("rif") / "t.arrow", rows=ROWS, vcpus=2)


def events(r, *kinds):
    return [(e["t_ns"], e["kind"]) for e in r.events.to_pylist() if e["kind"] in kinds]


def test_without_a_link_failure_the_last_reply_ends_the_migration(trace):
    r = run(pc_scenario(costs=COSTS), strategy="mirror-vm", trace_path=trace)
    assert r.status == "completed", r.summary["status_reason"]
    assert [(f["raised_ns"], f["served_ns"]) for f in r.faults.to_pylist()] == [(9140, 10910)]
    # Complete when gfn 3 is usable (10910, after the push's 10795); the link was needed until the
    # reply's last byte was in (10840) or the push's (10795 + 100): 10895.
    assert r.summary["metrics"]["completion_ns"] == 10910
    assert events(r, "postcopy_data_in") == [(10895, "postcopy_data_in")]


def test_a_reply_lost_in_flight_after_the_push_comes_again_once_the_link_is_re_keyed(trace):
    # Down at 10800 (after the push's end at 10795, before the reply's arrival at 10840) for 500 ns: up at
    # 11300, re-keyed by 11300 + 222 + 333 = 11855. The request goes again (+100), the reply comes back
    # (+100): in at 12055, unpacked (+70): usable at 12125, the migration's completion.
    r = run(pc_scenario(costs=COSTS, faults=[{"at_ns": 10800, "duration_ns": 500}]), strategy="mirror-vm",
            trace_path=trace)
    assert r.status == "completed", r.summary["status_reason"]
    assert events(r, "link_down", "link_up") == [(10800, "link_down"), (11855, "link_up")]
    assert r.summary["metrics"]["completion_ns"] == 11855 + 2 * 100 + 70
    assert r.summary["metrics"]["postcopy"]["switchover_to_complete_ns"] == 12125 - 3555


def test_a_reply_lost_for_good_after_the_push_fails_the_migration(trace):
    # Down for good at 10800: gfn 3's reply (in at 10840) is lost; the target lacks no other page.
    r = run(pc_scenario(costs=COSTS, faults=[{"at_ns": 10800, "duration_ns": -1}]), strategy="mirror-vm",
            trace_path=trace)
    assert r.status == "failed"
    assert r.summary["metrics"]["postcopy"]["source_only_pages"] == 1
    # Down at 10840, the very moment the reply's last byte is in: delivered, the migration completes.
    r = run(pc_scenario(costs=COSTS, faults=[{"at_ns": 10840, "duration_ns": -1}]), strategy="mirror-vm",
            trace_path=trace)
    assert r.status == "completed", r.summary["status_reason"]
    assert r.summary["metrics"]["completion_ns"] == 10910


def test_a_reply_landing_the_moment_the_link_dies_for_good_is_not_lost(tmp_path):
    # test_postcopy's tiny run (3 vCPUs, resumed at 7100): the push has sent gfn 0 (in at 8200); vCPU 1's
    # reply for gfn 3 lands at 9300; the push's gfn 1 could not end by the deadline (9300 - 100). Dead for
    # good at 9300: gfn 3's last byte arrives at that very moment and counts as delivered: gfns 1 and 2
    # exist only on the source. Dead at 9299: gfn 3's reply is lost too.
    trace = pc_trace(tmp_path / "pc.arrow")
    for at, source_only in ((9300, 2), (9299, 3)):
        r = run(pc_scenario(faults=[{"at_ns": at, "duration_ns": -1}]), strategy="mirror-vm", trace_path=trace)
        assert r.status == "failed"
        assert r.summary["metrics"]["postcopy"]["source_only_pages"] == source_only, at
