"""Data-mode memory's bookkeeping where only an unusual input reaches it (replay/security/memory.py).

- Chunks: a call spanning more than 16384 page pieces is applied in chunks of at most 16384 (a piece
  that alone fills a chunk stands alone; pieces of exactly 16384 pages stay together; a row one byte
  longer than a chunk is cut after 16384 pages, one byte shorter is one piece) and the cache bound is
  applied after each chunk, so how many private pages end up in clear shows where the chunks were cut. The page-state rows here cover unstored
  pages (nothing is stored for them), so 32769 page pieces cost only index arrays.
- Page-state rows in one call: the last row for a page wins (a page going shared then private again in
  one call is never decrypted); the first stored page (slot 0) is a stored page like any other; a row
  turning an unstored page shared stores nothing (the next free slot stays zero).
- ``plain_rows``: -1 for a page never stored, -2 for one whose DRAM holds ciphertext, else its row, for
  the first two slots either way round.
- The cache at exactly its bound after a scan (nothing evicted, the count stays exact); eviction of
  exactly the least recently touched pages when groups of pages share a touch; a bad gfn named
  when a good one comes first, and the keyword-only arguments of the constructors and the replay helper.
"""

from __future__ import annotations

import numpy as np
import pytest

from replay.model.snp import Op
from replay.security.memory import HostMemory, replay_plaintext_digest
from test_security_memory import sm64
from test_security_memory_bounds import KEY, PAGE, mem, write

CHUNK = 16384  # pages per chunk (memory.CHUNK_PAGES, written out so that the test pins it)


def rows(m, *spec):
    """Apply rows ``(op, first_gfn, pages_or_bytes)`` in one call: page-state rows cover whole pages,
    WRITE rows write ``n`` bytes of value 9 at the page's start."""
    gpa, ln, op, val = [], [], [], []
    for o, g, n in spec:
        gpa.append(g * PAGE)
        ln.append(n if o == Op.WRITE else n * PAGE)
        op.append(int(o))
        val.append(9)
    m.apply(np.array(gpa, np.uint64), np.array(ln, np.uint64), np.array(op, np.uint8), np.array(val, np.uint64))


def four_cached(m, first):
    """Pages first..first+3 private, in clear: the cache (bound 4) is full and its count exact."""
    rows(m, *[(Op.WRITE, first + i, 8) for i in range(4)])
    assert m.cached_pages == 4


def test_a_piece_filling_a_chunk_stands_alone_and_the_bound_applies_after_it():
    """Pieces of 16384 and 1 pages: two chunks. Chunk 1 turns stored shared page 0 private: 4 + 1 = 5 in
    clear > 4, cut to 4 - 4 // 4 = 3; chunk 2 writes new page 16388: 3 + 1 = 4, not over the bound. One
    chunk for both would end at 4 + 2 = 6 > 4, cut to 3."""
    m = mem(npages=CHUNK + 8, cache=4, shared=[(0, 0)])
    write(m, 0)  # stored, shared, in clear: not counted
    four_cached(m, CHUNK)
    rows(m, (Op.TO_PRIVATE, 0, CHUNK), (Op.WRITE, CHUNK + 4, 8))
    assert m.cached_pages == 4
    assert m.read_plain(0) == sm64(1, 8) + bytes(PAGE - 8) and m.is_private(0)


def test_each_chunk_after_the_first_starts_where_the_last_one_ended():
    """Pieces of 16384, 16384 and 1 pages: three chunks. Chunk 1 covers no stored page; chunk 2 turns
    stored shared page 16384 private: 5 > 4, cut to 3; chunk 3 writes new page 32768: 4. Chunks 2 and 3
    as one would end at 4 + 2 = 6, cut to 3."""
    m = mem(npages=2 * CHUNK + 8, cache=4, shared=[(CHUNK, CHUNK)])
    write(m, CHUNK)
    four_cached(m, 2 * CHUNK + 1)
    rows(m, (Op.TO_PRIVATE, 0, CHUNK), (Op.TO_PRIVATE, CHUNK, CHUNK), (Op.WRITE, 2 * CHUNK, 8))
    assert m.cached_pages == 4
    assert m.private_mask([0, CHUNK, 2 * CHUNK - 1]).all()


