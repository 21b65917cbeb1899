"""Comparison of two run directories: what ``tools/diff`` and ``replay diff`` print and gate on.

``diff_runs(a, b)`` takes two loaded runs (``replay.runs.record.load_run``) and returns a ``DiffResult``:
the resolved parameters that differ, every metric side by side (grouped: time, volume, cpu, security,
postcopy), the rounds of both runs joined on ``round``, the post-copy latency histograms, the digests and
invariants, and -- for two runs of the same scenario and strategy -- the first event where their event
logs diverge. ``render_text`` and ``to_json`` present the same content for people and for machines.

Direction matters: A is "before", B is "after". ``max_regress={"downtime_ns": 10}`` allows B's value to
exceed A's by at most 10 %; a decrease is never a regression (every metric it applies to is one where
bigger is worse).

Outcome (the exit status of ``tools/diff``):

- IDENTICAL (exit 0): same ``end_of_trace`` digest, same status, no ``max_regress`` bound crossed, and no
  metric differs; with ``strict`` the records are identical too: the summaries equal except the ``tool``
  block (which names the producer: version and engine, not behaviour -- so a golden record survives a
  version bump and holds for both engines), and the rounds, events and faults tables equal row for row.
- SAME_END_STATE (exit 0): as IDENTICAL, but metrics differ (two strategies on one trace): the runs are not
  called equivalent; the verdict lists the metrics that differ, largest relative change first.
- DIFFERENT (exit 1): anything else; ``reasons`` lists why, one short line each.
"""

from __future__ import annotations

import difflib
import enum
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import polars as pl

from ..core.errors import UsageError
from .headline import all_blank, folded_line, headline_lines
from ..runs.record import Run

# Metric groups, in display order. A flattened metric name belongs to the first group whose predicate
# accepts it; anything the layout does not know yet lands in "other" rather than being dropped.
GROUPS = ("time", "volume", "cpu", "security", "postcopy", "other")

# Tuples, in the order of docs/internals.md: rows are shown in this order (the most telling first).
_TIME = (
    "total_ns", "setup_ns", "downtime_ns", "expected_downtime_ns", "downtime_limit_exceeded",
    "migration_start_ns", "switchover_ns", "switchover_reason", "completion_ns", "trace_end_ns",
)
_VOLUME = (
    "rounds", "pages_sent", "zero_pages", "bytes_sent", "precopy_bytes", "downtime_bytes", "postcopy_bytes",
    "precopy_pages", "downtime_pages", "postcopy_pages", "private_pages_sent", "shared_pages_sent",
    "vmsas_sent", "device_state_bytes",
)
_CPU = ("guest_slowdown_ppm", "cpu_ns", "agents_max", "agents_created")
_POSTCOPY = (
    "requests", "bytes", "blocktime_ns", "blocktime_ns_per_vcpu", "latency_p50_ns", "latency_p99_ns",
    "latency_max_ns", "switchover_to_complete_ns", "source_only_pages",
)
_ORDER = {name: i for i, name in enumerate(_TIME + _VOLUME + _CPU + ("rmp", "faults") + _POSTCOPY)}

# The histogram is a list of buckets: it gets its own side-by-side section instead of metric rows.
HIST_KEY = "latency_hist"

DIGESTS = ("no_migration", "end_of_trace", "source_at_switchover", "target_at_switchover")
EVENT_COLUMNS = ("t_ns", "kind", "gfn", "vcpu", "detail")
CONTEXT = 3  # events of context either side of the first divergence
ROUND_COLUMNS = ("phase", "pages_sent", "dirty_pages", "bytes_sent", "duration_ns", "agents")


class Outcome(enum.Enum):
    IDENTICAL = "identical"
    SAME_END_STATE = "same end state"
    DIFFERENT = "different"


