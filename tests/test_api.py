"""The Python API (replay/api.py, docs/api.md): every example of docs/api.md runs, in order, as one session;
the API and the command line share one code path (same run records byte for byte, same exceptions and
messages); results are frozen, typed and read from the run record; ``import replay`` stays cheap."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import replay
from replay.cli import main
from replay.analysis.report import esc
from replay.scenario.spec import load_scenario, scenario_from_doc, scenario_to_doc

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "api.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line, code) of every ```python block, in document order."""
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)]


@pytest.fixture
def session(tmp_path, monkeypatch):
    """docs/api.md's directory: copies of scenarios/ and the CSV it imports, a private trace cache."""
    shutil.copytree(REPO / "scenarios", tmp_path / "scenarios")
    shutil.copy(REPO / "tests" / "data" / "accesses.csv", tmp_path / "accesses.csv")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SNP_REPLAY_CACHE", str(tmp_path / ".cache"))
    return tmp_path


def test_the_extractor_finds_every_block():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == DOC.read_text().count("```python") >= 7
    assert python_blocks("x\n```python\na = 1\n```\n```sh\nno\n```\n```python\nb = 2\n```\n") == [(3, "a = 1\n"), (9, "b = 2\n")]


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed (docs/api.md records `true`)")
def test_every_example_in_docs_api_runs(session, capsys):
    namespace: dict = {"__name__": "docs_api"}
    for line, code in python_blocks(DOC.read_text()):
        try:
            exec(compile(code, f"{DOC}:{line}", "exec"), namespace)
        except Exception as exc:  # name the block that failed
            raise AssertionError(f"docs/api.md block at line {line}: {type(exc).__name__}: {exc}") from exc
    out = capsys.readouterr().out
    assert "wins on downtime" in out and "completed" in out
    assert (session / "runs" / "cmp" / "report.html").is_file() and (session / "sweep.html").is_file()


def test_every_shipped_scenario_survives_the_round_trip_that_overrides_use():
    for path in sorted(glob.glob(str(REPO / "scenarios" / "**" / "*.toml"), recursive=True)):
        if "/sweeps/" in path:
            continue
        s = load_scenario(path)
        assert scenario_from_doc(scenario_to_doc(s), path, s.base_dir) == s, path
    s = load_scenario(REPO / "scenarios" / "quickstart.toml")
    # overriding a built scenario is loading the file with --set
    assert replay.override(s, "migration.mode=hybrid", "guest.vcpus=2") == \
        load_scenario(REPO / "scenarios" / "quickstart.toml", ["migration.mode=hybrid", "guest.vcpus=2"])


@pytest.mark.parametrize("sets", [["migration.mode=sideways"], ["costs.page_header_bytes=-1"], ["nosuch.key=1"],
                                  ["migration.max_rounds=100001"], ["guest"]])
def test_errors_are_the_clis_exceptions_and_messages(sets, capsys):
    quick = REPO / "scenarios" / "quickstart.toml"
    with pytest.raises(replay.ReplayError) as api:
        replay.load_scenario(quick, sets)
    with pytest.raises(type(api.value)) as built:
        replay.override(load_scenario(quick), *sets)
    argv = ["run", str(quick), "--out", "/nonexistent/x"] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"replay: error: {api.value}\n"
    assert str(built.value) == str(api.value).replace(str(quick), "<scenario>")


def test_a_bad_trace_is_the_same_trace_error(tmp_path, capsys):
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"not an arrow file")
    s = load_scenario(REPO / "scenarios" / "quickstart.toml")
    with pytest.raises(replay.TraceError) as api:
        replay.run(s, tmp_path / "out", trace=bad)
    assert main(["run", str(REPO / "scenarios" / "quickstart.toml"), "--out", str(tmp_path / "o2"),
                 "--trace", str(bad)]) == 2
    assert capsys.readouterr().err == f"replay: error: {api.value}\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()


