"""The adversary ([[adversary]], --adversary, replay adversary-matrix): each kind ends in its documented
outcome, detected actions before the target runs leave the source intact, a host write to a private page
is an RMP #PF that changes nothing, shared-page tampering is reported undetected; and, over random actions
and traces, no run completes with a corrupted plaintext outside the shared-page case."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.sweeps.adversary_matrix import UNPROTECTED, default_action, run_matrix, write_matrix
from replay.scenario.adversary import parse_adversary, parse_kinds
from replay.core.errors import ScenarioError, UsageError
from replay.migration import Migration, trace_for
from replay.scenario.spec import (
    ADVERSARY_KINDS,
    AdversarySpec,
    load_scenario,
    parse_scenario_text,
    with_adversary,
)
from replay.scenario.strategies import SOURCE

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "scenarios" / "adversary" / "base.toml"
START_NS = 2_000_000  # base.toml's migration.start_ns


def base(*overrides: str):
    return load_scenario(BASE, list(overrides))


def run_with(*actions: AdversarySpec, overrides=()):
    s = with_adversary(base(*overrides), list(actions))
    return Migration(s, trace_for(s)).run()


# ------------------------------------------------------------------------------------------ parsing


def test_parse_one_off_forms():
    assert parse_adversary("flip@30ms,where=header") == AdversarySpec(kind="flip", at_ns=30_000_000, where="header")
    assert parse_adversary("drop@0:7") == AdversarySpec(kind="drop", stream=0, sequence=7)
    assert parse_adversary("bad-tcb") == AdversarySpec(kind="bad-tcb")
    assert parse_adversary("host-write-private@1ms,host=\"target\"").host == "target"


@pytest.mark.parametrize("text, message", [
    ("flp@1ms", "did you mean 'flip'"),
    ("flip@1ms,wher=header", "did you mean 'where'"),
    ("flip@1ms,where=middle", "where 'middle' is not one of header, payload"),
    ("drop@a:1", "stream:sequence, two integers"),
    ("link-loss@0:1", "link-loss happens at a time"),
    ("host-write-private@0:1", "host-write-private happens at a time"),
    ("drop@1ms,", "expected key=value"),
])
def test_parse_one_off_errors(text, message):
    with pytest.raises(ScenarioError, match=message):
        parse_adversary(text)


@pytest.mark.parametrize("text, message", [
    # Issue 19: one kind, one time, known keys once each; nothing in the options overrides the head.
    ("flip@30ms,kind=drop", "'kind' is not an option: the kind and the time"),
    ("flip@30ms,at_ns=5ms", "'at_ns' is not an option"),
    ("drop@0:1,sequence=2", "'sequence' is not an option"),
    ("flip,stream=0,sequence=1", "'stream' is not an option"),
    ("flip@", "nothing after '@'"),
    ("flip@ ", "nothing after '@'"),
    ("flip@1ms@2ms", r"one time per action \(one '@'\)"),
    ("flip@1ms,where=header,where=payload", "option 'where' given twice"),
    ("flip,,where=header", "empty option"),
    ("@30ms", "no kind before @"),
    ("", "empty"),
    ("flip@1ms,where=", "where: empty value"),
    ("flip@" + "9" * 5000 + "ms", "number too long"),
    ("drop@" + "1" * 21 + ":1", "two integers of at most 20 digits"),
])
def test_parse_one_off_is_strict(text, message):
    with pytest.raises(ScenarioError, match=message) as e:
        parse_adversary(text)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_parse_one_off_accepts_each_option_once():
    assert parse_adversary("link-loss@2ms,duration_ns=5ms") == AdversarySpec(kind="link-loss", at_ns=2_000_000,
                                                                               duration_ns=5_000_000)
    assert parse_adversary(" flip @ 30ms , where = header ") == AdversarySpec(kind="flip", at_ns=30_000_000,
                                                                              where="header")


@pytest.mark.parametrize("text, message", [
    ("flip,,drop", "empty item at position 2"), (",flip", "empty item at position 1"), ("flip,", "empty item"),
    ("flip,flip", "'flip' given twice"), ("", "empty list"), (" , ", "empty list"), ("flip,dorp", "did you mean 'drop'"),
])
def test_kinds_lists_are_strict(text, message):
    with pytest.raises(UsageError, match=message):
        parse_kinds(text, ADVERSARY_KINDS, "kinds")
    assert parse_kinds("flip, drop", ADVERSARY_KINDS, "kinds") == ["flip", "drop"]


def test_cli_refuses_bad_kinds_and_specs_in_one_line(tmp_path, capsys):
    from replay.cli import main

    scen = ROOT / "scenarios" / "quickstart.toml"
    for argv in (["run", str(scen), "--out", str(tmp_path / "r"), "--adversary", "flip@30ms,kind=drop"],
                 ["adversary-matrix", str(ROOT / "scenarios" / "adversary" / "base.toml"), "--out",
                  str(tmp_path / "m"), "--kinds", "flip,,drop"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("replay: error: ") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_scenario_entries_turn_data_mode_on_and_are_checked():
    text = BASE.read_text().replace("data = true", "data = false")
    s = parse_scenario_text(text + '\n[[adversary]]\nkind = "drop"\nat_ns = "5ms"\n')
    assert s.migration.data and s.adversary == (AdversarySpec(kind="drop", at_ns=5_000_000),)
    assert s.resolved(guest_bytes=1 << 22, vcpus=2)["adversary"][0]["kind"] == "drop"
    with pytest.raises(ScenarioError, match=r"adversary\[0\].knd: unknown key \(did you mean 'kind'\?\)"):
        parse_scenario_text(text + '\n[[adversary]]\nknd = "drop"\n')
    with pytest.raises(ScenarioError, match="at_ns or stream"):
        parse_scenario_text(text + '\n[[adversary]]\nkind = "drop"\nat_ns = 5\nstream = 0\nsequence = 1\n')
    with pytest.raises(ScenarioError, match="stream and sequence go together"):
        parse_scenario_text(text + '\n[[adversary]]\nkind = "drop"\nstream = 0\n')


def test_every_kind_ships_a_scenario():
    for kind in ADVERSARY_KINDS:
        s = load_scenario(ROOT / "scenarios" / "adversary" / f"{kind}.toml")
        assert [a.kind for a in s.adversary] == [kind]


# ------------------------------------------------------------------------------------------ outcomes


def _intact(r) -> None:
    """The source ran on to the end: both end digests are the no-migration ones."""
    s = r.summary
    assert s["digests"]["end_of_trace"] == s["digests"]["no_migration"]
    assert s["data"]["plaintext"]["end_of_trace"] == s["data"]["plaintext"]["no_migration"]


@pytest.mark.parametrize("kind, where, detected_by", [
    ("flip", "payload", "channel.bad_tag"), ("flip", "header", "channel.bad_tag"),
    ("drop", "payload", "channel.bad_sequence"), ("replay", "payload", "channel.bad_sequence"),
    ("reorder", "payload", "channel.bad_sequence"), ("forge", "payload", "channel.bad_tag"),
    ("truncate", "payload", "channel.malformed"), ("replay-old-version", "payload", "channel.bad_sequence"),
])
def test_wire_actions_abort_with_the_source_intact(kind, where, detected_by):
    r = run_with(AdversarySpec(kind=kind, at_ns=START_NS + 3_000_000, where=where))
    assert r.status == "aborted"
    (act,) = r.summary["adversary"]
    assert (act["outcome"], act["detected_by"]) == ("detected", detected_by)
    assert act["applied_ns"] >= START_NS + 3_000_000
    assert r.summary["adversary_effects"] == {"pages_lost": 0, "plaintext_end_differs": False, "explains": []}
    _intact(r)


@pytest.mark.parametrize("kind, verdict", [("bad-measurement", "measurement"), ("bad-signature", "signature"),
                                           ("bad-policy", "policy"), ("bad-tcb", "tcb")])
def test_attestation_actions_refuse_the_handshake(kind, verdict):
    r = run_with(AdversarySpec(kind=kind))
    assert r.status == "aborted" and r.summary["metrics"]["security"]["handshake_verdict"] == verdict
    assert r.summary["adversary"][0]["detected_by"] == f"attestation.{verdict}"
    assert r.summary["metrics"]["pages_sent"] == 0  # nothing moved
    _intact(r)


@pytest.mark.parametrize("mode, status", [("precopy", "aborted"), ("postcopy", "failed")])
@pytest.mark.parametrize("kind, detected_by", [("rmp-remap", "rmp.npf_gpa_mismatch"),
                                               ("skip-pvalidate", "vc.not_validated"),
                                               ("double-pvalidate", "pvalidate.fail_noupdate")])
def test_target_rmp_actions(kind, detected_by, mode, status):
    """Before the resume (pre-copy) an abort; in post-copy the target already runs: a failure."""
    r = run_with(AdversarySpec(kind=kind), overrides=[f"migration.mode={mode}"])
    assert r.status == status
    assert r.summary["adversary"][0]["detected_by"] == detected_by
    if status == "aborted":
        _intact(r)


@pytest.mark.parametrize("host", ["source", "target"])
def test_host_write_to_a_private_page_is_an_rmp_fault_and_changes_nothing(host):
    r = run_with(AdversarySpec(kind="host-write-private", at_ns=START_NS + 3_000_000, host=host))
    s = r.summary
    assert s["status"] == "completed"  # the write never happened: the migration goes on
    assert s["adversary"][0]["detected_by"] == "rmp.host_rmp_pf"
    assert s["metrics"]["faults"]["host_rmp_pf"] == 1
    assert s["adversary_effects"]["explains"] == ["no_faults"]
    assert s["data"]["plaintext"]["end_of_trace"] == s["data"]["plaintext"]["no_migration"]


def test_host_write_model_rmp_fault_keeps_the_page():
    """The page's bytes on the host are the same before and after the refused write."""
    s = with_adversary(base(), [AdversarySpec(kind="host-write-private", at_ns=START_NS + 3_000_000)])
    m = Migration(s, trace_for(s))
    seen = {}
    from replay.migration import adversary as adv

    orig = adv.Adversary.tick

    def tick(self):
        pending = [a for a in self.actions if a.applied_ns < 0 and self._due(a)]
        before = {g: self.data.dp.memory[SOURCE].read_raw(g) for g in range(16)} if pending else None
        orig(self)
        if pending and self.actions[0].applied_ns >= 0:
            seen["gfn"] = self.actions[0].gfn
            seen["same"] = before[seen["gfn"]] == self.data.dp.memory[SOURCE].read_raw(seen["gfn"])
    adv.Adversary.tick = tick
    try:
        m.run()
    finally:
        adv.Adversary.tick = orig
    assert seen["same"] is True  # the refused write left the page's bytes as they were


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_shared_page_tampering_is_undetected_and_reported(mode):
    r = run_with(AdversarySpec(kind="tamper-shared", at_ns=START_NS + 3_000_000), overrides=[f"migration.mode={mode}"])
    s = r.summary
    assert s["status"] == "completed"
    assert (s["adversary"][0]["outcome"], s["adversary"][0]["detected_by"]) == ("undetected", "")
    assert s["adversary_effects"]["plaintext_end_differs"] is True
    assert not s["invariants"]["plaintext_end_equals_no_migration"]
    assert "plaintext_end_equals_no_migration" in s["adversary_effects"]["explains"]
    assert s["invariants"]["end_of_trace_equals_no_migration"]  # the engine's versions are untouched


