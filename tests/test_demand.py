"""The guest's CPU demand and quota (replay.model.demand) by hand: demand steps from idle intervals, progress
under agents that take the guest's spare quota first, both engines' transfer clocks against the same
rule, and the runs the issue names (an idle guest, a half-busy one whose agents fit its quota, one whose
agents exceed it) with every figure computed here from the documented rule."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from replay.model.demand import build_demand, check_cpu_demand, check_cpu_quota
from replay.engines.common import ENGINE_KINDS
from replay.engines import make_engine
from replay.core.errors import ScenarioError
from replay.migration import run
from test_precopy import write_trace
from test_qemu_loop import scenario

# -- building the steps


def test_idle_intervals_become_busy_counts():
    # vCPU 0 idle [10, 20), vCPU 1 idle [15, 30); the trace's last event at 100: idle from 101 on.
    d = build_demand("trace", "", 2, 100, ((10, 20), (15, 30)))
    assert d.model == "trace-idle"
    assert d.at_ns.tolist() == [0, 10, 15, 20, 30, 101]
    assert d.mcpu.tolist() == [2000, 1000, 0, 1000, 2000, 0]


def test_several_idle_intervals_per_vcpu():
    # vCPU 0 idle [10, 20) and [40, 50); vCPU 1 [30, 60): 2 CPUs busy but where one or both are idle.
    d = build_demand("trace", "", 2, 100, ((10, 20, 40, 50), (30, 60)))
    assert d.at_ns.tolist() == [0, 10, 20, 30, 40, 50, 60, 101]
    assert d.mcpu.tolist() == [2000, 1000, 2000, 1000, 0, 1000, 2000, 0]
    assert d.integral_ns(0, 101) == 2 * 101 - 20 - 30


def test_a_trace_without_activity_is_busy_to_its_last_event_then_idle():
    d = build_demand("trace", "", 4, 999, None)
    assert (d.model, d.at_ns.tolist(), d.mcpu.tolist()) == ("trace-span", [0, 1000], [4000, 0])
    assert build_demand("trace", "", 4, None, None).mcpu.tolist() == [0]  # no events: nothing to do


def test_busy_fraction_and_quota():
    assert build_demand("busy", "", 3, 5, None).mcpu.tolist() == [3000]  # after the end too
    f = build_demand("0.5", "", 3, 99, None)
    assert (f.at_ns.tolist(), f.mcpu.tolist()) == ([0, 100], [1500, 0])
    q = build_demand("busy", "2.5", 4, 5, None)
    assert (q.quota_mcpu, q.mcpu.tolist()) == (2500, [2500])  # demand above the quota is the quota


def test_idle_interval_past_the_last_event_extends_the_trace():
    d = build_demand("trace", "", 1, 50, ((40, 80),))
    assert (d.at_ns.tolist(), d.mcpu.tolist()) == ([0, 40], [1000, 0])


@pytest.mark.parametrize("value,want", [("trace", "trace"), ("busy", "busy"), (0.5, "0.5"), ("0.25", "0.25"),
                                        (1, "1"), (0, "0"), ("1.000000", "1")])
def test_cpu_demand_values(value, want):
    assert check_cpu_demand(value, "x") == want


@pytest.mark.parametrize("value", ["half", 1.5, -0.1, "0.1234567", True, [1], ""])
def test_cpu_demand_refused(value):
    with pytest.raises(ScenarioError, match="expected \"trace\", \"busy\" or a fraction"):
        check_cpu_demand(value, "x")


@pytest.mark.parametrize("value,want", [(0, ""), ("", ""), (2, "2"), (2.5, "2.5"), ("0.001", "0.001"),
                                        (2**20, str(2**20))])
def test_cpu_quota_values(value, want):
    assert check_cpu_quota(value, "x") == want


@pytest.mark.parametrize("value", [-1, "two", 2**21, "1048576.000001", "0.0000001", False])
def test_cpu_quota_refused(value):
    with pytest.raises(ScenarioError, match="number of CPUs"):
        check_cpu_quota(value, "x")


# -- progress: the rule against an exact model of this test's own


def exact_advance(at, mcpu, q, g, dv, agent, direct):
    """Fluid model with Fractions: agents take agent/dv CPUs and the faults direct/dv, evenly; in a step of
    demand d the guest's progress rate is 1 - (max(0, agent_rate - (q - d)) + direct_rate) / d, at least 0."""
    g = Fraction(g)
    rem = Fraction(dv)
    a, w = Fraction(agent * 1000, dv), Fraction(direct * 1000, dv)
    i = max(k for k in range(len(at)) if at[k] <= g)
    while rem > 0:
        d = mcpu[i]
        rate = Fraction(1) if d == 0 else max(Fraction(0), 1 - (max(Fraction(0), a - (q - d)) + w) / d)
        end = at[i + 1] if i + 1 < len(at) else None
        if rate == 0:
            return g
        if end is None or (end - g) / rate >= rem:
            return g + rem * rate
        rem -= (end - g) / rate
        g, i = Fraction(end), i + 1
    return g


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 400), st.integers(0, 4)), min_size=1, max_size=6),
       st.integers(1, 4), st.integers(0, 2000), st.integers(1, 3000), st.integers(0, 6000), st.integers(0, 500),
       st.integers(0, 2))
