"""Golden replays: every scenario in scenarios/, under every strategy, must reproduce its golden record
exactly (``replay.analysis.diff`` strict mode); the assertion message is the readable diff. Regenerate on purpose
with ``tools/regen-golden`` (see tests/README.md, "Golden replays")."""

from __future__ import annotations

import pytest

import goldenlib
from goldenlib import ERROR_FILE, golden_dir

SCENARIOS = goldenlib.scenarios()
# Skip only while the scenarios directory is empty; once a scenario exists, a missing golden fails.
pytestmark = pytest.mark.skipif(not SCENARIOS, reason="no scenarios yet")
CASES = [(sc, st) for sc in SCENARIOS for st in (goldenlib.strategies() if SCENARIOS else ())]


@pytest.mark.parametrize("scenario, strategy", CASES, ids=[f"{sc.stem}-{st}" for sc, st in CASES])
def test_golden_replay(scenario, strategy, tmp_path):
    from replay.analysis.diff import Outcome, diff_runs, render_text
    from replay.runs.record import load_run

    golden = golden_dir(scenario, strategy)
    if not golden.exists():
        pytest.fail(f"no golden record for {scenario.stem}/{strategy}: run tools/regen-golden {scenario.name}")
    fresh = tmp_path / "run"
    result = goldenlib.run_scenario(scenario, strategy, fresh)
    if (golden / ERROR_FILE).exists():
        expected = (golden / ERROR_FILE).read_text().strip()
        assert (result.rc, result.error_line) == (2, expected), (
            f"{scenario.stem}/{strategy} used to be rejected with {expected!r}; now exit {result.rc}: "
            f"{result.error_line or result.stdout.strip()}"
        )
        return
    assert result.rc in (0, 1), f"replay run exited {result.rc}: {result.error_line}"
    run = load_run(fresh)
    assert result.rc == (0 if run.summary["status"] == "completed" else 1)  # exit 1: did not complete
    _check_invariants(run.summary)
    diff = diff_runs(load_run(golden), run, strict=True)
    if diff.outcome is not Outcome.IDENTICAL:
        pytest.fail(
            f"{scenario.stem}/{strategy} no longer reproduces its golden record "
            f"(A = golden, B = this code). If the change is intended: tools/regen-golden {scenario.name}\n\n"
            + render_text(diff, only_diff=True),
            pytrace=False,
        )


def _check_invariants(summary: dict) -> None:
    """SPEC section 4: a completed run ends where a run without migration ends, and the target held the
    source's memory at switchover; an aborted one lost nothing; a failed one says what only the source has."""
    d, status = summary["digests"], summary["status"]
    if status == "completed":
        assert d["end_of_trace"] == d["no_migration"] != ""
        assert d["target_at_switchover"] == d["source_at_switchover"] != ""
        assert summary["invariants"]["no_faults"]
    elif status in ("aborted", "cancelled"):
        assert d["end_of_trace"] == d["no_migration"] and d["target_at_switchover"] == ""
    else:
        assert status == "failed" and summary["metrics"]["postcopy"]["source_only_pages"] > 0


def test_no_orphan_goldens():
    stale = goldenlib.orphans()
    assert not stale, f"golden records without a scenario/strategy (delete them): {[str(p) for p in stale]}"
