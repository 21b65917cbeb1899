"""The adversary: an untrusted host attacking a data-mode migration ([[adversary]] entries).

SNP promises that the host can neither read nor silently change a confidential guest, migration
included. The host owns the wire, the RMP's host-side instructions and its own processes, so each action
here is something a real host can do, and its outcome is whatever the emulated checks make of it:

- **On the wire** (``wire``: a rewrite of the packets of one send, through ``DataPlane.send``'s tamper
  hook): ``flip`` (a bit of a sealed packet's header or payload), ``drop``, ``replay`` (the packet twice),
  ``reorder`` (the packet after its successor), ``forge`` (a packet sealed under a key the host made up),
  ``truncate``, ``replay-old-version`` (a packet recorded at ``at`` and sent again after its stream moved
  on) act on the first sealed packet at or after the action's time (or on the packet ``stream:sequence``);
  ``tamper-shared`` rewrites every shared page sent from its time on instead (shared pages travel plain
  and unprotected; a host that tampers once can tamper always, so a later copy does not undo it).
- **In the handshake** (``evidence``): a target whose report names another measurement, a policy with
  DEBUG set, a TCB below the minimum (the ``AttestationSetup`` of the target), or whose report signature
  does not verify (the evidence rewritten on its way).
- **On a host** (``tick``): ``host-write-private``: the host writes to a private page of the guest on the
  source or the target; the RMP makes it an RMP #PF (SIGBUS for the host process) and the page is
  unchanged, so the migration goes on.
- **On the target's RMP** (``before_resume``): ``rmp-remap`` (RMPUPDATE assigns the gfn's page to another
  gfn), ``skip-pvalidate`` (the page is assigned but was never validated), ``double-pvalidate`` (the
  agent is led to validate a validated page: FAIL_NOUPDATE). The target's agent looks at the RMP entries
  of the pages it holds just before the target resumes; a change made earlier is undone by the host's
  own RMPUPDATE when it installs the page again, as on hardware, so these act at that last moment (the
  action's time must not be later). In post-copy the target already runs then, holding no private page:
  they act at the first page the host delivers after the resume (``tick``), and the guest stops. RMP
  changes after a pre-copy resume are not modelled (the guest's #VC handler).
- **The link**: ``link-loss`` is a ``[[fault]]`` link_down at ``at``.

Each action ends in ``detected`` (by the check named in ``detected_by``), ``undetected`` or
``not_reached`` (its time or packet never came). ``record`` gives the run record's ``adversary`` list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..engine import PRESENT, PRIVATE
from ..scenario import ADVERSARY_PACKET_KINDS, UNSET, AdversarySpec, LinkFault, Scenario
from ..security.attestation import POLICY_DEBUG, Evidence, TcbVersion
from ..security.channel import (
    HEADER,
    HEADER_BYTES,
    TAG_BYTES,
    _SEALED,
    Flag,
    nonce,
    parse_header,
)
from ..security.keys import derive
from ..snp import PAGE_SIZE, Access, Fault, Rc
from ..strategies import SOURCE, TARGET
from .data import DataRefused

WIRE = ADVERSARY_PACKET_KINDS
ATTESTATION = ("bad-measurement", "bad-signature", "bad-policy", "bad-tcb")
RMP_TARGET = ("rmp-remap", "skip-pvalidate", "double-pvalidate")


def at_text(a: AdversarySpec) -> str:
    """Where an action acts, as the record says it: "<ns>ns", "<stream>:<sequence>" or "first"."""
    if a.stream != UNSET:
        return f"{a.stream}:{a.sequence}"
    return f"{a.at_ns}ns" if a.at_ns != UNSET else "first"


def link_faults(s: Scenario) -> tuple[LinkFault, ...]:
    """The scenario's link faults plus its ``link-loss`` actions (at ``at_ns``, or at the migration start)."""
    extra = tuple(LinkFault(at_ns=a.at_ns if a.at_ns != UNSET else s.migration.start_ns, duration_ns=a.duration_ns)
                  for a in s.adversary if a.kind == "link-loss")
    return s.faults + extra


@dataclass
class Action:
    """One action's progress through the run."""

    spec: AdversarySpec
    applied_ns: int = -1
    gfn: int = -1
    outcome: str = "not_reached"
    detected_by: str = ""
    resolved: bool = False

    def applied(self, now: int, gfn: int = -1) -> None:
        self.applied_ns, self.gfn, self.outcome = now, gfn, "undetected"

    def detect(self, by: str) -> None:
        self.outcome, self.detected_by, self.resolved = "detected", by, True


