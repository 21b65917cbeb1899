"""Canonical JSON and atomic writes: how every record this tool writes reaches the disk.

Run records must be byte-identical for identical inputs on any machine, so JSON is written with sorted
keys, fixed separators and no floats (a float in a record is a bug: ratios are stored as integers in
parts per million). Files and directories appear atomically: written under a temporary name in the same
directory, then ``os.replace``d, so an interrupted run never leaves a partial record behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; records are ordinary files for their readers."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _reject_float(obj: Any, path: str = "$") -> None:
    if isinstance(obj, float):
        raise TypeError(f"float at {path} in a record; store integers (ns, bytes, ppm)")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"non-string key {k!r} at {path}")
            _reject_float(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _reject_float(v, f"{path}[{i}]")


def canonical_json(obj: Any) -> bytes:
    """Serialize ``obj`` canonically: sorted keys, 2-space indent, UTF-8, trailing newline, no floats."""
    _reject_float(obj)
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole.

    An existing ``path`` is replaced only once the new one is complete, so a reader sees either the old
    run or the new one, never a mixture. Parent directories created for it are removed again on failure
    (nothing new is left behind).
    """
    path = Path(path)
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield tmp
        publish_mode(tmp, directory=True)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "run")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_empty(dirs: list[Path]) -> None:
    """Remove directories this module created (innermost first), if still empty."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()
