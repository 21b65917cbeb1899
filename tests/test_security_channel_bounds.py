"""The migration channel's limits at their exact ends (replay/security/channel.py).

A stream is 16 bits (65535 is used, 65536 and -1 are refused before anything is counted); a stream's
sequence numbers run to 2^64 - 2 (the last nonce: 2^64 - 1 is never sent, so no nonce repeats), whether
one packet or a batch takes them; a VMSA is one 4096-byte page at VMPL 0..3; the last gfn of the target's
guest is accepted and the one past it refused; a stream's statistics are exact by hand for one of each
packet kind on two streams.
"""

from __future__ import annotations

import numpy as np
import pytest

from replay.security.channel import HEADER_BYTES, TAG_BYTES, Flag, Outcome, parse_header, vmsa_id
from replay.security.memory import HostMemory
from replay.security.session import emulated_vmsa, endpoints, establish

PAGE = 4096
SEED = 9
HS = establish(SEED)
LAST = (1 << 64) - 2  # the last sequence number a packet may carry


def pair(npages=8, target_npages=None, shared=()):
    src = HostMemory.for_host(SEED, 0, npages=npages, spa_base=1024, shared_ranges=shared)
    dst = HostMemory.for_host(SEED, 1, npages=target_npages or npages, spa_base=2048, shared_ranges=shared)
    s, r = endpoints(HS, src, dst)
    return src, dst, s, r


def write(mem, gfn, value):
    mem.apply(np.array([gfn * PAGE], np.uint64), np.array([8], np.uint64), np.zeros(1, np.uint8),
              np.array([value], np.uint64))


@pytest.mark.parametrize("stream", [-1, 65536])
def test_a_stream_beyond_16_bits_is_refused_before_anything_is_counted(stream):
    _, _, s, _ = pair()
    before = s.stats.to_json()
    for send in (lambda: s.send_pages([1], 0, stream), lambda: s.send_vmsa(0, 0, emulated_vmsa(SEED, 0, 0), stream),
                 lambda: s.send_token(stream)):
        with pytest.raises(ValueError, match=f"^stream must be in 0..65535, got {stream}$"):
            send()
    assert s.stats.to_json() == before and s.token().pages == 0


def test_stream_65535_carries_pages_vmsas_and_the_token():
    src, _dst, s, r = pair()
    write(src, 3, 1)
    pk = s.send_pages([3], 1, 65535) + [s.send_vmsa(1, 3, emulated_vmsa(SEED, 1, 3), 65535)]
    assert [parse_header(p).stream for p in pk] == [65535, 65535]
    assert r.receive_many(pk) == [Outcome.ACCEPTED] * 2
    assert r.check_token(s.send_token(65535)).value == "match"
    assert s.stats.sequences == {65535: 3}


def test_the_last_sequence_number_is_two_to_the_64_minus_2_for_a_page():
    src, dst, s, r = pair()
    s.stats.sequences[1] = r.stats.sequences[1] = LAST
    write(src, 2, 7)
    p = s.send_page(2, 1, 1)
    assert parse_header(p).sequence == LAST and s.stats.sequences[1] == LAST + 1
    assert r.receive(p) is Outcome.ACCEPTED and dst.read_plain(2) == src.read_plain(2)
    with pytest.raises(OverflowError, match="^stream 1: sequence numbers exhausted$"):
        s.send_page(2, 1, 1)


def test_a_batch_may_end_on_the_last_sequence_number_but_not_past_it():
    _src, _dst, s, r = pair()
    s.stats.sequences[4] = LAST - 1
    with pytest.raises(OverflowError, match="^stream 4: sequence numbers exhausted$"):
        s.send_pages([1, 2, 3], 0, 4)
    assert s.stats.sequences[4] == LAST - 1 and s.stats.private_pages == 0  # nothing taken
    r.stats.sequences[4] = LAST - 1
    pk = s.send_pages([1, 2], 0, 4)
    assert [parse_header(p).sequence for p in pk] == [LAST - 1, LAST]
    assert r.receive_many(pk) == [Outcome.ACCEPTED] * 2 and r.stats.sequences[4] == LAST + 1