def test_packet_number_targets_that_packet():
    r = run_with(AdversarySpec(kind="drop", stream=0, sequence=5))
    assert r.summary["adversary"][0]["detected_by"] == "channel.bad_sequence"


def test_an_action_never_reached_says_so():
    r = run_with(AdversarySpec(kind="drop", at_ns=10**12))
    assert r.status == "completed" and r.summary["adversary"][0]["outcome"] == "not_reached"


def test_link_loss_is_a_link_fault():
    r = run_with(AdversarySpec(kind="link-loss", at_ns=START_NS + 3_000_000))
    assert r.status == "aborted" and r.summary["adversary"][0]["detected_by"] == "link"
    _intact(r)


def test_cli_one_off_and_record(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "replay.cli", "run", str(BASE), "--out", str(out),
                        "--adversary", "tamper-shared@5ms"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr  # an explained difference is not a bug exit
    s = json.loads((out / "summary.json").read_text())
    assert s["adversary"][0]["outcome"] == "undetected"
    p = subprocess.run([sys.executable, "-m", "replay.cli", "verify", str(out)], check=False, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "replay.cli", "run", str(BASE), "--out", str(tmp_path / "x"),
                        "--adversary", "flp@5ms"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "did you mean 'flip'" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------ the matrix


# The stream each phase's packets use (the action's record names the one it acted in).
PHASE_STREAM = {"round": "precopy", "stop-and-copy": "downtime", "push": "postcopy", "fault-reply": "fault",
                "handshake": "handshake", "resume": "resume"}
WIRE_CHECK = {"flip": "channel.bad_tag", "forge": "channel.bad_tag", "truncate": "channel.malformed",
              "drop": "channel.bad_sequence", "replay": "channel.bad_sequence", "reorder": "channel.bad_sequence",
              "replay-old-version": "channel.bad_sequence"}


def _windows(strategy: str, mode: str, phase: str) -> tuple[int, int]:
    """[start, end] of a phase in a run without adversary, from its event log (this test's own oracle,
    not the matrix's aiming)."""
    from replay.sweeps.adversary_matrix import _phase_scenario

    s = _phase_scenario(base().with_strategy(strategy), mode, phase)
    r = Migration(s, trace_for(s)).run()
    t = {}
    for e in r.events.to_pylist():
        t.setdefault(e["kind"], e["t_ns"])
    m = r.summary["metrics"]
    return {"round": (t["setup_done"], t.get("pause", 0)), "stop-and-copy": (t["pause"], t["vmsas_sent"]),
            "push": (t["resume"], m["completion_ns"]), "fault-reply": (t["resume"], m["completion_ns"])}[phase]


def _check_matrix_rows(rows) -> None:
    """Every row: the action acted in the phase it was aimed at, at or after its time and inside that
    phase, with the documented outcome."""
    from replay.migration.adversary import ATTESTATION, RMP_BYPASS

    windows = {}
    for r in rows:
        assert not r["corrupted"], r
        assert r["acted_in"] == PHASE_STREAM[r["phase"]], r
        if r["phase"] not in ("handshake", "resume"):
            at = int(r["at"].removesuffix("ns"))
            key = (r["strategy"], r["mode"], r["phase"])
            if key not in windows:
                windows[key] = _windows(*key)
            lo, hi = windows[key]
            assert lo <= at <= r["applied_ns"] <= hi, (r, windows[key])
            # The first packet at or after its time: within a few pages (a link fault acts at its time;
            # shared-page tampering waits for the first shared page, which can be a while among faults).
            if r["kind"] not in ("link-loss", "tamper-shared"):
                assert r["applied_ns"] - at < 200_000, r
        k = r["kind"]
        if k in WIRE_CHECK:
            assert (r["outcome"], r["detected_by"]) == ("detected", WIRE_CHECK[k]), r
            assert r["status"] == ("aborted" if r["mode"] == "precopy" else "failed"), r
        elif k in ATTESTATION:
            assert (r["outcome"], r["status"]) == ("detected", "aborted"), r
        elif k == "host-write-private":
            assert (r["outcome"], r["detected_by"], r["status"]) == ("detected", "rmp.host_rmp_pf", "completed"), r
        elif k in RMP_BYPASS + ("tamper-shared",):
            assert (r["outcome"], r["status"]) == ("undetected", "completed"), r
        elif k == "link-loss":
            assert (r["outcome"], r["detected_by"]) == ("detected", "link"), r
        else:  # the target's RMP
            assert r["outcome"] == "detected" and r["status"] == ("aborted" if r["phase"] == "resume" else "failed"), r
        if r["status"] == "aborted":
            assert r["pages_lost"] == 0 and not r["plaintext_end_differs"], r


def test_matrix_each_kind_fires_in_each_phase_at_its_time(tmp_path):
    """A kind of every family, in each phase it can act in (pre-copy round, stop-and-copy, post-copy push,
    post-copy fault reply; the target's RMP also before a pre-copy resume), acting there at the time it
    was aimed at."""
    kinds = ["flip", "host-write-private", "raw-copy", "rmp-remap", "link-loss", "bad-tcb"]
    table = run_matrix(base(), kinds=kinds, strategies=["mirror-vm"])
    rows = table.to_pylist()
    assert [(r["kind"], r["phase"]) for r in rows] == [
        (k, p) for k in kinds for p in (("handshake", "handshake") if k == "bad-tcb" else
                                         ("resume", "push", "fault-reply") if k == "rmp-remap" else
                                         ("round", "stop-and-copy", "push", "fault-reply"))]
    _check_matrix_rows(rows)
    write_matrix(table, tmp_path / "m", "adversary-base")
    with pa.ipc.open_file(tmp_path / "m" / "matrix.arrow") as f:
        assert f.read_all().equals(table)
    html = (tmp_path / "m" / "report.html").read_text()
    assert 'id="adversary"' in html and "0 completed with a corrupted plaintext" in html
    md = (tmp_path / "m" / "matrix.md").read_text()
    assert "| flip | mirror-vm | postcopy | push | postcopy @ " in md and "| detected | channel.bad_tag |" in md


@pytest.mark.slow
def test_matrix_every_kind_both_strategies_every_phase():
    table = run_matrix(base())
    rows = table.to_pylist()
    assert {r["kind"] for r in rows} == set(ADVERSARY_KINDS)
    assert {(r["strategy"], r["mode"]) for r in rows} == {(s, m) for s in ("mirror-vm", "shadow-vcpu")
                                                           for m in ("precopy", "postcopy")}
    _check_matrix_rows(rows)


def test_matrix_flags_a_corrupted_run(monkeypatch):
    """The matrix's corruption column can turn true: counted as protected, the shared-page tampering is
    a completed run with a plaintext that differs."""
    import replay.sweeps.adversary_matrix as am

    monkeypatch.setattr(am, "UNPROTECTED", ())
    table = am.run_matrix(base(), kinds=["tamper-shared"], modes=["precopy"], strategies=["mirror-vm"])
    assert table.to_pylist()[0]["corrupted"] is True


def test_a_target_that_skips_the_tag_check_is_caught_as_corrupted(monkeypatch):
    """The adversary's verdicts rest on the target's checks: a target that takes a packet whose GCM tag is
    wrong (here: every tag counted right, the payload taken regardless) lets a flipped payload bit into its
    memory, and the run completes undetected with a plaintext that differs: corrupted."""
    import numpy as np
    from cryptography.exceptions import InvalidTag

    import replay.sweeps.adversary_matrix as am
    from replay.security import channel

    opened = channel.open_many

    def every_tag_right(*args, **kwargs):
        ok, records = opened(*args, **kwargs)
        return np.ones_like(ok), records

    class Unchecked:
        def __init__(self, aead):
            self.aead = aead
            self.encrypt = aead.encrypt  # the sender seals as ever

        def decrypt(self, nonce, data, aad):
            try:
                return self.aead.decrypt(nonce, data, aad)
            except InvalidTag:
                return bytes(data[: len(data) - 16])  # not even decrypted: garbage in

    flip = AdversarySpec(kind="flip", stream=1, sequence=100)  # a private page (gfn 100) of the downtime
    honest = run_with(flip)
    assert honest.status == "aborted" and honest.summary["adversary"][0]["detected_by"] == "channel.bad_tag"
    keys = channel._Keys.__call__
    monkeypatch.setattr(channel, "open_many", every_tag_right)
    monkeypatch.setattr(channel._Keys, "__call__", lambda self, stream: Unchecked(keys(self, stream)))
    r = run_with(flip)
    p = r.summary["data"]["plaintext"]
    assert r.status == "completed" and r.summary["adversary"][0]["outcome"] == "undetected"
    assert p["end_of_trace"] != p["no_migration"] and not r.summary["invariants"]["plaintext_end_equals_no_migration"]
    assert "flip" not in am.UNPROTECTED  # so the matrix counts this run as corrupted


def test_matrix_cli_bad_kind(tmp_path):
    p = subprocess.run([sys.executable, "-m", "replay.cli", "adversary-matrix", str(BASE), "--out", str(tmp_path / "m"),
                        "--kinds", "flip,dorp"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "did you mean 'drop'" in p.stderr


# ------------------------------------------------------------------------------------------ property


SEALED_WIRE = ("flip", "drop", "replay", "reorder", "forge", "truncate", "replay-old-version")


@settings(derandomize=True, max_examples=30, deadline=None)
@given(kinds=st.lists(st.sampled_from(ADVERSARY_KINDS), min_size=1, max_size=2),
       offsets=st.lists(st.integers(0, 120_000_000), min_size=2, max_size=2),
       mode=st.sampled_from(["precopy", "postcopy"]), strategy=st.sampled_from(["mirror-vm", "shadow-vcpu"]),
       trace_seed=st.integers(1, 5), events=st.integers(40_000, 120_000))
def test_no_completed_run_with_a_corrupted_plaintext(kinds, offsets, mode, strategy, trace_seed, events):
    """No completed run's plaintext differs unless an undetected action that changes what the guest reads
    (shared-page tampering, the what-if-the-RMP-failed kinds) acted; an aborted run leaves the source
    intact; and no action due inside a phase that ran is left ``not_reached``: a sealed-packet action
    due before another action acted on a later packet, or before a completed run's switchover (the VMSAs
    cross after it), found its packet."""
    actions = [dataclasses.replace(default_action(k, START_NS), at_ns=START_NS + o)
               if default_action(k, START_NS).at_ns >= 0 else default_action(k, START_NS)
               for k, o in zip(kinds, offsets)]
    r = run_with(*actions, overrides=[f"migration.mode={mode}", f"migration.strategy={strategy}",
                                      f"trace.seed={trace_seed}", f"trace.events={events}"])
    s = r.summary
    p = s["data"]["plaintext"]
    if r.status == "completed" and p["end_of_trace"] != p["no_migration"]:
        applied = [a for a in s["adversary"] if a["outcome"] != "not_reached"]
        assert applied and all(a["kind"] in UNPROTECTED for a in applied if a["outcome"] == "undetected"), s["adversary"]
        assert any(a["kind"] in UNPROTECTED and a["outcome"] == "undetected" for a in applied)
    if r.status == "aborted":
        assert p["end_of_trace"] == p["no_migration"]
    acted = [a["applied_ns"] for a in s["adversary"] if a["outcome"] != "not_reached" and a["kind"] in SEALED_WIRE]
    # The run stopped at the send of the packet a check refused: the actions that acted before it were
    # followed by more packets (that one at least).
    stop = min((a["applied_ns"] for a in s["adversary"] if a["outcome"] == "detected" and a["kind"] in SEALED_WIRE),
               default=1 << 62)
    for spec, a in zip(actions, s["adversary"]):
        if a["outcome"] != "not_reached" or spec.kind not in SEALED_WIRE:
            continue
        assert all(spec.at_ns > t for t in acted if t < stop), s["adversary"]  # a later packet was sent, and hit
        if r.status == "completed":
            assert spec.at_ns > s["metrics"]["switchover_ns"], (s["adversary"], s["metrics"]["switchover_ns"])


def test_two_actions_due_together_are_attributed_separately():
    """A drop and a flip due at the same time take two packets; the target's tag check sees the flipped
    one, and names only the flip: the drop (whose gap the sequence check never got to) stays pending.
    A replay-old-version due with a flip never got its packet resent: not_reached, not "detected"."""
    r = run_with(AdversarySpec(kind="drop", at_ns=50_000_000), AdversarySpec(kind="flip", at_ns=50_000_000))
    drop, flip = r.summary["adversary"]
    assert (flip["outcome"], flip["detected_by"]) == ("detected", "channel.bad_tag")
    assert (drop["outcome"], drop["detected_by"]) == ("pending", "")
    assert drop["applied_ns"] == flip["applied_ns"] >= 50_000_000 and flip["gfn"] == drop["gfn"] + 1
    r = run_with(AdversarySpec(kind="replay", stream=1, sequence=100), AdversarySpec(kind="truncate", stream=1, sequence=101))
    rep, trunc = r.summary["adversary"]
    # The replayed copy comes right after its original, before the truncated packet: the sequence check
    # sees it first.
    assert (rep["outcome"], rep["detected_by"]) == ("detected", "channel.bad_sequence")
    assert (trunc["outcome"], trunc["detected_by"]) == ("pending", "")
    r = run_with(AdversarySpec(kind="flip", at_ns=50_000_000), AdversarySpec(kind="replay-old-version", at_ns=50_000_000))
    assert [(a["outcome"], a["detected_by"]) for a in r.summary["adversary"]] == [
        ("detected", "channel.bad_tag"), ("not_reached", "")]
    assert trunc["applied_ns"] == rep["applied_ns"] and trunc["phase"] == rep["phase"] == "downtime"


def test_last_packet_of_a_stream_dropped_ends_with_the_tokens_count_mismatch():
    """No later packet of the stop-and-copy stream shows the gap: the validation token does."""
    honest = run_with(AdversarySpec(kind="drop", at_ns=10**12))
    last = honest.summary["metrics"]["security"]["source"]["sequences"]["1"] - 1
    r = run_with(AdversarySpec(kind="drop", stream=1, sequence=last))
    (a,) = r.summary["adversary"]
    assert r.status == "aborted" and r.summary["metrics"]["security"]["token"] == "count_mismatch"
    assert (a["outcome"], a["detected_by"], a["phase"]) == ("detected", "token.count_mismatch", "downtime")
    _intact(r)
    # One before the last: the last packet shows the gap, the token is never reached.
    r = run_with(AdversarySpec(kind="drop", stream=1, sequence=last - 1))
    assert r.summary["adversary"][0]["detected_by"] == "channel.bad_sequence"


def test_the_targets_rmp_check_runs_on_every_run(monkeypatch):
    """No adversary at all: a target RMP entry changed behind the agent's back (here by the test, just
    before the VMSAs) is found by the agent's check before the resume; the run aborts, intact."""
    from replay.migration.data import DataMode
    from replay.scenario.strategies import TARGET

    vmsas = DataMode.vmsas

    def reclaimed(self, *args, **kwargs):
        self.eng.rmpupdate(TARGET, self.eng.spa(TARGET, 100), assigned=False)  # gfn 100 is private
        return vmsas(self, *args, **kwargs)

    monkeypatch.setattr(DataMode, "vmsas", reclaimed)
    s = base()
    r = Migration(s, trace_for(s)).run()
    assert r.status == "aborted" and "adversary" not in r.summary
    assert r.summary["metrics"]["security"]["detected_by"].startswith("rmp.")
    _intact(r)


@pytest.mark.parametrize("phase_at, phase, push", [(50_000_000, "postcopy", True), (70_000_000, "postcopy", True),
                                                   (92_000_000, "fault", False)])
def test_recovered_link_loss_is_recorded_as_applied(phase_at, phase, push):
    """A link loss during the post-copy push (or, without a push, under the fault replies) that comes
    back: the migration stalls, re-keys and goes on; the action is recorded at the moment the link went
    down, in that phase, with the stall as its effect."""
    r = run_with(AdversarySpec(kind="link-loss", at_ns=phase_at, duration_ns=2_000_000),
                 overrides=["migration.mode=postcopy", f"migration.postcopy_background_push={str(push).lower()}"])
    (a,) = r.summary["adversary"]
    assert r.status == "completed"
    assert (a["outcome"], a["detected_by"], a["phase"]) == ("detected", "link", phase)
    assert a["applied_ns"] == phase_at and a["effect"].startswith("recovered: re-keyed, stalled ")
    stalled = int(a["effect"].split("stalled ")[1].split(" ")[0])
    c = base().costs
    assert stalled == 2_000_000 + c.attestation_psp_ns + c.attestation_cpu_ns


def test_set_reaches_adversary_entries():
    s = load_scenario(ROOT / "scenarios" / "adversary" / "flip.toml", ["adversary.0.where=header", "adversary.0.at_ns=7ms",
                                                                        "adversary.1.kind=drop"])
    assert s.adversary == (AdversarySpec(kind="flip", at_ns=7_000_000, where="header"), AdversarySpec(kind="drop"))
    for bad, message in (("adversary.3.kind=drop", r"has 1 \[\[adversary\]\] entries; N must be at most that"), ("adversary.kind=drop", "adversary.N.key"),
                         ("adversary.0.wher=header", "did you mean 'where'")):
        with pytest.raises(ScenarioError, match=message):
            load_scenario(ROOT / "scenarios" / "adversary" / "flip.toml", [bad])


def test_same_actions_same_record_bytes():
    from replay.core.records import canonical_json

    a = run_with(AdversarySpec(kind="reorder", at_ns=START_NS + 4_000_000), overrides=["migration.mode=hybrid"])
    b = run_with(AdversarySpec(kind="reorder", at_ns=START_NS + 4_000_000), overrides=["migration.mode=hybrid"])
    assert canonical_json(a.summary) == canonical_json(b.summary)
    assert a.summary["adversary"][0]["outcome"] == "detected"


def test_both_engines_agree_on_an_attacked_run():
    actions = (AdversarySpec(kind="host-write-private", at_ns=START_NS + 1_000_000),
               AdversarySpec(kind="skip-pvalidate"))
    s = with_adversary(base("trace.events=30000"), list(actions))
    runs = [Migration(s, trace_for(s), engine=kind).run().summary for kind in ("cython", "reference")]
    for r in runs:
        r["tool"].pop("engine")
    assert runs[0] == runs[1]
    assert [a["detected_by"] for a in runs[0]["adversary"]] == ["rmp.host_rmp_pf", "vc.not_validated"]


def test_postcopy_after_the_resume_fails():
    """A packet rejected once the target runs (packet 600 of the post-copy push): the guest stops."""
    r = run_with(AdversarySpec(kind="flip", stream=2, sequence=600), overrides=["migration.mode=postcopy"])
    s = r.summary
    assert s["status"] == "failed" and s["adversary"][0]["detected_by"] == "channel.bad_tag"
    assert s["adversary"][0]["at"] == "2:600"
    assert s["data"]["plaintext"]["end_of_trace"] == ""  # the guest did not reach the end of its trace
    assert s["adversary_effects"]["plaintext_end_differs"] is False  # nothing to compare, not a difference


def test_host_write_run_directory_verifies(tmp_path):
    r = run_with(AdversarySpec(kind="host-write-private", at_ns=START_NS + 3_000_000))
    r.write(tmp_path / "run")
    p = subprocess.run([sys.executable, "-m", "replay.cli", "verify", str(tmp_path / "run")], check=False,
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr


def test_run_report_shows_the_actions_and_expected_differences(tmp_path):
    from replay.analysis.report import render_html
    from replay.runs.record import load_run

    r = run_with(AdversarySpec(kind="tamper-shared", at_ns=START_NS + 3_000_000))
    r.write(tmp_path / "run")
    page = render_html([load_run(tmp_path / "run")])
    assert "<th>adversary action</th>" in page and "<td>tamper-shared</td>" in page
    a = r.summary["adversary"][0]
    assert f"<td>{a['phase']} @ {a['applied_ns']} ns</td>" in page and a["phase"] == "precopy"
    assert "plaintext_end_equals_no_migration</td><td class=\"ok\">false (the adversary&#x27;s, expected)" in page


@pytest.mark.parametrize("kind", ["rmp-bypass-copy", "stale-ciphertext", "raw-copy"])
def test_past_a_failed_rmp_memory_encryption_decides(kind, monkeypatch):
    """What if the RMP failed: the host's copy lands, and only AES-XTS (per-host key, SPA tweak) decides
    what the guest reads. A ciphertext at another SPA or on another host decrypts to something other
    than the page it came from; an old ciphertext at its own SPA decrypts to the old data. No check
    notices: undetected, and the differing plaintext is explained only by that action."""
    from replay.migration import adversary as adv
    from replay.scenario.strategies import TARGET

    seen = {}
    tick, record = adv.Adversary.tick, adv.Adversary.record_ciphertext

    def record_plain(self):
        record(self)
        for _, _, gfns, _ in self.stale.values():
            seen.setdefault("old", {g: self.data.dp.memory[SOURCE].read_plain(g) for g in gfns})

    def tick_and_look(self):
        a = self.actions[0]
        before = a.applied_ns
        tick(self)
        if before < 0 <= a.applied_ns:
            src, tgt = self.data.dp.memory[SOURCE], self.data.dp.memory[TARGET]
            g = a.gfn
            if kind == "rmp-bypass-copy":
                other = g - 1 if g - 1 in self._held_private(SOURCE) else self._held_private(SOURCE)[0]
                seen["ok"] = src.read_raw(g) == src.read_raw(other) and src.read_plain(g) != src.read_plain(other)
            elif kind == "raw-copy":
                seen["ok"] = tgt.read_raw(g) == src.read_raw(g) and tgt.read_plain(g) != src.read_plain(g)
            else:
                seen["ok"] = src.read_plain(g) == seen["old"][g]  # the old data is back

    monkeypatch.setattr(adv.Adversary, "tick", tick_and_look)
    monkeypatch.setattr(adv.Adversary, "record_ciphertext", record_plain)
    r = run_with(AdversarySpec(kind=kind, at_ns=50_000_000))
    (a,) = r.summary["adversary"]
    assert seen["ok"] is True
    assert r.status == "completed" and (a["outcome"], a["detected_by"], a["phase"]) == ("undetected", "", "precopy")
    assert a["applied_ns"] >= 50_000_000 and a["effect"].startswith(f"gfn {a['gfn']}")
    inv = r.summary["invariants"]["plaintext_end_equals_no_migration"]
    assert r.summary["adversary_effects"]["plaintext_end_differs"] is (not inv)
    assert ("plaintext_end_equals_no_migration" in r.summary["adversary_effects"]["explains"]) is (not inv)


def test_only_the_action_that_changed_the_pages_explains_a_plaintext_difference(monkeypatch):
    """An undetected shared-page tampering explains the plaintext difference it caused; a difference in a
    page no action changed (here the test's own write into a private page of the target) is not
    excused by it, and shows as an unexplained invariant failure."""
    from replay.migration import adversary as adv
    from replay.scenario.strategies import TARGET

    tamper = AdversarySpec(kind="tamper-shared", at_ns=50_000_000)
    r = run_with(tamper)
    assert r.summary["adversary_effects"]["explains"] == ["plaintext_end_equals_no_migration",
                                                          "plaintext_target_equals_source_at_switchover"]
    tick = adv.Adversary.tick

    def tick_and_corrupt(self):
        tick(self)
        held = self._held_private(TARGET)
        if held and self.phase == "vmsa" and not getattr(self, "_corrupted", False):  # a change no action made
            self._corrupted = True
            self.data.dp.memory[TARGET].write_raw(held[-1], bytes(4096))

    monkeypatch.setattr(adv.Adversary, "tick", tick_and_corrupt)
    r = run_with(tamper)
    s = r.summary
    assert s["status"] == "completed" and s["adversary"][0]["outcome"] == "undetected"
    assert not s["invariants"]["plaintext_end_equals_no_migration"]
    assert "plaintext_end_equals_no_migration" not in s["adversary_effects"]["explains"]


@pytest.mark.parametrize("mode, at", [("precopy", 50_000_000), ("precopy", 90_000_000), ("postcopy", 68_000_000)])
def test_ending_transfer_steps_at_due_times_changes_nothing_else(mode, at):
    """The phases end a transfer step at each action's due time; that moves no page and no clock: a run
    whose action changes nothing the migration sees (a host write the RMP refuses) has the same timing
    and traffic as one whose action never falls due."""
    quiet = run_with(AdversarySpec(kind="host-write-private", at_ns=10**13), overrides=[f"migration.mode={mode}"])
    split = run_with(AdversarySpec(kind="host-write-private", at_ns=at), overrides=[f"migration.mode={mode}"])
    assert split.summary["adversary"][0]["applied_ns"] >= at and quiet.summary["adversary"][0]["outcome"] == "not_reached"
    for key in ("switchover_ns", "completion_ns", "downtime_ns", "pages_sent", "bytes_sent", "rounds", "precopy_pages",
                "downtime_pages", "postcopy_pages", "guest_lost_ns"):
        assert split.summary["metrics"][key] == quiet.summary["metrics"][key], key
    assert split.summary["metrics"]["postcopy"]["latency_p99_ns"] == quiet.summary["metrics"]["postcopy"]["latency_p99_ns"]


def test_an_action_waiting_for_its_chance_does_not_hold_up_the_others_due_with_it():
    # In post-copy the target holds no private page when the guest resumes there: rmp-bypass-copy on the
    # target waits for two. host-write-private on the source, due at the same instant, acts at its first
    # chance all the same: at the same moment as alone, before the copy.
    pc = ["migration.mode=postcopy"]
    alone = run_with(AdversarySpec(kind="host-write-private", at_ns=START_NS, host="source"), overrides=pc)
    both = run_with(AdversarySpec(kind="rmp-bypass-copy", at_ns=START_NS, host="target"),
                    AdversarySpec(kind="host-write-private", at_ns=START_NS, host="source"), overrides=pc)
    one, (copy, write) = alone.summary["adversary"][0], both.summary["adversary"]
    assert (write["applied_ns"], write["gfn"], write["detected_by"]) == (one["applied_ns"], one["gfn"], "rmp.host_rmp_pf")
    assert copy["applied_ns"] > write["applied_ns"]


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_rmp_remap_names_the_batchs_next_page(monkeypatch, mode):
    """rmp-remap rewrites the RMP entry of the first page of the batch the target's agent is about to
    check so that it names the batch's second page (the page after it when the batch has one page)."""
    from replay.migration import adversary as adv
    from replay.scenario.strategies import TARGET

    seen = []
    orig = adv.Adversary.target_rmp

    def target_rmp(self, gfns):
        due = any(self._due(a) for a in self._of(("rmp-remap",)))
        out = orig(self, gfns)
        if due and len(gfns):
            g = [int(x) for x in gfns]
            seen.append((g, self.eng.rmp_entry(TARGET, self.eng.spa(TARGET, g[0])).gfn))
        return out

    monkeypatch.setattr(adv.Adversary, "target_rmp", target_rmp)
    r = run_with(AdversarySpec(kind="rmp-remap"), overrides=[f"migration.mode={mode}"])
    assert r.summary["adversary"][0]["detected_by"] == "rmp.npf_gpa_mismatch"
    (g, named), = seen
    assert named == (g[1] if len(g) > 1 else g[0] + 1) and r.summary["adversary"][0]["gfn"] == g[0]


def test_reorder_swaps_the_packet_with_the_next_one(monkeypatch):
    """reorder@S:N: packet N of stream S crosses after packet N + 1; nothing else moves."""
    from replay.migration import adversary as adv
    from replay.security.channel import parse_header

    seen = []
    orig = adv.Adversary._rewrite

    def rewrite(self, stream, packets):
        packets = list(packets)
        out = orig(self, stream, packets)
        seqs = [parse_header(p).sequence for p in packets]
        if 7 in seqs:
            seen.append((stream, seqs, [parse_header(p).sequence for p in out]))
        return out

    monkeypatch.setattr(adv.Adversary, "_rewrite", rewrite)
    r = run_with(AdversarySpec(kind="reorder", stream=0, sequence=7))
    assert r.summary["adversary"][0]["detected_by"] == "channel.bad_sequence"
    (_, before, after), = [x for x in seen if x[0] == 0]
    i = before.index(7)
    assert i < len(before) - 1  # the next packet is in the same send
    assert after == before[:i] + [before[i + 1], 7] + before[i + 2:]