def test_pieces_filling_exactly_one_chunk_are_applied_together():
    """Pieces of 16383 and 1 pages: 16384, one chunk. It turns stored shared page 0 private and writes new
    page 16388: 4 + 2 = 6 in clear > 4, cut to 3 (two chunks would end at 4)."""
    m = mem(npages=CHUNK + 8, cache=4, shared=[(0, 0)])
    write(m, 0)
    four_cached(m, CHUNK)
    rows(m, (Op.TO_PRIVATE, 0, CHUNK - 1), (Op.WRITE, CHUNK + 4, 8))
    assert m.cached_pages == 3


def test_a_row_one_byte_longer_than_a_chunk_ends_its_first_chunk_at_16384_pages():
    """A page-state row of 16384 pages + 1 byte (pages 0..16384) is cut into a 16384-page piece (chunk 1)
    and a 1-byte piece on page 16384 that goes with the next row. Pages 0 and 16384 are stored shared:
    chunk 1 turns page 0 private (4 + 1 = 5 > 4, cut to 3); chunk 2 turns page 16384 private and writes new
    page 16385 (3 + 2 = 5 > 4, cut to 3). Cutting after the 1-byte piece instead would end at 4."""
    m = mem(npages=CHUNK + 10, cache=4, shared=[(0, 0), (CHUNK, CHUNK)])
    write(m, 0)
    write(m, CHUNK)
    four_cached(m, CHUNK + 2)
    m.apply(np.array([0, (CHUNK + 1) * PAGE], np.uint64), np.array([CHUNK * PAGE + 1, 8], np.uint64),
            np.array([Op.TO_PRIVATE, Op.WRITE], np.uint8), np.array([0, 9], np.uint64))
    assert m.cached_pages == 3 and m.private_mask([0, CHUNK]).all()


def test_the_last_page_state_row_of_a_call_wins_and_a_page_ending_private_stays_encrypted():
    """Page 3 written back (ciphertext in DRAM), then in one call: page 1 shared, page 3 shared, page 3
    private. Page 3 ends private as it was: its DRAM keeps the ciphertext (0 pages in clear)."""
    m = mem(npages=8)
    write(m, 3, value=5)
    raw = m.read_raw(3)
    assert m.cached_pages == 0
    rows(m, (Op.TO_SHARED, 1, 1), (Op.TO_SHARED, 3, 1), (Op.TO_PRIVATE, 3, 1))
    assert m.cached_pages == 0 and m.is_private(3) and not m.is_private(1)
    assert m.plain_rows([3])[1].tolist() == [-2] and m.read_raw(3) == raw
    assert m.read_plain(3) == sm64(5, 8) + bytes(PAGE - 8)


def test_the_first_stored_page_turning_shared_is_held_in_clear():
    """Page 2 is the first page stored (slot 0); written back, then turned shared: its DRAM must now hold
    the plain text."""
    m = mem(npages=8)
    write(m, 2, value=5)
    assert m.read_raw(2) != sm64(5, 8) + bytes(PAGE - 8)  # private: ciphertext
    rows(m, (Op.TO_SHARED, 2, 1))
    assert m.read_raw(2) == sm64(5, 8) + bytes(PAGE - 8)


def test_turning_an_unstored_page_shared_leaves_the_next_slot_zero():
    """Page 0 stored (slot 0), page 1 turned shared while unstored, then written: 8 bytes of content
    and 4088 zeros (the slot it gets was never written)."""
    m = mem(npages=2)
    write(m, 0, value=5)
    rows(m, (Op.TO_SHARED, 1, 1))
    write(m, 1, value=6)
    assert m.read_plain(1) == sm64(6, 8) + bytes(PAGE - 8)
    assert m.read_raw(1) == sm64(6, 8) + bytes(PAGE - 8)


