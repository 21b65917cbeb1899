"""The migration phases' options are keyword-only (issue 22's mutation survivors: the ``*`` of each phase
function's signature read as ``/``): a caller that passed an option by position would bind it to the wrong
parameter as soon as one is added or reordered, so the signatures refuse it. Each call gives one positional
argument too many; the TypeError comes before the body runs (a body would fail on the ``object()`` run
differently).
"""

from __future__ import annotations

import importlib

import pytest

# the modules themselves (the package's namespace holds its functions ``precopy`` and ``setup`` under the
# same names)
dirtylog, precopy, setup, stopcopy, transfer = (
    importlib.import_module(f"replay.migration.{m}") for m in ("dirtylog", "precopy", "setup", "stopcopy", "transfer"))

RUN = object()

CALLS = {
    "setup.do_step": lambda: setup.do_step(RUN, object(), 0),
    "setup.setup": lambda: setup.setup(RUN, True),
    "precopy.precopy": lambda: precopy.precopy(RUN, 2, "cancel", 0),
    "stopcopy.pause_and_drain": lambda: stopcopy.pause_and_drain(RUN, True),
    "stopcopy.resume_target": lambda: stopcopy.resume_target(RUN, object(), 1, True),
    "transfer.begin": lambda: transfer.begin(RUN, 0, False),
    "transfer.step": lambda: transfer.step(RUN, [], 0, 0, False, "precopy"),
    "dirtylog.sync": lambda: dirtylog.sync(RUN, False),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_options_by_position_are_refused(name):
    with pytest.raises(TypeError, match="positional argument"):
        CALLS[name]()
