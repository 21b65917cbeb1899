"""Two cores for data mode's bulk work: a batch of independent pages cut in two halves, done at once.

Sealing, opening and installing pages are loops in C that release the GIL, and every page in them is
independent of the others, so the result is the same whatever the split (runs stay byte-identical): only
the wall time changes. ``THREADS`` is the machine's cores available to this process, at most 2 (the two
halves of a run's crypto: more threads would compete with the rest of the run); ``SNP_REPLAY_THREADS=1``
keeps everything on one thread.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
THREADS = 1 if os.environ.get("SNP_REPLAY_THREADS", "") == "1" else min(2, _CORES)
# The smallest batch worth a second thread: below it the hand-over costs more than it saves.
SPLIT_MIN = 256
_pool: ThreadPoolExecutor | None = None


def halves(n: int, work: Callable[[int, int], object]) -> None:
    """Run ``work(lo, hi)`` over [0, n): in two halves on two threads when worth it, else at once. ``work``
    must release the GIL for the halves to overlap, and write only what its own half owns."""
    global _pool
    if THREADS < 2 or n < SPLIT_MIN:
        work(0, n)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snp-replay-half")
    h = n // 2
    other = _pool.submit(work, h, n)
    work(0, h)
    other.result()
