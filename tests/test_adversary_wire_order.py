"""What the host's wire actions put on the wire, packet by packet, and which send shows them (issue 22:
survivors of tools/mutate in replay/migration/adversary.py's ``_pick``/``_rewrite``/``deliver_pending``).

The run is test_token_adversary's tiny pre-copy run in data mode (round 0 from 5120; the downtime's copy
of gfn 1 at 9220 on stream 1, the VMSA at 10220 on stream 4, the token after it). With no action due
inside it, round 0 goes out on stream 0 in two sends: gfn 0, 1 (sequence 0, 1; versions 1, 2), then
gfn 2, 3 (sequence 2, 3). The target checks each packet in order and takes a sequence number only from a
packet it accepts (replay/security/channel.py), so its counts follow from the order on the wire alone:
the tests write that order down and count. A second scenario (test_adversary_due's, every cost before
round 0 at 0) sends round 0 at 0 ns, its first send gfn 0 alone, still all zeros (a ZERO packet).

The reorder test caught a bug: a reorder of the last packet of a send that had others put the packet
back after the send's first packet (in a send of two: in its own place), not after the stream's next
packet; the run completed with the reorder recorded ``undetected`` though nothing was out of order.
"""

from __future__ import annotations

import pytest

from replay.migration import Migration, run
from replay.scenario.spec import AdversarySpec, with_adversary
from test_adversary_due import _at_zero
from test_precopy import ROWS, tiny_trace, write_trace
from test_token_adversary import scen


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return tiny_trace(tmp_path_factory.mktemp("wire") / "tiny.arrow")


@pytest.fixture(scope="module")
def shared3(tmp_path_factory):
    """The tiny trace with gfn 3 shared: the second send is gfn 2 (sealed), gfn 3 (plain)."""
    return write_trace(tmp_path_factory.mktemp("wire") / "shr3.arrow", [(t, 0, g) for t, g in ROWS],
                       npages=4, vcpus=1, shared=[(3, 3)])


def _run(trace, *actions):
    r = run(scen(*actions), strategy="mirror-vm", trace_path=trace)
    return r, r.summary["adversary"], r.summary["metrics"]["security"]


def _acted(a):
    return a["outcome"], a["detected_by"], a["applied_ns"], a["gfn"], a["phase"]


def test_a_header_flip_changes_a_version_of_1(trace):
    # gfn 0's packet (round 0's first, 5120) has version 1: the flip turns the version's low byte 1 into 0,
    # a header the tag no longer covers.
    r, (a,), _ = _run(trace, AdversarySpec(kind="flip", at_ns=5120, where="header"))
    assert r.status == "aborted"
    assert _acted(a) == ("detected", "channel.bad_tag", 5120, 0, "precopy")


def test_a_reorder_of_a_sends_last_packet_goes_after_the_streams_next_packet(trace):
    # reorder@0:1 hits the last packet of the first send: held back, it goes after gfn 2 in the next send.
    # On the wire: p0 | p2 p1 p3. The target: p0 accepted (next 1), p2 refused (bad_sequence, the gap
    # p1 left, blamed on the reorder), p1 accepted (next 2), p3 refused: 2 accepted, 2 refused.
    r, (a,), sec = _run(trace, AdversarySpec(kind="reorder", stream=0, sequence=1))
    assert r.status == "aborted"
    assert _acted(a) == ("detected", "channel.bad_sequence", 5120, 1, "precopy")
    assert sec["target"]["outcomes"] == {"accepted": 2, "bad_sequence": 2}
    assert sec["target"]["sequences"] == {"0": 2}


def test_a_reorder_takes_its_packet_and_the_next(trace):
    # Both due at 5120, in the first send (p0, p1): the reorder swaps p0 and p1, taking both; the drop finds
    # no packet left in that send, and the swapped p1 (sequence 1 where 0 is due) stops the run there.
    r, (reorder, drop), sec = _run(trace, AdversarySpec(kind="reorder", at_ns=5120),
                                   AdversarySpec(kind="drop", at_ns=5120))
    assert _acted(reorder) == ("detected", "channel.bad_sequence", 5120, 0, "precopy")
    assert _acted(drop) == ("not_reached", "", 0, 0, "")
    # p1 refused, p0 accepted (sequence 0 is still due), nothing else sent.
    assert sec["target"]["outcomes"] == {"accepted": 1, "bad_sequence": 1}


def test_a_packet_dropped_last_in_a_send_shows_on_the_streams_next_send(trace):
    # drop@0:1: the first send delivers p0 only; the gap shows on the next send's first packet, p2
    # (sequence 2 where 1 is due), which names the drop. p3 is refused too (1 still due).
    r, (a,), sec = _run(trace, AdversarySpec(kind="drop", stream=0, sequence=1))
    assert _acted(a) == ("detected", "channel.bad_sequence", 5120, 1, "precopy")
    assert sec["target"]["outcomes"] == {"accepted": 1, "bad_sequence": 2}


def test_an_old_version_goes_out_after_the_streams_next_send(trace):
    # replay-old-version@0:1 records p1 (sent unchanged) and sends it again at the end of stream 0's next
    # send: p0 p1 | p2 p3 p1. Four accepted, the old copy refused (sequence 1 where 4 is due); the
    # downtime's stream 1, the VMSA's stream 4 and the token are never sent.
    r, (a,), sec = _run(trace, AdversarySpec(kind="replay-old-version", stream=0, sequence=1))
    assert r.status == "aborted"
    assert _acted(a) == ("detected", "channel.bad_sequence", 5120, 1, "precopy")
    assert sec["target"]["outcomes"] == {"accepted": 4, "bad_sequence": 1}
    assert sec["target"]["sequences"] == {"0": 4}
    assert sec["token"] == ""


