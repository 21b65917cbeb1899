"""Pre-copy migration: exact metrics on a tiny hand-computed scenario, both strategies, both engines.

The scenario: 4 private pages, 1 vCPU, OS at VMPL0; every page costs 5000 bytes on the wire (4096 + a
904-byte header) on a 5 GB/s link, i.e. exactly 1000 ns; packaging a private page costs 500 ns of agent
CPU. Setup: mirror-vm creates a mirror VM on each side (1000 ns each); shadow-vcpu creates one AP on each
side (1000 ns each, on the guest's CPU quota). Trace (t_ns: write to gfn): fill 0..3 at t=0..3, then
2500: gfn 1, 4500: gfn 2, 7000: gfn 1, 20000: gfn 3. Migration starts at 1000 ns. Downtime limit 500 ns
(threshold 2500 bytes: half a page), max_rounds 2.
"""

import json

import numpy as np
import pytest

from replay.cli import main
from replay.engine import ENGINE_KINDS
from replay.migrate import run
from replay.scenario import make_scenario
from replay.trace import TraceWriter

ROWS = [(0, 0), (1, 1), (2, 2), (3, 3), (2500, 1), (4500, 2), (7000, 1), (20000, 3)]

COSTS = {
    "mirror_vm_create_ns": 1000, "gmem_link_ns": 0, "vcpu_create_ns": 0, "ap_create_ns": 1000,
    "attestation_ns": 0, "dirty_sync_ns": 100, "dirty_sync_ns_per_gib": 0, "page_pack_ns": 500,
    "zero_page_ns": 0, "page_unpack_ns": 0, "vmgexit_ns": 0, "batch_pages": 64, "rmpupdate_ns": 0,
    "pvalidate_ns": 0, "page_header_bytes": 904, "vmsa_bytes": 4096, "device_state_bytes": 5000,
    "resume_ns": 0,
}


def write_trace(path, rows, npages, vcpus, shared=()):
    """A trace of 8-byte WRITEs from ``(t_ns, vcpu, gfn)`` rows; the content seed is the row number + 1."""
    n = len(rows)
    with TraceWriter(path, guest_bytes=npages * 4096, vcpus=vcpus, shared_ranges=shared, source={"test": path.stem}) as w:
        w.write(np.array([r[0] for r in rows], np.uint64), np.array([r[1] for r in rows], np.uint16),
                np.array([r[2] * 4096 for r in rows], np.uint64), np.full(n, 8, np.uint32),
                np.zeros(n, np.uint8), np.arange(1, n + 1, dtype=np.uint64))
    return path


def tiny_trace(path, shared=()):
    return write_trace(path, [(t, 0, gfn) for t, gfn in ROWS], npages=4, vcpus=1, shared=shared)


def tiny_scenario(costs=None, faults=(), kernel=None, **migration):
    m = {"start_ns": 1000, "bandwidth_bytes_per_s": 5_000_000_000, "latency_ns": 10, "downtime_limit_ns": 500,
         "max_rounds": 2, "agents_initial": 1, "agents_max": 1, "shadow_apic_id_base": 8, "shadow_apic_ids": 1}
    m.update(migration)
    return make_scenario(guest={"os_vmpl": 0}, trace={"file": "unused.arrow"}, migration=m,
                         costs={**COSTS, **(costs or {})}, kernel=kernel or {}, fault=list(faults))


@pytest.fixture
def trace(tmp_path):
    return tiny_trace(tmp_path / "tiny.arrow")


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_mirror_vm_by_hand(trace, engine):
    r = run(tiny_scenario(), strategy="mirror-vm", engine=engine, trace_path=trace)
    m = r.summary["metrics"]
    # Setup 2 x 1000 (mirror VMs). Round 0 sends gfn 0..3 at v = 4000, 5000, 6000, 7000; the write to gfn 2
    # at 4500 lands before gfn 2 is sent (at 5000), and dirties it. Sync at 7000 (+100): dirty {2};
    # 5000 bytes > 2500: round 1 sends gfn 2 (7100 -> 8100); meanwhile gfn 1 was written at 7000.
    # Sync at 8100 (+100): dirty {1}; max_rounds reached: stop-and-copy with the limit exceeded.
    assert r.status == "completed"
    assert m["setup_ns"] == 2000
    assert m["rounds"] == 2
    assert m["switchover_ns"] == 8200
    assert m["switchover_reason"] == "max_rounds"
    # Downtime: final sync 100, gfn 1 1000, VMSA + device state 2 x 1000, latency 10, token 10.
    assert m["downtime_ns"] == 3120
    assert m["expected_downtime_ns"] == 1000
    assert m["downtime_limit_exceeded"] is True
    assert m["total_ns"] == 11320 - 1000
    assert (m["pages_sent"], m["precopy_pages"], m["downtime_pages"]) == (6, 5, 1)
    assert (m["bytes_sent"], m["precopy_bytes"], m["downtime_bytes"]) == (40000, 25000, 15000)
    assert m["cpu_ns"] == {"guest": 7200, "host": 2300, "mirror_vm": 3500, "primary_vm_agents": 0}
    assert m["guest_slowdown_ppm"] == 0
    assert m["trace_end_ns"] == 11320 + (20000 - 8200)
    rounds = r.rounds.to_pylist()
    assert [(x["round"], x["phase"], x["sync_ns"], x["dirty_pages"], x["start_ns"], x["end_ns"], x["pages_sent"])
            for x in rounds] == [(0, "precopy", 3000, 4, 3000, 7000, 4), (1, "precopy", 7000, 1, 7100, 8100, 1),
                                 (2, "downtime", 8300, 1, 8300, 11320, 1)]
    d = r.summary["digests"]
    assert d["end_of_trace"] == d["no_migration"] and d["source_at_switchover"] == d["target_at_switchover"]
    assert all(r.summary["invariants"].values())


