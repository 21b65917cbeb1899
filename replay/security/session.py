"""One call per migration phase for the driver: set up the attested channel, make the two endpoints.

``establish`` builds the scenario's emulated AMD hierarchy, one agent per side and each side's verifier
policy from an ``AttestationSetup`` (what each platform reports and what each side requires), and runs
the handshake. With both verdicts ``accepted`` it returns the keys; ``endpoints`` then makes the source's
``Sender`` and the target's ``Receiver`` over the two hosts' memories. A setup whose target reports a
wrong measurement, policy, TCB or chain (the adversary cases of SPEC section 6) makes the handshake
refuse, and ``endpoints`` refuses to build a channel without keys: no page can move.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvariantError
from ..snp import PAGE_SIZE
from .attestation import (DEFAULT_GUEST_POLICY, Agent, AmdRoot, Handshake, TcbVersion, VerifierPolicy, handshake,
                          measurement_of)
from .channel import Receiver, Sender
from .keys import derive
from .memory import HostMemory


@dataclass(frozen=True)
class AttestationSetup:
    """What the two platforms report and what both sides require (names of measurements, not bytes)."""

    allowed_measurements: tuple[str, ...] = ("svsm",)
    min_tcb: TcbVersion = TcbVersion()
    source_measurement: str = "svsm"
    target_measurement: str = "svsm"
    source_tcb: TcbVersion = TcbVersion()
    target_tcb: TcbVersion = TcbVersion()
    source_policy: int = DEFAULT_GUEST_POLICY
    target_policy: int = DEFAULT_GUEST_POLICY
    target_root: str = "amd"  # anything else: the target's VCEK chains to a root nobody trusts


def establish(seed: int, setup: AttestationSetup = AttestationSetup(), *, source_host: int = 0,
              target_host: int = 1, session: int = 0) -> Handshake:
    """Run the attested handshake of one migration (``session`` > 0: a re-key after a link failure)."""
    root = AmdRoot(seed)
    target_root = root if setup.target_root == "amd" else AmdRoot(seed, setup.target_root)
    source = Agent(root, seed, source_host, measurement=measurement_of(setup.source_measurement),
                   tcb=setup.source_tcb, policy=setup.source_policy, session=session)
    target = Agent(target_root, seed, target_host, measurement=measurement_of(setup.target_measurement),
                   tcb=setup.target_tcb, policy=setup.target_policy, session=session)
    policy = VerifierPolicy(root.ark_public, frozenset(measurement_of(m) for m in setup.allowed_measurements),
                            setup.min_tcb)
    return handshake(source, target, policy, policy)


def endpoints(hs: Handshake, source_memory: HostMemory, target_memory: HostMemory, *,
              compress_level: int | None = None) -> tuple[Sender, Receiver]:
    """The source's sender and the target's receiver of an accepted handshake."""
    if not hs.accepted or hs.source_keys is None or hs.target_keys is None:
        raise InvariantError(f"no channel without an accepted handshake (refused: {hs.refusal})")
    return (Sender(hs.source_keys, source_memory, compress_level=compress_level),
            Receiver(hs.target_keys, target_memory))


def emulated_vmsa(seed: int, vcpu: int, vmpl: int) -> bytes:
    """A deterministic stand-in for the VMSA page of ``vcpu`` at ``vmpl`` (register state at pause)."""
    return derive(seed, f"vmsa/vcpu={vcpu}/vmpl={vmpl}", 256) + bytes(PAGE_SIZE - 256)
