"""Which action a refusal names, what a failed run counts as lost, and what the detected host writes
explain (issue 22: survivors of tools/mutate in replay/migration/adversary.py's ``handshake_refused``,
``saw``, ``token_refused``, ``rmp_refused``, ``link_event``/``link_down``, ``target_rmp`` and ``finish``).

The rule (the module's docstring, "Attribution"): a check that refuses names the action whose change it
saw; the others keep their own outcome. End to end where a run reaches the case (two attestation
actions at one handshake; a failed post-copy run's lost pages, on test_boundaries' post-copy timeline;
rmp-remap on a batch of two pages apart); on an ``Adversary`` with its actions' progress set by hand
where the case needs two actions or two link events a small run cannot line up (the methods read nothing
but the actions, the blame list, the gaps and, in ``finish``, the data plane's plain-text digests).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from replay.migration import Migration, adversary as adv
from replay.scenario.spec import AdversarySpec, with_adversary
from replay.scenario.strategies import TARGET
from test_postcopy import pc_scenario, pc_trace
from test_precopy import tiny_scenario, tiny_trace, write_trace


def _acted(a):
    return a["outcome"], a["detected_by"], a["applied_ns"], a["gfn"], a["phase"]


def test_a_refused_handshake_names_the_action_its_failing_check_saw(tmp_path):
    # Both act at the handshake (5100, test_adversary_due's timeline). The verifier checks the measurement
    # before the TCB and stops there: bad-measurement is detected; bad-tcb, listed first, acted and the run
    # stopped before a check could see it: pending.
    s = with_adversary(tiny_scenario(data=True), [AdversarySpec(kind="bad-tcb"), AdversarySpec(kind="bad-measurement")])
    r = Migration(s, tiny_trace(tmp_path / "tiny.arrow")).run()
    tcb, meas = r.summary["adversary"]
    assert r.status == "aborted"
    assert _acted(meas) == ("detected", "attestation.measurement", 5100, 0, "handshake")
    assert _acted(tcb) == ("pending", "", 5100, 0, "handshake")


PC_DATA_COSTS = {"data_page_pack_ns": 500, "data_page_unpack_ns": 0, "data_zstd_page_ns": 0}


@pytest.fixture(scope="module")
def pc(tmp_path_factory):
    return pc_trace(tmp_path_factory.mktemp("attr") / "pc.arrow")


@pytest.mark.parametrize("at, gfn, phase, lost", [(None, 0, "postcopy", 0), (9200, 2, "fault", 1)])
def test_a_failed_postcopy_run_counts_the_pages_the_target_changed(pc, at, gfn, phase, lost):
    # test_boundaries' post-copy timeline: the target resumes at 7100; the push sends gfn 0 from 7100;
    # vCPU 1's fault reply (gfn 3) is on the wire 8200..9200, in at 9300, where vCPU 1's waiting write
    # (trace t=3500) lands; vCPU 0's reply (gfn 2) goes out at 9200. The rmp-remap hits the first private
    # page delivered at or after its time and the agent's check fails the run right there.
    # - no time: gfn 0 at 7100. The target holds gfn 0 alone, as the source sent it: 0 lost (gfn 1, 2, 3,
    #   absent at the target, are not counted though their versions there differ from the source's).
    # - 9200: gfn 2's reply. The target holds gfn 0 (unchanged since sent), gfn 3 (written by vCPU 1 after
    #   it came: the source never saw that write) and gfn 2 (as sent, refused before any write): 1 lost.
    spec = AdversarySpec(kind="rmp-remap") if at is None else AdversarySpec(kind="rmp-remap", at_ns=at)
    r = Migration(with_adversary(pc_scenario(costs=PC_DATA_COSTS, data=True), [spec]), pc).run()
    (a,) = r.summary["adversary"]
    assert r.status == "failed"
    assert _acted(a) == ("detected", "rmp.npf_gpa_mismatch", 7100 if at is None else at, gfn, phase)
    assert r.summary["adversary_effects"]["pages_lost"] == lost


def test_rmp_remap_on_a_batch_of_two_pages_apart_names_the_second(tmp_path, monkeypatch):
    # gfn 1 shared: the target's agent checks the private gfn 0 and 2 before the resume. rmp-remap points
    # gfn 0's RMP entry at gfn 2, the batch's second page (not gfn 1, the page after gfn 0).
    seen = []
    orig = adv.Adversary.target_rmp

    def target_rmp(self, gfns):
        out = orig(self, gfns)
        seen.append(([int(g) for g in gfns], self.eng.rmp_entry(TARGET, self.eng.spa(TARGET, int(gfns[0]))).gfn))
        return out

    monkeypatch.setattr(adv.Adversary, "target_rmp", target_rmp)
    trace = write_trace(tmp_path / "apart.arrow", [(0, 0, 0), (1, 0, 1), (2, 0, 2)], npages=3, vcpus=1,
                        shared=[(1, 1)])
    r = Migration(with_adversary(tiny_scenario(data=True), [AdversarySpec(kind="rmp-remap")]), trace).run()
    assert r.summary["adversary"][0]["detected_by"] == "rmp.npf_gpa_mismatch"
    assert seen == [([0, 2], 2)]


# ------------------------------------------------------------------- on an Adversary, by hand


def _adversary(*specs, start_ns=0, plaintext=None):
    data = SimpleNamespace(plaintext=plaintext or {"end_of_trace": "", "no_migration": ""})
    return adv.Adversary(tuple(specs), data, None, None, seed=1, start_ns=start_ns)


def test_an_rmp_refusal_names_the_action_on_that_page():
    remap, skip = AdversarySpec(kind="rmp-remap"), AdversarySpec(kind="skip-pvalidate", at_ns=9000)
    d = _adversary(remap, skip)
    a, b = d.actions
    a.applied(0, "resume", 0)  # applied at 0 ns is applied
    b.applied(9000, "postcopy", 7)
    assert d.rmp_refused(7, "vc.not_validated") is b and (b.outcome, b.detected_by) == ("detected", "vc.not_validated")
    assert (a.outcome, a.detected_by) == ("undetected", "")  # applied, on another page: not named
    assert d.rmp_refused(0, "rmp.npf_gpa_mismatch") is a and a.outcome == "detected"
    assert d.rmp_refused(5, "rmp.npf_gpa_mismatch") is None  # no action on gfn 5


def _loss(at):
    return AdversarySpec(kind="link-loss", at_ns=at, duration_ns=1000)


def test_a_link_event_applies_the_loss_that_made_its_fault():
    d = _adversary(_loss(100), _loss(200))
    first, second = d.actions
    d.link_event(250, False, 200, "postcopy")  # the fault at 200, seen at 250: the second action's
    assert _acted(d.record()[1]) == ("detected", "link", 250, 0, "postcopy")
    assert first.outcome == "not_reached" and first.applied_ns < 0


def test_two_losses_at_0_ns_each_apply_once():
    # Two link losses at 0 ns make two faults at 0: each event applies one action; the one applied at 0
    # ns stays as it was, also when the run's post-copy failure marks the link down at its end.
    d = _adversary(_loss(0), _loss(0))
    first, second = d.actions
    d.link_event(0, True, 0, "postcopy", stalled_ns=300)
    d.link_event(40, True, 0, "fault", stalled_ns=7)
    assert (first.applied_ns, first.phase, first.effect) == (0, "postcopy", "recovered: re-keyed, stalled 300 ns")
    assert (second.applied_ns, second.phase, second.effect) == (40, "fault", "recovered: re-keyed, stalled 7 ns")
    d2 = _adversary(_loss(0), _loss(500))
    d2.link_event(0, True, 0, "postcopy", stalled_ns=300)
    d2.at(900, "postcopy")
    d2.link_down(900)  # post-copy failed at 900: the loss not applied yet acted then
    assert [(a.applied_ns, a.phase, a.outcome) for a in d2.actions] == [(0, "postcopy", "detected"),
                                                                        (900, "postcopy", "detected")]


def test_a_refused_packet_names_one_of_the_actions_it_carries():
    d = _adversary(AdversarySpec(kind="drop", at_ns=5), AdversarySpec(kind="flip", at_ns=5))
    drop, flip = d.actions
    d.blame = [(), (drop,), (drop, flip)]
    assert d.saw(0, "channel.bad_sequence") is None  # a packet as the source sent it: no action
    assert d.saw(3, "channel.bad_tag") is None  # past the delivery's packets: none
    assert d.saw(2, "channel.bad_tag") is flip  # the one whose change that check finds
    # None of its actions changes what the check looks at: still the packet's (first) action.
    assert d.saw(1, "channel.malformed") is drop and drop.detected_by == "channel.malformed"


def test_a_token_refusal_names_every_open_gap_lowest_stream_first():
    d = _adversary(AdversarySpec(kind="drop", at_ns=5), AdversarySpec(kind="reorder", at_ns=5))
    drop, reorder = d.actions
    d.gaps = {3: drop, 1: reorder}
    assert d.token_refused("token.count_mismatch") is reorder
    assert [(a.outcome, a.detected_by) for a in (drop, reorder)] == [("detected", "token.count_mismatch")] * 2
    assert d.gaps == {} and d.token_refused("token.count_mismatch") is None


@pytest.mark.parametrize("faults, explains", [
    ({"host_rmp_pf": 1, "npf_asid": 0}, ["no_faults"]),  # the write's own #PF, nothing else
    ({"host_rmp_pf": 1, "npf_asid": 1}, []),  # another fault too: not the write's to explain
    ({"host_rmp_pf": 2}, []),  # one write detected, two #PFs
    (None, ["no_faults"]),  # no fault counts given: the detected write explains it
])
def test_detected_host_writes_explain_only_their_own_faults(faults, explains):
    d = _adversary(AdversarySpec(kind="host-write-private", at_ns=5))
    d.actions[0].applied(5, "precopy", 0)
    d.actions[0].detect("rmp.host_rmp_pf")
    _, effects = d.finish("completed", False, 100, {"no_faults": False}, faults)
    assert effects == {"pages_lost": 0, "plaintext_end_differs": False, "explains": explains}


@pytest.mark.parametrize("invariants", [{"no_faults": True}, {}])
def test_only_a_failed_invariant_is_explained(invariants):
    # The write's own #PF, but the invariant held (or is not checked on this run): nothing to explain.
    d = _adversary(AdversarySpec(kind="host-write-private", at_ns=5))
    d.actions[0].applied(5, "precopy", 0)
    d.actions[0].detect("rmp.host_rmp_pf")
    assert d.finish("completed", False, 100, invariants, {"host_rmp_pf": 1})[1]["explains"] == []


def test_no_detected_host_write_explains_no_fault():
    d = _adversary(AdversarySpec(kind="host-write-private", at_ns=5))  # never applied
    for faults in (None, {"host_rmp_pf": 1}):
        assert d.finish("completed", False, 100, {"no_faults": False}, faults)[1]["explains"] == []


def test_only_detected_host_writes_count_for_the_faults():
    # Detected: the host write at 5 and a flip (a channel refusal, no fault). The second host write never
    # came. One #PF = one detected host write: explained.
    d = _adversary(AdversarySpec(kind="host-write-private", at_ns=5), AdversarySpec(kind="flip", at_ns=5),
                   AdversarySpec(kind="host-write-private", at_ns=10**12))
    write, flip, _ = d.actions
    write.applied(5, "precopy", 0)
    write.detect("rmp.host_rmp_pf")
    flip.applied(5, "precopy", 1)
    flip.detect("channel.bad_tag")
    assert d.finish("completed", False, 100, {"no_faults": False}, {"host_rmp_pf": 1})[1]["explains"] == ["no_faults"]


@pytest.mark.parametrize("differs, explained", [({3}, True), ({3, 5}, False), (None, False)])
def test_a_switchover_difference_is_explained_only_by_the_pages_actions_changed(differs, explained):
    # A tamper-shared that changed gfn 3 unnoticed explains the target's plain text differing from the
    # source's at the switchover only if every page that differs is gfn 3 (None: none differed).
    key = "plaintext_target_equals_source_at_switchover"
    d = _adversary(AdversarySpec(kind="tamper-shared", at_ns=5))
    (a,) = d.actions
    a.applied(5, "precopy", 3)
    a.changed.add(3)
    d.switchover_diff = differs
    assert d.finish("completed", False, 100, {key: False}, {})[1]["explains"] == ([key] if explained else [])
