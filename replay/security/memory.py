"""Guest memory of one host in data mode: real page contents, private pages encrypted as SNP does.

``HostMemory`` is the DRAM behind one host's copy of the guest. It holds only pages that were ever
written (a never-written page reads as zero), each as its host would see it in DRAM:

- a **private** page is AES-128-XTS ciphertext under that host's per-VM key, with the page's system
  physical address (``spa_base + gfn``, in pages) as tweak (``replay.security.xts``);
- a **shared** page is plain text.

``read_raw`` is what a host process sees (ciphertext for private pages); ``read_plain`` is what the guest
sees. ``raw_copy_to`` is a host copying DRAM bytes to another host: the copy decrypts to garbage there.

Page contents (SPEC section 2: the written bytes are a pure function of ``(value, offset)``): a WRITE row
``(gpa, len, value)`` writes at ``gpa + i`` (``0 <= i < len``) byte ``i mod 8`` (little-endian) of the
64-bit word ``splitmix64(value, i div 8)``, where ``splitmix64(v, k) = mix(v + (k + 1) * 0x9E3779B97F4A7C15
mod 2**64)`` and ``mix`` is the SplitMix64 finalizer (``content_bytes`` is the one-row statement of it).
That is, the span holds the SplitMix64 stream seeded with ``value``: cheap to compute, different for
every value, and independent of where the span lands.

Writes are applied a batch at a time (``apply``): the pages a chunk of rows touches are decrypted once,
the rows are written into that plain-text work area in trace order (a later row wins; the loop is in C,
``replay._content``), and the pages are encrypted back once. Page-state changes (TO_SHARED / TO_PRIVATE
rows, or ``set_private``) keep the page's contents (in-place conversion) and re-encrypt or decrypt the
stored bytes.

Bookkeeping per guest page is 5 bytes (an int32 slot index and a shared flag), page contents only for
written pages: a 64 GiB guest with a 1 GiB working set needs 80 MiB + 1 GiB.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa

from replay._content import write_spans

from ..snp import PAGE_SHIFT, PAGE_SIZE, Op
from . import xts
from .keys import vm_memory_key

# Pages one chunk of rows may touch (its work area: 64 MiB of plain text at most, reused between chunks).
CHUNK_PAGES = 16384
# Pages decrypted per call when walking the whole memory (digest).
WALK_PAGES = 4096
_PAGE_MASK = np.uint64(PAGE_SIZE - 1)
_SHIFT = np.uint64(PAGE_SHIFT)


def content_bytes(value: int, offset: int, length: int) -> bytes:
    """Bytes ``offset .. offset + length - 1`` of the content a WRITE with ``value`` puts in its span."""
    out = np.zeros(length, np.uint8)
    write_spans(out, np.zeros(1, np.int64), np.array([length], np.uint64), np.array([value], np.uint64),
                np.array([offset], np.uint64))
    return out.tobytes()


def _last_wins(dest: np.ndarray) -> np.ndarray:
    """Indices into ``dest`` of the last occurrence of each distinct value (the write that stays)."""
    order = np.argsort(dest, kind="stable")
    d = dest[order]
    keep = np.ones(d.size, dtype=bool)
    keep[:-1] = d[:-1] != d[1:]
    return order[keep]


def _split_pieces(gpa, length, op, value, budget):
    """Rows -> pieces of at most ``budget`` bytes (a multiple of 8), each with its offset in its row."""
    n_pieces = ((length + np.uint64(budget - 1)) // np.uint64(budget)).astype(np.int64)
    if (n_pieces <= 1).all():
        return gpa, length, op, value, np.zeros(gpa.size, np.uint64)
    row = np.repeat(np.arange(gpa.size), n_pieces)
    k = (np.arange(row.size) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)).astype(np.uint64)
    off = k * np.uint64(budget)
    plen = np.minimum(length[row] - off, np.uint64(budget))
    return gpa[row] + off, plen, op[row], value[row], off


def _page_spans(gpa: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every gfn covered by the spans ``[gpa, gpa + length)`` in row order, with repeats (int64), and
    how many pages each row spans."""
    first = gpa >> _SHIFT
    npg = (((gpa + length - np.uint64(1)) >> _SHIFT) - first + np.uint64(1)).astype(np.int64)
    base = np.repeat(first.astype(np.int64), npg)
    return base + np.arange(base.size, dtype=np.int64) - np.repeat(np.cumsum(npg) - npg, npg), npg


