"""The exception hierarchy, and the one place that maps exceptions to exit codes.

Every error a user can cause (a bad trace, scenario, run directory or argument) is a ``ReplayError``
whose message is one line naming what and where. Each class also inherits the matching builtin so that
library users can catch ``ValueError`` or ``OSError`` as they would elsewhere.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    DIFFERS = 1  # tools/diff: runs differ; replay run: migration aborted or failed
    BAD_INPUT = 2  # bad trace, scenario, run directory or arguments
    INTERNAL = 3  # a bug: an invariant of the engine or driver did not hold


class ReplayError(Exception):
    """Base of every error the tool reports as a one-line message."""

    exit_code = ExitCode.BAD_INPUT


class UsageError(ReplayError, ValueError):
    """Bad command-line arguments."""


class TraceError(ReplayError, ValueError):
    """A trace file is missing, malformed or violates the format (names file, batch and row)."""


class ScenarioError(ReplayError, ValueError):
    """A scenario file or override is malformed (names file and key)."""


class CapabilityError(ReplayError, RuntimeError):
    """The kernel under test lacks a capability the chosen strategy/mode needs (names it)."""


class SetupError(ReplayError, RuntimeError):
    """Migration setup is impossible as configured (e.g. shadow APIC IDs overlap the guest's)."""


class RunDirError(ReplayError, ValueError):
    """A run directory is missing, malformed or of a version this tool does not understand."""


class RecordError(ReplayError, RuntimeError):
    """Recording a program (valgrind lackey) failed."""


class WorkerError(ReplayError, RuntimeError):
    """A worker process died (killed, out of memory): the environment, not the input or a bug we can name."""


class ResourceError(ReplayError, MemoryError):
    """The machine lacks the memory or disk space a command would need (names the need and what it has)."""


class InvariantError(ReplayError, AssertionError):
    """An internal invariant did not hold: always a bug in snp-replay, never the user's input."""

    exit_code = ExitCode.INTERNAL


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """The message of ``exc`` folded onto one line (errors are printed as a single line), cut to ``limit``
    characters when given (a library's exception quoted inside one of ours)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if limit is None else text[:limit]