@pytest.mark.parametrize("engine", ENGINE_KINDS)
def test_shadow_vcpu_by_hand(trace, engine):
    r = run(tiny_scenario(), strategy="shadow-vcpu", engine=engine, trace_path=trace)
    m = r.summary["metrics"]
    # The two AP creations take the guest's only vCPU: v 1000 -> 3000, g stays 1000. Round 0: each page
    # costs 1000 ns of link and 500 ns of the guest's CPU, so g advances 500 per page (1500..3000); the
    # writes at 2500 and 4500 have not happened when their pages are sent. Round end g = 3000: the write
    # to gfn 1 (2500) lands; sync {1}; round 1 sends it (g 3100 -> 3600); sync {}: converged.
    assert m["setup_ns"] == 2000
    assert m["rounds"] == 2
    assert m["switchover_reason"] == "converged"
    assert m["downtime_limit_exceeded"] is True  # 2120 ns > 500 ns: VMSAs and device state alone exceed it
    assert m["downtime_ns"] == 2120
    assert (m["pages_sent"], m["downtime_pages"]) == (5, 0)
    assert m["bytes_sent"] == 35000
    # Live migration time 7200 ns; guest progress 2700 ns. Host CPU: two syncs and the final one.
    assert m["guest_slowdown_ppm"] == (7200 - 2700) * 1_000_000 // 7200
    assert m["cpu_ns"] == {"guest": 2700, "host": 300, "mirror_vm": 0, "primary_vm_agents": 5000}
    assert all(r.summary["invariants"].values())


def test_strategies_differ_where_spec_says(trace):
    mirror = run(tiny_scenario(), strategy="mirror-vm", trace_path=trace).summary["metrics"]
    shadow = run(tiny_scenario(), strategy="shadow-vcpu", trace_path=trace).summary["metrics"]
    assert mirror["guest_slowdown_ppm"] == 0 < shadow["guest_slowdown_ppm"]
    assert mirror["cpu_ns"]["mirror_vm"] > 0 and mirror["cpu_ns"]["primary_vm_agents"] == 0
    assert shadow["cpu_ns"]["primary_vm_agents"] > 0 and shadow["cpu_ns"]["mirror_vm"] == 0


def test_agents_on_demand_and_apic_limit(tmp_path):
    # Packaging (4000 ns/page) is 4x slower than the link (1000 ns/page): mirror-vm grows to agents_max;
    # shadow-vcpu stops at the reserved APIC ID range (2 IDs).
    trace = tiny_trace(tmp_path / "t.arrow")
    s = tiny_scenario(costs={"page_pack_ns": 4000}, agents_max=8, shadow_apic_ids=2)
    mirror = run(s, strategy="mirror-vm", trace_path=trace)
    shadow = run(s, strategy="shadow-vcpu", trace_path=trace)
    assert mirror.summary["metrics"]["agents_max"] == 4
    assert shadow.summary["metrics"]["agents_max"] == 2
    assert [e for e in mirror.events.to_pylist() if e["kind"] == "agent_added"][-1]["detail"] == "agents=4"