class Adversary:
    """Carries out a scenario's [[adversary]] entries on one data-mode run.

    ``data``: the run's ``DataMode``; ``guest``: the run's guest (its clock ``v`` and the ``host`` it runs on)."""

    def __init__(self, specs: tuple[AdversarySpec, ...], data, eng, guest, seed: int):
        self.actions = [Action(a) for a in specs]
        self.data, self.eng, self.guest, self.seed = data, eng, guest, seed
        self.pending: dict[int, list[bytes]] = {}  # stream -> packets the host sends later
        self.recorded: dict[int, list[tuple[Action, bytes]]] = {}  # replay-old-version: stream -> packets

    # -- when
    def clock(self) -> int:
        return self.guest.v

    def _due(self, a: Action) -> bool:
        return a.applied_ns < 0 and a.spec.stream == UNSET and self.clock() >= max(a.spec.at_ns, 0)

    def _of(self, kinds) -> list[Action]:
        return [a for a in self.actions if a.spec.kind in kinds]

    # -- the handshake
    def evidence(self) -> Callable[[Evidence], Evidence] | None:
        """Change the target's platform (its setup) or rewrite its evidence, for the attestation actions."""
        acts = [a for a in self._of(ATTESTATION) if self._due(a)]
        dp = self.data.dp
        sig = False
        for a in acts:
            a.applied(self.clock())
            k = a.spec.kind
            if k == "bad-measurement":
                dp.setup = dataclasses.replace(dp.setup, target_measurement="adversary-build")
            elif k == "bad-policy":
                dp.setup = dataclasses.replace(dp.setup, target_policy=dp.setup.target_policy | POLICY_DEBUG)
            elif k == "bad-tcb":
                m = dp.setup.min_tcb
                low = TcbVersion(m.bootloader, m.tee, m.snp, m.microcode - 1) if m.microcode else TcbVersion(0, 0, 0, 0)
                dp.setup = dataclasses.replace(dp.setup, target_tcb=low)
            else:
                sig = True
        if not sig:
            return None

        def tamper(ev: Evidence) -> Evidence:
            s = bytearray(ev.report.signature)
            s[-1] ^= 1
            return dataclasses.replace(ev, report=dataclasses.replace(ev.report, signature=bytes(s)))
        return tamper

    # -- hosts
    def tick(self) -> None:
        """Actions on a host that are due now: host writes to private pages; once the target runs (post-copy),
        RMP actions on it."""
        if self.guest.host == TARGET:
            self._rmp_actions()
        for a in self._of(("host-write-private",)):
            if not self._due(a):
                continue
            host = SOURCE if a.spec.host == "source" else TARGET
            gfn = self._private_gfn(host)
            if gfn is None:
                continue  # nothing of the guest's is private on that host yet: the next chance
            a.applied(self.clock(), gfn)
            if self.eng.host_write(host, self.eng.spa(host, gfn)) == Fault.HOST_RMP_PF:
                a.detect("rmp.host_rmp_pf")  # the write never happened: the page is unchanged
            else:
                self.data.dp.memory[host].write_raw(gfn, derive(self.seed, "adversary/host-write", PAGE_SIZE))

    def _private_gfn(self, host: int) -> int | None:
        """The lowest gfn private and present on ``host`` whose RMP entry is the guest's."""
        for gfn in self._held_private(host):
            if self.eng.rmp_entry(host, self.eng.spa(host, gfn)).assigned:
                return int(gfn)
        return None

    # -- the wire
    def wire(self, stream: int) -> Callable[[list[bytes]], list[bytes]] | None:
        """The host's rewrite of the next packets of ``stream``, or None when it has nothing to do."""
        if stream == self.data.dp.TOKEN_STREAM:
            self._deliver_pending()
            return None
        if not any(a.applied_ns < 0 or a.spec.kind == "tamper-shared" for a in self._of(WIRE)) \
                and not self.pending.get(stream) \
                and not self.recorded.get(stream):
            return None
        return lambda packets: self._rewrite(stream, packets)

    def _pick(self, a: Action, heads) -> int | None:
        """The index of the packet ``a`` acts on in this send, or None."""
        s = a.spec
        shared = s.kind == "tamper-shared"
        if a.applied_ns >= 0 and not shared:
            return None
        if s.stream != UNSET:
            if shared:  # from that packet on
                return next((i for i, h in enumerate(heads) if h is not None and h.flags & Flag.SHARED
                             and h.stream == s.stream and h.sequence >= s.sequence), None)
            return next((i for i, h in enumerate(heads)
                         if h is not None and h.stream == s.stream and h.sequence == s.sequence), None)
        if self.clock() < max(s.at_ns, 0):
            return None
        return next((i for i, h in enumerate(heads) if h is not None
                     and (h.flags & Flag.SHARED if shared else h.flags & _SEALED)), None)

    def _rewrite(self, stream: int, packets: list[bytes]) -> list[bytes]:
        slots = [[p] for p in packets]  # what goes on the wire in place of each packet
        heads = [parse_header(p) for p in packets]
        held = self.pending.pop(stream, [])
        late = [p for _, p in self.recorded.pop(stream, [])]  # replay-old-version: the stream has moved on
        for a in self._of(WIRE):
            i = self._pick(a, heads)
            if i is None:
                continue
            h, p = heads[i], packets[i]
            k = a.spec.kind
            if k == "tamper-shared":  # from its first page on, every shared page the host sends
                if a.applied_ns < 0:
                    a.applied(self.clock(), h.gfn)
                for j in range(i, len(heads)):
                    hj = heads[j]
                    if hj is not None and hj.flags & Flag.SHARED and slots[j] == [packets[j]]:
                        body = derive(self.seed, f"adversary/shared/{hj.gfn}", PAGE_SIZE)
                        slots[j] = [HEADER.pack(hj.gfn, hj.sequence, hj.version, hj.stream, int(Flag.SHARED),
                                                PAGE_SIZE) + body]
                a.resolved = True  # nothing checks a shared page: undetected for good
                continue
            a.applied(self.clock(), h.gfn)
            if k == "flip":
                pos = 16 if a.spec.where == "header" else HEADER_BYTES  # the version's low byte, or the payload's first
                slots[i] = [p[:pos] + bytes([p[pos] ^ 1]) + p[pos + 1:]]
            elif k == "drop":
                slots[i] = []
            elif k == "replay":
                slots[i] = [p, p]
            elif k == "reorder":
                if i + 1 < len(slots):
                    slots[i], slots[i + 1] = slots[i + 1], slots[i]
                else:  # the last one of this send: it goes after the stream's next packet
                    slots[i] = []
                    held.append(p)
            elif k == "forge":
                slots[i] = [self._forged(h)]
            elif k == "truncate":
                slots[i] = [p[: len(p) // 2]]
            elif k == "replay-old-version":
                self.recorded.setdefault(stream, []).append((a, p))
        out = [p for slot in slots for p in slot]
        if held:
            if out:
                out[1:1] = held
            else:
                self.pending[stream] = held
        return out + late

    def _forged(self, h) -> bytes:
        """A packet for the same slot, sealed under a key the host made up (it has not the session's)."""
        key = derive(self.seed, "adversary/forged-key", 32)
        body = derive(self.seed, f"adversary/forged-page/{h.gfn}", PAGE_SIZE)
        flags = int(h.flags) & ~int(Flag.COMPRESSED | Flag.ZERO)
        header = HEADER.pack(h.gfn, h.sequence, h.version, h.stream, flags, PAGE_SIZE + TAG_BYTES)
        return header + AESGCM(key).encrypt(nonce(h.stream, h.sequence), body, header)

    def _deliver_pending(self) -> None:
        """Packets the host still holds go in before the token (it can keep them no longer)."""
        packets = [p for s in sorted(self.pending) for p in self.pending[s]]
        packets += [p for s in sorted(self.recorded) for _, p in self.recorded[s]]
        self.pending.clear()
        self.recorded.clear()
        if packets:
            self.data._check(self.data.dp.receiver.receive_many(packets))

    # -- the target's RMP
    def before_resume(self) -> None:
        """The target's last look before it resumes: held-back packets go in, then the due RMP actions and
        the agent's check of its RMP."""
        self._deliver_pending()
        self._rmp_actions()

    def _rmp_actions(self) -> None:
        """Apply the due RMP actions to the lowest private gfn the target holds, then check the RMP entry
        of every private page it holds, as the target's agent does (it validated them itself: any entry
        that is not assigned, validated and the guest's at that gfn is the host's doing). Without an RMP
        action the check cannot fail (the engine's installs keep the target's RMP consistent), so it runs
        only after one."""
        acts = [a for a in self._of(RMP_TARGET) if self._due(a)]
        held = self._held_private(TARGET) if acts else []
        if not held:
            return  # the target holds no private page yet (post-copy): the next chance
        eng = self.eng
        asid = eng.rmp_entry(TARGET, eng.spa(TARGET, held[0])).asid
        for a in acts:
            gfn = held[0]
            spa = eng.spa(TARGET, gfn)
            a.applied(self.clock(), gfn)
            if a.spec.kind == "rmp-remap":
                eng.rmpupdate(TARGET, spa, assigned=True, asid=asid, gfn=held[1] if len(held) > 1 else gfn + 1)
            elif a.spec.kind == "skip-pvalidate":
                eng.pvalidate(TARGET, spa, asid=asid, gfn=gfn, vmpl=0, validate=False)
            elif eng.pvalidate(TARGET, spa, asid=asid, gfn=gfn, vmpl=0, validate=True) == Rc.FAIL_NOUPDATE:
                # validated twice: the host aliased this page to one the guest had validated already
                raise DataRefused("PVALIDATE of a validated page (FAIL_NOUPDATE)", "pvalidate.fail_noupdate")
        for gfn in held:
            f = eng.check_access(TARGET, gfn, vmpl=0, access=Access.READ, private=True)
            if f != Fault.NONE:
                by = "vc.not_validated" if f == Fault.VC_NOT_VALIDATED else f"rmp.{f.key}"
                raise DataRefused(f"the target's RMP entry of gfn {gfn} is not the guest's ({f.key})", by)

    def _held_private(self, host: int) -> list[int]:
        """The private pages ``host`` holds, ascending."""
        flags = self.eng.flags(host, np.arange(self.eng.npages, dtype=np.uint32))
        return np.flatnonzero((flags & (PRIVATE | PRESENT)) == (PRIVATE | PRESENT)).tolist()

    # -- the record
    def refused(self, detected_by: str) -> None:
        """The migration stopped at a check: every applied, unresolved action is what it caught."""
        for a in self.actions:
            if a.applied_ns >= 0 and not a.resolved and a.spec.kind != "tamper-shared":
                a.detect(detected_by)

    def link_down(self, at_ns: int) -> None:
        for a in self._of(("link-loss",)):
            if a.applied_ns < 0:
                a.applied(at_ns)
                a.detect("link")

    def record(self) -> list[dict]:
        return [{"kind": a.spec.kind, "at": at_text(a.spec), "outcome": a.outcome, "detected_by": a.detected_by,
                 "applied_ns": max(a.applied_ns, 0), "gfn": max(a.gfn, 0)} for a in self.actions]

    def finish(self, status: str, postcopy_failed: bool, at_ns: int, invariants: dict) -> tuple[list[dict], dict]:
        """The run record's ``adversary`` list and ``adversary_effects``: pages lost (a failed run: pages
        the target wrote after it resumed, which the source never saw), whether the guest's end plaintext
        differs from the no-migration one, and which invariants the actions explain (so that they are
        reported, not taken for a bug): host writes count RMP #PFs; shared-page tampering changes the
        guest's plaintext, and only that."""
        if postcopy_failed:
            self.link_down(at_ns)
        lost = 0
        if status == "failed":
            n = self.data.dp.memory[1].npages
            gfns = np.arange(n, dtype=np.uint32)
            present = (self.eng.flags(TARGET, gfns) & PRESENT) != 0
            lost = int(np.count_nonzero(present & (self.eng.versions(TARGET, gfns) != self.eng.versions(SOURCE, gfns))))
        explains = []
        if any(a.spec.kind == "host-write-private" and a.outcome == "detected" for a in self.actions):
            explains.append("no_faults")
        undetected = [a for a in self.actions if a.outcome == "undetected"]
        if undetected and all(a.spec.kind == "tamper-shared" for a in undetected):
            explains += ["plaintext_end_equals_no_migration", "plaintext_target_equals_source_at_switchover"]
        p = self.data.plaintext
        differs = p["end_of_trace"] != "" and p["end_of_trace"] != p["no_migration"]
        explains = [k for k in explains if k in invariants and not invariants[k]]
        return self.record(), {"pages_lost": lost, "plaintext_end_differs": differs, "explains": explains}
