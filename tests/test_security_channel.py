"""The sealed migration channel and the validation token (replay/security/channel.py, token.py): packet
layout, GCM round trips, every rejection (tag, sequence, stale version, malformed), shared pages in the
clear, VMSAs, the token, determinism, and a trace migrated mid-way ending with the straight-replay memory."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.traces.generators import generate
from replay.security.channel import (HEADER_BYTES, TAG_BYTES, Flag, Header, Outcome, nonce, parse_header,
                                     vmsa_id)
from replay.security.memory import HostMemory, replay_plaintext_digest
from replay.security.session import emulated_vmsa, endpoints, establish
from replay.security.token import Token, TokenOutcome, compare
from replay.traces.format import open_trace

PAGE = 4096
SEED = 5
HS = establish(SEED)


def pair(npages=16, shared=(), level=None):
    src = HostMemory.for_host(SEED, 0, npages=npages, spa_base=1024, shared_ranges=shared)
    dst = HostMemory.for_host(SEED, 1, npages=npages, spa_base=2048, shared_ranges=shared)
    s, r = endpoints(HS, src, dst, compress_level=level)
    return src, dst, s, r


def write(mem, gfn, value, ln=PAGE, off=0):
    mem.apply(np.array([gfn * PAGE + off], np.uint64), np.array([ln], np.uint64), np.zeros(1, np.uint8),
              np.array([value], np.uint64))


def test_header_layout_and_nonce():
    h = Header(gfn=7, sequence=3, version=9, stream=2, flags=Flag.PRIVATE | Flag.COMPRESSED, payload_len=16)
    raw = h.pack()
    assert raw == struct.pack("<QQQHHI", 7, 3, 9, 2, 9, 16) and len(raw) == HEADER_BYTES == 32
    assert parse_header(raw + bytes(16)) == h
    assert nonce(2, 3) == bytes([0, 0, 0, 2]) + bytes(7) + bytes([3])
    assert vmsa_id(3, 2) == 14


def test_sealed_private_page_round_trip_is_re_encrypted_at_the_target():
    src, dst, s, r = pair()
    write(src, 4, 99)
    p = s.send_page(4, version=1, stream=1)
    assert len(p) == HEADER_BYTES + PAGE + TAG_BYTES
    assert parse_header(p) == Header(4, 0, 1, 1, Flag.PRIVATE, PAGE + TAG_BYTES)
    assert src.read_plain(4) not in p and src.read_raw(4) not in p  # neither plain text nor DRAM bytes
    assert r.receive(p) is Outcome.ACCEPTED
    assert dst.read_plain(4) == src.read_plain(4) and dst.is_private(4)
    assert dst.read_raw(4) != src.read_raw(4)  # target key and target SPA
    assert r.held_version(4) == 1 and r.held_version(5) is None


def test_packet_sizes_by_kind():
    src, dst, s, r = pair(shared=[(8, 15)], level=3)
    write(src, 1, 5)  # dense private: zstd cannot shrink it, travels uncompressed
    write(src, 2, 6, ln=8, off=100)  # sparse private: compressed
    write(src, 9, 7, ln=8)  # sparse shared: compressed, in the clear
    pk = s.send_pages([0, 1, 2, 8, 9], [0, 1, 1, 0, 1], stream=1)
    flags = [parse_header(p).flags for p in pk]
    assert flags == [Flag.PRIVATE | Flag.ZERO, Flag.PRIVATE, Flag.PRIVATE | Flag.COMPRESSED, Flag.SHARED | Flag.ZERO,
                     Flag.SHARED | Flag.COMPRESSED]
    assert [len(p) for p in pk[:2]] == [HEADER_BYTES + TAG_BYTES, HEADER_BYTES + PAGE + TAG_BYTES]
    assert len(pk[2]) < 200 and len(pk[3]) == HEADER_BYTES
    assert r.receive_many(pk) == [Outcome.ACCEPTED] * 5
    for g in (0, 1, 2, 8, 9):
        assert dst.read_plain(g) == src.read_plain(g)
    st_s, st_r = s.stats.to_json(), r.stats.to_json()
    assert (st_s["private_pages"], st_s["shared_pages"], st_s["zero_pages"], st_s["compressed_pages"]) == (3, 2, 2, 2)
    assert st_s["payload_bytes"] == st_r["payload_bytes"] == 3 * PAGE
    assert st_s["compressed_bytes"] == st_r["compressed_bytes"] == PAGE + len(pk[2]) - HEADER_BYTES - TAG_BYTES + len(pk[4]) - HEADER_BYTES
    assert st_s["wire_bytes"] == st_r["wire_bytes"] == sum(map(len, pk))
    assert st_r["outcomes"] == {"accepted": 5} and st_r["sequences"] == st_s["sequences"] == {"1": 5}


def test_shared_pages_travel_plain_and_tampering_is_not_detected():
    src, dst, s, r = pair(shared=[(0, 3)])
    write(src, 2, 1)
    p = s.send_page(2, 1, stream=0)
    assert p[HEADER_BYTES:] == src.read_plain(2)  # the host sees and sends it as is
    evil = p[:HEADER_BYTES] + bytes(PAGE)
    assert r.receive(evil) is Outcome.ACCEPTED  # as in reality: nothing protects a shared page
    assert dst.read_plain(2) == bytes(PAGE) != src.read_plain(2)


@pytest.mark.parametrize("where, bit, outcome", [
    (0, 1, Outcome.BAD_TAG), (8, 1, Outcome.BAD_TAG), (16, 1, Outcome.BAD_TAG), (24, 1, Outcome.BAD_TAG),  # gfn..stream
    (26, 8, Outcome.BAD_TAG),  # flags: claims COMPRESSED
    (28, 1, Outcome.MALFORMED),  # payload_len no longer matches the packet
    (HEADER_BYTES + 5, 1, Outcome.BAD_TAG), (-1, 0x80, Outcome.BAD_TAG)])  # ciphertext, tag
def test_a_flipped_bit_anywhere_in_a_sealed_packet_is_refused(where, bit, outcome):
    src, dst, s, r = pair()
    write(src, 3, 8)
    p = bytearray(s.send_page(3, 1, stream=1))
    p[where] ^= bit
    assert r.receive(bytes(p)) is outcome
    assert dst.read_plain(3) == bytes(PAGE) and r.held_version(3) is None  # nothing changed
    assert r.receive(s.send_page(3, 2, stream=1)) is Outcome.BAD_SEQUENCE  # sequence 0 was never accepted...
    # ...so the stream is stuck until the sender re-sends sequence 0 (the driver aborts instead).


def test_a_forged_zero_page_cannot_wipe_a_private_page():
    src, dst, s, r = pair()
    write(src, 3, 8)
    assert r.receive(s.send_page(3, 1, stream=1)) is Outcome.ACCEPTED
    forged = Header(3, 1, 2, 1, Flag.PRIVATE | Flag.ZERO, TAG_BYTES).pack() + bytes(TAG_BYTES)
    assert r.receive(forged) is Outcome.BAD_TAG and dst.read_plain(3) == src.read_plain(3)


def test_dropped_replayed_and_reordered_packets_are_bad_sequences():
    src, dst, s, r = pair()
    for g in range(4):
        write(src, g, g + 1)
    p0, p1, p2, p3 = s.send_pages(range(4), 1, stream=1)
    assert r.receive_many([p0, p2]) == [Outcome.ACCEPTED, Outcome.BAD_SEQUENCE]  # p1 dropped
    assert r.receive_many([p1, p1, p0]) == [Outcome.ACCEPTED, Outcome.BAD_SEQUENCE, Outcome.BAD_SEQUENCE]  # replays
    assert r.receive_many([p3, p2, p3]) == [Outcome.BAD_SEQUENCE, Outcome.ACCEPTED, Outcome.ACCEPTED]  # reorder
    assert r.stats.to_json()["outcomes"] == {"accepted": 4, "bad_sequence": 4}
    # Streams are independent: each has its own sequence.
    q = s.send_page(0, 1, stream=2)
    assert parse_header(q).sequence == 0 and r.receive(q) is Outcome.ACCEPTED


def test_a_packet_for_another_stream_key_fails_its_tag():
    src, dst, s, r = pair()
    p = bytearray(s.send_page(0, 0, stream=1))
    p[24:26] = struct.pack("<H", 2)  # claim stream 2: other key, other nonce, other AAD
    assert r.receive(bytes(p)) is Outcome.BAD_TAG


def test_stale_version_is_dropped_but_consumes_its_sequence():
    src, dst, s, r = pair()
    write(src, 5, 1)
    old = s.send_page(5, 3, stream=2)  # version 3 on stream 2...
    write(src, 5, 2)
    new = s.send_page(5, 5, stream=1)  # ...overtaken by version 5 on stream 1
    assert r.receive(new) is Outcome.ACCEPTED
    assert r.receive(old) is Outcome.STALE_VERSION
    assert dst.read_plain(5) == src.read_plain(5) and r.held_version(5) == 5
    again = s.send_page(5, 5, stream=2)  # same version again (e.g. a post-copy reply): accepted
    assert r.receive(again) is Outcome.ACCEPTED  # sequence 1 of stream 2: the stale one consumed 0
    assert r.token() == s.token()  # the stale packet counts on both sides


def test_malformed_packets():
    src, dst, s, r = pair()
    good = s.send_page(0, 0, stream=1)
    assert r.receive(good[:20]) is Outcome.MALFORMED  # shorter than a header
    assert r.receive(good + b"x") is Outcome.MALFORMED  # payload_len disagrees
    both = Header(0, 0, 0, 1, Flag.PRIVATE | Flag.SHARED, 0).pack()
    assert r.receive(both) is Outcome.MALFORMED  # two kinds at once
    unknown = struct.pack("<QQQHHI", 0, 0, 0, 1, 64, 0)
    assert r.receive(unknown) is Outcome.MALFORMED  # unknown flag bit
    no_room_for_a_tag = Header(0, 0, 0, 1, Flag.PRIVATE, 4).pack() + b"abcd"
    assert r.receive(no_room_for_a_tag) is Outcome.MALFORMED
    zero_with_body = Header(0, 0, 0, 1, Flag.SHARED | Flag.ZERO, 4).pack() + b"abcd"
    assert r.receive(zero_with_body) is Outcome.MALFORMED
    far = HostMemory.for_host(SEED, 0, npages=64, spa_base=1024)
    s2, _ = endpoints(HS, far, dst)
    assert r.receive(s2.send_page(40, 0, stream=3)) is Outcome.MALFORMED  # gfn beyond the target's guest
    assert r.receive(good) is Outcome.ACCEPTED


def test_vmsas_are_sealed_and_counted_in_the_token():
    src, dst, s, r = pair(level=3)
    vmsa = emulated_vmsa(SEED, 1, 0)
    assert emulated_vmsa(SEED, 1, 0) == vmsa != emulated_vmsa(SEED, 1, 2)
    p = s.send_vmsa(1, 0, vmsa, stream=0)
    h = parse_header(p)
    assert h.flags == Flag.VMSA | Flag.COMPRESSED and h.gfn == 4 and vmsa[:256] not in p
    assert r.receive(p) is Outcome.ACCEPTED and r.vmsas == {(1, 0): vmsa}
    assert r.token() == s.token() and s.token().vmsas == 1 and s.token().pages == 0
    bad = bytearray(s.send_vmsa(1, 2, emulated_vmsa(SEED, 1, 2), stream=0))
    bad[-1] ^= 1
    assert r.receive(bytes(bad)) is Outcome.BAD_TAG and (1, 2) not in r.vmsas


def test_sequence_numbers_never_wrap():
    src, dst, s, r = pair()
    s.stats.sequences[1] = (1 << 64) - 1
    with pytest.raises(OverflowError, match="stream 1: sequence numbers exhausted"):
        s.send_page(0, 0, stream=1)


# ---------------------------------------------------------------------------------------------- token


def migrate_all(s, r, n, streams=(1, 2)):
    """Send every page, alternating streams, and one VMSA; the packets, in order."""
    pk = [q for g in range(n) for q in s.send_pages([g], 1, stream=streams[g % len(streams)])]
    pk.append(s.send_vmsa(0, 0, emulated_vmsa(SEED, 0, 0), stream=0))
    return pk


def test_token_matches_after_a_complete_transfer():
    src, dst, s, r = pair(shared=[(12, 15)])
    for g in (1, 5, 13):
        write(src, g, g)
    pk = migrate_all(s, r, 16)
    assert set(r.receive_many(pk)) == {Outcome.ACCEPTED}
    tok = s.token()
    assert (tok.pages, tok.vmsas) == (12, 1)  # the 12 private pages, zero or not; shared pages are not in it
    assert r.check_token(s.send_token(stream=3)) is TokenOutcome.MATCH
    # The token by hand: per stream, SHA-384 over header + tag of each sealed packet, in stream order.
    per = {}
    for p in pk:
        h = parse_header(p)
        if h.flags & (Flag.PRIVATE | Flag.VMSA):
            c, hh = per.get(h.stream, (0, hashlib.sha384()))
            hh.update(p[:HEADER_BYTES] + p[-TAG_BYTES:])
            per[h.stream] = (c + 1, hh)
    top = hashlib.sha384(b"snp-replay token v1")
    for stream in sorted(per):
        top.update(struct.pack("<HQ", stream, per[stream][0]) + per[stream][1].digest())
    assert tok.digest == top.digest()
    assert src.plaintext_digest() == dst.plaintext_digest()


def test_token_mismatch_when_the_last_packet_never_arrives():
    src, dst, s, r = pair()
    write(src, 3, 3)
    pk = migrate_all(s, r, 4)
    r.receive_many(pk[:-2] + pk[-1:])  # the last page of stream 2 is lost: no later packet shows the gap
    assert r.stats.outcomes == {Outcome.ACCEPTED: 4}
    assert r.check_token(s.send_token(stream=3)) is TokenOutcome.COUNT_MISMATCH


def test_token_hash_mismatch_and_rejected_token():
    a, b = Token(3, 1, bytes(48)), Token(3, 1, b"\x01" + bytes(47))
    assert compare(a, a) is TokenOutcome.MATCH
    assert compare(a, b) is TokenOutcome.HASH_MISMATCH
    assert compare(a, Token(2, 1, bytes(48))) is TokenOutcome.COUNT_MISMATCH
    assert Token.from_bytes(b.to_bytes()) == b
    # Same counts, other packets: the target got a different (authentic) page than the source's token covers.
    src, dst, s, r = pair()
    write(src, 1, 1)
    other = endpoints(HS, src, dst)[0]
    r.receive(other.send_page(1, 1, stream=1))
    s.send_page(1, 2, stream=1)
    assert r.check_token(s.send_token(stream=3)) is TokenOutcome.HASH_MISMATCH
    # A tampered token packet is rejected outright.
    src, dst, s, r = pair()
    t = bytearray(s.send_token(stream=3))
    t[HEADER_BYTES] ^= 1
    assert r.check_token(bytes(t)) is TokenOutcome.TOKEN_REJECTED
    assert r.receive(s.send_token(stream=4)) is Outcome.MALFORMED  # a token is not a page


# ---------------------------------------------------------------------------------------------- properties


def test_same_seed_gives_byte_identical_packets():
    def run(seed):
        hs = establish(seed)
        src = HostMemory.for_host(seed, 0, npages=8, spa_base=1024, shared_ranges=[(6, 7)])
        dst = HostMemory.for_host(seed, 1, npages=8, spa_base=2048)
        for g in (0, 2, 6):
            write(src, g, g + 10, ln=100)
        s, _ = endpoints(hs, src, dst, compress_level=3)
        return s.send_pages(range(8), 1, stream=1) + [s.send_vmsa(0, 0, emulated_vmsa(seed, 0, 0), 0), s.send_token(2)]

    assert run(SEED) == run(SEED)
    assert run(SEED)[0] != run(SEED + 1)[0]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(pages=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 2**64 - 1), st.integers(1, PAGE),
                                st.integers(0, PAGE - 1)), max_size=12),
       shared=st.sets(st.integers(0, 15), max_size=5), level=st.sampled_from([None, 1, 3]),
       stream=st.integers(0, 65535))
def test_any_memory_round_trips(pages, shared, level, stream):
    src, dst, s, r = pair(level=level)
    for g, value, ln, off in pages:
        write(src, g, value, ln=min(ln, PAGE - off), off=off)
    src.set_private(sorted(shared), False)
    out = r.receive_many(s.send_pages(range(16), range(16), stream=stream))
    assert out == [Outcome.ACCEPTED] * 16
    assert dst.plaintext_digest() == src.plaintext_digest()
    assert all(dst.is_private(g) == (g not in shared) for g in range(16))
    assert r.check_token(s.send_token(stream=(stream + 1) % 65536)) is TokenOutcome.MATCH


def test_migration_mid_trace_ends_with_the_straight_replay_memory(tmp_path):
    """Replay part of a trace at the source, move every page through the sealed channel, replay the rest at
    the target: the end-of-trace plain text is the no-migration one (SPEC section 4's invariant)."""
    path = tmp_path / "t.arrow"
    generate("psc", path, guest_bytes=32 * PAGE, vcpus=2, events=2000, seed=4, burst_every=300, burst_pages=3,
             shared_bytes=4 * PAGE, batch_rows=500)
    with open_trace(path) as tr:
        meta = tr.meta
        src = HostMemory.for_host(SEED, 0, npages=meta.npages, spa_base=1024, shared_ranges=meta.shared_ranges)
        dst = HostMemory.for_host(SEED, 1, npages=meta.npages, spa_base=4096, shared_ranges=meta.shared_ranges)
        s, r = endpoints(HS, src, dst, compress_level=1)
        batches = [b for _, b in tr]
    assert len(batches) == 4
    for b in batches[:2]:
        src.apply_batch(b)
    assert set(r.receive_many(s.send_pages(range(meta.npages), 1, stream=1))) == {Outcome.ACCEPTED}
    assert dst.plaintext_digest() == src.plaintext_digest()  # at switchover the target holds the source's memory
    for b in batches[2:]:
        dst.apply_batch(b)
    assert dst.plaintext_digest() == replay_plaintext_digest(path)
    assert src.plaintext_digest() != dst.plaintext_digest()  # the second half did change memory
    # and rows written to the target after switchover are encrypted under the target's key
    g = int(np.flatnonzero([dst.is_private(i) and dst.read_plain(i) != bytes(PAGE) for i in range(meta.npages)])[0])
    assert dst.read_raw(g) != dst.read_plain(g)


def test_two_copies_of_a_page_in_one_batch_the_newer_stays():
    src, dst, s, r = pair()
    write(src, 2, 1)
    v1 = s.send_page(2, 1, stream=1)
    write(src, 2, 2)
    first = src.read_plain(2)
    v2 = s.send_page(2, 2, stream=1)
    older = s.send_page(2, 1, stream=1)  # an authentic packet claiming an older version
    assert r.receive_many([v1, v2, older]) == [Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.STALE_VERSION]
    assert dst.read_plain(2) == first and r.held_version(2) == 2


def test_zero_pages_keep_the_target_sparse_and_overwrite_stored_pages():
    src, dst, s, r = pair(npages=64, shared=[(60, 63)])
    write(dst, 7, 1)  # the target holds stale contents for gfn 7 (e.g. from an earlier round)
    write(src, 9, 2)
    assert set(r.receive_many(s.send_pages(range(64), 1, stream=1))) == {Outcome.ACCEPTED}
    assert dst.stored_pages == 2  # gfn 9's contents, and gfn 7 now zero; no page allocated for the 62 others
    assert dst.read_plain(7) == bytes(PAGE) and dst.read_raw(7) != bytes(PAGE)  # private zeros: ciphertext
    assert dst.plaintext_digest() == src.plaintext_digest()
    assert not dst.is_private(61) and dst.read_raw(61) == bytes(PAGE)


def test_api_misuse_is_refused():
    src, dst, s, r = pair()
    with pytest.raises(ValueError, match="stream must be in 0..65535"):
        s.send_page(0, 0, stream=65536)
    with pytest.raises(ValueError, match="vmpl must be in 0..3"):
        vmsa_id(0, 4)
    with pytest.raises(ValueError, match="a VMSA is one 4096-byte page"):
        s.send_vmsa(0, 0, b"short", stream=0)
    with pytest.raises(IndexError, match="gfn 16 outside the guest"):
        s.send_pages([16], 0, stream=1)
    with pytest.raises(ValueError, match="vmpl must be in 0..3"):
        s.send_vmsa(0, 7, bytes(PAGE), stream=0)
    assert s.stats.sequences == {} and s.stats.to_json()["private_pages"] == s.stats.vmsas == 0  # nothing counted


# ---------------------------------------------------------------------------------------------- batches


def state(r):
    """Everything a receiver's checks leave behind (for comparing two receivers)."""
    return (r.stats.to_json(), r.token(), r._held.tolist(), r.memory.plaintext_digest(),
            [r.memory.is_private(g) for g in range(r.memory.npages)])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(pages=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 2**64 - 1), st.integers(1, PAGE)), max_size=10),
       shared=st.sets(st.integers(0, 15), max_size=4), level=st.sampled_from([None, 3]),
       sent=st.lists(st.integers(0, 15), min_size=1, max_size=16), older=st.sets(st.integers(0, 15), max_size=4),
       tamper=st.sampled_from(["none", "flip", "drop", "swap"]))