def test_the_last_sequence_number_for_a_vmsa_and_the_token():
    _, _, s, _ = pair()
    s.stats.sequences[0] = LAST
    assert parse_header(s.send_vmsa(0, 0, emulated_vmsa(SEED, 0, 0), 0)).sequence == LAST
    with pytest.raises(OverflowError, match="^stream 0: sequence numbers exhausted$"):
        s.send_vmsa(0, 1, emulated_vmsa(SEED, 0, 1), 0)
    with pytest.raises(OverflowError, match="^stream 0: sequence numbers exhausted$"):
        s.send_token(0)


def test_vmsa_ids_and_sizes():
    assert [vmsa_id(2, v) for v in range(4)] == [8, 9, 10, 11]
    for vmpl in (-1, 4):
        with pytest.raises(ValueError, match=r"^vmpl must be in 0\.\.3$"):
            vmsa_id(0, vmpl)
    _, _, s, _ = pair()
    for size in (PAGE - 1, PAGE + 1):
        with pytest.raises(ValueError, match=f"^a VMSA is one 4096-byte page, got {size}$"):
            s.send_vmsa(0, 0, bytes(size), 0)
    assert s.stats.vmsas == 0 and s.stats.sequences == {}


def test_the_last_gfn_of_the_targets_guest_is_accepted_and_the_next_refused():
    src, dst, s, r = pair(npages=9, target_npages=8)
    write(src, 7, 3)
    write(src, 8, 4)
    assert r.receive_many(s.send_pages([7], 1, 1)) == [Outcome.ACCEPTED]
    assert r.receive_many(s.send_pages([8], 1, 1)) == [Outcome.MALFORMED]
    assert r.receive_many(s.send_pages([7, 8], 2, 1)) == [Outcome.ACCEPTED, Outcome.MALFORMED]
    assert r.held_version(7) == 2 and dst.read_plain(7) == src.read_plain(7)


def test_statistics_by_hand_for_one_packet_of_each_kind():
    # gfn 1 private written, gfn 2 private never written (zero), gfn 5 shared written, gfn 6 shared zero;
    # one VMSA on stream 0. No compression: payloads are whole pages.
    src, _dst, s, r = pair(shared=[(5, 7)])
    write(src, 1, 11)
    write(src, 5, 12)
    pk = s.send_pages([1, 2, 5, 6], [3, 3, 4, 4], 2) + [s.send_vmsa(0, 2, emulated_vmsa(SEED, 0, 2), 0)]
    sizes = [32 + PAGE + 16, 32 + 16, 32 + PAGE, 32, 32 + PAGE + 16]
    assert [len(p) for p in pk] == sizes
    assert [parse_header(p).flags for p in pk] == [Flag.PRIVATE, Flag.PRIVATE | Flag.ZERO, Flag.SHARED,
                                                   Flag.SHARED | Flag.ZERO, Flag.VMSA]
    want_sender = {"private_pages": 2, "shared_pages": 2, "zero_pages": 2, "vmsas": 1, "compressed_pages": 0,
                   "payload_bytes": 3 * PAGE, "compressed_bytes": 3 * PAGE, "wire_bytes": sum(sizes),
                   "outcomes": {}, "sequences": {"0": 1, "2": 4}}
    assert s.stats.to_json() == want_sender
    assert r.receive_many(pk) == [Outcome.ACCEPTED] * 5
    assert r.stats.to_json() == {**want_sender, "outcomes": {"accepted": 5}}
    # A replayed packet is a bad sequence, counted, and changes nothing else.
    assert r.receive(pk[0]) is Outcome.BAD_SEQUENCE
    assert r.stats.to_json() == {**want_sender, "outcomes": {"accepted": 5, "bad_sequence": 1}}
    t = s.token()
    assert (t.pages, t.vmsas) == (2, 1) and r.token() == t
    assert HEADER_BYTES == 32 and TAG_BYTES == 16


def test_flags_on_the_wire_are_the_documented_bits():
    # The header's u16 at byte 26: PRIVATE 1, SHARED 2, ZERO 4, COMPRESSED 8, VMSA 16, TOKEN 32.
    import struct

    src, _dst, s, _r = pair(shared=[(5, 7)])
    write(src, 5, 1)
    pk = s.send_pages([1, 5, 6], 1, 1) + [s.send_vmsa(0, 0, emulated_vmsa(SEED, 0, 0), 0), s.send_token(3)]
    assert [struct.unpack_from("<H", p, 26)[0] for p in pk] == [1 | 4, 2, 2 | 4, 16, 32]


