"""One call per migration phase for the driver: ``DataPlane``, or the pieces it is made of.

``DataPlane`` holds what data mode adds to a migration: both hosts' memories (``HostMemory``), the
attested handshake and the sealed channel between them. The driver calls it once per phase: ``attest``
at setup, ``guest_rows`` wherever the guest replays trace rows (on the host it runs on), ``send`` for
every batch of pages (pre-copy bursts, stop-and-copy, post-copy push and replies), ``send_vmsas`` at
stop-and-copy, ``finish`` for the validation token, and ``facts`` for the run record.

``establish`` builds the scenario's emulated AMD hierarchy, one agent per side and each side's verifier
policy from an ``AttestationSetup`` (what each platform reports and what each side requires), and runs
the handshake. With both verdicts ``accepted`` it returns the keys; ``endpoints`` then makes the source's
``Sender`` and the target's ``Receiver`` over the two hosts' memories. A setup whose target reports a
wrong measurement, policy, TCB or chain (the adversary cases of SPEC section 6) makes the handshake
refuse, and ``endpoints`` refuses to build a channel without keys: no page can move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..core.errors import InvariantError
from ..model.snp import PAGE_SIZE
from .attestation import (DEFAULT_GUEST_POLICY, Agent, AmdRoot, Evidence, Handshake, TcbVersion, VerifierPolicy, handshake,
                          measurement_of)
from .channel import Outcome, PageRefs, Receiver, Sender
from .keys import derive
from .memory import HostMemory
from .token import TokenOutcome


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
              target_host: int = 1, session: int = 0,
              tamper_target: Callable[[Evidence], Evidence] | None = None) -> Handshake:
    """Run the attested handshake of one migration (``session`` > 0: a re-key after a link failure).
    ``tamper_target`` lets an adversary rewrite the target's evidence on its way to the source."""
    root = AmdRoot(seed)
    target_root = root if setup.target_root == "amd" else AmdRoot(seed, setup.target_root)
    source = Agent(root, seed, source_host, measurement=measurement_of(setup.source_measurement),
                   tcb=setup.source_tcb, policy=setup.source_policy, session=session)
    target = Agent(target_root, seed, target_host, measurement=measurement_of(setup.target_measurement),
                   tcb=setup.target_tcb, policy=setup.target_policy, session=session)
    if tamper_target is not None:
        target.evidence = tamper_target(target.evidence)
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