def test_the_whole_batch_path_equals_packet_by_packet(pages, shared, level, sent, older, tamper):
    """A receiver taking batches whole ends exactly as one taking every packet alone, clean or tampered,
    with stale versions and repeats; and a sender-made clean batch of distinct pages takes the whole path."""
    src, dst, s, r = pair(level=level)
    twin_dst = HostMemory.for_host(SEED, 1, npages=16, spa_base=2048)
    twin = endpoints(HS, src, twin_dst)[1]
    for g, value, ln in pages:
        write(src, g, value, ln=ln)
    src.set_private(sorted(shared), False)
    first = s.send_pages(range(16), 5, stream=1)  # the target holds version 5 of every page
    assert r.receive_many(first) == twin._receive_each(first) == [Outcome.ACCEPTED] * 16
    packets = s.send_pages(sent, [4 if g in older else 6 for g in sent], stream=1)
    if tamper == "flip":
        packets[0] = packets[0][:-1] + bytes([packets[0][-1] ^ 1])
    elif tamper == "drop":
        packets = packets[1:]
    elif tamper == "swap" and len(packets) > 1:
        packets[0], packets[1] = packets[1], packets[0]
    distinct = len(set(sent)) == len(sent) and sorted(sent) == sent
    whole = r._receive_batch(packets) if tamper == "none" and distinct else None
    got = whole if whole is not None else r.receive_many(packets)
    assert got == twin._receive_each(packets)
    assert state(r) == state(twin)
    if tamper == "none" and distinct:
        assert whole is not None  # nothing unusual: the batch went through whole
        assert got == [Outcome.STALE_VERSION if g in older else Outcome.ACCEPTED for g in sent]


