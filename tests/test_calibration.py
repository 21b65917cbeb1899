"""The calibration scenarios (scenarios/calibration/) reproduce the published shapes they were calibrated
on: N1, the remote fault latency of QEMU post-copy with many vCPUs (mode of the histogram in [128, 256) us,
mean within 25% of 232 us); N2, KVM's demand_paging_test rates against vCPUs (one shared userfaultfd
collapses ~50x from 2 to 64 vCPUs, KVM userfault exits ~4x: each within a factor 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from replay.migrate import run
from replay.scenario import load_scenario

CAL = Path(__file__).resolve().parent.parent / "scenarios" / "calibration"
PUBLISHED = {"kvm-exit": {2: 160_326, 8: 128_247, 64: 39_913}, "uffd-shared": {2: 86_840, 8: 37_912, 64: 1_664}}


def demand_paging_rate(delivery: str, vcpus: int) -> int:
    s = load_scenario(CAL / "n2-demand-paging.toml", [
        f"guest.vcpus={vcpus}", f"guest.size={vcpus}MiB", f"trace.events={256 * vcpus}",
        f"migration.fault_delivery={delivery}"])
    r = run(s)
    assert r.status == "completed"
    faults = r.faults.to_pylist()
    assert len(faults) == 256 * vcpus  # every page came by a fault
    span = max(f["served_ns"] for f in faults) - min(f["raised_ns"] for f in faults)
    return len(faults) * 1_000_000_000 // span


@pytest.mark.slow
def test_n2_contention_shapes():
    rates = {d: {n: demand_paging_rate(d, n) for n in (2, 8, 64)} for d in PUBLISHED}
    for d, pub in PUBLISHED.items():
        want, got = pub[2] / pub[64], rates[d][2] / rates[d][64]
        assert want / 2 <= got <= want * 2, (d, rates[d])
        for n in (2, 8, 64):  # and each rate itself is within 10% of the published one
            assert abs(rates[d][n] - pub[n]) <= pub[n] // 10, (d, n, rates[d][n])
    assert rates["uffd-shared"][64] * 10 < rates["kvm-exit"][64]  # the shared uffd collapses


def test_n1_latency_histogram():
    r = run(load_scenario(CAL / "n1-remote-faults.toml"))
    pc = r.summary["metrics"]["postcopy"]
    assert r.status == "completed" and pc["requests"] > 1000
    hist = pc["latency_hist"]
    mode = max(hist, key=lambda b: b["count"])
    assert (mode["bucket_us_lo"], mode["bucket_us_hi"]) == (128, 256)
    mean = pc["qemu"]["postcopy-latency"]
    assert abs(mean - 232_000) <= 232_000 // 4, mean
