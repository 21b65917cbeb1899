"""The migration driver: replays a whole trace on one virtual clock and migrates the guest inside it.

Time is virtual ns (``v``); the guest's own clock is trace time (``g``). Before migration they are equal.
While migration works, ``g`` falls behind ``v`` when agents take the primary VM's CPU (shadow vCPUs) and
stops while the guest is paused (downtime). Page contents are tracked by the page engine
(``replay.engine``); the driver decides what is sent when, following QEMU's pre-copy semantics, and
records rounds, events and metrics. Nothing here reads a wall clock or an unseeded random source.

Flow of one run (SPEC section 4):
  guest runs to ``migration.start_ns`` -> capability/setup checks -> setup steps (strategy-specific) ->
  round 0 (every page) -> rounds 1.. (dirty-log sync, send dirty pages) until pending bytes fit in
  bandwidth x downtime_limit or max_rounds -> stop-and-copy (pause, final sync, pages, VMSAs, device
  state, target unpack, validation token, resume) -> the guest runs on at the target to the end of the
  trace. Post-copy and hybrid replace the rounds/stop-and-copy tail (``_postcopy``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from . import __version__
from .engine import PRESENT, PRIVATE, U64_MAX, make_engine
from .errors import ScenarioError
from .runrecord import EVENTS_SCHEMA, FAULTS_SCHEMA, RUN_FORMAT, RUN_VERSION, ROUNDS_SCHEMA, write_run
from .scenario import FOREVER, Scenario
from .snp import PAGE_SIZE, FAULT_KINDS, Fault
from .strategies import HOST, OWNERS, PRIMARY_VM, Step, make_strategy
from .trace import TraceMeta, open_trace, read_meta

NS_PER_S = 1_000_000_000
TRANSFER_CHUNK = 1 << 16  # pages per engine call: bounds how late a link failure is noticed
POSTCOPY_CHUNK = 1 << 10  # smaller in post-copy, where faults and link failures interleave with the push
RMP_OPS = ("rmpupdate", "pvalidate", "rmpadjust", "psmash", "psc")

ProgressFn = Callable[[int], None]


# ------------------------------------------------------------------------------------------- traces

def cache_dir() -> Path:
    return Path(os.environ.get("SNP_REPLAY_CACHE", Path.home() / ".cache" / "snp-replay"))


def trace_for(scenario: Scenario, cache: Path | None = None) -> Path:
    """The trace file a scenario replays: its ``trace.file``, or its generator's output (cached by spec)."""
    t = scenario.trace
    if t.file:
        path = Path(scenario.base_dir) / t.file
        if not path.exists():
            raise ScenarioError(f"trace.file {t.file!r}: no such file (looked in {path})")
        return path
    from .generators import generate  # only scenarios with a generator need it

    seed = scenario.trace_seed
    g = scenario.guest
    spec = {
        "snp_replay": __version__,  # a new version may generate differently: never reuse across versions
        "generator": t.generator, "events": t.events, "rate": t.rate, "fill": t.fill, "seed": seed,
        "guest_bytes": g.guest_bytes, "vcpus": g.vcpus, "options": {k: repr(v) for k, v in sorted(t.options.items())},
    }
    key = hashlib.blake2b(repr(sorted(spec.items())).encode(), digest_size=12).hexdigest()
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{t.generator}-{key}.arrow"
    if not path.exists():
        if not g.guest_bytes or not g.vcpus:
            raise ScenarioError("a [trace] generator needs guest.guest_bytes (or guest.size) and guest.vcpus")
        generate(
            t.generator, path, guest_bytes=g.guest_bytes, vcpus=g.vcpus, events=t.events, seed=seed,
            rate=t.rate, fill=t.fill, **dict(t.options),
        )
    return path


class Cursor:
    """Where the guest is in the trace: the current record batch and row."""

    def __init__(self, reader, progress: ProgressFn | None):
        self._it = iter(reader)
        self._progress = progress
        self.batch: pa.RecordBatch | None = None
        self.base = 0
        self.row = 0
        self._next()

    def _next(self) -> None:
        if self.batch is not None and self._progress:
            self._progress(self.batch.num_rows)
        nxt = next(self._it, None)
        if nxt is None:
            self.batch = None
        else:
            self.base, self.batch = nxt
            self.row = 0

    @property
    def done(self) -> bool:
        return self.batch is None

    def settle(self, row: int) -> None:
        self.row = row
        while self.batch is not None and self.row >= self.batch.num_rows:
            self._next()


# ------------------------------------------------------------------------------------------- results

@dataclass
class RunResult:
    summary: dict
    rounds: pa.Table
    events: pa.Table
    faults: pa.Table | None

    @property
    def status(self) -> str:
        return self.summary["status"]

    def write(self, out_dir: str | Path) -> Path:
        return write_run(out_dir, self.summary, self.rounds, self.events, self.faults)


@dataclass
class _Round:
    round: int
    phase: str
    sync_ns: int
    dirty_pages: int
    start_ns: int
    end_ns: int = 0
    pages_sent: int = 0
    zero_pages: int = 0
    private_pages: int = 0
    shared_pages: int = 0
    bytes_sent: int = 0
    agents: int = 0
    agent_cpu_ns: int = 0
    guest_progress_ns: int = 0