def test_advance_matches_the_fluid_model(steps, vcpus, g0, dv, agent, direct, extra_quota):
    at, mc, t = [0], [vcpus * 1000], 0
    for length, busy in steps:
        t += length
        at.append(t)
        mc.append(min(busy, vcpus) * 1000)
    q = (vcpus + extra_quota) * 1000
    from replay.model.demand import Demand

    d = Demand("test", np.array(at, np.uint64), np.array(mc, np.int64), q, vcpus)
    got = d.advance(g0, dv, agent, direct)
    want = exact_advance(at, mc, q, g0, dv, agent, direct)
    # Integer floors: at most one ns per step crossed, never ahead of the exact progress by more than that.
    assert abs(got - want) <= len(at) + 1
    assert g0 <= got <= g0 + dv


# -- both engines' transfer clocks follow the same demand steps


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30_000), st.integers(0, 2)), min_size=0, max_size=5),
       st.integers(1, 3), st.integers(1, 40), st.integers(100, 5000), st.booleans(), st.integers(0, 1))
def test_engines_agree_on_the_transfer_clock_under_demand(steps, agents, npages, pack, fair, extra):
    at, mc, t = [0], [2000], 0
    for length, busy in steps:
        t += length
        at.append(t)
        mc.append(busy * 1000)
    out = []
    for kind in ENGINE_KINDS:
        eng = make_engine(kind, npages=npages, vcpus=2, hosts=2)
        eng.launch(0, [])
        eng.begin_transfer(0, 0, bandwidth_bytes_per_s=10**15, page_bytes=4096, header_bytes=64,
                           pack_private_ns=pack, pack_zero_ns=pack, batch_pages=64, vmgexit_ns=0, charge_guest=True,
                           agents=agents, fair=fair, src_shared=True, demand_at_ns=np.array(at, np.uint64),
                           demand_mcpu=np.array(mc, np.int64), quota_mcpu=(2 + extra) * 1000)
        eng.transfer(0, 1, np.arange(npages, dtype=np.uint32), 0, None, 0, 0, 0)
        out.append(eng.transfer_state())
    assert out[0] == out[1]


def test_transfer_clock_by_hand_across_a_demand_step():
    # 2 vCPUs, quota 2, one shadow agent packing 1000 ns pages on an unlimited link. Demand 2 CPUs until
    # trace time 2000, then 0. Busy: fair gives the agent 1 x 2/(2+1) = 2/3 CPU, a page every 1500 ns, and
    # the guest loses 1000/2 = 500 ns per page. Page 1: v=1500, g=1000; page 2: v=3000, g=2000: the guest
    # enters the idle step, re-based there; from then the agent has a whole CPU and the guest loses nothing:
    # page 3: v=4000, g=3000; page 4: v=5000, g=4000.
    for kind in ENGINE_KINDS:
        eng = make_engine(kind, npages=4, vcpus=2, hosts=2)
        eng.launch(0, [])
        gs = []
        eng.begin_transfer(0, 0, bandwidth_bytes_per_s=10**15, page_bytes=4096, header_bytes=0, pack_private_ns=1000,
                           pack_zero_ns=1000, batch_pages=64, vmgexit_ns=0, charge_guest=True, agents=1, fair=True,
                           src_shared=True, demand_at_ns=np.array([0, 2000], np.uint64),
                           demand_mcpu=np.array([2000, 0], np.int64), quota_mcpu=2000)
        for k in range(4):
            eng.transfer(0, 1, np.array([k], np.uint32), 0, None, 0, 0, 0)
            st_ = eng.transfer_state()
            gs.append((st_["v_ns"], st_["g_ns"]))
        assert gs == [(1500, 1000), (3000, 2000), (4000, 3000), (5000, 4000)], kind