def test_batch_path_takes_nothing_it_cannot_finish():
    """A batch refused by the whole path leaves no trace before the packet-by-packet path runs."""
    src, dst, s, r = pair()
    write(src, 3, 9)
    packets = s.send_pages([2, 3], 1, stream=1)
    bad = [packets[0], packets[1][:-1] + bytes([packets[1][-1] ^ 1])]
    assert r._receive_batch(bad) is None
    assert r.stats.to_json() == endpoints(HS, src, HostMemory.for_host(SEED, 1, npages=16, spa_base=2048))[1].stats.to_json()
    assert r.receive_many(bad) == [Outcome.ACCEPTED, Outcome.BAD_TAG]


def test_gcm_in_c_and_through_cryptography_give_the_same_packets(monkeypatch):
    from replay.security import gcm

    src, dst, s, r = pair(shared=[(6, 7)])
    for g in range(8):
        write(src, g, g + 1, ln=PAGE if g % 2 else 40)
    fast = s.send_pages(range(10), 2, stream=3)
    monkeypatch.setattr(gcm, "gcm_seal", None)
    monkeypatch.setattr(gcm, "gcm_open", None)
    src2, dst2, s2, r2 = pair(shared=[(6, 7)])
    for g in range(8):
        write(src2, g, g + 1, ln=PAGE if g % 2 else 40)
    assert s2.send_pages(range(10), 2, stream=3) == fast
    assert s2.token() == s.token()
    fast[1] = fast[1][:40] + bytes([fast[1][40] ^ 4]) + fast[1][41:]  # a flipped ciphertext bit
    assert r2.receive_many(fast) == [Outcome.ACCEPTED, Outcome.BAD_TAG] + [Outcome.BAD_SEQUENCE] * 8
    monkeypatch.undo()
    assert r.receive_many(fast) == [Outcome.ACCEPTED, Outcome.BAD_TAG] + [Outcome.BAD_SEQUENCE] * 8
    assert state(r) == state(r2)