@pytest.mark.parametrize(
    "strategy, overrides, message",
    [
        ("mirror-vm", ["kernel.gmem_link=false"], "needs kernel capability 'gmem_link'"),
        ("shadow-vcpu", ["kernel.gmem_dirty_log=false"], "needs kernel capability 'gmem_dirty_log'"),
        ("mirror-vm", ["kernel.gmem_dirty_log=false"], "needs kernel capability 'gmem_dirty_log'"),
        ("shadow-vcpu", ["migration.shadow_apic_id_base=0"], "shadow APIC IDs 0..0 overlap the guest's APIC IDs 0..0"),
        ("shadow-vcpu", ["migration.agents_initial=3", "migration.agents_max=3", "migration.shadow_apic_ids=2"],
         "agents_initial 3 exceeds the reserved APIC ID range"),
    ],
)
def test_capability_and_setup_errors(tmp_path, capsys, strategy, overrides, message):
    trace = tiny_trace(tmp_path / "t.arrow")
    scen = tmp_path / "s.toml"
    scen.write_text('[guest]\nos_vmpl = 0\n[trace]\nfile = "t.arrow"\n[migration]\nstart_ns = 1000\nshadow_apic_id_base = 8\nshadow_apic_ids = 1\nagents_max = 1\n')
    args = ["run", str(scen), "--out", str(tmp_path / "out"), "--strategy", strategy, "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
    assert trace.exists()


def test_all_shared_guest_needs_no_dirty_log_capability(tmp_path):
    trace = tiny_trace(tmp_path / "t.arrow", shared=[(0, 3)])
    s = make_scenario(guest={"os_vmpl": 0}, trace={"file": "x"}, migration={"start_ns": 1000},
                      kernel={"gmem_dirty_log": False})
    r = run(s, strategy="mirror-vm", trace_path=trace)
    assert r.status == "completed" and r.summary["metrics"]["shared_pages_sent"] >= 4
    assert r.summary["metrics"]["private_pages_sent"] == 0


def test_start_after_trace_end_is_a_scenario_error(tmp_path, capsys):
    tiny_trace(tmp_path / "t.arrow")
    scen = tmp_path / "s.toml"
    scen.write_text('[trace]\nfile = "t.arrow"\n[migration]\nstart_ns = 99999\n')
    assert main(["run", str(scen), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "after the end of the trace (20000 ns)" in capsys.readouterr().err


def test_link_down_during_precopy_aborts_and_source_runs_on(trace):
    s = tiny_scenario(faults=[{"at_ns": 5500, "duration_ns": 1000}])
    for strategy in ("mirror-vm", "shadow-vcpu"):
        r = run(s, strategy=strategy, trace_path=trace)
        assert r.status == "aborted"
        assert "link down at 5500 ns" in r.summary["status_reason"]
        d = r.summary["digests"]
        assert d["end_of_trace"] == d["no_migration"]  # nothing lost: the source ran on
        assert d["target_at_switchover"] == ""
        kinds = [e["kind"] for e in r.events.to_pylist()]
        assert "link_down" in kinds and "abort" in kinds and "resume" not in kinds


def test_run_record_on_disk(tmp_path, trace, capsys):
    scen = tmp_path / "s.toml"
    scen.write_text('[guest]\nos_vmpl = 0\n[trace]\nfile = "tiny.arrow"\n[migration]\nstart_ns = 1000\n')
    (tmp_path / "tiny.arrow").write_bytes(trace.read_bytes()) if trace.parent != tmp_path else None
    assert main(["run", str(scen), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("format", "version", "status", "strategy", "mode", "scenario", "trace", "metrics", "digests"):
        assert key in s
    for key in ("total_ns", "setup_ns", "downtime_ns", "expected_downtime_ns", "downtime_limit_exceeded", "rounds",
                "pages_sent", "zero_pages", "bytes_sent", "precopy_bytes", "downtime_bytes", "agents_max", "cpu_ns",
                "guest_slowdown_ppm", "rmp", "faults"):
        assert key in s["metrics"], key
    assert set(s["digests"]) == {"no_migration", "end_of_trace", "source_at_switchover", "target_at_switchover"}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["events.arrow", "rounds.arrow", "summary.json"]


def test_dirtying_faster_than_the_link_never_converges(tmp_path):
    # stress: each of 2 vCPUs rewrites its half of a 4 MiB guest page by page, 200K pages/s in all, over a
    # 100 MB/s link (~24K pages/s): every round re-sends nearly the whole guest; pre-copy ends at max_rounds
    # with the downtime limit exceeded, as QEMU would.
    from replay.generators import generate

    trace = tmp_path / "stress.arrow"
    generate("stress", trace, guest_bytes=4 << 20, vcpus=2, events=400_000, seed=1, rate=200_000)
    s = make_scenario(trace={"file": "x"}, migration={"start_ns": 10_000_000, "bandwidth_bytes_per_s": 100_000_000,
                                                       "downtime_limit_ns": 10_000_000, "max_rounds": 5})
    for strategy in ("mirror-vm", "shadow-vcpu"):
        m = run(s, strategy=strategy, trace_path=trace).summary["metrics"]
        assert (m["switchover_reason"], m["rounds"], m["downtime_limit_exceeded"]) == ("max_rounds", 5, True)
        assert m["expected_downtime_ns"] > 10_000_000
        rounds = run(s, strategy=strategy, trace_path=trace).rounds.to_pylist()
        assert all(r["dirty_pages"] > 900 for r in rounds[1:5])  # of 1024 pages: the whole guest, again


def test_shipped_stress_scenario_does_not_converge():
    import json
    from pathlib import Path

    for strategy in ("mirror-vm", "shadow-vcpu"):
        golden = Path(__file__).parent / "golden" / "stress-nonconverging" / strategy / "summary.json"
        m = json.loads(golden.read_text())["metrics"]
        assert m["switchover_reason"] == "max_rounds" and m["downtime_limit_exceeded"] is True
