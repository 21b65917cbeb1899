"""When an adversary action falls due, on the tiny data-mode run, at the exact instant (issue 22, tools/mutate
survivors in replay/migration/adversary.py), and what an action that never acted records.

The run is test_precopy's tiny pre-copy scenario in data mode: setup 1000..5100 (a mirror VM per side,
1000 ns each, the initial sync 100 ns after dirty logging starts at 5000), then the attested handshake at
5100 (its round trip, 2 x 10 ns, until 5120). The handshake is the attestation actions' one chance: an
action falls due once the acting clock has reached its time (docs/adversary: "at or after").

A second scenario has every cost before the first burst at 0 (migration at 0, no latency): the
handshake and round 0's first send happen at 0 ns.
"""

from __future__ import annotations

import dataclasses

import pytest

from replay.migration import Migration
from replay.scenario.spec import AdversarySpec, make_scenario, with_adversary
from test_postcopy import pc_scenario, pc_trace
from test_precopy import COSTS, tiny_scenario, tiny_trace, write_trace

HANDSHAKE = 5100


@pytest.fixture
def pre(tmp_path):
    return tiny_trace(tmp_path / "tiny.arrow")


def _run(s, trace, *actions):
    r = Migration(with_adversary(s, list(actions)), trace).run()
    (a,) = r.summary["adversary"]
    return r, a


def _at_zero():
    return make_scenario(guest={"os_vmpl": 0}, trace={"file": "unused.arrow"},
                         migration={"start_ns": 0, "latency_ns": 0, "bandwidth_bytes_per_s": 5_000_000_000,
                                    "agents_initial": 1, "agents_max": 1, "data": True},
                         costs={**COSTS, "mirror_vm_create_ns": 0, "ap_create_ns": 0, "dirty_sync_ns": 0})


@pytest.mark.parametrize("at, outcome", [(HANDSHAKE, "detected"), (HANDSHAKE + 1, "not_reached")])
def test_an_attestation_action_due_exactly_at_the_handshake_acts(pre, at, outcome):
    r, a = _run(tiny_scenario(data=True), pre, AdversarySpec(kind="bad-tcb", at_ns=at))
    assert a["outcome"] == outcome
    if outcome == "detected":
        assert (r.status, a["applied_ns"], a["phase"], a["detected_by"]) == ("aborted", HANDSHAKE, "handshake",
                                                                              "attestation.tcb")
    else:  # its one chance passed 1 ns before its time: the run completes, the action recorded as never acting
        assert r.status == "completed"
        assert (a["applied_ns"], a["gfn"], a["phase"], a["detected_by"], a["effect"]) == (0, 0, "", "", "")


def test_an_action_without_a_time_acts_at_the_first_chance_even_at_0_ns(pre):
    r, a = _run(_at_zero(), pre, AdversarySpec(kind="bad-tcb"))
    assert (r.status, a["at"], a["outcome"], a["applied_ns"]) == ("aborted", "first", "detected", 0)


def test_a_host_write_at_0_ns_acts_once(pre):
    # Due at 0 and applied at 0 (round 0's first send, on the source): one RMP #PF, never again.
    r, a = _run(_at_zero(), pre, AdversarySpec(kind="host-write-private", at_ns=0))
    assert r.status == "completed"
    assert (a["outcome"], a["applied_ns"], a["phase"], a["gfn"]) == ("detected", 0, "precopy", 0)
    assert r.summary["metrics"]["faults"]["host_rmp_pf"] == 1


@pytest.mark.parametrize("min_tcb", ["1.0.0.0", "0.1.0.0", "0.0.1.0", "0.0.0.1", "9.0.23.0"])
def test_bad_tcb_is_below_any_minimum(pre, min_tcb):
    # Both platforms at 9.1.23.72 meet every minimum here; the action sets the target's TCB one below the
    # minimum's microcode (or, with microcode 0 there, to 0.0.0.0): the source's check of the target's
    # report refuses it whichever component the minimum sets.
    s = tiny_scenario(data=True)
    s = dataclasses.replace(s, attestation=dataclasses.replace(s.attestation, min_tcb=min_tcb, source_tcb="9.1.23.72",
                                                                 target_tcb="9.1.23.72"))
    r, a = _run(s, pre, AdversarySpec(kind="bad-tcb"))
    assert (r.status, a["outcome"], a["detected_by"]) == ("aborted", "detected", "attestation.tcb")
    assert r.summary["status_reason"].startswith("attestation refused by the source: tcb")


def test_a_link_loss_records_no_page(pre):
    # A link loss acts on no page: its record's gfn is 0 like an unreached action's.
    r, a = _run(tiny_scenario(data=True), pre, AdversarySpec(kind="link-loss", at_ns=6000))
    assert (r.status, a["outcome"], a["applied_ns"], a["gfn"]) == ("aborted", "detected", 6000, 0)


