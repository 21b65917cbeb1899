"""Where commands may read and write: inputs are regular files, outputs never overlap inputs.

Every command that writes calls ``check_output(out, inputs)`` before it writes anything: an output that
is, contains or lies inside one of its inputs is refused (``--out`` the input trace, ``report --out`` a
run's ``summary.json``, ``run --out .`` beside its scenario), whatever the spelling (relative, absolute,
through a symlink). Directory outputs replaced whole (run directories) must be absent, empty or a
previous output of the same kind (``check_replaceable_dir``), so a typo never replaces an unrelated
directory. Inputs must be regular files (``require_regular``): a FIFO or a device would block or never
end, and is refused instead of being waited on.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import ReplayError, UsageError
from .validate import short


def cache_dir() -> Path:
    """Where generated traces and cached reference digests live: ``$SNP_REPLAY_CACHE``, else
    ``~/.cache/snp-replay`` (shared by every command and sweep worker on the machine)."""
    return Path(os.environ.get("SNP_REPLAY_CACHE", Path.home() / ".cache" / "snp-replay"))


def show(path: str | os.PathLike, limit: int = 256) -> str:
    """A path as messages print it: as given, unless absurdly long (then a quoted prefix)."""
    name = os.fspath(path)
    return name if len(name) <= limit and name.isprintable() else short(name)


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def require_regular(path: str | os.PathLike, error: type[ReplayError] = UsageError, what: str = "") -> Path:
    """``path`` if it names a regular file (after symlinks); ``error`` naming it otherwise."""
    name = os.fspath(path)
    label = f"{what} " if what else ""
    if name == "":
        raise error(f"{label or 'file '}path is empty")
    if "\x00" in name:
        raise error(f"{label}{short(name)}: path contains a NUL character")
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise error(f"{label}{show(name)}: no such file (cannot open)") from None
    except OSError as exc:
        raise error(f"{label}{show(name)}: cannot open: {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. a path too long for the platform's APIs
        raise error(f"{label}{short(name)}: cannot open: {exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{label}{show(name)}: is a directory, not a trace file" if error.__name__ == "TraceError"
                    else f"{label}{show(name)}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{label}{show(name)}: not a regular file (a FIFO, socket or device is never read)")
    return Path(name)


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str = "--out") -> Path:
    """Refuse (UsageError) an output path that is, contains or lies inside one of ``inputs``, or that
    contains the current directory; nothing has been written when this is called."""
    name = os.fspath(out)
    if name.strip() == "":
        raise UsageError(f"{what}: empty path")
    if "\x00" in name:
        raise UsageError(f"{what} {show(name)}: path contains a NUL character")
    o = _real(name)
    for inp in inputs:
        if inp is None or os.fspath(inp) == "":
            continue
        i = _real(inp)
        if o == i:
            raise UsageError(f"{what} {show(name)} is the input {show(inp)}: refusing to overwrite an input")
        if o in i.parents:
            raise UsageError(f"{what} {show(name)} contains the input {show(inp)}: refusing to replace it")
        if i in o.parents:
            raise UsageError(f"{what} {show(name)} lies inside the input {show(inp)}")
    cwd = _real(".")
    if o == cwd or o in cwd.parents:
        raise UsageError(f"{what} {show(name)} is or contains the current directory: choose a new directory")
    return Path(name)


def check_replaceable_dir(out: str | os.PathLike, allowed: Iterable[str], kind: str, what: str = "--out") -> None:
    """A directory output replaced whole must be absent, empty, or hold only ``allowed`` entries (a
    previous output of this kind); anything else is refused rather than deleted."""
    p = Path(out)
    if not p.exists() and not p.is_symlink():
        return
    if p.is_symlink() or not p.is_dir():
        raise UsageError(f"{what} {show(out)} exists and is not a directory: refusing to replace it")
    allowed = set(allowed)
    extra = sorted(e.name for e in p.iterdir() if e.name not in allowed)
    if extra:
        raise UsageError(f"{what} {show(out)} exists and is not a {kind} (it holds {short(extra[0], 40)}): "
                         f"refusing to replace it; remove it or choose another {what}")


RUN_DIR_ENTRIES = ("summary.json", "rounds.arrow", "events.arrow", "faults.arrow")
