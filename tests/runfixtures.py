"""Synthetic run directories for testing tools/diff and reports without the migration driver.

``make_run(path, **changes)`` writes a complete, valid run directory with ``replay.runs.record.write_run``:
a summary following the layout in docs/internals.md ("Run records"), a few rounds, an event log and, for
post-copy runs, a faults table. Keyword arguments tweak it: ``scenario`` (deep-merged), ``metrics``
(deep-merged), ``digests``, ``status``, ``strategy``, ``mode``, ``events`` (count), ``event_changes``
(``{index: {column: value}}`` to make logs diverge at a known event), ``rounds`` (count).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pyarrow as pa

from replay.runs.record import EVENTS_SCHEMA, FAULTS_SCHEMA, ROUNDS_SCHEMA, RUN_FORMAT, RUN_VERSION, write_run

DIGEST_A = "a" * 64
DIGEST_B = "b" * 64

BASE_SCENARIO = {
    "name": "fixture",
    "trace": {"path": "traces/fixture.trace", "digest": "1" * 64},
    "guest": {"vcpus": 4, "memory": 1 << 30, "os_vmpl": 0},
    "migration": {
        "mode": "precopy",
        "bandwidth_bytes_per_s": 1_250_000_000,
        "downtime_limit_ns": 300_000_000,
        "max_rounds": 30,
        "start_ns": 100_000_000,
    },
    "strategy": {"name": "mirror-vm", "agents": 2, "pack_private_ns": 900, "batch_pages": 512},
    "host": {"shared_ranges": [[0, 255]]},
}


def base_summary(strategy: str = "mirror-vm", mode: str = "precopy") -> dict:
    return {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "tool": {"name": "snp-replay", "version": "0.1.0", "engine": "cython"},
        "status": "completed",
        "status_reason": "",
        "strategy": strategy,
        "mode": mode,
        "scenario": copy.deepcopy(BASE_SCENARIO),
        "trace": {"digest": "1" * 64, "events": 100_000, "guest_bytes": 1 << 30, "vcpus": 4,
                  "source": {"generator": "uniform"}},
        "metrics": {
            "total_ns": 2_400_000_000, "setup_ns": 40_000_000, "downtime_ns": 120_000_000,
            "expected_downtime_ns": 100_000_000, "downtime_limit_exceeded": False,
            "migration_start_ns": 100_000_000, "switchover_ns": 2_380_000_000,
            "completion_ns": 2_500_000_000, "trace_end_ns": 3_000_000_000,
            "rounds": 5, "pages_sent": 300_000, "zero_pages": 20_000, "bytes_sent": 1_230_000_000,
            "precopy_bytes": 1_200_000_000, "downtime_bytes": 30_000_000, "postcopy_bytes": 0,
            "precopy_pages": 292_000, "downtime_pages": 8_000, "postcopy_pages": 0,
            "private_pages_sent": 290_000, "shared_pages_sent": 10_000, "vmsas_sent": 4,
            "device_state_bytes": 65_536,
            "agents_max": 2, "agents_created": 2,
            "cpu_ns": {"guest": 9_000_000_000, "primary_vm_agents": 0, "mirror_vm": 270_000_000,
                       "host": 50_000_000},
            "guest_slowdown_ppm": 12_000,
            "rmp": {
                "source": {"rmpupdate": 10, "pvalidate": 10, "rmpadjust": 0, "psmash": 0, "psc": 4},
                "target": {"rmpupdate": 290_000, "pvalidate": 290_000, "rmpadjust": 0, "psmash": 0, "psc": 0},
            },
            "faults": {"npf_gpa_mismatch": 0, "npf_not_assigned": 0, "npf_asid": 0, "npf_immutable": 0,
                       "npf_size": 0, "vc_not_validated": 0, "npf_vmpl": 0, "npf_shared_assigned": 0,
                       "host_rmp_pf": 0},
            "postcopy": {"requests": 0, "bytes": 0, "blocktime_ns": 0, "blocktime_ns_per_vcpu": [0, 0, 0, 0],
                         "latency_p50_ns": 0, "latency_p99_ns": 0, "latency_max_ns": 0, "latency_hist": [],
                         "switchover_to_complete_ns": 0, "source_only_pages": 0},
        },
        "digests": {"no_migration": DIGEST_A, "end_of_trace": DIGEST_A,
                    "source_at_switchover": "c" * 64, "target_at_switchover": "c" * 64},
        "invariants": {"end_of_trace_equals_no_migration": True, "target_equals_source_at_switchover": True},
    }


def postcopy_metrics(scale: int = 1) -> dict:
    return {
        "postcopy_bytes": 40_000_000 * scale, "postcopy_pages": 9_000 * scale,
        "postcopy": {
            "requests": 800 * scale, "bytes": 3_300_000 * scale, "blocktime_ns": 90_000_000 * scale,
            "blocktime_ns_per_vcpu": [30_000_000 * scale, 20_000_000, 25_000_000, 15_000_000],
            "latency_p50_ns": 60_000, "latency_p99_ns": 400_000 * scale, "latency_max_ns": 900_000 * scale,
            "latency_hist": [
                {"bucket_us_lo": 0, "bucket_us_hi": 50, "count": 300},
                {"bucket_us_lo": 50, "bucket_us_hi": 100, "count": 350 * scale},
                {"bucket_us_lo": 100, "bucket_us_hi": 500, "count": 140},
                {"bucket_us_lo": 500, "bucket_us_hi": 1000, "count": 10 * scale},
            ],
            "switchover_to_complete_ns": 700_000_000 * scale, "source_only_pages": 9_000 * scale,
        },
    }


def merge(base: dict, changes: dict) -> dict:
    """Deep-merge ``changes`` into a copy of ``base`` (dicts merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in changes.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def make_rounds(n: int = 5, scale: int = 1, agents: int = 2, postcopy: bool = False) -> pa.Table:
    rows = {f.name: [] for f in ROUNDS_SCHEMA}
    t = 100_000_000
    pages = 250_000
    for r in range(n):
        last = r == n - 1
        phase = "downtime" if last else "precopy"
        dur = 50_000_000 + pages * 700 * scale
        for k, v in {
            "round": r, "phase": phase, "sync_ns": t, "dirty_pages": pages if r else 262_144,
            "start_ns": t, "end_ns": t + dur, "pages_sent": pages, "zero_pages": pages // 10,
            "private_pages": pages - 1000, "shared_pages": 1000, "bytes_sent": pages * 4120,
            "agents": agents if not last else agents + 1, "agent_cpu_ns": pages * 900,
            "target_cpu_ns": pages * 700, "host_cpu_ns": 1000 * 500, "guest_progress_ns": dur,
        }.items():
            rows[k].append(v)
        t += dur
        pages = max(1000, pages // (3 * scale))
    if postcopy:
        for k, v in {
            "round": n, "phase": "postcopy", "sync_ns": t, "dirty_pages": 0, "start_ns": t,
            "end_ns": t + 700_000_000, "pages_sent": 9_000, "zero_pages": 0, "private_pages": 9_000,
            "shared_pages": 0, "bytes_sent": 9_000 * 4120, "agents": agents, "agent_cpu_ns": 9_000 * 900,
            "target_cpu_ns": 9_000 * 700, "host_cpu_ns": 0, "guest_progress_ns": 600_000_000,
        }.items():
            rows[k].append(v)
    return pa.table(rows, schema=ROUNDS_SCHEMA)


KINDS = ("round_start", "dirty_sync", "send_batch", "agent_spawn", "round_end")


def make_events(n: int = 120, changes: dict[int, dict] | None = None) -> pa.Table:
    rows = {f.name: [] for f in EVENTS_SCHEMA}
    for i in range(n):
        row = {"seq": i, "t_ns": 100_000_000 + i * 1_000_000, "kind": KINDS[i % len(KINDS)],
               "gfn": (i * 7919) % 262_144 if i % 5 == 2 else -1, "vcpu": i % 4 if i % 5 == 3 else -1,
               "detail": f"round={i // 5}"}
        row.update((changes or {}).get(i, {}))
        for k, v in row.items():
            rows[k].append(v)
    return pa.table(rows, schema=EVENTS_SCHEMA)


def make_faults(n: int = 20) -> pa.Table:
    return pa.table(
        {"vcpu": [i % 4 for i in range(n)], "gfn": [1000 + i for i in range(n)], "private": [True] * n,
         "raised_ns": [2_400_000_000 + i * 10_000 for i in range(n)],
         "served_ns": [2_400_000_000 + i * 10_000 + 60_000 for i in range(n)],
         "event_index": list(range(n))},
        schema=FAULTS_SCHEMA,
    )


def make_run(
    path: str | Path,
    *,
    strategy: str = "mirror-vm",
    mode: str = "precopy",
    scenario: dict | None = None,
    metrics: dict | None = None,
    digests: dict | None = None,
    status: str = "completed",
    status_reason: str = "",
    events: int = 120,
    event_changes: dict[int, dict] | None = None,
    rounds: int = 5,
    rounds_scale: int = 1,
    summary_changes: dict | None = None,
) -> Path:
    summary = base_summary(strategy, mode)
    summary["scenario"] = merge(summary["scenario"], {"strategy": {"name": strategy}, "migration": {"mode": mode}})
    postcopy = mode in ("postcopy", "hybrid")
    if postcopy:
        summary["metrics"] = merge(summary["metrics"], postcopy_metrics())
    summary["scenario"] = merge(summary["scenario"], scenario or {})
    summary["metrics"] = merge(summary["metrics"], metrics or {})
    summary["digests"] = merge(summary["digests"], digests or {})
    summary["status"], summary["status_reason"] = status, status_reason
    summary = merge(summary, summary_changes or {})
    return write_run(
        path, summary, make_rounds(rounds, rounds_scale, postcopy=postcopy), make_events(events, event_changes),
        make_faults() if postcopy else None,
    )