class DataPlane:
    """Both hosts' guest memory and the sealed channel of one data-mode migration (host 0 -> host 1).

    ``spa_base``: system physical page of gfn 0 on each host (the page engine's ``spa(host, 0)``)."""

    TOKEN_STREAM = 0xFFFF  # the validation token's own stream: pages and VMSAs use the others

    def __init__(self, seed: int, *, npages: int, spa_base: tuple[int, int], shared_ranges=(),
                 compress_level: int | None = None, setup: AttestationSetup = AttestationSetup()):
        self.seed, self.setup, self.compress_level = seed, setup, compress_level
        self.memory = tuple(HostMemory.for_host(seed, h, npages=npages, spa_base=spa_base[h],
                                                shared_ranges=shared_ranges) for h in (0, 1))
        self.handshake: Handshake | None = None
        self.sender: Sender | None = None
        self.receiver: Receiver | None = None
        self.token_outcome: TokenOutcome | None = None

    def attest(self, tamper_target: Callable[[Evidence], Evidence] | None = None) -> Handshake:
        """Setup: the attested handshake; on acceptance the channel exists (``accepted`` says which)."""
        self.handshake = establish(self.seed, self.setup, tamper_target=tamper_target)
        if self.handshake.accepted:
            self.sender, self.receiver = endpoints(self.handshake, *self.memory, compress_level=self.compress_level)
        return self.handshake

    def guest_rows(self, host: int, gpa, length, op, value) -> None:
        """The guest ran these trace rows (in order) on ``host``: apply their writes and state changes."""
        self.memory[host].apply(gpa, length, op, value)

    def _channel(self) -> tuple[Sender, Receiver]:
        if self.sender is None or self.receiver is None:
            raise InvariantError("data plane: nothing may be sent before an accepted handshake (call attest)")
        return self.sender, self.receiver

    def send(self, gfns, versions, stream: int, tamper: Callable[[list[bytes]], list[bytes]] | None = None) -> list[Outcome]:
        """Package ``gfns`` at the source (contents now, engine ``versions``) and unpack them at the target.
        ``tamper`` lets an adversary rewrite the packets on the wire (flip, drop, replay, reorder, forge)."""
        sender, receiver = self._channel()
        wire = sender.seal_pages(gfns, versions, stream)
        return receiver.receive_many(tamper(wire.packets()) if tamper else wire)

    def capture(self, gfns, out=None):
        """The source's contents and attributes of ``gfns`` now (for ``send_captured``); ``out``: an
        ``(n, 4096)`` array to hold the contents."""
        return self._channel()[0].capture(gfns, out=out)

    def send_captured(self, groups, contents, stream: int) -> list[list[Outcome]]:
        """Send groups of pages whose contents were captured earlier: ``groups`` is a list of (gfns,
        versions), ``contents`` = (plain pages, private flags) of all their pages in that order (from
        ``capture``), or a ``PageRefs`` to where they lie. The same as one ``send`` per group when it was
        captured, in order, stopping after the first group with a rejected packet; but when every packet is
        accepted (always, unless something is wrong) all groups go through as one batch: one seal and one
        open."""
        sender, receiver = self._channel()
        gfns = [np.atleast_1d(np.asarray(g, dtype=np.int64)) for g, _ in groups]
        versions = [np.broadcast_to(np.asarray(v, dtype=np.uint64), g.shape) for g, (_, v) in zip(gfns, groups)]
        contents = contents if isinstance(contents, PageRefs) else PageRefs.of(*contents)
        if len(groups) > 1:
            state = sender.checkpoint()
            packets = sender.seal_pages(np.concatenate(gfns), np.concatenate(versions), stream, contents=contents)
            if receiver.receive_all_or_nothing(packets):
                return [[Outcome.ACCEPTED] * g.size for g in gfns]
            sender.restore(state)  # something is wrong: group by group, exactly as the calls one by one
        out, at = [], 0
        for g, v in zip(gfns, versions):
            part = contents.part(at, at + g.size)
            at += g.size
            out.append(receiver.receive_many(sender.seal_pages(g, v, stream, contents=part)))
            if any(o is not Outcome.ACCEPTED for o in out[-1]):
                break
        return out

    def send_vmsas(self, vcpus: int, vmpls: Sequence[int], stream: int,
                   tamper: Callable[[list[bytes]], list[bytes]] | None = None) -> list[Outcome]:
        """Stop-and-copy: one sealed VMSA per vCPU per VMPL in use."""
        sender, receiver = self._channel()
        packets = [sender.send_vmsa(v, vmpl, emulated_vmsa(self.seed, v, vmpl), stream)
                   for v in range(vcpus) for vmpl in vmpls]
        return receiver.receive_many(tamper(packets) if tamper else packets)

    def finish(self, tamper: Callable[[list[bytes]], list[bytes]] | None = None) -> TokenOutcome:
        """End of migration: the source's sealed token against the target's own. Only MATCH lets the
        target resume; otherwise the source resumes (its memory was never touched)."""
        sender, receiver = self._channel()
        packets = [sender.send_token(self.TOKEN_STREAM)]
        packets = tamper(packets) if tamper else packets
        self.token_outcome = receiver.check_token(packets[0]) if packets else TokenOutcome.TOKEN_REJECTED
        return self.token_outcome

    def facts(self) -> dict:
        """What a run record says about data mode (integers and strings only)."""
        hs = self.handshake
        out = {
            "handshake": hs.transcript() if hs else [],
            "handshake_refused_by": hs.refusal[0] if hs and hs.refusal else "",
            "handshake_verdict": (hs.refusal[1].value if hs.refusal else "accepted") if hs else "",
            "compress": self.compress_level is not None,
            "zstd_level": 0 if self.compress_level is None else self.compress_level,
            "source": self.sender.stats.to_json() if self.sender else {},
            "target": self.receiver.stats.to_json() if self.receiver else {},
            "token": self.token_outcome.value if self.token_outcome else "",
            "shared_pages_unprotected": self.sender.stats.shared_pages if self.sender else 0,
            "digests": {"source": self.memory[0].plaintext_digest(), "target": self.memory[1].plaintext_digest()},
        }
        return out