class HostMemory:
    """One host's DRAM copy of the guest (see the module docstring).

    ``key``: the host's 32-byte XTS key; ``spa_base``: system physical page of gfn 0 on this host (the
    page engine's ``spa_base[host]``); ``shared_ranges``: inclusive ``(first_gfn, last_gfn)`` ranges that
    start shared (all other pages start private), as in the trace metadata.
    """

    def __init__(self, *, npages: int, key: bytes, spa_base: int, shared_ranges=()):
        if npages <= 0 or npages >= 1 << 31:
            raise ValueError(f"npages must be in 1..2**31-1, got {npages}")
        if len(key) != 32 or key[:16] == key[16:]:
            raise ValueError("key must be 32 bytes (two different AES-128 keys)")
        self.npages = int(npages)
        self.key = bytes(key)
        self.spa_base = int(spa_base)
        self._slot = np.full(self.npages, -1, dtype=np.int32)
        self._shared = np.zeros(self.npages, dtype=bool)
        for first, last in shared_ranges:
            self._shared[int(first) : int(last) + 1] = True
        self._arena = np.zeros((0, PAGE_SIZE), dtype=np.uint8)
        self._used = 0
        self._scratch = np.zeros((0, PAGE_SIZE), dtype=np.uint8)

    @classmethod
    def for_host(cls, seed: int, host: int, *, npages: int, spa_base: int, shared_ranges=()) -> "HostMemory":
        """The memory of ``host`` with its per-VM key derived from the scenario ``seed``."""
        return cls(npages=npages, key=vm_memory_key(seed, host), spa_base=spa_base, shared_ranges=shared_ranges)

    # -- addressing and state -------------------------------------------------------------------------

    def spa(self, gfns) -> np.ndarray:
        """System physical page of each gfn on this host (the XTS tweak is its byte address)."""
        return np.asarray(gfns, dtype=np.uint64) + np.uint64(self.spa_base)

    def _check_gfns(self, gfns) -> np.ndarray:
        g = np.atleast_1d(np.asarray(gfns, dtype=np.int64))
        if g.size and (g.min() < 0 or g.max() >= self.npages):
            bad = int(g[(g < 0) | (g >= self.npages)][0])
            raise IndexError(f"gfn {bad} outside the guest (0..{self.npages - 1})")
        return g

    def is_private(self, gfn: int) -> bool:
        return not bool(self._shared[self._check_gfns(gfn)[0]])

    def private_mask(self, gfns) -> np.ndarray:
        return ~self._shared[self._check_gfns(gfns)]

    @property
    def stored_pages(self) -> int:
        """Pages that hold contents (ever written or installed); all others are zero."""
        return int(np.count_nonzero(self._slot >= 0))

    # -- raw storage ----------------------------------------------------------------------------------

    def _slots_for(self, gfns: np.ndarray) -> np.ndarray:
        """Slots of ``gfns`` (distinct), allocating zero-filled DRAM for the ones not stored yet."""
        slots = self._slot[gfns]
        new = slots < 0
        if new.any():
            k = int(np.count_nonzero(new))
            need = self._used + k
            if need > self._arena.shape[0]:
                cap = max(need, 2 * self._arena.shape[0], 64)
                grown = np.zeros((cap, PAGE_SIZE), dtype=np.uint8)
                grown[: self._used] = self._arena[: self._used]
                self._arena = grown
            slots = slots.copy()
            slots[new] = np.arange(self._used, need, dtype=np.int32)
            self._slot[gfns[new]] = slots[new]
            self._used = need
        return slots

    def _work(self, n: int) -> np.ndarray:
        """A reusable ``(n, 4096)`` work area: fresh arrays of this size cost page faults on every chunk."""
        if self._scratch.shape[0] < n:
            self._scratch = np.empty((max(n, 2 * self._scratch.shape[0]), PAGE_SIZE), dtype=np.uint8)
        return self._scratch[:n]

    def _load_plain(self, gfns: np.ndarray, private: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Plain text of distinct ``gfns`` as stored, decrypting the ones whose stored form is private."""
        out = np.empty((gfns.size, PAGE_SIZE), dtype=np.uint8) if out is None else out
        slots = self._slot[gfns]
        have = slots >= 0
        if have.all():
            np.take(self._arena, slots, axis=0, out=out)
        else:
            out[~have] = 0
            out[have] = self._arena[slots[have]]
        dec = have & private
        if dec.all():
            xts.decrypt_pages(self.key, out, self.spa(gfns), out=out)
        elif dec.any():
            out[dec] = xts.decrypt_pages(self.key, out[dec], self.spa(gfns[dec]))
        return out

    def _store_plain(self, gfns: np.ndarray, plain: np.ndarray, private: np.ndarray) -> None:
        """Store plain pages of distinct ``gfns``, encrypting those that are ``private`` (``plain`` is
        overwritten: callers pass a work array they own)."""
        if private.all():
            xts.encrypt_pages(self.key, plain, self.spa(gfns), out=plain)
        elif private.any():
            plain[private] = xts.encrypt_pages(self.key, plain[private], self.spa(gfns[private]))
        slots = self._slots_for(gfns)  # may grow (replace) the arena: index it afterwards
        self._arena[slots] = plain

    def read_raw(self, gfn: int) -> bytes:
        """The page as this host's DRAM holds it: ciphertext if private (a never-written private page is the
        encryption of zeros at its SPA), plain text if shared."""
        g = self._check_gfns(gfn)
        s = self._slot[g[0]]
        page = self._arena[s : s + 1].copy() if s >= 0 else np.zeros((1, PAGE_SIZE), np.uint8)
        if not self._shared[g[0]] and s < 0:
            page = xts.encrypt_pages(self.key, page, self.spa(g))
        return page.tobytes()

    def write_raw(self, gfn: int, data: bytes) -> None:
        """A host writing ``data`` into the page's DRAM as is (no encryption: the host has no key)."""
        g = self._check_gfns(gfn)
        if len(data) != PAGE_SIZE:
            raise ValueError(f"a page is {PAGE_SIZE} bytes, got {len(data)}")
        slot = self._slots_for(g)[0]
        self._arena[slot] = np.frombuffer(data, np.uint8)

    def raw_copy_to(self, other: "HostMemory", gfn: int) -> None:
        """A host copying the page's DRAM bytes to ``other`` (same gfn): useless for a private page, whose
        ciphertext decrypts under another key and SPA to garbage."""
        other.write_raw(gfn, self.read_raw(gfn))

    # -- the guest's view -----------------------------------------------------------------------------

    def read_plain(self, gfn: int) -> bytes:
        """The page as the guest sees it."""
        return self.read_plain_many([gfn])[0].tobytes()

    def read_plain_many(self, gfns) -> np.ndarray:
        """Plain text of each of ``gfns`` (any order, repeats allowed) as an ``(n, 4096)`` array."""
        g = self._check_gfns(gfns)
        uniq, inv = np.unique(g, return_inverse=True)
        plain = self._load_plain(uniq, ~self._shared[uniq])
        return plain if uniq.size == g.size and (uniq == g).all() else plain[inv]

    def install_plain(self, gfns, pages: np.ndarray, private, *, consume: bool = False) -> None:
        """Put guest-visible contents into distinct ``gfns`` with the given attribute (what a migration
        agent does at the target: encrypt under this host's key and SPA, or store plain if shared).
        ``consume``: ``pages`` is a writable work array the caller gives up (encrypted in place)."""
        g = self._check_gfns(gfns)
        if np.unique(g).size != g.size:
            raise ValueError("install_plain: gfns must be distinct")
        pages = np.asarray(pages, dtype=np.uint8).reshape(g.size, PAGE_SIZE)
        priv = np.broadcast_to(np.asarray(private, dtype=bool), g.shape).copy()
        self._shared[g] = ~priv
        self._store_plain(g, pages if consume and pages.flags.writeable else pages.copy(), priv)

    def install_zero(self, gfns, private) -> None:
        """Make distinct ``gfns`` zero pages with the given attribute; pages not stored stay unstored."""
        g = self._check_gfns(gfns)
        priv = np.broadcast_to(np.asarray(private, dtype=bool), g.shape)
        self._shared[g] = ~priv
        stored = self._slot[g] >= 0
        if stored.any():
            self._store_plain(g[stored], np.zeros((int(stored.sum()), PAGE_SIZE), np.uint8), priv[stored].copy())

    def set_private(self, gfns, private: bool) -> None:
        """Page-state change of ``gfns`` keeping their contents (re-encrypts or decrypts stored pages)."""
        g = np.unique(self._check_gfns(gfns))
        change = g[self._shared[g] == private]
        stored = change[self._slot[change] >= 0]
        plain = self._load_plain(stored, ~self._shared[stored])
        self._shared[change] = not private
        self._store_plain(stored, plain, np.full(stored.size, private))

    # -- replaying trace rows -------------------------------------------------------------------------

    def apply_batch(self, batch: pa.RecordBatch) -> None:
        """Apply a trace record batch (columns ``gpa``, ``len``, ``op``, ``value``) in row order."""
        cols = {n: np.asarray(batch.column(n)) for n in ("gpa", "len", "op", "value")}
        self.apply(cols["gpa"], cols["len"], cols["op"], cols["value"])

    def apply(self, gpa, length, op, value) -> None:
        """Apply trace rows in order: WRITE rows write their content, TO_SHARED/TO_PRIVATE rows change the
        state of the pages they span, READ rows do nothing. Rows must lie inside the guest."""
        gpa = np.asarray(gpa, dtype=np.uint64)
        length = np.asarray(length, dtype=np.uint64)
        op = np.asarray(op, dtype=np.uint8)
        value = np.asarray(value, dtype=np.uint64)
        if gpa.size and (length.min() == 0 or int((gpa + length).max()) > self.npages << PAGE_SHIFT
                         or (gpa + length < gpa).any()):
            raise ValueError("apply: every row needs len >= 1 and gpa + len inside the guest")
        keep = op != Op.READ
        if not keep.all():
            gpa, length, op, value = gpa[keep], length[keep], op[keep], value[keep]
        if not gpa.size:
            return
        # Bound the work area (the pages a chunk touches): rows longer than CHUNK_PAGES pages are split
        # into pieces, and pieces are grouped so that a group spans at most ~CHUNK_PAGES pages.
        gpa, length, op, value, offset = _split_pieces(gpa, length, op, value, CHUNK_PAGES * PAGE_SIZE)
        npg = (((gpa + length - np.uint64(1)) >> _SHIFT) - (gpa >> _SHIFT) + np.uint64(1)).astype(np.int64)
        ends = np.cumsum(npg)
        start = 0
        while start < gpa.size:
            base = int(ends[start - 1]) if start else 0
            stop = max(start + 1, int(np.searchsorted(ends, base + CHUNK_PAGES, side="right")))
            sl = slice(start, stop)
            self._apply_chunk(gpa[sl], length[sl], op[sl], value[sl], offset[sl])
            start = stop

    def _apply_chunk(self, gpa, length, op, value, offset) -> None:
        # Contents do not depend on the page state, and the stored form depends only on the final state
        # and contents: so within a chunk the writes and the state changes can be applied separately.
        w = op == Op.WRITE
        psc = ~w
        if psc.any():  # final state of every page a state change spans: the last such row wins
            pg, npg = _page_spans(gpa[psc], length[psc])
            to_private = np.repeat(op[psc] == Op.TO_PRIVATE, npg)
            last = _last_wins(pg)
            psc_gfns, psc_private = pg[last], to_private[last]
        else:
            psc_gfns, psc_private = np.zeros(0, np.int64), np.zeros(0, bool)
        wg, wl, wv, wo = gpa[w], length[w], value[w], offset[w]
        write_gfns = _page_spans(wg, wl)[0] if wg.size else np.zeros(0, np.int64)
        # Pages to rewrite: written ones, and stored ones whose state changes (re-encryption).
        changes = psc_gfns[self._shared[psc_gfns] == psc_private]
        changes = changes[self._slot[changes] >= 0]
        touched = np.union1d(write_gfns, changes)
        plain = self._load_plain(touched, ~self._shared[touched], out=self._work(touched.size))
        if wg.size:
            # ``touched`` is sorted and holds every page of each span, so a span's pages are consecutive
            # rows of the work area: the span is contiguous there, starting at its first page's row.
            row = np.searchsorted(touched, (wg >> _SHIFT).astype(np.int64))
            first = row * PAGE_SIZE + (wg & _PAGE_MASK).astype(np.int64)
            write_spans(plain.reshape(-1), first, wl, wv, wo)
        self._shared[psc_gfns] = ~psc_private
        self._store_plain(touched, plain, ~self._shared[touched])

    # -- digest ---------------------------------------------------------------------------------------

    def plaintext_digest(self) -> str:
        """blake2b-256 (hex) of the guest-visible memory: over the non-zero pages in gfn order, a hash of
        their gfns (little-endian uint64) and a hash of their contents. A page that is all zero counts as
        never written, so the digest does not depend on which zero pages happen to be stored."""
        gfns = np.flatnonzero(self._slot >= 0)
        hg, hp = hashlib.blake2b(digest_size=32), hashlib.blake2b(digest_size=32)
        for i in range(0, gfns.size, WALK_PAGES):
            g = gfns[i : i + WALK_PAGES]
            plain = self._load_plain(g, ~self._shared[g])
            nz = plain.any(axis=1)
            hg.update(g[nz].astype("<u8").tobytes())
            hp.update(plain[nz].tobytes())
        return hashlib.blake2b(hg.digest() + hp.digest(), digest_size=32).hexdigest()


def replay_plaintext_digest(path: str | os.PathLike, *, seed: int = 0, host: int = 0, spa_base: int = 1024) -> str:
    """Replay a whole trace into data-mode memory, batch by batch, and return its plain-text digest.

    This is the no-migration reference of data mode: a migrated run's end-of-trace memory must have the
    same digest. The digest does not depend on ``seed``, ``host`` or ``spa_base`` (only the ciphertext
    does); they are parameters so that a test can show exactly that."""
    from ..trace import open_trace

    with open_trace(path) as tr:
        mem = HostMemory.for_host(seed, host, npages=tr.meta.npages, spa_base=spa_base,
                                  shared_ranges=tr.meta.shared_ranges)
        for _, batch in tr:
            mem.apply_batch(batch)
    return mem.plaintext_digest()
