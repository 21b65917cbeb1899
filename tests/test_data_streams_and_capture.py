"""Data mode's streams and capture in the driver (replay/migration/data.py): each kind of traffic on its
documented stream (0 pre-copy, 1 stop-and-copy, 2 post-copy push, 3 post-copy fault replies, 4 VMSAs;
the token on 65535), as the run record's per-stream sequence counts show; a page the target's guest
writes after the push delivered it, while the same push step goes on, keeps the guest's write (the push's
groups are sent as they come on the target, never held back past the guest's rows); and
a page a WRITE changes after its pre-copy send in the same transfer goes with the contents it had at its
send, whatever the WRITE's content seed (the op column, not the value column, says what a row does); and
``differing_pages`` finds a differing page at gfn 0 and past its 4096-page chunks; the scenario's
[attestation] section gives the handshake exactly the target policy bits it names; and in the post-copy
push the target's agent checks each group of consecutive sends after it landed, so a refusal comes after
the whole group (a group ends only where a row touches one of its pages before the next send)."""

from __future__ import annotations

import numpy as np

from replay.migration import Migration, run
from replay.migration.data import attestation_setup, differing_pages
from replay.scenario.spec import AdversarySpec, AttestationSpec, with_adversary
from replay.security.attestation import TcbVersion
from replay.security.memory import HostMemory
from replay.traces.format import TraceWriter
from test_postcopy import pc_scenario, pc_trace
from test_precopy import tiny_scenario, tiny_trace


def sequences(r):
    sec = r.summary["metrics"]["security"]
    assert sec["source"]["sequences"] == sec["target"]["sequences"]
    return sec["source"]["sequences"]


def test_precopy_traffic_uses_streams_0_1_and_4(tmp_path):
    # test_precopy's tiny guest (4 pages, one vCPU at VMPL0): the pre-copy round sends every page (all four
    # written before the start), the stop-and-copy the pages dirtied after the round sent them, one VMSA.
    r = run(tiny_scenario(data=True), strategy="mirror-vm", trace_path=tiny_trace(tmp_path / "t.arrow"))
    assert r.status == "completed"
    down = sum(x["pages_sent"] for x in r.rounds.to_pylist() if x["phase"] == "downtime")
    assert down == 2
    assert sequences(r) == {"0": 4, "1": down, "4": 1, "65535": 1}


def test_postcopy_traffic_uses_streams_2_3_and_4(tmp_path):
    # 8 written pages, one vCPU; the guest resumes on the target at g = 3000 and touches gfn 7 1 ns later:
    # the push goes in gfn order, so gfn 7 is a fault (its reply on stream 3) and the push sends the other
    # 7 pages (stream 2); one VMSA (stream 4).
    rows = [(i, 0, i) for i in range(8)] + [(3001, 0, 7), (60000, 0, 0)]
    r = run(pc_scenario(data=True), strategy="mirror-vm",
            trace_path=pc_trace(tmp_path / "p.arrow", rows=rows, vcpus=1, npages=8))
    assert r.status == "completed"
    assert [(f["vcpu"], f["gfn"]) for f in r.faults.to_pylist()] == [(0, 7)]
    assert sequences(r) == {"2": 7, "3": 1, "4": 1, "65535": 1}


def test_a_page_written_on_the_target_during_the_push_keeps_the_write(tmp_path):
    # The push delivers gfns 0, 1, 2; the guest (on the target, gfn 1 there now) writes gfn 1 at g 12000;
    # the same push step then sends gfns 3..7. Sent as it comes, gfn 1 lands before the write: the target
    # ends with the straight replay's memory. Held back to the end of the step, the pushed copy would land
    # after the write and undo it.
    rows = [(i, 0, i) for i in range(8)] + [(12000, 0, 1), (60000, 0, 7)]
    r = run(pc_scenario(data=True), strategy="mirror-vm",
            trace_path=pc_trace(tmp_path / "w.arrow", rows=rows, vcpus=1, npages=8))
    assert r.status == "completed" and r.faults.num_rows == 0  # no fault: gfn 1 was there before 12000
    assert sequences(r) == {"2": 8, "4": 1, "65535": 1}
    d = r.summary["digests"]
    assert d["end_of_trace"] == d["no_migration"]
    assert r.summary["invariants"]["plaintext_end_equals_no_migration"] is True


