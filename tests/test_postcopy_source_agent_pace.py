"""A source agent exactly as fast as the link is not the push's bottleneck; 1 ns slower it is (issue 22,
a survivor of tools/mutate over replay/migration/postcopy.py; test_postcopy checks the target agent's
side). When the source agents are the bottleneck a fault's request waits for the page its agent is on,
and one push packet (not the whole queue) is on the link ahead of the reply.

test_postcopy's tiny run, packaging a private page 1000 or 1001 ns (the link's page time: 5000 bytes at
5 GB/s = 1000 ns). The VMSAs cross at the link's pace either way (their packaging is never slower than
1001 ns): resumed at v 7100; vCPU 1 faults on gfn 3 at v 7600.
"""

from __future__ import annotations

import pytest

from replay.engines.common import ENGINE_KINDS
from replay.migration import run
from test_postcopy import pc_scenario, pc_trace


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_a_source_agent_as_fast_as_the_link_is_not_a_bottleneck(tmp_path, engine):
    trace = pc_trace(tmp_path / "pc.arrow")
    # 1000: request + 100, packaged + 1000, on the wire + 1000, in + 100 = 2200 (the push queue is 0 bytes).
    # 1001: + 1001 waiting for the agent's current page, packaged + 1001, one 5000-byte push packet ahead
    # + 1000, on the wire + 1000, + 100 each way: 4202.
    for pack, latency in ((1000, 2200), (1001, 100 + 1001 + 1001 + 1000 + 1000 + 100)):
        r = run(pc_scenario(costs={"page_pack_ns": pack}), strategy="mirror-vm", engine=engine, trace_path=trace)
        assert r.status == "completed", r.summary["status_reason"]
        f = r.faults.to_pylist()[0]
        assert (f["vcpu"], f["gfn"], f["raised_ns"], f["served_ns"] - f["raised_ns"]) == (1, 3, 7600, latency), pack