def test_stale_ciphertext_records_the_lowest_4096_private_pages(tmp_path):
    # 4097 private pages, each written once from t = 0; gfn 4096 written again at 6000, after the handshake
    # (5100) where the host records the lowest 4096 pages' ciphertext (STALE_PAGES, 16 MiB): the one page
    # that changes was never recorded, so the action has nothing to write back.
    n = 4097
    trace = write_trace(tmp_path / "wide.arrow", [(g, 0, g) for g in range(n)] + [(6000, 0, n - 1)], npages=n, vcpus=1)
    r, a = _run(tiny_scenario(data=True), trace, AdversarySpec(kind="stale-ciphertext", at_ns=7000))
    assert (r.status, a["outcome"], a["effect"]) == ("completed", "not_reached", "")


@pytest.mark.parametrize("at, applied, gfn, phase", [(8100, 8200, 3, "fault"), (8101, 9100, 1, "postcopy")])
def test_a_fault_reply_carries_an_action_once_the_push_has_reached_its_time(tmp_path, at, applied, gfn, phase):
    # test_postcopy's tiny post-copy run with data mode's per-page costs set to the metadata ones (packaging
    # 500 ns, no unpacking, no compression): test_boundaries' timeline. The push sends gfn 0 7100..8100;
    # vCPU 1's fault on gfn 3 puts its reply on the wire at 8200, the push's clock standing at 8100; the
    # push sends gfn 1 at 9100. A flip due at 8100 is due for the reply (the push has reached 8100 too);
    # due at 8101, the reply goes out before the push reaches it: the push's gfn 1 carries it.
    s = pc_scenario(costs={"data_page_pack_ns": 500, "data_page_unpack_ns": 0, "data_zstd_page_ns": 0}, data=True)
    r, a = _run(s, pc_trace(tmp_path / "pc.arrow"), AdversarySpec(kind="flip", at_ns=at))
    assert (a["outcome"], a["detected_by"]) == ("detected", "channel.bad_tag")
    assert (a["applied_ns"], a["gfn"], a["phase"]) == (applied, gfn, phase)


def _acted(a):
    return a["outcome"], a["applied_ns"], a["gfn"], a["phase"]


def test_host_actions_due_together_all_act_at_the_first_chance(pre):
    # Round 0's one send of gfn 0..3 begins at 5120; the hosts act right after it (the tick), in the
    # scenario's order. Two actions not due yet (and a stale-ciphertext that only records) come first and
    # hold none of the others back: raw-copy takes the lowest page the target holds (gfn 0), the RMP
    # bypass copies gfn 0's ciphertext over gfn 1 on the target, and both host writes hit gfn 0 (two #PFs).
    far = 10**12
    r = Migration(with_adversary(tiny_scenario(data=True), [
        AdversarySpec(kind="stale-ciphertext", at_ns=far), AdversarySpec(kind="host-write-private", at_ns=far),
        AdversarySpec(kind="raw-copy", at_ns=5120), AdversarySpec(kind="rmp-bypass-copy", at_ns=5120, host="target"),
        AdversarySpec(kind="host-write-private", at_ns=5120, host="target"),
        AdversarySpec(kind="host-write-private", at_ns=5120, host="source")]), pre).run()
    assert [_acted(a) for a in r.summary["adversary"]] == [
        ("not_reached", 0, 0, ""), ("not_reached", 0, 0, ""), ("undetected", 5120, 0, "precopy"),
        ("undetected", 5120, 1, "precopy"), ("detected", 5120, 0, "precopy"), ("detected", 5120, 0, "precopy")]
    assert r.summary["metrics"]["faults"]["host_rmp_pf"] == 2


def test_a_host_write_on_a_host_holding_nothing_private_waits_alone(tmp_path):
    # Post-copy (test_boundaries' timeline, data mode at the metadata costs): the first tick follows the
    # VMSAs at 3000, when the target holds no page of the guest: its write waits for the push's gfn 0
    # (7100); the source's write, due too, is not held back by it.
    s = pc_scenario(costs={"data_page_pack_ns": 500, "data_page_unpack_ns": 0, "data_zstd_page_ns": 0}, data=True)
    r = Migration(with_adversary(s, [AdversarySpec(kind="host-write-private", at_ns=0, host="target"),
                                     AdversarySpec(kind="host-write-private", at_ns=0, host="source")]),
                  pc_trace(tmp_path / "pc.arrow")).run()
    assert [_acted(a) for a in r.summary["adversary"]] == [("detected", 7100, 0, "postcopy"),
                                                           ("detected", 3000, 0, "vmsa")]


def test_an_rmp_bypass_copy_needs_two_private_pages_and_two_are_enough(tmp_path):
    trace = write_trace(tmp_path / "two.arrow", [(0, 0, 0), (1, 0, 1)], npages=2, vcpus=1)
    r, a = _run(tiny_scenario(data=True), trace, AdversarySpec(kind="rmp-bypass-copy", at_ns=5120))
    assert _acted(a) == ("undetected", 5120, 1, "precopy")
    assert a["effect"] == "gfn 1 holds gfn 0's ciphertext: decrypts to garbage"
