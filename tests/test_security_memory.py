"""Data-mode guest memory (replay/security/memory.py, xts.py): contents, XTS tweak property, raw copies,
page-state changes, the plain-text digest and the straight-replay helper.

Expected contents come from this file's own model: a pure-Python SplitMix64 and a bytearray per guest.
"""

from __future__ import annotations

import blake3

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.traces.generators import generate
from replay.security import memory as memmod
from replay.security import xts
from replay.security.keys import vm_memory_key
from replay.security.memory import HostMemory, content_bytes, replay_plaintext_digest
from replay.model.snp import Op

PAGE = 4096
M64 = (1 << 64) - 1


def sm64(value: int, n: int) -> bytes:
    """The model: the first ``n`` bytes of the SplitMix64 stream seeded with ``value`` (little-endian)."""
    out = bytearray()
    state = value
    while len(out) < n:
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out += (z ^ (z >> 31)).to_bytes(8, "little")
    return bytes(out[:n])


class Model:
    """A guest as a bytearray plus a set of shared gfns."""

    def __init__(self, npages, shared=()):
        self.mem = bytearray(npages * PAGE)
        self.shared = set(shared)

    def apply(self, rows):
        for gpa, ln, op, value in rows:
            if op == Op.WRITE:
                self.mem[gpa : gpa + ln] = sm64(value, ln)
            elif op in (Op.TO_SHARED, Op.TO_PRIVATE):
                for g in range(gpa // PAGE, (gpa + ln - 1) // PAGE + 1):
                    (self.shared.add if op == Op.TO_SHARED else self.shared.discard)(g)

    def page(self, g):
        return bytes(self.mem[g * PAGE : (g + 1) * PAGE])

    def digest(self):
        hg, hp = blake3.blake3(), blake3.blake3()
        for g in range(len(self.mem) // PAGE):
            p = self.page(g)
            if any(p):
                hg.update(g.to_bytes(8, "little"))
                hp.update(p)
        return blake3.blake3(hg.digest() + hp.digest()).hexdigest()


def apply_rows(mem, rows):
    a = np.array(rows, dtype=np.uint64).reshape(-1, 4)
    mem.apply(a[:, 0], a[:, 1], a[:, 2].astype(np.uint8), a[:, 3])


def host(h=0, npages=16, spa_base=1024, seed=1, shared=(), cache=None):
    return HostMemory.for_host(seed, h, npages=npages, spa_base=spa_base, shared_ranges=shared, cache_pages=cache)


# ---------------------------------------------------------------------------------------------- contents


def test_content_is_the_splitmix64_stream_of_the_value():
    # Published SplitMix64 outputs for seed 0 (Vigna's reference code): 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4.
    assert content_bytes(0, 0, 16) == (0xE220A8397B1DCDAF).to_bytes(8, "little") + (0x6E789E6AA1B965F4).to_bytes(8, "little")
    assert content_bytes(12345, 0, 100) == sm64(12345, 100)
    assert content_bytes(M64, 5, 11) == sm64(M64, 16)[5:16]


def test_write_lands_where_the_model_says_across_pages_and_overlaps():
    m, model = host(), Model(16)
    rows = [(4090, 20, Op.WRITE, 7),  # crosses gfn 0 -> 1
            (4095, 1, Op.WRITE, 8),  # overwrites one byte of the first row: the later row wins
            (3 * PAGE, 3 * PAGE + 5, Op.WRITE, 9),  # three pages and a bit
            (3 * PAGE + 100, 8, Op.READ, 10)]  # a READ changes nothing
    apply_rows(m, rows)
    model.apply(rows)
    assert m.read_plain(0)[4090:] == sm64(7, 20)[:5] + sm64(8, 1)
    for g in range(16):
        assert m.read_plain(g) == model.page(g), g
    assert m.stored_pages == 6  # gfns 0, 1, 3, 4, 5, 6


rows_strategy = st.lists(
    st.tuples(st.integers(0, 16 * PAGE - 1), st.integers(1, 3 * PAGE), st.sampled_from([0, 0, 0, 1, 2, 3]),
              st.integers(0, M64)).map(lambda r: (r[0], min(r[1], 16 * PAGE - r[0]), r[2], r[3])),
    max_size=40)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=rows_strategy, chunk=st.sampled_from([1, 2, 3, 16384]), split=st.integers(0, 40),
       cache=st.sampled_from([0, 1, 3, None]))
def test_apply_matches_the_model_whatever_the_batching(rows, chunk, split, cache):
    """Contents, attributes, DRAM bytes and digest equal the model's, with any chunk size, batch boundary
    and cache bound."""
    old = memmod.CHUNK_PAGES
    memmod.CHUNK_PAGES = chunk
    try:
        m, model = host(shared=[(2, 4)], cache=cache), Model(16, shared=range(2, 5))
        if rows[:split]:
            apply_rows(m, rows[:split])
        if rows[split:]:
            apply_rows(m, rows[split:])
    finally:
        memmod.CHUNK_PAGES = old
    model.apply(rows)
    assert m.cached_pages <= (16 if cache is None else cache)
    assert m.plaintext_digest() == model.digest()
    for g in range(16):
        assert m.read_plain(g) == model.page(g)
        assert m.is_private(g) == (g not in model.shared)
        assert m.read_raw(g) == (model.page(g) if g in model.shared else xts_model(m.key, model.page(g), 1024 + g))


def test_rows_outside_the_guest_and_bad_gfns_are_refused():
    m = host()
    with pytest.raises(ValueError, match="inside the guest"):
        apply_rows(m, [(16 * PAGE - 4, 5, Op.WRITE, 1)])
    with pytest.raises(ValueError, match="len >= 1"):
        apply_rows(m, [(0, 0, Op.WRITE, 1)])
    apply_rows(m, [(16 * PAGE - 4, 4, Op.WRITE, 1)])  # the last byte is inside
    with pytest.raises(IndexError, match="gfn 16 outside the guest"):
        m.read_plain(16)
    with pytest.raises(ValueError, match="two different AES-128 keys"):
        HostMemory(npages=4, key=bytes(32), spa_base=0)


# ---------------------------------------------------------------------------------------------- XTS


@settings(max_examples=20, deadline=None, derandomize=True)
@given(content=st.integers(0, 2**32), spa=st.integers(0, (1 << 40) - 3), seed=st.integers(0, 99))
def test_batched_xts_equals_cryptography_per_page(content, spa, seed):
    key = vm_memory_key(seed, 0)
    pages = np.random.default_rng(content).integers(0, 256, (3, PAGE), dtype=np.uint8)
    spas = np.arange(spa, spa + 3, dtype=np.uint64)
    enc = xts.encrypt_pages(key, pages, spas)
    # The test's own model (cryptography, tweak = the SPA's byte address): no code shared with xts.
    assert [p.tobytes() for p in enc] == [xts_model(key, p.tobytes(), int(a)) for p, a in zip(pages, spas)]
    assert (enc == xts.reference_pages(key, pages, spas, True)).all()
    assert (xts.decrypt_pages(key, enc, spas) == pages).all()
    assert (xts.reference_pages(key, enc, spas, False) == pages).all()


def test_without_the_openssl_extension_the_cryptography_path_gives_the_same_pages(monkeypatch):
    key = vm_memory_key(7, 1)
    pages = np.random.default_rng(1).integers(0, 256, (4, PAGE), dtype=np.uint8)
    spas = np.arange(5000, 5004, dtype=np.uint64)
    fast = xts.encrypt_pages(key, pages, spas)
    monkeypatch.setattr(xts, "xts_pages", None)  # as built on a machine without OpenSSL's headers
    assert (xts.encrypt_pages(key, pages, spas) == fast).all()
    assert (xts.decrypt_pages(key, fast, spas) == pages).all()


def test_same_plaintext_is_different_ciphertext_at_another_spa_or_host():
    src, dst = host(0, spa_base=1024), host(1, spa_base=1024)
    rows = [(g * PAGE, PAGE, Op.WRITE, 42) for g in (2, 3)]  # identical contents in gfns 2 and 3
    apply_rows(src, rows)
    apply_rows(dst, rows)
    assert src.read_plain(2) == src.read_plain(3) == dst.read_plain(2) == sm64(42, PAGE)
    raw = {src.read_raw(2), src.read_raw(3), dst.read_raw(2), dst.read_raw(3)}
    assert len(raw) == 4  # other SPA on one host, other key at one SPA: all four differ
    assert sm64(42, PAGE) not in raw
    # Only the tweak differs between these two: the same key with gfn 2 placed at another SPA.
    moved = HostMemory(npages=16, key=src.key, spa_base=1025)
    apply_rows(moved, rows)
    assert moved.read_raw(2) != src.read_raw(2) and moved.read_raw(2) == src.read_raw(3)  # SPA 1027 both


def test_never_written_private_page_is_encrypted_zeros_and_shared_is_plain():
    m = host(shared=[(5, 5)])
    assert m.read_plain(1) == bytes(PAGE)
    assert m.read_raw(1) == xts_model(m.key, bytes(PAGE), 1025)
    assert m.read_raw(5) == bytes(PAGE)
    apply_rows(m, [(5 * PAGE + 7, 9, Op.WRITE, 3)])
    assert m.read_raw(5) == m.read_plain(5) == bytes(7) + sm64(3, 9) + bytes(PAGE - 16)
    assert m.stored_pages == 1


def test_raw_copy_to_another_host_decrypts_to_garbage():
    src, dst = host(0, spa_base=1024), host(1, spa_base=2048)
    apply_rows(src, [(4 * PAGE, PAGE, Op.WRITE, 77), (6 * PAGE, 100, Op.WRITE, 78)])
    for g in (4, 6):
        src.raw_copy_to(dst, g)
        got = dst.read_plain(g)
        assert got != src.read_plain(g) and got != bytes(PAGE)
        assert dst.read_raw(g) == src.read_raw(g)  # the host did copy the bytes
    # Control: a host with the same key and the same SPAs would read the copy fine, so the garbage above
    # comes from the other key and tweak, not from the copy.
    twin = HostMemory(npages=16, key=src.key, spa_base=1024)
    src.raw_copy_to(twin, 4)
    assert twin.read_plain(4) == src.read_plain(4)


def test_page_state_change_keeps_contents_and_changes_what_dram_holds():
    m = host()
    apply_rows(m, [(3 * PAGE, 64, Op.WRITE, 5)])
    plain = m.read_plain(3)
    assert m.read_raw(3) != plain
    m.set_private([3], False)
    assert not m.is_private(3) and m.read_raw(3) == plain == m.read_plain(3)
    m.set_private([3], True)
    assert m.is_private(3) and m.read_raw(3) != plain and m.read_plain(3) == plain
    apply_rows(m, [(3 * PAGE, 1, Op.TO_SHARED, 0), (3 * PAGE + 1, 1, Op.WRITE, 6)])  # trace rows do the same
    assert m.read_raw(3) == m.read_plain(3) == plain[:1] + sm64(6, 1) + plain[2:]


# ---------------------------------------------------------------------------------------------- digest


def test_plaintext_digest_ignores_keys_and_stored_zero_pages():
    rows = [(0, 10, Op.WRITE, 1), (9 * PAGE, PAGE, Op.WRITE, 2), (12 * PAGE, 1, Op.TO_SHARED, 0)]
    a, b = host(0, seed=1, spa_base=1024), host(1, seed=2, spa_base=4096)
    apply_rows(a, rows)
    apply_rows(b, rows)
    model = Model(16)
    model.apply(rows)
    assert a.plaintext_digest() == b.plaintext_digest() == model.digest()
    b.install_plain([7], np.zeros((1, PAGE), np.uint8), True)  # a stored zero page is a zero page
    assert b.stored_pages == a.stored_pages + 1 and b.plaintext_digest() == a.plaintext_digest()
    b.install_plain([7], np.full((1, PAGE), 1, np.uint8), True)
    assert b.plaintext_digest() != a.plaintext_digest()


def test_straight_replay_of_a_trace_gives_the_models_digest(tmp_path):
    path = tmp_path / "t.arrow"
    generate("psc", path, guest_bytes=64 * PAGE, vcpus=2, events=3000, seed=3, burst_every=500, burst_pages=4,
             shared_bytes=8 * PAGE, batch_rows=700)
    from replay.traces.format import open_trace

    with open_trace(path) as tr:
        model = Model(64, shared=range(0, 8))
        for _, b in tr:
            cols = [b.column(n).to_pylist() for n in ("gpa", "len", "op", "value")]
            model.apply(zip(*cols))
    d = replay_plaintext_digest(path)
    assert d == model.digest()
    assert replay_plaintext_digest(path, seed=9, host=1, spa_base=5000) == d  # keys do not matter


def test_straight_replay_of_a_missing_trace_is_a_trace_error(tmp_path):
    from replay.core.errors import TraceError

    with pytest.raises(TraceError, match="missing.arrow: no such file"):
        replay_plaintext_digest(tmp_path / "missing.arrow")


# ---------------------------------------------------------------------------------------------- write-back cache


def xts_model(key: bytes, page: bytes, spa_page: int) -> bytes:
    """The DRAM form of a private page, straight from `cryptography`'s XTS (tweak: SPA byte address)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(key), modes.XTS((spa_page * PAGE).to_bytes(16, "little"))).encryptor()
    return enc.update(page) + enc.finalize()


@pytest.mark.parametrize("cache", [0, 1, 2, None])
def test_read_raw_after_cached_writes_is_the_xts_of_the_plaintext(cache):
    m = host(cache=cache)
    rows = [(g * PAGE + 8 * g, 100, Op.WRITE, g) for g in (1, 2, 3, 4)] + [(2 * PAGE, 8, Op.WRITE, 99)]
    apply_rows(m, rows)
    model = Model(16)
    model.apply(rows)
    assert m.cached_pages <= (4 if cache is None else cache)
    for g in (1, 2, 3, 4, 5):
        assert m.read_raw(g) == xts_model(m.key, model.page(g), 1024 + g), g
        assert m.read_plain(g) == model.page(g)
    assert m.cached_pages == 0  # each read_raw wrote its page back: DRAM holds ciphertext
    apply_rows(m, [(3 * PAGE, 8, Op.WRITE, 7)])  # written again after the write-back: in clear again
    model.apply([(3 * PAGE, 8, Op.WRITE, 7)])
    assert m.cached_pages == (1 if cache != 0 else 0) and m.read_raw(3) == xts_model(m.key, model.page(3), 1027)


def test_the_cache_is_bounded_and_evicts_the_least_recently_touched():
    m = host(cache=4)
    for g in range(6):  # six private pages, one row each: 6 > 4, so the bound is enforced
        apply_rows(m, [(g * PAGE, 16, Op.WRITE, g)])
    # The fifth page makes 5 > 4: the cache is cut to 3/4 of the bound (3), the two oldest (gfns 0, 1)
    # encrypted; the sixth makes 4 again, within the bound.
    assert m.cached_pages == 4
    clear = {int(m._owner[s]) for s in np.flatnonzero(m._clear[: m._used])}
    assert clear == {2, 3, 4, 5}
    assert m.read_raw(0) == xts_model(m.key, sm64(0, 16) + bytes(PAGE - 16), 1024)
    for g in range(6):
        assert m.read_plain(g)[:16] == sm64(g, 16)


def test_raw_copy_of_a_cached_page_carries_the_ciphertext():
    src, dst = host(0, spa_base=1024), host(1, spa_base=2048)
    apply_rows(src, [(4 * PAGE, PAGE, Op.WRITE, 77)])
    assert src.cached_pages == 1  # the page is held in clear...
    src.raw_copy_to(dst, 4)  # ...but a host copying DRAM gets the ciphertext, never the plain text
    assert dst.read_raw(4) == xts_model(src.key, sm64(77, PAGE), 1028) != sm64(77, PAGE)
    assert dst.read_plain(4) != sm64(77, PAGE)
    twin = HostMemory(npages=16, key=src.key, spa_base=1024)
    src.raw_copy_to(twin, 4)
    assert twin.read_plain(4) == sm64(77, PAGE)


def test_without_the_write_back_a_host_would_read_plain_text(monkeypatch):
    """The injected fault: if read_raw skipped the write-back, the host would see the cached plain text."""
    m = host()
    apply_rows(m, [(2 * PAGE, PAGE, Op.WRITE, 5)])
    monkeypatch.setattr(HostMemory, "_crypt_slots", lambda self, slots, encrypt: None)
    assert m.read_raw(2) == sm64(5, PAGE)  # the leak the write-back prevents


def test_page_state_changes_of_cached_and_evicted_pages():
    for cache in (0, 16):
        m = host(cache=cache)
        apply_rows(m, [(3 * PAGE, 64, Op.WRITE, 5), (4 * PAGE, 64, Op.WRITE, 6)])
        plain3 = m.read_plain(3)
        m.set_private([3, 4], False)  # shared: DRAM holds plain text, wherever the page was
        assert m.read_raw(3) == plain3 and m.cached_pages == 0
        m.set_private([3], True)
        assert m.cached_pages == (0 if cache == 0 else 1)
        assert m.read_raw(3) == xts_model(m.key, plain3, 1027) and m.read_plain(3) == plain3


def test_the_digest_is_remembered_only_until_the_contents_change():
    m = host()
    apply_rows(m, [(0, 10, Op.WRITE, 1)])
    d1 = m.plaintext_digest()
    assert m.plaintext_digest() == d1
    m.read_raw(0)  # a write-back changes DRAM, not what the guest sees
    assert m.plaintext_digest() == d1
    m.write_raw(0, bytes(PAGE))  # a host scribbling over DRAM does change it
    d2 = m.plaintext_digest()
    assert d2 != d1
    apply_rows(m, [(0, 10, Op.WRITE, 1)])
    assert m.plaintext_digest() not in (d1, d2)  # the rest of the page: zeros written as DRAM bytes decrypt to garbage
    model = Model(16)
    model.apply([(0, 10, Op.WRITE, 1)])
    m.install_plain([0], np.frombuffer(model.page(0), np.uint8), True)
    assert m.plaintext_digest() == d1 == model.digest()


def test_read_plain_many_into_a_reused_buffer():
    m = host()
    apply_rows(m, [(g * PAGE, 8, Op.WRITE, g + 1) for g in range(4)])
    buf = np.full((8, PAGE), 0xAA, np.uint8)
    got = m.read_plain_many([3, 1, 3], out=buf)
    assert got.base is buf or got is buf[:3] or np.shares_memory(got, buf)
    assert [bytes(p[:8]) for p in got] == [sm64(4, 8), sm64(2, 8), sm64(4, 8)]
    assert (m.read_plain_many([0, 2], out=buf)[:, :8] == np.frombuffer(sm64(1, 8) + sm64(3, 8), np.uint8).reshape(2, 8)).all()


def test_a_page_nonzero_only_past_its_first_word_counts_as_written():
    m = host()
    apply_rows(m, [(5 * PAGE + PAGE - 1, 1, Op.WRITE, 3)])  # the page's last byte only
    model = Model(16)
    model.apply([(5 * PAGE + PAGE - 1, 1, Op.WRITE, 3)])
    assert model.page(5)[:8] == bytes(8) and any(model.page(5))
    assert m.plaintext_digest() == model.digest() != host().plaintext_digest()
    assert memmod.nonzero_pages(np.frombuffer(model.page(5) + bytes(PAGE), np.uint8).reshape(2, PAGE)).tolist() == [True, False]


write_rows = st.lists(
    st.tuples(st.integers(0, 16 * PAGE - 1), st.integers(1, 3 * PAGE), st.sampled_from([0, 0, 1]),
              st.integers(0, M64)).map(lambda r: (r[0], min(r[1], 16 * PAGE - r[0]), r[2], r[3])),
    min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(batches=st.lists(write_rows, min_size=1, max_size=4), cache=st.sampled_from([None, 16, 5]))
def test_writes_to_stored_pages_in_one_c_call_match_the_model(batches, cache):
    """Once every page is stored, batches of WRITE and READ rows take the one-call path
    (``replay.security._content.apply_writes``): the contents, digest and cache bound are still the model's, and
    the path declines (the general one then runs) exactly when a page it would write holds ciphertext."""
    taken = []
    real = memmod.apply_writes

    def spy(*a):
        taken.append(real(*a))
        return taken[-1]

    memmod.apply_writes = spy
    try:
        m, model = host(shared=[(2, 4)], cache=cache), Model(16, shared=range(2, 5))
        fill = [(g * PAGE, PAGE, 0, g + 1) for g in range(16)]
        apply_rows(m, fill)
        model.apply(fill)
        for rows in batches:
            encrypted = {s for s in range(16) if not m._clear[m._slot[s]]}
            hits = {g for gpa, ln, op, _ in rows if op == 0 for g in range(gpa // PAGE, (gpa + ln - 1) // PAGE + 1)}
            taken.clear()
            apply_rows(m, rows)
            model.apply(rows)
            assert (taken[0] < 0) == bool(hits & encrypted)  # declined only for a page held in ciphertext
            if taken[0] >= 0:
                assert taken[0] == len(hits)  # the distinct pages it wrote
    finally:
        memmod.apply_writes = real
    assert m.cached_pages <= (16 if cache is None else cache)
    assert m.plaintext_digest() == model.digest()
    for g in range(16):
        assert m.read_plain(g) == model.page(g)


def test_the_one_call_paths_decline_and_change_nothing():
    """``apply_writes`` and ``gather_pages`` refuse rows or pages they cannot handle (a page not stored,
    held in ciphertext, a page-state change, a row outside the guest) before writing anything; their op
    codes are the trace's."""
    from replay.security._content import OPS, apply_writes, gather_pages

    assert OPS == {"WRITE": int(Op.WRITE), "READ": int(Op.READ)}
    m = host(cache=2)
    apply_rows(m, [(g * PAGE, PAGE, 0, g + 1) for g in range(4)])  # pages 0..3 stored; 0 and 1 evicted
    arena, stamp = m._arena.copy(), m._stamp.copy()
    clear = m._clear.view(np.uint8)

    def call(rows):
        a = np.array(rows, dtype=np.uint64).reshape(-1, 4).T.copy()
        return apply_writes(m._arena, m._slot, clear, m._stamp, 99, a[0], a[1], a[2].astype(np.uint8), a[3])

    for rows in ([(3 * PAGE, 8, 0, 1), (5 * PAGE, 8, 0, 1)],  # page 5 not stored
                 [(3 * PAGE, 8, 0, 1), (0, 8, 0, 1)],  # page 0 held in ciphertext
                 [(3 * PAGE, 8, 0, 1), (2 * PAGE, 8, int(Op.TO_SHARED), 0)],  # a page-state change
                 [(3 * PAGE, 8, 0, 1), (16 * PAGE - 4, 8, 0, 1)],  # past the guest's end
                 [(3 * PAGE, 0, 0, 1)]):  # an empty row
        assert call(rows) == -1
        assert (m._arena == arena).all() and (m._stamp == stamp).all()
    assert call([(2 * PAGE + 4090, 12, 0, 7), (3 * PAGE, 1, int(Op.READ), 0), (3 * PAGE + 1, 1, 0, 8)]) == 2
    assert m.read_plain(2)[4090:] == content_bytes(7, 0, 6)  # the row crosses into page 3...
    assert m.read_plain(3)[:6] == content_bytes(7, 6, 1) + content_bytes(8, 0, 1) + content_bytes(7, 8, 4)  # ...then 1 byte
    assert m.read_plain(3)[6:] == content_bytes(4, 6, PAGE - 6)  # the fill's
    out = np.zeros((3, PAGE), np.uint8)
    assert not gather_pages(m._arena, m._slot, clear, np.array([2, 0, 3]), out)  # page 0 in ciphertext
    assert not gather_pages(m._arena, m._slot, clear, np.array([2, 5]), out)  # page 5 not stored
    assert gather_pages(m._arena, m._slot, clear, np.array([3, 2]), out)
    assert out[0].tobytes() == m.read_plain(3) and out[1].tobytes() == m.read_plain(2)


def test_the_cache_bound_holds_after_a_scan_that_evicts_nothing():
    """90 pages in clear, 11 of them written again (the running count passes 100: a scan, but nothing to
    evict), then 25 new ones: 115 would be in clear if the scan had lowered the count below the truth."""
    m = host(npages=128, cache=100)
    apply_rows(m, [(g * PAGE, 8, 0, g + 1) for g in range(90)])
    apply_rows(m, [(g * PAGE, 8, 0, 7) for g in range(11)])
    assert m.cached_pages == 90
    apply_rows(m, [(g * PAGE, 8, 0, g + 1) for g in range(90, 115)])
    assert m.cached_pages == 75  # over the bound (115): the least recent evicted down to 3/4 of it


def test_rewriting_pages_held_in_clear_costs_no_scan_of_the_cache(monkeypatch):
    """A guest that fits the cache is written again and again (the common case): those writes change no
    page's clear state, so they never make the memory scan its slots for pages to write back."""
    m = host(npages=64, cache=64)
    apply_rows(m, [(g * PAGE, PAGE, 0, g + 1) for g in range(64)])
    scans = []
    real = memmod.np.flatnonzero
    monkeypatch.setattr(memmod.np, "flatnonzero", lambda *a, **k: scans.append(1) or real(*a, **k))
    for k in range(50):
        apply_rows(m, [((k * 7 % 64) * PAGE + 8, 16, 0, k)])
    assert scans == [] and m.cached_pages == 64


# ------------------------------------------------------------------ bookkeeping paths (issue 22 mutants)


def sm64_at(value: int, byte_offset: int, n: int) -> bytes:
    """The model at an offset: SplitMix64 is a counter, so word k is the mix of ``value + (k + 1) * gamma``."""
    out = bytearray()
    k = byte_offset // 8
    while len(out) < n:
        z = (value + (k + 1) * 0x9E3779B97F4A7C15) & M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out += (z ^ (z >> 31)).to_bytes(8, "little")
        k += 1
    return bytes(out[:n])


def test_install_zero_wipes_a_stored_page():
    m = host()
    apply_rows(m, [(3 * PAGE, 64, Op.WRITE, 5), (4 * PAGE, 8, Op.WRITE, 6)])
    m.install_zero([3], True)
    model = Model(16)
    model.apply([(4 * PAGE, 8, Op.WRITE, 6)])
    assert m.read_plain(3) == bytes(PAGE) and m.read_raw(3) == xts_model(m.key, bytes(PAGE), 1024 + 3)
    assert m.read_plain(4) == model.page(4) and m.plaintext_digest() == model.digest()
    m.install_zero([4], False)  # a shared zero page: plain zeros in DRAM
    assert m.read_raw(4) == bytes(PAGE) and m.plaintext_digest() == Model(16).digest()


def test_a_write_longer_than_a_chunk_is_split_at_the_right_addresses():
    # One row of CHUNK_PAGES + 1 pages starting one page in: it is cut into a CHUNK_PAGES piece and a
    # one-page piece whose content continues the stream at byte CHUNK_PAGES * 4096 of the row.
    c = memmod.CHUNK_PAGES
    m = host(npages=c + 3)
    apply_rows(m, [(PAGE, (c + 1) * PAGE, Op.WRITE, 7), (PAGE + 8, 8, Op.WRITE, 9)])
    assert m.read_plain(0) == bytes(PAGE) and m.read_plain(c + 2) == bytes(PAGE)
    assert m.read_plain(1) == sm64_at(7, 0, 8) + sm64(9, 8) + sm64_at(7, 16, PAGE - 16)
    assert m.read_plain(c) == sm64_at(7, (c - 1) * PAGE, PAGE)
    assert m.read_plain(c + 1) == sm64_at(7, c * PAGE, PAGE)
    assert m.stored_pages == c + 1


def test_the_digest_of_pages_stored_out_of_gfn_order_past_one_walk():
    # Pages stored in the order 0, 5000, 1, 5001, ...: the first walk of WALK_PAGES gfns has slots that
    # increase with gaps (the other half's pages sit between them), so it is not one run of the arena.
    n = memmod.WALK_PAGES + 4
    order = np.empty(2 * n, np.int64)
    order[0::2], order[1::2] = np.arange(n), np.arange(5000, 5000 + n)
    pages = np.zeros((2 * n, PAGE), np.uint8)
    pages[:, :8] = np.arange(1, 2 * n + 1, dtype="<u8").view(np.uint8).reshape(-1, 8)
    m = host(npages=5000 + n)
    m.install_plain(order, pages, True)
    model = Model(5000 + n)
    for g, p in zip(order.tolist(), pages):
        model.mem[g * PAGE : g * PAGE + 8] = p[:8].tobytes()
    assert m.plaintext_digest() == model.digest()
