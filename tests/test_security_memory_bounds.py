"""Data-mode memory's argument limits and the write-back cache's bound at its exact ends
(replay/security/memory.py).

A guest of 0 pages, a key that is not 32 bytes, a negative cache bound, a gfn one outside either end and a
raw page one byte off are refused with messages naming the value; a row ending on the guest's last byte
is applied and one byte further is not; the cache holds exactly ``cache_pages`` private pages without
evicting and cuts to ``cache_pages - cache_pages // 4`` (least recent first) one page past it; shared
pages never count against it.
"""

from __future__ import annotations

import numpy as np
import pytest

from replay.security.memory import CACHE_PAGES, HostMemory, all_distinct, nonzero_pages

PAGE = 4096
KEY = bytes(range(32))


def mem(npages=16, cache=None, shared=()):
    return HostMemory(npages=npages, key=KEY, spa_base=100, shared_ranges=shared, cache_pages=cache)


def write(m, gfn, value=1, ln=8):
    m.apply(np.array([gfn * PAGE], np.uint64), np.array([ln], np.uint64), np.zeros(1, np.uint8),
            np.array([value], np.uint64))


def clear_gfns(m) -> set[int]:
    return {int(m._owner[s]) for s in np.flatnonzero(m._clear[: m._used]) if not m._shared[m._owner[s]]}


@pytest.mark.parametrize("npages", [0, -1])
def test_a_guest_needs_at_least_one_page(npages):
    with pytest.raises(ValueError, match=f"^npages must be in 1..2\\*\\*31-1, got {npages}$"):
        mem(npages)
    assert mem(1).npages == 1


@pytest.mark.parametrize("key", [bytes(range(31)), bytes(range(33))])
def test_the_key_is_32_bytes(key):
    with pytest.raises(ValueError, match=r"^key must be 32 bytes \(two different AES-128 keys\)$"):
        HostMemory(npages=2, key=key, spa_base=0)


def test_the_cache_bound_is_at_least_zero_and_defaults_to_65536_pages():
    with pytest.raises(ValueError, match="^cache_pages must be >= 0, got -1$"):
        mem(cache=-1)
    assert mem(cache=0).cache_pages == 0 and mem().cache_pages == CACHE_PAGES == 65536


def test_gfns_one_outside_either_end_are_refused_by_the_first_bad_one():
    m = mem(npages=8)
    assert m.check_gfns([0, 7]).tolist() == [0, 7]
    with pytest.raises(IndexError, match=r"^gfn -1 outside the guest \(0\.\.7\)$"):
        m.check_gfns([3, -1, 8])
    with pytest.raises(IndexError, match=r"^gfn 8 outside the guest \(0\.\.7\)$"):
        m.check_gfns([3, 8, -1])
    assert m.check_gfns([]).size == 0


@pytest.mark.parametrize("size", [PAGE - 1, PAGE + 1])
def test_a_raw_page_is_4096_bytes(size):
    with pytest.raises(ValueError, match=f"^a page is 4096 bytes, got {size}$"):
        mem().write_raw(1, bytes(size))


def test_a_row_ending_on_the_guests_last_byte_is_applied_one_further_is_not():
    m = mem(npages=4)
    m.apply(np.array([3 * PAGE + 100], np.uint64), np.array([PAGE - 100], np.uint64), np.zeros(1, np.uint8),
            np.array([5], np.uint64))
    assert m.read_plain(3)[100:108] != bytes(8) and m.read_plain(3)[:100] == bytes(100)
    m2 = mem(npages=4)
    write(m2, 0)  # a stored page, so that the next row is not taken by the one-call path
    with pytest.raises(ValueError, match="gpa \\+ len inside the guest"):
        m2.apply(np.array([3 * PAGE + 100], np.uint64), np.array([PAGE - 99], np.uint64), np.zeros(1, np.uint8),
                 np.array([5], np.uint64))
    with pytest.raises(ValueError, match="gpa \\+ len inside the guest"):  # wraps around 2^64
        m2.apply(np.array([(1 << 64) - 8], np.uint64), np.array([16], np.uint64), np.zeros(1, np.uint8),
                 np.array([5], np.uint64))


def test_the_cache_holds_exactly_its_bound_and_cuts_to_three_quarters_one_past_it():
    m = mem(npages=16, cache=8)
    for g in range(8):
        write(m, g, g + 1)
    assert m.cached_pages == 8 and clear_gfns(m) == set(range(8))  # at the bound: nothing written back
    write(m, 8, 9)
    # 9 > 8: cut to 8 - 8 // 4 = 6, the three least recently touched (gfns 0, 1, 2) encrypted.
    assert m.cached_pages == 6 and clear_gfns(m) == set(range(3, 9))
    for g in range(9):
        assert m.read_plain(g)[:8] != bytes(8)


def test_shared_pages_do_not_count_against_the_cache():
    m = mem(npages=16, cache=2, shared=[(4, 9)])
    for g in range(4, 10):
        write(m, g)
    write(m, 0)
    write(m, 1)
    assert m.cached_pages == 2 and clear_gfns(m) == {0, 1}
    assert m.stored_pages == 8


def test_a_cache_of_0_encrypts_every_private_page_at_once():
    m = mem(cache=0)
    write(m, 3)
    assert m.cached_pages == 0 and m.stored_pages == 1


def test_the_small_helpers():
    assert all_distinct(np.array([], np.int64)) and all_distinct(np.array([5]))
    assert all_distinct(np.array([3, 1, 2])) and not all_distinct(np.array([1, 2, 1]))
    assert not all_distinct(np.array([2, 2]))
    pages = np.zeros((4, PAGE), np.uint8)
    pages[1, 0] = 1
    pages[2, PAGE - 1] = 1  # non-zero only in its last byte
    assert nonzero_pages(pages).tolist() == [False, True, True, False]
    assert nonzero_pages(pages, np.array([3, 2])).tolist() == [False, True]
