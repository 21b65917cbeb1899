"""A run's bookkeeping from its zero state, on test_precopy's tiny pre-copy run (issue 22's mutation
survivors in replay/migration/context.py and setup.py: the starting values of the tallies, of the event log's
page and vCPU fields and of the VMSA page count, and the steps an agent added on demand takes):

- an event not about one page or one vCPU records -1 for it (the events table's documented "none");
- the summary's zero, private and shared page counts and the mirror VM's first-touch NPFs count from 0;
- a design's VMSA pages (an agent's, on each side) take the gfns right after the guest's pages, the first
  at gfn npages (docs/internals.md), and are retired there at the teardown;
- an agent added on demand takes its design's agent steps on both sides, source first, on the clock.

The base timeline (test_boundaries' docstring): setup 1000..5120, the initial sync at 5000 finds the 4
pages, round 0 sends them 5120..9120 at the link's 1000 ns a page, the downtime resends gfn 1.
"""

from __future__ import annotations

import pytest

from replay.engines import make_engine
from replay.engines.common import RmpEntry
from replay.migration import Migration, run
from test_costs_exact import trace  # noqa: F401  (fixture: test_precopy's 4-page trace)
from test_precopy import tiny_scenario, tiny_trace

NPAGES = 4


def _m(r):
    return r.summary["metrics"]


@pytest.mark.parametrize("strategy", ["mirror-vm", "shadow-vcpu"])
def test_an_event_about_no_page_and_no_vcpu_records_minus_one(trace, strategy):  # noqa: F811
    r = run(tiny_scenario(), strategy=strategy, engine="reference", trace_path=trace)
    rows = r.events.to_pylist()
    # pre-copy logs no per-page or per-vCPU event: setup steps, syncs, rounds, pause, VMSAs, resume, teardown
    assert {e["kind"] for e in rows} >= {"migration_start", "setup_step", "dirty_sync", "round_start", "pause",
                                         "resume", "trace_end"}
    assert {(e["gfn"], e["vcpu"]) for e in rows} == {(-1, -1)}


@pytest.mark.parametrize("strategy, touches", [("mirror-vm", 6), ("shadow-vcpu", 0)])
def test_the_page_tallies_count_from_zero(tmp_path, strategy, touches):
    # gfn 2 shared: round 0 sends gfns 0..3, of them 3 private and gfn 2 shared (gfn 2's last write, 4500,
    # is before the initial sync for mirror-vm); the downtime resends gfn 1 (private, written at 7000).
    # No page is a zero page: every page was written at t = 0..3, before the migration's start at 1000.
    # First touches (mirror-vm only, mirror_npf_ns = 7 > 0): the source agent's of gfns 0, 1, 3 and the
    # target agent's of the same three (gfn 1's second send touches nothing new): 3 + 3 = 6.
    t = tiny_trace(tmp_path / "shared.arrow", shared=[(2, 2)])
    m = _m(run(tiny_scenario(costs={"mirror_npf_ns": 7}), strategy=strategy, engine="reference", trace_path=t))
    if strategy == "mirror-vm":
        assert (m["pages_sent"], m["private_pages_sent"], m["shared_pages_sent"]) == (5, 4, 1)
    else:
        # shadow-vcpu's setup is 1000 ns shorter (test_precopy): the initial sync at 4000 comes before gfn
        # 2's write at 4500, so the downtime sends gfn 2 again besides gfn 1: 3 private + 2 shared
        assert (m["pages_sent"], m["private_pages_sent"], m["shared_pages_sent"]) == (5, 3, 2)
    assert m["zero_pages"] == 0
    assert m["mirror_first_touch_npfs"] == touches


def _vmsa(gfn):
    # retired: still the guest's (ASID 1), validated, VMPL0's permissions; the VMSA bit clear
    return RmpEntry(assigned=True, asid=1, gfn=gfn, size_2m=False, immutable=False, validated=True, vmsa=False,
                    perms=(15, 0, 0, 0))


