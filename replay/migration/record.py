"""The run record: metrics, digests and invariants assembled from what the phases returned."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..core.version import __version__
from ..runs.record import EVENTS_SCHEMA, FAULTS_SCHEMA, ROUNDS_SCHEMA, RUN_FORMAT, RUN_VERSION, write_run
from ..core.errors import InvariantError
from ..model.snp import FAULT_KINDS
from ..scenario.strategies import HOST, MIRROR_VM
from .context import Run
from .postcopy import PostcopyStats
from .precopy import SWITCHOVER_RULE

RMP_OPS = ("rmpupdate", "pvalidate", "rmpadjust", "psmash", "psc")
HIST_BUCKETS = 24  # up to [2^23 us, 2^24 us) = 8.4 s .. 16.8 s; slower faults count in the last bucket


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
class Outcome:
    """What the phases produced, for the record."""

    status: str = "completed"
    reason: str = ""
    switchover_reason: str = ""
    times: dict = field(default_factory=lambda: dict.fromkeys(
        ("migration_start_ns", "setup_ns", "switchover_ns", "resume_ns", "completion_ns", "downtime_ns",
         "expected_downtime_ns", "trace_end_ns"), 0))
    downtime_limit_exceeded: bool = False
    precopy: dict = field(default_factory=dict)
    digests: dict = field(default_factory=lambda: dict.fromkeys(
        ("no_migration", "end_of_trace", "source_at_switchover", "target_at_switchover"), ""))
    guest_g_at_end: int = 0  # guest progress at the end of the migration window
    postcopy: object = None  # PostcopyStats
    vmsas_sent: int = 0
    detected_by: str = ""  # data mode: the check that stopped the migration


def build(run: Run, out: Outcome, engine_kind: str) -> RunResult:
    eng, s, t = run.eng, run.s, run.tally
    counters = eng.counters()
    faults = {k.key: int(counters["faults"][k.key]) for k in FAULT_KINDS}
    times = out.times
    completed = out.status == "completed"
    window = max(0, (times["completion_ns"] or run.guest.v) - times["migration_start_ns"])
    pc = out.postcopy or PostcopyStats.empty(run.vcpus)
    vlat = [pc.latencies(v) for v in range(run.vcpus)]  # each vCPU's fault latencies
    cpu = dict(run.cpu.ledger)
    # The guest's slowdown is the CPU work it demanded over the window (what it would have run with no
    # migration, replay.model.demand) that it did not run. Each vCPU got as far as the guest's progress less
    # the time it sat blocked on post-copy faults; it ran its share of the demand up to there. An idle
    # guest demands nothing and loses nothing.
    demand = run.guest.demand
    start = times["migration_start_ns"]
    demanded = demand.integral_ns(start, start + window)
    v = run.vcpus
    ran_at: dict[int, int] = {}  # most vCPUs share a blocked time (0): one integral each
    for b in {sum(x) for x in vlat}:
        ran_at[b] = demand.integral_ns(start, max(start, out.guest_g_at_end - b)) // v
    ran = [ran_at[sum(x)] for x in vlat]
    lost = [max(0, demanded // v - r) for r in ran]
    cpu["guest"] = sum(ran)
    per_vcpu_demand = demanded // v
    per_vcpu_ppm = [x * 1_000_000 // per_vcpu_demand if per_vcpu_demand else 0 for x in lost]
    lost_total = sum(lost)
    by_host = counters["rmp_by_host"]
    metrics = {
        "total_ns": window if times["completion_ns"] else 0,
        "setup_ns": times["setup_ns"],
        "downtime_ns": times["downtime_ns"],
        "expected_downtime_ns": times["expected_downtime_ns"],
        "downtime_limit_exceeded": out.downtime_limit_exceeded,
        "switchover_reason": out.switchover_reason,
        "switchover_rule": SWITCHOVER_RULE,
        "precopy": out.precopy,
        "migration_start_ns": times["migration_start_ns"],
        "switchover_ns": times["switchover_ns"],
        "completion_ns": times["completion_ns"],
        "trace_end_ns": times["trace_end_ns"],
        "rounds": out.precopy.get("rounds", 0),
        "pages_sent": sum(t.pages.values()),
        "zero_pages": t.zero_pages,
        "bytes_sent": sum(t.bytes.values()),
        "precopy_bytes": t.bytes["precopy"], "downtime_bytes": t.bytes["downtime"], "postcopy_bytes": t.bytes["postcopy"],
        "precopy_pages": t.pages["precopy"], "downtime_pages": t.pages["downtime"], "postcopy_pages": t.pages["postcopy"],
        "private_pages_sent": t.private_pages, "shared_pages_sent": t.shared_pages,
        "vmsas_sent": out.vmsas_sent,
        "device_state_bytes": s.costs.device_state_bytes if out.vmsas_sent else 0,
        "agents_max": run.agents, "agents_created": run.agents,
        "cpu_ns": cpu,
        "cpu_demand": {
            **demand.to_json(),
            # What the guest would have run over the window without migration, and what it ran.
            "demanded_ns": demanded,
            "ran_ns": cpu["guest"],
            # Mean CPUs the migration took from the hosts' spare CPUs (mirror VM and host threads), milli-CPUs.
            "host_cpus_taken_milli": (cpu[MIRROR_VM] + cpu[HOST]) * 1000 // window if window else 0,
        },
        "guest_slowdown_ppm": lost_total * 1_000_000 // (per_vcpu_demand * v) if per_vcpu_demand else 0,
        "guest_slowdown_ppm_per_vcpu": per_vcpu_ppm,
        "guest_lost_ns": lost_total,
        "wp_faults": int(sum(eng.wp_faults(h) for h in range(eng.hosts))),
        "mirror_first_touch_npfs": t.first_touches,
        "rmp": {name: {k: int(by_host[h][k]) for k in RMP_OPS} for h, name in ((0, "source"), (1, "target"))},
        "faults": faults,
        "postcopy": _postcopy_metrics(run, out, pc, vlat),
    }
    data = None
    if run.data is not None:
        metrics["security"], data = run.data.facts()
        metrics["security"]["detected_by"] = out.detected_by
        data["plaintext"] = dict(run.data.plaintext)
    d = out.digests
    invariants = {
        "end_of_trace_equals_no_migration": d["end_of_trace"] == d["no_migration"],
        # Only a completed migration has a switchover whose two sides must agree.
        "target_equals_source_at_switchover": not completed or d["target_at_switchover"] == d["source_at_switchover"] != "",
        "no_faults": not any(faults.values()),
    }
    if data is not None:  # over plaintext, what the guest sees
        p = data["plaintext"]
        invariants["plaintext_end_equals_no_migration"] = p["end_of_trace"] == p["no_migration"]
        if s.migration.mode == "precopy" or (out.switchover_reason and not out.postcopy):
            invariants["plaintext_target_equals_source_at_switchover"] = not completed or (
                p["target_at_switchover"] == p["source_at_switchover"] != "")
    summary = {
        "format": RUN_FORMAT, "version": RUN_VERSION,
        "tool": {"name": "snp-replay", "version": __version__, "engine": engine_kind},
        "status": out.status, "status_reason": out.reason,
        "strategy": run.strategy.name, "mode": s.migration.mode,
        "scenario": s.resolved(guest_bytes=run.meta.guest_bytes, vcpus=run.vcpus),
        "kernel": run.strategy.capabilities(run.meta.has_private).to_json(s.kernel.profile),
        "trace": {"digest": run.meta.digest, "events": run.meta.events, "guest_bytes": run.meta.guest_bytes,
                  "vcpus": run.vcpus, "source": run.meta.source},
        "metrics": metrics,
        "first_faults": [[int(ev), str(kind), int(gfn)] for ev, kind, gfn in counters["first_faults"]],
        "digests": d,
        "invariants": invariants,
    }
    if data is not None:
        summary["data"] = data
    _no_negative(metrics, "metrics")
    adversary = run.adversary
    if adversary is not None:
        summary["adversary"], summary["adversary_effects"] = adversary.finish(
            out.status, pc.failed, times["completion_ns"], invariants, faults)
    rounds = pa.Table.from_pylist([{k: getattr(r, k) for k in ROUNDS_SCHEMA.names} for r in t.rounds], schema=ROUNDS_SCHEMA)
    # Phases log some events at the moment they happened, found out later (a link's death seen by the
    # transfer that hit it): the log is in time order, ties in the order they were logged.
    ordered = sorted(run.events, key=lambda e: e[0])
    events = pa.Table.from_pylist(
        [{"seq": i, "t_ns": e[0], "kind": e[1], "gfn": e[2], "vcpu": e[3], "detail": e[4]}
         for i, e in enumerate(ordered)], schema=EVENTS_SCHEMA)
    faults_tbl = None
    if s.migration.mode != "precopy":
        rows = pc.faults_rows
        faults_tbl = pa.Table.from_pylist([dict(zip(FAULTS_SCHEMA.names, r)) for r in rows], schema=FAULTS_SCHEMA)
    return RunResult(summary, rounds, events, faults_tbl)


def _no_negative(obj, path: str) -> None:
    """Every count, time and size a run records is >= 0: a negative one is the driver's own inconsistency
    (an internal error, never the user's input)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _no_negative(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _no_negative(v, f"{path}[{i}]")
    elif isinstance(obj, int) and not isinstance(obj, bool) and obj < 0:
        raise InvariantError(f"run record: {path} is {obj} (negative): the driver's accounting is inconsistent")


def _postcopy_metrics(run: Run, out: Outcome, pc: PostcopyStats, vlat: list[list[int]]) -> dict:
    """QEMU-style post-copy statistics (``pc``, ``vlat``: the run's, per vCPU): requests, bytes, blocktime,
    fault-latency percentiles and the histogram with QEMU's buckets ([2^N us, 2^(N+1) us); below 2 us
    counts in bucket 0)."""
    lat = np.sort(np.array(pc.latencies(), dtype=np.int64))
    hist = [0] * HIST_BUCKETS
    for us in (lat // 1000).tolist():
        hist[min(HIST_BUCKETS - 1, max(0, int(us).bit_length() - 1))] += 1

    def pct(ppm: int) -> int:  # nearest-rank percentile, integer arithmetic
        return int(lat[max(0, -(-len(lat) * ppm // 1_000_000) - 1)]) if len(lat) else 0

    per_vcpu = [sum(x) for x in vlat]
    times = out.times
    in_postcopy = out.postcopy is not None and out.status == "completed"
    overlapped = _all_blocked_ns(pc.blocked)
    # QEMU's query-migrate names (QEMU reports the blocktimes in ms; here every time is in ns)
    qemu = {
        "postcopy-blocktime": overlapped,
        "postcopy-vcpu-blocktime": per_vcpu,
        "postcopy-latency": int(lat.sum()) // len(lat) if len(lat) else 0,
        "postcopy-vcpu-latency": [sum(x) // len(x) if x else 0 for x in vlat],
        "postcopy-latency-dist": hist,
    }
    return {
        "qemu": qemu,
        "requests": pc.requests,
        "duplicate_requests": pc.duplicates,
        "bytes": pc.bytes,
        "blocktime_ns": sum(per_vcpu),
        "blocktime_all_vcpus_ns": overlapped,
        "blocktime_ns_per_vcpu": per_vcpu,
        "latency_p50_ns": pct(500_000),
        "latency_p99_ns": pct(990_000),
        "latency_max_ns": int(lat[-1]) if len(lat) else 0,
        "latency_hist": [{"bucket_us_lo": 1 << n if n else 0, "bucket_us_hi": 1 << (n + 1), "count": c}
                         for n, c in enumerate(hist)],
        "switchover_to_complete_ns": times["completion_ns"] - times["switchover_ns"] if in_postcopy else 0,
        "source_only_pages": pc.source_only_pages,
    }


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