def metric_group(name: str) -> str:
    """The display group of a flattened metric name (``downtime_ns``, ``rmp.source.psc``...)."""
    head, _, _ = name.partition(".")
    head = head.split("[")[0]
    if head in GROUPS[:-1] and "." in name:  # tolerate metrics stored nested under their group
        return head
    if head in _TIME:
        return "time"
    if head in _VOLUME:
        return "volume"
    if head in _CPU:
        return "cpu"
    if head in ("rmp", "faults"):
        return "security"
    if head == "postcopy":
        return "postcopy"
    return "other"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists element-wise as ``name[i]`` (so per-vCPU values line up)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key in sorted(obj):
            out.update(flatten(obj[key], f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, (list, tuple)):
        if not obj:
            out[prefix] = []
        for i, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


def _metrics_flat(run: Run) -> dict[str, Any]:
    metrics = dict(run.metrics)
    if isinstance(metrics.get("postcopy"), dict):
        metrics["postcopy"] = {k: v for k, v in metrics["postcopy"].items() if k != HIST_KEY}
    return flatten(metrics)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_ABSENT = object()


# --------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class ParamDiff:
    key: str
    a: Any  # _ABSENT when the key exists on one side only
    b: Any


@dataclass(frozen=True)
class MetricRow:
    name: str
    group: str
    a: Any
    b: Any
    delta: int | None  # b - a, for numbers
    ratio_ppm: int | None  # b / a in parts per million (None: not numeric or a == 0)
    change: str  # "+5.30%", "=", "n/a" -- human form of the ratio

    @property
    def differs(self) -> bool:
        return self.a != self.b


@dataclass(frozen=True)
class Regression:
    metric: str
    limit_pct: int | float
    a: Any
    b: Any
    change: str
    crossed: bool


@dataclass(frozen=True)
class DigestRow:
    name: str
    a: str
    b: str

    @property
    def match(self) -> bool:
        return self.a == self.b


@dataclass(frozen=True)
class Divergence:
    index: int  # position in seq order of the first differing event
    seq_a: int | None  # its seq in A (None: A's log ended before)
    seq_b: int | None
    context_a: list[dict]  # rows around index, each with "index"
    context_b: list[dict]
    events_a: int
    events_b: int


@dataclass
class DiffResult:
    a: Run
    b: Run
    outcome: Outcome
    reasons: list[str]
    params: list[ParamDiff]
    same_scenario: bool
    metrics: list[MetricRow]
    rounds: pl.DataFrame  # round, <col>_a, <col>_b for ROUND_COLUMNS, differs
    histogram: pl.DataFrame | None  # bucket_us_lo, bucket_us_hi, count_a, count_b (post-copy only)
    digests: list[DigestRow]
    invariants: dict[str, tuple[Any, Any]]
    divergence: Divergence | None
    regressions: list[Regression] = field(default_factory=list)
    strict: bool = False
    strict_diffs: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.outcome is Outcome.DIFFERENT else 0

    def verdict(self) -> str:
        """One line for stderr: the outcome and why."""
        if self.outcome is Outcome.DIFFERENT:
            return f"diff: different: {'; '.join(self.reasons)}"
        notes = ["end_of_trace digests match"]
        if self.regressions:
            notes.append(f"{len(self.regressions)} --max-regress bound(s) held")
        if self.strict:
            notes.append("records identical")
        if self.outcome is Outcome.IDENTICAL:
            return f"diff: identical: {', '.join(notes)}"
        rows = self.differing_metrics()
        shown = ", ".join(f"{r.name} {r.change}" for r in rows[:5]) + (f" (+{len(rows) - 5} more)" if len(rows) > 5 else "")
        return f"diff: same end state ({', '.join(notes)}); {len(rows)} metric(s) differ, largest first: {shown}"

    def differing_metrics(self) -> list[MetricRow]:
        """Metrics whose values differ, largest relative change first (new or non-numeric ones first)."""
        def size(r: MetricRow):
            if r.ratio_ppm is None:
                return (0, 0, r.name)
            return (1, -abs(r.ratio_ppm - 1_000_000), r.name)

        return sorted((r for r in self.metrics if r.differs), key=size)


# ------------------------------------------------------------------------------------------- analysis


def _ratio(a: Any, b: Any) -> tuple[int | None, int | None, str]:
    if not (_is_number(a) and _is_number(b)):
        return None, None, "=" if a == b else "n/a"
    delta = b - a
    if a == 0:
        return delta, None, "=" if b == 0 else "new"
    ratio = Fraction(b) / Fraction(a)
    ppm = round(ratio * 1_000_000)
    pct = (ratio - 1) * 100
    return delta, ppm, "=" if delta == 0 else f"{float(pct):+.2f}%"


def metric_rows(a: Run, b: Run) -> list[MetricRow]:
    fa, fb = _metrics_flat(a), _metrics_flat(b)
    names = sorted(set(fa) | set(fb), key=_metric_order)
    rows = []
    for name in names:
        va, vb = fa.get(name, _ABSENT), fb.get(name, _ABSENT)
        delta, ppm, change = _ratio(va, vb) if _ABSENT not in (va, vb) else (None, None, "absent")
        rows.append(MetricRow(name, metric_group(name), va, vb, delta, ppm, change))
    return rows


def _metric_order(name: str) -> tuple:
    group = metric_group(name)
    parts = name.split(".")
    key = parts[1] if group == "postcopy" and len(parts) > 1 else parts[0]
    key = key.split("[")[0]
    return (GROUPS.index(group), _ORDER.get(key, len(_ORDER)), _natural(name))


def _natural(name: str) -> tuple:
    # Keep list elements in numeric order: blocktime_ns_per_vcpu[2] before [10].
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def numeric_metric_names(*runs: Run) -> set[str]:
    names: set[str] = set()
    for run in runs:
        names |= {k for k, v in _metrics_flat(run).items() if _is_number(v)}
    return names


def check_max_regress(a: Run, b: Run, max_regress: dict[str, int | float]) -> list[Regression]:
    """Evaluate each bound; an unknown or non-numeric metric is a UsageError with a did-you-mean hint."""
    known = numeric_metric_names(a, b)
    fa, fb = _metrics_flat(a), _metrics_flat(b)
    out = []
    for metric, pct in max_regress.items():
        if metric not in known:
            hint = difflib.get_close_matches(metric, sorted(known), n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise UsageError(f"--max-regress: unknown metric {metric!r}{extra}")
        if not _is_number(pct) or pct < 0:
            raise UsageError(f"--max-regress {metric}: percentage must be a number >= 0, got {pct!r}")
        va, vb = fa.get(metric), fb.get(metric)
        if not (_is_number(va) and _is_number(vb)):
            out.append(Regression(metric, pct, va, vb, "absent", True))
            continue
        # Exact arithmetic: B <= A * (1 + pct/100). Decimal string so 10.1 means 10.1, not its binary float.
        limit = Fraction(va) * (1 + Fraction(repr(pct)) / 100)
        _, _, change = _ratio(va, vb)
        out.append(Regression(metric, pct, va, vb, change, Fraction(vb) > limit))
    return out


def param_diffs(a: Run, b: Run) -> list[ParamDiff]:
    def params(run: Run) -> dict[str, Any]:
        flat = {"run.strategy": run.summary["strategy"], "run.mode": run.summary["mode"]}
        flat.update(flatten(run.summary["scenario"]))
        return flat

    pa_, pb = params(a), params(b)
    return [
        ParamDiff(k, pa_.get(k, _ABSENT), pb.get(k, _ABSENT))
        for k in sorted(set(pa_) | set(pb), key=_natural)
        if pa_.get(k, _ABSENT) != pb.get(k, _ABSENT)
    ]


def join_rounds(a: Run, b: Run) -> pl.DataFrame:
    """Rounds of A and B side by side (outer join on ``round``), with a ``differs`` flag per row."""

    def side(run: Run, suffix: str) -> pl.DataFrame:
        df = run.rounds.with_columns(
            (pl.col("end_ns").cast(pl.Int64) - pl.col("start_ns").cast(pl.Int64)).alias("duration_ns")
        )
        return df.select(
            pl.col("round").cast(pl.Int64),
            *[pl.col(c).alias(f"{c}_{suffix}") for c in ROUND_COLUMNS],
        )

    joined = side(a, "a").join(side(b, "b"), on="round", how="full", coalesce=True).sort("round")
    differs = pl.any_horizontal([pl.col(f"{c}_a").ne_missing(pl.col(f"{c}_b")) for c in ROUND_COLUMNS])
    return joined.with_columns(differs.alias("differs"))


def join_histograms(a: Run, b: Run) -> pl.DataFrame | None:
    """Post-copy fault-latency histograms side by side; None when neither run has one."""

    def hist(run: Run, suffix: str) -> pl.DataFrame:
        buckets = (run.metrics.get("postcopy") or {}).get(HIST_KEY) or []
        return pl.DataFrame(
            {
                "bucket_us_lo": [int(x["bucket_us_lo"]) for x in buckets],
                "bucket_us_hi": [int(x["bucket_us_hi"]) for x in buckets],
                f"count_{suffix}": [int(x["count"]) for x in buckets],
            },
            schema={"bucket_us_lo": pl.Int64, "bucket_us_hi": pl.Int64, f"count_{suffix}": pl.Int64},
        )

    ha, hb = hist(a, "a"), hist(b, "b")
    if ha.height == 0 and hb.height == 0:
        return None
    keys = ["bucket_us_lo", "bucket_us_hi"]
    return (
        ha.join(hb, on=keys, how="full", coalesce=True)
        .with_columns(pl.col("count_a").fill_null(0), pl.col("count_b").fill_null(0))
        .sort(keys)
    )


def _event_rows(df: pl.DataFrame, lo: int, hi: int) -> list[dict]:
    part = df.slice(lo, max(0, hi - lo)).with_row_index("index", offset=lo)
    return [{k: (int(v) if k == "index" else v) for k, v in row.items()} for row in part.to_dicts()]


def find_divergence(a: Run, b: Run, context: int = CONTEXT) -> Divergence | None:
    """First position (in seq order) where the event logs differ on (t_ns, kind, gfn, vcpu, detail)."""
    ea, eb = a.events.sort("seq"), b.events.sort("seq")
    n = min(ea.height, eb.height)
    cols = list(EVENT_COLUMNS)
    mask = pl.DataFrame(
        {c: ea[c].head(n).ne_missing(eb[c].head(n)) for c in cols}
    ).select(pl.any_horizontal(cols).alias("d"))["d"] if n else pl.Series("d", [], pl.Boolean)
    hits = mask.arg_true()
    if hits.len():
        index = int(hits[0])
    elif ea.height != eb.height:
        index = n  # one log is a prefix of the other: it diverges where the shorter one ends
    else:
        return None
    lo, hi = max(0, index - context), index + context + 1

    def seq(df: pl.DataFrame) -> int | None:
        return int(df["seq"][index]) if index < df.height else None

    return Divergence(
        index, seq(ea), seq(eb), _event_rows(ea, lo, hi), _event_rows(eb, lo, hi), ea.height, eb.height
    )


def _first_row_diff(x: pl.DataFrame, y: pl.DataFrame) -> str:
    if x.columns != y.columns:
        return "columns differ"
    n = min(x.height, y.height)
    if n:
        mask = pl.DataFrame({c: x[c].head(n).ne_missing(y[c].head(n)) for c in x.columns})
        hits = mask.select(pl.any_horizontal(x.columns).alias("d"))["d"].arg_true()
        if hits.len():
            return f"first at row {int(hits[0])}"
    return f"{x.height} vs {y.height} rows"


_NOT_COMPARED = ("tool", "tables", "record_digest")


def strict_differences(a: Run, b: Run, divergence: Divergence | None) -> list[str]:
    """Why two runs' records are not identical (the ``tool`` block is not compared; see module doc). The
    integrity keys (``tables``, ``record_digest``) restate the tables, compared row by row below, and the
    rest of the summary, tool block included, so they are not compared either."""
    out = []
    sa = flatten({k: v for k, v in a.summary.items() if k not in _NOT_COMPARED})
    sb = flatten({k: v for k, v in b.summary.items() if k not in _NOT_COMPARED})
    keys = [k for k in sorted(set(sa) | set(sb), key=_natural) if sa.get(k, _ABSENT) != sb.get(k, _ABSENT)]
    if keys:
        shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        out.append(f"summary.json differs at {len(keys)} key(s): {shown}")
    if not a.rounds.equals(b.rounds):
        out.append(f"rounds.arrow differs ({_first_row_diff(a.rounds, b.rounds)})")
    if not a.events.equals(b.events):
        where = f"first divergence at event #{divergence.index}" if divergence else _first_row_diff(a.events, b.events)
        out.append(f"events.arrow differs ({where})")
    if (a.faults is None) != (b.faults is None):
        out.append(f"faults.arrow present in {'A' if a.faults is not None else 'B'} only")
    elif a.faults is not None and not a.faults.equals(b.faults):
        out.append(f"faults.arrow differs ({_first_row_diff(a.faults, b.faults)})")
    return out


def diff_runs(
    a: Run,
    b: Run,
    *,
    strict: bool = False,
    max_regress: dict[str, int | float] | None = None,
) -> DiffResult:
    """Compare run A ("before") with run B ("after"). See the module docstring for the outcome rules."""
    regressions = check_max_regress(a, b, max_regress or {})
    params = param_diffs(a, b)
    same_scenario = not params
    digests = [
        DigestRow(name, str(a.summary["digests"].get(name, "")), str(b.summary["digests"].get(name, "")))
        for name in DIGESTS
    ]
    inv_a, inv_b = a.summary.get("invariants", {}) or {}, b.summary.get("invariants", {}) or {}
    invariants = {k: (inv_a.get(k, _ABSENT), inv_b.get(k, _ABSENT)) for k in sorted(set(inv_a) | set(inv_b))}
    divergence = find_divergence(a, b) if (same_scenario or strict) else None

    reasons = []
    eot = next(d for d in digests if d.name == "end_of_trace")
    if not eot.match:
        reasons.append(f"end_of_trace digest differs ({_short(eot.a)} vs {_short(eot.b)})")
    if a.summary["status"] != b.summary["status"]:
        reasons.append(f"status differs ({a.summary['status']} vs {b.summary['status']})")
    for r in regressions:
        if r.crossed:
            reasons.append(f"{r.metric} regressed {r.change} (allowed +{r.limit_pct}%)")
    strict_diffs = strict_differences(a, b, divergence) if strict else []
    reasons.extend(strict_diffs)
    metrics = metric_rows(a, b)

    return DiffResult(
        a=a,
        b=b,
        outcome=Outcome.DIFFERENT if reasons else Outcome.SAME_END_STATE if any(r.differs for r in metrics)
        else Outcome.IDENTICAL,
        reasons=reasons,
        params=params,
        same_scenario=same_scenario,
        metrics=metrics,
        rounds=join_rounds(a, b),
        histogram=join_histograms(a, b),
        digests=digests,
        invariants=invariants,
        divergence=divergence,
        regressions=regressions,
        strict=strict,
        strict_diffs=strict_diffs,
    )


# ------------------------------------------------------------------------------------------ rendering


def _short(digest: str) -> str:
    return digest[:12] if digest else "(not reached)"


def fmt(v: Any) -> str:
    """Human form of one value: thousands separators for integers, JSON-like for the rest."""
    if v is _ABSENT:
        return "(absent)"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.6g}"
    if isinstance(v, str):
        return v if v else '""'
    return str(v)


def _fmt_delta(d: int | None) -> str:
    return "" if d is None else ("0" if d == 0 else f"{d:+,}")


def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset(), indent: str = "  ") -> list[str]:
    """Aligned plain-text columns; ``right`` holds indices of right-aligned (numeric) columns."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return (indent + "  ".join(parts)).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def render_text(result: DiffResult, *, only_diff: bool = False, all_metrics: bool = False) -> str:
    """The readable comparison, the answer first: the outcome, then who wins on each headline metric and
    by how much (``replay.analysis.headline``). Rows that differ are marked ``*`` (``only_diff`` hides equal rows);
    metrics zero or absent in both runs are folded into one line unless ``all_metrics``."""
    a, b = result.a, result.b
    out: list[str] = []

    def run_line(tag: str, run: Run) -> str:
        s = run.summary
        reason = f" ({s.get('status_reason')})" if s.get("status_reason") else ""
        return f"{tag}: {run.path}  [{run.name}, {s['status']}{reason}]"

    out += [run_line("A", a), run_line("B", b)]
    ta, tb = a.summary["trace"].get("digest", ""), b.summary["trace"].get("digest", "")
    same_trace = "same trace" if ta == tb else "DIFFERENT traces"
    out.append(f"   trace {_short(ta)} / {_short(tb)}: {same_trace}")
    out.append("")
    out.append(f"Outcome: {result.outcome.value.upper()}")
    for r in result.reasons:
        out.append(f"  - {r}")
    out += ["  " + line for line in headline_lines([a.summary, b.summary], [f"A ({a.name})", f"B ({b.name})"])]
    out.append("")

    # Parameters
    if result.params:
        out.append(f"Parameters: {len(result.params)} differ")
        out += table(["parameter", "A", "B"], [[p.key, fmt(p.a), fmt(p.b)] for p in result.params])
    else:
        out.append("Parameters: identical (same scenario and strategy)")
    out.append("")

    # Metrics
    ndiff = sum(r.differs for r in result.metrics)
    out.append(f"Metrics ({ndiff} of {len(result.metrics)} differ; change = B vs A)")
    rows = []
    folded = 0 if all_metrics else sum(all_blank([r.a, r.b], _ABSENT) for r in result.metrics)
    for group in GROUPS:
        members = [r for r in result.metrics if r.group == group and (r.differs or not only_diff)
                   and (all_metrics or not all_blank([r.a, r.b], _ABSENT))]
        if not members:
            continue
        rows.append([f"[{group}]", "", "", "", "", ""])
        for r in members:
            rows.append(["  " + r.name, fmt(r.a), fmt(r.b), _fmt_delta(r.delta), r.change, "*" if r.differs else ""])
    if rows:
        out += table(["metric", "A", "B", "delta", "change", ""], rows, right={1, 2, 3, 4})
    else:
        out.append("  (all equal)")
    if folded:
        out.append("  " + folded_line(folded, "both runs", "--all-metrics"))
    out.append("")

    if result.regressions:
        out.append("Regression bounds (B may exceed A by at most the limit)")
        out += table(
            ["metric", "A", "B", "change", "limit", "result"],
            [
                [r.metric, fmt(r.a), fmt(r.b), r.change, f"+{r.limit_pct}%", "CROSSED" if r.crossed else "ok"]
                for r in result.regressions
            ],
            right={1, 2, 3, 4},
        )
        out.append("")

    # Rounds
    rdf = result.rounds.filter(pl.col("differs")) if only_diff else result.rounds
    out.append(f"Rounds (A {a.rounds.height}, B {b.rounds.height}; {int(result.rounds['differs'].sum())} differ)")
    if rdf.height:
        headers = ["round", "phase A", "phase B", "pages A", "pages B", "dirty A", "dirty B",
                   "bytes A", "bytes B", "duration_ns A", "duration_ns B", ""]
        body = [
            [
                str(row["round"]),
                fmt(row["phase_a"]) if row["phase_a"] is not None else "-",
                fmt(row["phase_b"]) if row["phase_b"] is not None else "-",
                *[
                    fmt(row[f"{c}_{s}"]) if row[f"{c}_{s}"] is not None else "-"
                    for c in ("pages_sent", "dirty_pages", "bytes_sent", "duration_ns")
                    for s in ("a", "b")
                ],
                "*" if row["differs"] else "",
            ]
            for row in rdf.iter_rows(named=True)
        ]
        out += table(headers, body, right=set(range(3, 11)))
    out.append("")

    if result.histogram is not None:
        h = result.histogram
        out.append("Post-copy fault latency histogram (count per bucket)")
        out += table(
            ["bucket_us", "A", "B", ""],
            [
                [f"[{r['bucket_us_lo']:,}, {r['bucket_us_hi']:,})", fmt(r["count_a"]), fmt(r["count_b"]),
                 "*" if r["count_a"] != r["count_b"] else ""]
                for r in h.iter_rows(named=True)
                if not only_diff or r["count_a"] != r["count_b"]
            ],
            right={1, 2},
        )
        out.append("")

    out.append("Digests")
    out += table(
        ["digest", "A", "B", "match"],
        # 16 hex digits are plenty for a person to compare; --json carries the full digests.
        [[d.name, d.a[:16] or "(not reached)", d.b[:16] or "(not reached)", "yes" if d.match else "NO"]
         for d in result.digests],
    )
    out.append("")
    if result.invariants:
        out.append("Invariants")
        out += table(["invariant", "A", "B"], [[k, fmt(x), fmt(y)] for k, (x, y) in result.invariants.items()])
        out.append("")

    if result.same_scenario or result.strict:
        d = result.divergence
        if d is None:
            out.append(f"Event logs: identical ({a.events.height} events)")
        else:
            out.append(
                f"Event logs: first divergence at event #{d.index} "
                f"(A seq {fmt(d.seq_a) if d.seq_a is not None else 'end'}, "
                f"B seq {fmt(d.seq_b) if d.seq_b is not None else 'end'}; A {d.events_a} events, B {d.events_b})"
            )
            for tag, ctx in (("A", d.context_a), ("B", d.context_b)):
                out.append(f"  {tag}:")
                body = [
                    [">" if e["index"] == d.index else "", f"#{e['index']}", fmt(e["t_ns"]), e["kind"],
                     str(e["gfn"]), str(e["vcpu"]), e["detail"]]
                    for e in ctx
                ]
                if not any(e["index"] == d.index for e in ctx):
                    body.append([">", f"#{d.index}", "(end of log)", "", "", "", ""])
                out += table(["", "event", "t_ns", "kind", "gfn", "vcpu", "detail"], body, right={2, 4, 5}, indent="    ")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _jsonable(v: Any) -> Any:
    if v is _ABSENT:
        return None
    if isinstance(v, float):
        return repr(v)  # canonical_json rejects floats; records never hold them anyway
    return v


def to_json(result: DiffResult) -> dict:
    """The same content as ``render_text``, as a dict ``replay.core.records.canonical_json`` accepts.

    Ratios are integers in ppm (``ratio_ppm``, null when A is 0 or the value is not numeric); absent values
    are null with ``present_a``/``present_b`` telling them apart from a stored null.
    """
    a, b = result.a, result.b

    def run_info(run: Run) -> dict:
        s = run.summary
        return {
            "path": str(run.path), "strategy": s["strategy"], "mode": s["mode"], "status": s["status"],
            "status_reason": s.get("status_reason", ""), "trace_digest": s["trace"].get("digest", ""),
            "events": run.events.height, "rounds": run.rounds.height,
        }

    def rows(df: pl.DataFrame) -> list[dict]:
        return [{k: _jsonable(v) for k, v in r.items()} for r in df.to_dicts()]

    d = result.divergence
    return {
        "format": "snp-replay-diff",
        "version": 1,
        "outcome": result.outcome.value,
        "exit_code": result.exit_code,
        "reasons": result.reasons,
        "strict": result.strict,
        "strict_differences": result.strict_diffs,
        "a": run_info(a),
        "b": run_info(b),
        "same_scenario": result.same_scenario,
        "params": [{"key": p.key, "a": _jsonable(p.a), "b": _jsonable(p.b),
                    "present_a": p.a is not _ABSENT, "present_b": p.b is not _ABSENT} for p in result.params],
        "metrics": [
            {"name": r.name, "group": r.group, "a": _jsonable(r.a), "b": _jsonable(r.b), "delta": r.delta,
             "ratio_ppm": r.ratio_ppm, "change": r.change, "differs": r.differs}
            for r in result.metrics
        ],
        "regressions": [
            {"metric": r.metric, "limit_pct": _jsonable(r.limit_pct), "a": _jsonable(r.a), "b": _jsonable(r.b),
             "change": r.change, "crossed": r.crossed}
            for r in result.regressions
        ],
        "rounds": rows(result.rounds),
        "latency_hist": rows(result.histogram) if result.histogram is not None else None,
        "digests": [{"name": x.name, "a": x.a, "b": x.b, "match": x.match} for x in result.digests],
        "invariants": {k: {"a": _jsonable(x), "b": _jsonable(y)} for k, (x, y) in result.invariants.items()},
        "divergence": None if d is None else {
            "index": d.index, "seq_a": d.seq_a, "seq_b": d.seq_b, "events_a": d.events_a, "events_b": d.events_b,
            "context_a": d.context_a, "context_b": d.context_b,
        },
    }
