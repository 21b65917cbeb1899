"""Choosing a page engine by name: the one place that imports both engines.

It sits above ``replay.engines.common`` (the types and argument checks both engines share) and the two engines
that import it, so that no engine module imports the other (imports only go downward).
"""

from __future__ import annotations

from typing import Any

from replay.engines.common import ENGINE_KINDS


def make_engine(kind: str = "cython", **kw: Any) -> Any:
    """Build an engine of ``kind`` (one of ENGINE_KINDS); ``kw`` are the Engine constructor arguments."""
    if kind == "cython":
        from replay.engines._engine import Engine
    elif kind == "reference":
        from replay.engines.reference import Engine
    else:
        raise ValueError(f"unknown engine kind {kind!r} (expected one of {', '.join(ENGINE_KINDS)})")
    return Engine(**kw)
