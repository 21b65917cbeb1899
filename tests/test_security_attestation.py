"""The attested handshake (replay/security/attestation.py, session.py): every verification check refuses on
its own defect and names it, nothing can be sent without an accepted handshake, keys agree and are
separate per direction and stream, and everything is a pure function of the seed."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from replay.core.errors import InvariantError
from replay.security.attestation import (DEFAULT_GUEST_POLICY, POLICY_DEBUG, POLICY_MIGRATE_MA, Agent, AmdRoot,
                                         Direction, TcbVersion, Verdict, VerifierPolicy, bind_report_data, handshake,
                                         measurement_of, verify)
from replay.security.memory import HostMemory
from replay.security.session import AttestationSetup, endpoints, establish

SEED = 11


def agents(**target):
    root = AmdRoot(SEED)
    src = Agent(root, SEED, 0, measurement=measurement_of("svsm"))
    tgt = Agent(target.pop("root", root), SEED, 1, measurement=measurement_of(target.pop("measurement", "svsm")), **target)
    policy = VerifierPolicy(root.ark_public, frozenset({measurement_of("svsm")}), TcbVersion())
    return src, tgt, policy


def test_accepted_handshake_transcript_and_keys():
    hs = establish(SEED)
    assert hs.accepted and hs.refusal is None
    assert [(s.actor, s.action, s.verdict) for s in hs.steps] == [
        ("source", "present_evidence", ""), ("target", "present_evidence", ""),
        ("source", "verify_target", "accepted"), ("target", "verify_source", "accepted"),
        ("both", "derive_transport_keys", "accepted")]
    sk, tk = hs.source_keys, hs.target_keys
    keys = {sk.key(d, s) for d in Direction for s in (0, 1, 7)}
    assert len(keys) == 6 and all(len(k) == 32 for k in keys)  # one AES-256 key per direction and stream
    assert all(sk.key(d, s) == tk.key(d, s) for d in Direction for s in (0, 1, 7))  # both sides agree


def test_handshake_is_a_pure_function_of_the_seed():
    a, b, c = establish(SEED), establish(SEED), establish(SEED + 1)
    assert a.transcript() == b.transcript()
    assert a.source_keys.key(Direction.SOURCE_TO_TARGET, 1) == b.source_keys.key(Direction.SOURCE_TO_TARGET, 1)
    assert a.transcript()[0]["digest"] != c.transcript()[0]["digest"]
    assert a.source_keys.key(Direction.SOURCE_TO_TARGET, 1) != c.source_keys.key(Direction.SOURCE_TO_TARGET, 1)
    # A re-key (session 1) after a link failure gets fresh ECDH keys, hence fresh transport keys.
    d = establish(SEED, session=1)
    assert d.accepted and d.source_keys.key(Direction.SOURCE_TO_TARGET, 1) != a.source_keys.key(Direction.SOURCE_TO_TARGET, 1)


def test_report_binds_the_ecdh_key_and_is_signed_deterministically():
    src, _, _ = agents()
    ev = src.evidence
    assert ev.report.report_data == hashlib.sha384(ev.ecdh_public).digest() + bytes(16)
    again = Agent(AmdRoot(SEED), SEED, 0, measurement=measurement_of("svsm")).evidence
    assert again.report.signature == ev.report.signature  # RFC 6979: same key and message, same signature


def test_tcb_packing_follows_the_snp_layout():
    t = TcbVersion(bootloader=1, tee=2, snp=3, microcode=4)
    assert t.packed() == 0x04_03_00000000_02_01
    assert t.meets(TcbVersion(1, 2, 3, 4)) and not t.meets(TcbVersion(1, 2, 3, 5)) and not t.meets(TcbVersion(2, 0, 0, 0))
    with pytest.raises(ValueError, match="snp must be in 0..255"):
        TcbVersion(snp=256).packed()


@pytest.mark.parametrize("setup, verdict", [
    (AttestationSetup(target_root="forged-amd"), Verdict.CHAIN),
    (AttestationSetup(target_measurement="patched-svsm"), Verdict.MEASUREMENT),
    (AttestationSetup(target_policy=DEFAULT_GUEST_POLICY & ~POLICY_MIGRATE_MA), Verdict.POLICY),
    (AttestationSetup(target_policy=DEFAULT_GUEST_POLICY | POLICY_DEBUG), Verdict.POLICY),
    (AttestationSetup(target_tcb=TcbVersion(microcode=71)), Verdict.TCB),
    (AttestationSetup(target_tcb=TcbVersion(bootloader=8, microcode=99)), Verdict.TCB),
])
def test_each_failed_check_refuses_before_any_page_moves(setup, verdict):
    hs = establish(SEED, setup)
    assert not hs.accepted and hs.refusal == ("source", verdict)
    assert hs.target_verdict is Verdict.ACCEPTED  # the source itself is fine
    assert hs.source_keys is None and hs.target_keys is None
    assert hs.transcript()[-1] == {"actor": "both", "action": "refuse", "verdict": verdict.value, "digest": ""}
    mem = HostMemory.for_host(SEED, 0, npages=4, spa_base=1024)
    with pytest.raises(InvariantError, match="no channel without an accepted handshake"):
        endpoints(hs, mem, mem)


def test_target_refuses_a_source_with_a_bad_report():
    hs = establish(SEED, AttestationSetup(source_measurement="old-svsm"))
    assert hs.refusal == ("target", Verdict.MEASUREMENT) and hs.source_verdict is Verdict.ACCEPTED


def test_signature_and_report_data_checks():
    src, tgt, policy = agents()
    assert verify(tgt.evidence, policy) is Verdict.ACCEPTED
    ev = tgt.evidence
    # The host edits the signed report (e.g. to claim a newer TCB): the VCEK signature no longer holds.
    forged = dataclasses.replace(ev, report=dataclasses.replace(ev.report, tcb=TcbVersion(microcode=200)))
    assert verify(forged, policy) is Verdict.SIGNATURE
    # A man in the middle presents his own ECDH key with the genuine report: report_data does not bind it.
    mitm = dataclasses.replace(ev, ecdh_public=src.evidence.ecdh_public)
    assert verify(mitm, policy) is Verdict.REPORT_DATA
    assert bind_report_data(src.evidence.ecdh_public) != ev.report.report_data
    # A VCEK from another root with the genuine ASK certificate: the VCEK's signature does not chain.
    rogue = agents(root=AmdRoot(SEED, "rogue"))[1].evidence
    assert verify(dataclasses.replace(rogue, ask_cert=ev.ask_cert), policy) is Verdict.CHAIN
    assert verify(rogue, policy) is Verdict.CHAIN


def test_first_failing_check_is_named():
    _, tgt, policy = agents(measurement="patched", policy=DEFAULT_GUEST_POLICY | POLICY_DEBUG, tcb=TcbVersion(snp=0))
    assert verify(tgt.evidence, policy) is Verdict.MEASUREMENT
    allow_all = dataclasses.replace(policy, measurements=frozenset({measurement_of("patched")}))
    assert verify(tgt.evidence, allow_all) is Verdict.POLICY
    _, tgt2, _ = agents(measurement="patched", tcb=TcbVersion(snp=0))
    assert verify(tgt2.evidence, allow_all) is Verdict.TCB
    assert verify(tgt2.evidence, dataclasses.replace(allow_all, min_tcb=TcbVersion(snp=0))) is Verdict.ACCEPTED


def test_handshake_directly_with_different_policies_per_side():
    src, tgt, policy = agents()
    strict = dataclasses.replace(policy, min_tcb=TcbVersion(snp=24))  # the source wants a newer target
    hs = handshake(src, tgt, strict, policy)
    assert hs.refusal == ("source", Verdict.TCB) and hs.target_verdict is Verdict.ACCEPTED


def _signed_by(vcek_host: int, vcek_tcb: TcbVersion, *, report_host: int = 1, report_tcb: TcbVersion = TcbVersion()):
    """Evidence whose report claims ``report_host``'s chip and ``report_tcb``, signed by the VCEK of
    ``vcek_host`` at ``vcek_tcb`` (the host's own key, so the chain and the signature verify)."""
    from replay.security.attestation import _ECDSA, chip_id_of

    root = AmdRoot(SEED)
    ev = Agent(root, SEED, report_host, measurement=measurement_of("svsm"), tcb=report_tcb).evidence
    key, cert = root.vcek(vcek_host, vcek_tcb)
    report = dataclasses.replace(ev.report, chip_id=chip_id_of(SEED, report_host), tcb=report_tcb)
    report = dataclasses.replace(report, signature=key.sign(report.body(), _ECDSA))
    return dataclasses.replace(ev, report=report, vcek_cert=cert)


def test_vcek_tcb_and_chip_id_must_be_the_reports():
    """A report claiming a patched TCB signed with an unpatched TCB's VCEK, or naming another chip than
    the VCEK's, is refused though chain and signature verify; the same report with its own VCEK passes."""
    policy = VerifierPolicy(AmdRoot(SEED).ark_public, frozenset({measurement_of("svsm")}), TcbVersion())
    patched, old = TcbVersion(microcode=80), TcbVersion(microcode=60)
    assert verify(_signed_by(1, patched, report_tcb=patched), policy) is Verdict.ACCEPTED  # the oracle: consistent
    assert verify(_signed_by(1, old, report_tcb=patched), policy) is Verdict.VCEK_TCB_MISMATCH
    assert verify(_signed_by(0, patched, report_tcb=patched), policy) is Verdict.CHIP_ID_MISMATCH
    assert Verdict.VCEK_TCB_MISMATCH.value == "vcek_tcb_mismatch" and Verdict.CHIP_ID_MISMATCH.value == "chip_id_mismatch"
    # The VCEK's chip id and TCB are signed with it: rewriting them breaks the chain.
    ev = _signed_by(1, old, report_tcb=patched)
    forged = dataclasses.replace(ev, vcek_cert=dataclasses.replace(ev.vcek_cert, tcb=patched))
    assert verify(forged, policy) is Verdict.CHAIN


def test_p384_private_key_is_the_hkdf_output_reduced_into_1_to_n_minus_1():
    from replay.security.keys import P384_ORDER, derive, p384_private_key

    # The documented rule: 64 bytes of HKDF output, big-endian, mod (n - 1), plus 1 (never 0).
    for seed, label in ((0, "a"), (7, "vcek"), (-3, "agent/source")):
        want = int.from_bytes(derive(seed, label, 64), "big") % (P384_ORDER - 1) + 1
        assert p384_private_key(seed, label).private_numbers().private_value == want
