# cython: language_level=3
"""Data mode's WRITE contents, written into guest memory in C (replay.security.memory calls it).

A WRITE row with ``value`` puts at byte ``i`` of its span byte ``i mod 8`` (little-endian) of the
``i div 8``-th output of SplitMix64 seeded with ``value``; see replay/security/memory.py. Rows are written
in order, so where they overlap the later one wins, as in the trace. Doing this per byte in numpy needs
several index arrays per byte written; here it is a loop in C, a 64-bit word per step where the span
covers whole words, GIL released.

``apply_writes``, ``gather_pages`` and ``scatter_pages`` are ``HostMemory``'s common cases done in one call
each: trace rows that only write pages already stored and held in clear, reading pages that are, and
installing pages into their slots. They decline (and
change nothing) when anything else is needed, and the memory then takes its general path in numpy.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint64_t
from libc.string cimport memcpy

DEF GOLDEN = 0x9E3779B97F4A7C15
DEF PAGE_SHIFT = 12
DEF PAGE_SIZE = 4096
DEF PAGE_MASK = 4095
# replay.model.snp.Op (tests/test_security_memory.py checks they agree)
DEF OP_WRITE = 0
DEF OP_READ = 1
OPS = {"WRITE": OP_WRITE, "READ": OP_READ}


cdef inline uint64_t mix(uint64_t z) noexcept nogil:
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)


cdef void write_piece(uint8_t *dst, uint64_t L, uint64_t v, uint64_t offset) noexcept nogil:
    """Bytes ``offset .. offset + L - 1`` of the content of ``value`` ``v`` to ``dst[0 .. L - 1]``."""
    cdef uint64_t i = 0, w, k = offset >> 3
    cdef int b = <int>(offset & 7)
    cdef uint16_t probe = 1
    cdef bint little = (<uint8_t *>&probe)[0] == 1  # whole words may be stored as they are
    while i < L:
        w = mix(v + (k + 1) * <uint64_t>GOLDEN)
        if b == 0 and little and L - i >= 8:  # a whole word (most of a long span): one store
            memcpy(&dst[i], &w, 8)
            i += 8
        else:
            w >>= 8 * b
            while b < 8 and i < L:
                dst[i] = <uint8_t>(w & 0xFF)
                w >>= 8
                b += 1
                i += 1
            b = 0
        k += 1


def write_spans(uint8_t[::1] flat, const int64_t[::1] start, const uint64_t[::1] length,
                const uint64_t[::1] value, const uint64_t[::1] offset):
    """For each piece ``p`` in order: bytes ``offset[p] .. offset[p] + length[p] - 1`` of the content of
    ``value[p]`` go to ``flat[start[p] ...]``."""
    cdef Py_ssize_t n = start.shape[0], p
    cdef Py_ssize_t size = flat.shape[0]
    if length.shape[0] != n or value.shape[0] != n or offset.shape[0] != n:
        raise ValueError("write_spans: start, length, value and offset must have the same length")
    for p in range(n):
        if start[p] < 0 or start[p] > size or length[p] > <uint64_t>(size - start[p]):  # no wrap-around
            raise IndexError(f"write_spans: piece {p} ({start[p]}+{length[p]}) outside the work area of {size} bytes")
    with nogil:
        for p in range(n):
            write_piece(&flat[start[p]], length[p], value[p], offset[p])


cdef int64_t apply_writes_c(uint8_t *arena, int64_t nslots, const int32_t *slot, int64_t npages, const uint8_t *clear,
                            int64_t *stamp, int64_t tick, const uint64_t *gpa, const uint64_t *length,
                            const uint8_t *op, const uint64_t *value, Py_ssize_t n) noexcept nogil:
    """Rows ``0 .. n - 1`` in order, if every one is a READ (skipped) or a WRITE inside the guest whose pages
    are all stored and in clear: write them, stamp each page's slot with ``tick`` and return how many
    distinct slots that stamped. Otherwise return -1 having changed nothing."""
    cdef Py_ssize_t r
    cdef uint64_t end, g, first, last, lo, hi, limit = <uint64_t>npages << PAGE_SHIFT
    cdef int32_t s
    for r in range(n):  # check everything first: declining must leave the memory as it was
        if op[r] == OP_READ:
            continue
        end = gpa[r] + length[r]
        if op[r] != OP_WRITE or length[r] == 0 or end < gpa[r] or end > limit:
            return -1
        for g in range(gpa[r] >> PAGE_SHIFT, ((end - 1) >> PAGE_SHIFT) + 1):
            s = slot[g]
            if s < 0 or s >= nslots or not clear[s]:
                return -1
    cdef int64_t fresh = 0
    for r in range(n):
        if op[r] != OP_WRITE:
            continue
        end = gpa[r] + length[r]
        first = gpa[r] >> PAGE_SHIFT
        last = (end - 1) >> PAGE_SHIFT
        for g in range(first, last + 1):
            lo = gpa[r] if g == first else g << PAGE_SHIFT
            hi = end if g == last else (g + 1) << PAGE_SHIFT
            s = slot[g]
            write_piece(arena + (<int64_t>s << PAGE_SHIFT) + (lo & PAGE_MASK), hi - lo, value[r], lo - gpa[r])
            if stamp[s] != tick:
                stamp[s] = tick
                fresh += 1
    return fresh


def apply_writes(uint8_t[:, ::1] arena, const int32_t[::1] slot, const uint8_t[::1] clear, int64_t[::1] stamp,
                 int64_t tick, const uint64_t[::1] gpa, const uint64_t[::1] length, const uint8_t[::1] op,
                 const uint64_t[::1] value):
    """``apply_writes_c`` over a memory's arrays (``arena``: one row per slot; ``slot`` per gfn; ``clear``
    and ``stamp`` per slot): the distinct slots written, or -1 (declined, nothing changed)."""
    cdef Py_ssize_t n = gpa.shape[0]
    if length.shape[0] != n or op.shape[0] != n or value.shape[0] != n:
        raise ValueError("apply_writes: gpa, length, op and value must have the same length")
    if arena.shape[1] != PAGE_SIZE or clear.shape[0] < arena.shape[0] or stamp.shape[0] < arena.shape[0]:
        raise ValueError("apply_writes: arena (slots, 4096) with clear and stamp per slot")
    if n == 0:
        return 0
    cdef int64_t fresh
    with nogil:
        fresh = apply_writes_c(&arena[0, 0] if arena.shape[0] else NULL, arena.shape[0], &slot[0], slot.shape[0], &clear[0],
                               &stamp[0], tick, &gpa[0], &length[0], &op[0], &value[0], n)
    return fresh


def gather_pages(const uint8_t[:, ::1] arena, const int32_t[::1] slot, const uint8_t[::1] clear,
                 const int64_t[::1] gfns, uint8_t[:, ::1] out):
    """Copy the pages of ``gfns`` to ``out`` (row by row) if every one is stored and in clear and inside the
    guest: True; otherwise False, with ``out`` unspecified."""
    cdef Py_ssize_t n = gfns.shape[0], i
    cdef int64_t g
    cdef int32_t s
    if out.shape[0] < n or out.shape[1] != PAGE_SIZE or arena.shape[1] != PAGE_SIZE:
        raise ValueError("gather_pages: out must hold (len(gfns), 4096)")
    for i in range(n):
        g = gfns[i]
        if g < 0 or g >= slot.shape[0]:
            return False
        s = slot[g]
        if s < 0 or s >= arena.shape[0] or not clear[s]:
            return False
    with nogil:
        for i in range(n):
            memcpy(&out[i, 0], &arena[slot[gfns[i]], 0], PAGE_SIZE)
    return True


def scatter_pages(const uint8_t[:, ::1] pages, const int32_t[::1] slots, uint8_t[:, ::1] arena):
    """Copy row ``i`` of ``pages`` to row ``slots[i]`` of ``arena``, GIL released."""
    cdef Py_ssize_t n = slots.shape[0], i
    if pages.shape[0] != n or pages.shape[1] != PAGE_SIZE or arena.shape[1] != PAGE_SIZE:
        raise ValueError("scatter_pages: pages (len(slots), 4096) and arena (slots, 4096)")
    for i in range(n):
        if slots[i] < 0 or slots[i] >= arena.shape[0]:
            raise IndexError(f"scatter_pages: slot {slots[i]} outside the arena of {arena.shape[0]}")
    with nogil:
        for i in range(n):
            memcpy(&arena[slots[i], 0], &pages[i, 0], PAGE_SIZE)
