"""snp-replay: deterministic record/replay of guest memory-write traces through SEV-SNP live migration.

The public API (``docs/api.md``) is importable from here: ``replay.load_scenario``, ``replay.run``,
``replay.compare``, ``replay.sweep``, ``replay.diff``, ``replay.report``, ``replay.generate``... and the
exceptions they raise (``replay.ReplayError`` and its kinds). They are loaded on first use (module
``__getattr__``), so ``import replay`` stays cheap; ``replay.cli`` is the command line over them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.version import __version__

# name -> the module that defines it (imported when the name is first used)
_LAZY = {
    **dict.fromkeys(("CompareResult", "RunResult", "Status", "SweepOutcome", "adversary_matrix", "check_invariants",
                     "compare", "diff", "execute_sweep", "generate", "import_trace", "inspect", "load_run",
                     "load_scenario", "make_scenario", "override", "record", "record_vm", "report", "run",
                     "scenario_inputs", "sweep", "verify"),
                    "replay.api"),
    **dict.fromkeys(("ReplayError", "UsageError", "TraceError", "ScenarioError", "CapabilityError", "SetupError",
                     "RunDirError", "RecordError", "WorkerError", "ResourceError", "InvariantError", "ExitCode"),
                    "replay.core.errors"),
    "Scenario": "replay.scenario.spec",
    "STRATEGIES": "replay.scenario.spec",
    "MODES": "replay.scenario.spec",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .api import (CompareResult, RunResult, Status, SweepOutcome, adversary_matrix, check_invariants, compare,
                      diff, execute_sweep, generate, import_trace, inspect, load_run, load_scenario, make_scenario,
                      override, record, record_vm, report, run, scenario_inputs, sweep, verify)
    from .core.errors import (CapabilityError, ExitCode, InvariantError, RecordError, ReplayError, ResourceError,
                              RunDirError, ScenarioError, SetupError, TraceError, UsageError, WorkerError)
    from .scenario.spec import MODES, STRATEGIES, Scenario


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'replay' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