# -- whole runs: idle, within the quota, beyond it


def _round0(tmp_path, *, agents, demand, sharing="fair", quota=None, strategy="shadow-vcpu", late_event=True):
    """8 private pages filled at t 0..7, then (late_event) one write at 1 s so that the trace's work spans
    the migration; shadow agents packing 3000 ns a page on a link that never limits; migration at 1000 ns.
    Returns round 0 (the one burst that sends every page) and the metrics."""
    rows = [(i, 0, i) for i in range(8)] + ([(10**9, 1, 0)] if late_event else [])
    trace = write_trace(tmp_path / "t.arrow", rows, npages=8, vcpus=2)
    s = scenario(strategy, bw=10**15, limit=10**9, pack=3000, burst=10**9, period=10**9, sharing=sharing,
                 agents=agents, sync_ns=0, latency=0, demand=demand)
    if quota is not None:
        import dataclasses

        s = dataclasses.replace(s, guest=dataclasses.replace(s.guest, cpu_quota=quota))
    r = run(s, strategy=strategy, trace_path=trace)
    rnd = r.rounds.to_pylist()[0]
    return rnd["end_ns"] - rnd["start_ns"], rnd["guest_progress_ns"], r.summary["metrics"]


def test_idle_guest_loses_nothing_to_shadow_agents(tmp_path):
    # The migration starts after the trace's last event: no demand, the 2 agents get 2 CPUs (12000 ns for
    # 24000 ns of packing) and the guest loses no progress at all.
    dur, progress, m = _round0(tmp_path, agents=2, demand="trace", late_event=False)
    assert (dur, progress) == (12000, 12000)
    assert m["guest_slowdown_ppm"] == 0 and m["guest_lost_ns"] == 0
    assert m["cpu_ns"]["guest"] == 0 and m["cpu_demand"]["demanded_ns"] == 0


def test_half_busy_guest_with_agents_within_its_quota_loses_nothing(tmp_path):
    # 2 vCPUs, half busy (1 CPU), quota 2: one agent fits in the spare CPU (1 + 1 <= 2): 24000 ns, no loss.
    dur, progress, m = _round0(tmp_path, agents=1, demand="0.5")
    assert (dur, progress) == (24000, 24000)
    # Its only loss is the downtime's pause: 1 CPU x downtime, of 1 CPU x the window demanded.
    assert m["guest_lost_ns"] == m["downtime_ns"]
    assert m["guest_slowdown_ppm"] == m["downtime_ns"] * 1_000_000 // m["total_ns"]


def test_half_busy_guest_with_agents_beyond_its_quota_loses_the_excess(tmp_path):
    # Two agents beside 1 busy CPU under a quota of 2: fair gives every runnable thread 2/3 of a CPU; the
    # agents 4/3 CPU: 24000 ns of packing takes 18000 ns; the guest gets 2/3 CPU for a demand of 1: it
    # progresses 18000 x 2/3 = 12000. The excess: agents took 24000 ns of CPU, the spare was 18000 x 1.
    dur, progress, _ = _round0(tmp_path, agents=2, demand="0.5")
    assert (dur, progress) == (18000, 12000)
    # agents first: 2 CPUs for the agents (12000 ns), nothing left for the guest.
    dur, progress, _ = _round0(tmp_path, agents=2, demand="0.5", sharing="agents-first")
    assert (dur, progress) == (12000, 0)


