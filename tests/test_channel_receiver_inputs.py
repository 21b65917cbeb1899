"""The receiver's inputs and its bookkeeping of stale copies (replay/security/channel.py): packets given
as any iterable (a generator is read once, whole: nothing lost to the batch path's own checks), a stale
zero copy never wipes the newer page the target holds, and stale copies count in no byte tally (what the
target counts is what it installed), and a packet a host makes up whose flags name no kind of page, or two, is
malformed in a batch as alone."""

from __future__ import annotations

import numpy as np
import pytest

from replay.security.channel import HEADER, Flag, Outcome
from test_security_channel import pair, write

STREAM = 1
PAGE = 4096


def test_packets_from_a_generator_are_all_received():
    src, dst, s, r = pair()
    write(src, 1, 5)
    write(src, 2, 6)
    packets = s.send_pages([1, 2], [1, 1], STREAM)
    assert r.receive_many(p for p in packets) == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    assert dst.read_plain(1) == src.read_plain(1) and dst.read_plain(2) == src.read_plain(2)
    packets = s.send_pages([1, 2], [2, 2], STREAM)
    assert r.receive_all_or_nothing(p for p in packets) is True
    assert r.held_version(1) == r.held_version(2) == 2
    assert r.stats.to_json()["sequences"] == {"1": 4}


def test_a_stale_zero_copy_leaves_the_newer_page():
    src, dst, s, r = pair()
    write(src, 6, 9)
    assert r.receive_many(s.send_pages([6], [5], STREAM)) == [Outcome.ACCEPTED]
    kept = dst.read_plain(6)
    assert kept != bytes(PAGE)
    src.install_zero(np.array([6]), np.array([True]))  # the source's copy is now a zero page
    write(src, 7, 1)
    # One batch: gfn 6 as a zero page at v3 (older than the v5 the target holds) and gfn 7 at v1.
    assert r.receive_many(s.send_pages([6, 7], [3, 1], STREAM)) == [Outcome.STALE_VERSION, Outcome.ACCEPTED]
    assert dst.read_plain(6) == kept and r.held_version(6) == 5
    assert dst.read_plain(7) == src.read_plain(7)
    assert r.stats.to_json()["zero_pages"] == 0  # the stale zero copy is not counted as installed


def test_stale_copies_count_in_no_byte_tally():
    src, dst, s, r = pair()
    for g in (1, 2):
        write(src, g, 20 + g)
    assert r.receive_many(s.send_pages([1], [5], STREAM)) == [Outcome.ACCEPTED]
    assert r.receive_many(s.send_pages([1, 2], [3, 1], STREAM)) == [Outcome.STALE_VERSION, Outcome.ACCEPTED]
    st = r.stats.to_json()
    # Installed: gfn 1 (v5) and gfn 2, 4096 bytes each, uncompressed; the stale gfn 1 (v3) not.
    assert st["payload_bytes"] == st["compressed_bytes"] == 2 * PAGE
    assert st["private_pages"] == 2 and st["compressed_pages"] == 0


@pytest.mark.parametrize("flags", [0, int(Flag.PRIVATE | Flag.SHARED), int(Flag.COMPRESSED)])
def test_a_host_made_packet_of_no_kind_or_two_kinds_is_malformed(flags):
    # A plain 4096-byte page whose flags name no kind, or both private and shared: not a page the target
    # can take, in a batch (beside a good shared page) as alone.
    src, dst, s, r = pair(shared=[(0, 15)])
    bad = HEADER.pack(2, 1, 1, STREAM, flags, PAGE) + bytes([9]) * PAGE
    good = HEADER.pack(3, 0, 1, STREAM, int(Flag.SHARED), PAGE) + bytes([8]) * PAGE
    assert r.receive_many([good, bad]) == [Outcome.ACCEPTED, Outcome.MALFORMED]
    assert r.held_version(2) is None and dst.read_plain(2) == bytes(PAGE)
    assert r.receive(bad) is Outcome.MALFORMED
