"""The answer first: which run wins on each headline metric and by how much, and which metrics say nothing.

Reports (``replay.analysis.report``), ``replay compare``'s table (``replay.commands.compare``) and ``tools/diff``'s
text (``replay.analysis.diff``) open with ``headline_lines``: for each of downtime, guest slowdown, total migration
time and bytes sent (``HEADLINE``; lower is better for every one of them), the run with the lowest value,
its value against the next best, and the difference as an absolute amount and a ratio::

    shadow-vcpu wins on downtime (1.200 ms vs 3.400 ms: 2.200 ms or 2.83x lower)

Only runs that completed compete: an aborted or failed run's short total time is not a win. Equal values
are a tie; a winner whose value is 0 has no ratio (only the absolute difference is given).

``all_blank(values)``: a metric that is zero or absent in every run (post-copy counters of a pre-copy
comparison, data-mode counters in metadata mode) says nothing about the comparison; the tables fold such
rows away and say how many they folded (``folded_line``).

It also holds what the guest's CPU demand was taken to be (``DEMAND_MODELS``, ``demand_text``): every
slowdown figure rests on it, and reports and tables print it beside the slowdown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..core.units import format_bytes, format_ns


def format_ppm(ppm: int) -> str:
    """A slowdown in parts per million, as a percentage with two decimals."""
    return f"{ppm / 10_000:.2f} %"


@dataclass(frozen=True)
class HeadlineMetric:
    key: str  # top-level key of the summary's metrics
    label: str
    fmt: Callable[[int], str]


#: The metrics the answer is about, in the order they are given. Lower is better for each.
HEADLINE = (
    HeadlineMetric("downtime_ns", "downtime", format_ns),
    HeadlineMetric("guest_slowdown_ppm", "guest slowdown", format_ppm),
    HeadlineMetric("total_ns", "total migration time", format_ns),
    HeadlineMetric("bytes_sent", "bytes sent", format_bytes),
)


@dataclass(frozen=True)
class Verdict:
    """One headline metric across the runs: ``values`` per run (None: absent, or the run did not complete);
    ``winner`` and ``runner_up`` index the runs (None: fewer than two runs to compare, or a tie)."""

    metric: HeadlineMetric
    values: tuple[int | None, ...]
    winner: int | None
    runner_up: int | None

    @property
    def margin(self) -> int | None:
        """How much lower the winner's value is than the next best's (same unit as the metric)."""
        if self.winner is None or self.runner_up is None:
            return None
        return self.values[self.runner_up] - self.values[self.winner]  # type: ignore[operator]

    @property
    def ratio(self) -> Fraction | None:
        """Next best / winner (None when the winner's value is 0 or there is no winner)."""
        if self.winner is None or self.runner_up is None or not self.values[self.winner]:
            return None
        return Fraction(self.values[self.runner_up], self.values[self.winner])  # type: ignore[arg-type]

    def sentence(self, names: Sequence[str]) -> str:
        m, f = self.metric, self.metric.fmt
        present = [(i, v) for i, v in enumerate(self.values) if v is not None]
        if self.winner is None:
            if len(present) < 2:
                who = ", ".join(names[i] for i, _ in present) or "no run"
                return f"{m.label}: no comparison ({who} completed with a value)"
            return f"{m.label}: a tie ({f(present[0][1])} each)"
        w, r = self.winner, self.runner_up
        assert r is not None
        ratio = self.ratio
        by = f"{f(self.margin)} or {float(ratio):.2f}x lower" if ratio is not None else f"{f(self.margin)} lower"
        return f"{names[w]} wins on {m.label} ({f(self.values[w])} vs {f(self.values[r])}: {by})"  # type: ignore[arg-type]


def _value(summary: Mapping[str, Any], key: str) -> int | None:
    if summary.get("status") != "completed":
        return None
    v = (summary.get("metrics") or {}).get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def verdicts(summaries: Sequence[Mapping[str, Any]]) -> list[Verdict]:
    """Each headline metric across runs (their summaries, as in summary.json), in ``HEADLINE`` order."""
    out = []
    for m in HEADLINE:
        values = tuple(_value(s, m.key) for s in summaries)
        ranked = sorted((v, i) for i, v in enumerate(values) if v is not None)
        winner = runner_up = None
        if len(ranked) >= 2 and ranked[0][0] < ranked[1][0]:
            winner, runner_up = ranked[0][1], ranked[1][1]
        out.append(Verdict(m, values, winner, runner_up))
    return out


def headline_lines(summaries: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    """One sentence per headline metric (see the module docstring); ``names`` label the runs."""
    return [v.sentence(names) for v in verdicts(summaries)]


def is_blank(value: Any) -> bool:
    """Zero or absent (None): a number that says nothing. False and empty strings are values, not blanks."""
    if value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def all_blank(values: Sequence[Any], absent: object = None) -> bool:
    """True when every run's value is zero or absent (``absent``: the caller's marker for a missing one)."""
    return all(v is absent or is_blank(v) for v in values)


def folded_line(n: int, what: str, how: str) -> str:
    """The one line that replaces ``n`` folded rows; ``how`` says how to show them."""
    s = "" if n == 1 else "s"
    return f"{n} metric{s} zero or absent in {what} folded ({how} shows them)"


DEMAND_MODELS = {
    "trace-idle": "the trace's idle intervals",
    "trace-span": "every vCPU busy until the trace's last event, idle after (the trace records no idle time)",
    "busy": "every vCPU busy at all times",
    "fraction": "a constant fraction of the vCPUs busy until the trace's last event",
}


def demand_text(summary: Mapping[str, Any]) -> str:
    """The demand model a run's slowdown rests on, and its quota (records before it: every vCPU busy)."""
    d = (summary.get("metrics") or {}).get("cpu_demand") or {}
    if not d:
        return "every vCPU busy at all times (older record)"
    return f"{DEMAND_MODELS.get(d.get('model', ''), d.get('model', ''))}; quota {d.get('quota_cpus_milli', 0) / 1000:g} CPUs"
