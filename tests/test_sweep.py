"""Sweeps (replay.sweeps.sweep, `replay sweep`, the sweep report): the points a sweep file describes, errors
before anything runs, real runs on a real local Dask cluster, resuming, errors recorded and retried, and
the results table read by polars and DuckDB."""

from __future__ import annotations


import contextlib
import json
import logging
import os
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest

from replay.cli import main
from replay.core.errors import ScenarioError
from replay.sweeps.sweep import load_sweep, points, run_point, run_sweep

REPO = Path(__file__).resolve().parent.parent
CI_SWEEP = REPO / "scenarios" / "sweeps" / "mirror-vs-shadow-ci.toml"

# A tiny base: 4 MiB guest, 20k events (20 ms), migration at 5 ms. Every run takes milliseconds.
BASE = """
[scenario]
name = "tiny"
seed = 3
[scenario.guest]
size = "4MiB"
vcpus = 2
[scenario.trace]
generator = "hotcold"
events = 20_000
rate = 1_000_000
fill = true
[scenario.trace.options]
hot_bytes = 262_144
hot_probability_ppm = 900_000
[scenario.migration]
start_ns = "5ms"
bandwidth_bytes_per_s = 1_250_000_000
"""


def write_sweep(tmp_path: Path, head: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(head) + BASE)
    return p


@contextlib.contextmanager
def dask_client(processes: bool, workers: int, threads: int):
    """A real Dask cluster on this machine and its client; quiet, dashboard on a free port."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=processes, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def cluster_client():
    """Two single-threaded worker processes, shared by this module's tests."""
    with dask_client(processes=True, workers=2, threads=1) as client:
        yield client


@pytest.fixture
def thread_client():
    """An in-process cluster (worker threads): lets a test replace the task function."""
    with dask_client(processes=False, workers=1, threads=1) as client:
        yield client


# ------------------------------------------------------------------------------------------ points

def test_grid_zip_and_shorthands_make_the_product_in_file_order(tmp_path):
    p = write_sweep(tmp_path, """
        strategies = ["mirror-vm", "shadow-vcpu"]
        seeds = [1, 2]
        [grid.migration]
        bandwidth_bytes_per_s = [100_000_000, 200_000_000]
        [[zip]]
        "migration.downtime_limit_ns" = ["5ms", "50ms", 7]
        "migration.max_rounds" = [10, 20, 30]
        """)
    sweep = load_sweep(p)
    assert sweep.keys == ["migration.strategy", "seed", "migration.bandwidth_bytes_per_s",
                          "migration.downtime_limit_ns", "migration.max_rounds"]
    pts = points(sweep)
    assert len(pts) == 2 * 2 * 2 * 3
    # itertools.product order: the last axis (the zip group) varies fastest, its keys together.
    assert [dict(p.params) for p in pts[:3]] == [
        {"migration.strategy": "mirror-vm", "seed": 1, "migration.bandwidth_bytes_per_s": 100_000_000,
         "migration.downtime_limit_ns": v, "migration.max_rounds": r} for v, r in (("5ms", 10), ("50ms", 20), (7, 30))]
    last = pts[-1].scenario
    assert (last.migration.strategy, last.seed, last.migration.bandwidth_bytes_per_s,
            last.migration.downtime_limit_ns, last.migration.max_rounds) == ("shadow-vcpu", 2, 200_000_000, 7, 30)
    assert pts[1].scenario.migration.downtime_limit_ns == 50_000_000  # units parsed by the scenario loader
    assert pts[0].scenario.guest.guest_bytes == 4 << 20  # the base scenario's keys stay