@pytest.mark.parametrize("written_back", [5, 6])
def test_plain_rows_of_the_first_two_slots(written_back):
    """Page 5 in slot 0, page 6 in slot 1, page 7 never stored; one of the two written back."""
    m = mem(npages=8)
    write(m, 5)
    write(m, 6)
    m.read_raw(written_back)
    pages, r = m.plain_rows([5, 6, 7])
    assert r.tolist() == ([-2, 1, -1] if written_back == 5 else [0, -2, -1])
    clear = 6 if written_back == 5 else 5
    assert pages[r[clear - 5]].tobytes() == sm64(1, 8) + bytes(PAGE - 8)


def test_a_scan_at_exactly_the_bound_evicts_nothing_and_keeps_the_count():
    """Bound 4: pages 0..3 installed, then installed again (the running count says 8: a scan finds exactly
    4 in clear, not over the bound); one more page: 5 > 4, cut to 4 - 4 // 4 = 3."""
    m = mem(npages=8, cache=4)
    page = np.full((4, PAGE), 7, np.uint8)
    m.install_plain([0, 1, 2, 3], page, True)
    m.install_plain([0, 1, 2, 3], page, True)
    assert m.cached_pages == 4
    m.install_plain([4], page[:1], True)
    assert m.cached_pages == 3


def test_a_bad_gfn_after_a_good_one_is_the_one_named():
    m = mem(npages=8)
    for gfns, bad in (([0, 8], 8), ([0, 3, -1], -1), ([1, 0, 9], 9)):
        with pytest.raises(IndexError, match=rf"^gfn {bad} outside the guest \(0\.\.7\)$"):
            m.check_gfns(gfns)


def test_sizes_keys_and_addresses_are_keyword_only(tmp_path):
    """Positional (npages, key, spa_base) or (seed, host) mix-ups would build a wrong memory silently."""
    with pytest.raises(TypeError):
        HostMemory(8, KEY, 0)
    with pytest.raises(TypeError):
        HostMemory.for_host(1, 0, 8, 0)
    with pytest.raises(TypeError):
        replay_plaintext_digest(tmp_path / "t", 1)


def test_eviction_takes_exactly_the_least_recently_touched_pages():
    """Bound 240 (cut to 240 - 240 // 4 = 180). Pages 0..105 written (A), 106..184 (B), A written again,
    then 185..259 (C): 260 in clear > 240, so 260 - 180 = 80 are written back, the least recent first:
    all 79 of B, then 1 of A (which one of A is not specified: they were touched together)."""
    m = mem(npages=260, cache=240)

    def write_range(lo, hi, value):
        n = hi - lo
        m.apply(np.arange(lo, hi, dtype=np.uint64) * np.uint64(PAGE), np.full(n, 8, np.uint64),
                np.zeros(n, np.uint8), np.full(n, value, np.uint64))

    write_range(0, 106, 1)
    write_range(106, 185, 2)
    write_range(0, 106, 3)
    assert m.cached_pages == 185
    write_range(185, 260, 4)
    assert m.cached_pages == 180
    back = m.plain_rows(np.arange(260))[1] == -2
    assert back[106:185].all() and not back[185:].any() and int(back[:106].sum()) == 1


def test_a_row_one_byte_short_of_a_chunk_is_one_piece():
    """16384 pages - 1 byte from gpa 0 turned shared: pages 0..16383, and nothing past them."""
    m = mem(npages=2 * CHUNK + 1)
    m.apply(np.zeros(1, np.uint64), np.array([CHUNK * PAGE - 1], np.uint64), np.array([Op.TO_SHARED], np.uint8),
            np.zeros(1, np.uint64))
    assert m.private_mask([0, CHUNK - 1, CHUNK, 2 * CHUNK - 1, 2 * CHUNK]).tolist() == [False, False, True, True, True]
