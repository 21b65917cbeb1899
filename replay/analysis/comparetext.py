"""``replay compare``'s text: the answer first (``replay.analysis.headline``), then the two runs' metrics side by
side, rows zero or absent in both folded into one line, then the kernel verdicts, the guest CPU demand the
slowdown rests on, and whether the end-of-trace digests agree. ``replay.api.CompareResult.text()`` gives
the same text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .headline import DEMAND_MODELS, all_blank, folded_line, headline_lines
from ..core.units import format_bytes, format_ns

# (label, path into metrics, formatter)
ROWS = [
    ("status", ("status",), str),
    ("total time", ("metrics", "total_ns"), format_ns),
    ("setup time", ("metrics", "setup_ns"), format_ns),
    ("downtime", ("metrics", "downtime_ns"), format_ns),
    ("guest slowdown (trade-off)", ("metrics", "guest_slowdown_ppm"), lambda v: f"{v / 10_000:.2f} %"),
    ("expected downtime", ("metrics", "expected_downtime_ns"), format_ns),
    ("downtime limit exceeded", ("metrics", "downtime_limit_exceeded"), str),
    ("switchover reason", ("metrics", "switchover_reason"), str),
    ("dirty syncs (rounds)", ("metrics", "rounds"), str),
    ("pages sent", ("metrics", "pages_sent"), str),
    ("zero pages", ("metrics", "zero_pages"), str),
    ("bytes sent", ("metrics", "bytes_sent"), format_bytes),
    ("  pre-copy bytes", ("metrics", "precopy_bytes"), format_bytes),
    ("  downtime bytes", ("metrics", "downtime_bytes"), format_bytes),
    ("  post-copy bytes", ("metrics", "postcopy_bytes"), format_bytes),
    ("agents (max)", ("metrics", "agents_max"), str),
    ("CPU: guest", ("metrics", "cpu_ns", "guest"), format_ns),
    ("CPU: primary-VM agents", ("metrics", "cpu_ns", "primary_vm_agents"), format_ns),
    ("CPU: mirror VM", ("metrics", "cpu_ns", "mirror_vm"), format_ns),
    ("CPU: host", ("metrics", "cpu_ns", "host"), format_ns),
    ("guest CPU demanded (window)", ("metrics", "cpu_demand", "demanded_ns"), format_ns),
    ("host CPUs taken by migration", ("metrics", "cpu_demand", "host_cpus_taken_milli"), lambda v: f"{v / 1000:.2f}"),
    ("RMPUPDATE (target)", ("metrics", "rmp", "target", "rmpupdate"), str),
    ("PVALIDATE (target)", ("metrics", "rmp", "target", "pvalidate"), str),
    ("page-state changes (source)", ("metrics", "rmp", "source", "psc"), str),
]
POSTCOPY_ROWS = [
    ("post-copy requests", ("metrics", "postcopy", "requests"), str),
    ("blocktime (total)", ("metrics", "postcopy", "blocktime_ns"), format_ns),
    ("fault latency p50", ("metrics", "postcopy", "latency_p50_ns"), format_ns),
    ("fault latency p99", ("metrics", "postcopy", "latency_p99_ns"), format_ns),
    ("fault latency max", ("metrics", "postcopy", "latency_max_ns"), format_ns),
    ("switchover -> complete", ("metrics", "postcopy", "switchover_to_complete_ns"), format_ns),
    ("source-only pages", ("metrics", "postcopy", "source_only_pages"), str),
]


DATA_ROWS = [
    ("handshake", ("metrics", "security", "handshake_verdict"), str),
    ("validation token", ("metrics", "security", "token"), str),
    ("page bytes before compression", ("metrics", "security", "source", "payload_bytes"), format_bytes),
    ("page bytes after compression", ("metrics", "security", "source", "compressed_bytes"), format_bytes),
    ("sealed bytes on the wire", ("metrics", "security", "source", "wire_bytes"), format_bytes),
    ("shared pages sent unprotected", ("metrics", "security", "shared_pages_unprotected"), str),
    ("packets accepted by the target", ("metrics", "security", "target", "outcomes", "accepted"), str),
    ("plaintext end == no migration", ("invariants", "plaintext_end_equals_no_migration"), str),
]


MISSING = object()


def _get(summary: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path``, or MISSING: a run refused before any page moved (a failed handshake) has no
    per-host traffic to report."""
    for key in path:
        if not isinstance(summary, dict) or key not in summary:
            return MISSING
        summary = summary[key]
    return summary


def _invariants(s: Mapping[str, Any]) -> str:
    """A failed migration has no end of trace to check: say so rather than "NO"."""
    if s["status"] == "failed":
        return "n/a (failed)"
    explained = (s.get("adversary_effects") or {}).get("explains", [])  # the adversary's, expected
    return "yes" if all(ok or k in explained for k, ok in s["invariants"].items()) else "NO"


def demand_line(summary: Mapping[str, Any]) -> str:
    """What the guest's CPU demand was taken to be: every slowdown figure rests on it."""
    d = summary["metrics"].get("cpu_demand") or {}
    what = DEMAND_MODELS.get(d.get("model", ""), d.get("model", "?"))
    return (f"guest CPU demand: {what}; quota {d.get('quota_cpus_milli', 0) / 1000:g} CPUs "
            f"(guest.cpu_demand = {summary['scenario']['guest'].get('cpu_demand', 'trace')!r})")


def table(summaries: list[dict[str, Any]], all_metrics: bool = False) -> str:
    """The comparison as text: the headline (who wins on downtime, guest slowdown, total time and bytes,
    by how much), then the metrics side by side; rows zero or absent in every run are folded into one line
    unless ``all_metrics``."""
    rows = ROWS + (POSTCOPY_ROWS if summaries[0]["mode"] != "precopy" else [])
    rows += DATA_ROWS if all("data" in s for s in summaries) else []
    head = ["metric"] + [s["strategy"] for s in summaries]
    values = [[_get(s, path) for s in summaries] for _, path, _ in rows]
    faults = [sum(s["metrics"]["faults"].values()) for s in summaries]
    rows = [*rows, ("RMP faults", (), str)]
    values.append(faults)
    keep = [all_metrics or not all_blank(vs, MISSING) for vs in values]
    body = [[label] + ["-" if v is MISSING else fmt(v) for v in vs]
            for (label, _, fmt), vs, k in zip(rows, values, keep) if k]
    body.append(["invariants hold"] + [_invariants(s) for s in summaries])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines[:0] = [*headline_lines(summaries, [s["strategy"] for s in summaries]), ""]
    if keep.count(False):
        lines.append(folded_line(keep.count(False), "every run", "--all-metrics"))
    ends = {s["digests"]["end_of_trace"] for s in summaries}
    for s in summaries:
        lines.append(f"kernel ({s['strategy']}, profile {s['kernel']['profile']}): {s['kernel']['verdict']}")
    lines.append(demand_line(summaries[0]))
    if "" in ends:
        lines.append("end of trace not reached by every run (a failed migration stops the guest)")
    else:
        lines.append(f"end-of-trace digests {'equal' if len(ends) == 1 else 'DIFFER'} across strategies"
                     f" ({sorted(ends)[0][:16]}...)")
    return "\n".join(lines)