def test_base_scenario_from_a_file_relative_to_the_sweep(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.toml").write_text('seed = 9\n[trace]\nfile = "t.arrow"\n')
    p = tmp_path / "sub" / "s.toml"
    p.write_text('scenario = "base.toml"\nmodes = ["precopy", "hybrid"]\n')
    pts = points(load_sweep(p))
    assert [(x.scenario.migration.mode, x.scenario.seed) for x in pts] == [("precopy", 9), ("hybrid", 9)]
    assert pts[0].scenario.base_dir == str(tmp_path / "sub")


@pytest.mark.parametrize("head, message", [
    ('[grid]\n"migration.bandwith_bytes_per_s" = [1, 2]\n',
     "migration.bandwith_bytes_per_s: unknown key (did you mean 'bandwidth_bytes_per_s'?)"),
    ('[grid]\n"migraton.mode" = ["precopy"]\n', "unknown section 'migraton' (did you mean 'migration'?)"),
    ('strategies = ["mirror-vm", "shadow-vpcu"]\n', "'shadow-vpcu' is not one of mirror-vm, shadow-vcpu (did you mean 'shadow-vcpu'?)"),
    ('[grid]\n"guest.vcpus" = [2, -1]\n', "guest.vcpus: must be >= 0 vCPUs, got -1"),
    ('stratgies = ["mirror-vm"]\n', "unknown key 'stratgies' (did you mean 'strategies'?)"),
    ('[[zip]]\n"migration.max_rounds" = [1, 2]\n"seed" = [1]\n', "zip[0]: axes must have equal lengths"),
    ('[grid]\n"migration.max_rounds" = []\n', "expected a non-empty array"),
    ('[grid]\n"migration.max_rounds" = [1.5]\n', "is not an integer, string or boolean"),
    ('seeds = [1]\n[grid]\nseed = [2]\n', "axis 'seed' is given twice"),
])
def test_bad_sweep_is_one_line_before_anything_runs(tmp_path, capsys, head, message):
    p = write_sweep(tmp_path, head)
    out = tmp_path / "out"
    assert main(["sweep", str(p), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith(f"replay: error: {p}")
    assert not out.exists()  # nothing ran, no cluster was started, nothing was written


def test_bad_axis_key_names_the_point(tmp_path):
    p = write_sweep(tmp_path, '[grid]\n"migration.bandwith" = [1, 2]\n')
    with pytest.raises(ScenarioError, match=r"point migration\.bandwith=1: .*s\.toml \[scenario\]: migration\.bandwith"):
        points(load_sweep(p))


# ------------------------------------------------------------------------------------ running it

def test_ci_sweep_on_a_local_cluster_table_in_polars_and_duckdb(tmp_path, capsys):
    """The shipped CI sweep through the CLI, on the default local cluster (one process per core)."""
    import duckdb

    out = tmp_path / "sweep"
    assert main(["sweep", str(CI_SWEEP), "--out", str(out), "--no-progress"]) == 0
    assert "32 points (32 run now, 0 already done): 32 completed" in capsys.readouterr().out
    df = pl.read_parquet(out / "results.parquet")
    assert df.height == 32 and df["status"].to_list() == ["completed"] * 32
    assert df["invariants_hold"].all() and df["key"].n_unique() == 32
    # Every combination once: 2 strategies x 2 modes x 2 seeds x 2 bandwidths x 2 vCPU counts.
    combos = df.select("strategy", "mode", "seed", "migration.bandwidth_bytes_per_s", "guest.vcpus").unique()
    assert combos.height == 32
    # The table's metrics are the run directories' (the one mapping in replay.sweeps.sweep.METRICS).
    for row in df.head(4).iter_rows(named=True):
        s = json.loads((out / row["run_dir"] / "summary.json").read_text())
        assert (row["downtime_ns"], row["total_ns"], row["bytes_sent"]) == (
            s["metrics"]["downtime_ns"], s["metrics"]["total_ns"], s["metrics"]["bytes_sent"])
        assert (s["strategy"], s["mode"], s["scenario"]["seed"], s["trace"]["vcpus"]) == (
            row["strategy"], row["mode"], row["seed"], row["guest.vcpus"])
    # One trace per distinct trace spec (vCPUs x seeds), shared by the 8 points that use it.
    assert len(list((out / "traces").glob("*.arrow"))) == 4
    assert df["trace_digest"].n_unique() == 4
    con = duckdb.connect()
    got = con.execute(
        f"""select strategy, count(*), sum(bytes_sent), min("guest.vcpus") from '{out / "results.parquet"}'
            where status = 'completed' group by strategy order by strategy""").fetchall()
    want = [(s, 16, int(df.filter(pl.col("strategy") == s)["bytes_sent"].sum()), 2) for s in ("mirror-vm", "shadow-vcpu")]
    assert got == want
    # Both lose the downtime (and post-copy blocking); shadow vCPUs also take the guest's CPUs (the question
    # the sweep answers), so they slow it more. On the slow link pre-copy outlasts the 200 ms trace: the guest
    # catches up in its idle time after its last event, so neither design has slowed its work by then.
    slow = {s: df.filter(pl.col("strategy") == s)["guest_slowdown_ppm"] for s in ("mirror-vm", "shadow-vcpu")}
    assert slow["mirror-vm"].median() < slow["shadow-vcpu"].median()
    slow_link = df.filter((pl.col("mode") == "precopy") & (pl.col("migration.bandwidth_bytes_per_s") == 312_500_000))
    assert slow_link["guest_slowdown_ppm"].max() == 0 and slow_link["total_ns"].min() > 200_000_000

    # The sweep report: deterministic, one plot per swept axis besides strategy and seed, a wins table.
    r1, r2 = tmp_path / "r1.html", tmp_path / "r2.html"
    assert main(["report", str(out), "--out", str(r1)]) == 0
    assert main(["report", str(out), "--out", str(r2)]) == 0
    html = r1.read_text()
    assert r1.read_bytes() == r2.read_bytes()
    assert html.count("<figure>") == 3  # mode, bandwidth, vCPUs
    assert 'id="wins"' in html and "guest slowdown: " in html
    # 8 settings (mode x bandwidth x vCPUs): a header and 8 rows; the wins, recounted from the table (lower
    # median over seeds wins; equal medians are a tie).
    assert html.count("<tr>") == 1 + 8
    med = df.group_by("mode", "migration.bandwidth_bytes_per_s", "guest.vcpus", "strategy").agg(
        pl.col("guest_slowdown_ppm").median().alias("m"))
    wins = {"mirror-vm": 0, "shadow-vcpu": 0}
    for _, grp in med.group_by("mode", "migration.bandwidth_bytes_per_s", "guest.vcpus"):
        m = dict(zip(grp["strategy"], grp["m"]))
        if m["mirror-vm"] != m["shadow-vcpu"]:
            wins[min(m, key=m.get)] += 1
    slowdown = html[html.index("<li>guest slowdown: "):].split("</li>")[0]
    assert f"mirror-vm wins {wins['mirror-vm']}," in slowdown
    assert f"shadow-vcpu wins {wins['shadow-vcpu']} (of 8 settings)" in slowdown


def test_report_wins_table_by_hand():
    """The wins rule on a hand-made table: lowest median over seeds wins; equal medians tie."""
    from replay.sweeps.report import wins

    rows = []
    for strategy, downtimes in (("mirror-vm", [10, 30, 20]), ("shadow-vcpu", [25, 5, 40])):
        for seed, d in enumerate(downtimes):
            rows.append({"strategy": strategy, "seed": seed, "bw": 1, "downtime_ns": d, "total_ns": 100,
                         "bytes_sent": 50 + (strategy == "shadow-vcpu") * 25, "guest_slowdown_ppm": 0})
    w = wins(pl.DataFrame(rows), ["bw"])
    # medians: downtime 20 vs 25 -> mirror-vm, 25 % higher; total equal -> tie; bytes 50 vs 75 -> mirror +50 %
    assert w == [{"bw": 1, "downtime_ns": ("mirror-vm", 25), "total_ns": ("tie", None),
                  "bytes_sent": ("mirror-vm", 50), "guest_slowdown_ppm": ("tie", None)}]


# In-process test doubles of replay.sweeps.sweep.run_point. Dask serializes tasks even for an in-process cluster:
# module-level functions travel by reference, so they share this log with the test.
_REAL_RUN_POINT = run_point
_LOG: dict[str, list] = {"calls": [], "finished": []}


@pytest.fixture(autouse=True)
def _fresh_log():
    for v in _LOG.values():
        v.clear()


def _slow_run_point(scenario, trace_path, nomig, engine, out_dir, plaintext=""):
    _LOG["calls"].append(Path(out_dir).name)
    try:
        time.sleep(0.2)
        return _REAL_RUN_POINT(scenario, trace_path, nomig, engine, out_dir, plaintext)
    finally:
        _LOG["finished"].append(out_dir)


def _flaky_run_point(scenario, trace_path, nomig, engine, out_dir, plaintext=""):
    """Fails the first attempt of the (shadow-vcpu, seed 1) point."""
    _LOG["calls"].append(Path(out_dir).name)
    if scenario.migration.strategy == "shadow-vcpu" and scenario.seed == 1 and len(_LOG["calls"]) <= 4:
        raise MemoryError("worker out of memory")
    return _REAL_RUN_POINT(scenario, trace_path, nomig, engine, out_dir, plaintext)


def _mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}


def test_interrupted_sweep_resumes_without_rerunning_points(tmp_path, thread_client, monkeypatch):
    """Interrupted after three results (as Ctrl-C in the client would), the rerun runs exactly the points
    with no run directory, and no point ever runs twice. The task is slowed (one worker thread, 0.2 s a
    point) so that the interruption comes while most points are still queued."""
    import replay.sweeps.sweep as sweep_mod

    p = write_sweep(tmp_path, """
        strategies = ["mirror-vm", "shadow-vcpu"]
        modes = ["precopy", "postcopy"]
        seeds = [1, 2]
        """)
    out = tmp_path / "out"
    calls, finished = _LOG["calls"], _LOG["finished"]
    monkeypatch.setattr(sweep_mod, "run_point", _slow_run_point)
    done = []

    def stop_after_three(point, status):
        done.append(point.index)
        if len(done) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(load_sweep(p), out, client=thread_client, on_result=stop_after_three)
    first = pl.read_parquet(out / "results.parquet")
    statuses = first["status"].to_list()
    assert len(statuses) == 8 and set(statuses) == {"completed", "pending"} and statuses.count("completed") >= 3
    deadline = time.monotonic() + 30
    while len(finished) < len(calls):  # a point started before the client stopped runs to its end
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = list(calls)
    before = _mtimes(out)
    assert 3 <= len(before) == len(started) < 8

    res = run_sweep(load_sweep(p), out, client=thread_client)
    assert (res.ran, res.skipped, res.errors) == (8 - len(before), len(before), 0)
    assert res.count("completed") == 8
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 8  # every point ran exactly once
    after = _mtimes(out)
    assert {k: after[k] for k in before} == before  # completed runs were not written again
    # Rerunning a finished sweep runs nothing and yields the same table.
    again = run_sweep(load_sweep(p), out, client=thread_client)
    assert (again.ran, again.skipped) == (0, 8) and again.table.equals(res.table)
    assert len(calls) == 8


def test_a_sweep_grown_by_an_axis_value_reuses_its_points(tmp_path, cluster_client):
    """Points are keyed by what they run, not by their place in the sweep: adding a seed runs only the
    new seed's points."""
    out = tmp_path / "out"
    small = write_sweep(tmp_path, 'strategies = ["mirror-vm", "shadow-vcpu"]\nseeds = [1]\n', "a.toml")
    big = write_sweep(tmp_path, 'strategies = ["mirror-vm", "shadow-vcpu"]\nseeds = [2, 1]\n', "b.toml")
    first = run_sweep(load_sweep(small), out, client=cluster_client)
    before = _mtimes(out)
    second = run_sweep(load_sweep(big), out, client=cluster_client)
    assert (first.ran, second.ran, second.skipped) == (2, 2, 2)
    assert {k: v for k, v in _mtimes(out).items() if k in before} == before
    assert second.table.column("seed").to_pylist() == [2, 1, 2, 1]


def test_a_point_that_errors_is_recorded_and_the_sweep_goes_on(tmp_path, cluster_client, capsys):
    # Without gmem_link the mirror VM cannot share private memory: the driver refuses that point when it
    # runs (the scenario loader cannot know: capabilities are checked against the strategy and the trace).
    p = write_sweep(tmp_path, '[grid]\n"kernel.gmem_link" = [true, false, true]\n')
    out = tmp_path / "out"
    res = run_sweep(load_sweep(p), out, client=cluster_client)
    rows = res.table.to_pylist()
    assert [r["status"] for r in rows] == ["completed", "error", "completed"]
    assert "needs kernel capability 'gmem_link'" in rows[1]["error"]
    assert rows[1]["downtime_ns"] is None and rows[1]["run_dir"] is None
    assert (out / "errors" / f"{rows[1]['key']}.txt").read_text().count("\n") == 1
    # The CLI run of the same sweep retries only that point, and says so with exit status 1.
    before = _mtimes(out)
    assert main(["sweep", str(p), "--out", str(out), "--no-progress"]) == 1
    cap = capsys.readouterr()
    assert "(0 run now, 2 already done): 2 completed, 1 error" in cap.out
    assert "rerun the same command to retry only those" in cap.err
    assert _mtimes(out) == before


def test_an_erroring_point_is_retried_and_then_completes(tmp_path, thread_client, monkeypatch):
    """A transient failure (here: injected into the task on the first attempt of point 1) is an error row;
    the next invocation runs that point only, and its error file goes."""
    import replay.sweeps.sweep as sweep_mod

    p = write_sweep(tmp_path, 'strategies = ["mirror-vm", "shadow-vcpu"]\nseeds = [1, 2]\n')
    out = tmp_path / "out"
    calls = _LOG["calls"]
    monkeypatch.setattr(sweep_mod, "run_point", _flaky_run_point)
    res = run_sweep(load_sweep(p), out, client=thread_client)
    rows = res.table.to_pylist()
    assert [r["status"] for r in rows] == ["completed", "completed", "error", "completed"]
    assert rows[2]["error"] == "MemoryError: worker out of memory"
    assert len(calls) == 4
    res2 = run_sweep(load_sweep(p), out, client=thread_client)
    assert (res2.ran, res2.skipped, res2.errors) == (1, 3, 0)
    assert len(calls) == 5 and calls[-1] == rows[2]["key"]
    assert res2.count("completed") == 4 and not list((out / "errors").iterdir())


def test_a_worker_that_dies_is_an_error_row(tmp_path, monkeypatch):
    """A point whose worker process dies (here: it exits) is recorded; the other points complete."""
    import dask

    import replay.sweeps.sweep as sweep_mod

    p = write_sweep(tmp_path, 'seeds = [1, 2]\n')
    real = sweep_mod.run_point

    def dies_on_seed_2(scenario, trace_path, nomig, engine, out_dir, plaintext=""):
        if scenario.seed == 2:
            os._exit(1)
        return real(scenario, trace_path, nomig, engine, out_dir, plaintext)

    monkeypatch.setattr(sweep_mod, "run_point", dies_on_seed_2)
    # Dask reschedules a dead worker's task (3 times by default); once is enough here.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with dask_client(processes=True, workers=2, threads=1) as client:
            res = run_sweep(load_sweep(p), tmp_path / "out", client=client)
    rows = res.table.to_pylist()
    assert [r["status"] for r in rows] == ["completed", "error"]
    assert "KilledWorker" in rows[1]["error"]


def test_the_cluster_sweep_is_valid_and_shares_traces():
    """The documented large sweep parses and validates: 960 points over 20 distinct traces."""
    from replay.sweeps.sweep import _trace_spec

    pts = points(load_sweep(REPO / "scenarios" / "sweeps" / "mirror-vs-shadow-cluster.toml"))
    assert len(pts) == 2 * 3 * 5 * 4 * 4 * 2
    assert len({_trace_spec(p.scenario) for p in pts}) == 4 * 5  # vCPU counts x seeds
    assert {p.scenario.guest.guest_bytes for p in pts} == {16 << 30}


def test_report_of_a_damaged_sweep_dir_is_one_line(tmp_path, capsys):
    d = tmp_path / "sweep"
    d.mkdir()
    (d / "sweep.json").write_text('{"format": "something-else"}')
    assert main(["report", str(d), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a sweep record" in err
    (d / "sweep.json").write_text('{"format": "snp-replay-sweep", "version": 1, "axes": []}')
    assert main(["report", str(d), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.parquet: cannot read the results table" in err
    assert not (tmp_path / "r.html").exists()


def test_a_tampered_results_table_is_refused_and_the_sweep_dir_never_holds_its_input(tmp_path, thread_client, capsys):
    p = write_sweep(tmp_path, 'strategies = ["mirror-vm", "shadow-vcpu"]\n')
    out = tmp_path / "out"
    run_sweep(load_sweep(p), out, client=thread_client)
    record = json.loads((out / "sweep.json").read_text())
    assert set(record["tables"]) == {"results.parquet"}
    assert main(["report", str(out), "--out", str(tmp_path / "ok.html")]) == 0
    capsys.readouterr()
    table = out / "results.parquet"
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit
    table.write_bytes(bytes(data))
    assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "content hash does not match sweep.json" in err
    assert not (tmp_path / "r.html").exists()
    assert main(["sweep", str(p), "--out", str(tmp_path), "--no-progress"]) == 2  # would hold s.toml
    assert "s.toml" in capsys.readouterr().err


def test_scheduler_option_uses_an_existing_cluster_and_runs_equal_replay_run(tmp_path, cluster_client, capsys):
    """`--scheduler ADDRESS` runs on that cluster as it is; each point's run directory is byte for byte
    what `replay run` writes for the base scenario with the point's values as --set overrides."""
    base = tmp_path / "base.toml"
    base.write_text(textwrap.dedent(BASE).replace("[scenario.", "[").replace("[scenario]\n", ""))
    sweep = tmp_path / "s.toml"
    sweep.write_text('scenario = "base.toml"\nstrategies = ["shadow-vcpu"]\n[grid]\n"migration.mode" = ["postcopy"]\n'
                     '"migration.bandwidth_bytes_per_s" = [300_000_000, 900_000_000]\n')
    out = tmp_path / "out"
    address = cluster_client.scheduler.address
    assert main(["sweep", str(sweep), "--out", str(out), "--scheduler", address, "--no-progress"]) == 0
    assert "2 points (2 run now, 0 already done): 2 completed" in capsys.readouterr().out
    assert len(cluster_client.scheduler_info()["workers"]) == 2  # the cluster is left as it was
    rows = pl.read_parquet(out / "results.parquet").to_dicts()
    for row in rows:
        alone = tmp_path / f"alone-{row['point']}"
        assert main(["run", str(base), "--out", str(alone), "--no-progress", "--strategy", "shadow-vcpu",
                     "--set", "migration.mode=postcopy",
                     "--set", f"migration.bandwidth_bytes_per_s={row['migration.bandwidth_bytes_per_s']}"]) == 0
        files = sorted(p.name for p in alone.iterdir())
        assert files == sorted(p.name for p in (out / row["run_dir"]).iterdir())
        assert all((alone / f).read_bytes() == (out / row["run_dir"] / f).read_bytes() for f in files)


def test_workers_and_scheduler_are_exclusive(tmp_path, capsys):
    p = write_sweep(tmp_path, "seeds = [1]\n")
    assert main(["sweep", str(p), "--out", str(tmp_path / "o"), "--workers", "2", "--scheduler", "tcp://x:1"]) == 2
    assert "--workers sizes the local cluster" in capsys.readouterr().err
    assert main(["sweep", str(p), "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "--workers 0: must be >= 1" in capsys.readouterr().err


def test_a_sweep_or_base_scenario_that_is_not_a_text_file_is_one_line(tmp_path, capsys):
    """A FIFO is refused, never waited on; a base scenario that is not UTF-8 or is a directory is one line
    naming it (exit 2), never an internal error."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    (tmp_path / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    (tmp_path / "dir.toml").mkdir()
    cases = [(fifo, "not a regular file")]
    for base, text in (("fifo.toml", "not a regular file"), ("latin1.toml", "cannot read"),
                       ("dir.toml", "is a directory")):
        s = tmp_path / f"on-{base}"
        s.write_text(f'scenario = "{base}"\nseeds = [1]\n')
        cases.append((s, text))
    for sweep_file, text in cases:
        assert main(["sweep", str(sweep_file), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and text in err and "internal error" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_damaged_run_of_a_resumed_sweep_is_run_again(tmp_path, thread_client):
    """A point whose run directory does not check out (here a truncated summary) counts as not run: the
    next run of the sweep runs it again, and the table holds its new, intact record."""
    p = write_sweep(tmp_path, 'strategies = ["mirror-vm", "shadow-vcpu"]\n')
    out = tmp_path / "out"
    first = run_sweep(load_sweep(p), out, client=thread_client)
    run_dir = out / first.table["run_dir"][0].as_py()
    summary = (run_dir / "summary.json").read_bytes()
    (run_dir / "summary.json").write_bytes(summary[: len(summary) // 2])
    again = run_sweep(load_sweep(p), out, client=thread_client)
    assert (again.ran, again.skipped, again.errors) == (1, 1, 0)
    assert (run_dir / "summary.json").read_bytes() == summary and again.table.equals(first.table)


def test_a_sweep_record_without_its_axes_is_one_line(tmp_path, thread_client, capsys):
    p = write_sweep(tmp_path, 'strategies = ["mirror-vm", "shadow-vcpu"]\n')
    out = tmp_path / "out"
    run_sweep(load_sweep(p), out, client=thread_client)
    record = json.loads((out / "sweep.json").read_text())
    del record["axes"]
    (out / "sweep.json").write_text(json.dumps(record))
    assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "malformed sweep record" in err
    assert not (tmp_path / "r.html").exists()


def test_a_cluster_that_cannot_be_reached_leaves_nothing(tmp_path, capsys):
    """Unreachable: exit 2, one line naming the address, within the documented connect timeout (plus the
    time to start), and nothing written."""
    from replay.sweeps.sweep import CONNECT_TIMEOUT_S

    p = write_sweep(tmp_path, 'strategies = ["mirror-vm"]\n')
    t0 = time.monotonic()
    assert main(["sweep", str(p), "--out", str(tmp_path / "out"), "--scheduler", "tcp://127.0.0.1:1",
                 "--no-progress"]) == 2
    assert time.monotonic() - t0 < CONNECT_TIMEOUT_S + 10
    cap = capsys.readouterr()
    err = cap.err.splitlines()
    assert len(err) == 1 and "--scheduler 'tcp://127.0.0.1:1': cannot reach a Dask scheduler within 5 s" in err[0]
    assert cap.out == ""  # the point count is printed once the cluster is there
    assert not (tmp_path / "out").exists()


def test_a_data_mode_sweep_takes_its_plain_text_reference_from_its_own_cache(tmp_path, thread_client, monkeypatch):
    """The plain-text reference of a data-mode sweep is computed once per trace, with the traces, into the
    sweep's own cache, and handed to every point: nothing lands in the user's cache."""
    monkeypatch.setenv("SNP_REPLAY_CACHE", str(tmp_path / "user-cache"))
    p = write_sweep(tmp_path, 'strategies = ["mirror-vm", "shadow-vcpu"]\n[grid]\n"migration.data" = [true]\n')
    res = run_sweep(load_sweep(p), tmp_path / "out", client=thread_client)
    assert res.table["status"].to_pylist() == ["completed", "completed"]
    refs = sorted((tmp_path / "out" / "traces" / "refdigest").iterdir())
    assert len(refs) == 2  # the no-migration reference and the plain-text one
    assert not (tmp_path / "user-cache").exists()
    plain = {json.loads((tmp_path / "out" / r / "summary.json").read_text())["data"]["plaintext"]["no_migration"]
             for r in res.table["run_dir"].to_pylist()}
    assert plain & {r.read_text().strip() for r in refs} == plain and len(plain) == 1
