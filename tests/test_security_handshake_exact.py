"""The handshake's bytes and bounds recomputed by hand (replay/security/attestation.py, session.py).

The report body, the evidence digest, the session salt and the transport keys are rebuilt here from the
documented layouts (``<IQQ`` version 2, policy, TCB; ``<I``-length-prefixed fields; HKDF-SHA384 over the
ECDH secret with the SHA-384 of both evidence digests as salt); the AMD policy bits and the TCB and stream
ranges at their last accepted and first refused values; a handshake both sides refuse names the source's
verdict first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from replay.security import attestation as at
from replay.security.attestation import (Agent, AmdRoot, Direction, SessionKeys, TcbVersion, Verdict, measurement_of,
                                         verify)
from replay.security.keys import p384_private_key
from replay.security.session import AttestationSetup, establish

SEED = 5


def _fields(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "little") + p for p in parts)


def test_policy_bits_are_amds():
    # AMD SEV-SNP ABI guest policy: SMT bit 16, reserved-must-be-one bit 17, MIGRATE_MA bit 18, DEBUG bit 19.
    assert (at.POLICY_SMT, at.POLICY_RESERVED_ONE, at.POLICY_MIGRATE_MA, at.POLICY_DEBUG) == (
        0x10000, 0x20000, 0x40000, 0x80000)
    assert at.DEFAULT_GUEST_POLICY == 0x70000


def test_the_default_tcb_is_the_scenarios_default_9_0_23_72():
    # A platform at the default TCB meets the default minimum exactly (scenario attestation.min_tcb).
    from replay.scenario.spec import AttestationSpec

    assert (TcbVersion().bootloader, TcbVersion().tee, TcbVersion().snp, TcbVersion().microcode) == (9, 0, 23, 72)
    assert str(TcbVersion()) == "bl=9,tee=0,snp=23,ucode=72"
    assert AttestationSpec().min_tcb == AttestationSpec().source_tcb == "9.0.23.72"


def test_tcb_components_are_bytes_0_to_255():
    assert TcbVersion(255, 255, 255, 255).packed() == 0xFF_FF_0000_0000_FF_FF
    assert TcbVersion(0, 0, 0, 0).packed() == 0
    for name in ("bootloader", "tee", "snp", "microcode"):
        with pytest.raises(ValueError, match=f"^TCB component {name} must be in 0..255$"):
            TcbVersion(**{name: -1}).packed()
        with pytest.raises(ValueError, match=f"^TCB component {name} must be in 0..255$"):
            TcbVersion(**{name: 256}).packed()


def test_a_tcb_meets_a_minimum_equal_in_every_component():
    t = TcbVersion(3, 5, 7, 9)
    assert t.meets(t)
    for i in range(4):
        higher = [3, 5, 7, 9]
        higher[i] += 1
        assert not t.meets(TcbVersion(*higher))
        assert TcbVersion(*higher).meets(t)


def test_the_report_body_and_evidence_digest_by_hand():
    root = AmdRoot(SEED)
    tcb = TcbVersion(1, 2, 3, 4)
    ev = Agent(root, SEED, 1, measurement=measurement_of("svsm"), tcb=tcb, policy=0x70000).evidence
    r = ev.report
    assert r.body() == struct.pack("<IQQ", 2, 0x70000, 0x04_03_00000000_02_01) + _fields(
        r.chip_id, hashlib.sha384(b"snp-replay/measurement/svsm").digest(), r.report_data)
    assert len(r.chip_id) == 64 and r.report_data == hashlib.sha384(ev.ecdh_public).digest() + bytes(16)
    c = ev.vcek_cert
    assert c.tbs() == _fields(b"snp-replay-cert-v1", c.subject.encode(), b"ASK-Genoa", c.public_key, r.chip_id,
                              struct.pack("<Q", tcb.packed()))
    a = ev.ask_cert
    assert a.tbs() == _fields(b"snp-replay-cert-v1", b"ASK-Genoa", b"ARK-Genoa", a.public_key)
    assert ev.digest() == hashlib.sha384(_fields(r.body(), r.signature, c.tbs(), c.signature, a.tbs(), a.signature,
                                                 ev.ecdh_public)).digest()


def test_an_agent_is_session_0_unless_told_and_takes_its_report_fields_by_keyword():
    from cryptography.hazmat.primitives import serialization

    ev = Agent(AmdRoot(SEED), SEED, 1, measurement=measurement_of("svsm")).evidence
    point = p384_private_key(SEED, "ecdh/host=1/session=0").public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    assert ev.ecdh_public == point and len(point) == 97
    with pytest.raises(TypeError):
        Agent(AmdRoot(SEED), SEED, 1, measurement_of("svsm"))  # type: ignore[misc]


def test_a_vceks_chip_id_is_signed_with_it():
    root = AmdRoot(SEED)
    ev = Agent(root, SEED, 1, measurement=measurement_of("svsm")).evidence
    policy = at.VerifierPolicy(root.ark_public, frozenset({measurement_of("svsm")}))
    other = at.chip_id_of(SEED, 0)
    forged = dataclasses.replace(ev, vcek_cert=dataclasses.replace(ev.vcek_cert, chip_id=other))
    assert verify(forged, policy) is Verdict.CHAIN


def test_transport_keys_are_hkdf_over_the_ecdh_secret_salted_with_both_evidences():
    hs = establish(SEED, session=2)
    src = p384_private_key(SEED, "ecdh/host=0/session=2")
    tgt = p384_private_key(SEED, "ecdh/host=1/session=2")
    secret = src.exchange(ec.ECDH(), tgt.public_key())
    se, te = (bytes.fromhex(s["digest"]) for s in hs.transcript()[:2])
    salt = hashlib.sha384(se + te).digest()
    assert hs.transcript()[-1] == {"actor": "both", "action": "derive_transport_keys", "verdict": "accepted",
                                   "digest": salt.hex()}
    for direction, name in ((Direction.SOURCE_TO_TARGET, "s2t"), (Direction.TARGET_TO_SOURCE, "t2s")):
        want = HKDF(algorithm=hashes.SHA384(), length=32, salt=salt,
                    info=f"snp-replay transport v1 {name} stream=65535".encode()).derive(secret)
        assert hs.source_keys.key(direction, 65535) == want == hs.target_keys.key(direction, 65535)


@pytest.mark.parametrize("stream", [-1, 65536])
def test_a_stream_outside_16_bits_has_no_key(stream):
    keys = SessionKeys(b"s" * 48, b"t" * 48)
    assert len(keys.key(Direction.SOURCE_TO_TARGET, 0)) == 32
    with pytest.raises(ValueError, match=f"^stream must be in 0..65535, got {stream}$"):
        keys.key(Direction.SOURCE_TO_TARGET, stream)


def test_when_both_refuse_the_source_is_named_and_no_key_exists():
    hs = establish(SEED, AttestationSetup(target_measurement="old", source_policy=0x70000 | at.POLICY_DEBUG))
    assert (hs.source_verdict, hs.target_verdict) == (Verdict.MEASUREMENT, Verdict.POLICY)
    assert hs.refusal == ("source", Verdict.MEASUREMENT) and not hs.accepted
    assert hs.transcript()[-1] == {"actor": "both", "action": "refuse", "verdict": "measurement", "digest": ""}
    assert hs.source_keys is None and hs.target_keys is None
    # Only the target refusing: it is named, with its verdict.
    hs = establish(SEED, AttestationSetup(source_policy=0x70000 | at.POLICY_DEBUG))
    assert hs.refusal == ("target", Verdict.POLICY) and not hs.accepted
    assert hs.transcript()[-1]["verdict"] == "policy" and hs.source_keys is None
