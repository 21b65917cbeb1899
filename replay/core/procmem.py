"""Keep the address space a process reserves close to what it uses.

A run's worker touches about 130 MiB (a 64 MiB guest) but, left alone, reserves over 2 GiB of address
space: pyarrow's mimalloc reserves 1 GiB arenas up front, and glibc gives each thread that allocates its
own 64 MiB heap (up to 8 per core). Under an address-space limit (``ulimit -v``), which counts
reservations, not use, that refused runs the machine could hold. ``limit_reservations()`` asks for
64 MiB mimalloc arenas and at most two glibc arenas: the same allocators, the same bytes, a quarter of
the reservation. Environment variables are set only where the user has not set them, before the
libraries read them; processes started afterwards (compare's workers, a sweep's local Dask workers)
inherit them. Nothing recorded depends on this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# Values, as each allocator reads them: mimalloc's arena reserve in KiB, glibc's arena count.
ENV = {"MIMALLOC_ARENA_RESERVE": "65536", "MALLOC_ARENA_MAX": "2"}
_M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


def limit_reservations() -> None:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    # glibc reads MALLOC_ARENA_MAX when the process starts: this process needs mallopt.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_ARENA_MAX, int(os.environ["MALLOC_ARENA_MAX"]))
    except (OSError, AttributeError, ValueError):
        pass  # not glibc (musl, macOS): their allocators reserve less per thread anyway
