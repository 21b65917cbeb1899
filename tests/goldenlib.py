"""Golden replays: run each scenario in ``scenarios/`` under each strategy and keep the run record.

Shared by ``tests/test_golden.py`` (compares a fresh run with the golden one using ``replay.analysis.diff`` in strict
mode) and ``tools/regen-golden`` (rewrites the goldens on purpose). Layout::

    tests/golden/<scenario-stem>/<strategy>/   a complete run directory (summary.json + *.arrow), or
    tests/golden/<scenario-stem>/<strategy>/expected-error.txt   when `replay run` rejects that pairing
                                                                 (exit 2; the file holds its one-line error)

Full run directories rather than summary.json alone: they are small, and with the event log a change in
behaviour is reported as "first divergence at event #N" with context, not only as changed totals.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = REPO / "scenarios"
GOLDEN = REPO / "tests" / "golden"
ERROR_FILE = "expected-error.txt"
SIZE_WARN = 256_000  # bytes per golden run directory (post-copy fault tables dominate); above this, shrink the scenario


def scenarios() -> list[Path]:
    return sorted(SCENARIOS.glob("*.toml"))


def strategies() -> tuple[str, ...]:
    from replay.scenario.spec import STRATEGIES

    return tuple(STRATEGIES)


def golden_dir(scenario: Path, strategy: str) -> Path:
    return GOLDEN / scenario.stem / strategy


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        return self.stderr.strip().splitlines()[-1] if self.stderr.strip() else ""


def run_scenario(scenario: Path, strategy: str, out: Path) -> Outcome:
    """`replay run SCENARIO --out OUT --strategy S`, in process (as CI would run it, minus the fork)."""
    from replay.cli import main

    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = main(["run", str(scenario), "--out", str(out), "--strategy", strategy, "--no-progress"])
    # The error line names the output path, which differs between a temp dir and the golden dir.
    return Outcome(rc, so.getvalue(), se.getvalue().replace(str(out), "<OUT>"))


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def regenerate(scenario: Path, strategy: str) -> str:
    """Rewrite one golden; returns a one-line description. Raises RuntimeError when the run is a bug."""
    dest = golden_dir(scenario, strategy)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    result = run_scenario(scenario, strategy, dest)
    if result.rc in (0, 1):  # 1: the migration did not complete (aborted, cancelled, failed): still a record
        size = dir_size(dest)
        warn = f"  (WARNING: over {SIZE_WARN:,} bytes; make the scenario smaller)" if size > SIZE_WARN else ""
        return f"{scenario.stem}/{strategy}: run directory, {size:,} bytes{warn}"
    if result.rc == 2:
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        (dest / ERROR_FILE).write_text(result.error_line + "\n")
        return f"{scenario.stem}/{strategy}: expected error: {result.error_line}"
    raise RuntimeError(f"{scenario.stem}/{strategy}: replay run exited {result.rc}: {result.error_line}")


def orphans() -> list[Path]:
    """Golden directories whose scenario or strategy no longer exists."""
    stems = {s.stem for s in scenarios()}
    out = []
    for d in sorted(GOLDEN.glob("*/")) if GOLDEN.exists() else []:
        if d.name not in stems:
            out.append(d)
            continue
        out += [s for s in sorted(d.glob("*/")) if s.name not in strategies()]
    return out
