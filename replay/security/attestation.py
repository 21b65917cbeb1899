"""The attested handshake between the two migration agents (SPEC section 5), emulated with real crypto.

What is modelled, and how:

- **Keys.** An emulated AMD root (ARK) and signing key (ASK), and one VCEK per host and TCB, all ECDSA
  P-384, derived from the scenario seed (``replay.security.keys``). Certificates are minimal signed
  records (``Certificate``: subject, issuer, public key, signature; a VCEK's also its chip id and TCB),
  not X.509: what matters here is the
  chain of signatures, and a fixed byte layout keeps them free of validity dates and encoding choices.
- **Report.** Each agent's ``AttestationReport`` carries the guest's launch measurement, its policy
  (AMD's bit positions: ``MIGRATE_MA`` bit 18, ``DEBUG`` bit 19, bit 17 reserved-must-be-one), the
  platform TCB version and ``report_data`` = SHA-384 of the agent's ephemeral ECDH P-384 public key
  (zero-padded to 64 bytes as in the real report), signed by its host's VCEK with deterministic ECDSA
  (RFC 6979), so the same seed gives the same bytes.
- **Verification** (``verify``) checks, in this order, and names the first check that fails
  (``Verdict``): the chain ARK -> ASK -> VCEK (``chain``), the report's signature (``signature``), the
  VCEK's TCB and chip id against the report's (``vcek_tcb_mismatch``, ``chip_id_mismatch``), the
  measurement against an allow-list (``measurement``), the policy (migratable set, debug clear:
  ``policy``), every TCB component at least the minimum (``tcb``), and that ``report_data`` binds the
  ECDH key the agent presented (``report_data``).
- **Handshake** (``handshake``): both agents present their evidence; the source verifies the target (it
  must not hand the guest to an unverified machine) and the target verifies the source (it must not run
  a guest it cannot vouch for). Only if both accept do the agents run ECDH, and HKDF-SHA384 over the
  shared secret (salted with the hash of both reports) gives one AES-256-GCM key per direction and
  stream. Otherwise no key exists, so no page can move. The ``Handshake`` keeps a transcript (steps and
  verdicts) for the run record.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .keys import derive, p384_private_key

# Guest policy bits (AMD SEV-SNP ABI, guest policy structure).
POLICY_SMT = 1 << 16
POLICY_RESERVED_ONE = 1 << 17  # must be one
POLICY_MIGRATE_MA = 1 << 18  # the guest may be migrated by a migration agent
POLICY_DEBUG = 1 << 19  # debugging allowed: the host could read guest memory
DEFAULT_GUEST_POLICY = POLICY_SMT | POLICY_RESERVED_ONE | POLICY_MIGRATE_MA

REPORT_VERSION = 2
MEASUREMENT_BYTES = 48
REPORT_DATA_BYTES = 64
GCM_KEY_BYTES = 32
_ECDSA = ec.ECDSA(hashes.SHA384(), deterministic_signing=True)


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    """SEC1 uncompressed encoding of a public key (97 bytes for P-384)."""
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _load_point(data: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), data)


def _fields(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: an unambiguous encoding of several byte strings."""
    return b"".join(struct.pack("<I", len(p)) + p for p in parts)


