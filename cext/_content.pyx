# cython: language_level=3
"""Data mode's WRITE contents, written into a work area in C (replay.security.memory calls it).

A WRITE row with ``value`` puts at byte ``i`` of its span byte ``i mod 8`` (little-endian) of the
``i div 8``-th output of SplitMix64 seeded with ``value``; see replay/security/memory.py. Rows are written
in order, so where they overlap the later one wins, as in the trace. Doing this per byte in numpy needs
several index arrays per byte written; here it is a loop in C, a 64-bit word per step where the span
covers whole words, GIL released.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint64_t
from libc.string cimport memcpy

DEF GOLDEN = 0x9E3779B97F4A7C15


cdef inline uint64_t mix(uint64_t z) noexcept nogil:
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)


def write_spans(uint8_t[::1] flat, const int64_t[::1] start, const uint64_t[::1] length,
                const uint64_t[::1] value, const uint64_t[::1] offset):
    """For each piece ``p`` in order: bytes ``offset[p] .. offset[p] + length[p] - 1`` of the content of
    ``value[p]`` go to ``flat[start[p] ...]``."""
    cdef Py_ssize_t n = start.shape[0], p
    cdef Py_ssize_t size = flat.shape[0]
    if length.shape[0] != n or value.shape[0] != n or offset.shape[0] != n:
        raise ValueError("write_spans: start, length, value and offset must have the same length")
    for p in range(n):
        if start[p] < 0 or <uint64_t>start[p] + length[p] > <uint64_t>size:
            raise IndexError(f"write_spans: piece {p} ({start[p]}+{length[p]}) outside the work area of {size} bytes")
    cdef uint8_t *dst
    cdef uint64_t L, i, k, w, v
    cdef int b
    cdef uint16_t probe = 1
    cdef bint little = (<uint8_t *>&probe)[0] == 1  # whole words may be stored as they are
    with nogil:
        for p in range(n):
            dst = &flat[start[p]]
            L = length[p]
            v = value[p]
            k = offset[p] >> 3
            b = <int>(offset[p] & 7)
            i = 0
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
