"""Page versions the target cannot hold (replay/security/channel.py): the target keeps versions as signed
64-bit numbers, so a packet whose version is 2^63 or more is ``malformed`` (like a gfn outside the guest),
never a crash, in a batch or alone, whether the host made it up (a shared page: no tag, anyone on the
path can write one) or a sender sealed it; 2^63 - 1 is the largest version taken. Before the fix a
version of 2^63 raised OverflowError in the packet-by-packet path, after its sequence number was used."""

from __future__ import annotations

from replay.security.channel import HEADER, HEADER_BYTES, Flag, Outcome
from test_security_channel import pair, write

STREAM = 1
PAGE = 4096
TOP = (1 << 63) - 1


def shared(gfn, seq, version, fill=7):
    """A shared page's packet as a host writes it: header and plain page, no tag."""
    return HEADER.pack(gfn, seq, version, STREAM, int(Flag.SHARED), PAGE) + bytes([fill]) * PAGE


def test_a_shared_page_with_version_2_to_the_63_is_malformed():
    src, dst, s, r = pair(shared=[(0, 15)])
    assert r.receive(shared(3, 0, 1 << 63)) is Outcome.MALFORMED
    assert r.held_version(3) is None and dst.read_plain(3) == bytes(PAGE)
    # Authentic framing and in sequence: like a gfn outside the guest, its sequence number is used.
    assert r.receive(shared(3, 1, TOP)) is Outcome.ACCEPTED
    assert r.held_version(3) == TOP and dst.read_plain(3) == bytes([7]) * PAGE
    # In one batch with a good page: the good one taken, the other malformed.
    assert r.receive_many([shared(4, 2, 5, 1), shared(5, 3, (1 << 64) - 1, 2)]) == [Outcome.ACCEPTED,
                                                                                     Outcome.MALFORMED]
    assert r.held_version(4) == 5 and r.held_version(5) is None and dst.read_plain(5) == bytes(PAGE)
    assert r.stats.to_json()["outcomes"] == {"accepted": 2, "malformed": 2}


def test_a_sealed_page_with_version_2_to_the_63_is_malformed():
    src, dst, s, r = pair()
    write(src, 1, 5)
    write(src, 2, 6)
    packets = s.send_pages([1, 2], [1 << 63, TOP], STREAM)
    assert len(packets[0]) == HEADER_BYTES + PAGE + 16
    assert r.receive_many(packets) == [Outcome.MALFORMED, Outcome.ACCEPTED]
    assert r.held_version(1) is None and r.held_version(2) == TOP
    assert dst.read_plain(2) == src.read_plain(2) and dst.read_plain(1) == bytes(PAGE)