def _verify_sig(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        _load_point(public).verify(signature, message, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True, order=True)
class TcbVersion:
    """The platform's security patch levels (SNP TCB_VERSION components)."""

    bootloader: int = 9
    tee: int = 0
    snp: int = 23
    microcode: int = 72

    def packed(self) -> int:
        """The 64-bit TCB_VERSION layout: bootloader byte 0, tee byte 1, snp byte 6, microcode byte 7."""
        for name in ("bootloader", "tee", "snp", "microcode"):
            if not 0 <= getattr(self, name) <= 255:
                raise ValueError(f"TCB component {name} must be in 0..255")
        return self.bootloader | self.tee << 8 | self.snp << 48 | self.microcode << 56

    def meets(self, minimum: "TcbVersion") -> bool:
        """Every component at least the minimum's (a platform is only as patched as its oldest part)."""
        return (self.bootloader >= minimum.bootloader and self.tee >= minimum.tee
                and self.snp >= minimum.snp and self.microcode >= minimum.microcode)

    def __str__(self) -> str:
        return f"bl={self.bootloader},tee={self.tee},snp={self.snp},ucode={self.microcode}"


@dataclass(frozen=True)
class Certificate:
    """A minimal certificate: ``issuer`` vouches, by ``signature``, that ``public_key`` is ``subject``'s.

    A VCEK's also names the chip (``chip_id``, AMD's hwID extension) and the TCB it was derived for (the
    blSPL/teeSPL/snpSPL/ucodeSPL extensions): a report it signs must claim the same, or a host could sign
    a report claiming a patched TCB with the key of an unpatched one, or another machine's."""

    subject: str
    issuer: str
    public_key: bytes  # SEC1 uncompressed P-384 point
    signature: bytes
    chip_id: bytes = b""  # VCEK only
    tcb: "TcbVersion | None" = None  # VCEK only

    def tbs(self) -> bytes:
        """The signed part."""
        parts = [b"snp-replay-cert-v1", self.subject.encode(), self.issuer.encode(), self.public_key]
        if self.tcb is not None:  # a VCEK's extensions are signed with it
            parts += [self.chip_id, struct.pack("<Q", self.tcb.packed())]
        return _fields(*parts)


def _issue(subject: str, public: ec.EllipticCurvePublicKey, issuer: str, signer: ec.EllipticCurvePrivateKey,
           chip_id: bytes = b"", tcb: "TcbVersion | None" = None) -> Certificate:
    unsigned = Certificate(subject, issuer, _point(public), b"", chip_id, tcb)
    return dataclasses.replace(unsigned, signature=signer.sign(unsigned.tbs(), _ECDSA))


def chip_id_of(seed: int, host: int) -> bytes:
    """The 64-byte chip id of ``host`` (its VCEK names it, its reports carry it)."""
    return derive(seed, f"chip/host={host}", 64)


class AmdRoot:
    """The emulated AMD key hierarchy of one scenario: ARK (root, self-signed) -> ASK -> VCEK per host.

    A different ``seed`` or ``name`` gives an unrelated hierarchy (a forged root, for the tests)."""

    def __init__(self, seed: int, name: str = "amd"):
        self.seed, self.name = seed, name
        self._ark = p384_private_key(seed, f"{name}/ark")
        self._ask = p384_private_key(seed, f"{name}/ask")
        self.ark_cert = _issue("ARK-Genoa", self._ark.public_key(), "ARK-Genoa", self._ark)
        self.ask_cert = _issue("ASK-Genoa", self._ask.public_key(), "ARK-Genoa", self._ark)

    @property
    def ark_public(self) -> bytes:
        """The root public key a verifier trusts (pinned, like AMD's published ARK)."""
        return self.ark_cert.public_key

    def vcek(self, host: int, tcb: TcbVersion) -> tuple[ec.EllipticCurvePrivateKey, Certificate]:
        """The VCEK of ``host`` at ``tcb`` (a real VCEK is derived from the chip's secret and its TCB)."""
        key = p384_private_key(self.seed, f"{self.name}/vcek/host={host}/tcb={tcb.packed():016x}")
        return key, _issue(f"VCEK host={host} tcb={tcb}", key.public_key(), "ASK-Genoa", self._ask,
                           chip_id_of(self.seed, host), tcb)


@dataclass(frozen=True)
class AttestationReport:
    """The fields of an SNP attestation report the handshake uses, and the VCEK's signature over them."""

    chip_id: bytes  # 64 bytes identifying the machine
    measurement: bytes  # 48-byte launch digest of the guest (SVSM + firmware)
    policy: int  # guest policy bits
    tcb: TcbVersion
    report_data: bytes  # 64 bytes chosen by the guest: SHA-384 of its ECDH public key, zero-padded
    signature: bytes = b""

    def body(self) -> bytes:
        """The signed bytes, fixed layout (version, policy, TCB, then the byte fields)."""
        return struct.pack("<IQQ", REPORT_VERSION, self.policy, self.tcb.packed()) + _fields(
            self.chip_id, self.measurement, self.report_data)


def bind_report_data(ecdh_public: bytes) -> bytes:
    """REPORT_DATA for an ephemeral ECDH key: its SHA-384, zero-padded to 64 bytes."""
    return hashlib.sha384(ecdh_public).digest().ljust(REPORT_DATA_BYTES, b"\0")


@dataclass(frozen=True)
class Evidence:
    """What an agent presents to its peer: report, certificate chain, and its ephemeral ECDH key."""

    report: AttestationReport
    vcek_cert: Certificate
    ask_cert: Certificate
    ecdh_public: bytes

    def digest(self) -> bytes:
        """SHA-384 over everything presented (the transcript and the key schedule use it)."""
        r = self.report
        return hashlib.sha384(_fields(r.body(), r.signature, self.vcek_cert.tbs(), self.vcek_cert.signature,
                                      self.ask_cert.tbs(), self.ask_cert.signature, self.ecdh_public)).digest()


def measurement_of(name: str) -> bytes:
    """A 48-byte launch measurement named ``name`` (e.g. the SVSM build both sides expect)."""
    return hashlib.sha384(b"snp-replay/measurement/" + name.encode()).digest()


class Agent:
    """One side's migration agent (SVSM at VMPL0) as far as the handshake is concerned.

    ``session`` numbers handshakes between the same pair (a re-key after a link failure is a new session
    with fresh ECDH keys)."""

    def __init__(self, root: AmdRoot, seed: int, host: int, *, measurement: bytes, tcb: TcbVersion = TcbVersion(),
                 policy: int = DEFAULT_GUEST_POLICY, session: int = 0):
        if len(measurement) != MEASUREMENT_BYTES:
            raise ValueError(f"measurement must be {MEASUREMENT_BYTES} bytes")
        self.host = host
        self._ecdh = p384_private_key(seed, f"ecdh/host={host}/session={session}")
        vcek, vcek_cert = root.vcek(host, tcb)
        report = AttestationReport(
            chip_id=chip_id_of(seed, host), measurement=bytes(measurement), policy=policy,
            tcb=tcb, report_data=bind_report_data(_point(self._ecdh.public_key())))
        report = dataclasses.replace(report, signature=vcek.sign(report.body(), _ECDSA))
        self.evidence = Evidence(report, vcek_cert, root.ask_cert, _point(self._ecdh.public_key()))

    def shared_secret(self, peer: Evidence) -> bytes:
        return self._ecdh.exchange(ec.ECDH(), _load_point(peer.ecdh_public))


class Verdict(enum.Enum):
    """The outcome of verifying a peer's evidence: accepted, or the first check that failed."""

    ACCEPTED = "accepted"
    CHAIN = "chain"  # ASK not signed by the trusted ARK, or VCEK not signed by the ASK
    SIGNATURE = "signature"  # report not signed by the VCEK
    VCEK_TCB_MISMATCH = "vcek_tcb_mismatch"  # the VCEK was derived for another TCB than the report claims
    CHIP_ID_MISMATCH = "chip_id_mismatch"  # the VCEK is another chip's than the report names
    MEASUREMENT = "measurement"  # launch measurement not in the allow-list
    POLICY = "policy"  # not migratable, or debug allowed
    TCB = "tcb"  # a TCB component below the minimum
    REPORT_DATA = "report_data"  # report does not bind the presented ECDH key


@dataclass(frozen=True)
class VerifierPolicy:
    """What one side requires of its peer."""

    ark_public: bytes  # the trusted AMD root key
    measurements: frozenset[bytes]  # allow-list of launch measurements
    min_tcb: TcbVersion = TcbVersion()


def verify(evidence: Evidence, policy: VerifierPolicy) -> Verdict:
    """Check ``evidence`` against ``policy``; the first failing check, or ACCEPTED."""
    ask, vcek, r = evidence.ask_cert, evidence.vcek_cert, evidence.report
    if not (ask.issuer == "ARK-Genoa" and _verify_sig(policy.ark_public, ask.signature, ask.tbs())
            and vcek.issuer == ask.subject and _verify_sig(ask.public_key, vcek.signature, vcek.tbs())):
        return Verdict.CHAIN
    if not _verify_sig(vcek.public_key, r.signature, r.body()):
        return Verdict.SIGNATURE
    # The signature proves the report came from this VCEK's key; the key must be the one of the TCB and
    # chip the report claims (a VCEK is derived from both).
    if vcek.tcb != r.tcb:
        return Verdict.VCEK_TCB_MISMATCH
    if vcek.chip_id != r.chip_id:
        return Verdict.CHIP_ID_MISMATCH
    if r.measurement not in policy.measurements:
        return Verdict.MEASUREMENT
    if not r.policy & POLICY_MIGRATE_MA or r.policy & POLICY_DEBUG:
        return Verdict.POLICY
    if not r.tcb.meets(policy.min_tcb):
        return Verdict.TCB
    if r.report_data != bind_report_data(evidence.ecdh_public):
        return Verdict.REPORT_DATA
    return Verdict.ACCEPTED


class Direction(enum.Enum):
    SOURCE_TO_TARGET = "s2t"  # pages, VMSAs, the token, post-copy replies
    TARGET_TO_SOURCE = "t2s"  # post-copy page requests


@dataclass(frozen=True)
class SessionKeys:
    """Transport keys of one handshake: an AES-256-GCM key per direction and stream, derived on demand."""

    secret: bytes = field(repr=False)
    salt: bytes

    def key(self, direction: Direction, stream: int) -> bytes:
        if not 0 <= stream < 1 << 16:
            raise ValueError(f"stream must be in 0..65535, got {stream}")
        info = f"snp-replay transport v1 {direction.value} stream={stream}".encode()
        return HKDF(algorithm=hashes.SHA384(), length=GCM_KEY_BYTES, salt=self.salt, info=info).derive(self.secret)


def _session_keys(mine: Agent, peer: Evidence, source: Evidence, target: Evidence) -> SessionKeys:
    return SessionKeys(mine.shared_secret(peer), hashlib.sha384(source.digest() + target.digest()).digest())


@dataclass(frozen=True)
class Step:
    """One step of the handshake transcript."""

    actor: str  # "source" or "target"
    action: str
    verdict: str = ""  # a Verdict value for verification steps
    digest: str = ""  # hex SHA-384 of what the step produced (evidence, transcript hash)

    def to_json(self) -> dict:
        return {"actor": self.actor, "action": self.action, "verdict": self.verdict, "digest": self.digest}


@dataclass(frozen=True)
class Handshake:
    """Result of ``handshake``: both verdicts, the transcript, and (only if both accepted) the keys each
    side derived (equal unless something is badly wrong: the tests check it)."""

    source_verdict: Verdict  # the source's verdict on the target
    target_verdict: Verdict  # the target's verdict on the source
    steps: tuple[Step, ...]
    source_keys: SessionKeys | None = field(default=None, repr=False)
    target_keys: SessionKeys | None = field(default=None, repr=False)

    @property
    def accepted(self) -> bool:
        return self.source_verdict is Verdict.ACCEPTED and self.target_verdict is Verdict.ACCEPTED

    @property
    def refusal(self) -> tuple[str, Verdict] | None:
        """Who refused and why (the source's check first), or None if both accepted."""
        if self.source_verdict is not Verdict.ACCEPTED:
            return "source", self.source_verdict
        if self.target_verdict is not Verdict.ACCEPTED:
            return "target", self.target_verdict
        return None

    def transcript(self) -> list[dict]:
        """The steps as JSON-ready dicts (for the run record)."""
        return [s.to_json() for s in self.steps]


def handshake(source: Agent, target: Agent, source_policy: VerifierPolicy, target_policy: VerifierPolicy) -> Handshake:
    """Run the attested handshake: exchange evidence, verify both ways, then (both accepting) derive keys."""
    se, te = source.evidence, target.evidence
    steps = [Step("source", "present_evidence", digest=se.digest().hex()),
             Step("target", "present_evidence", digest=te.digest().hex())]
    sv = verify(te, source_policy)
    tv = verify(se, target_policy)
    steps += [Step("source", "verify_target", sv.value), Step("target", "verify_source", tv.value)]
    if sv is not Verdict.ACCEPTED or tv is not Verdict.ACCEPTED:
        steps.append(Step("both", "refuse", (sv if sv is not Verdict.ACCEPTED else tv).value))
        return Handshake(sv, tv, tuple(steps))
    sk, tk = _session_keys(source, te, se, te), _session_keys(target, se, se, te)
    steps.append(Step("both", "derive_transport_keys", Verdict.ACCEPTED.value, sk.salt.hex()))
    return Handshake(sv, tv, tuple(steps), sk, tk)