def test_one_batch_on_the_wire_whatever_the_threads_and_the_library(monkeypatch):
    """A batch sealed straight from two places (a memory and a buffer of captured pages, with shared, zero
    and private pages) is the same wire bytes split on two threads or on one, and through `cryptography`;
    the receiver takes the Wire or the packets as bytes alike."""
    from replay.security import gcm, parallel
    from replay.security.channel import PageRefs, Wire

    def batch(threads, c_code, split_min):
        monkeypatch.setattr(parallel, "THREADS", threads)
        monkeypatch.setattr(parallel, "SPLIT_MIN", split_min)
        if not c_code:
            monkeypatch.setattr(gcm, "gcm_seal", None)
            monkeypatch.setattr(gcm, "gcm_open", None)
        src, dst, s, r = pair(npages=32, shared=[(6, 9)])
        for g in range(20):
            write(src, g, g + 7, ln=PAGE if g % 3 else 24)
        captured = np.zeros((5, PAGE), np.uint8)
        captured[1:] = src.read_plain_many([12, 7, 3, 30])  # 30: never written (zero)
        pages, rows = src.plain_rows(np.arange(16))
        refs = PageRefs((pages, captured), np.array([0] * 11 + [1] * 5, np.int8),
                        np.concatenate([rows[:11], np.arange(5)]),
                        np.concatenate([src.private_mask(np.arange(11)), [True, True, False, True, True]]))
        gfns = np.array(list(range(11)) + [20, 12, 7, 3, 30])
        wire = s.seal_pages(gfns, 4, stream=2, contents=refs)
        packets = wire.packets()
        got = r.receive_many(wire)
        monkeypatch.undo()
        assert [dst.read_plain(int(g)) for g in gfns] == [src.read_plain(int(g)) for g in gfns]
        assert [dst.is_private(int(g)) for g in gfns] == refs.private.tolist()
        return packets, got, s.token(), r.token(), dst.plaintext_digest()

    one = batch(1, True, 256)
    assert one[1] == [Outcome.ACCEPTED] * 16
    # gfn 9 shared (in place), 10 private (in place), 20 and 12 private from the captured rows, 20 zero
    assert [parse_header(p).flags for p in one[0]][9:13] == [Flag.SHARED, Flag.PRIVATE, Flag.PRIVATE | Flag.ZERO,
                                                             Flag.PRIVATE]
    assert batch(2, True, 2) == one  # split in halves on two threads
    assert batch(1, False, 256) == one  # cryptography, packet by packet
    # The packets as bytes (what an adversary sees) go through the same checks.
    src, dst, s, r = pair(npages=32)
    write(src, 3, 1)
    w = s.seal_pages([3, 4], 1, stream=1)
    assert r.receive_many(Wire.of(w.packets())) == [Outcome.ACCEPTED] * 2


