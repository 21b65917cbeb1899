"""Same scenario and trace: byte-identical run directories, across processes with different hash seeds,
and with either engine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _run(tmp: Path, where: str, seed: str) -> None:
    # Each run in its own directory under the same relative name: the report names runs by path.
    (tmp / where).mkdir()
    env = {**os.environ, "PYTHONHASHSEED": seed, "SNP_REPLAY_CACHE": str(tmp / where / "cache"),
           "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "replay.cli", "compare", str(ROOT / "scenarios" / "postcopy-linkfail.toml"),
                    "--out", "run", "--no-progress"], env=env, cwd=tmp / where, stdout=subprocess.DEVNULL)
    assert (tmp / where / "run" / "report.html").exists()  # exit 1 (the link fails for good), records complete


@pytest.mark.slow
def test_byte_identical_across_processes_and_hash_seeds(tmp_path):
    _run(tmp_path, "a", "1")
    _run(tmp_path, "b", "4242")
    a, b = _files(tmp_path / "a" / "run"), _files(tmp_path / "b" / "run")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert "mirror-vm/summary.json" in a and "shadow-vcpu/faults.arrow" in a and "report.html" in a


def test_same_run_twice_in_process_is_identical(tmp_path):
    from test_precopy import tiny_scenario, tiny_trace

    from replay.migration import run

    trace = tiny_trace(tmp_path / "t.arrow")
    r1 = run(tiny_scenario(), strategy="shadow-vcpu", trace_path=trace).write(tmp_path / "r1")
    r2 = run(tiny_scenario(), strategy="shadow-vcpu", trace_path=trace).write(tmp_path / "r2")
    assert _files(r1) == _files(r2)
