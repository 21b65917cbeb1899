"""Fixed costs on both designs (issue 18, item 4), by hand: the target's SVSM boot, each agent's vCPU and
VMSA with its RMP operations, teardown after the migration (off the downtime), shadow APs alive while
post-copy still needs them."""

from __future__ import annotations

import pytest

from replay.migration import run
from test_precopy import tiny_scenario, tiny_trace

BOTH = ("mirror-vm", "shadow-vcpu")


@pytest.fixture
def trace(tmp_path):
    return tiny_trace(tmp_path / "tiny.arrow")


@pytest.mark.parametrize("strategy", BOTH)
def test_both_designs_wait_for_the_targets_svsm(trace, strategy):
    base = run(tiny_scenario(), strategy=strategy, trace_path=trace).summary["metrics"]["setup_ns"]
    slow = run(tiny_scenario(costs={"target_vmpl0_boot_ns": 7_777}), strategy=strategy,
               trace_path=trace).summary["metrics"]["setup_ns"]
    assert slow - base == 7_777


def test_agent_vmsas_cost_the_same_rmp_operations_on_both_designs(trace):
    # One agent a side, OS at VMPL0: creating it is RMPUPDATE + PVALIDATE + RMPADJUST(vmsa=1) on its side,
    # tearing it down RMPADJUST(vmsa=0). The pages moved are the same, so the counts are equal.
    rmp = {s: run(tiny_scenario(), strategy=s, trace_path=trace).summary["metrics"]["rmp"] for s in BOTH}
    assert rmp["mirror-vm"] == rmp["shadow-vcpu"]
    assert rmp["mirror-vm"]["source"] == {"rmpupdate": 1, "pvalidate": 1, "rmpadjust": 2, "psmash": 0, "psc": 0}


@pytest.mark.parametrize("strategy", BOTH)
def test_teardown_comes_after_the_resume_not_in_the_downtime(trace, strategy):
    # ap_destroy_ns per agent per side (one agent a side here) and, for the mirror VM, its destruction per
    # side: after the target resumed, inside the migration's window; the downtime does not see them.
    base = run(tiny_scenario(), strategy=strategy, trace_path=trace).summary["metrics"]
    costly = run(tiny_scenario(costs={"ap_destroy_ns": 3_000, "mirror_vm_destroy_ns": 5_000}), strategy=strategy,
                 trace_path=trace)
    m = costly.summary["metrics"]
    assert m["downtime_ns"] == base["downtime_ns"]
    # mirror-vm: per side, the vCPU's teardown and the VM's destruction on their own CPUs: 2 x (3000 + 5000).
    # shadow-vcpu: the source's AP on its idle quota, a whole CPU: 3000; the target's beside the guest's one
    # busy vCPU under a quota of 1 CPU: fair sharing gives it 1 x 1/(1 + 1) CPU: 6000.
    extra = 2 * (3_000 + 5_000) if strategy == "mirror-vm" else 3_000 + 6_000
    assert m["completion_ns"] - base["completion_ns"] == extra
    kinds = [e["kind"] for e in costly.events.to_pylist()]
    assert kinds.index("teardown_step") > kinds.index("resume")


def test_postcopy_shadow_aps_stay_until_the_last_page(trace):
    r = run(tiny_scenario(mode="postcopy"), strategy="shadow-vcpu", trace_path=trace)
    kinds = [e["kind"] for e in r.events.to_pylist()]
    first_teardown = kinds.index("teardown_step")
    assert first_teardown > kinds.index("postcopy_complete")
    assert r.summary["metrics"]["rmp"]["target"]["rmpadjust"] >= 2  # the AP's VMSA made, then retired
