"""A link lost during the stop-and-copy downtime while an adversary's action is still due later (issue 22's
mutation survivor in replay/migration/stopcopy.py ``send_paused``): the downtime's transfer steps end at
the action's time, so the loop must stop at the link's death itself, not only when no action is due; the
run then aborts at the loss and the action is never reached. (Looping on instead sends nothing more on the
dead link, forever.)

The run is test_precopy's tiny pre-copy scenario in data mode (an adversary turns data mode on), mirror-vm:
the guest pauses at 22320 ns (its packaging in data mode is slower than the metadata run's), the final
sync finds 2 pages, sent from 22420 on, before the VMSA. The link fails for good at 22500, during the
first of them; a drop action is due at 25000, after the failure. The rule (replay/migration/link.py): a
failure before the resume aborts, the source running on.
"""

from __future__ import annotations

import threading

from replay.migration import Migration
from replay.scenario.spec import AdversarySpec, with_adversary
from test_costs_exact import trace  # noqa: F401  (fixture: test_precopy's 4-page trace)
from test_precopy import tiny_scenario

PAUSE, LOSS, DUE = 22320, 22500, 25000


def test_a_link_lost_in_the_downtime_ends_it_though_an_action_is_due(trace):  # noqa: F811
    s = with_adversary(tiny_scenario(data=True, faults=[{"at_ns": LOSS, "duration_ns": -1}]),
                       [AdversarySpec(kind="drop", at_ns=DUE)])
    done = []
    t = threading.Thread(target=lambda: done.append(Migration(s.with_strategy("mirror-vm"), trace).run()), daemon=True)
    t.start()
    t.join(30)
    assert done, "the downtime's transfer loop did not stop at the link's death"
    (r,) = done
    kinds = [(e["t_ns"], e["kind"]) for e in r.events.to_pylist() if e["kind"] in ("pause", "link_down", "abort")]
    assert kinds == [(PAUSE, "pause"), (LOSS, "link_down"), (LOSS, "abort")]
    assert (r.status, r.summary["status_reason"]) == (
        "aborted", f"link down at {LOSS} ns before the target resumed: source runs on")
    assert r.summary["adversary"][0]["outcome"] == "not_reached"
