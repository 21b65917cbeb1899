"""How many agents post-copy sizes before its switchover, each term of the rule at its edge (issue 22's
mutation survivors in replay/migration/setup.py ``agents_wanted``).

The rule (docs/costs.md, agents on demand): enough agents that a private page's work on each side keeps pace
with its time on the link: ceil(max(source, target) / link time of a page), within the strategy's limit
(agents_max; the mirror VM also host_cpus). Source: page_pack_ns + vmgexit_ns // batch_pages (+ the mirror
VM's first-touch NPF, mirror_npf_ns); target: page_unpack_ns + pvalidate_ns (+ rmpadjust_ns with the OS below
VMPL0) (+ the first-touch NPF for the mirror VM). A page is 1000 ns on test_precopy's link; agents_max and
host_cpus 8, so the ceiling decides.
"""

from __future__ import annotations

import pytest

from replay.migration import run
from test_costs_exact import trace  # noqa: F401  (fixture: test_precopy's 4-page trace)
from test_precopy import tiny_scenario


@pytest.mark.parametrize("strategy, costs, agents", [
    # the mirror VM's first touch counts on the source: 600 + 401 = 1001 -> 2; 600 + 400 -> 1
    ("mirror-vm", {"page_pack_ns": 600, "mirror_npf_ns": 401}, 2),
    ("mirror-vm", {"page_pack_ns": 600, "mirror_npf_ns": 400}, 1),
    # ... and on the target: 700 + 401 = 1101 -> 2 (the source's 100 + 401 is below a page)
    ("mirror-vm", {"page_pack_ns": 100, "page_unpack_ns": 700, "mirror_npf_ns": 401}, 2),
    # shadow vCPUs take no NPF for it: 600 (and 700) alone -> 1
    ("shadow-vcpu", {"page_pack_ns": 600, "mirror_npf_ns": 401}, 1),
    ("shadow-vcpu", {"page_pack_ns": 100, "page_unpack_ns": 700, "mirror_npf_ns": 401}, 1),
    # exactly a page's link time on the target keeps pace; one ns more does not
    ("shadow-vcpu", {"page_unpack_ns": 600, "pvalidate_ns": 400}, 1),
    ("shadow-vcpu", {"page_unpack_ns": 600, "pvalidate_ns": 401}, 2),
])
def test_postcopy_agents_sized_by_the_slower_side(trace, strategy, costs, agents):  # noqa: F811
    s = tiny_scenario(costs=costs, agents_max=8, host_cpus=8, shadow_apic_ids=8, mode="postcopy")
    r = run(s, strategy=strategy, trace_path=trace)
    assert r.summary["metrics"]["agents_max"] == agents