@dataclass
class _Tally:
    pages: dict = field(default_factory=lambda: {"precopy": 0, "downtime": 0, "postcopy": 0})
    bytes: dict = field(default_factory=lambda: {"precopy": 0, "downtime": 0, "postcopy": 0})
    zero_pages: int = 0
    private_pages: int = 0
    shared_pages: int = 0
    cpu: dict = field(default_factory=lambda: {o: 0 for o in OWNERS})
    live_v: int = 0  # virtual time the guest was live during migration
    live_g: int = 0  # guest progress in that time


class LinkDown(Exception):
    """The link failed at ``at_ns`` (internal control flow)."""

    def __init__(self, at_ns: int):
        self.at_ns = at_ns


# ------------------------------------------------------------------------------------------- driver

class Migration:
    """One run: a scenario, a trace and a strategy. ``run()`` returns a RunResult."""

    def __init__(self, scenario: Scenario, trace_path: str | Path, *, engine: str = "cython",
                 progress: ProgressFn | None = None, no_migration_digest: str | None = None):
        """``no_migration_digest``: the reference digest of this trace and guest if already known (another
        strategy's run of the same scenario), saving a replay of the whole trace."""
        self.trace_path = Path(trace_path)
        self.meta: TraceMeta = read_meta(self.trace_path)
        g = scenario.guest
        for key, want, have in (("guest_bytes", g.guest_bytes, self.meta.guest_bytes), ("vcpus", g.vcpus, self.meta.vcpus)):
            if want and want != have:
                raise ScenarioError(f"{self.trace_path}: the trace's {key} is {have} but the scenario's guest.{key} is "
                                    f"{want} (--set guest.{key}={have}, or 0 to take the trace's)")
        self.s = scenario
        self.m = scenario.migration
        self.c = scenario.costs
        self.strategy = make_strategy(scenario)
        self.engine_kind = engine
        self.progress = progress
        self.npages = self.meta.guest_bytes // PAGE_SIZE
        self.vcpus = self.meta.vcpus
        self.eng = make_engine(engine, npages=self.npages, vcpus=self.vcpus, asid=g.asid, os_vmpl=g.os_vmpl, hosts=2)
        self.v = 0
        self.g = 0
        self.agents = 0  # agents are only ever added: this is also the maximum and the number created
        self._events: list[tuple[int, str, int, int, str]] = []
        self._rounds: list[_Round] = []
        self._faults_rows: list[tuple] = []
        self.t = _Tally()
        self.link_faults = sorted(scenario.faults, key=lambda f: (f.at_ns, f.duration_ns))
        self.run_host = 0  # where the guest runs: the source until it resumes on the target
        self._delays = None  # post-copy: per-vCPU blocked time so far (ns); None in pre-copy
        self._ready = None  # post-copy: guest time at which each page is usable on the target
        self._handled_faults: set = set()
        self._link_dead_at: int | None = None
        self._source_only = 0
        self._pc = self._new_pc()
        self._no_migration = no_migration_digest
        self._pushing = False
        self._outage_backlog: list[int] | None = None
        self.vmsas_sent = 0
        # Everything that can be refused is refused before any replay work.
        self.strategy.check(self._has_private(), self.vcpus)
        self.trace_last_ns = self._last_t()
        if self.m.start_ns > self.trace_last_ns:
            raise ScenarioError(
                f"migration.start_ns {self.m.start_ns} is after the end of the trace ({self.trace_last_ns} ns)")

    # -- bookkeeping
    def log(self, kind: str, detail: str = "", gfn: int = -1, vcpu: int = -1, t: int | None = None) -> None:
        self._events.append((self.v if t is None else t, kind, gfn, vcpu, detail))

    def _vmpls_in_use(self) -> int:
        return 2 if self.s.guest.os_vmpl > 0 else 1

    # -- the guest
    def _run_guest(self, host: int, g_stop: int) -> None:
        """Replay the guest on ``host`` up to guest time ``g_stop`` (post-copy: serving its userfaults)."""
        cur = self.cur
        while not cur.done:
            n = cur.batch.num_rows
            row = self.eng.replay(host, cur.batch, cur.row, cur.base, g_stop, self._delays, self._ready)
            if self.eng.last_stop[0] == Fault.USERFAULT:
                cur.settle(row)
                if not self._userfault():
                    return
                continue
            cur.settle(row)
            if row < n:
                break  # stopped by time

    def _elapse(self, dv: int, guest_cpu_ns: int = 0) -> None:
        """Let ``dv`` of virtual time pass with the guest running where it runs; ``guest_cpu_ns`` of the
        primary VM's CPU quota is taken by agents meanwhile (shadow vCPUs)."""
        dg = max(0, dv - guest_cpu_ns // self.vcpus)
        self.v += dv
        self.g += dg
        self.t.live_v += dv
        self.t.live_g += dg
        self._run_guest(self.run_host, self.g)

    def _step(self, step: Step) -> None:
        self.log("setup_step", f"{step.name} ({step.ns} ns, {step.owner})")
        self.t.cpu[step.owner] += step.ns
        self._elapse(step.ns, step.ns if step.owner == PRIMARY_VM else 0)

    # -- the link
    def _link_fault_before(self, v_end: int) -> int | None:
        """The time of the first link failure at or before ``v_end``, else None."""
        # Pre-copy has no recovery (QEMU aborts): any failure up to now ends the migration.
        for f in self.link_faults:
            if f.at_ns <= v_end:
                return f.at_ns
        return None

    # -- sending
    def _begin(self, agents: int, skip_present: bool = False) -> None:
        c = self.c
        self.eng.begin_transfer(
            self.v, self.g,
            bandwidth_bytes_per_s=self.m.bandwidth_bytes_per_s, page_bytes=PAGE_SIZE,
            header_bytes=c.page_header_bytes, agents=agents, pack_private_ns=c.page_pack_ns,
            pack_zero_ns=c.zero_page_ns, batch_pages=c.batch_pages, vmgexit_ns=c.vmgexit_ns,
            charge_guest=self.strategy.charge_guest, unpack_private_ns=c.page_unpack_ns, target_rmp=True,
            skip_present=skip_present,
        )

    def _send(self, gfns: np.ndarray, rnd: _Round, *, paused: bool) -> dict:
        """Send ``gfns`` (in order) from the source to the target, the guest running unless ``paused``;
        returns the transfer's final state."""
        self._begin(self.agents)
        v0, g0 = self.v, self.g
        start = 0
        while start < len(gfns):
            chunk = gfns[start:start + TRANSFER_CHUNK]
            k = 0
            while k < len(chunk):
                cur = self.cur
                batch = None if (paused or cur.done) else cur.batch
                row, k = self.eng.transfer(0, 1, chunk, k, batch, cur.row, cur.base, 0)
                if batch is not None:
                    cur.settle(row)
            start += len(chunk)
            st = self.eng.transfer_state()
            at = self._link_fault_before(st["v_ns"])
            if at is not None:
                self._account(rnd, st, v0, g0, paused)
                raise LinkDown(at)
        st = self.eng.transfer_state()
        self._account(rnd, st, v0, g0, paused)
        return st

    def _account(self, rnd: _Round, st: dict, v0: int, g0: int, paused: bool) -> None:
        rnd.pages_sent += st["pages"]
        rnd.zero_pages += st["zero_pages"]
        rnd.private_pages += st["private_pages"]
        rnd.shared_pages += st["shared_pages"]
        rnd.bytes_sent += st["bytes"]
        rnd.agent_cpu_ns += st["agent_cpu_ns"]
        rnd.agents = self.agents
        self.t.cpu[self.strategy.agent_owner] += st["agent_cpu_ns"]
        self.t.pages[rnd.phase] += st["pages"]
        self.t.bytes[rnd.phase] += st["bytes"]
        self.t.zero_pages += st["zero_pages"]
        self.t.private_pages += st["private_pages"]
        self.t.shared_pages += st["shared_pages"]
        dv, dg = st["v_ns"] - v0, st["g_ns"] - g0
        self.v = st["v_ns"]
        if not paused:
            self.t.live_v += dv
            self.t.live_g += dg
            self.g = st["g_ns"]
            # The engine applies rows lazily, before each page; bring the guest up to the clock.
            self._run_guest(self.run_host, self.g)

    # -- agents
    def _agents_wanted(self, pack_ns: int, n_bytes: int) -> int:
        """On-demand agents: enough that packaging keeps pace with the link, within the strategy's limit."""
        link_ns = -(-n_bytes * NS_PER_S // self.m.bandwidth_bytes_per_s)
        need = max(1, -(-pack_ns // max(1, link_ns)))
        return min(self.strategy.agent_limit(), max(self.agents, need))

    def _grow_agents(self, want: int) -> None:
        while self.agents < want:
            for host in ("source", "target"):
                step = self.strategy.agent_step(host)
                self._step(step)
            self.agents += 1
            self.log("agent_added", f"agents={self.agents}")

    def _estimate(self, gfns: np.ndarray) -> tuple[int, int]:
        """(agent CPU ns, bytes) that sending ``gfns`` would cost if sent now (the transfer's own rules)."""
        if len(gfns) == 0:
            return 0, 0
        c = self.c
        private = (self.eng.flags(0, gfns) & PRIVATE) != 0
        zero = self.eng.versions(0, gfns) == 0
        n_priv, n_priv_zero = int(np.count_nonzero(private)), int(np.count_nonzero(private & zero))
        pack = (n_priv - n_priv_zero) * c.page_pack_ns + n_priv_zero * c.zero_page_ns \
            + (n_priv // c.batch_pages) * c.vmgexit_ns
        return pack, len(gfns) * c.page_header_bytes + int(np.count_nonzero(~zero)) * PAGE_SIZE

    def _sync_cost(self) -> int:
        return self.c.dirty_sync_ns + self.c.dirty_sync_ns_per_gib * self.meta.guest_bytes // (1 << 30)

    def _final_sync(self) -> np.ndarray:
        """At the pause: the pages dirty at the last sync plus those dirtied since, in gfn order."""
        final = self.eng.collect_dirty(0)
        self.v += self._sync_cost()
        self.t.cpu[HOST] += self._sync_cost()
        self.eng.set_dirty_logging(0, False)
        return np.union1d(self._pending, final).astype(np.uint32)

    def _sync(self) -> np.ndarray:
        """Dirty-log get-and-clear on the source; its cost elapses with the guest running."""
        dirty = self.eng.collect_dirty(0)
        cost = self._sync_cost()
        self.log("dirty_sync", f"dirty_pages={len(dirty)}")
        self.t.cpu[HOST] += cost
        self._elapse(cost)
        return dirty

    # -- phases
    def run(self) -> RunResult:
        nomig = self._no_migration or self._no_migration_digest()
        self.status, self.reason = "completed", ""
        self.switchover_reason = ""
        self.digests = {"no_migration": nomig, "end_of_trace": "", "source_at_switchover": "", "target_at_switchover": ""}
        self.times = {"migration_start_ns": 0, "setup_ns": 0, "switchover_ns": 0, "completion_ns": 0, "downtime_ns": 0,
                      "expected_downtime_ns": 0, "trace_end_ns": 0}
        self.downtime_limit_exceeded = False
        with open_trace(self.trace_path) as reader:
            self.cur = Cursor(reader, self.progress)
            self.eng.launch(0, list(self.meta.shared_ranges))
            self.eng.reset_counters()  # launch is not part of the migration
            self._run_guest(0, self.m.start_ns)
            self.v = self.g = self.m.start_ns
            self.times["migration_start_ns"] = self.v
            self.log("migration_start", f"strategy={self.strategy.name} mode={self.m.mode}")
            try:
                self._setup()
                if self.m.mode == "precopy":
                    self._precopy(max_rounds=self.m.max_rounds, converge=True)
                    self._stop_and_copy()
                else:
                    if self.m.mode == "hybrid":
                        self._precopy(max_rounds=self.m.precopy_rounds, converge=False)
                    self._postcopy()
            except LinkDown as down:
                self._link_lost(down.at_ns)
            if self.status != "failed":
                self._finish_trace(self.run_host)
        return self._result()

    def _has_private(self) -> bool:
        shared = sum(last - first + 1 for first, last in self.meta.shared_ranges)
        return shared < self.npages

    def _last_t(self) -> int:
        """Guest time of the trace's last event (read from the last record batch only)."""
        with open_trace(self.trace_path) as reader:
            for i in range(reader.num_batches - 1, -1, -1):
                b = reader.batch(i)
                if b.num_rows:
                    return int(b.column("t_ns")[b.num_rows - 1].as_py())
        return 0

    def _no_migration_digest(self) -> str:
        """The end-of-trace memory of the same guest with no migration at all: the reference digest
        (replayed once per trace, guest and engine; cached on disk by replay.refdigest)."""
        from .refdigest import no_migration_digest

        return no_migration_digest(self.trace_path, self.meta, self.s.guest.asid, self.s.guest.os_vmpl,
                                   self.engine_kind, self.progress)

    def _setup(self) -> None:
        v0 = self.v
        self.agents = self.m.agents_initial
        for step in self.strategy.setup_steps():
            self._step(step)
        self._step(self.strategy.attestation_step())
        self.times["setup_ns"] = self.v - v0
        self.log("setup_done", f"setup_ns={self.v - v0} agents={self.agents}")

    def _precopy(self, *, max_rounds: int, converge: bool) -> None:
        """Pre-copy rounds: round 0 sends every page, then dirty-log syncs until the switchover rule holds
        (``converge``) or ``max_rounds`` rounds are done. Leaves ``self._pending`` (dirty at the last sync)."""
        self.eng.set_dirty_logging(0, True)
        threshold = self.m.bandwidth_bytes_per_s * self.m.downtime_limit_ns // NS_PER_S
        gfns = np.arange(self.npages, dtype=np.uint32)
        sync_ns = self.v
        rnd_no = 0
        while True:
            pack_ns, nbytes = self._estimate(gfns)
            self._grow_agents(self._agents_wanted(pack_ns, nbytes))
            rnd = _Round(rnd_no, "precopy", sync_ns, len(gfns), self.v)
            g0 = self.g
            self.log("round_start", f"round={rnd_no} pages={len(gfns)} agents={self.agents}")
            self._rounds.append(rnd)
            self._send(gfns, rnd, paused=False)
            rnd.end_ns, rnd.guest_progress_ns = self.v, self.g - g0
            self.log("round_end", f"round={rnd_no} pages={rnd.pages_sent} bytes={rnd.bytes_sent}")
            rnd_no += 1
            self._check_link(self.v)
            sync_ns = self.v
            gfns = self._sync()
            _, pending = self._estimate(gfns)
            self.times["expected_downtime_ns"] = pending * NS_PER_S // self.m.bandwidth_bytes_per_s
            if converge and pending <= threshold:
                self.switchover_reason = "converged"
                break
            if rnd_no >= max_rounds:
                self.switchover_reason = "max_rounds"
                if converge:
                    self.downtime_limit_exceeded = pending > threshold
                break
        self._pending = gfns

    def _check_link(self, v_end: int) -> None:
        at = self._link_fault_before(v_end)
        if at is not None:
            raise LinkDown(at)

    def _send_vmsas_and_devices(self, rnd: _Round) -> None:
        """VMSAs (one per vCPU per VMPL in use) go through an agent like private pages; device state plain."""
        c = self.c
        nvmsa = self.vcpus * self._vmpls_in_use()
        vmsa_bytes = nvmsa * (c.vmsa_bytes + c.page_header_bytes)
        vmsa_pack = nvmsa * c.page_pack_ns
        link_ns = -(-(vmsa_bytes + c.device_state_bytes) * NS_PER_S // self.m.bandwidth_bytes_per_s)
        self.v += max(link_ns, -(-vmsa_pack // self.agents))
        self.t.cpu[self.strategy.agent_owner] += vmsa_pack
        rnd.bytes_sent += vmsa_bytes + c.device_state_bytes
        self.t.bytes["downtime"] += vmsa_bytes + c.device_state_bytes
        self.vmsas_sent = nvmsa
        self.log("vmsas_sent", f"vmsas={nvmsa} device_state_bytes={c.device_state_bytes}")
        self._check_link(self.v)

    def _stop_and_copy(self) -> None:
        """Pause, final sync, send the rest, VMSAs and device state; the target unpacks, validates, resumes."""
        c = self.c
        self.times["switchover_ns"] = self.v
        self.log("pause", "guest paused (stop-and-copy)")
        v_pause = self.v
        pages = self._final_sync()
        self.digests["source_at_switchover"] = self.eng.digest(0)
        rnd = _Round(len(self._rounds), "downtime", self.v, len(pages), self.v)
        self._rounds.append(rnd)
        rmp_before = self._rmp_snapshot()
        st = self._send(pages, rnd, paused=True)
        self._send_vmsas_and_devices(rnd)
        # The last byte lands one latency later; then the target agents unpack what arrived while paused.
        self.v += self.m.latency_ns
        rmp_after = self._rmp_snapshot()
        target_ops = {k: rmp_after[k] - rmp_before[k] for k in RMP_OPS}
        unpack_cpu = st["target_cpu_ns"] + self.vmsas_sent * c.page_unpack_ns + target_ops["rmpupdate"] * c.rmpupdate_ns \
            + target_ops["pvalidate"] * c.pvalidate_ns
        self.t.cpu[self.strategy.agent_owner] += unpack_cpu
        self.v += -(-unpack_cpu // self.agents)
        self.digests["target_at_switchover"] = self.eng.digest(1)
        # End-of-migration validation: the token (page count + running hash) crosses the link.
        self.v += self.m.latency_ns
        self.log("validation_token", f"pages={self.t.pages['precopy'] + self.t.pages['downtime']} "
                 f"match={self.digests['target_at_switchover'] == self.digests['source_at_switchover']}")
        self.v += c.resume_ns
        rnd.end_ns = self.v
        self.times["downtime_ns"] = self.v - v_pause
        self.times["completion_ns"] = self.v
        if self.times["downtime_ns"] > self.m.downtime_limit_ns:
            self.downtime_limit_exceeded = True
        self.run_host = 1
        self.log("resume", f"target resumed; downtime_ns={self.times['downtime_ns']}")

    # -- post-copy
    def _switchover_postcopy(self) -> np.ndarray:
        """Pause; the pages the target lacks or holds stale become userfault pages; VMSAs and device state
        cross; the target resumes. Returns the gfns the target does not hold, in gfn order."""
        c = self.c
        self.times["switchover_ns"] = self.v
        self.switchover_reason = "postcopy"
        v_pause = self.v
        self.log("pause", "guest paused (switch over to post-copy)")
        if self.m.mode == "hybrid":
            # Discard: the target's copies of pages dirtied since they were sent are stale.
            self.eng.clear_present(1, self._final_sync())
        self.digests["source_at_switchover"] = self.eng.digest(0)
        flags = self.eng.flags(1, np.arange(self.npages, dtype=np.uint32))
        missing = np.flatnonzero((flags & PRESENT) == 0).astype(np.uint32)
        rnd = _Round(len(self._rounds), "downtime", self.v, len(missing), self.v)
        self._rounds.append(rnd)
        self._send_vmsas_and_devices(rnd)
        self.v += self.m.latency_ns
        unpack = self.vcpus * self._vmpls_in_use() * c.page_unpack_ns
        self.t.cpu[self.strategy.agent_owner] += unpack
        self.v += -(-unpack // self.agents) + c.resume_ns
        rnd.end_ns = self.v
        self.times["downtime_ns"] = self.v - v_pause
        self.downtime_limit_exceeded = self.times["downtime_ns"] > self.m.downtime_limit_ns
        self.log("resume", f"target resumed; downtime_ns={self.times['downtime_ns']} userfault_pages={len(missing)}")
        return missing

    def _postcopy(self) -> None:
        """Post-copy: the target runs; its accesses to pages it lacks fault to the source (per vCPU),
        while a background push sends the rest (gfn order, or around recent faults with prepaging)."""
        missing = self._switchover_postcopy()
        self.run_host = 1
        self._delays = np.zeros(self.vcpus, dtype=np.uint64)
        self._ready = np.zeros(self.npages, dtype=np.uint64)
        self._requested = np.zeros(self.npages, dtype=bool)
        self._prepage_next: np.ndarray | None = None
        self._link_up_ns = 0
        v_switch = self.times["switchover_ns"]
        rnd = _Round(len(self._rounds), "postcopy", self.v, len(missing), self.v)
        self._rounds.append(rnd)
        self._pc_round = rnd
        g0 = self.g
        self._begin(self.agents, skip_present=True)
        self._push_v0, self._push_g0 = self.v, self.g
        base_k = 0
        window, wk = None, 0
        self._pushing = True
        while True:
            if self._prepage_next is not None:
                # Pre-paging: the pages after the latest fault go first (Hines & Gopalan's bubbling).
                window, wk, self._prepage_next = self._prepage_next, 0, None
            if window is not None:
                arr, k0, end = window, wk, len(window)
            elif base_k < len(missing):
                arr, k0, end = missing, base_k, min(len(missing), base_k + POSTCOPY_CHUNK)
            else:
                break
            cur = self.cur
            batch = None if cur.done else cur.batch
            row, k = self.eng.transfer(0, 1, arr[:end], k0, batch, cur.row, cur.base, 1, self._delays, self._ready)
            if window is not None:
                wk = k
                if wk >= len(window):
                    window = None
            else:
                base_k = k
            if batch is not None:
                cur.settle(row)
                if self.eng.last_stop[0] == Fault.USERFAULT and not self._userfault():
                    return self._postcopy_failed()
            if not self._postcopy_link_ok():
                return self._postcopy_failed()
        self._account_push(rnd)
        self._pushing = False
        rnd.end_ns, rnd.guest_progress_ns = self.v, self.g - g0
        self.times["completion_ns"] = self.v
        complete = self.eng.count_present(1) == self.npages
        source_now = self.eng.digest(0)
        # The source is frozen since the switchover and the target now holds every page it sent.
        self.digests["target_at_switchover"] = source_now if complete else ""
        self.log("validation_token", f"pages={self.t.pages['precopy'] + self.t.pages['postcopy']} complete={complete}")
        self.log("postcopy_complete", f"switchover_to_complete_ns={self.v - v_switch}")

    def _account_push(self, rnd: _Round) -> None:
        st = self.eng.transfer_state()
        self._account(rnd, st, self._push_v0, self._push_g0, paused=False)

    def _fault_path_ns(self, private: bool) -> int:
        """Exit, request on the return path, packaging at the source, the page on the link, unpacking and
        RMPUPDATE + PVALIDATE at the target. Without a preempt channel the page waits behind the push."""
        c, m = self.c, self.m
        bw = m.bandwidth_bytes_per_s
        page_wire = -(-(PAGE_SIZE + c.page_header_bytes) * NS_PER_S // bw)
        path = c.postcopy_fault_exit_ns + m.latency_ns + -(-c.postcopy_request_bytes * NS_PER_S // bw)
        path += page_wire + m.latency_ns
        if private:
            path += c.page_pack_ns + c.page_unpack_ns + c.rmpupdate_ns + c.pvalidate_ns
        if not m.postcopy_preempt:
            path += -(-c.postcopy_queue_bytes * NS_PER_S // bw)
        return path

    def _userfault(self) -> bool:
        """Serve the userfault the engine stopped on: block that vCPU until the page is usable. False if the
        link never comes back (the guest cannot go on)."""
        _, gfn, vcpu, row = self.eng.last_stop
        cur = self.cur
        e = int(cur.batch.column("t_ns")[row].as_py()) + int(self._delays[vcpu])
        # guest time -> virtual time, at the current rate (the push's clock while it runs)
        st = self.eng.transfer_state() if self._pushing else {"v_ns": self.v, "g_ns": self.g}
        voff = st["v_ns"] - st["g_ns"]
        private = self.eng.page(0, gfn).private
        if self._requested[gfn]:
            # Already requested: send nothing more. Requests are handled in trace order, so the earlier
            # request may be later in time than this one: the page is there at whichever comes first.
            served = min(int(self._ready[gfn]), e + self._fault_path_ns(private))
            self._ready[gfn] = served
            self._pc["duplicates"] += 1
        else:
            v_req = e + voff
            start = e
            if self._link_up_ns and v_req < self._link_up_ns:
                start = self._link_up_ns - voff  # raised while the link was down: waits for recovery
            elif self._link_dead_at is not None and v_req >= self._link_dead_at:
                return False
            served = start + self._fault_path_ns(private)
            if self.eng.page(1, gfn).present:
                served = min(served, int(self._ready[gfn]))  # already on its way in the push
            else:
                self.eng.deliver(0, 1, gfn)
                nbytes = PAGE_SIZE + self.c.page_header_bytes + self.c.postcopy_request_bytes
                if self._pushing:  # the page shares the link and the agents with the push
                    self.eng.transfer_add(nbytes, self.c.page_pack_ns if private else 0)
                elif self._outage_backlog is not None:  # crosses once the link is back
                    self._outage_backlog[0] += nbytes
                    self._outage_backlog[1] += self.c.page_pack_ns if private else 0
                else:
                    self.t.bytes["postcopy"] += nbytes
                    self.t.cpu[self.strategy.agent_owner] += self.c.page_pack_ns if private else 0
                self._pc["bytes"] += nbytes
                self.t.pages["postcopy"] += 1
                self.t.private_pages += private
                self.t.shared_pages += not private
            self._requested[gfn] = True
            self._ready[gfn] = served
            self._pc["requests"] += 1
            if self.m.prepaging:
                self._prepage_next = np.arange(gfn + 1, min(self.npages, gfn + 1 + self.m.prepage_pages), dtype=np.uint32)
        served = max(served, e)
        self._delays[vcpu] += served - e
        self._pc["latencies"].append(served - e)
        self._pc["blocked"][vcpu].append((e, served))
        self._faults_rows.append((vcpu, gfn, private, e + voff, served + voff, cur.base + row))
        return True

    def _postcopy_link_ok(self) -> bool:
        """Check the link at the push's clock; a failure with recovery stalls the push until the link is
        back and re-keyed (QEMU's postcopy recovery); a permanent one returns False."""
        st = self.eng.transfer_state()
        for f in self.link_faults:
            if f.at_ns > st["v_ns"] or f.at_ns < self._push_v0 or f in self._handled_faults:
                continue
            self._handled_faults.add(f)
            self._account_push(self._pc_round)
            self.log("link_down", "migration link lost during post-copy", t=f.at_ns)
            if f.duration_ns == FOREVER:
                self._link_dead_at = f.at_ns
                return False
            up = f.at_ns + f.duration_ns + self.c.attestation_ns  # re-handshake before pages move again
            self._link_up_ns = up
            self.log("link_up", f"recovered; re-keyed; stalled_ns={up - f.at_ns}", t=up)
            # The guest runs on through the outage; its faults wait for the link (served after `up`).
            self._pushing, self._outage_backlog = False, [0, 0]
            if up > self.v:
                self._elapse(up - self.v)
            self._begin(self.agents, skip_present=True)
            self._push_v0, self._push_g0 = self.v, self.g
            self.eng.transfer_add(*self._outage_backlog)
            self._pushing, self._outage_backlog = True, None
        return True

    def _postcopy_failed(self) -> None:
        """The link never came back: neither side has the whole guest. Never reported as success."""
        self._pushing = False
        only_source = self.npages - self.eng.count_present(1)
        self.status = "failed"
        self.reason = (f"link lost for good during post-copy: {only_source} pages exist only on the source; "
                       "the target cannot run on and the source is stopped")
        self._source_only = only_source
        self.log("postcopy_failed", self.reason)

    def _link_lost(self, at_ns: int) -> None:
        """A link failure before the target runs: abort; the source runs on with its memory intact."""
        self.log("link_down", "migration link lost", t=at_ns)
        self.status, self.reason = "aborted", f"link down at {at_ns} ns before switchover: source runs on"
        self.eng.set_dirty_logging(0, False)
        self.times["completion_ns"] = max(self.v, at_ns)
        self.run_host = 0
        self.log("abort", self.reason)

    def _finish_trace(self, host: int) -> None:
        """The guest runs on (at the target after a completed migration) to the end of the trace."""
        self._run_guest(host, U64_MAX)
        self.digests["end_of_trace"] = self.eng.digest(host)
        lag = int(self._delays.max()) if self._delays is not None else 0  # the most-blocked vCPU ends last
        self.times["trace_end_ns"] = self.v + max(0, self.trace_last_ns + lag - self.g)
        self.log("trace_end", f"host={'target' if host else 'source'}", t=self.times["trace_end_ns"])

    def _rmp_snapshot(self) -> dict:
        """RMP operation counts on the target so far (the guest's own PSCs run on the source)."""
        rmp = self.eng.counters()["rmp_by_host"][1]
        return {k: int(rmp[k]) for k in RMP_OPS}

    def _rmp_metrics(self) -> dict:
        by_host = self.eng.counters()["rmp_by_host"]
        return {name: {k: int(by_host[h][k]) for k in RMP_OPS} for h, name in ((0, "source"), (1, "target"))}

    # -- the record
    def _result(self) -> RunResult:
        counters = self.eng.counters()
        faults = {k.key: int(counters["faults"][k.key]) for k in FAULT_KINDS}
        t = self.t
        t.cpu["guest"] = self.vcpus * t.live_g
        times = self.times
        completed = self.status == "completed"
        metrics = {
            "total_ns": times["completion_ns"] - times["migration_start_ns"] if times["completion_ns"] else 0,
            "setup_ns": times["setup_ns"],
            "downtime_ns": times["downtime_ns"],
            "expected_downtime_ns": times["expected_downtime_ns"],
            "downtime_limit_exceeded": self.downtime_limit_exceeded,
            "switchover_reason": self.switchover_reason,
            "migration_start_ns": times["migration_start_ns"],
            "switchover_ns": times["switchover_ns"],
            "completion_ns": times["completion_ns"],
            "trace_end_ns": times["trace_end_ns"],
            "rounds": sum(1 for r in self._rounds if r.phase == "precopy"),
            "pages_sent": sum(t.pages.values()),
            "zero_pages": t.zero_pages,
            "bytes_sent": sum(t.bytes.values()),
            "precopy_bytes": t.bytes["precopy"], "downtime_bytes": t.bytes["downtime"], "postcopy_bytes": t.bytes["postcopy"],
            "precopy_pages": t.pages["precopy"], "downtime_pages": t.pages["downtime"], "postcopy_pages": t.pages["postcopy"],
            "private_pages_sent": t.private_pages, "shared_pages_sent": t.shared_pages,
            "vmsas_sent": self.vmsas_sent,
            "device_state_bytes": self.c.device_state_bytes if completed else 0,
            "agents_max": self.agents, "agents_created": self.agents,
            "cpu_ns": dict(t.cpu),
            "guest_slowdown_ppm": (t.live_v - t.live_g) * 1_000_000 // t.live_v if t.live_v else 0,
            "rmp": self._rmp_metrics(),
            "faults": faults,
            "postcopy": self._postcopy_metrics(),
        }
        digests = self.digests
        invariants = {
            "end_of_trace_equals_no_migration": digests["end_of_trace"] == digests["no_migration"],
            # Only a completed migration has a switchover whose two sides must agree.
            "target_equals_source_at_switchover": not completed
            or digests["target_at_switchover"] == digests["source_at_switchover"] != "",
            "no_faults": not any(faults.values()),
        }
        summary = {
            "format": RUN_FORMAT, "version": RUN_VERSION,
            "tool": {"name": "snp-replay", "version": __version__, "engine": self.engine_kind},
            "status": self.status, "status_reason": self.reason,
            "strategy": self.strategy.name, "mode": self.m.mode,
            "scenario": self.s.resolved(guest_bytes=self.meta.guest_bytes, vcpus=self.vcpus),
            "trace": {"digest": self.meta.digest, "events": self.meta.events, "guest_bytes": self.meta.guest_bytes,
                      "vcpus": self.vcpus, "source": self.meta.source},
            "metrics": metrics,
            "first_faults": [[int(ev), str(kind), int(gfn)] for ev, kind, gfn in counters["first_faults"]],
            "digests": digests,
            "invariants": invariants,
        }
        rounds = pa.Table.from_pylist([r.__dict__ for r in self._rounds], schema=ROUNDS_SCHEMA)
        events = pa.Table.from_pylist(
            [{"seq": i, "t_ns": e[0], "kind": e[1], "gfn": e[2], "vcpu": e[3], "detail": e[4]}
             for i, e in enumerate(self._events)], schema=EVENTS_SCHEMA)
        faults_tbl = None
        if self.m.mode != "precopy":
            faults_tbl = pa.Table.from_pylist(
                [dict(zip(FAULTS_SCHEMA.names, r)) for r in self._faults_rows], schema=FAULTS_SCHEMA)
        return RunResult(summary, rounds, events, faults_tbl)

    def _new_pc(self) -> dict:
        return {"requests": 0, "duplicates": 0, "bytes": 0, "latencies": [], "blocked": [[] for _ in range(self.vcpus)]}

    def _postcopy_metrics(self) -> dict:
        """QEMU-style post-copy statistics: requests, bytes, blocktime, fault-latency percentiles and the
        histogram with QEMU's buckets ([2^N us, 2^(N+1) us); below 2 us counts in bucket 0)."""
        pc = self._pc
        lat = np.sort(np.array(pc["latencies"], dtype=np.int64))
        hist = [0] * HIST_BUCKETS
        for us in (lat // 1000).tolist():
            hist[min(HIST_BUCKETS - 1, max(0, int(us).bit_length() - 1))] += 1

        def pct(ppm: int) -> int:  # nearest-rank percentile, integer arithmetic
            return int(lat[max(0, -(-len(lat) * ppm // 1_000_000) - 1)]) if len(lat) else 0

        per_vcpu = [sum(b - a for a, b in iv) for iv in pc["blocked"]]
        postcopy = self.m.mode != "precopy" and self.times["switchover_ns"] > 0
        return {
            "requests": pc["requests"],
            "duplicate_requests": pc["duplicates"],
            "bytes": pc["bytes"],
            "blocktime_ns": sum(per_vcpu),
            "blocktime_all_vcpus_ns": _all_blocked_ns(pc["blocked"]),
            "blocktime_ns_per_vcpu": per_vcpu,
            "latency_p50_ns": pct(500_000),
            "latency_p99_ns": pct(990_000),
            "latency_max_ns": int(lat[-1]) if len(lat) else 0,
            "latency_hist": [{"bucket_us_lo": 1 << n if n else 0, "bucket_us_hi": 1 << (n + 1), "count": c}
                             for n, c in enumerate(hist)],
            "switchover_to_complete_ns": (self.times["completion_ns"] - self.times["switchover_ns"])
            if postcopy and self.status == "completed" else 0,
            "source_only_pages": self._source_only,
        }


HIST_BUCKETS = 24  # up to [2^23 us, 2^24 us) = 8.4 s .. 16.8 s; slower faults count in the last bucket


def _all_blocked_ns(blocked: list[list[tuple[int, int]]]) -> int:
    """Time during which every vCPU was blocked at once (QEMU's overlapped postcopy-blocktime)."""
    if not blocked or any(not iv for iv in blocked):
        return 0
    edges = sorted([(a, 1) for iv in blocked for a, _ in iv] + [(b, -1) for iv in blocked for _, b in iv],
                   key=lambda x: (x[0], x[1]))
    total, depth, since = 0, 0, 0
    n = len(blocked)
    for t, d in edges:
        if depth == n:
            total += t - since
        depth += d
        since = t
    return total


def run(scenario: Scenario, *, strategy: str | None = None, engine: str = "cython", trace_path: str | Path | None = None,
        progress: ProgressFn | None = None) -> RunResult:
    """Run ``scenario`` (optionally under another strategy) and return its record (not yet written)."""
    if strategy is not None:
        scenario = scenario.with_strategy(strategy)
    path = Path(trace_path) if trace_path is not None else trace_for(scenario)
    return Migration(scenario, path, engine=engine, progress=progress).run()
