"""The receiver's whole-batch path with stale pages (replay/security/channel.py): an older copy of a page
than the target holds is dropped but counted, batch after batch (the stale count adds up, it does not start
at one or go down), and ``receive_all_or_nothing`` takes nothing of a batch holding one: data mode relies on
it to fall back to group-by-group delivery with every count unchanged."""

from __future__ import annotations

from replay.security.channel import Outcome
from test_security_channel import pair, write

STREAM = 1


def test_stale_pages_in_batches_are_counted_and_the_counts_add_up():
    src, dst, s, r = pair()
    for g in (1, 2, 3):
        write(src, g, 10 + g)
    assert r.receive_many(s.send_pages([1], [5], STREAM)) == [Outcome.ACCEPTED]  # the target holds v5 of gfn 1
    # Two batches, each with one older copy of gfn 1 (v3, v4 < v5) beside a new page: 1 + 2 + 2 = 5 packets,
    # 3 accepted, 2 stale.
    assert r.receive_many(s.send_pages([1, 2], [3, 1], STREAM)) == [Outcome.STALE_VERSION, Outcome.ACCEPTED]
    assert r.stats.to_json()["outcomes"] == {"accepted": 2, "stale_version": 1}
    assert r.receive_many(s.send_pages([3, 1], [1, 4], STREAM)) == [Outcome.ACCEPTED, Outcome.STALE_VERSION]
    st = r.stats.to_json()
    assert st["outcomes"] == {"accepted": 3, "stale_version": 2}
    assert st["sequences"] == {"1": 5} and r.held_version(1) == 5  # stale copies use their sequence numbers


def test_all_or_nothing_takes_nothing_of_a_batch_with_a_stale_page():
    src, dst, s, r = pair()
    write(src, 1, 7)
    write(src, 2, 8)
    assert r.receive_many(s.send_pages([1], [5], STREAM)) == [Outcome.ACCEPTED]
    before = r.stats.to_json()
    packets = s.send_pages([2, 1], [1, 3], STREAM)  # gfn 1 at v3: older than the v5 the target holds
    assert r.receive_all_or_nothing(packets) is False
    assert r.stats.to_json() == before and r.held_version(2) is None and dst.read_plain(2) == bytes(4096)
    # The same packets one by one: gfn 2 taken, gfn 1 dropped as stale.
    assert r.receive_many(packets) == [Outcome.ACCEPTED, Outcome.STALE_VERSION]
    assert r.held_version(2) == 1 and dst.read_plain(2) == src.read_plain(2)


def test_all_or_nothing_takes_a_clean_batch_whole():
    src, dst, s, r = pair()
    write(src, 4, 9)
    assert r.receive_all_or_nothing(s.send_pages([4, 5], [2, 2], STREAM)) is True
    assert r.held_version(4) == r.held_version(5) == 2 and dst.read_plain(4) == src.read_plain(4)
    assert r.stats.to_json()["outcomes"] == {"accepted": 2}
