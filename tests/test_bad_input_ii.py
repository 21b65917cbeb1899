"""Issue 19, "Bad input, part II": every finding on the surfaces added after the first bad-input work, as
a test of the behaviour the issue asks for.

Internal errors that become one-line exit 2 (or success for the valid trace): a null t_ns peeked at by
``inspect``, a trace ending at t_ns 2^64-1 (valid: ``inspect`` and ``verify`` accept it; ``run`` and
``compare`` refuse it up front), ``inspect --interval`` beyond 2^64-1 ns, a CSV header that is not UTF-8,
a 5,000-digit time in ``--adversary``, ``sweep --scheduler bogus``. Sweeps: outputs never overwrite or sit
among inputs, bounded grids and worker counts (refused with the figure, from the axes' lengths alone),
``--scheduler`` validated and reached within a few seconds, one line on stderr for every error, worker
logs in the sweep directory, nothing left behind by a failure.
"""

from __future__ import annotations


import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from replay.cli import main
from replay.core.errors import ScenarioError
from replay.traces.format import TraceWriter

REPO = Path(__file__).resolve().parent.parent
U64_MAX = (1 << 64) - 1


def one_line_error(capsys, rc: int, expect: int = 2) -> str:
    assert rc == expect
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("replay: error: "), err
    assert len(err) <= 400 and "Traceback" not in err and "internal error" not in err
    return err.strip()


def write_trace(path: Path, times, guest_bytes: int = 1 << 24) -> Path:
    n = len(times)
    with TraceWriter(path, guest_bytes=guest_bytes, vcpus=2, source={"test": "issue19"}) as w:
        i = np.arange(n, dtype=np.uint64)
        w.write(np.array(times, dtype=np.uint64), (i % 2).astype(np.uint16), (i % 64) * 4096, 8, 0, i + 1)
    return path


def with_null_t_ns(src: Path, dst: Path, row: int) -> Path:
    """``src`` rewritten with t_ns declared nullable and null at ``row`` (metadata kept)."""
    with pa.memory_map(str(src)) as f:
        t = pa.ipc.open_file(f).read_all()
    col = t.column("t_ns").to_pylist()
    col[row] = None
    t = t.set_column(0, pa.field("t_ns", pa.uint64(), nullable=True), pa.array(col, pa.uint64()))
    t = t.replace_schema_metadata(t.schema.metadata)
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
        w.write_table(t)
    return dst


# ------------------------------------------------------------------------------- internal errors


@pytest.mark.parametrize("row", [0, 99])  # the first row (inspect's peek at the span) and the last
def test_a_null_t_ns_is_one_line_in_inspect_and_verify(tmp_path, capsys, row):
    bad = with_null_t_ns(write_trace(tmp_path / "t.arrow", range(0, 100_000, 1000)), tmp_path / "n.arrow", row)
    for cmd in ("inspect", "verify"):
        err = one_line_error(capsys, main([cmd, str(bad)]))
        assert "null in column t_ns" in err and "n.arrow" in err