def test_nonces_are_stream_then_sequence_big_endian_one_row_each():
    from replay.security.channel import nonce, nonces

    got = nonces(7, np.array([1, (1 << 64) - 2], np.uint64))
    assert got.shape == (2, 12) and got.dtype == np.uint8
    assert got.tobytes() == nonce(7, 1) + nonce(7, (1 << 64) - 2)
    assert nonce(7, 1) == bytes([0, 0, 0, 7]) + bytes(7) + bytes([1])


def _hdr(flags, plen, extra=None):
    from replay.security.channel import Header

    return Header(3, 0, 0, 1, flags, plen).pack() + (bytes(plen) if extra is None else extra)


def test_a_header_is_refused_for_each_defect_on_its_own():
    # Each packet has exactly one defect; the good ones beside them parse.
    assert parse_header(_hdr(Flag.SHARED, PAGE)).flags == Flag.SHARED
    assert parse_header(_hdr(Flag.SHARED, 4, b"abcde")) is None  # payload_len says 4, 5 bytes follow
    assert parse_header(_hdr(Flag.SHARED | 64, 0)) is None  # an unknown flag bit with one kind
    assert parse_header(_hdr(Flag.SHARED | Flag.VMSA, 0)) is None  # two kinds
    assert parse_header(_hdr(Flag.ZERO, 0)) is None  # no kind
    assert parse_header(_hdr(Flag.PRIVATE, PAGE + 16)).flags == Flag.PRIVATE  # a sealed page
    assert parse_header(_hdr(Flag.PRIVATE, 15)) is None  # sealed, no room for the tag
    assert parse_header(_hdr(Flag.PRIVATE | Flag.ZERO, 16)).flags == Flag.PRIVATE | Flag.ZERO
    assert parse_header(_hdr(Flag.PRIVATE | Flag.ZERO, 17)) is None  # a zero page carries the tag alone
    assert parse_header(_hdr(Flag.SHARED | Flag.ZERO, 0)).flags == Flag.SHARED | Flag.ZERO  # the header alone
    assert parse_header(_hdr(Flag.SHARED | Flag.ZERO, 16)) is None
    assert parse_header(_hdr(Flag.VMSA | Flag.ZERO, 16)) is None  # only pages may be zero
    assert parse_header(_hdr(Flag.TOKEN | Flag.ZERO, 16)) is None
    assert parse_header(_hdr(Flag.SHARED, 0)[:HEADER_BYTES - 1]) is None  # shorter than a header


def test_an_empty_batch_is_an_empty_wire_and_takes_no_sequence_number():
    _src, _dst, s, r = pair()
    w = s.seal_pages([], [], 1)
    assert (len(w), w.buffer.size, w.offsets.size, w.lengths.size, w.packets()) == (0, 0, 0, 0, [])
    assert r.receive_many(w) == [] and s.stats.sequences == {} and r.stats.sequences == {}


def test_a_wire_is_a_batch_on_the_link_compared_by_identity():
    from replay.security.channel import Wire

    a, b = Wire.of([b"x", b"yz"]), Wire.of([b"x", b"yz"])
    assert a != b and a == a and len({a, b}) == 2 and a.packets() == b.packets() == [b"x", b"yz"]


def test_the_senders_options_are_keyword_only():
    from replay.security.channel import Sender

    with pytest.raises(TypeError):
        Sender(HS.source_keys, HostMemory.for_host(SEED, 0, npages=2, spa_base=0), 3)


def test_version_0_is_held_and_vmsas_and_the_token_carry_version_0():
    src, _dst, s, r = pair()
    write(src, 2, 5)
    assert r.held_version(2) is None
    assert r.receive_many(s.send_pages([2], 0, 1)) == [Outcome.ACCEPTED] and r.held_version(2) == 0
    v = parse_header(s.send_vmsa(2, 1, emulated_vmsa(SEED, 2, 1), 0))
    t = parse_header(s.send_token(9))
    assert (v.gfn, v.version, t.gfn, t.version) == (9, 0, 0, 0)
    assert t.payload_len == 8 + 8 + 48 + TAG_BYTES  # pages, vmsas, the SHA-384, the tag


def test_the_receivers_direction_is_keyword_only():
    from replay.security.channel import Receiver

    with pytest.raises(TypeError):
        Receiver(HS.target_keys, HostMemory.for_host(SEED, 1, npages=2, spa_base=0), None)
