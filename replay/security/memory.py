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

Like the CPU's caches in front of the memory controller, a host holds recently written private pages
*in clear* (a write-back cache of at most ``cache_pages`` pages): a trace row (``apply``) or the target
agent (``install_plain``) writes plain text straight into the page's DRAM slot, and the page is encrypted
only when its ciphertext is needed: a host reading its DRAM (``read_raw``, ``raw_copy_to``) writes it
back first, and beyond the bound the least recently touched pages are encrypted in batches. A page whose
DRAM holds ciphertext is decrypted into the cache when a row writes it. Nothing observable depends on the
cache: ``read_raw`` is always the XTS ciphertext, ``read_plain`` the plain text, digests the same. Rows are
written in trace order (a later row wins; the loop is in C, ``replay.security._content``). Page-state changes
(TO_SHARED / TO_PRIVATE rows, or ``set_private``) keep the page's contents (in-place conversion): a page
turning shared is held in clear, a page turning private joins the cache.

Bookkeeping per guest page is 5 bytes (an int32 slot index and a shared flag), per stored page 17 more
(its gfn, clear flag and last touch) besides its 4 KiB: a 64 GiB guest with a 1 GiB working set needs
80 MiB + 1 GiB. The slots live in one anonymous mapping reserved for the whole guest (address space only),
so they never move.
"""

from __future__ import annotations

import mmap
import os

import blake3
import numpy as np
import pyarrow as pa

from replay.security._content import apply_writes, gather_pages, scatter_pages, write_spans

from ..model.snp import PAGE_SHIFT, PAGE_SIZE, Op
from . import xts
from .keys import vm_memory_key
from .parallel import halves

# Page pieces one step of ``apply`` handles (bounds its index arrays; rows longer than this are split).
CHUNK_PAGES = 16384
# Private pages a host holds in clear at most (the write-back cache, 256 MiB: a large server's last-level
# cache, and no memory of its own since pages are held in clear in their own slots): beyond it the least
# recently touched are encrypted back into DRAM.
CACHE_PAGES = 65536
# Pages decrypted or encrypted per call when walking many pages (digest, write-back).
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


def nonzero_pages(pages: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Which rows (all, or ``rows``) of a C-contiguous ``(n, 4096)`` uint8 array are not all zero. Almost
    every written page has a non-zero first word, so only the others are scanned whole."""
    words = pages.view(np.uint64)
    rows = np.arange(words.shape[0]) if rows is None else rows
    nz = words[rows, 0] != 0
    rest = np.flatnonzero(~nz)
    if rest.size:
        nz[rest] = words[rows[rest]].any(axis=1)
    return nz


def all_distinct(a: np.ndarray) -> bool:
    """Whether no value of ``a`` repeats (a sorted batch, the usual case, is answered without sorting)."""
    return a.size <= 1 or bool((a[1:] > a[:-1]).all()) or np.unique(a).size == a.size


def _distinct(a: np.ndarray) -> np.ndarray:
    """The distinct values of ``a``, sorted (np.unique's hash table costs more on the small arrays here)."""
    u = np.sort(a)
    if u.size < 2:
        return u
    keep = np.empty(u.size, dtype=bool)
    keep[0] = True
    np.not_equal(u[1:], u[:-1], out=keep[1:])
    return u[keep]