@pytest.mark.parametrize("strategy", ["mirror-vm", "shadow-vcpu"])
def test_agents_vmsa_pages_follow_the_guests_pages_on_each_side(trace, strategy):  # noqa: F811
    # page_pack_ns 1001: round 0 is paced by its one agent and asks for a second (test_costs_exact): two
    # agents, so two VMSA pages per side, at gfns 4 and 5 (npages + 0, npages + 1); gfn 6 never used
    engines = []

    def engine(**kw):
        engines.append(make_engine("reference", **kw))
        return engines[-1]

    s = tiny_scenario(costs={"page_pack_ns": 1001}, agents_max=4, host_cpus=4, shadow_apic_ids=4)
    r = Migration(s.with_strategy(strategy), trace, engine=engine).run()
    assert r.status == "completed" and _m(r)["agents_max"] == 2
    (eng,) = engines
    for side in (0, 1):
        entries = [eng.rmp_entry(side, eng.spa(side, 0) + gfn) for gfn in (NPAGES, NPAGES + 1, NPAGES + 2)]
        assert entries[:2] == [_vmsa(NPAGES), _vmsa(NPAGES + 1)]
        assert not entries[2].assigned


def test_an_agent_added_on_demand_takes_its_steps_on_the_clock(trace):  # noqa: F811
    # Round 0's 4 pages at one agent's 1001 ns each: 5120 + 4 x 1001 = 9124. Then the second agent: a mirror
    # vCPU on the source (its VMSA: ap_create_ns 1000 + PVALIDATE 0 + RMPADJUST 0; KVM_CREATE_VCPU:
    # vcpu_create_ns + vmgexit_ns + rmpupdate_ns = 0), then the same on the target: added at
    # 9124 + 2 x 1000 = 11124, when round 0 ends.
    r = run(tiny_scenario(costs={"page_pack_ns": 1001}, agents_max=4, host_cpus=4), strategy="mirror-vm",
            engine="reference", trace_path=trace)
    rows = [(e["t_ns"], e["kind"], e["detail"].split(" (")[0]) for e in r.events.to_pylist()
            if 9124 <= e["t_ns"] <= 11124 and e["kind"] in ("setup_step", "agent_added", "round_end")]
    assert rows == [
        (9124, "setup_step", "source: mirror vCPU: SVSM builds its VMSA"),
        (10124, "setup_step", "source: mirror vCPU: KVM_CREATE_VCPU, host RMPUPDATE"),
        (10124, "setup_step", "target: mirror vCPU: SVSM builds its VMSA"),
        (11124, "setup_step", "target: mirror vCPU: KVM_CREATE_VCPU, host RMPUPDATE"),
        (11124, "agent_added", "agents=2"),
        (11124, "round_end", "round=0 pages=4 bytes=20000"),
    ]


def test_a_plain_postcopy_run_records_no_precopy_figures(tmp_path):
    # test_postcopy's tiny post-copy run (mirror-vm): no pre-copy, so no rounds counted, no expected
    # downtime (pre-copy's estimate), and its downtime (the pause at 3000 to the resume at 7100: 4100 ns)
    # is within the 10,000 ns limit. The latency histogram has QEMU's 24 buckets, the last [2^23, 2^24) us.
    from test_postcopy import pc_scenario, pc_trace

    r = run(pc_scenario(), strategy="mirror-vm", engine="reference", trace_path=pc_trace(tmp_path / "pc.arrow"))
    m = _m(r)
    assert r.status == "completed" and m["downtime_ns"] == 4100
    assert (m["rounds"], m["expected_downtime_ns"], m["downtime_limit_exceeded"]) == (0, 0, False)
    hist = m["postcopy"]["latency_hist"]
    assert len(hist) == 24 and hist[-1]["bucket_us_lo"] == 1 << 23 and hist[-1]["bucket_us_hi"] == 1 << 24
