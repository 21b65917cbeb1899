"""Data-mode memory on inputs its common paths never see (replay/security/memory.py).

- The guest-size bound 2**31 - 1 and the key's two halves, checked before anything is allocated (a bad
  key after a good size shows which check ran first).
- Helpers at their edges: ``all_distinct`` with a repeat that is not next to the first value,
  ``page_spans`` of no rows (a window of READs only), one call writing one page twice.
- The digest's in-place path only for slots in gfn order: slots 0, 2, 1, 3 for gfns 0..3 (increasing
  from the first but not in order), and a second walk batch whose slots rise with gaps; 4098 pages
  stored (past 4096).
- The digest remembered while nothing changes (not hashed again).
- The write-back cache's recency: a page rewritten in place is older than a page touched after it, and a
  call of page-state rows only touches no page.
"""

from __future__ import annotations

import numpy as np
import pytest

from replay.model.snp import Op
from replay.security.memory import HostMemory, all_distinct, page_spans
from test_security_memory import Model, sm64
from test_security_memory_bounds import KEY, PAGE, mem, write


def test_the_guest_size_is_checked_first_up_to_2_31_minus_1():
    with pytest.raises(ValueError, match=r"^npages must be in 1\.\.2\*\*31-1, got 2147483648$"):
        HostMemory(npages=2**31, key=b"short", spa_base=0)
    with pytest.raises(ValueError, match=r"^key must be 32 bytes"):  # 2**31 - 1 passes: the key is next
        HostMemory(npages=2**31 - 1, key=b"short", spa_base=0)


def test_a_key_of_two_equal_halves_is_refused():
    with pytest.raises(ValueError, match=r"^key must be 32 bytes \(two different AES-128 keys\)$"):
        HostMemory(npages=4, key=KEY[:16] * 2, spa_base=0)
    HostMemory(npages=4, key=KEY[:16] + KEY[:15] + b"\xff", spa_base=0)  # one byte apart: accepted


def test_helpers_at_their_edges():
    assert not all_distinct(np.array([1, 3, 3]))  # rises from the first value, yet 3 repeats
    assert all_distinct(np.array([1, 3, 2])) and all_distinct(np.array([4]))
    row, gfn = page_spans(np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    assert row.tolist() == [] and gfn.tolist() == []
    row, gfn = page_spans(np.array([PAGE - 1, 5 * PAGE], np.uint64), np.array([2, 8], np.uint64))
    assert row.tolist() == [0, 0, 1] and gfn.tolist() == [0, 1, 5]  # byte 4095 + 2 bytes: pages 0 and 1


def test_one_call_writing_one_page_twice_stores_it_once():
    m = mem(npages=8)
    m.apply(np.array([5 * PAGE, 5 * PAGE + 8], np.uint64), np.array([8, 8], np.uint64), np.zeros(2, np.uint8),
            np.array([1, 2], np.uint64))
    assert m.stored_pages == 1 and m.cached_pages == 1
    assert m.read_plain(5) == sm64(1, 8) + sm64(2, 8) + bytes(PAGE - 16)


def test_the_digest_follows_gfn_order_whatever_the_slot_order():
    m, model = mem(npages=8), Model(8)
    for g in (0, 2, 1, 3):  # one call each: slots 0, 1, 2, 3 go to gfns 0, 2, 1, 3
        write(m, g, value=g + 1)
        model.apply([(g * PAGE, 8, Op.WRITE, g + 1)])
    assert m.plain_rows([0, 1, 2, 3])[1].tolist() == [0, 2, 1, 3]
    assert m.plaintext_digest() == model.digest()


def test_the_digest_of_a_second_walk_batch_with_gapped_slots():
    """4098 pages: gfn 0 -> slot 0, gfn 4096 -> 1, gfns 1, 2 -> 2, 3, gfn 4097 -> 4, gfns 3..4095 -> 5...
    The second batch (gfns 4096, 4097) has slots 1 and 4: rising, but not next to each other."""
    n = 4098
    m, model = mem(npages=n), Model(n)
    order = [[0], [4096], [1, 2], [4097], list(range(3, 4096))]
    for gs in order:
        g = np.array(gs, np.uint64)
        m.apply(g * np.uint64(PAGE), np.full(g.size, 8, np.uint64), np.zeros(g.size, np.uint8), g + np.uint64(1))
        model.apply([(x * PAGE, 8, Op.WRITE, x + 1) for x in gs])
    assert m.plain_rows([4096, 4097])[1].tolist() == [1, 4] and m.stored_pages == n
    assert m.plaintext_digest() == model.digest()


def test_a_page_rewritten_in_place_is_older_than_one_touched_after_it():
    """Bound 1. D (slot 0) written back; A (slot 1) written, then rewritten in place; then D written: two
    in clear > 1, so the older, A, is written back."""
    m = mem(npages=8, cache=1)
    write(m, 3)  # D
    m.read_raw(3)
    write(m, 6)  # A
    write(m, 6, value=2)  # in place (stored and in clear)
    write(m, 3, value=3)  # D: decrypted into the cache
    assert m.plain_rows([3, 6])[1].tolist() == [0, -2]


def test_page_state_rows_alone_touch_no_page():
    """Bound 2. X (slot 0) then Y (slot 1) written; a call of one page-state row for an unstored page;
    then W: three in clear > 2, cut to 2 - 2 // 4 = 2 by writing back the oldest, X."""
    m = mem(npages=8, cache=2)
    write(m, 1)  # X
    write(m, 2)  # Y
    m.apply(np.array([7 * PAGE], np.uint64), np.array([PAGE], np.uint64), np.array([Op.TO_SHARED], np.uint8),
            np.zeros(1, np.uint64))
    write(m, 4)  # W
    assert m.plain_rows([1, 2, 4])[1].tolist() == [-2, 1, 2]


def test_the_digest_is_not_hashed_again_while_nothing_changes(monkeypatch):
    from replay.security import memory as memmod

    m = mem(npages=8)
    write(m, 2)
    d = m.plaintext_digest()
    m.read_plain(2)  # reading changes nothing
    monkeypatch.setattr(memmod.blake3, "blake3", None)  # hashing again would fail
    assert m.plaintext_digest() == d