def test_a_held_packet_that_comes_last_arrives_in_sequence(trace):
    # reorder@1:0: the downtime's only packet (gfn 1, 9220) is held; no later packet of stream 1 exists,
    # so the host sends it before the token: in sequence on its stream after all, no gap. The token
    # matches: 5 private pages (4 + gfn 1 again) and 1 VMSA at the target; 4 + 1 + 1 + the token = 7
    # packets accepted.
    r, (a,), sec = _run(trace, AdversarySpec(kind="reorder", stream=1, sequence=0))
    assert r.status == "completed" and sec["token"] == "match"
    assert _acted(a) == ("undetected", "", 9220, 1, "downtime")
    assert (sec["target"]["private_pages"], sec["target"]["vmsas"]) == (5, 1)
    assert sec["target"]["outcomes"] == {"accepted": 7}


def test_a_token_refusal_names_only_the_gaps_still_open(trace):
    # As above, and the VMSA (stream 4's only packet) dropped: the token's count differs (1 VMSA sent, 0
    # received). The held gfn 1 arrived in sequence before the token, so only the drop is named; the
    # reorder acted and the run stopped: pending.
    r, (reorder, drop), sec = _run(trace, AdversarySpec(kind="reorder", stream=1, sequence=0),
                                   AdversarySpec(kind="drop", stream=4, sequence=0))
    assert r.status == "aborted" and sec["token"] == "count_mismatch"
    assert _acted(reorder) == ("pending", "", 9220, 1, "downtime")
    assert _acted(drop) == ("detected", "token.count_mismatch", 10220, 0, "vmsa")
    assert (sec["target"]["private_pages"], sec["target"]["vmsas"]) == (5, 0)


# ------------------------------------------------------------------------------------ shared pages


def test_tamper_shared_named_by_a_shared_packets_own_sequence(shared3):
    # gfn 3 is stream 0's packet 3: naming it exactly, the host tampers with it (from there on).
    r, (a,), _ = _run(shared3, AdversarySpec(kind="tamper-shared", stream=0, sequence=3))
    assert r.status == "completed"
    assert _acted(a) == ("undetected", "", 5120, 3, "precopy")


def test_tamper_shared_on_time_waits_for_a_shared_page(shared3):
    # Due at 5120: the first send (gfn 0, 1, both private) has no shared page; the second's gfn 3 is the
    # first it acts on (not gfn 0, the first packet at or after its time).
    r, (a,), _ = _run(shared3, AdversarySpec(kind="tamper-shared", at_ns=5120))
    assert _acted(a) == ("undetected", "", 5120, 3, "precopy")


def test_tamper_shared_leaves_a_later_action_in_the_same_send_its_packet(shared3):
    # The second send: tamper-shared rewrites gfn 3 and the flip, listed after it, still flips gfn 2.
    r, (shared, flip), _ = _run(shared3, AdversarySpec(kind="tamper-shared", stream=0, sequence=0),
                                AdversarySpec(kind="flip", stream=0, sequence=2))
    assert r.status == "aborted"
    assert _acted(flip) == ("detected", "channel.bad_tag", 5120, 2, "precopy")
    assert shared["gfn"] == 3


# ------------------------------------------------------------------------------------ at 0 ns


def _run0(trace, *actions):
    r = Migration(with_adversary(_at_zero(), list(actions)), trace).run()
    return r, r.summary["adversary"]


def test_a_forged_zero_page_fails_its_tag(trace):
    # Round 0's first packet at 0 ns is gfn 0, not yet written: a ZERO packet (empty payload). The forged
    # one carries a whole page under another key, flagged a plain private page: well formed, its tag wrong.
    r, (a,) = _run0(trace, AdversarySpec(kind="forge", at_ns=0))
    assert _acted(a) == ("detected", "channel.bad_tag", 0, 0, "precopy")


@pytest.fixture(scope="module")
def shared1(tmp_path_factory):
    """The tiny trace with gfn 1 shared: sent in round 0 (at 0 ns here) and again in the downtime."""
    return write_trace(tmp_path_factory.mktemp("wire") / "shr1.arrow", [(t, 0, g) for t, g in ROWS],
                       npages=4, vcpus=1, shared=[(1, 1)])


def test_actions_applied_at_0_ns_act_once(shared1):
    # Applied at 0 ns (round 0's first send, gfn 0), replay-old-version does not take a second packet in
    # the next send (gfn 2, the next sealed one); tamper-shared, applied at 0 on gfn 1, keeps that time
    # and phase when it tampers with gfn 1 again in the downtime.
    _, (old,) = _run0(shared1, AdversarySpec(kind="replay-old-version", at_ns=0))
    assert _acted(old) == ("detected", "channel.bad_sequence", 0, 0, "precopy")
    r, (shared,) = _run0(shared1, AdversarySpec(kind="tamper-shared", at_ns=0))
    assert r.status == "completed"
    assert _acted(shared) == ("undetected", "", 0, 1, "precopy")
