"""The migration driver's public entry points (the driver itself is the ``replay.migration`` package)."""

from .migration import Migration, RunResult, cache_dir, run, trace_for  # noqa: F401