def test_a_quota_above_the_vcpus_makes_room_for_an_agent(tmp_path):
    # Busy guest (2 CPUs) with a quota of 3: one agent fits (2 + 1 <= 3): 24000 ns, no loss. With the
    # default quota (2) it would get 2/3 CPU (36000 ns) and the guest would lose 36000 - 24000/2 ... :
    dur, progress, _ = _round0(tmp_path, agents=1, demand="busy", quota="3")
    assert (dur, progress) == (24000, 24000)
    dur, progress, _ = _round0(tmp_path, agents=1, demand="busy")
    assert (dur, progress) == (36000, 36000 - 24000 // 2)


def test_mirror_agents_never_touch_the_guest_and_report_what_they_take(tmp_path):
    dur, progress, m = _round0(tmp_path, agents=2, demand="busy", strategy="mirror-vm")
    assert progress == dur
    assert m["guest_lost_ns"] == 2 * m["downtime_ns"]  # the pause alone, on both busy vCPUs
    window = m["total_ns"]
    assert m["cpu_demand"]["host_cpus_taken_milli"] == (m["cpu_ns"]["mirror_vm"] + m["cpu_ns"]["host"]) * 1000 // window


def test_a_trace_ending_at_the_last_representable_time():
    # Its work ends "after" 2^64 - 1: the steps stay uint64 (idle from 2^64 - 1 itself).
    d = build_demand("trace", "", 2, (1 << 64) - 1, None)
    assert (d.at_ns.tolist(), d.mcpu.tolist()) == ([0, (1 << 64) - 1], [2000, 0])


def test_advance_edges():
    d = build_demand("trace", "", 2, 99, None)  # busy [0, 100), idle after
    assert d.advance(5, 3) == 8  # nothing taken: the guest runs
    assert d.advance(200, 50, agent_ns=10_000, direct_ns=7) == 250  # idle: agents and faults take nothing
    assert d.advance(7, 0, agent_ns=10) == 7
    # Busy, 2 CPUs under a quota of 2: agents taking 1 CPU of 100 ns cost 50 ns of progress; a fault's
    # 10 ns costs 5 more (its vCPU's own time, one of the two busy ones).
    assert d.advance(0, 100, agent_ns=100) == 50
    assert d.advance(0, 100, agent_ns=100, direct_ns=10) == 45
    assert d.advance(0, 100, direct_ns=1) == 100  # 0.5 ns lost rounds down
    assert d.advance(0, 100, direct_ns=2) == 99


def test_quota_floor():
    from replay.model.demand import quota_mcpu

    assert quota_mcpu("0.001", 4) == 1 and quota_mcpu("0.0005", 4) == 1 and quota_mcpu("", 3) == 3000
    with pytest.raises(ScenarioError, match=r"at most 1048576 \(at most 6 decimals\)"):
        check_cpu_quota(2**21, "x")


def test_integral_and_advance_stay_exact_integers():
    d = build_demand("trace", "", 2, 99, None)
    assert d.integral_ns(0, 200) == 200  # 2 CPUs for 100 ns, then idle
    assert d.integral_ns(50, 150) == 100 and d.integral_ns(150, 50) == 0
    # Agents take 0.3 CPU (plus 1 ns) of the 2 busy ones for 10^12 ns: the busy first 100 ns of trace run at
    # 1 - 0.15 of full speed, taking ceil(100 / 0.85) = 118 ns; the rest is idle and runs at full speed.
    got = d.advance(0, 10**12, agent_ns=3 * 10**11 + 1)
    assert type(got) is int and got == 100 + 10**12 - 118  # no float anywhere


def test_step_time_by_owner_and_side():
    # A step waits (PSP, firmware) and uses CPU on its owner's thread: host and mirror steps take their CPU
    # at full speed wherever the guest runs; a shadow step on the guest's side takes its fair share of the
    # quota beside the busy vCPUs (2 busy and 1 agent on a 2-CPU quota: 2/3 of a CPU each), elsewhere a whole CPU.
    from replay.migration.cpu import Cpu
    from replay.scenario.spec import make_scenario
    from replay.scenario.strategies import HOST, MIRROR_VM, PRIMARY_VM, Step, make_strategy

    s = make_scenario(trace={"file": "x"}, migration={"strategy": "shadow-vcpu"})
    cpu = Cpu(s, make_strategy(s), 2, build_demand("trace", "", 2, 10**9, None))
    for owner in (HOST, MIRROR_VM):
        assert cpu.step_ns(Step("x", 0, owner, cpu_ns=3_000, wait_ns=500), 0) == 3_500
    assert cpu.step_ns(Step("x", 0, PRIMARY_VM, cpu_ns=3_000, wait_ns=500), 0) == 500 + 4_500
    assert cpu.step_ns(Step("x", 1, PRIMARY_VM, cpu_ns=3_000, wait_ns=500), 0) == 500 + 3_000
    assert cpu.step_ns(Step("x", 0, PRIMARY_VM, cpu_ns=3_000), 0, g=2 * 10**9) == 3_000  # the guest is idle then
    assert cpu.takes_guest_cpu(PRIMARY_VM, 0, 0) and not cpu.takes_guest_cpu(MIRROR_VM, 0, 0)
    assert not cpu.takes_guest_cpu(PRIMARY_VM, 1, 0) and not cpu.takes_guest_cpu(PRIMARY_VM, 0, None)
