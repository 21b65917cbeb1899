"""The guest's CPU demand and quota: when its vCPUs want to run, and how much CPU its VM may use.

A trace is a record of work. A vCPU demands CPU only while its workload runs: a halted (idle) vCPU
demands nothing, and neither does a guest after its trace's last event. The VM's CPU quota (a cgroup's
``cpu.max``) is a number of CPUs, by default one per vCPU. Migration work that runs on the guest's own quota
(shadow vCPUs on the side where the guest runs) slows the guest only where demand plus that work exceed the
quota; a write-protect fault of dirty tracking is the faulting vCPU's own time and always slows it.

The demand is a step function of trace time ``D(g)`` in milli-CPUs (busy vCPUs x 1000), capped at the
quota (a trace's timing already is what the guest achieved under its quota when it was recorded), built
from ``guest.cpu_demand``:

- ``"trace"`` (the default): the trace's recorded idle intervals (``vcpu_idle``, trace format version 2)
  where it has them; otherwise every vCPU busy from time 0 to the trace's last event. Idle after the end.
- ``"busy"``: every vCPU busy at all times, after the trace's end too (the model of earlier versions).
- a fraction ``f`` in [0, 1]: ``f x vCPUs`` CPUs busy, constantly, up to the trace's last event.

Progress: over ``dv`` of virtual time in which ``agent`` ns of quota CPU go to the agents (spread evenly)
and ``direct`` ns to write-protect faults, a step with demand ``D`` under quota ``Q`` progresses at the
rate left: the guest loses ``(max(0, 1000 agent - (Q - D) dv) + 1000 direct) / D`` of progress over the
step (none when idle). ``Demand.advance`` walks the steps; the engines do the same per transfer
(``begin_transfer``'s ``demand_*`` arguments), re-basing at each step they enter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..core.errors import ScenarioError

MILLI = 1000
PPM = 1_000_000
DEMAND_MODELS = ("trace", "busy")
_DECIMAL = re.compile(r"^(0|[1-9][0-9]*)(\.[0-9]{1,6})?$")


def _decimal_micro(text: str) -> int | None:
    """A plain decimal with at most 6 places, in millionths; None if it is not one."""
    m = _DECIMAL.match(text)
    if not m:
        return None
    whole, frac = m.group(1), (m.group(2) or ".")[1:]
    return int(whole) * PPM + int(frac.ljust(6, "0") or 0)


def canonical_number(value) -> str | None:
    """A TOML int, float or string holding a decimal, as its canonical text ("0.5", "2"); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        text = repr(value)
        if "e" in text or "E" in text:
            text = f"{value:.6f}"
    elif isinstance(value, str):
        text = value.strip()
    else:
        return None
    micro = _decimal_micro(text)
    if micro is None:
        return None
    whole, frac = divmod(micro, PPM)
    return str(whole) if not frac else f"{whole}.{frac:06d}".rstrip("0")


def check_cpu_demand(value, where: str) -> str:
    """``guest.cpu_demand``: "trace", "busy" or a fraction in [0, 1]; its canonical text."""
    if isinstance(value, str) and value.strip() in DEMAND_MODELS:
        return value.strip()
    text = canonical_number(value)
    if text is None or _decimal_micro(text) > PPM:
        raise ScenarioError(f"{where}: expected \"trace\", \"busy\" or a fraction of the vCPUs between 0 and 1 "
                            f"(at most 6 decimals), got {str(value)[:40]!r}")
    return text


def check_cpu_quota(value, where: str) -> str:
    """``guest.cpu_quota``: CPUs (> 0, at most 6 decimals), or "" / 0 for one per vCPU; its canonical text."""
    if not isinstance(value, bool) and value in ("", 0):
        return ""
    text = canonical_number(value)
    if text is None or _decimal_micro(text) == 0 or _decimal_micro(text) > (1 << 20) * PPM:
        raise ScenarioError(f"{where}: expected a number of CPUs > 0 and at most {1 << 20} (at most 6 decimals), "
                            f"or 0 for one per vCPU, got {str(value)[:40]!r}")
    return text


