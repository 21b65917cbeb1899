"""`replay report` / write_report: one self-contained, deterministic HTML file with the expected sections
and plots; rendered in headless Chromium when it is installed (Debian package `chromium`)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from replay.cli import main
from replay.analysis.report import render_html, write_report
from replay.runs.record import load_run
from runfixtures import make_run, postcopy_metrics

REPO = Path(__file__).resolve().parent.parent


class Structure(HTMLParser):
    """Collects what the tests check: section ids, figures, details, images, links, scripts, ids."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections, self.ids, self.imgs, self.external = [], [], [], []
        self.counts: dict[str, int] = {}
        self.figcaptions: list[str] = []
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag == "section":
            self.sections.append(a.get("id"))
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.external.append(tag)
        for k in ("src", "href", "xlink:href"):
            v = a.get(k) or ""
            if v and not v.startswith(("#", "data:")):
                self.external.append(f"{tag} {k}={v}")
        if tag == "figcaption":
            self._in_caption = True

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data):
        if self._in_caption:
            self.figcaptions.append(data)


@pytest.fixture
def runs(tmp_path):
    a = make_run(tmp_path / "mirror", mode="postcopy")
    b = make_run(tmp_path / "shadow", mode="postcopy", strategy="shadow-vcpu", metrics=postcopy_metrics(2),
                 rounds=6, rounds_scale=2, summary_changes={"metrics": {"guest_slowdown_ppm": 48_000}})
    return [load_run(a), load_run(b)]


def check_structure(text: str, figures: int) -> Structure:
    s = Structure()
    s.feed(text)
    s.close()
    assert text.startswith("<!DOCTYPE html>")
    assert s.sections == ["summary", "plots", "metrics", "runs"]
    assert s.counts.get("figure") == figures and s.counts.get("svg") == figures
    assert not s.external, s.external  # self-contained: nothing to fetch
    assert len(s.ids) == len(set(s.ids)), "duplicate ids between inline SVGs"
    for src in s.imgs:  # none today (SVG is inline), but any image must be an inline, valid PNG
        m = re.fullmatch(r"data:image/png;base64,(.+)", src)
        assert m and base64.b64decode(m.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    svgs = re.findall(r"<svg\b.*?</svg>", text, flags=re.S)
    assert len(svgs) == figures
    for svg in svgs:
        root = ET.fromstring(svg)  # well-formed XML
        assert root.tag.endswith("svg") and len(root) > 0
        assert re.search(r"<path\b", svg)
    return s


def test_report_sections_and_plots(runs, tmp_path):
    out = write_report(runs, tmp_path / "sub" / "report.html")
    text = out.read_text()
    s = check_structure(text, figures=5)
    caps = " ".join(s.figcaptions)
    for words in ("Pages sent", "Cumulative bytes", "agents", "Guest slowdown", "fault latency"):
        assert words.lower() in caps.lower()
    assert s.counts["details"] == 3  # effective parameters per run, and the folded metrics: collapsible
    assert "mirror-vm/postcopy" in text and "shadow-vcpu/postcopy" in text
    assert "guest_slowdown_ppm" in text and "+300.00%" in text  # 12,000 -> 48,000 ppm
    assert 'class="differs"' in text
    assert "end_of_trace" in text and "a" * 64 in text  # digests in full
    assert "migration.bandwidth_bytes_per_s" in text and "1,250,000,000" in text
    assert oct(out.stat().st_mode & 0o777) != "0o600"  # shareable, not a private temp file's mode


def test_report_precopy_only_has_no_latency_plot_and_single_run(tmp_path):
    run = load_run(make_run(tmp_path / "one"))
    text = render_html([run])
    check_structure(text, figures=4)
    assert "fault latency" not in text
    assert "Comparison" not in text  # a verdict only makes sense for two runs


def test_same_strategy_runs_get_distinct_labels(tmp_path):
    a, b = load_run(make_run(tmp_path / "before")), load_run(make_run(tmp_path / "after"))
    text = render_html([a, b])
    assert "mirror-vm/precopy (before)" in text and "mirror-vm/precopy (after)" in text


def test_report_is_byte_identical_across_processes(tmp_path):
    a = make_run(tmp_path / "a", mode="postcopy")
    b = make_run(tmp_path / "b", mode="hybrid", strategy="shadow-vcpu")
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"r{seed}.html"
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        p = subprocess.run([sys.executable, "-m", "replay.cli", "report", str(a), str(b), "--out", str(out)],
                           capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert b"Date" not in outs[0] and b"<dc:date>" not in outs[0]


def test_report_cli_and_bad_input(capsys, tmp_path):
    a = make_run(tmp_path / "a")
    assert main(["report", str(a), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").exists()
    capsys.readouterr()
    rc = main(["report", str(a), str(tmp_path / "missing"), "--out", str(tmp_path / "x.html")])
    _, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and "not a run directory" in err
    assert not (tmp_path / "x.html").exists()
    rc = main(["report", str(a)])  # --out is required
    assert rc == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package: chromium)")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    from matplotlib.image import imread

    out = write_report(runs, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    p = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
         out.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0 and shot.exists(), p.stderr[-2000:]
    img = imread(shot)[:, :, :3]
    assert img.shape[:2] == (2000, 1280)
    nonwhite = (img < 0.95).any(axis=2).mean()
    colours = len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    # A blank or error page is nearly all white with a handful of colours; the report has text, tables
    # and plots in the run colours (blue #0072B2 and vermillion #D55E00).
    assert nonwhite > 0.05, nonwhite
    assert colours > 100, colours
    px = (img * 255).astype(int).reshape(-1, 3)
    for rgb in ((0x00, 0x72, 0xB2), (0xD5, 0x5E, 0x00)):
        assert (np.abs(px - rgb).sum(axis=1) < 30).sum() > 500, rgb
