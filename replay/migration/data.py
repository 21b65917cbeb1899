"""Data mode in the driver: real page contents beside the engine's versions.

The engine decides what moves when from versions; data mode carries what those versions mean. Each
host's guest memory is a ``HostMemory`` (private pages AES-XTS encrypted under that host's key with the
page's SPA as tweak, shared pages plain); every trace row the engine applies on a host is applied to that
host's memory in the same order; every page the engine sends is packaged by the source agent (decrypt with
the source key, optionally zstd, AES-256-GCM seal under the transport key of an attested handshake) and
checked and re-encrypted by the target (tag, next sequence, no older version than it holds). The engine's
send log gives the trace row each page was sent at, so contents are taken exactly when the engine took
the version. Nothing here changes the virtual clock: the costs of data mode are the scenario's
``data_*`` costs, applied by the transfer.

A refused handshake, a rejected packet or a token that does not match stops the migration before the
target runs (``DataRefused``): the source runs on with its memory intact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..security.channel import Outcome, PageRefs
from ..scenario.spec import AttestationSpec, parse_tcb
from ..security.attestation import DEFAULT_GUEST_POLICY, POLICY_DEBUG, POLICY_MIGRATE_MA, TcbVersion
from ..security.memory import HostMemory, page_spans
from ..security.session import AttestationSetup, DataPlane
from ..security.token import TokenOutcome
from ..engines.common import PRESENT, PRIVATE
from ..model.snp import PAGE_SIZE, Access, Fault, Op, Rc
from ..scenario.strategies import SOURCE, TARGET

# Pages whose contents wait, captured, to be sent in one batch (8 MiB at most: a bigger transfer is sent
# in several batches). Small enough that a batch's buffers (captured pages, the wire, the opened pages)
# stay in the caches and reuse the same memory: each 64 MiB of fresh memory costs ~16,000 page faults'
# zeroing, more than a batch's Python overhead.
CAPTURE_PAGES = 2048
# One stream per kind of traffic: each has its own sequence numbers and keys.
STREAM = {"precopy": 0, "downtime": 1, "postcopy": 2, "fault": 3, "vmsa": 4}


def attestation_setup(a: AttestationSpec) -> AttestationSetup:
    """The scenario's [attestation] as the handshake's setup."""
    def tcb(text: str) -> TcbVersion:
        return TcbVersion(*parse_tcb(text, "attestation"))

    policy = DEFAULT_GUEST_POLICY & ~POLICY_MIGRATE_MA & ~POLICY_DEBUG
    policy |= (POLICY_MIGRATE_MA if a.target_migratable else 0) | (POLICY_DEBUG if a.target_debug else 0)
    return AttestationSetup(
        allowed_measurements=(a.allowed_measurement,), min_tcb=tcb(a.min_tcb),
        source_measurement=a.source_measurement, target_measurement=a.target_measurement,
        source_tcb=tcb(a.source_tcb), target_tcb=tcb(a.target_tcb), target_policy=policy, target_root=a.target_root)


def differing_pages(a, b) -> set[int]:
    """The gfns whose plain text differs between two ``HostMemory`` of one guest."""
    out: set[int] = set()
    n = a.npages
    for lo in range(0, n, 4096):
        g = np.arange(lo, min(n, lo + 4096))
        out.update((lo + np.flatnonzero((a.read_plain_many(g) != b.read_plain_many(g)).any(axis=1))).tolist())
    return out


class DataRefused(Exception):
    """The channel refused to go on (handshake, packet, token or the target agent's RMP check): ``reason``
    says which check; ``action``: the adversary's action it saw, if any."""

    def __init__(self, reason: str, detected_by: str, action=None):
        self.reason = reason
        self.detected_by = detected_by
        self.action = action


class DataMode:
    def __init__(self, seed: int, eng, meta, compress_level: int, attestation: AttestationSpec = AttestationSpec()):
        self.eng = eng
        self.dp = DataPlane(seed, npages=meta.npages, spa_base=(eng.spa(SOURCE, 0), eng.spa(TARGET, 0)),
                            shared_ranges=meta.shared_ranges, compress_level=compress_level or None,
                            setup=attestation_setup(attestation))
        self.plaintext = dict.fromkeys(("source_at_switchover", "target_at_switchover", "end_of_trace"), "")
        self.adversary = None  # replay.migration.adversary.Adversary: rewrites what crosses ([[adversary]])
        self._capture = np.empty((0, PAGE_SIZE), np.uint8)  # captured contents, reused between transfers
        self._cols = (None, [])  # (batch, its gpa, len, op and value columns as numpy)
        eng.set_send_log(True)

    # -- the guest
    def rows(self, host: int, batch, a: int, b: int) -> None:
        """Rows [a, b) of ``batch`` were applied on ``host``."""
        if batch is None or b <= a:
            return
        if self._cols[0] is not batch:  # a transfer applies one batch in many pieces: its columns once
            gpa, ln, op, value = (batch.column(i).to_numpy(zero_copy_only=True) for i in (2, 3, 4, 5))
            self._cols = (batch, [gpa, ln.astype(np.uint64), op, value])  # len as the memory takes it
        self.dp.guest_rows(host, *(c[a:b] for c in self._cols[1]))

    # -- pages
    def handshake(self) -> None:
        adv = self.adversary
        if adv is not None:
            adv.at(None, "handshake")
        hs = self.dp.attest(adv.evidence() if adv else None)
        if not hs.accepted:
            side, verdict = hs.refusal
            by = f"attestation.{verdict.value}"
            raise DataRefused(f"attestation refused by the {side}: {verdict.value}", by,
                              adv.handshake_refused(by) if adv else None)

    # -- hooks for the adversary (replay.migration.adversary): what an untrusted host can reach, and no more.
    # It acts on the platform, DRAM and the wire through these, never through the data plane's members.
    @property
    def token_stream(self) -> int:
        """The stream number the validation token travels on (the wire hook sees it like any other)."""
        return self.dp.TOKEN_STREAM

    def memory(self, host: int) -> HostMemory:
        """``host``'s DRAM copy of the guest (raw ciphertext reads and writes: what a host owning DRAM does)."""
        return self.dp.memory[host]

    def alter_target_platform(self, **changes: Any) -> AttestationSetup:
        """Change the target's platform before the handshake (its measurement, policy or TCB: fields of
        ``AttestationSetup``); the handshake then verifies what the changed platform reports."""
        self.dp.setup = dataclasses.replace(self.dp.setup, **changes)
        return self.dp.setup

    @property
    def platform(self) -> AttestationSetup:
        """Both platforms' attestation setup as the handshake will see it."""
        return self.dp.setup

    def deliver(self, packets: list[bytes]) -> None:
        """Packets the host hands the target's receiver on its own (ones it held back), checked like every
        delivery (``check``)."""
        self.check(self.dp.receiver.receive_many(packets))

    def check(self, outcomes) -> None:
        """The target's verdicts on the packets just delivered: the first rejected one stops the migration
        (and names the adversary's action that packet carried, if any)."""
        if outcomes.count(Outcome.ACCEPTED) == len(outcomes):  # the usual case, without a loop in Python
            return
        for i, o in enumerate(outcomes):
            if o is not Outcome.ACCEPTED:
                by = f"channel.{o.value}"
                adv = self.adversary
                raise DataRefused(f"the target rejected a packet ({o.value})", by, adv.saw(i, by) if adv else None)

    def send(self, gfns, versions, stream: str, at_ns: int | None = None, gate_ns: int | None = None) -> None:
        """Send ``gfns`` on ``stream`` (a phase's traffic) at virtual time ``at_ns`` (the phase's clock;
        None: the guest's). In post-copy the target's agent checks the RMP entry of every private page
        it installs, as it does before a pre-copy resume. ``gate_ns``: a fault reply's, the push's clock
        (replay.migration.adversary.Adversary.at)."""
        adv = self.adversary
        if adv is not None:
            adv.at(at_ns, stream, gate_ns)
        if len(gfns):
            self.check(self.dp.send(gfns, versions, STREAM[stream], adv.wire(STREAM[stream]) if adv else None))
        if adv is not None:
            adv.tick()  # the host's actions now, on what both hosts hold once these pages landed
        if len(gfns):
            if stream in ("postcopy", "fault"):
                g = np.asarray(gfns, dtype=np.uint32)
                self.agent_check(g[(self.eng.flags(TARGET, g) & PRIVATE) != 0])

    def agent_check(self, gfns) -> None:
        """The target's agent checks the RMP entries of private pages it holds (it installed and validated
        them itself: an entry that is not assigned, validated and the guest's at that gfn is the host's
        doing), and PVALIDATEs the pages the host reports newly installed (FAIL_NOUPDATE: it was validated
        already, an alias). Runs on every data-mode run, from the engine's RMP state."""
        eng, adv = self.eng, self.adversary
        notices = adv.target_rmp(gfns) if adv is not None else []
        for gfn in notices:
            spa = eng.spa(TARGET, gfn)
            e = eng.rmp_entry(TARGET, spa)
            if eng.pvalidate(TARGET, spa, asid=e.asid, gfn=gfn, vmpl=0, validate=True) == Rc.FAIL_NOUPDATE:
                by = "pvalidate.fail_noupdate"
                raise DataRefused(f"PVALIDATE of gfn {gfn}, reported newly installed, found it validated "
                                  "(FAIL_NOUPDATE)", by, adv.rmp_refused(gfn, by))
        gfns = np.asarray(gfns, dtype=np.int64)
        faults = eng.check_access_many(TARGET, gfns, vmpl=0, access=Access.READ, private=True)
        bad = np.flatnonzero(faults != Fault.NONE)
        if bad.size:  # the first page in order whose entry is wrong, as a check page by page finds it
            gfn, f = int(gfns[bad[0]]), Fault(int(faults[bad[0]]))
            by = "vc.not_validated" if f == Fault.VC_NOT_VALIDATED else f"rmp.{f.key}"
            raise DataRefused(f"the target's RMP entry of gfn {gfn} is not the guest's ({f.key})", by,
                              adv.rmp_refused(gfn, by) if adv is not None else None)

    def after_transfer(self, run_host: int, batch, base: int, a: int, b: int, stream: str,
                       at_ns: int | None = None) -> None:
        """Replay the interleaving of the transfer: the rows [a, b) it applied and the pages it sent, each
        page with the contents (and state) it had when the engine took its version. Consecutive sends form
        one group, packaged after the rows up to the group's last send are applied, as long as no WRITE or
        page-state row between a page's send and that point touches the page."""
        gfns, rows, versions = self.eng.take_send_log()
        self._at = at_ns  # the transfer step's clock when it began: its first page's time
        if batch is None:
            self.send(gfns, versions, stream, at_ns)
            return
        if not len(gfns):
            self.rows(run_host, batch, a, b)
            return
        r = (rows - base).tolist()
        nxt = self._next_touch(batch, a, b, gfns.astype(np.int64), rows - base)
        late = nxt == b  # no row of this transfer changes the page after its send
        nxt = nxt.tolist()
        # Each group: (rows applied before it, its first and last send). Rows only ever run on the host
        # they are applied to: with the guest on the source, the target's memory sees no rows, so the
        # groups' contents can be captured as they come and all sent at the end, in one batch.
        groups, s, low = [], 0, nxt[0]  # low: the earliest row after its send touching a page of the group
        for e in range(1, len(r)):
            if low < r[e]:  # a row before this send changes a page of the group: package the group first
                groups.append((s, e))
                s, low = e, nxt[e]
            elif nxt[e] < low:
                low = nxt[e]
        groups.append((s, len(r)))
        # An adversary rewrites packets as they cross: each group then goes through ``send`` and its hook.
        capture = run_host == SOURCE and self.adversary is None
        self._applied = a
        try:
            self._send_groups(run_host, batch, r, gfns, versions, groups, stream, capture, late)
        finally:  # the guest ran every row of the transfer, even if a refused packet stopped the migration
            self.rows(run_host, batch, self._applied, b)

    def _send_groups(self, run_host, batch, r, gfns, versions, groups, stream, capture, late) -> None:
        """Send the groups, capturing them as they come (``capture``) or each at once. Of a captured group
        only the pages a later row of the transfer changes (``~late``) are copied aside; the others still
        hold the contents they were sent with when the batch goes, and are sealed where they lie."""
        pending, used, count = [], 0, 0  # groups waiting, capture rows used, pages waiting
        at = np.full(len(r), -1, np.int64)  # per send: its row in the capture buffer, -1: read in place
        private = np.zeros(len(r), dtype=bool)  # per captured send: its attribute when captured
        for s, e in groups:
            self.rows(run_host, batch, self._applied, r[e - 1])
            self._applied = r[e - 1]
            if not capture or e - s > CAPTURE_PAGES:
                self._send_captured(pending, gfns, versions, at, private, used, stream)
                pending, used, count = [], 0, 0
                if not capture or stream in ("postcopy", "fault"):
                    self.send(gfns[s:e], versions[s:e], stream, self._at)
                    continue
                # A big group: its pages hold their contents now, sealed where they lie, in batches of at
                # most CAPTURE_PAGES (as several groups at this row: the same packets, in order).
                for p in range(s, e, CAPTURE_PAGES):
                    self._send_captured([(p, min(e, p + CAPTURE_PAGES))], gfns, versions, at, private, 0, stream)
                continue
            if count + e - s > CAPTURE_PAGES:
                self._send_captured(pending, gfns, versions, at, private, used, stream)
                pending, used, count = [], 0, 0
            early = s + np.flatnonzero(~late[s:e])
            if early.size:
                _, private[early] = self.dp.capture(gfns[early], out=self._captured()[used : used + early.size])
                at[early] = np.arange(used, used + early.size)
                used += early.size
            pending.append((s, e))
            count += e - s
        self._send_captured(pending, gfns, versions, at, private, used, stream)

    def _captured(self) -> np.ndarray:
        """The capture buffer (CAPTURE_PAGES pages), made on first use and kept: fresh memory costs page
        faults on every transfer."""
        if self._capture.shape[0] < CAPTURE_PAGES:
            self._capture = np.empty((CAPTURE_PAGES, PAGE_SIZE), np.uint8)
        return self._capture

    def _send_captured(self, groups, gfns, versions, at, private, used: int, stream: str) -> None:
        """Send the pending groups (consecutive sends): the captured pages from the capture buffer, the
        others from the source's memory as it is now (its pages in clear read in place, the rest
        decrypted into the capture buffer's free rows)."""
        if not groups:
            return
        lo, hi = groups[0][0], groups[-1][1]
        memory = self.dp.memory[SOURCE]
        pages, row = memory.plain_rows(gfns[lo:hi])
        inplace = at[lo:hi] < 0
        priv = np.where(inplace, memory.private_mask(gfns[lo:hi]), private[lo:hi])
        cipher = np.flatnonzero(inplace & (row == -2))
        if cipher.size:
            memory.read_plain_many(gfns[lo + cipher], out=self._captured()[used : used + cipher.size])
            inplace[cipher] = False
            row[cipher] = np.arange(used, used + cipher.size)
        row = np.where(at[lo:hi] >= 0, at[lo:hi], row)
        refs = PageRefs((pages, self._capture), np.where(inplace, 0, 1).astype(np.int8), row, priv)
        for outcomes in self.dp.send_captured([(gfns[s:e], versions[s:e]) for s, e in groups], refs, STREAM[stream]):
            self.check(outcomes)

    @staticmethod
    def _next_touch(batch, a: int, b: int, gfns: np.ndarray, sent_at: np.ndarray) -> np.ndarray:
        """For each sent page, the first row in [its send row, b) whose span touches it and that changes
        it (a WRITE or a page-state change), or b if none."""
        gpa = batch.column(2).to_numpy(zero_copy_only=True)[a:b]
        ln = batch.column(3).to_numpy(zero_copy_only=True)[a:b]
        op = batch.column(4).to_numpy(zero_copy_only=True)[a:b]
        keep = np.flatnonzero(op != Op.READ)
        i, page = page_spans(gpa[keep], ln[keep])
        row = keep[i] + a
        # (page, row) pairs sorted: the first pair at or after (gfn, send row) is the next touch if same page.
        stride = np.int64(b + 1)
        key = np.sort(page * stride + row)
        at = np.searchsorted(key, gfns * stride + sent_at)
        hit = key[np.minimum(at, key.size - 1)] if key.size else np.zeros(gfns.size, np.int64)
        same = (at < key.size) & (hit // stride == gfns)
        return np.where(same, hit % stride, b)

    def vmsas(self, vcpus: int, vmpls: list[int], at_ns: int | None = None) -> None:
        """The VMSAs cross (from ``at_ns``); then the target's last look before it runs: packets the host
        still holds go in, and its agent checks the RMP entry of every private page it holds."""
        adv = self.adversary
        if adv is not None:
            adv.at(at_ns, "vmsa")
            adv.tick()
        self.check(self.dp.send_vmsas(vcpus, vmpls, STREAM["vmsa"], adv.wire(STREAM["vmsa"]) if adv else None))
        if adv is not None:
            adv.at(None, "resume")
            adv.deliver_pending()
        flags = self.eng.flags(TARGET, np.arange(self.eng.npages, dtype=np.uint32))
        self.agent_check(np.flatnonzero((flags & (PRIVATE | PRESENT)) == (PRIVATE | PRESENT)))

    def token(self) -> None:
        adv = self.adversary
        if adv is not None:
            adv.at(None, "token")
        outcome = self.dp.finish(adv.wire(self.dp.TOKEN_STREAM) if adv else None)
        if outcome is not TokenOutcome.MATCH:
            by = f"token.{outcome.value}"
            raise DataRefused(f"validation token: {outcome.value}", by, adv.token_refused(by) if adv else None)

    # -- digests and facts
    def snapshot(self, key: str, host: int) -> None:
        self.plaintext[key] = self.dp.memory[host].plaintext_digest()
        if key == "target_at_switchover" and self.adversary is not None and (
                self.plaintext[key] != self.plaintext["source_at_switchover"]):
            # Which pages differ, so that only the action that changed them explains the difference.
            self.adversary.switchover_diff = differing_pages(self.dp.memory[SOURCE], self.dp.memory[TARGET])

    def facts(self) -> tuple[dict, dict]:
        """(metrics.security: numbers and verdicts, for diff and report; data: the handshake transcript)."""
        f = self.dp.facts()
        metrics = {
            "handshake_verdict": f["handshake_verdict"], "handshake_refused_by": f["handshake_refused_by"],
            "token": f["token"], "compress": f["compress"], "zstd_level": f["zstd_level"],
            "source": f["source"], "target": f["target"],
            "shared_pages_unprotected": f["shared_pages_unprotected"],
        }
        return metrics, {"handshake": f["handshake"]}
