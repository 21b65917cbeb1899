"""Data-mode memory when the system refuses to reserve the whole guest (replay/security/memory.py).

``HostMemory`` asks for one mapping as large as the guest (address space only); where the system refuses
it, the memory starts with no room at all and grows as pages are stored: to 64 pages (or the guest, if
smaller), then by doubling, never past the guest. A fake ``mmap`` refuses every mapping above a limit:

- limit 0: the memory is still built and reads as zeros (nothing is mapped before a page is stored);
- limit 128 pages, guest 200: one page stored -> room for 64; 64 stored -> still 64 (exactly full);
  65 stored -> 128 (the doubling); contents survive the move;
- limit 64, guest 100: with slots 0..63 all in use, a page-state row over an unstored page touches no slot
  (the cache evicts the least recently touched page, found with ``plain_rows``).
"""

from __future__ import annotations

import errno
import mmap

import blake3
import numpy as np
import pytest

from replay.model.snp import Op
from replay.security import memory as memmod
from test_security_memory import sm64
from test_security_memory_bounds import PAGE, mem, write


class Refusing:
    """``mmap`` that refuses anonymous mappings larger than ``limit`` pages."""

    MAP_PRIVATE, MAP_ANONYMOUS = mmap.MAP_PRIVATE, mmap.MAP_ANONYMOUS

    def __init__(self, limit: int):
        self.limit, self.asked = limit, []
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.MADV_HUGEPAGE = mmap.MADV_HUGEPAGE

    def mmap(self, fileno, length, **kw):
        self.asked.append(length // PAGE)
        if length > self.limit * PAGE:
            raise OSError(errno.ENOMEM, "refused")
        return mmap.mmap(fileno, length, **kw)


@pytest.fixture
def refuse(monkeypatch):
    def set_limit(pages):
        fake = Refusing(pages)
        monkeypatch.setattr(memmod, "mmap", fake)
        return fake
    return set_limit


def test_nothing_is_mapped_before_a_page_is_stored(refuse):
    fake = refuse(0)
    m = mem(npages=100)
    assert fake.asked == [100]  # the whole guest, refused; no other mapping asked for
    assert m.read_plain(7) == bytes(PAGE) and m.stored_pages == 0
    empty = blake3.blake3().digest()
    assert m.plaintext_digest() == blake3.blake3(empty + empty).hexdigest()


def test_room_grows_to_64_pages_then_by_doubling(refuse):
    fake = refuse(128)
    m = mem(npages=200)
    write(m, 10, value=3)
    assert m.plain_rows([10])[0].shape == (64, PAGE)  # max(1, 2 * 0, 64) = 64 <= 200
    m.apply(np.arange(100, 163, dtype=np.uint64) * np.uint64(PAGE), np.full(63, 8, np.uint64),
            np.zeros(63, np.uint8), np.arange(100, 163, dtype=np.uint64))
    assert m.plain_rows([10])[0].shape == (64, PAGE)  # 64 pages: exactly full, no need to grow
    write(m, 163, value=163)
    assert m.plain_rows([10])[0].shape == (128, PAGE)  # 65 pages: max(65, 2 * 64, 64) = 128 <= 200
    assert fake.asked == [200, 64, 128]
    assert m.read_plain(10) == sm64(3, 8) + bytes(PAGE - 8)
    assert m.read_plain(163) == sm64(163, 8) + bytes(PAGE - 8)
    assert m.stored_pages == 65 and m.cached_pages == 65


def test_a_state_row_over_an_unstored_page_touches_no_slot_when_every_slot_is_in_use(refuse):
    """Bound 2. Pages 0..61 shared (slots 0..61), P = 62 (slot 62) and Q = 63 (slot 63, the last one)
    private, P touched again after Q. Page 99 (unstored) turned private; then page 0 turned private:
    3 in clear > 2, cut to 2 - 2 // 4 = 2 by writing back the least recently touched: Q."""
    refuse(64)
    m = mem(npages=100, cache=2, shared=[(0, 61)])
    m.apply(np.arange(62, dtype=np.uint64) * np.uint64(PAGE), np.full(62, 8, np.uint64), np.zeros(62, np.uint8),
            np.ones(62, np.uint64))
    write(m, 62)
    write(m, 63)
    m.install_plain([62], np.full((1, PAGE), 5, np.uint8), True)
    assert m.cached_pages == 2
    m.apply(np.array([99 * PAGE], np.uint64), np.array([PAGE], np.uint64), np.array([Op.TO_PRIVATE], np.uint8),
            np.zeros(1, np.uint64))
    m.set_private([0], True)
    assert m.cached_pages == 2
    assert m.plain_rows([0, 62, 63])[1].tolist() == [0, 62, -2]
