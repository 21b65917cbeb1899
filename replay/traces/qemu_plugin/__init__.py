"""C sources that run inside QEMU or the guest for `replay record --vm`, and how they are compiled.

``snp_record.c`` is the TCG plugin, ``mark.c`` the guest's ``replay-mark`` helper. setup.py compiles both
at install (where a C compiler exists) with :func:`prebuild`; replay.traces.vm otherwise compiles them on
first use into the cache. This module imports nothing from the project, so setup.py can load it alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name of the output -> (source, compiler flags)
TARGETS = {
    "snp_record.so": ("snp_record.c", ("-O2", "-shared", "-fPIC", "-Wall", "-ldl")),
    # No libc: the helper is a few instructions and must run in any guest.
    "replay-mark": ("mark.c", ("-O2", "-static", "-nostdlib", "-fno-stack-protector", "-fno-pie", "-no-pie")),
}


def tag(name: str) -> str:
    """Identifies a build: the source and the flags."""
    src, flags = TARGETS[name]
    return hashlib.sha256((HERE / src).read_bytes() + " ".join(flags).encode()).hexdigest()[:16]


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def compile_one(name: str, out: Path) -> str | None:
    """Compile ``name`` to ``out``; None on success, else the compiler's first error line."""
    cc = compiler()
    if cc is None:
        return "no C compiler"
    src, flags = TARGETS[name]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    flags = [f for f in flags if f != "-ldl"]
    libs = ["-ldl"] if "-ldl" in TARGETS[name][1] else []
    proc = subprocess.run([cc, *flags, "-o", str(tmp), str(HERE / src), *libs], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        if tmp.exists():
            tmp.unlink()
        return (proc.stderr.strip().splitlines() or ["(no output)"])[0]
    os.replace(tmp, out)
    return None


def prebuild(dest: Path | None = None) -> list[str]:
    """Compile every target into ``dest`` (default: beside the sources) with a ``.sha`` stamp; skip quietly
    without a compiler (record --vm then builds on first use). Returns what was built."""
    dest = Path(dest) if dest else HERE
    built = []
    for name in TARGETS:
        if compile_one(name, dest / name) is None:
            (dest / f"{name}.sha").write_text(tag(name) + "\n")
            built.append(name)
    return built
