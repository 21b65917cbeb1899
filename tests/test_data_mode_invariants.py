"""Which invariants a data-mode run records (issue 22's mutation survivor in replay/migration/record.py):
over the plaintext, the end of the trace equals the no-migration replay, always; a pre-copy run also
records that the target's plaintext equals the source's at the switchover, whether or not it got there
(judged only once it completed: an aborted run, with no switchover, records it as holding).

The runs are test_precopy's tiny pre-copy scenario in data mode (mirror-vm), aborted by a link failure for
good at 6000 ns (during round 0, before any switchover) or completed.
"""

from __future__ import annotations

import pytest

from replay.migration import Migration
from test_costs_exact import trace  # noqa: F401  (fixture: test_precopy's 4-page trace)
from test_precopy import tiny_scenario

BASE = {"end_of_trace_equals_no_migration", "target_equals_source_at_switchover", "no_faults",
        "plaintext_end_equals_no_migration"}
SWITCHOVER = "plaintext_target_equals_source_at_switchover"


@pytest.mark.parametrize("faults, status", [([{"at_ns": 6000, "duration_ns": -1}], "aborted"), ([], "completed")])
def test_a_precopy_run_always_judges_its_switchover_plaintext(trace, faults, status):  # noqa: F811
    r = Migration(tiny_scenario(data=True, faults=faults).with_strategy("mirror-vm"), trace).run()
    assert r.status == status
    inv = r.summary["invariants"]
    assert set(inv) == BASE | {SWITCHOVER}
    assert inv[SWITCHOVER] is True  # aborted: not judged, holds; completed: the two sides agree