def test_a_wire_still_held_is_never_written_over():
    """The sender reuses its wire buffer for the next batch only once the last batch is gone."""
    src, dst, s, r = pair()
    write(src, 1, 5)
    first = s.seal_pages([1, 2], 1, stream=1)
    before = first.packets()
    write(src, 1, 6)
    second = s.seal_pages([1, 2], 2, stream=1)
    assert first.packets() == before and second.packets() != before
    assert second.buffer is not first.buffer
    del first
    third = s.seal_pages([1], 3, stream=1)
    assert third.buffer is not second.buffer  # the second is still held too
    held = third.buffer
    del second, third
    assert s.seal_pages([1], 4, stream=1).buffer is held  # nothing held: reused


def test_a_compressed_vmsa_counts_once():
    # (issue 22, a tools/mutate survivor) A VMSA goes through the single-packet path: 256 bytes of register
    # state and zeros compress; it counts as one compressed page, of fewer bytes than a page.
    src, dst, s, r = pair(level=3)
    s.send_vmsa(0, 0, emulated_vmsa(SEED, 0, 0), stream=0)
    st = s.stats.to_json()
    assert (st["vmsas"], st["compressed_pages"], st["payload_bytes"]) == (1, 1, PAGE)
    assert st["compressed_bytes"] < PAGE


