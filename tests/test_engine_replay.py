"""Hand-checked replay and transfer cases (docs/internals.md, Engine API), run against both engines."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from replay.engines.common import RmpEntry
from replay.engines import make_engine
from replay.core.errors import TraceError
from replay.model.snp import Fault, Op, Rc

W, R, TS, TP = Op.WRITE, Op.READ, Op.TO_SHARED, Op.TO_PRIVATE
P = 4096
STOP = (1 << 64) - 1


@pytest.fixture
def e(engine_kind):
    eng = make_engine(engine_kind, npages=16, vcpus=2)
    eng.launch(0, [(12, 15)])  # gfns 12..15 shared, the rest private
    return eng


def versions(e, host=0):
    return list(e.versions(host, range(e.npages)))


def faults(e):
    return {k: v for k, v in e.counters()["faults"].items() if v}


# ---------------------------------------------------------------------------------------------- replay


def test_write_read_and_dirty_logging(e, make_batch):
    b = make_batch([(0, 0, 1 * P + 8, 8, W), (1, 1, 2 * P, 1, R), (2, 0, 13 * P, 4, W), (3, 1, 1 * P, 8, W)])
    assert e.replay(0, b, 0, 0, STOP) == 4
    assert versions(e)[:4] == [0, 2, 0, 0] and versions(e)[13] == 1
    assert e.page(0, 1) == (2, True, False, True)  # logging off: no DIRTY
    assert list(e.collect_dirty(0)) == []
    e.set_dirty_logging(0, True)
    b2 = make_batch([(5, 0, 9 * P, 1, W), (6, 0, 3 * P, 1, W), (7, 0, 14 * P, 1, W), (8, 1, 3 * P, 1, R)])
    assert e.replay(0, b2, 0, 0, STOP) == 4
    d = e.collect_dirty(0)
    assert d.dtype == np.uint32 and list(d) == [3, 9, 14]
    assert list(e.collect_dirty(0)) == []  # get-and-clear
    assert not e.page(0, 9).dirty and e.page(0, 9).version == 1
    e.set_dirty_logging(0, False)
    e.replay(0, b2, 0, 0, STOP)
    assert list(e.collect_dirty(0)) == []
    assert faults(e) == {} and e.counters()["rmp"]["psc"] == 0


def test_write_spanning_pages(e, make_batch):
    b = make_batch([(0, 0, P - 1, P + 2, W), (1, 0, 5 * P, 3 * P, W)])  # gfns 0..2, then 5..7
    assert e.replay(0, b, 0, 0, STOP) == 2
    assert versions(e)[:9] == [1, 1, 1, 0, 0, 1, 1, 1, 0]


def test_rmp_faults_are_per_page_and_counted(e, make_batch):
    # gfn 2's entry loses its validation (as an adversary's double PVALIDATE(0) would do)
    assert e.pvalidate(0, e.spa(0, 2), asid=1, gfn=2, vmpl=0, validate=False) == Rc.SUCCESS
    e.reset_counters()
    b = make_batch([(0, 0, 0, 1, W), (1, 1, P, 2 * P, W), (2, 0, 2 * P, 8, R)])
    assert e.replay(0, b, 0, 1000, STOP) == 3
    assert versions(e)[:3] == [1, 1, 0]  # the row's other page was written
    assert faults(e) == {"vc_not_validated": 2}
    assert e.counters()["first_faults"] == [[1001, "vc_not_validated", 2], [1002, "vc_not_validated", 2]]


def test_shared_access_to_assigned_page(e, make_batch):
    assert e.rmpupdate(0, e.spa(0, 12), assigned=True, asid=1, gfn=12) == Rc.SUCCESS
    b = make_batch([(0, 1, 12 * P, 1, R), (1, 1, 12 * P, 1, W)])
    assert e.replay(0, b, 0, 7, STOP) == 2
    assert e.page(0, 12).version == 0
    assert e.counters()["first_faults"] == [[7, "npf_shared_assigned", 12], [8, "npf_shared_assigned", 12]]


def test_to_shared_and_to_private(engine_kind, make_batch):
    e = make_engine(engine_kind, npages=8, vcpus=1, os_vmpl=1)
    e.launch(0, [(6, 7)])
    e.set_dirty_logging(0, True)
    e.reset_counters()
    b = make_batch([(0, 0, 2 * P, 1, TS), (1, 0, 2 * P, P, TS), (2, 0, 6 * P, 1, TP), (3, 0, 7 * P - 1, 2, TP)])
    assert e.replay(0, b, 0, 0, STOP) == 4
    # row 1 (already shared) and gfn 6 in row 3 (already private) do nothing
    assert e.counters()["rmp"] == {"rmpupdate": 3, "pvalidate": 3, "rmpadjust": 2, "psc": 3, "psmash": 0}
    assert e.rmp_entry(0, e.spa(0, 2)) == RmpEntry(False, 0, 0, False, False, False, False, (15, 0, 0, 0))
    for g in (6, 7):
        assert e.rmp_entry(0, e.spa(0, g)) == RmpEntry(True, 1, g, False, False, True, False, (15, 15, 0, 0))
    assert [e.page(0, g).private for g in range(8)] == [True, True, False, True, True, True, True, True]
    assert list(e.collect_dirty(0)) == [2, 6, 7]
    assert faults(e) == {}
    assert [e.page(0, g).version for g in range(8)] == [0] * 8
    w = make_batch([(4, 0, 2 * P, 1, W), (5, 0, 7 * P, 1, W)])
    assert e.replay(0, w, 0, 0, STOP) == 2 and faults(e) == {}


def test_stop_time_start_and_delays(e, make_batch):
    b = make_batch([(10, 0, 0, 1, W), (20, 1, P, 1, W), (30, 0, 2 * P, 1, W), (40, 1, 3 * P, 1, W)])
    assert e.replay(0, b, 0, 0, 20) == 1  # t >= stop is not applied
    assert e.last_stop == (Fault.NONE, 0, 0, 0)
    assert e.replay(0, b, 1, 0, 35) == 3
    assert versions(e)[:4] == [1, 1, 1, 0]
    assert e.replay(0, b, 3, 0, 40) == 3
    assert e.replay(0, b, 4, 0, STOP) == 4
    # delays shift a vCPU's rows; the first row whose effective time reaches stop ends the call
    e2 = make_engine("reference" if type(e).__module__.endswith("refengine") else "cython", npages=16, vcpus=2)
    e2.launch(0, [])
    assert e2.replay(0, b, 0, 0, 35, delays=[0, 10]) == 3  # effective 10, 30, 30, 50
    assert e2.replay(0, b, 0, 0, 30, delays=[0, 10]) == 1  # row 1: 20 + 10 = 30 >= 30
    assert e2.last_stop == (Fault.NONE, 0, 0, 0)


def test_delays_effective_time(engine_kind, make_batch):
    e = make_engine(engine_kind, npages=4, vcpus=2)
    e.launch(0, [])
    b = make_batch([(10, 0, 0, 1, W), (20, 1, P, 1, W), (30, 0, 2 * P, 1, W)])
    assert e.replay(0, b, 0, 0, 31, delays=np.array([0, 11], np.uint64)) == 1  # 20 + 11 = 31 >= 31
    assert e.replay(0, b, 0, 0, 32, delays=[0, 11]) == 3
    assert e.replay(0, b, 0, 0, STOP, delays=[STOP, 0]) == 0  # saturates at 2**64 - 1, >= stop
    with pytest.raises(ValueError):
        e.replay(0, b, 0, 0, STOP, delays=[0])


def test_userfault_stops_before_the_row(engine_kind, make_batch):
    e = make_engine(engine_kind, npages=8, vcpus=2)
    e.launch(0, [])
    e.begin_transfer(0, 0, bandwidth_bytes_per_s=10**9, page_bytes=P, header_bytes=0, agents=1,
                     pack_private_ns=0, pack_zero_ns=0, batch_pages=1, vmgexit_ns=0, charge_guest=False)
    assert e.transfer(0, 1, np.array([0, 1, 2], np.uint32), 0, None, 0, 0, 1) == (0, 3)
    b = make_batch([(0, 0, 0, 1, W), (1, 1, P, 2 * P + 1, W), (2, 0, 2 * P, 1, W)])  # row 1: gfns 1..3
    assert e.replay(1, b, 0, 0, STOP) == 1
    assert e.last_stop == (Fault.USERFAULT, 3, 1, 1)
    assert versions(e, 1)[:4] == [1, 0, 0, 0]  # no page of row 1 applied
    assert e.replay(1, b, 2, 0, STOP) == 3
    assert e.last_stop == (Fault.NONE, 0, 0, 0)
    assert faults(e) == {}


def test_row_errors(e, make_batch):
    for row, msg in [
        ((1, 2, 0, 1, W), "vcpu 2 >= vcpus 2"),
        ((1, 0, 0, 0, W), "len is 0"),
        ((1, 0, 15 * P + 1, P, W), r"gpa\+len beyond the guest \(16 pages\)"),
        ((1, 0, STOP, 1, W), r"gpa\+len beyond the guest"),
        ((1, 0, 0, 1, 4), "unknown op 4"),
    ]:
        before = versions(e)[0]
        b = make_batch([(0, 0, 0, 1, W), row])
        with pytest.raises(TraceError, match=r"event 51 \(batch row 1\): " + msg):
            e.replay(0, b, 0, 50, STOP)
        assert versions(e)[0] == before + 1  # the rows before were applied


def test_bad_batches(e, make_batch):
    b = make_batch([(0, 0, 0, 1, W)])
    bad = pa.RecordBatch.from_arrays([b.column(i).cast(pa.int64()) if i == 0 else b.column(i) for i in range(6)],
                                     names=b.schema.names)
    with pytest.raises(TypeError):
        e.replay(0, bad, 0, 0, STOP)
    with pytest.raises(TypeError):
        e.replay(0, b.to_pandas() if False else "nope", 0, 0, STOP)
    with pytest.raises(ValueError):
        e.replay(0, b, 2, 0, STOP)
    assert e.replay(0, make_batch([]), 0, 0, STOP) == 0
    nulls = pa.RecordBatch.from_arrays(
        [pa.array([None], t) if i == 2 else b.column(i) for i, t in enumerate(b.schema.types)], names=b.schema.names)
    with pytest.raises(TraceError):
        e.replay(0, nulls, 0, 0, STOP)


def test_sliced_batch_is_read_at_its_offset(e, make_batch):
    b = make_batch([(i, i % 2, (i % 12) * P, 1, W) for i in range(40)])
    s = b.slice(25, 10)  # column offsets are 25
    assert e.replay(0, s, 0, 25, STOP) == 10
    want = [0] * 16
    for i in range(25, 35):
        want[i % 12] += 1
    assert versions(e) == want


# ---------------------------------------------------------------------------------------------- transfer

XFER = dict(bandwidth_bytes_per_s=10**9, page_bytes=4096, header_bytes=64, agents=2, pack_private_ns=1000,
            pack_zero_ns=100, batch_pages=2, vmgexit_ns=5000, charge_guest=False, unpack_private_ns=7)


def test_transfer_clock_by_hand(engine_kind, make_batch):
    e = make_engine(engine_kind, npages=8, vcpus=2)
    e.launch(0, [(6, 7)])
    e.replay(0, make_batch([(0, 0, 1 * P, 1, W), (0, 0, 6 * P, 1, W)]), 0, 0, STOP)
    e.reset_counters()
    e.begin_transfer(1000, 500, **XFER)
    assert e.transfer_state()["v_ns"] == 1000 and e.transfer_state()["g_ns"] == 500
    # 1 byte/ns. gfn 0 private zero: 64 B, 100 ns cpu -> v = 1000 + max(64, ceil(100/2)) = 1064
    # gfn 1 private: 4160 B, 1000 ns + vmgexit 5000 (2nd private page) -> bytes 4224, cpu 6100 -> v = 5224
    # gfn 6 shared: 4160 B -> 8384; gfn 7 shared zero: 64 B -> 8448, v = 9448, g = 500 + 8448
    assert e.transfer(0, 1, np.array([0, 1, 6, 7], np.uint32), 0, None, 0, 0, 0) == (0, 4)
    assert e.transfer_state() == dict(v_ns=9448, g_ns=8948, pages=4, zero_pages=2, private_pages=2, shared_pages=2,
                                      bytes=8448, agent_cpu_ns=6100, vmgexits=1, target_cpu_ns=14,
                                      src_host_cpu_ns=0, dst_host_cpu_ns=0, first_touches=0, link_dead=False)
    assert [e.page(1, g) for g in (0, 1, 6, 7)] == [(0, True, False, True), (1, True, False, True),
                                                    (1, False, False, True), (0, False, False, True)]
    assert e.count_present(1) == 4
    for g in (0, 1):
        assert e.rmp_entry(1, e.spa(1, g)) == RmpEntry(True, 1, g, False, False, True, False, (15, 0, 0, 0))
    assert not e.rmp_entry(1, e.spa(1, 6)).assigned
    assert e.counters()["rmp"] == {"rmpupdate": 2, "pvalidate": 2, "rmpadjust": 0, "psmash": 0, "psc": 0}
    # a partial page of bandwidth rounds up: 1 byte more at 3 B/s
    e.begin_transfer(0, 0, **dict(XFER, bandwidth_bytes_per_s=3, header_bytes=1, page_bytes=0, agents=1))
    assert e.transfer(0, 1, [7], 0, None, 0, 0, 0) == (0, 1)
    assert e.transfer_state()["v_ns"] == 333_333_334  # ceil(1e9 / 3)


def test_transfer_agent_bound_and_charge_guest(engine_kind, make_batch):
    e = make_engine(engine_kind, npages=4, vcpus=2)
    e.launch(0, [])
    e.replay(0, make_batch([(0, 0, 1 * P, 1, W)]), 0, 0, STOP)
    p = dict(bandwidth_bytes_per_s=10**9, page_bytes=4096, header_bytes=0, agents=1, pack_private_ns=10000,
             pack_zero_ns=10000, batch_pages=100, vmgexit_ns=0)
    e.begin_transfer(0, 0, charge_guest=True, **p)
    assert e.transfer(0, 1, [0], 0, None, 0, 0, 0) == (0, 1)
    # v = max(0, 10000) = 10000; g = 0 + 10000 - 10000 // 2 = 5000
    assert (e.transfer_state()["v_ns"], e.transfer_state()["g_ns"]) == (10000, 5000)
    assert e.transfer(0, 1, [0, 1], 1, None, 0, 0, 0) == (0, 2)
    # cpu 20000 > 4096 link ns: v = 20000; g = 20000 - 10000 = 10000
    assert (e.transfer_state()["v_ns"], e.transfer_state()["g_ns"]) == (20000, 10000)
    # clamp: with one vCPU and two agents the guest would go backwards; g never decreases
    e1 = make_engine(engine_kind, npages=4, vcpus=1)
    e1.launch(0, [])
    e1.begin_transfer(0, 100, charge_guest=True, **dict(p, agents=2))
    assert e1.transfer(0, 1, [0, 1], 0, None, 0, 0, 0) == (0, 2)
    # page 0: v = ceil(10000/2) = 5000, cand = 100 + 5000 - 10000 < 100; page 1 (zero too): v = 10000, cand < 100
    assert (e1.transfer_state()["v_ns"], e1.transfer_state()["g_ns"]) == (10000, 100)
    e1.begin_transfer(0, 100, charge_guest=False, **dict(p, agents=2))
    e1.transfer(0, 1, [0, 1], 0, None, 0, 0, 0)
    assert (e1.transfer_state()["v_ns"], e1.transfer_state()["g_ns"]) == (10000, 10100)


def test_transfer_runs_the_guest_on_the_clock(engine_kind, make_batch):
    e = make_engine(engine_kind, npages=4, vcpus=1)
    e.launch(0, [])
    e.set_dirty_logging(0, True)
    p = dict(bandwidth_bytes_per_s=10**9, page_bytes=4096, header_bytes=100, agents=1, pack_private_ns=0,
             pack_zero_ns=0, batch_pages=1, vmgexit_ns=0, charge_guest=False)
    b = make_batch([(0, 0, 0, 1, W), (150, 0, 1 * P, 1, W), (5000, 0, 0, 1, W)])
    e.begin_transfer(0, 0, **p)
    # k=0: no row has t < 0; gfn 0 (zero) sent, v = g = 100. k=1: row 0 (t=0) runs; gfn 1 (zero) sent, g = 200.
    assert e.transfer(0, 1, [0, 1], 0, b, 0, 10, 0) == (1, 2)
    assert e.page(1, 0).version == 0 and e.page(0, 0).version == 1  # sent before the write
    assert e.page(1, 1).version == 0
    assert list(e.collect_dirty(0)) == [0]
    # the batch runs out: (row, k) is returned so that the caller can pass the next batch
    e.begin_transfer(0, 0, **p)
    short = make_batch([(0, 0, 2 * P, 1, W)])
    assert e.transfer(0, 1, [2, 3], 0, short, 0, 0, 0) == (1, 1)
    assert e.transfer(0, 1, [2, 3], 1, None, 0, 0, 0) == (0, 2)
    assert e.transfer_state()["pages"] == 2 and e.page(1, 2).version == 0


def test_transfer_userfault_and_skip_present(engine_kind, make_batch):
    e = make_engine(engine_kind, npages=4, vcpus=2)
    e.launch(0, [])
    p = dict(bandwidth_bytes_per_s=10**9, page_bytes=4096, header_bytes=0, agents=1, pack_private_ns=0,
             pack_zero_ns=0, batch_pages=1, vmgexit_ns=0, charge_guest=False)
    e.begin_transfer(0, 0, **p)
    assert e.transfer(0, 1, [1], 0, None, 0, 0, 0) == (0, 1)
    p["header_bytes"] = 64  # zero pages cost 64 ns each at 1 B/ns  # gfn 1 is on the target
    # post-copy: the guest runs on host 1; background push of everything with skip_present
    b = make_batch([(0, 1, P, 1, W), (1, 0, 3 * P, 1, W)])
    # g = 0: nothing runs before page 0; after page 0 (v=g=64) row 0 writes gfn 1, row 1 hits gfn 3
    e.begin_transfer(0, 0, skip_present=True, **p)
    r = e.transfer(0, 1, [0, 1, 2, 3], 0, b, 0, 0, 1)
    assert r == (1, 1) and e.last_stop == (Fault.USERFAULT, 3, 0, 1)
    assert e.page(1, 1).version == 1 and e.transfer_state()["pages"] == 1
    # continuing: gfn 1 is present (skipped, no cost), then 2 and 3 are sent; the userfault row waits
    r = e.transfer(0, 1, [0, 1, 2, 3], 1, None, 1, 0, 1)
    assert r == (1, 4) and e.transfer_state()["pages"] == 3 and e.transfer_state()["v_ns"] == 3 * 64
    assert e.last_stop == (Fault.NONE, 0, 0, 0)


def test_transfer_target_rmp_ops(engine_kind):
    e = make_engine(engine_kind, npages=4, vcpus=1, os_vmpl=1)
    e.launch(0, [(3, 3)])
    e.launch(1, [(0, 0)])  # the target believes gfn 0 shared and 3 private
    e.reset_counters()
    p = dict(bandwidth_bytes_per_s=10**9, page_bytes=4096, header_bytes=0, agents=1, pack_private_ns=0,
             pack_zero_ns=0, batch_pages=1, vmgexit_ns=0, charge_guest=False)
    e.begin_transfer(0, 0, **p)
    assert e.transfer(0, 1, [0, 1, 3], 0, None, 0, 0, 0) == (0, 3)
    # gfn 0: private, target entry unassigned -> rmpupdate + pvalidate + rmpadjust; gfn 1 already right;
    # gfn 3: shared, target entry assigned -> pvalidate(0) + rmpupdate unassign
    assert e.counters()["rmp"] == {"rmpupdate": 2, "pvalidate": 2, "rmpadjust": 1, "psmash": 0, "psc": 0}
    assert e.rmp_entry(1, e.spa(1, 0)) == RmpEntry(True, 1, 0, False, False, True, False, (15, 15, 0, 0))
    assert not e.rmp_entry(1, e.spa(1, 3)).assigned and not e.page(1, 3).private
    e2 = make_engine(engine_kind, npages=4, vcpus=1)
    e2.launch(0, [])
    e2.begin_transfer(0, 0, target_rmp=False, **p)
    e2.transfer(0, 1, [0, 1], 0, None, 0, 0, 0)
    assert e2.counters()["rmp"]["rmpupdate"] == 4 and not e2.rmp_entry(1, e2.spa(1, 0)).assigned


def test_transfer_clears_dirty_on_target_and_argument_errors(engine_kind):
    e = make_engine(engine_kind, npages=4, vcpus=1)
    with pytest.raises(RuntimeError):
        e.transfer(0, 1, [0], 0, None, 0, 0, 0)
    e.launch(0, [])
    e.launch(1, [])
    e.set_dirty_logging(1, True)
    e.replay(1, pa.RecordBatch.from_pylist(
        [dict(t_ns=0, vcpu=0, gpa=0, len=1, op=0, value=0)],
        schema=pa.schema([(n, t) for n, t in zip(["t_ns", "vcpu", "gpa", "len", "op", "value"],
                                                 [pa.uint64(), pa.uint16(), pa.uint64(), pa.uint32(), pa.uint8(),
                                                  pa.uint64()])])), 0, 0, STOP)
    assert e.page(1, 0).dirty
    e.begin_transfer(0, 0, **XFER)
    e.transfer(0, 1, [0], 0, None, 0, 0, 0)
    assert e.page(1, 0) == (0, True, False, True)
    with pytest.raises(ValueError):
        e.transfer(0, 1, [4], 0, None, 0, 0, 0)
    with pytest.raises(ValueError):
        e.transfer(0, 1, [0], 2, None, 0, 0, 0)
    with pytest.raises(ValueError):
        e.begin_transfer(0, 0, **dict(XFER, bandwidth_bytes_per_s=0))
