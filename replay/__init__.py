"""snp-replay: deterministic record/replay of guest memory-write traces through SEV-SNP live migration.

The public API (``docs/api.md``) is importable from here: ``replay.load_scenario``, ``replay.run``,
``replay.compare``, ``replay.sweep``, ``replay.diff``, ``replay.report``, ``replay.generate``... and the
exceptions they raise (``replay.ReplayError`` and its kinds). They are loaded on first use (module
``__getattr__``), so ``import replay`` stays cheap; ``replay.cli`` is the command line over them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .version import __version__

# name -> the module that defines it (imported when the name is first used)
_LAZY = {
    **dict.fromkeys(("CompareResult", "RunResult", "Status", "SweepOutcome", "check_invariants", "compare", "diff",
                     "execute_sweep", "generate", "import_trace", "inspect", "load_run", "load_scenario",
                     "make_scenario", "override", "record", "report", "run", "scenario_inputs", "sweep"),
                    "replay.api"),
    **dict.fromkeys(("ReplayError", "UsageError", "TraceError", "ScenarioError", "CapabilityError", "SetupError",
                     "RunDirError", "RecordError", "WorkerError", "ResourceError", "InvariantError", "ExitCode"),
                    "replay.errors"),
    "Scenario": "replay.scenario",
    "STRATEGIES": "replay.scenario",
    "MODES": "replay.scenario",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .api import (CompareResult, RunResult, Status, SweepOutcome, check_invariants, compare, diff,
                      execute_sweep, generate, import_trace, inspect, load_run, load_scenario, make_scenario,
                      override, record, report, run, scenario_inputs, sweep)
    from .errors import (CapabilityError, ExitCode, InvariantError, RecordError, ReplayError, ResourceError,
                         RunDirError, ScenarioError, SetupError, TraceError, UsageError, WorkerError)
    from .scenario import MODES, STRATEGIES, Scenario


# API functions named like a module of the package (replay/diff.py, report.py, sweep.py, record.py,
# inspect.py). Importing such a module makes the import system set it as the package's attribute, which
# would hide the function: the package refuses that binding, so ``replay.diff`` stays the function. The
# modules are still ``from replay.diff import render_text`` and ``importlib.import_module("replay.diff")``.
# (When the layout moves these modules into subpackages, the names no longer collide and this goes.)
_SHADOWED = frozenset({"diff", "report", "sweep", "record", "inspect"})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'replay' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
