"""The no-migration reference digest, computed once per trace and guest and cached on disk.

Every run checks that the guest's memory at the end of the trace equals what it would have been with no
migration at all. That reference is a full replay of the trace on one host, as long as the migrated run
itself; it depends only on the trace's content and layout (digest, guest size, vCPUs, shared ranges),
the guest's ASID and OS VMPL, and the engine (kind and tool version). So it is computed once for that key
and kept in ``<cache>/refdigest/<key>`` next to the generated traces: a second strategy, a second sweep
point or a rerun of the same scenario reads it back instead of replaying the trace again.

The cache holds a 64-hex-digit string per key, written atomically; an entry that is not one (a damaged
cache) is recomputed and replaced rather than trusted.

A run that does not find its entry need not replay the trace twice: ``Background`` replays the batches the
run's own read yields on a second engine in a helper thread (the Cython engine releases the GIL), so the
reference and the migrated run share one decode and one digest check of the trace and run on two cores.
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading
from pathlib import Path
from typing import Callable

from ..core.version import __version__
from ..core.paths import cache_dir
from ..core.records import canonical_json, write_atomic
from ..traces.format import TraceMeta, open_trace

_HEX64 = re.compile(rb"[0-9a-f]{64}\n?")


def cache_key(meta: TraceMeta, asid: int, os_vmpl: int, engine_kind: str) -> str:
    """What the reference digest depends on, hashed: trace content and layout, guest, engine."""
    ident = {
        "snp_replay": __version__,  # engine semantics may change between versions: never reuse across them
        "engine": engine_kind,
        "trace_digest": meta.digest,
        "guest_bytes": meta.guest_bytes,
        "vcpus": meta.vcpus,
        "shared_ranges": [[int(a), int(b)] for a, b in meta.shared_ranges],
        "asid": asid,
        "os_vmpl": os_vmpl,
    }
    return hashlib.blake2b(canonical_json(ident), digest_size=16).hexdigest()


def _launched_engine(meta: TraceMeta, asid: int, os_vmpl: int, engine_kind: str):
    """One host of the trace's guest, launched as a run launches its source: what both passes replay on."""
    from ..engines import make_engine

    eng = make_engine(engine_kind, npages=meta.npages, vcpus=meta.vcpus, asid=asid, os_vmpl=os_vmpl, hosts=1)
    eng.launch(0, list(meta.shared_ranges))
    return eng


def compute(trace_path: str | Path, meta: TraceMeta, asid: int, os_vmpl: int, engine_kind: str,
            progress: Callable[[int], None] | None = None) -> str:
    """Replay the whole trace on one host with no migration; the end-of-trace memory digest."""
    from ..engines.common import U64_MAX

    eng = _launched_engine(meta, asid, os_vmpl, engine_kind)
    with open_trace(trace_path) as reader:
        for base, batch in reader:
            eng.replay(0, batch, 0, base, U64_MAX)
            if progress:
                progress(batch.num_rows)
    return eng.digest(0)


def _entry(meta: TraceMeta, asid: int, os_vmpl: int, engine_kind: str, cache: Path | None) -> Path:
    if cache is None:
        cache = cache_dir()
    return Path(cache) / "refdigest" / cache_key(meta, asid, os_vmpl, engine_kind)


def lookup(meta: TraceMeta, asid: int, os_vmpl: int, engine_kind: str, cache: Path | None = None) -> str | None:
    """The cached reference digest, or None if it is not known yet (or its entry is damaged)."""
    try:
        data = _entry(meta, asid, os_vmpl, engine_kind, cache).read_bytes()
    except FileNotFoundError:
        return None
    return data.strip().decode() if _HEX64.fullmatch(data) else None


