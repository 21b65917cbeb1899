"""The background reference replay (replay/migration/refdigest.py ``Background``) when its helper thread
fails (issue 22's mutation survivor in its drain loop): the helper keeps taking what the feeder puts until
the end marker, so ``result`` returns, raising the helper's error, instead of waiting forever.
"""

from __future__ import annotations

import threading

from replay.migration import refdigest
from replay.traces.format import read_meta
from test_costs_exact import trace  # noqa: F401  (fixture: test_precopy's 4-page trace)


def test_a_failed_helper_still_ends_at_the_end_marker(trace):  # noqa: F811
    bg = refdigest.Background(read_meta(trace), 1, 0, "reference")
    bg.feed(0, object())  # not a record batch: the helper's replay of it fails
    raised = []

    def finish():
        try:
            bg.result(cache=None)
        except Exception as exc:  # noqa: BLE001  (the helper's error, handed over)
            raised.append(exc)

    t = threading.Thread(target=finish, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "result() waits forever for a helper that failed"
    assert len(raised) == 1 and not bg._thread.is_alive()