def quota_mcpu(cpu_quota: str, vcpus: int) -> int:
    """The quota in milli-CPUs (at least 1)."""
    if not cpu_quota:
        return MILLI * vcpus
    return max(1, _decimal_micro(cpu_quota) // MILLI)


def agent_share(agents: int, demand_mcpu: int, quota_mcpu: int, fair: bool) -> tuple[int, int]:
    """CPUs (num, den) that ``agents`` agents on the guest's quota get beside ``demand_mcpu`` busy vCPUs:
    fair (CFS), min(1, Q/(D+A)) of a CPU each; agents first, min(A, Q). (The Cython engine's
    shared_capacity is the same rule.)"""
    a = MILLI * agents
    if not fair:
        return min(a, quota_mcpu), MILLI
    return (agents, 1) if demand_mcpu + a <= quota_mcpu else (agents * quota_mcpu, demand_mcpu + a)


@dataclass(frozen=True)
class Demand:
    """The guest's demand steps over trace time and its quota. ``at_ns[0] == 0``; step i holds from
    ``at_ns[i]`` to ``at_ns[i + 1]`` (the last forever); ``mcpu`` is already capped at the quota."""

    model: str  # what it was built from: "trace-idle", "trace-span", "busy" or "fraction"
    at_ns: np.ndarray  # uint64
    mcpu: np.ndarray  # int64
    quota_mcpu: int
    vcpus: int

    def step(self, g: int) -> int:
        return int(np.searchsorted(self.at_ns, np.uint64(g), side="right")) - 1

    def at(self, g: int) -> int:
        """Demand at trace time ``g``, milli-CPUs."""
        return int(self.mcpu[self.step(g)])

    def engine_args(self) -> dict:
        return dict(demand_at_ns=self.at_ns, demand_mcpu=self.mcpu, quota_mcpu=self.quota_mcpu)

    def integral_ns(self, g0: int, g1: int) -> int:
        """CPU-ns the guest demands over trace time [g0, g1)."""
        if g1 <= g0:
            return 0
        total = 0
        i = self.step(g0)
        g = g0
        n = len(self.at_ns)
        while g < g1:
            end = int(self.at_ns[i + 1]) if i + 1 < n else g1
            e = min(end, g1)
            total += int(self.mcpu[i]) * (e - g)
            g, i = e, i + 1
        return total // MILLI

    def advance(self, g: int, dv: int, agent_ns: int = 0, direct_ns: int = 0) -> int:
        """Guest progress after ``dv`` of virtual time from trace time ``g`` while ``agent_ns`` of its quota go
        to agents and ``direct_ns`` to write-protect faults, both spread evenly over ``dv``."""
        if dv <= 0:
            return g
        if agent_ns == 0 and direct_ns == 0:
            return g + dv
        q, n = self.quota_mcpu, len(self.at_ns)
        i, rem = self.step(g), dv
        while rem > 0:
            d = int(self.mcpu[i])
            end = int(self.at_ns[i + 1]) if i + 1 < n else None
            # Progress lost over t ns of this step: floor(t * x / (d * dv)).
            x = max(0, MILLI * agent_ns - (q - d) * dv) + MILLI * direct_ns if d else 0
            full = d * dv
            if x and x >= full:
                return g  # the agents take all the quota: no progress in a busy step
            if end is None:
                return g + rem - (rem * x // full if x else 0)
            need = end - g
            # The virtual time that covers the rest of the step: t = ceil(need x full / (full - x)) gives
            # t - floor(t x / full) >= t - t x / full >= need.
            t = need if not x else -(-need * full // (full - x))
            if t > rem:
                return g + rem - (rem * x // full if x else 0)
            g, rem, i = end, rem - t, i + 1
        return g

    def to_json(self) -> dict:
        """What a run record says about the demand model (integers only)."""
        return {"model": self.model, "quota_cpus_milli": self.quota_mcpu, "steps": int(len(self.at_ns)),
                "peak_cpus_milli": int(self.mcpu.max())}


def build_demand(cpu_demand: str, cpu_quota: str, vcpus: int, last_t_ns: int | None,
                 vcpu_idle: tuple[tuple[int, ...], ...] | None) -> Demand:
    """The demand steps of a guest of ``vcpus`` vCPUs whose trace ends at ``last_t_ns`` (None: empty)."""
    q = quota_mcpu(cpu_quota, vcpus)
    busy = MILLI * vcpus
    # The trace's work ends after its last event (a trace may end at 2^64 - 1: the step times are uint64).
    end = 0 if last_t_ns is None else min(last_t_ns + 1, (1 << 64) - 1)
    if cpu_demand == "busy":
        return _steps("busy", [0], [busy], q, vcpus)
    if cpu_demand != "trace":
        per = _decimal_micro(cpu_demand)
        return _steps("fraction", [0, end], [per * vcpus // MILLI, 0], q, vcpus)
    if vcpu_idle is None:
        return _steps("trace-span", [0, end], [busy, 0], q, vcpus)
    # Busy except inside idle intervals: -1 CPU at each start, +1 at each end; idle after the trace's end
    # (its last event or its last recorded idle interval, whichever is later).
    starts = [np.asarray(iv[0::2], dtype=np.uint64) for iv in vcpu_idle]
    ends = [np.asarray(iv[1::2], dtype=np.uint64) for iv in vcpu_idle]
    last_idle = max((int(e[-1]) for e in ends if len(e)), default=0)
    end = max(end, last_idle)
    t = np.concatenate([np.zeros(1, np.uint64), *starts, *ends, np.array([end], np.uint64)])
    dlt = np.concatenate([np.array([busy], np.int64), *[np.full(len(s), -MILLI, np.int64) for s in starts],
                          *[np.full(len(e), MILLI, np.int64) for e in ends], np.array([0], np.int64)])
    order = np.argsort(t, kind="stable")
    t, dlt = t[order], dlt[order]
    level = np.cumsum(dlt)
    level[t >= np.uint64(end)] = 0
    return _steps("trace-idle", t.tolist(), level.tolist(), q, vcpus)


def _steps(model: str, at: list, mcpu: list, q: int, vcpus: int) -> Demand:
    """Steps from (time, demand) pairs in time order: at equal times the later pair wins; equal neighbours
    merge; demand is capped at the quota."""
    at_a = np.asarray(at, dtype=np.uint64)
    mc = np.minimum(np.asarray(mcpu, dtype=np.int64), q)
    last = np.append(at_a[1:] != at_a[:-1], True)
    at_a, mc = at_a[last], mc[last]
    keep = np.append(True, mc[1:] != mc[:-1])
    at_a, mc = at_a[keep], mc[keep]
    return Demand(model, np.ascontiguousarray(at_a), np.ascontiguousarray(mc), q, vcpus)
