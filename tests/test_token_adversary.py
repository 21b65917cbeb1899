"""The validation token and the adversary's timing and attribution, end to end on a hand-computed data-mode
run (issue 22).

The run is test_precopy's tiny pre-copy scenario in data mode, with the data-mode agent costs set to the
metadata ones (packaging 500 ns a page, unpacking 0), so its timeline is the one test_boundaries derives:
round 0 sends gfn 0, 1, 2, 3 at 5120, 6120, 7120, 8120 (1000 ns each); the guest pauses at 9120 and, after
the 100 ns sync, the downtime sends gfn 1 at 9220; the VMSA goes at 10220 (the guest's clock), and the
token one latency after the VMSA send's end, at 12230. A wire action acts on the first sealed packet sent
at or after its time (docs/threat-model.md, replay/migration/adversary.py).
"""

from __future__ import annotations

import dataclasses

import pytest

from replay.migration import run
from replay.scenario.spec import AdversarySpec, with_adversary
from replay.security.token import Token, TokenOutcome, compare
from test_precopy import tiny_scenario, tiny_trace

DATA_COSTS = {"data_page_pack_ns": 500, "data_page_unpack_ns": 0}


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return tiny_trace(tmp_path_factory.mktemp("tok") / "tiny.arrow")


def scen(*actions, os_vmpl=0):
    s = tiny_scenario(data=True, costs=DATA_COSTS)
    s = dataclasses.replace(s, guest=dataclasses.replace(s.guest, os_vmpl=os_vmpl))
    return with_adversary(s, list(actions)) if actions else s


def _intact(r):
    d, p = r.summary["digests"], r.summary["data"]["plaintext"]
    assert d["end_of_trace"] == d["no_migration"] and p["end_of_trace"] == p["no_migration"]
    assert "resume" not in [e["kind"] for e in r.events.to_pylist()]


def test_the_honest_runs_token_counts_pages_and_vmsas(trace):
    # Private page packets: 4 in round 0 and gfn 1 again in the downtime; VMSAs: one vCPU x the VMPLs in use.
    for os_vmpl, vmsas in ((0, 1), (2, 2)):
        r = run(scen(os_vmpl=os_vmpl), strategy="mirror-vm", trace_path=trace)
        sec = r.summary["metrics"]["security"]
        assert r.status == "completed" and sec["token"] == "match"
        for side in ("source", "target"):
            assert (sec[side]["private_pages"], sec[side]["vmsas"]) == (5, vmsas)
        assert [e["detail"] for e in r.events.to_pylist() if e["kind"] == "validation_token"] == ["pages=5 match=True"]


@pytest.mark.parametrize("at, applied, gfn, phase", [
    (0, 5120, 0, "precopy"), (5120, 5120, 0, "precopy"), (5121, 6120, 1, "precopy"), (6119, 6120, 1, "precopy"),
    (6120, 6120, 1, "precopy"), (6121, 7120, 2, "precopy"), (8120, 8120, 3, "precopy"), (8121, 9220, 1, "downtime")])
def test_a_wire_action_hits_the_first_packet_sent_at_or_after_its_time(trace, at, applied, gfn, phase):
    r = run(scen(AdversarySpec(kind="flip", at_ns=at)), strategy="mirror-vm", trace_path=trace)
    (a,) = r.summary["adversary"]
    assert (a["applied_ns"], a["gfn"], a["phase"]) == (applied, gfn, phase)
    assert (a["outcome"], a["detected_by"]) == ("detected", "channel.bad_tag")
    assert r.status == "aborted"
    _intact(r)


def test_the_last_vmsa_dropped_is_a_count_mismatch(trace):
    # The VMSA is the only (so the last) packet of its stream: no later packet shows the gap, the token's
    # VMSA count does (same pages, one VMSA fewer at the target).
    r = run(scen(AdversarySpec(kind="drop", at_ns=10220)), strategy="mirror-vm", trace_path=trace)
    (a,) = r.summary["adversary"]
    sec = r.summary["metrics"]["security"]
    assert r.status == "aborted" and "validation token: count_mismatch" in r.summary["status_reason"]
    assert sec["token"] == "count_mismatch" and sec["detected_by"] == "token.count_mismatch"
    assert (sec["source"]["vmsas"], sec["target"]["vmsas"]) == (1, 0)
    assert (a["outcome"], a["detected_by"], a["applied_ns"]) == ("detected", "token.count_mismatch", 10220)
    _intact(r)