# ------------------------------------------------------------- token and batch checks (issue 22 mutants)


def test_a_page_packet_offered_as_the_token_is_rejected_but_counted_like_any_page():
    src, dst, s, r = pair()
    write(src, 2, 9)
    page = s.send_page(2, 1, stream=3)
    # An authentic page where the token should be: refused as a token, yet it was opened in sequence, so
    # its header + tag join the target's token like every page received (the source's has it too).
    assert r.check_token(page) is TokenOutcome.TOKEN_REJECTED
    assert r.stats.outcomes == {Outcome.MALFORMED: 1}
    assert r.token() == s.token() and r.token().pages == 1
    assert r.check_token(s.send_token(stream=3)) is TokenOutcome.MATCH


def test_a_token_sized_packet_without_the_token_flag_is_not_a_token():
    src, dst, s, r = pair()
    body = s.token().to_bytes()  # exactly a token's size and contents, sealed with a page's flag
    forged = s._seal(0, 0, 3, int(Flag.PRIVATE), body)
    assert r.check_token(forged) is TokenOutcome.TOKEN_REJECTED
    assert r.stats.outcomes == {Outcome.MALFORMED: 1}


def test_a_batch_mixing_streams_is_checked_packet_by_packet():
    src, dst, s, r = pair(shared=[(1, 2)])
    for g in range(3):
        write(src, g, g + 1)
    a0 = s.send_page(0, 1, stream=1)
    b0, b1 = s.send_pages([1, 2], 1, stream=2)  # shared pages: no tag ties them to stream 2's key
    # b1 is stream 2's second packet; stream 2's first never arrived: a gap on stream 2 even though the
    # batch's sequence numbers (0, 1) would be in order for stream 1 alone.
    assert r.receive_many([a0, b1]) == [Outcome.ACCEPTED, Outcome.BAD_SEQUENCE]
    assert r.receive_many([b0, b1]) == [Outcome.ACCEPTED] * 2
    assert [dst.read_plain(g) for g in range(3)] == [src.read_plain(g) for g in range(3)]


