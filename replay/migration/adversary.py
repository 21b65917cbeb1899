"""The adversary: an untrusted host attacking a data-mode migration ([[adversary]] entries).

SNP promises that the host can neither read nor silently change a confidential guest, migration
included. The host owns the wire, the RMP's host-side instructions and its own processes, so each action
here is something a real host can do, and its outcome is whatever the protocol's own checks make of it
(the checks live in ``replay.migration.data`` and ``replay.security``, and run on every data-mode run;
nothing here decides that an action was detected):

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
- **What if the RMP failed** (``RMP_BYPASS``, on a host, ``tick``): the host's write reaches a private
  page's DRAM, so memory encryption alone decides: ``rmp-bypass-copy`` copies one private page's
  ciphertext over another's (decrypted with the other SPA as XTS tweak: garbage), ``stale-ciphertext``
  records private pages' ciphertext at the migration's setup and, at its time, writes one back at the
  same SPA over a page that changed since (it decrypts to the old data: a stale page, which XTS cannot
  tell), ``raw-copy`` copies a private page's
  ciphertext from the source straight into the target's DRAM, without the channel (another key and SPA:
  garbage). Nothing in SNP's memory encryption checks integrity, so each is undetected and changes what
  the guest reads; what stops them on real hardware is the RMP (docs/threat-model.md).
- **On the target's RMP** (``target_rmp``): ``rmp-remap`` (RMPUPDATE assigns the gfn's page to another
  gfn), ``skip-pvalidate`` (RMPUPDATE again on an installed page, which clears its Validated bit),
  ``double-pvalidate`` (the host tells the target's agent a page it already installed is new, without
  the RMPUPDATE that would reset it: the agent's PVALIDATE finds it validated). Pre-copy: just before the
  target's agent checks its RMP before resuming (earlier, the host's own RMPUPDATE when it installs the
  page again would undo them, as on hardware). Post-copy: on the first private page the host delivers at
  or after the action's time, between its install and the agent's check of it.
- **The link**: ``link-loss`` is a ``[[fault]]`` link_down at ``at``.

**When.** Every action acts on the clock of the phase it acts in: a pre-copy burst's, the stop-and-copy
transfer's and the post-copy push's transfer clock (the phases split their transfers at the actions'
due times, so the first packet sent at or after the time is the one hit), a post-copy fault reply's time
on the link (``replay.migration.faultpath``), the guest's clock for the VMSAs, the token and the
handshake. ``applied_ns`` is that time.

**Attribution.** A check that refuses names the action whose packet, page or RMP entry it saw (``blame``:
each delivered packet's responsible action, a dropped packet's successor or, if it was the last of its
stream, the validation token); the others keep their own outcome. Each action ends in ``detected`` (by
``detected_by``), ``undetected`` (it acted and the migration completed), ``pending`` (it acted, but the
migration stopped before a check could see it) or ``not_reached`` (its time, packet or page never came).
``record`` gives the run record's ``adversary`` list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..engines.common import PRESENT, PRIVATE
from ..scenario.spec import ADVERSARY_PACKET_KINDS, UNSET, AdversarySpec, LinkFault, Scenario
from ..security.attestation import POLICY_DEBUG, Evidence, TcbVersion
from ..security.channel import (
    HEADER,
    HEADER_BYTES,
    TAG_BYTES,
    SEALED,
    Flag,
    nonce,
    parse_header,
)
from ..security.keys import derive
from ..model.snp import PAGE_SIZE, Fault
from ..scenario.strategies import SOURCE, TARGET

WIRE = ADVERSARY_PACKET_KINDS
ATTESTATION = ("bad-measurement", "bad-signature", "bad-policy", "bad-tcb")
RMP_TARGET = ("rmp-remap", "skip-pvalidate", "double-pvalidate")
RMP_BYPASS = ("rmp-bypass-copy", "stale-ciphertext", "raw-copy")
HOST_KINDS = ("host-write-private",) + RMP_BYPASS
# The verdict each attestation action makes the verifier reach (verify() names the first failing check).
# The check a wire action's packet fails (what a refusal must have seen to name it).
FAILS = {"flip": ("channel.bad_tag",), "forge": ("channel.bad_tag",), "truncate": ("channel.malformed",),
         "drop": ("channel.bad_sequence", "token.count_mismatch", "token.hash_mismatch"),
         "replay": ("channel.bad_sequence",), "reorder": ("channel.bad_sequence", "token.count_mismatch",
                                                          "token.hash_mismatch"),
         "replay-old-version": ("channel.bad_sequence", "channel.stale_version")}
VERDICT_OF = {"bad-measurement": "attestation.measurement", "bad-signature": "attestation.signature",
              "bad-policy": "attestation.policy", "bad-tcb": "attestation.tcb"}
STALE_PAGES = 4096  # stale-ciphertext: how many private pages' ciphertext the host records (16 MiB at most)


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


def link_loss_ns(a: AdversarySpec, start_ns: int) -> int:
    return a.at_ns if a.at_ns != UNSET else start_ns


@dataclass
class Action:
    """One action's progress through the run."""

    spec: AdversarySpec
    applied_ns: int = -1
    gfn: int = -1
    phase: str = ""
    outcome: str = "not_reached"
    detected_by: str = ""
    effect: str = ""
    resolved: bool = False
    changed: set = field(default_factory=set)  # gfns whose contents it changed, unnoticed by any check

    def applied(self, now: int, phase: str, gfn: int = -1) -> None:
        self.applied_ns, self.phase, self.gfn, self.outcome = now, phase, gfn, "undetected"

    def detect(self, by: str) -> None:
        self.outcome, self.detected_by, self.resolved = "detected", by, True