def test_the_last_page_dropped_is_refused_by_the_token(trace):
    # gfn 1's downtime copy (9220) is the last packet of the downtime stream: the token's page count differs.
    r = run(scen(AdversarySpec(kind="drop", at_ns=8121)), strategy="mirror-vm", trace_path=trace)
    (a,) = r.summary["adversary"]
    sec = r.summary["metrics"]["security"]
    assert r.status == "aborted" and sec["token"] == "count_mismatch"
    assert (a["outcome"], a["detected_by"], a["gfn"], a["applied_ns"]) == ("detected", "token.count_mismatch", 1, 9220)
    _intact(r)


def test_compare_counts_vmsas_apart_from_pages():
    d = bytes(48)
    assert compare(Token(5, 2, d), Token(5, 1, d)) is TokenOutcome.COUNT_MISMATCH
    assert compare(Token(5, 2, d), Token(6, 1, d)) is TokenOutcome.COUNT_MISMATCH  # same total, other split
    assert compare(Token(5, 2, d), Token(5, 2, b"\x00" * 47 + b"\x01")) is TokenOutcome.HASH_MISMATCH


def test_a_detection_is_credited_only_to_the_action_that_caused_it(trace):
    # The flip at 6120 is seen at once (gfn 1's tag); the second action's time never comes, the third names
    # a packet that is never sent: neither is credited with anything (the record writes 0 for the time and
    # gfn of an action that never acted).
    r = run(scen(AdversarySpec(kind="flip", at_ns=6120), AdversarySpec(kind="drop", at_ns=10**12),
                 AdversarySpec(kind="drop", stream=0, sequence=999)), strategy="mirror-vm", trace_path=trace)
    flip, late, nowhere = r.summary["adversary"]
    assert (flip["outcome"], flip["detected_by"], flip["applied_ns"]) == ("detected", "channel.bad_tag", 6120)
    for a in (late, nowhere):
        assert (a["outcome"], a["detected_by"], a["applied_ns"], a["gfn"], a["phase"]) == ("not_reached", "", 0, 0, "")


def test_an_action_after_the_detection_is_never_applied(trace):
    # A drop due at 7120 would hit gfn 2, but the flip of gfn 1 (6120) stopped the migration first.
    r = run(scen(AdversarySpec(kind="flip", at_ns=6120), AdversarySpec(kind="drop", at_ns=7120)),
            strategy="mirror-vm", trace_path=trace)
    flip, drop = r.summary["adversary"]
    assert flip["outcome"] == "detected"
    assert (drop["outcome"], drop["detected_by"], drop["applied_ns"], drop["phase"]) == ("not_reached", "", 0, "")


def test_tamper_shared_named_by_packet_acts_on_shared_pages_only(tmp_path):
    # gfn 3 is shared: its copy travels plain beside the sealed private pages of the same stream. Naming the
    # stream's first packet, the host tampers with the shared pages from there on: gfn 3, undetected (no
    # check covers a shared page); the private gfn 0 of that send is left alone (else its tag would fail).
    from test_precopy import ROWS, write_trace

    trace = write_trace(tmp_path / "shr.arrow", [(t, 0, g) for t, g in ROWS], npages=4, vcpus=1, shared=[(3, 3)])
    r = run(scen(AdversarySpec(kind="tamper-shared", stream=0, sequence=0)), strategy="mirror-vm", trace_path=trace)
    (a,) = r.summary["adversary"]
    assert r.status == "completed"
    assert (a["outcome"], a["detected_by"], a["gfn"], a["phase"]) == ("undetected", "", 3, "precopy")