@pytest.mark.parametrize("c_code", [True, False])
def test_seal_many_refuses_a_wire_one_byte_short(monkeypatch, c_code):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from replay.security import gcm

    if not c_code:
        monkeypatch.setattr(gcm, "gcm_seal", None)
    key, a, ln = bytes(range(32)), 24, 100
    nonces, aad = np.zeros((1, 12), np.uint8), np.arange(a, dtype=np.uint8).reshape(1, a)
    body = bytes(range(ln))

    def seal(wire_bytes):
        wire = np.zeros(wire_bytes, np.uint8)
        gcm.seal_many(key, nonces, aad, (body,), [0], [0], [ln], [1], wire, [0])
        return wire.tobytes()

    size = a + ln + TAG_BYTES
    assert seal(size) == aad.tobytes() + AESGCM(key).encrypt(bytes(12), body, aad.tobytes())
    with pytest.raises(ValueError, match="packet 0 .*does not fit the wire"):
        seal(size - 1)


def test_halves_splits_a_batch_at_its_middle(monkeypatch):
    import threading

    from replay.security import parallel

    monkeypatch.setattr(parallel, "THREADS", 2)
    monkeypatch.setattr(parallel, "SPLIT_MIN", 4)
    calls, lock = [], threading.Lock()

    def work(lo, hi):
        with lock:
            calls.append((lo, hi))

    parallel.halves(7, work)  # 7 // 2 = 3: the first half is the smaller one
    assert sorted(calls) == [(0, 3), (3, 7)]
    calls.clear()
    parallel.halves(3, work)  # below SPLIT_MIN: at once
    assert calls == [(0, 3)]
