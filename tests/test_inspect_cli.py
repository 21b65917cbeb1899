"""`inspect_trace` against a brute-force reference, and the `replay gen` / `replay inspect` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from replay import cli
from replay.core.errors import UsageError
from replay.traces.inspect import inspect_trace, nice_interval
from replay.traces.format import COLUMNS, TraceWriter, read_meta

MiB = 1 << 20


def make(path, n=5000, seed=0, batch_rows=700):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, 10**7, n, dtype=np.uint64))
    gpa = rng.integers(0, MiB - 9000, n, dtype=np.uint64)
    ln = rng.choice(np.array([1, 8, 4096, 9000], dtype=np.uint32), n)
    op = rng.choice(np.array([0, 0, 0, 1, 2, 3], dtype=np.uint8), n)
    c = dict(t_ns=t, vcpu=np.zeros(n, np.uint16), gpa=gpa, len=ln, op=op, value=np.zeros(n, np.uint64))
    with TraceWriter(path, guest_bytes=MiB, vcpus=1, source={"k": "test"}, batch_rows=batch_rows) as w:
        w.write(*(c[k] for k in COLUMNS))
    return c


def reference(c, interval):
    t0 = int(c["t_ns"][0])
    span = int(c["t_ns"][-1]) - t0
    nb = span // interval + 1
    writes = [0] * nb
    sets = [set() for _ in range(nb)]
    for t, g, n, op in zip(c["t_ns"], c["gpa"], c["len"], c["op"]):
        if op != 0:
            continue
        b = (int(t) - t0) // interval
        writes[b] += 1
        sets[b].update(range(int(g) >> 12, (int(g) + int(n) - 1 >> 12) + 1))
    return writes, [len(s) for s in sets], set().union(*sets)


@pytest.mark.parametrize("interval", [None, 333_333, 10**8])
def test_inspect_matches_reference(tmp_path, interval):
    c = make(tmp_path / "t.arrow")
    s = inspect_trace(tmp_path / "t.arrow", interval_ns=interval)
    iv = s["interval_ns"]
    if interval is None:
        assert iv == nice_interval(s["span_ns"]) and len(s["intervals"]) <= 21
    writes, ws, total = reference(c, iv)
    assert [x["writes"] for x in s["intervals"]] == writes
    assert [x["pages_written"] for x in s["intervals"]] == ws
    assert s["pages_written"] == len(total)
    assert s["bytes_written"] == int(c["len"][c["op"] == 0].astype(np.int64).sum())
    assert s["ops"] == {name: int((c["op"] == i).sum()) for i, name in enumerate(["write", "read", "to_shared", "to_private"])}
    assert s["events"] == 5000 and s["t_first_ns"] == int(c["t_ns"][0]) and s["t_last_ns"] == int(c["t_ns"][-1])
    assert all(x["writes_per_s"] == x["writes"] * 10**9 // iv for x in s["intervals"])
    json.dumps(s)
    assert not _has_float(s)


def _has_float(x):
    if isinstance(x, float):
        return True
    if isinstance(x, dict):
        return any(_has_float(v) for v in x.values())
    if isinstance(x, list):
        return any(_has_float(v) for v in x)
    return False


def test_nice_interval():
    assert nice_interval(1_000_000_000) == 50_000_000
    assert nice_interval(0) == 1
    assert nice_interval(21) == 2
    assert nice_interval(999) == 50


def test_inspect_empty_and_bad_interval(tmp_path):
    with TraceWriter(tmp_path / "e.arrow", guest_bytes=MiB, vcpus=1, source={}):
        pass
    s = inspect_trace(tmp_path / "e.arrow")
    assert s["events"] == 0 and s["intervals"] == [] and s["pages_written"] == 0
    make(tmp_path / "t.arrow")
    with pytest.raises(UsageError, match="intervals"):
        inspect_trace(tmp_path / "t.arrow", interval_ns=1)


def test_cli_gen_and_inspect(tmp_path, capsys):
    out = tmp_path / "w.arrow"
    rc = cli.main(["gen", "hotcold", "--out", str(out), "--guest-size", "4MiB", "--vcpus", "2", "--events", "20k",
                   "--seed", "7", "--hot-fraction", "10%", "--hot-probability", "0.9", "--read-fraction", "0.1", "--fill"])
    assert rc == 0
    line = capsys.readouterr().out
    meta = read_meta(out)
    assert line.count("\n") == 1 and meta.digest in line and str(out) in line and "21024 events" in line
    assert meta.source["hot_probability_ppm"] == 900_000 and meta.source["read_ppm"] == 100_000 and meta.source["fill"]

    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert meta.digest in text and "working set" in text and "to_private" in text
    assert cli.main(["inspect", str(out), "--json", "--interval", "500us"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["interval_ns"] == 500_000 and s["meta"]["digest"] == meta.digest
    assert s["pages_written"] == 1024  # fill wrote every page

    # Same command, same bytes of content; uncompressed copy has the same digest.
    out2 = tmp_path / "w2.arrow"
    assert cli.main(["gen", "hotcold", "--out", str(out2), "--guest-size", "4MiB", "--vcpus", "2", "--events", "20k",
                     "--seed", "7", "--hot-fraction", "10%", "--hot-probability", "0.9", "--read-fraction", "0.1",
                     "--fill", "--compression", "none"]) == 0
    assert read_meta(out2).digest == meta.digest


@pytest.mark.parametrize(
    "argv,text",
    [
        (["gen", "unifrom"], "did you mean 'uniform'"),
        (["gen", "hotcold", "--hot-fractoin", "0.1"], "did you mean --hot-fraction"),
        (["gen", "uniform", "--zipf", "1.1"], "--zipf applies only to hotcold"),
        (["gen", "uniform", "--guest-size", "4XB"], "unknown unit"),
        (["gen", "uniform", "--read-fraction", "abc"], "--read-fraction"),
        (["gen", "ab", "--guest-size", "1MiB"], "empty range"),
        (["inspect", "nope.arrow"], "nope.arrow"),
        (["inspect", "nope.arrow", "--interval", "3 parsecs"], "--interval"),
    ],
)
def test_cli_errors_exit_2_one_line(tmp_path, capsys, monkeypatch, argv, text):
    monkeypatch.chdir(tmp_path)
    base = ["--out", "o.arrow", "--guest-size", "4MiB", "--vcpus", "1", "--events", "10", "--seed", "1"]
    if argv[0] == "gen":
        # later flags win in argparse, so the case's own --guest-size overrides the base one
        argv = argv[:2] + base + argv[2:]
    assert cli.main(argv) == 2
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and text in cap.err and "Traceback" not in cap.err
    assert not (tmp_path / "o.arrow").exists() and list(tmp_path.iterdir()) == []


def test_an_unknown_flag_is_named_with_its_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["inspect", "t.arrow", "--bogus"]) == 2
    assert capsys.readouterr().err == "replay: error: replay inspect: unrecognized arguments: --bogus\n"
    assert cli.main(["--bogus"]) == 2
    assert capsys.readouterr().err == "replay: error: replay: unrecognized arguments: --bogus\n"


def test_a_missing_dependency_is_bad_input_but_a_missing_module_of_ours_is_a_bug(capsys, monkeypatch):
    """A dependency (or a compiled extension) not installed: one line saying what to install, exit 2.
    A module of the project itself that an import names wrongly is a bug: exit 3, an internal error."""
    def command(missing):
        def run(args):
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return type("Cmd", (), {"configure": staticmethod(lambda p: None), "run": staticmethod(run)})

    for missing, code, text in (("blake3", 2, "blake3 is not installed"), ("replay.security._gcm", 2, "replay.security._gcm is not installed"),
                                ("replay.scenarios", 3, "internal error: ModuleNotFoundError")):
        monkeypatch.setattr(cli.importlib, "import_module", lambda name, m=missing: command(m))
        assert cli.main(["verify"]) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and text in err
