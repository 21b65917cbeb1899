"""Synthetic workloads: determinism, chunk independence, and each generator's defining property."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from replay.core.errors import UsageError
from replay.traces.generators import GENERATORS, PIECE, generate, hot_pages_of
from replay.model.snp import Op
from replay.traces.format import open_trace

MiB = 1 << 20


def gen(tmp_path, kind, name=None, **kw):
    args = dict(guest_bytes=8 * MiB, vcpus=2, events=20_000, seed=1)
    args.update(kw)
    return generate(kind, tmp_path / (name or f"{kind}.arrow"), **args)


def table(meta) -> dict[str, np.ndarray]:
    with open_trace(meta.path) as r:
        batches = [b for _, b in r]
    t = pa.Table.from_batches(batches) if batches else None
    return {k: t.column(k).to_numpy() for k in t.column_names}


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_deterministic_and_seed_dependent(tmp_path, kind):
    a = gen(tmp_path, kind, "a.arrow")
    b = gen(tmp_path, kind, "b.arrow", compression=None)
    c = gen(tmp_path, kind, "c.arrow", seed=2)
    assert a.digest == b.digest != c.digest
    assert a.events == 20_000 and a.source["generator"] == kind and a.source["seed"] == 1
    assert all(not isinstance(v, float) for v in a.source.values())


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_chunking_does_not_change_the_trace(tmp_path, kind):
    # Events straddle several internal pieces; tiny chunks and batches must give the same content.
    kw = dict(events=2 * PIECE + 123, fill=True, read_ppm=250_000)
    big = gen(tmp_path, kind, "big.arrow", **kw)
    tiny = gen(tmp_path, kind, "tiny.arrow", chunk_rows=997, batch_rows=5000, **kw)
    assert big.digest == tiny.digest


def test_common_parameters(tmp_path):
    m = gen(tmp_path, "uniform", vcpus=3, rate=3_000_000, read_ppm=300_000, events=30_000)
    t = table(m)
    i = np.arange(30_000, dtype=np.uint64)
    np.testing.assert_array_equal(t["t_ns"], i * 10**9 // 3_000_000)  # exact integer time
    np.testing.assert_array_equal(t["vcpu"], i % 3)
    assert set(np.unique(t["op"])) == {Op.WRITE, Op.READ}
    assert abs((t["op"] == Op.READ).mean() - 0.3) < 0.02
    assert (t["len"] == 8).all() and (t["gpa"] % 8 == 0).all()
    assert m.shared_ranges == ()


def test_fill_writes_every_page_first(tmp_path):
    m = gen(tmp_path, "hotcold", fill=True, events=1000)
    npages = 8 * MiB // 4096
    assert m.events == npages + 1000 and m.source["fill"] is True
    t = table(m)
    np.testing.assert_array_equal(t["gpa"][:npages], np.arange(npages, dtype=np.uint64) * 4096)
    assert (t["len"][:npages] == 4096).all() and (t["op"][:npages] == Op.WRITE).all()
    assert (np.diff(t["t_ns"]) >= 0).all()


def test_uniform_len_crosses_pages(tmp_path):
    m = gen(tmp_path, "uniform", len=6000, events=5000)
    t = table(m)
    assert (t["len"] == 6000).all() and (t["gpa"] + 6000 <= 8 * MiB).all()
    assert ((t["gpa"] >> 12) != ((t["gpa"] + 5999) >> 12)).all()  # 6000 bytes always span 2+ pages
    assert (t["gpa"] % 8 != 0).any()  # byte-granular


def test_stress_each_vcpu_walks_its_slice(tmp_path):
    vcpus, guest = 4, 8 * MiB
    m = gen(tmp_path, "stress", vcpus=vcpus, guest_bytes=guest, events=3 * (guest // 4096) + 40)
    t = table(m)
    sl = guest // vcpus
    assert m.source["slice_bytes"] == sl and m.source["access_bytes"] == 4096
    for v in range(vcpus):
        g = t["gpa"][t["vcpu"] == v]
        assert ((g >= v * sl) & (g < (v + 1) * sl)).all()
        steps = np.diff(g.astype(np.int64))
        # In address order, page by page, wrapping to the slice start after each pass.
        assert set(np.unique(steps)) <= {4096, -(sl - 4096)}
        assert g[0] == v * sl and (steps < 0).sum() >= 2
    np.testing.assert_array_equal(t["vcpu"][:8], [0, 1, 2, 3, 0, 1, 2, 3])


def test_ab_pass_after_pass(tmp_path):
    m = gen(tmp_path, "ab", guest_bytes=4 * MiB, events=3 * 768 + 5)  # 1MiB..4MiB: 768 pages a pass
    assert (m.source["start"], m.source["end"]) == (MiB, 4 * MiB)
    t = table(m)
    assert (t["len"] == 1).all() and (t["vcpu"] == 0).all() and (t["gpa"] % 4096 == 0).all()
    pages = (t["gpa"] >> 12).astype(np.int64)
    expect = 256 + np.arange(len(pages)) % 768
    np.testing.assert_array_equal(pages, expect)
    with pytest.raises(UsageError, match="empty range"):
        gen(tmp_path, "ab", guest_bytes=MiB)
    with pytest.raises(UsageError, match="one byte"):
        gen(tmp_path, "ab", access_bytes=8)


def test_hotcold_hot_set(tmp_path):
    m = gen(tmp_path, "hotcold", guest_bytes=16 * MiB, events=40_000, hot_bytes=MiB)
    assert m.source["hot_probability_ppm"] == 800_000 and m.source["hot_bytes"] == MiB
    t = table(m)
    hot = hot_pages_of(m.source, m.guest_bytes, 1)
    assert len(hot) == 256 and len(np.unique(hot)) == 256
    in_hot = np.isin(t["gpa"] >> 12, hot)
    assert abs(in_hot.mean() - 0.8) < 0.02  # ~80% of the writes land in 1/16 of memory
    assert hot.max() - hot.min() > 8 * MiB // 4096  # scattered, not one block


def test_hotcold_zipf_and_options(tmp_path):
    m = gen(tmp_path, "hotcold", zipf_ppm=1_200_000, events=40_000)
    assert m.source["mode"] == "zipf" and m.source["zipf_ppm"] == 1_200_000
    pages = table(m)["gpa"] >> 12
    counts = np.sort(np.bincount(pages.astype(np.int64)))[::-1]
    assert counts[0] > 20 * np.median(counts[counts > 0])  # heavy head
    f = gen(tmp_path, "hotcold", "f.arrow", hot_fraction_ppm=100_000)
    assert f.source["hot_bytes"] == (2048 * 100_000 // 1_000_000) * 4096
    with pytest.raises(UsageError, match="at most one"):
        gen(tmp_path, "hotcold", hot_bytes=MiB, zipf_ppm=1_000_000)


def test_phased_windows(tmp_path):
    m = gen(tmp_path, "phased", phases=4, events=40_000)
    t = table(m)
    wb = m.source["window_bytes"]
    assert wb == 8 * MiB // 8
    for k in range(4):
        g = t["gpa"][k * 10_000:(k + 1) * 10_000]
        lo = g.min()
        assert g.max() < lo + wb
        assert lo // wb == (k * (8 * MiB - wb) // 3) // wb  # evenly spread, phase by phase


def test_psc_conversions_consistent(tmp_path):
    m = gen(tmp_path, "psc", events=60_000, burst_every=500, burst_pages=32, shared_bytes=MiB, read_ppm=100_000)
    assert m.shared_ranges == ((0, 255),)
    t = table(m)
    npages = 8 * MiB // 4096
    shared = np.zeros(npages, bool)
    shared[:256] = True
    conv = np.flatnonzero(t["op"] >= Op.TO_SHARED)
    assert (t["op"][conv] == Op.TO_SHARED).sum() > 100 and (t["op"][conv] == Op.TO_PRIVATE).sum() > 100
    assert (t["len"][conv] == 4096).all() and (t["gpa"][conv] % 4096 == 0).all()
    for i in conv:  # replay the state machine: never convert a page to the state it is in
        g = int(t["gpa"][i]) >> 12
        to_shared = t["op"][i] == Op.TO_SHARED
        assert shared[g] != to_shared, f"row {i}: page {g} already {'shared' if to_shared else 'private'}"
        shared[g] = to_shared


def test_unknown_options_hint(tmp_path):
    with pytest.raises(UsageError, match="did you mean 'hot_bytes'"):
        gen(tmp_path, "hotcold", hot_byte=MiB)
    with pytest.raises(UsageError, match="did you mean 'uniform'"):
        gen(tmp_path, "unifrom")
    with pytest.raises(UsageError, match="power of two"):
        gen(tmp_path, "uniform", access_bytes=12)
    with pytest.raises(UsageError, match="too small"):
        gen(tmp_path, "stress", guest_bytes=8192, vcpus=4)
    assert not any(p.suffix == ".tmp" for p in tmp_path.iterdir())


def test_utilization_lays_rows_out_on_a_run_idle_cycle(tmp_path):
    # 1 event per ms of run time, running 25% of each 40 ms: 10 ms busy then 30 ms halted. Row i is at busy
    # time i ms; trace time (i // 10) * 40 + i % 10 ms. 100 rows: the last busy part starts at 360 ms; nine
    # idle intervals [40k + 10, 40k + 40) ms before it, the same for every vCPU.
    from replay.traces.format import open_trace, read_meta

    meta = generate("uniform", tmp_path / "u.arrow", guest_bytes=1 << 20, vcpus=3, events=100, seed=1, rate=1000,
                    utilization_ppm=250_000, period_ns=40_000_000)
    ms = 1_000_000
    want_idle = tuple(x for k in range(9) for x in ((40 * k + 10) * ms, (40 * k + 40) * ms))
    assert meta.version == 3 and meta.vcpu_idle == (want_idle,) * 3
    assert read_meta(tmp_path / "u.arrow").vcpu_idle == (want_idle,) * 3
    with open_trace(tmp_path / "u.arrow") as r:
        t = [x for _, b in r for x in b.column("t_ns").to_pylist()]
    assert t == [((i // 10) * 40 + i % 10) * ms for i in range(100)]
    # Full utilization is the old trace: same rows, no idle key (version 3 now, as every new trace), no extra source keys.
    full = generate("uniform", tmp_path / "f.arrow", guest_bytes=1 << 20, vcpus=3, events=100, seed=1, rate=1000)
    assert full.version == 3 and full.vcpu_idle is None and "utilization_ppm" not in full.source


def test_utilization_refusals(tmp_path):
    with pytest.raises(UsageError, match="utilization_ppm 0 out of range 1..1000000"):
        generate("uniform", tmp_path / "u.arrow", guest_bytes=1 << 20, vcpus=1, events=10, seed=1, utilization_ppm=0)
    with pytest.raises(UsageError, match="period_ns 10 out of range"):
        generate("uniform", tmp_path / "u.arrow", guest_bytes=1 << 20, vcpus=1, events=10, seed=1, period_ns=10)
    assert not (tmp_path / "u.arrow").exists()