def test_a_trace_ending_at_2_64_minus_1_is_valid_and_runs_refuse_it_up_front(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.arrow", [0, 5, U64_MAX])
    assert main(["verify", str(trace)]) == 0
    assert main(["inspect", str(trace), "--json"]) == 0
    out = capsys.readouterr().out
    assert f'"t_last_ns": {U64_MAX}' in out
    (tmp_path / "s.toml").write_text('name = "end"\n[trace]\nfile = "t.arrow"\n[migration]\nstart_ns = 1\n')
    for cmd in ("run", "compare"):
        err = one_line_error(capsys, main([cmd, str(tmp_path / "s.toml"), "--out", str(tmp_path / cmd),
                                           "--no-progress"]))
        assert f"the trace ends at t_ns {U64_MAX}" in err and "2^63-1" in err
        assert not (tmp_path / cmd).exists()


def test_the_last_trace_end_a_run_accepts(tmp_path, capsys):
    """The boundary: a trace ending at 2^63-1 ns runs; 2^63 is refused."""
    (tmp_path / "s.toml").write_text('name = "end"\n[trace]\nfile = "t.arrow"\n[migration]\nstart_ns = 1\n')
    write_trace(tmp_path / "t.arrow", [0, 5, (1 << 63) - 1])
    assert main(["run", str(tmp_path / "s.toml"), "--out", str(tmp_path / "ok"), "--no-progress"]) == 0
    write_trace(tmp_path / "t.arrow", [0, 5, 1 << 63])
    capsys.readouterr()
    assert "the trace ends at t_ns 9223372036854775808" in one_line_error(
        capsys, main(["run", str(tmp_path / "s.toml"), "--out", str(tmp_path / "no"), "--no-progress"]))


def test_the_largest_guest_a_run_migrates(tmp_path, capsys):
    """A trace may describe a guest of up to 2^32 - 1 pages, but a run's guest leaves the last 1,024 gfns to
    the SVSM's VMSA pages (the gfn field is 32 bits): 16 TiB - 4 MiB runs up to the memory check, one page
    more is refused as a trace beyond what a run migrates (it used to fail at setup, exit 3)."""
    from replay.engines.common import VMSA_SPARE

    limit = ((1 << 32) - 1024) * 4096
    assert limit + VMSA_SPARE * 4096 == 1 << 44  # the engines' spare VMSA gfns end exactly at 2^32
    (tmp_path / "s.toml").write_text('name = "big"\n[trace]\nfile = "t.arrow"\n[migration]\nstart_ns = 1\n')
    write_trace(tmp_path / "t.arrow", [0, 5, 9], guest_bytes=limit + 4096)
    assert main(["verify", str(tmp_path / "t.arrow")]) == 0  # a valid trace
    err = one_line_error(capsys, main(["run", str(tmp_path / "s.toml"), "--out", str(tmp_path / "no"),
                                       "--no-progress"]))
    assert f"guest of {limit + 4096} bytes is beyond what a run migrates ({limit} bytes" in err
    write_trace(tmp_path / "t.arrow", [0, 5, 9], guest_bytes=limit)
    err = one_line_error(capsys, main(["run", str(tmp_path / "s.toml"), "--out", str(tmp_path / "at"),
                                       "--no-progress"]))
    assert "beyond what a run migrates" not in err and "memory" in err  # past the limit check: the memory one
    assert not (tmp_path / "no").exists() and not (tmp_path / "at").exists()
    for size, ok in ((limit, True), (limit + 4096, False)):
        rc = main(["run", str(tmp_path / "s.toml"), "--set", f"guest.guest_bytes={size}", "--out",
                   str(tmp_path / "k"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and ("guest.guest_bytes" in err) != ok, err


def test_inspect_intervals_up_to_2_64_minus_1_ns(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.arrow", range(0, 100_000, 1000))
    err = one_line_error(capsys, main(["inspect", str(trace), "--interval", "99999999999999999999s"]))
    assert "longer than any trace (at most 2^64-1 ns)" in err
    # The longest interval accepted: the whole trace in one interval, with its exact counts.
    assert main(["inspect", str(trace), "--json", "--interval", f"{U64_MAX}ns"]) == 0
    out = capsys.readouterr().out
    assert f'"interval_ns": {U64_MAX}' in out and '"writes": 100' in out and '"pages_written": 64' in out


@pytest.mark.parametrize("header", [b"\xff\xfe,gpa\n", b"t_ns,gpa\xe9\n"])
def test_a_csv_header_that_is_not_utf8_is_one_line(tmp_path, capsys, header):
    (tmp_path / "a.csv").write_bytes(header + b"1,4096\n")
    err = one_line_error(capsys, main(["import", "csv", str(tmp_path / "a.csv"), "--out", str(tmp_path / "t.arrow")]))
    assert "column names are not UTF-8" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]


@pytest.mark.parametrize("text", ["5000", "1." + "5" * 5000, "9" * 41])
def test_huge_numbers_with_units_are_one_line(tmp_path, capsys, text):
    err = one_line_error(capsys, main(["run", str(REPO / "scenarios" / "quickstart.toml"), "--out",
                                       str(tmp_path / "r"), "--adversary", f"flip@{'9' * 5000 if text == '5000' else text}ms"]))
    assert "number too long (at most 40 digits each side of the point)" in err
    assert not (tmp_path / "r").exists()


def test_forty_digits_still_parse():
    from replay.core.units import parse_duration_ns, parse_size

    assert parse_size("9" * 40) == int("9" * 40)  # range checks (64 bits) come after, with the key's name
    assert parse_duration_ns("1." + "0" * 39 + "s") == 10**9


# ------------------------------------------------------------------------------------------ sweeps

def sweep_file(tmp_path: Path, head: str, name: str = "s.toml") -> Path:
    from test_sweep import write_sweep  # the sweep tests' tiny base scenario

    return write_sweep(tmp_path, head, name)


@pytest.mark.parametrize("address, message", [
    ("", "--scheduler: empty address"),
    ("bogus", "expected SCHEME://HOST:PORT"),
    ("host:8786", "did you mean tcp://host:8786?"),
    ("tcp://", "expected SCHEME://HOST:PORT"),
    ("tcp://h:abc", "expected SCHEME://HOST:PORT"),
    ("tcp://h:1/x", "expected SCHEME://HOST:PORT"),
    ("udp://h:1", "unknown scheme 'udp'"),
    ("tcp://h:99999", "port 99999 is not in 1..65535"),
    ("tcp://h:0", "port 0 is not in 1..65535"),
])
def test_a_malformed_scheduler_is_one_line_before_anything(tmp_path, capsys, address, message):
    p = sweep_file(tmp_path, "seeds = [1]\n")
    t0 = time.monotonic()
    err = one_line_error(capsys, main(["sweep", str(p), "--out", str(tmp_path / "o"), "--scheduler", address]))
    assert message in err and time.monotonic() - t0 < 5
    assert not (tmp_path / "o").exists()


def test_something_that_is_not_a_dask_scheduler_is_one_line(tmp_path, capsys):
    """A server that answers with bytes that are not Dask's protocol (here: a frame length of exabytes)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def answer():
        conn, _ = srv.accept()
        conn.sendall(b"\xff" * 64)
        time.sleep(2)
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    p = sweep_file(tmp_path, "seeds = [1]\n")
    try:
        err = one_line_error(capsys, main(["sweep", str(p), "--out", str(tmp_path / "o"), "--scheduler",
                                           f"tcp://127.0.0.1:{port}"]))
    finally:
        srv.close()
    assert f"tcp://127.0.0.1:{port}" in err and ("not a Dask scheduler" in err or "cannot reach" in err)
    assert not (tmp_path / "o").exists()


def test_a_huge_grid_is_refused_at_once_with_its_size(tmp_path, capsys):
    axes = "\n".join(f'"costs.c{i}" = [{", ".join(str(v) for v in range(10))}]' for i in range(12))
    p = sweep_file(tmp_path, f"[grid]\n{axes}\n")
    t0 = time.monotonic()
    err = one_line_error(capsys, main(["sweep", str(p), "--out", str(tmp_path / "o")]))
    assert time.monotonic() - t0 < 5
    assert "1000000000000 points (10 x 10 x 10 x 10 x 10 x 10 x 10 x 10 x 10 x 10 x 10 x 10)" in err
    assert "at most 10000 points" in err


def test_the_largest_grid_accepted(tmp_path):
    from replay.sweeps.sweep import MAX_POINTS, check_grid_size, load_sweep

    p = sweep_file(tmp_path, f'seeds = [{", ".join(str(i) for i in range(MAX_POINTS))}]\n')
    assert check_grid_size(load_sweep(p)) == MAX_POINTS
    p = sweep_file(tmp_path, f'seeds = [{", ".join(str(i) for i in range(MAX_POINTS + 1))}]\n')
    with pytest.raises(ScenarioError, match="10001 points"):
        check_grid_size(load_sweep(p))


def test_workers_are_bounded_per_core(tmp_path, capsys):
    from replay.sweeps.sweep import WORKERS_PER_CORE

    p = sweep_file(tmp_path, "seeds = [1]\n")
    limit = WORKERS_PER_CORE * (os.cpu_count() or 1)
    err = one_line_error(capsys, main(["sweep", str(p), "--out", str(tmp_path / "o"), "--workers", "100000"]))
    assert f"--workers 100000: at most {limit}" in err
    err = one_line_error(capsys, main(["sweep", str(p), "--out", str(tmp_path / "o"), "--workers", str(limit + 1)]))
    assert f"at most {limit}" in err
    assert not (tmp_path / "o").exists()


def test_an_existing_directory_that_is_not_a_sweep_is_refused_not_merged_into(tmp_path, capsys):
    p = sweep_file(tmp_path, "seeds = [1]\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.parquet").write_bytes(b"someone's table")
    err = one_line_error(capsys, main(["sweep", str(p), "--out", str(other)]))
    assert "exists and is not a sweep directory" in err
    assert (other / "results.parquet").read_bytes() == b"someone's table" and len(list(other.iterdir())) == 1
    # A sweep.json of something else is not a sweep's record either.
    (other / "sweep.json").write_text('{"format": "not-a-sweep"}')
    assert "is not a sweep directory" in one_line_error(capsys, main(["sweep", str(p), "--out", str(other)]))


def test_out_holding_or_being_an_input_is_refused_up_front(tmp_path, capsys):
    """The base scenario and its trace in a directory: --out that directory, --out the trace, --out the
    sweep file are refused before anything is written, and nothing changes."""
    from tests.test_validate import snapshot

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_trace(inputs / "t.arrow", range(0, 2_000_000, 1000))
    (inputs / "base.toml").write_text('name = "b"\n[trace]\nfile = "t.arrow"\n[migration]\nstart_ns = "100us"\n')
    (inputs / "s.toml").write_text('scenario = "base.toml"\nseeds = [1]\n')
    before = snapshot(tmp_path)
    for out, message in ((inputs, "contains the input"), (inputs / "t.arrow", "is the input"),
                         (inputs / "s.toml", "is the input"), (inputs / "base.toml", "is the input")):
        err = one_line_error(capsys, main(["sweep", str(inputs / "s.toml"), "--out", str(out)]))
        assert message in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["missing", "truncated", "digest"])
def test_a_bad_trace_file_is_one_line_before_anything_runs(tmp_path, capsys, damage):
    inputs = tmp_path / "in"
    inputs.mkdir()
    trace = write_trace(inputs / "t.arrow", range(0, 2_000_000, 1000))
    (inputs / "base.toml").write_text('name = "b"\n[trace]\nfile = "t.arrow"\n[migration]\nstart_ns = "100us"\n')
    (inputs / "s.toml").write_text('scenario = "base.toml"\nseeds = [1]\n')
    data = trace.read_bytes()
    if damage == "missing":
        trace.unlink()
    elif damage == "truncated":
        trace.write_bytes(data[: len(data) // 2])
    else:
        with pa.memory_map(str(trace)) as f:
            t = pa.ipc.open_file(f).read_all()
        vals = t.column("value").to_pylist()
        vals[7] ^= 1
        t = t.set_column(5, t.schema.field(5), pa.array(vals, pa.uint64()))
        with pa.OSFile(str(trace), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
            w.write_table(t)
    err = one_line_error(capsys, main(["sweep", str(inputs / "s.toml"), "--out", str(tmp_path / "o")]))
    assert {"missing": "no such file", "truncated": "truncated", "digest": "does not match"}[damage] in err
    assert not (tmp_path / "o").exists()


def test_a_full_disk_leaves_nothing_and_is_one_line(tmp_path, capsys, monkeypatch):
    """The table cannot be written (ENOSPC, injected): exit 2, one line, and the sweep directory this
    invocation made is gone."""
    import replay.sweeps.sweep as sweep_mod

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(sweep_mod, "write_atomic", full)
    p = sweep_file(tmp_path, "seeds = [1]\n")
    err = one_line_error(capsys, main(["sweep", str(p), "--out", str(tmp_path / "o"), "--workers", "1",
                                       "--no-progress"]))
    assert "No space left on device" in err
    assert not (tmp_path / "o").exists()


def test_worker_errors_reach_the_terminal_as_one_line_and_the_log_file(tmp_path):
    """A point failing inside a Dask worker process (a capability refused when it runs): stderr holds only
    the one-line summary, never Dask's "Compute Failed ... Traceback"; the worker's log is in the sweep
    directory and says what failed. Run as the user would: a real process, real workers."""
    p = sweep_file(tmp_path, '[grid]\n"kernel.gmem_link" = [true, false]\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "replay.cli", "sweep", str(p), "--out", str(tmp_path / "o"),
                        "--workers", "1", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == ["replay: 1 point(s) errored (see the 'error' column); rerun the same "
                                     "command to retry only those"]
    log = (tmp_path / "o" / "worker.log").read_text()
    assert "Compute Failed" in log and "needs kernel capability" in log and "gmem_link" in log
    assert "2 points (1 run now, 0 already done): 1 completed, 1 error" in r.stdout
    # The directory is a sweep's, so the same command resumes into it.
    r2 = subprocess.run(r.args, capture_output=True, text=True, env=env, timeout=300)
    assert r2.returncode == 1 and "(0 run now, 1 already done)" in r2.stdout


# ------------------------------------------------------------------------------------ compare's memory

Q64 = (REPO / "scenarios" / "quickstart.toml").read_text().replace('size = "256MiB"', 'size = "64MiB"').replace(
    "events = 2_000_000", "events = 200_000")


@pytest.mark.parametrize("data", [False, True])
def test_a_64_mib_guest_compares_under_a_4_gib_address_space_limit(tmp_path, data):
    """The issue's case: each compare worker reserved over 2 GiB of address space (mimalloc's 1 GiB arenas,
    glibc's 64 MiB per-thread heaps) and the parent asked read() for a buffer the size of the record limit,
    so `ulimit -v` refused what `run` did in far less. Now the whole compare fits 4 GiB per process."""
    import resource

    assert "64MiB" in Q64 and "200_000" in Q64
    (tmp_path / "q.toml").write_text(Q64)
    limit = 4 << 30
    argv = [sys.executable, "-m", "replay.cli", "compare", "q.toml", "--out", "out", "--no-progress"]
    r = subprocess.run(argv + (["--data"] if data else []), cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mirror-vm", "report.html", "shadow-vcpu"]


def test_reservations_are_limited_for_workers(monkeypatch):
    from replay.core import procmem

    for key in procmem.ENV:
        monkeypatch.delenv(key, raising=False)
    procmem.limit_reservations()
    assert {k: os.environ[k] for k in procmem.ENV} == {"MIMALLOC_ARENA_RESERVE": "65536", "MALLOC_ARENA_MAX": "2"}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")  # the user's own setting wins
    procmem.limit_reservations()
    assert os.environ["MALLOC_ARENA_MAX"] == "8"


def test_compare_memory_check_counts_both_workers(tmp_path, capsys, monkeypatch):
    """Each worker needs a run's memory at the same time: the machine must have twice that; the
    address-space limit (per process) must hold one."""
    from replay.core import validate

    (tmp_path / "q.toml").write_text(Q64)
    monkeypatch.chdir(tmp_path)
    need = validate.run_memory_bytes(64 << 20, 4)
    monkeypatch.setattr(validate, "available_memory_bytes", lambda: 1 << 40)
    monkeypatch.setattr(validate, "machine_available_bytes", lambda: 2 * need - 1)
    err = one_line_error(capsys, main(["compare", "q.toml", "--out", "out", "--no-progress"]))
    assert f"({2} processes of {validate._gib(need)})" in err and "--allow-memory" in err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(validate, "machine_available_bytes", lambda: 2 * need)  # exactly enough
    monkeypatch.setattr(validate, "available_memory_bytes", lambda: need - 1)  # but one worker's limit is not
    assert "needs about" in one_line_error(capsys, main(["compare", "q.toml", "--out", "out", "--no-progress"]))
    monkeypatch.setattr(validate, "available_memory_bytes", lambda: need)
    assert main(["compare", "q.toml", "--out", "out", "--no-progress"]) == 0


def test_compare_of_runs_refused_at_the_handshake_prints_its_table(tmp_path, capsys):
    """Found by the new fuzz family "data": a data-mode compare whose handshake is refused (the target's
    VCEK chains to an untrusted root) has no per-host traffic; the table says "-" there instead of an
    internal error (KeyError 'payload_bytes')."""
    (tmp_path / "q.toml").write_text(Q64)
    rc = main(["compare", str(tmp_path / "q.toml"), "--out", str(tmp_path / "out"), "--no-progress", "--data",
               "--set", "attestation.target_root=evil", "--all-metrics"])
    cap = capsys.readouterr()
    assert rc == 1, cap.err
    row = next(line for line in cap.out.splitlines() if line.startswith("page bytes before compression"))
    assert row.split()[-2:] == ["-", "-"]  # absent in both: shown with --all-metrics, folded without
    assert "internal error" not in cap.err


def test_equal_points_run_once(tmp_path, capsys):
    """Found by the fuzzer (sweep:105 and sweep:274, seed 0): 3,000 equal values made 3,000 equal points,
    each run again into the same run directory, past the case's time limit. Equal points share one run;
    the table keeps a row per point."""
    p = sweep_file(tmp_path, f'seeds = [{", ".join(["1"] * 3000)}]\n')
    t0 = time.monotonic()
    assert main(["sweep", str(p), "--out", str(tmp_path / "o"), "--workers", "1", "--no-progress"]) == 0
    assert time.monotonic() - t0 < 60
    out = capsys.readouterr().out
    assert "3000 points (1 run now, 0 already done): 3000 completed" in out
    import polars as pl

    table = pl.read_parquet(tmp_path / "o" / "results.parquet")
    assert table.height == 3000 and table["key"].n_unique() == 1 and len(list((tmp_path / "o" / "runs").iterdir())) == 1


# ------------------------------------------------------------------ no documented value reaches an exception

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=400, deadline=None, derandomize=True)
@given(text=st.one_of(st.text(max_size=80),
                      st.from_regex(r"\s*[0-9]{1,60}(\.[0-9]{1,60})?\s*(ns|us|ms|s|b|KiB|MiB|GiB|TiB|kb|x)?\s*",
                                    fullmatch=True)))
def test_units_raise_only_usage_errors(text):
    from replay.core.errors import UsageError
    from replay.core.units import MAX_DIGITS, parse_duration_ns, parse_size

    for parse in (parse_size, parse_duration_ns):
        try:
            value = parse(text)
        except UsageError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 300
        else:
            assert isinstance(value, int) and value >= 0
            number = text.strip().rstrip("nsumkKMGTiBbxS").strip()  # units are case-insensitive ("5S" is 5 s)
            assert all(len(p) <= MAX_DIGITS for p in number.split("."))


@settings(max_examples=600, deadline=None, derandomize=True)
@given(text=st.one_of(
    st.text(max_size=60),
    st.builds(lambda k, w, o: k + w + o,
              st.sampled_from(["flip", "drop", "link-loss", "bad-tcb", "host-write-private", "flp", ""]),
              st.sampled_from(["", "@", "@1ms", "@0:1", "@1ms@2ms", "@" + "9" * 50 + "ms", "@x", "@1:2:3"]),
              st.lists(st.sampled_from([",where=header", ",where=", ",kind=drop", ",at_ns=1", ",host=target",
                                        ",duration_ns=1ms", ",duration_ns=0", ",", ",x=1", ",where"]),
                       max_size=3).map("".join))))
def test_adversary_specs_raise_only_one_line_scenario_errors(text):
    """Any --adversary value: an AdversarySpec, or a ScenarioError of one line under 400 characters."""
    from replay.scenario.adversary import parse_adversary

    try:
        parse_adversary(text)
    except ScenarioError as exc:
        msg = f"replay: error: {exc}"
        assert "\n" not in msg and len(msg) <= 400, msg


@settings(max_examples=40, deadline=None, derandomize=True)
@given(interval=st.integers(1, U64_MAX))
def test_every_documented_inspect_interval_is_accepted_or_refused_in_one_line(tmp_path_factory, interval):
    """Any interval from 1 ns to 2^64-1 ns: the summary, or (too many intervals) a one-line UsageError."""
    from replay.core.errors import UsageError
    from replay.traces.inspect import MAX_INTERVALS, inspect_trace

    trace = tmp_path_factory.getbasetemp() / "interval-trace.arrow"
    if not trace.exists():
        write_trace(trace, [0, 5, 1 << 40, U64_MAX])
    try:
        s = inspect_trace(trace, interval_ns=interval)
    except UsageError as exc:
        assert f"(at most {MAX_INTERVALS})" in str(exc)
        assert U64_MAX // interval + 1 > MAX_INTERVALS
    else:
        assert s["interval_ns"] == interval and len(s["intervals"]) == U64_MAX // interval + 1
        assert sum(iv["writes"] for iv in s["intervals"]) == 4


def test_a_sweep_whose_traces_cannot_fit_the_disk_is_refused_up_front(tmp_path, capsys, monkeypatch):
    import shutil as shutil_mod

    from replay.core import validate

    real = shutil_mod.disk_usage
    monkeypatch.setattr(validate.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=(20_000 + 1024) * validate.TRACE_ROW_BYTES - 1))
    p = sweep_file(tmp_path, "seeds = [1]\n")  # 20,000 events + 1,024 pages filled: one byte short
    err = one_line_error(capsys, main(["sweep", str(p), "--out", str(tmp_path / "o")]))
    assert "generating the sweep's 1 trace(s) (21024 events) needs about" in err
    assert not (tmp_path / "o").exists()


def test_a_disk_that_fills_while_points_run_is_exit_2_and_leaves_nothing(tmp_path, monkeypatch):
    """The workers' ENOSPC (here injected into every point) is the machine's, not the points': the sweep
    stops with one ResourceError (exit 2) and the directory it made is gone. (By hand on a 3 MiB tmpfs,
    a sweep whose runs fill it ends the same way.)"""
    import logging

    from dask.distributed import Client, LocalCluster

    import replay.sweeps.sweep as sweep_mod
    from replay.core.errors import ResourceError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sweep_mod, "run_point", full)
    p = sweep_file(tmp_path, "seeds = [1, 2]\n")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        with pytest.raises(ResourceError, match="the disk filled up while the sweep ran"):
            sweep_mod.run_sweep(sweep_mod.load_sweep(p), tmp_path / "o", client=client, own_client=False)
    assert not (tmp_path / "o").exists()