def no_migration_digest(trace_path: str | Path, meta: TraceMeta, asid: int, os_vmpl: int, engine_kind: str,
                        progress: Callable[[int], None] | None = None, cache: Path | None = None) -> str:
    """The reference digest, from ``cache`` (default: the trace cache, ``replay.core.paths.cache_dir()``)
    when known, else computed and stored there. ``progress`` is called with the events replayed; a
    cached answer replays none."""
    return _cached(meta, asid, os_vmpl, engine_kind, cache,
                   lambda: compute(trace_path, meta, asid, os_vmpl, engine_kind, progress))


def plaintext_digest(trace_path: str | Path, meta: TraceMeta, cache: Path | None = None) -> str:
    """Data mode's reference: the plaintext digest of the trace replayed straight into data-mode memory,
    cached the same way (it depends on the trace alone, so one entry serves every guest and engine)."""
    from ..security.memory import replay_plaintext_digest

    # The kind names the digest's hash: an entry from before the switch to BLAKE3 is never read back.
    return _cached(meta, 0, 0, "plaintext-blake3", cache, lambda: replay_plaintext_digest(trace_path))


def store(meta: TraceMeta, asid: int, os_vmpl: int, kind: str, digest: str, cache: Path | None = None) -> None:
    """Write a computed reference digest into the cache (atomically)."""
    path = _entry(meta, asid, os_vmpl, kind, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (digest + "\n").encode())


def _cached(meta: TraceMeta, asid: int, os_vmpl: int, kind: str, cache: Path | None, compute_digest) -> str:
    known = lookup(meta, asid, os_vmpl, kind, cache)
    if known is not None:
        return known
    digest = compute_digest()
    store(meta, asid, os_vmpl, kind, digest, cache)
    return digest


class Background:
    """The no-migration reference computed beside a run: ``feed`` each ``(base, batch)`` of the whole trace in
    order (from the run's own validated read), then ``result()`` (the digest, also stored in the cache).

    The replay happens in a helper thread, at most ``DEPTH`` batches behind the feeder (a full queue makes
    ``feed`` wait: memory stays bounded by a few batches). An error in the helper is raised by ``feed`` or
    ``result``. The digest is the same as ``compute``'s: the same engine replays the same rows in order."""

    DEPTH = 4
    # The second engine's state per guest page (one host: 4 B version + 1 B flags, RMP entries where they
    # differ from launch's), rounded up; see ``fits``.
    BYTES_PER_PAGE = 8

    @classmethod
    def fits(cls, meta: TraceMeta) -> bool:
        """Whether a second engine fits beside the run with room to spare (a quarter of the memory available
        now): ``run_memory_bytes`` budgets a run with its reference engine freed first (the separate pass),
        so a guest near that budget takes the separate pass instead. Either way the digest is the same."""
        from ..core.validate import available_memory_bytes

        return meta.npages * cls.BYTES_PER_PAGE <= available_memory_bytes() // 4

    def __init__(self, meta: TraceMeta, asid: int, os_vmpl: int, engine_kind: str):
        self.meta, self.key = meta, (asid, os_vmpl, engine_kind)
        self._eng = _launched_engine(meta, asid, os_vmpl, engine_kind)
        self._q: queue.Queue = queue.Queue(maxsize=self.DEPTH)
        self._error: BaseException | None = None
        self._digest: str | None = None
        self._thread = threading.Thread(target=self._work, name="refdigest", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        from ..engines.common import U64_MAX

        try:
            while True:
                item = self._q.get()
                if item is None:
                    break
                base, batch = item
                self._eng.replay(0, batch, 0, base, U64_MAX)
            self._digest = self._eng.digest(0)
        except BaseException as exc:  # handed to the feeding thread
            self._error = exc
            while self._q.get() is not None:  # let the feeder finish without blocking
                pass

    def feed(self, base: int, batch) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((base, batch))

    def result(self, cache: Path | None = None) -> str:
        """Wait for the replay of everything fed; the digest, stored in ``cache`` (default: the trace cache)."""
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        store(self.meta, *self.key, self._digest, cache)
        return self._digest

    def abandon(self) -> None:
        """Stop the helper (the run failed): nothing is stored."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