def test_a_page_changed_after_its_send_goes_with_its_contents_at_the_send(tmp_path):
    # test_precopy's tiny run with zstd: gfns 0..3 hold 8 bytes each; round 0 sends gfn 0 before g 11000 and
    # gfns 1..3 after it, in the same transfer; at 11000 a WRITE fills gfn 0 with the content function of
    # seed 1 (4096 bytes that do not compress; 1 is also Op.READ's code, which must not matter: only the
    # op column says what a row does). Round 0's copy of gfn 0 is the one of its send (8 bytes): it
    # compresses. Compressed pages: round 0's 4 + the VMSA (256 bytes and zeros) = 5; the stop-and-copy
    # resends the dirty gfn 0, full and incompressible.
    rows = [(0, 0, 8, 2), (1, 1, 8, 3), (2, 2, 8, 4), (3, 3, 8, 5), (11000, 0, 4096, 1), (30000, 3, 8, 6)]
    p, n = tmp_path / "w.arrow", len(rows)
    with TraceWriter(p, guest_bytes=4 * 4096, vcpus=1, source={"test": "seed1"}) as w:
        w.write(np.array([r[0] for r in rows], np.uint64), np.zeros(n, np.uint16),
                np.array([r[1] * 4096 for r in rows], np.uint64), np.array([r[2] for r in rows], np.uint32),
                np.zeros(n, np.uint8), np.array([r[3] for r in rows], np.uint64))  # op 0: WRITE
    r = run(tiny_scenario(data=True, data_zstd_level=3), strategy="mirror-vm", trace_path=p)
    assert r.status == "completed"
    assert [(x["phase"], x["pages_sent"]) for x in r.rounds.to_pylist()] == [("precopy", 4), ("downtime", 1)]
    assert sequences(r) == {"0": 4, "1": 1, "4": 1, "65535": 1}
    sec = r.summary["metrics"]["security"]
    assert sec["source"]["compressed_pages"] == sec["target"]["compressed_pages"] == 5


def write(mem, gfn, value):
    mem.apply(np.array([gfn * 4096], np.uint64), np.array([8], np.uint64), np.zeros(1, np.uint8),
              np.array([value], np.uint64))


def test_differing_pages_at_gfn_0_and_past_the_first_chunk():
    # 4098 pages: chunks [0, 4096) and [4096, 4098); pages differ at both ends of the guest and at the second
    # chunk's first page.
    a = HostMemory.for_host(3, 0, npages=4098, spa_base=0)
    b = HostMemory.for_host(3, 1, npages=4098, spa_base=8192)
    for g in (0, 5, 4095, 4096, 4097):
        write(a, g, 1)
        write(b, g, 1)
    assert differing_pages(a, b) == set()  # the same plain text under other keys and SPAs
    for g in (0, 4095, 4096, 4097):
        write(b, g, 2)
    assert differing_pages(a, b) == {0, 4095, 4096, 4097}


def test_the_attestation_section_sets_exactly_the_targets_policy_bits():
    # DEFAULT_GUEST_POLICY = SMT (bit 16) | reserved-one (17) | MIGRATE_MA (18) = 0x70000; DEBUG is bit 19.
    assert attestation_setup(AttestationSpec()).target_policy == 0x70000
    assert attestation_setup(AttestationSpec(target_migratable=False)).target_policy == 0x30000
    assert attestation_setup(AttestationSpec(target_debug=True)).target_policy == 0xF0000
    assert attestation_setup(AttestationSpec(target_migratable=False, target_debug=True)).target_policy == 0xB0000
    s = attestation_setup(AttestationSpec(min_tcb="1.2.3.4", target_tcb="5.6.7.8"))
    assert (s.min_tcb, s.target_tcb) == (TcbVersion(1, 2, 3, 4), TcbVersion(5, 6, 7, 8))


def test_a_refusal_in_the_push_comes_after_the_whole_group(tmp_path):
    # The run above with an rmp-remap action due from 0 ns: the push's first step sends gfns 0, 1, 2 before
    # the guest's write of gfn 1 at g 12000 (the row after gfn 2's send) and 3..7 after it. Consecutive
    # sends form one group as long as no row between a page's send and the group's last send touches the
    # page: gfn 1's next touch is exactly the row after gfn 2's send, so gfns 0, 1, 2 are one group, sent
    # (3 packets on stream 2) before the target's agent checks them; the host has remapped gfn 0's RMP
    # entry (to the group's next page, gfn 1): the check refuses there.
    rows = [(i, 0, i) for i in range(8)] + [(12000, 0, 1), (60000, 0, 7)]
    trace = pc_trace(tmp_path / "w.arrow", rows=rows, vcpus=1, npages=8)
    r = Migration(with_adversary(pc_scenario(data=True), [AdversarySpec(kind="rmp-remap", at_ns=0)]), trace).run()
    (a,) = r.summary["adversary"]
    assert (r.status, a["outcome"], a["detected_by"], a["gfn"], a["phase"]) == (
        "failed", "detected", "rmp.npf_gpa_mismatch", 0, "postcopy")
    sec = r.summary["metrics"]["security"]
    assert sec["source"]["sequences"] == {"2": 3, "4": 1}  # no token: the migration stopped
    assert sec["target"]["private_pages"] == 3