TINY = """name = "tiny"
seed = 3
[guest]
size = "8MiB"
vcpus = 2
[trace]
generator = "hotcold"
events = 10_000
fill = true
[migration]
start_ns = "2ms"
downtime_limit_ns = "1ms"
"""


def test_one_code_path_the_api_and_the_cli_write_the_same_records(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SNP_REPLAY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny.toml").write_text(TINY)
    r = replay.run(tmp_path / "tiny.toml", tmp_path / "api", strategy="shadow-vcpu", overrides=["guest.vcpus=1"])
    assert main(["run", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "cli"), "--strategy", "shadow-vcpu",
                 "--set", "guest.vcpus=1", "--no-progress"]) == 0
    for name in ("summary.json", "rounds.arrow", "events.arrow"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    out = capsys.readouterr().out
    assert out.startswith(f"shadow-vcpu precopy: completed; total {r.metrics['total_ns']} ns, "
                          f"downtime {r.metrics['downtime_ns']} ns")
    # the result is the record read back: frozen, typed, polars tables
    assert r.status is replay.Status.COMPLETED and r.status == "completed" and r.completed
    assert (r.strategy, r.mode, r.path) == ("shadow-vcpu", "precopy", tmp_path / "api")
    import polars as pl

    assert r.rounds["bytes_sent"].sum() == r.metrics["bytes_sent"]  # the tables are the record's
    assert r.events.equals(pl.read_ipc(tmp_path / "api" / "events.arrow"))
    assert r.faults is None  # pre-copy
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.status = replay.Status.FAILED  # type: ignore[misc]
    assert replay.load_run(tmp_path / "cli").metrics == r.metrics
    # a scenario built in Python is the same as its file
    built = replay.make_scenario(scenario_to_doc(load_scenario(tmp_path / "tiny.toml")))
    assert replay.run(built, tmp_path / "built", strategy="shadow-vcpu", overrides=["guest.vcpus=1"]).metrics == r.metrics


def test_compare_result_and_diff_on_results(tmp_path, monkeypatch):
    monkeypatch.setenv("SNP_REPLAY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny.toml").write_text(TINY)
    c = replay.compare(tmp_path / "tiny.toml", tmp_path / "cmp")
    assert c.name == "tiny" and c.completed and c.report == tmp_path / "cmp" / "report.html"
    assert [r.path for r in c.runs] == [tmp_path / "cmp" / "mirror-vm", tmp_path / "cmp" / "shadow-vcpu"]
    with pytest.raises(KeyError, match="no 'x' run"):
        c["x"]
    # the headline is the summaries' own numbers, lower wins
    a, b = (r.metrics["downtime_ns"] for r in c.runs)
    first = c.headline[0]
    if a != b:
        winner = "mirror-vm" if a < b else "shadow-vcpu"
        assert first.startswith(f"{winner} wins on downtime (")
    assert c.text().splitlines()[:4] == c.headline
    d = replay.diff(c["mirror-vm"], tmp_path / "cmp" / "shadow-vcpu")
    assert d.exit_code == 0 and d.a.path == c.runs[0].path
    html = replay.report(c, tmp_path / "r.html").read_text()
    first = c.headline[0].split(" (")[-1]  # the figures; the report names runs strategy/mode
    assert html.index(esc(first)) < html.index("<table>")
    with pytest.raises(replay.UsageError):  # an output inside an input, as the CLI refuses it
        replay.report(c, tmp_path / "cmp" / "mirror-vm" / "r.html")


def test_import_replay_is_cheap_and_exports_all():
    code = ("import sys, replay; mods = sorted(m for m in sys.modules if m.startswith('replay')); print(mods); "
            "heavy = [m for m in ('polars', 'pyarrow', 'numpy', 'dask', 'matplotlib') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.splitlines()
    assert out == ["['replay', 'replay.core', 'replay.core.version']", "[]"]
    for name in replay.__all__:
        assert getattr(replay, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        replay.nope  # noqa: B018


def test_py_typed_ships_with_the_package():
    assert (REPO / "replay" / "py.typed").is_file()
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'"replay" = \[[^\]]*"py\.typed"', text)
