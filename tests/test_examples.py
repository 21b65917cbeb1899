"""examples/: the bandwidth trade-off script runs as documented and plots the run records' numbers."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "bandwidth_tradeoff.py"


def _module():
    spec = importlib.util.spec_from_file_location("bandwidth_tradeoff", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_tradeoff_script_plots_what_the_run_records_say(tmp_path):
    import polars as pl
    from matplotlib.image import imread

    out = tmp_path / "tradeoff"
    env = {"PYTHONPATH": str(REPO), "SNP_REPLAY_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--gbits", "2.5,25"], capture_output=True,
                       text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert f"wrote {out / 'tradeoff.png'}" in p.stdout

    png = (out / "tradeoff.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    height, width, _ = imread(out / "tradeoff.png").shape
    assert (width, height) == (900, 360)  # 9 x 3.6 inches at 100 dpi

    # The CSV's numbers are the run records' own: read summary.json directly, not through the API.
    rows = list(csv.DictReader((out / "tradeoff.csv").open()))
    assert sorted((r["strategy"], float(r["gbit_s"])) for r in rows) == \
        [("mirror-vm", 2.5), ("mirror-vm", 25.0), ("shadow-vcpu", 2.5), ("shadow-vcpu", 25.0)]
    for r in rows:
        summary = json.loads((out / f"{float(r['gbit_s']):g}" / r["strategy"] / "summary.json").read_text())
        assert summary["scenario"]["migration"]["bandwidth_bytes_per_s"] == round(float(r["gbit_s"]) * 125_000_000)
        for key in ("downtime_ns", "guest_slowdown_ppm", "total_ns", "bytes_sent"):
            assert int(r[key]) == summary["metrics"][key], (r, key)
        assert r["status"] == summary["status"] == "completed"

    # What the figure draws: per strategy, downtime in ms and slowdown in % at each bandwidth.
    df = pl.read_csv(out / "tradeoff.csv")
    fig = _module().plot(df)
    down, slow = fig.axes
    for ax, key, scale in ((down, "downtime_ns", 1e6), (slow, "guest_slowdown_ppm", 1e4)):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"mirror-vm", "shadow-vcpu"}
        for name, line in lines.items():
            part = [r for r in rows if r["strategy"] == name]
            part.sort(key=lambda r: float(r["gbit_s"]))
            assert list(line.get_xdata()) == [float(r["gbit_s"]) for r in part]
            assert list(line.get_ydata()) == pytest.approx([int(r[key]) / scale for r in part], rel=1e-12)
    # the shadow vCPUs' agents run on the busy guest's own vCPUs: more slowdown than the mirror VM's
    shadow = {float(r["gbit_s"]): int(r["guest_slowdown_ppm"]) for r in rows if r["strategy"] == "shadow-vcpu"}
    mirror = {float(r["gbit_s"]): int(r["guest_slowdown_ppm"]) for r in rows if r["strategy"] == "mirror-vm"}
    assert all(shadow[g] > mirror[g] for g in shadow)
