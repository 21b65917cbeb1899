"""Pre-copy's agents on demand ask for what the burst's pace says, not for the most the design could use
(issue 22's mutation survivors in replay/migration/precopy.py ``_burst``).

The rule (precopy.py, docs/how-it-works.md): after a burst its agents (not the link) paced, the agents grow
to min(agents_wanted, ceil(agents x burst time / link time)), where agents_wanted = ceil(a page's agent CPU
/ its link time) capped by the design. Both runs are test_precopy's tiny pre-copy scenario (mirror-vm: an
added agent is a mirror vCPU on each side, 1000 ns of VMSA building each; round 0 starts at 5120).
"""

from __future__ import annotations

from replay.migration import run
from test_costs_exact import trace  # noqa: F401  (fixture: test_precopy's 4-page trace)
from test_precopy import tiny_scenario, tiny_trace


def _added(r):
    return [e["t_ns"] for e in r.events.to_pylist() if e["kind"] == "agent_added"]


def test_a_burst_with_shared_pages_asks_for_fewer_agents_than_wanted(tmp_path):
    # gfns 2 and 3 shared (the host sends them, no agent CPU); gfns 0 and 1 private at 2500 ns of packing.
    # Round 0's burst: the link's 4 x 1000 ns against the one agent's 2 x 2500 = 5000 ns: 5120..10120, paced
    # by the agent. It asks ceil(1 x 5000 / 4000) = 2 agents, below agents_wanted = ceil(2500 / 1000) = 3.
    t = tiny_trace(tmp_path / "half-shared.arrow", shared=[(2, 3)])
    r = run(tiny_scenario(costs={"page_pack_ns": 2500}, agents_max=4, host_cpus=4), strategy="mirror-vm",
            engine="reference", trace_path=t)
    assert r.summary["metrics"]["agents_max"] == 2
    assert _added(r) == [10120 + 2 * 1000]


def test_a_burst_shorter_than_two_ns_of_link(trace):  # noqa: F811
    # A 5 TB/s link: a page's 5000 bytes take exactly 1 ns. burst_ns 1: round 0's first burst is one page,
    # packed by the one agent in 3 ns (5120..5123), 1 ns on the link: ceil(1 x 3 / 1) = 3 agents =
    # agents_wanted (ceil(3 / 1)). Each added agent: 2 x 1000 ns, added at 7123 and 9123.
    r = run(tiny_scenario(costs={"page_pack_ns": 3}, agents_max=8, host_cpus=8, burst_ns=1, bandwidth_period_ns=1,
                          bandwidth_bytes_per_s=5_000_000_000_000), strategy="mirror-vm", engine="reference",
            trace_path=trace)
    assert r.summary["metrics"]["agents_max"] == 3
    assert _added(r) == [7123, 9123]