class Adversary:
    """Carries out a scenario's [[adversary]] entries on one data-mode run.

    ``data``: the run's ``DataMode``; ``guest``: the run's guest (its clock ``v`` and the ``host`` it runs on)."""

    def __init__(self, specs: tuple[AdversarySpec, ...], data, eng, guest, seed: int, start_ns: int = 0,
                 trace_path=None):
        self.actions = [Action(a) for a in specs]
        self.data, self.eng, self.guest, self.seed, self.start_ns = data, eng, guest, seed, start_ns
        self.trace_path = trace_path  # to tell which pages an end plaintext differs in (finish)
        self.switchover_diff: set[int] | None = None  # pages the target's plain text differed in, if any
        self.pending: dict[int, list[tuple[Action, bytes]]] = {}  # stream -> packets the host sends later
        self.recorded: dict[int, list[tuple[Action, bytes]]] = {}  # replay-old-version: stream -> packets
        self.gaps: dict[int, Action] = {}  # stream -> a drop whose gap no later packet has shown yet
        self.blame: list[tuple[Action, ...]] = []  # per packet of the latest delivery: the actions it carries
        self.now: int | None = None  # the acting phase's clock (None: the guest's)
        self.phase = "handshake"
        self.gate: int | None = None
        self.stale: dict[int, tuple[Action, int, list[int], list[bytes]]] = {}  # stale-ciphertext records

    # -- when
    def at(self, now: int | None, phase: str, gate: int | None = None) -> None:
        """The phase about to send (or act) and its clock. ``gate``: a fault reply sent while the push
        runs is sent at ``now``, but push packets the run has not sent yet may come before it: an action
        falls due on it only once the push's clock (``gate``) has reached the action's time too."""
        self.now, self.phase, self.gate = now, phase, gate

    def clock(self) -> int:
        return self.guest.v if self.now is None else self.now

    def _reached(self, at_ns: int) -> bool:
        t = max(at_ns, 0)
        return self.clock() >= t and (self.gate is None or self.gate >= t)

    def _due(self, a: Action) -> bool:
        return a.applied_ns < 0 and a.spec.stream == UNSET and self._reached(a.spec.at_ns)

    def next_due(self, after: int) -> int | None:
        """The earliest time later than ``after`` at which a timed action not yet applied falls due: the
        phases end their transfer steps there, so that the first packet at or after it is the one hit."""
        times = [a.spec.at_ns for a in self.actions
                 if a.applied_ns < 0 and a.spec.stream == UNSET and a.spec.at_ns > after
                 and a.spec.kind not in ATTESTATION + ("link-loss",)]
        return min(times) if times else None

    def _of(self, kinds) -> list[Action]:
        return [a for a in self.actions if a.spec.kind in kinds]

    # -- the handshake
    def evidence(self) -> Callable[[Evidence], Evidence] | None:
        """Change the target's platform (its setup) or rewrite its evidence, for the attestation actions."""
        self.record_ciphertext()
        acts = [a for a in self._of(ATTESTATION) if self._due(a)]
        data = self.data
        sig = False
        for a in acts:
            a.applied(self.clock(), "handshake")
            k = a.spec.kind
            if k == "bad-measurement":
                data.alter_target_platform(target_measurement="adversary-build")
            elif k == "bad-policy":
                data.alter_target_platform(target_policy=data.platform.target_policy | POLICY_DEBUG)
            elif k == "bad-tcb":
                m = data.platform.min_tcb
                low = TcbVersion(m.bootloader, m.tee, m.snp, m.microcode - 1) if m.microcode else TcbVersion(0, 0, 0, 0)
                data.alter_target_platform(target_tcb=low)
            else:
                sig = True
        if not sig:
            return None

        def tamper(ev: Evidence) -> Evidence:
            s = bytearray(ev.report.signature)
            s[-1] ^= 1
            return dataclasses.replace(ev, report=dataclasses.replace(ev.report, signature=bytes(s)))
        return tamper

    def handshake_refused(self, detected_by: str) -> Action | None:
        """The attestation action whose change the verifier's failing check saw (it stops at the first)."""
        a = next((a for a in self._of(ATTESTATION) if a.applied_ns >= 0 and VERDICT_OF[a.spec.kind] == detected_by),
                 None)
        if a is not None:
            a.detect(detected_by)
        return a

    # -- hosts
    def tick(self) -> None:
        """The host actions due now (the acting phase's clock)."""
        for a in self._of(HOST_KINDS):
            if a.spec.kind == "stale-ciphertext":
                self._stale(a)
                continue
            if not self._due(a):
                continue
            host = SOURCE if a.spec.host == "source" else TARGET
            k = a.spec.kind
            if k == "raw-copy":
                self._raw_copy(a)
                continue
            held = self._held_private(host)
            if k == "rmp-bypass-copy":
                if len(held) < 2:
                    continue  # two private pages on that host are needed: the next chance
                src, dst = held[0], held[1]
                a.applied(self.clock(), self.phase, dst)
                mem = self.data.memory(host)
                mem.write_raw(dst, mem.read_raw(src))  # the RMP does not stop it: encryption alone decides
                a.changed.add(dst)
                a.effect = f"gfn {dst} holds gfn {src}'s ciphertext: decrypts to garbage"
                continue
            gfn = next((g for g in held if self.eng.rmp_entry(host, self.eng.spa(host, g)).assigned), None)
            if gfn is None:
                continue  # nothing of the guest's is private on that host yet: the next chance
            a.applied(self.clock(), self.phase, gfn)
            # The hardware's RMP check on the host's write: an RMP #PF, the write never happens.
            if self.eng.host_write(host, self.eng.spa(host, gfn)) == Fault.HOST_RMP_PF:
                a.detect("rmp.host_rmp_pf")
            else:
                self.data.memory(host).write_raw(gfn, derive(self.seed, "adversary/host-write", PAGE_SIZE))
                a.changed.add(gfn)

    def _raw_copy(self, a: Action) -> None:
        """The source's ciphertext of the lowest private page the target holds, into the target's DRAM."""
        held = self._held_private(TARGET)
        if not held:
            return
        gfn = held[0]
        a.applied(self.clock(), self.phase, gfn)
        self.data.memory(SOURCE).raw_copy_to(self.data.memory(TARGET), gfn)
        a.changed.add(gfn)
        a.effect = f"gfn {gfn} on the target: the source's ciphertext under the target's key and SPA, garbage"

    def record_ciphertext(self) -> None:
        """At the migration's setup (the target: once it holds private pages) the host reads (it owns
        DRAM) the ciphertext of the lowest ``STALE_PAGES`` private pages, for stale-ciphertext."""
        for a in self._of(("stale-ciphertext",)):
            host = SOURCE if a.spec.host == "source" else TARGET
            held = self._held_private(host)[:STALE_PAGES] if id(a) not in self.stale else []
            if held:  # the target holds nothing at setup: it records once it holds pages
                mem = self.data.memory(host)
                self.stale[id(a)] = (a, self.clock(), held, [mem.read_raw(g) for g in held])

    def _stale(self, a: Action) -> None:
        """When due, write a recorded ciphertext back at the same SPA over a page that changed since: it
        decrypts to the old data (XTS has no freshness). Not due yet, or no recorded page changed yet:
        the next chance."""
        rec = self.stale.get(id(a))
        if rec is None and a.applied_ns < 0:
            self.record_ciphertext()
            return
        if rec is None or not self._due(a):
            return
        host = SOURCE if a.spec.host == "source" else TARGET
        mem = self.data.memory(host)
        _, t, gfns, old = rec
        for g, c in zip(gfns, old):
            if mem.read_raw(g) != c:
                a.applied(self.clock(), self.phase, g)
                mem.write_raw(g, c)
                a.changed.add(g)
                a.effect = f"gfn {g}: its ciphertext of {t} ns written back: the old data"
                del self.stale[id(a)]
                return

    def _held_private(self, host: int) -> list[int]:
        """The private pages ``host`` holds, ascending."""
        flags = self.eng.flags(host, np.arange(self.eng.npages, dtype=np.uint32))
        return np.flatnonzero((flags & (PRIVATE | PRESENT)) == (PRIVATE | PRESENT)).tolist()

    # -- the wire
    def wire(self, stream: int) -> Callable[[list[bytes]], list[bytes]] | None:
        """The host's rewrite of the next packets of ``stream``, or None when it has nothing to do."""
        self.blame = []
        if stream == self.data.token_stream:
            self.deliver_pending()
            self.blame = []
            return None
        if not any(a.applied_ns < 0 or a.spec.kind == "tamper-shared" for a in self._of(WIRE)) \
                and not self.pending.get(stream) and not self.recorded.get(stream) and stream not in self.gaps:
            return None
        return lambda packets: self._rewrite(stream, packets)

    def _pick(self, a: Action, heads, taken=frozenset()) -> int | None:
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
        if not self._reached(s.at_ns):
            return None
        return next((i for i, h in enumerate(heads) if h is not None and i not in taken
                     and (h.flags & Flag.SHARED if shared else h.flags & SEALED)), None)

    def _rewrite(self, stream: int, packets: list[bytes]) -> list[bytes]:
        # Each slot: what goes on the wire in place of one packet, each with the action a check failing on
        # it would have seen (None: the packet is as the source sent it).
        slots: list[list[tuple[bytes, tuple]]] = [[(p, ())] for p in packets]
        taken: set[int] = set()  # packets an action took already: two actions due together take two
        heads = [parse_header(p) for p in packets]
        held = self.pending.pop(stream, [])  # held back by an earlier send: they go after this one's first
        hold: list[tuple[Action, bytes]] = []  # held back now: they go after the stream's next packet
        late = self.recorded.pop(stream, [])  # replay-old-version: the stream has moved on
        gap = self.gaps.pop(stream, None)  # a packet an earlier send dropped or held: shows on this one's first
        drops: list[tuple[int, Action]] = []
        for a in self._of(WIRE):
            i = self._pick(a, heads, taken)
            if i is None:
                continue
            h, p = heads[i], packets[i]
            k = a.spec.kind
            if k == "tamper-shared":  # from its first page on, every shared page the host sends
                if a.applied_ns < 0:
                    a.applied(self.clock(), self.phase, h.gfn)
                for j in range(i, len(heads)):
                    hj = heads[j]
                    if hj is not None and hj.flags & Flag.SHARED and slots[j] == [(packets[j], ())]:
                        body = derive(self.seed, f"adversary/shared/{hj.gfn}", PAGE_SIZE)
                        slots[j] = [(HEADER.pack(hj.gfn, hj.sequence, hj.version, hj.stream, int(Flag.SHARED),
                                                 PAGE_SIZE) + body, ())]
                        a.changed.add(hj.gfn)
                continue
            a.applied(self.clock(), self.phase, h.gfn)
            taken.add(i)
            if k == "flip":
                pos = 16 if a.spec.where == "header" else HEADER_BYTES  # the version's low byte, or the payload's first
                slots[i] = [(p[:pos] + bytes([p[pos] ^ 1]) + p[pos + 1:], (a,))]
            elif k == "drop":
                slots[i] = []
                drops.append((i, a))
            elif k == "replay":
                slots[i] = [(p, ()), (p, (a,))]
            elif k == "reorder":
                if i + 1 < len(slots):
                    slots[i], slots[i + 1] = [(q, b + (a,)) for q, b in slots[i + 1]], [(p, (a,))]
                    taken.add(i + 1)
                else:  # the last one of this send: it goes after the stream's next packet
                    slots[i] = []
                    hold.append((a, p))
                    drops.append((i, a))
            elif k == "forge":
                slots[i] = [(self._forged(h), (a,))]
            elif k == "truncate":
                slots[i] = [(p[: len(p) // 2], (a,))]
            elif k == "replay-old-version":
                self.recorded.setdefault(stream, []).append((a, p))
        # A missing packet shows on the stream's next one: in this send, else in a later one or the token.
        for i, a in drops:
            j = next((j for j in range(i + 1, len(slots)) if slots[j]), None)
            if j is None:
                self.gaps.setdefault(stream, a)
            else:
                slots[j][0] = (slots[j][0][0], slots[j][0][1] + (a,))
        out = [x for slot in slots for x in slot]
        if gap is not None:
            if out:
                out[0] = (out[0][0], out[0][1] + (gap,))
            else:
                self.gaps[stream] = gap
        if held:
            if out:
                out[1:1] = [(p, (a,)) for a, p in held]
            else:
                hold[:0] = held
        if hold:
            self.pending[stream] = hold
        out += [(p, (a,)) for a, p in late]
        self.blame = [a for _, a in out]
        return [p for p, _ in out]

    def _forged(self, h) -> bytes:
        """A packet for the same slot, sealed under a key the host made up (it has not the session's)."""
        key = derive(self.seed, "adversary/forged-key", 32)
        body = derive(self.seed, f"adversary/forged-page/{h.gfn}", PAGE_SIZE)
        flags = int(h.flags) & ~int(Flag.COMPRESSED | Flag.ZERO)
        header = HEADER.pack(h.gfn, h.sequence, h.version, h.stream, flags, PAGE_SIZE + TAG_BYTES)
        return header + AESGCM(key).encrypt(nonce(h.stream, h.sequence), body, header)

    def deliver_pending(self) -> None:
        """Packets the host still holds go in before the token or the resume (it can keep them no longer)."""
        out = [x for s in sorted(self.pending) for x in self.pending[s]]
        for s in self.pending:  # a held packet that comes last arrives in sequence after all: no gap
            if s in self.gaps and self.gaps[s].spec.kind == "reorder":
                del self.gaps[s]
        out += [x for s in sorted(self.recorded) for x in self.recorded[s]]
        self.pending.clear()
        self.recorded.clear()
        if out:
            self.blame = [(a,) for a, _ in out]
            self.data.deliver([p for _, p in out])
        self.blame = []

    def saw(self, index: int, detected_by: str) -> Action | None:
        """A check refused packet ``index`` of the latest delivery: the action it saw, now detected (of
        the actions that packet carries, the one whose change that check finds)."""
        acts = self.blame[index] if 0 <= index < len(self.blame) else ()
        a = next((a for a in acts if detected_by in FAILS.get(a.spec.kind, ())), acts[0] if acts else None)
        if a is not None:
            a.detect(detected_by)
        return a

    def token_refused(self, detected_by: str) -> Action | None:
        """The token did not match: the packets no later packet showed missing (drops, held reorders)."""
        gaps = [a for _, a in sorted(self.gaps.items())]
        self.gaps.clear()
        for a in gaps:
            a.detect(detected_by)
        return gaps[0] if gaps else None

    # -- the target's RMP
    def target_rmp(self, gfns) -> list[int]:
        """The RMP actions due now, on the first private page of ``gfns`` (pages the target holds, about
        to be checked by its agent). Returns the gfns the host told the agent were newly installed
        (double-pvalidate), for the agent's PVALIDATE."""
        acts = [a for a in self._of(RMP_TARGET) if self._due(a)]
        if not acts or not len(gfns):
            return []
        eng = self.eng
        gfn = int(gfns[0])
        spa = eng.spa(TARGET, gfn)
        entry = eng.rmp_entry(TARGET, spa)
        notices = []
        for a in acts:
            a.applied(self.clock(), self.phase, gfn)
            if a.spec.kind == "rmp-remap":
                other = int(gfns[1]) if len(gfns) > 1 else gfn + 1
                eng.rmpupdate(TARGET, spa, assigned=True, asid=entry.asid, gfn=other)
            elif a.spec.kind == "skip-pvalidate":
                # Reclaimed to the host and assigned again: the new entry is not validated (the guest never
                # validated this one), though it names the same guest page.
                eng.rmpupdate(TARGET, spa, assigned=False)
                eng.rmpupdate(TARGET, spa, assigned=True, asid=entry.asid, gfn=gfn)
            else:
                notices.append((a, gfn))
        self._notices = notices
        return [g for _, g in notices]

    def rmp_refused(self, gfn: int, detected_by: str) -> Action | None:
        """The target's agent found ``gfn``'s RMP entry wrong (or its PVALIDATE failed): the action on it."""
        for a in self._of(RMP_TARGET):
            if a.gfn == gfn and not a.resolved and a.applied_ns >= 0:
                if detected_by == "pvalidate.fail_noupdate" and a.spec.kind != "double-pvalidate":
                    continue
                a.detect(detected_by)
                return a
        return None

    # -- the link
    def link_event(self, down_ns: int, recovered: bool, fault_at_ns: int, phase: str, stalled_ns: int = 0) -> None:
        """The link went down at ``down_ns`` (its fault starting at ``fault_at_ns``): the link-loss action
        that made that fault acted then; a recovered loss is recorded with its effect."""
        for a in self._of(("link-loss",)):
            if a.applied_ns < 0 and link_loss_ns(a.spec, self.start_ns) == fault_at_ns:
                a.applied(down_ns, phase)
                a.detect("link")
                if recovered:
                    a.effect = f"recovered: re-keyed, stalled {stalled_ns} ns"
                return

    # -- the record
    def link_down(self, at_ns: int, fault_at_ns: int | None = None) -> None:
        for a in self._of(("link-loss",)):
            if a.applied_ns < 0 and (fault_at_ns is None or link_loss_ns(a.spec, self.start_ns) == fault_at_ns):
                a.applied(at_ns, self.phase or "link")
                a.detect("link")

    def _end_diff(self) -> set[int]:
        """The pages whose end-of-trace plain text differs from the trace replayed without migration
        (replayed again here, into a memory of its own: only for a run whose digest differs and that an
        undetected action changed)."""
        from ..security.memory import HostMemory
        from ..traces.format import open_trace
        from .data import differing_pages

        if self.trace_path is None:
            return set()
        with open_trace(self.trace_path) as tr:
            ref = HostMemory.for_host(0, 0, npages=tr.meta.npages, spa_base=1024, shared_ranges=tr.meta.shared_ranges)
            for _, batch in tr:
                ref.apply_batch(batch)
        return differing_pages(ref, self.data.memory(self.guest.host))

    def record(self) -> list[dict]:
        return [{"kind": a.spec.kind, "at": at_text(a.spec), "outcome": a.outcome, "detected_by": a.detected_by,
                 "applied_ns": max(a.applied_ns, 0), "gfn": max(a.gfn, 0), "phase": a.phase, "effect": a.effect}
                for a in self.actions]

    def finish(self, status: str, postcopy_failed: bool, at_ns: int, invariants: dict, faults: dict | None = None
               ) -> tuple[list[dict], dict]:
        """The run record's ``adversary`` list and ``adversary_effects``: pages lost (a failed run: pages
        the target wrote after it resumed, which the source never saw), whether the guest's end plaintext
        differs from the no-migration one, and which invariants the actions explain (so that they are
        reported, not taken for a bug). Only the action that caused a difference explains it: RMP #PFs
        are the detected host writes' (and no other fault); a plaintext difference is explained only if
        every page that differs is one an undetected action changed (tampered shared pages, pages
        written past a failed RMP)."""
        if postcopy_failed:
            self.link_down(at_ns)
        stopped = status != "completed"
        for a in self.actions:
            if a.outcome == "undetected" and stopped and a.spec.kind not in ("tamper-shared",) + HOST_KINDS:
                a.outcome = "pending"  # it acted, but the run stopped before any check could see it
        lost = 0
        if status == "failed":
            n = self.data.memory(1).npages
            gfns = np.arange(n, dtype=np.uint32)
            present = (self.eng.flags(TARGET, gfns) & PRESENT) != 0
            lost = int(np.count_nonzero(present & (self.eng.versions(TARGET, gfns) != self.eng.versions(SOURCE, gfns))))
        explains = []
        writes = sum(1 for a in self.actions if a.spec.kind == "host-write-private" and a.outcome == "detected")
        if writes and faults is not None and {k: v for k, v in faults.items() if v} == {"host_rmp_pf": writes}:
            explains.append("no_faults")
        elif writes and faults is None:
            explains.append("no_faults")
        changed = set().union(*(a.changed for a in self.actions if a.outcome == "undetected"))
        p = self.data.plaintext
        if changed and p["end_of_trace"] not in ("", p["no_migration"]) and self._end_diff() <= changed:
            explains.append("plaintext_end_equals_no_migration")
        if changed and self.switchover_diff is not None and self.switchover_diff <= changed:
            explains.append("plaintext_target_equals_source_at_switchover")
        differs = p["end_of_trace"] != "" and p["end_of_trace"] != p["no_migration"]
        explains = [k for k in explains if k in invariants and not invariants[k]]
        return self.record(), {"pages_lost": lost, "plaintext_end_differs": differs, "explains": explains}