def _dram(pages: int) -> np.ndarray:
    """A zeroed ``(pages, 4096)`` array on its own anonymous private mapping: untouched pages cost no
    memory. Slots are handed out in order from the first, so the used part is dense whatever the guest's
    layout, and transparent huge pages are asked for where the system has them: a 2 MiB page then backs
    512 slots at once, at most one of them beyond the slots in use. (The quickstart's data-mode run takes
    ~16,600 page faults instead of ~147,000: ~0.2 s of its ~1.3 s.)"""
    if not pages:
        return np.zeros((0, PAGE_SIZE), dtype=np.uint8)
    region = mmap.mmap(-1, pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no transparent huge pages here: 4 KiB pages, only slower
        pass
    return np.frombuffer(region, dtype=np.uint8).reshape(pages, PAGE_SIZE)


def page_spans(gpa: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every page each row ``(gpa, length)`` spans, in row order: (the row's index, the gfn), int64."""
    first = (gpa >> _SHIFT).astype(np.int64)
    npg = ((gpa + length.astype(np.uint64) - np.uint64(1)) >> _SHIFT).astype(np.int64) - first + 1
    if npg.size == 0 or npg.max() == 1:
        return np.arange(gpa.size, dtype=np.int64), first
    row = np.repeat(np.arange(gpa.size, dtype=np.int64), npg)
    return row, first[row] + np.arange(row.size, dtype=np.int64) - np.repeat(np.cumsum(npg) - npg, npg)


def _by_page(gpa, length, op, value, offset):
    """Pieces -> one piece per page they span, in order: (gfn int64, byte in the page int64, length,
    op, value, offset in the row)."""
    row, gfn = page_spans(gpa, length)
    if row.size == gpa.size:  # each piece within one page
        return gfn, (gpa & _PAGE_MASK).astype(np.int64), length, op, value, offset
    page = gfn.astype(np.uint64) << _SHIFT
    lo = np.maximum(gpa[row], page)
    hi = np.minimum(gpa[row] + length[row], page + np.uint64(PAGE_SIZE))
    return gfn, (lo & _PAGE_MASK).astype(np.int64), hi - lo, op[row], value[row], offset[row] + (lo - gpa[row])


class HostMemory:
    """One host's DRAM copy of the guest (see the module docstring).

    ``key``: the host's 32-byte XTS key; ``spa_base``: system physical page of gfn 0 on this host (the
    page engine's ``spa_base[host]``); ``shared_ranges``: inclusive ``(first_gfn, last_gfn)`` ranges that
    start shared (all other pages start private), as in the trace metadata; ``cache_pages``: how many
    private pages may be held in clear (the write-back cache; 0: every private page is encrypted at once).
    """

    def __init__(self, *, npages: int, key: bytes, spa_base: int, shared_ranges=(), cache_pages: int | None = None):
        if npages <= 0 or npages >= 1 << 31:
            raise ValueError(f"npages must be in 1..2**31-1, got {npages}")
        if len(key) != 32 or key[:16] == key[16:]:
            raise ValueError("key must be 32 bytes (two different AES-128 keys)")
        self.npages = int(npages)
        self.key = bytes(key)
        self.spa_base = int(spa_base)
        self.cache_pages = CACHE_PAGES if cache_pages is None else int(cache_pages)
        if self.cache_pages < 0:
            raise ValueError(f"cache_pages must be >= 0, got {self.cache_pages}")
        self._slot = np.full(self.npages, -1, dtype=np.int32)
        self._shared = np.zeros(self.npages, dtype=bool)
        for first, last in shared_ranges:
            self._shared[int(first) : int(last) + 1] = True
        # Per slot: the page's contents, its gfn, whether they are held in clear (always, for a shared
        # page), and when it was last touched (the eviction order).
        try:  # room for every page at once (address space only): slots never move
            self._arena = _dram(self.npages)
        except (OSError, ValueError, OverflowError):  # the system refuses to reserve it: grow by doubling
            self._arena = _dram(0)
        cap = self._arena.shape[0]
        self._owner = np.zeros(cap, dtype=np.int64)
        self._clear = np.zeros(cap, dtype=bool)
        self._stamp = np.zeros(cap, dtype=np.int64)
        self._used = 0
        self._tick = 0
        self._maybe_cached = 0  # an upper bound of the private pages in clear (exact after each eviction)
        self._generation = 0  # bumped by every change of the guest-visible contents (digest memo)
        self._digest: tuple[int, str] | None = None
        self._scratch = np.zeros((0, PAGE_SIZE), dtype=np.uint8)

    @classmethod
    def for_host(cls, seed: int, host: int, *, npages: int, spa_base: int, shared_ranges=(),
                 cache_pages: int | None = None) -> "HostMemory":
        """The memory of ``host`` with its per-VM key derived from the scenario ``seed``."""
        return cls(npages=npages, key=vm_memory_key(seed, host), spa_base=spa_base, shared_ranges=shared_ranges,
                   cache_pages=cache_pages)

    # -- addressing and state -------------------------------------------------------------------------

    def spa(self, gfns) -> np.ndarray:
        """System physical page of each gfn on this host (the XTS tweak is its byte address)."""
        return np.asarray(gfns, dtype=np.uint64) + np.uint64(self.spa_base)

    def check_gfns(self, gfns) -> np.ndarray:
        """``gfns`` as int64 (at least 1-d); IndexError for one outside the guest."""
        g = np.atleast_1d(np.asarray(gfns, dtype=np.int64))
        if g.size and (g.min() < 0 or g.max() >= self.npages):
            bad = int(g[(g < 0) | (g >= self.npages)][0])
            raise IndexError(f"gfn {bad} outside the guest (0..{self.npages - 1})")
        return g

    def is_private(self, gfn: int) -> bool:
        return not bool(self._shared[self.check_gfns(gfn)[0]])

    def private_mask(self, gfns) -> np.ndarray:
        return ~self._shared[self.check_gfns(gfns)]

    @property
    def stored_pages(self) -> int:
        """Pages that hold contents (ever written or installed); all others are zero."""
        return int(np.count_nonzero(self._slot >= 0))

    @property
    def cached_pages(self) -> int:
        """Private pages whose DRAM ciphertext is not written yet (held in clear, at most ``cache_pages``)."""
        used = self._used
        return int(np.count_nonzero(self._clear[:used] & ~self._shared[self._owner[:used]]))

    # -- raw storage and the write-back cache ---------------------------------------------------------

    def _slots_for(self, gfns: np.ndarray) -> np.ndarray:
        """Slots of ``gfns`` (distinct), allocating zero-filled pages (zeros in clear) for the ones not
        stored yet."""
        slots = self._slot[gfns]
        new = slots < 0
        if new.any():
            k = int(np.count_nonzero(new))
            need = self._used + k
            if need > self._arena.shape[0]:
                cap = min(max(need, 2 * self._arena.shape[0], 64), self.npages)
                grown = _dram(cap)
                grown[: self._used] = self._arena[: self._used]
                self._arena = grown
                for name in ("_owner", "_clear", "_stamp"):
                    old = getattr(self, name)
                    arr = np.zeros(cap, dtype=old.dtype)
                    arr[: self._used] = old[: self._used]
                    setattr(self, name, arr)
            slots = slots.copy()
            slots[new] = np.arange(self._used, need, dtype=np.int32)
            self._slot[gfns[new]] = slots[new]
            self._owner[self._used : need] = gfns[new]
            self._clear[self._used : need] = True
            self._used = need
        return slots

    def _work(self, n: int) -> np.ndarray:
        """A reusable ``(n, 4096)`` work area: fresh arrays of this size cost page faults on every call."""
        if self._scratch.shape[0] < n:
            self._scratch = np.empty((max(n, 2 * self._scratch.shape[0]), PAGE_SIZE), dtype=np.uint8)
        return self._scratch[:n]

    def _crypt_slots(self, slots: np.ndarray, encrypt: bool) -> None:
        """Encrypt (write back) or decrypt (load into the cache) the pages of ``slots`` in place."""
        for i in range(0, slots.size, WALK_PAGES):
            s = slots[i : i + WALK_PAGES]
            work = self._work(s.size)
            np.take(self._arena, s, axis=0, out=work, mode="clip")  # "raise" would buffer the output
            spa = self.spa(self._owner[s])
            (xts.encrypt_pages if encrypt else xts.decrypt_pages)(self.key, work, spa, out=work)
            self._arena[s] = work
            self._clear[s] = not encrypt

    def _make_clear(self, slots: np.ndarray) -> None:
        """Hold the pages of ``slots`` in clear (decrypting those that are not)."""
        enc = slots[~self._clear[slots]]
        if enc.size:
            self._crypt_slots(enc, encrypt=False)

    def _touched(self, slots: np.ndarray) -> None:
        """``slots`` were just used (and may have become private pages in clear): evict if over the bound."""
        self._tick += 1
        self._stamp[slots] = self._tick
        self._maybe_cached += slots.size
        self._bound_cache()

    def _bound_cache(self) -> None:
        """Write the least recently touched private pages back if more than ``cache_pages`` may be in clear."""
        if self._maybe_cached > self.cache_pages:
            used = self._used
            cached = np.flatnonzero(self._clear[:used] & ~self._shared[self._owner[:used]])
            keep = min(cached.size, self.cache_pages - self.cache_pages // 4)  # evict to 3/4: amortizes the scan
            if cached.size > self.cache_pages:
                k = cached.size - keep
                old = cached[np.argpartition(self._stamp[cached], k - 1)[:k]] if k < cached.size else cached
                self._crypt_slots(np.sort(old), encrypt=True)
            # Exactly the pages now in clear: below the bound nothing was evicted, and the count stays.
            self._maybe_cached = keep if cached.size > self.cache_pages else cached.size

    def _load_plain(self, gfns: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Plain text of distinct ``gfns`` (a copy: the cache is not changed), decrypting the ones whose
        DRAM holds ciphertext."""
        out = np.empty((gfns.size, PAGE_SIZE), dtype=np.uint8) if out is None else out
        slots = self._slot[gfns]
        have = slots >= 0
        if have.all():
            np.take(self._arena, slots, axis=0, out=out, mode="clip")  # slots are valid; "raise" buffers
            dec = ~self._clear[slots]
        else:
            out[~have] = 0
            out[have] = self._arena[slots[have]]
            dec = np.zeros(gfns.size, dtype=bool)
            dec[have] = ~self._clear[slots[have]]
        if dec.all():
            xts.decrypt_pages(self.key, out, self.spa(gfns), out=out)
        elif dec.any():
            out[dec] = xts.decrypt_pages(self.key, out[dec], self.spa(gfns[dec]))
        return out

    def read_raw(self, gfn: int) -> bytes:
        """The page as this host's DRAM holds it: ciphertext if private (a never-written private page is the
        encryption of zeros at its SPA), plain text if shared. A private page held in clear is written
        back first (a host reads DRAM, not the cache)."""
        g = self.check_gfns(gfn)
        s = self._slot[g[0]]
        if s < 0:
            page = np.zeros((1, PAGE_SIZE), np.uint8)
            return (page if self._shared[g[0]] else xts.encrypt_pages(self.key, page, self.spa(g))).tobytes()
        if self._clear[s] and not self._shared[g[0]]:
            self._crypt_slots(np.array([s], dtype=np.int32), encrypt=True)
        return self._arena[s].tobytes()

    def write_raw(self, gfn: int, data: bytes) -> None:
        """A host writing ``data`` into the page's DRAM as is (no encryption: the host has no key)."""
        g = self.check_gfns(gfn)
        if len(data) != PAGE_SIZE:
            raise ValueError(f"a page is {PAGE_SIZE} bytes, got {len(data)}")
        slot = self._slots_for(g)[0]
        self._arena[slot] = np.frombuffer(data, np.uint8)
        self._clear[slot] = self._shared[g[0]]  # a private page's DRAM now holds these bytes as ciphertext
        self._generation += 1

    def raw_copy_to(self, other: "HostMemory", gfn: int) -> None:
        """A host copying the page's DRAM bytes to ``other`` (same gfn): useless for a private page, whose
        ciphertext decrypts under another key and SPA to garbage."""
        other.write_raw(gfn, self.read_raw(gfn))

    # -- the guest's view -----------------------------------------------------------------------------

    def read_plain(self, gfn: int) -> bytes:
        """The page as the guest sees it."""
        return self.read_plain_many([gfn])[0].tobytes()

    def read_plain_many(self, gfns, out: np.ndarray | None = None) -> np.ndarray:
        """Plain text of each of ``gfns`` (any order, repeats allowed) as an ``(n, 4096)`` array (``out``:
        an array of at least n rows to fill and return a view of: a caller reading batch after batch
        reuses it instead of faulting in fresh memory every time)."""
        g = self.check_gfns(gfns)
        dest = None if out is None else out[: g.size]
        if dest is not None and gather_pages(self._arena, self._slot, self._clear.view(np.uint8), g, dest):
            return dest  # every page stored and in clear (the usual case): copied in one call
        if g.size <= 1 or (g[1:] > g[:-1]).all():  # distinct already (the usual case: a sorted batch)
            return self._load_plain(g, out=dest)
        uniq, inv = np.unique(g, return_inverse=True)
        plain = self._load_plain(uniq)
        if uniq.size == g.size and (uniq == g).all():
            return plain
        if dest is None:
            return plain[inv]
        np.take(plain, inv, axis=0, out=dest, mode="clip")
        return dest

    def plain_rows(self, gfns) -> tuple[np.ndarray, np.ndarray]:
        """Where the plain text of each of ``gfns`` lies now, to be read in place rather than copied:
        ``(pages, rows)``, ``pages`` an ``(m, 4096)`` array and ``rows[i]`` the row of ``gfns[i]`` in it, or
        -1 for a page never stored (zero) and -2 for one whose DRAM holds ciphertext (``read_plain_many``
        decrypts it). Valid until the memory next changes."""
        g = self.check_gfns(gfns)
        slots = self._slot[g].astype(np.int64)
        rows = np.where(slots >= 0, slots, -1)
        rows[(slots >= 0) & ~self._clear[np.maximum(slots, 0)]] = -2
        return self._arena, rows

    def install_plain(self, gfns, pages: np.ndarray, private) -> None:
        """Put guest-visible contents into distinct ``gfns`` with the given attribute (what a migration
        agent does at the target: encrypt under this host's key and SPA, or store plain if shared). The
        private pages enter the write-back cache."""
        g = self.check_gfns(gfns)
        if not all_distinct(g):
            raise ValueError("install_plain: gfns must be distinct")
        pages = np.ascontiguousarray(pages, dtype=np.uint8).reshape(g.size, PAGE_SIZE)
        priv = np.broadcast_to(np.asarray(private, dtype=bool), g.shape)
        self._shared[g] = ~priv
        slots = self._slots_for(g)
        halves(g.size, lambda lo, hi: scatter_pages(pages[lo:hi], slots[lo:hi], self._arena))
        self._clear[slots] = True
        self._generation += 1
        self._touched(slots)

    def install_zero(self, gfns, private) -> None:
        """Make distinct ``gfns`` zero pages with the given attribute; pages not stored stay unstored."""
        g = self.check_gfns(gfns)
        priv = np.broadcast_to(np.asarray(private, dtype=bool), g.shape)
        self._shared[g] = ~priv
        slots = self._slot[g]
        slots = slots[slots >= 0]
        self._generation += 1
        if slots.size:
            self._arena[slots] = 0
            self._clear[slots] = True
            self._touched(slots)

    def set_private(self, gfns, private: bool) -> None:
        """Page-state change of ``gfns`` keeping their contents (stored pages are re-encrypted or decrypted:
        in clear, and encrypted when written back)."""
        g = np.unique(self.check_gfns(gfns))
        change = g[self._shared[g] == private]
        slots = self._slot[change]
        slots = slots[slots >= 0]
        self._make_clear(slots)
        self._shared[change] = not private
        self._generation += 1
        if private and slots.size:
            self._touched(slots)

    # -- replaying trace rows -------------------------------------------------------------------------

    def apply_batch(self, batch: pa.RecordBatch) -> None:
        """Apply a trace record batch (columns ``gpa``, ``len``, ``op``, ``value``) in row order."""
        cols = {n: np.asarray(batch.column(n)) for n in ("gpa", "len", "op", "value")}
        self.apply(cols["gpa"], cols["len"], cols["op"], cols["value"])

    def apply(self, gpa, length, op, value) -> None:
        """Apply trace rows in order: WRITE rows write their content, TO_SHARED/TO_PRIVATE rows change the
        state of the pages they span, READ rows do nothing. Rows must lie inside the guest."""
        gpa = np.ascontiguousarray(gpa, dtype=np.uint64)
        length = np.ascontiguousarray(length, dtype=np.uint64)
        op = np.ascontiguousarray(op, dtype=np.uint8)
        value = np.ascontiguousarray(value, dtype=np.uint64)
        # The common case in one C call: only WRITEs (and READs) of pages stored and in clear.
        fresh = apply_writes(self._arena, self._slot, self._clear.view(np.uint8), self._stamp, self._tick + 1,
                             gpa, length, op, value)
        if fresh >= 0:
            if fresh:  # pages already in clear written again: their recency changes, not how many are in clear
                self._generation += 1
                self._tick += 1
            return
        if gpa.size and (length.min() == 0 or int((gpa + length).max()) > self.npages << PAGE_SHIFT
                         or (gpa + length < gpa).any()):
            raise ValueError("apply: every row needs len >= 1 and gpa + len inside the guest")
        keep = op != Op.READ
        if not keep.all():
            gpa, length, op, value = gpa[keep], length[keep], op[keep], value[keep]
        if not gpa.size:
            return
        self._generation += 1
        # Bound the index arrays: rows longer than CHUNK_PAGES pages are split into pieces, and pieces are
        # grouped so that a group spans at most ~CHUNK_PAGES pages.
        gpa, length, op, value, offset = _split_pieces(gpa, length, op, value, CHUNK_PAGES * PAGE_SIZE)
        npg = (((gpa + length - np.uint64(1)) >> _SHIFT) - (gpa >> _SHIFT) + np.uint64(1)).astype(np.int64)
        ends = np.cumsum(npg)
        if ends[-1] <= CHUNK_PAGES:
            self._apply_chunk(gpa, length, op, value, offset)
            return
        start = 0
        while start < gpa.size:
            base = int(ends[start - 1]) if start else 0
            stop = max(start + 1, int(np.searchsorted(ends, base + CHUNK_PAGES, side="right")))
            sl = slice(start, stop)
            self._apply_chunk(gpa[sl], length[sl], op[sl], value[sl], offset[sl])
            start = stop

    def _apply_chunk(self, gpa, length, op, value, offset) -> None:
        # Contents do not depend on the page state, so the writes and the state changes of a chunk can be
        # applied separately. Writes go straight into the pages' DRAM slots, which hold them in clear (the
        # cache): only pages whose DRAM holds ciphertext are decrypted first.
        gfn, at, plen, op, value, offset = _by_page(gpa, length, op, value, offset)
        w = op == Op.WRITE
        if w.all():
            psc = None
        else:
            psc = ~w
            gfn_w, at, plen, value, offset = gfn[w], at[w], plen[w], value[w], offset[w]
            pg, to_private = gfn[psc], op[psc] == Op.TO_PRIVATE
            last = _last_wins(pg)  # final state of every page a state change spans: the last such row wins
            psc_gfns, psc_private = pg[last], to_private[last]
            gfn = gfn_w
        touched = np.zeros(0, np.int32)
        if gfn.size:
            slots = self._slots_for(_distinct(gfn))
            self._make_clear(slots)
            start = self._slot[gfn].astype(np.int64) * PAGE_SIZE + at
            write_spans(self._arena.reshape(-1), start, plen, value, offset)
            touched = slots
        if psc is not None:
            s = self._slot[psc_gfns]
            stored = s >= 0
            self._make_clear(s[stored & ~psc_private])  # turning (or staying) shared: held in clear
            self._shared[psc_gfns] = ~psc_private
            touched = np.concatenate([touched, s[stored & psc_private]])
        if touched.size:
            self._touched(touched)

    # -- digest ---------------------------------------------------------------------------------------

    def plaintext_digest(self) -> str:
        """BLAKE3-256 (hex) of the guest-visible memory: over the non-zero pages in gfn order, a hash of
        their gfns (little-endian uint64) and a hash of their contents. A page that is all zero counts as
        never written, so the digest does not depend on which zero pages happen to be stored. Remembered
        until the contents change. (BLAKE3 because a run takes this digest of the whole guest three times:
        it hashes ~7.6 GB/s on one core here, blake2b ~1.4.)"""
        if self._digest is not None and self._digest[0] == self._generation:
            return self._digest[1]
        gfns = np.flatnonzero(self._slot >= 0)
        hg, hp = blake3.blake3(), blake3.blake3(max_threads=blake3.blake3.AUTO)  # same digest, any threads
        for i in range(0, gfns.size, WALK_PAGES):
            g = gfns[i : i + WALK_PAGES]
            s = self._slot[g]
            if s[-1] - s[0] == g.size - 1 and (s[1:] > s[:-1]).all() and self._clear[s[0] : s[-1] + 1].all():
                plain = self._arena[s[0] : s[-1] + 1]  # in gfn order and in clear already (pages written in order)
            else:
                plain = self._load_plain(g, out=self._work(g.size))
            nz = nonzero_pages(plain)
            if nz.all():  # hashed where it lies: no copy
                hg.update(g.astype("<u8").view(np.uint8))
                hp.update(plain)
            else:
                hg.update(g[nz].astype("<u8").view(np.uint8))
                hp.update(plain[nz])
        digest = blake3.blake3(hg.digest() + hp.digest()).hexdigest()
        self._digest = (self._generation, digest)
        return digest


def replay_plaintext_digest(path: str | os.PathLike, *, seed: int = 0, host: int = 0, spa_base: int = 1024) -> str:
    """Replay a whole trace into data-mode memory, batch by batch, and return its plain-text digest.

    This is the no-migration reference of data mode: a migrated run's end-of-trace memory must have the
    same digest. The digest does not depend on ``seed``, ``host`` or ``spa_base`` (only the ciphertext
    does); they are parameters so that a test can show exactly that."""
    from ..traces.format import open_trace

    with open_trace(path) as tr:
        mem = HostMemory.for_host(seed, host, npages=tr.meta.npages, spa_base=spa_base,
                                  shared_ranges=tr.meta.shared_ranges)
        for _, batch in tr:
            mem.apply_batch(batch)
    return mem.plaintext_digest()
