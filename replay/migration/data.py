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

import numpy as np

from ..security.channel import Outcome
from ..scenario import AttestationSpec, parse_tcb
from ..security.attestation import DEFAULT_GUEST_POLICY, POLICY_DEBUG, POLICY_MIGRATE_MA, TcbVersion
from ..security.session import AttestationSetup, DataPlane
from ..security.token import TokenOutcome
from ..strategies import SOURCE, TARGET

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


class DataRefused(Exception):
    """The channel refused to go on (handshake, packet or token): ``reason`` says which check."""

    def __init__(self, reason: str, detected_by: str):
        self.reason = reason
        self.detected_by = detected_by


class DataMode:
    def __init__(self, seed: int, eng, meta, compress_level: int, attestation: AttestationSpec = AttestationSpec()):
        self.eng = eng
        self.dp = DataPlane(seed, npages=meta.npages, spa_base=(eng.spa(SOURCE, 0), eng.spa(TARGET, 0)),
                            shared_ranges=meta.shared_ranges, compress_level=compress_level or None,
                            setup=attestation_setup(attestation))
        self.plaintext = dict.fromkeys(("source_at_switchover", "target_at_switchover", "end_of_trace"), "")
        self.adversary = None  # replay.migration.adversary.Adversary: rewrites what crosses ([[adversary]])
        eng.set_send_log(True)

    # -- the guest
    def rows(self, host: int, batch, a: int, b: int) -> None:
        """Rows [a, b) of ``batch`` were applied on ``host``."""
        if batch is None or b <= a:
            return
        cols = [batch.column(i).to_numpy(zero_copy_only=True)[a:b] for i in (2, 3, 4, 5)]
        self.dp.guest_rows(host, *cols)

    # -- pages
    def handshake(self) -> None:
        adv = self.adversary
        hs = self.dp.attest(adv.evidence() if adv else None)
        if not hs.accepted:
            side, verdict = hs.refusal
            raise DataRefused(f"attestation refused by the {side}: {verdict.value}", f"attestation.{verdict.value}")

    def _check(self, outcomes) -> None:
        bad = [o for o in outcomes if o is not Outcome.ACCEPTED]
        if bad:
            raise DataRefused(f"the target rejected a packet ({bad[0].value})", f"channel.{bad[0].value}")

    def send(self, gfns, versions, stream: str) -> None:
        adv = self.adversary
        if adv is not None:
            adv.tick()
        if len(gfns):
            self._check(self.dp.send(gfns, versions, STREAM[stream], adv.wire(STREAM[stream]) if adv else None))

    def after_transfer(self, run_host: int, batch, base: int, a: int, b: int, stream: str) -> None:
        """Replay the interleaving of the transfer: the rows [a, b) it applied and the pages it sent, each
        page with the contents it had when the engine took its version. Pages are packaged in groups, and
        rows applied in chunks, as long as no row between a page's send and the group's flush touches it."""
        gfns, rows, versions = self.eng.take_send_log()
        if batch is None:
            self.send(gfns, versions, stream)
            return
        touched: list[int] = []
        wide = None
        if len(gfns):
            gpa = batch.column(2).to_numpy(zero_copy_only=True)[a:b]
            ln = batch.column(3).to_numpy(zero_copy_only=True)[a:b]
            lo = gpa >> np.uint64(12)
            hi = (gpa + ln.astype(np.uint64) - np.uint64(1)) >> np.uint64(12)
            touched = np.r_[np.int64(0), (lo != hi)].cumsum()  # rows [i, j) span two pages or more: j > i
            wide = touched
            touched = [lo.tolist(), hi.tolist()]
        applied = a  # rows applied to memory so far
        reached = a  # rows the guest had applied when the last page of the group was sent
        group: list[int] = []
        held: set[int] = set()
        try:
            for i, r in enumerate((rows - base).tolist()):
                if r > reached:
                    i0, i1 = reached - a, r - a
                    if held and (wide[i1] > wide[i0] or any(x in held for x in touched[0][i0:i1])
                                 or any(x in held for x in touched[1][i0:i1])):
                        self._flush(run_host, batch, applied, reached, gfns, versions, group, stream)
                        applied, group, held = reached, [], set()
                    reached = r
                group.append(i)
                held.add(int(gfns[i]))
            self._flush(run_host, batch, applied, reached, gfns, versions, group, stream)
        except DataRefused:  # the guest ran every row of the transfer all the same (``_flush`` applied to reached)
            self.rows(run_host, batch, reached, b)
            raise
        self.rows(run_host, batch, reached, b)

    def _flush(self, host, batch, applied, reached, gfns, versions, group, stream) -> None:
        self.rows(host, batch, applied, reached)
        if group:
            sel = np.asarray(group, dtype=np.int64)
            self.send(gfns[sel], versions[sel], stream)

    def vmsas(self, vcpus: int, vmpls: list[int]) -> None:
        adv = self.adversary
        self._check(self.dp.send_vmsas(vcpus, vmpls, STREAM["vmsa"], adv.wire(STREAM["vmsa"]) if adv else None))
        if adv is not None:
            adv.before_resume()  # the target's last look before it runs

    def token(self) -> None:
        adv = self.adversary
        outcome = self.dp.finish(adv.wire(self.dp.TOKEN_STREAM) if adv else None)
        if outcome is not TokenOutcome.MATCH:
            raise DataRefused(f"validation token: {outcome.value}", f"token.{outcome.value}")

    # -- digests and facts
    def snapshot(self, key: str, host: int) -> None:
        self.plaintext[key] = self.dp.memory[host].plaintext_digest()

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
