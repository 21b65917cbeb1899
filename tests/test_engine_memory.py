"""The Cython engine's compact memory layout: RMP entries held as exceptions to two canonical entries, page
state as 5 bytes per gfn per host, digests without guest-sized temporaries, and a 1 TiB guest in bounded
memory.

What an RMP entry *is* must not depend on how it is held: every case here runs on both engines and checks
entries against values written out by hand; on the Cython engine it also checks how many entries the
exception table holds (``rmp_exceptions``), so that each way into and out of the table is exercised.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from replay.engines.common import RmpEntry
from replay.engines import make_engine
from replay.model.snp import Fault, Op, Rc

ZERO = RmpEntry(False, 0, 0, False, False, False, False, (15, 0, 0, 0))
P = 4096


def priv(gfn, *, asid=1, perms=(15, 0, 0, 0)):
    """The canonical private entry: what launch gives a private page."""
    return RmpEntry(True, asid, gfn, False, False, True, False, perms)


def exceptions(e, host=0):
    """Entries held in the exception table (Cython engine); None on the reference engine (plain arrays)."""
    return e.rmp_exceptions(host) if hasattr(e, "rmp_exceptions") else None


def expect_exc(e, n, host=0):
    got = exceptions(e, host)
    assert got is None or got == n, f"exception table holds {got} entries, expected {n}"


def all_entries(e, host):
    return [e.rmp_entry(host, s) for s in range(e.rmp_size(host))]


def test_entries_into_and_out_of_the_exception_table(engine_kind):
    e = make_engine(engine_kind, npages=16, vcpus=1, os_vmpl=1)
    e.launch(0, [(8, 15)])
    p5 = priv(5, perms=(15, 15, 0, 0))
    assert e.rmp_entry(0, e.spa(0, 5)) == p5 and e.rmp_entry(0, e.spa(0, 9)) == ZERO
    expect_exc(e, 0)
    s5 = e.spa(0, 5)
    # perms of VMPL2 set: no longer the canonical private entry
    assert e.rmpadjust(0, s5, asid=1, gfn=5, caller_vmpl=0, target_vmpl=2, perms=3) == Rc.SUCCESS
    assert e.rmp_entry(0, s5) == RmpEntry(True, 1, 5, False, False, True, False, (15, 15, 3, 0))
    expect_exc(e, 1)
    # ...and back: perms 0 again
    assert e.rmpadjust(0, s5, asid=1, gfn=5, caller_vmpl=0, target_vmpl=2, perms=0) == Rc.SUCCESS
    assert e.rmp_entry(0, s5) == p5
    expect_exc(e, 0)
    # a shared page's entry assigned to another asid, then unassigned with immutable set: still exceptions
    s9 = e.spa(0, 9)
    assert e.rmpupdate(0, s9, assigned=True, asid=2, gfn=9) == Rc.SUCCESS
    assert e.rmp_entry(0, s9) == RmpEntry(True, 2, 9, False, False, False, False, (15, 0, 0, 0))
    expect_exc(e, 1)
    assert e.rmpupdate(0, s9, assigned=False, immutable=True) == Rc.SUCCESS
    assert e.rmp_entry(0, s9) == RmpEntry(False, 0, 0, False, True, False, False, (15, 0, 0, 0))
    expect_exc(e, 1)
    assert e.rmpupdate(0, s9, assigned=False) == Rc.FAIL_PERMISSION  # immutable: stays
    assert e.check_access(0, 9, vmpl=1, access=2, private=False) is Fault.NONE  # unassigned
    # the VMSA spares and the SPAs below spa_base have no page: always in the table when not zero
    spare = e.spa(0, 15) + 1
    assert e.rmpupdate(0, spare, assigned=True, asid=1, gfn=16) == Rc.SUCCESS
    assert e.pvalidate(0, spare, asid=1, gfn=16, vmpl=0, validate=True) == Rc.SUCCESS
    assert e.rmpadjust(0, spare, asid=1, gfn=16, caller_vmpl=0, target_vmpl=1, perms=0, vmsa=True) == Rc.SUCCESS
    assert e.rmp_entry(0, spare) == RmpEntry(True, 1, 16, False, False, True, True, (15, 0, 0, 0))
    assert e.rmpupdate(0, 3, assigned=True, asid=1, gfn=3) == Rc.SUCCESS
    expect_exc(e, 3)
    assert e.rmpupdate(0, spare, assigned=False) == Rc.SUCCESS
    assert e.rmpupdate(0, 3, assigned=False) == Rc.SUCCESS
    assert e.rmp_entry(0, spare) == ZERO and e.rmp_entry(0, 3) == ZERO
    expect_exc(e, 1)  # only gfn 9's immutable entry is left
    expect_exc(e, 0, host=1)


def test_page_state_changes_keep_entries_exact(engine_kind, make_batch):
    """A page-state change on a page whose entry is an exception runs every step on the real entry."""
    e = make_engine(engine_kind, npages=8, vcpus=1)
    e.launch(0, [(4, 7)])
    # gfn 1: private, but its entry made immutable (an exception); TO_SHARED's PVALIDATE still succeeds
    # (immutable only stops RMPUPDATE), the RMPUPDATE to shared fails: the entry stays, unvalidated
    assert e.rmpupdate(0, e.spa(0, 1), assigned=True, asid=1, gfn=1, immutable=True) == Rc.SUCCESS
    # gfn 5: shared, its entry assigned to gfn 6 (an exception); TO_PRIVATE reassigns it to gfn 5
    assert e.rmpupdate(0, e.spa(0, 5), assigned=True, asid=1, gfn=6) == Rc.SUCCESS
    expect_exc(e, 2)
    e.reset_counters()
    b = make_batch([(0, 0, 1 * P, 8, Op.TO_SHARED), (1, 0, 5 * P, 8, Op.TO_PRIVATE), (2, 0, 2 * P, 8, Op.TO_SHARED),
                    (3, 0, 2 * P, 8, Op.TO_PRIVATE)])
    assert e.replay(0, b, 0, 0, 2**64 - 1) == 4
    assert e.rmp_entry(0, e.spa(0, 1)) == RmpEntry(True, 1, 1, False, True, False, False, (15, 0, 0, 0))
    assert e.rmp_entry(0, e.spa(0, 5)) == priv(5)
    assert e.rmp_entry(0, e.spa(0, 2)) == priv(2)  # private -> shared -> private: canonical again
    assert [e.page(0, g).private for g in (1, 2, 5)] == [False, True, True]
    assert e.counters()["rmp"] == {"rmpupdate": 4, "pvalidate": 4, "rmpadjust": 0, "psmash": 0, "psc": 4}
    expect_exc(e, 1)  # gfn 1's immutable entry


def test_2m_ranges_and_psmash(engine_kind):
    """A 2M assignment makes 512 exceptions (size_2m is never canonical); PSMASH turns them back into the
    canonical private entry, one by one in place."""
    e = make_engine(engine_kind, npages=1024, vcpus=1)
    head = e.spa(0, 0)
    assert head % 512 == 0
    assert e.rmpupdate(0, head, assigned=True, asid=1, gfn=0, size_2m=True) == Rc.SUCCESS
    expect_exc(e, 512)
    assert e.pvalidate(0, head, asid=1, gfn=0, vmpl=0, validate=True, size_2m=True) == Rc.SUCCESS
    assert e.rmp_entry(0, head + 511) == RmpEntry(True, 1, 511, True, False, True, False, (15, 0, 0, 0))
    assert e.check_access(0, 3, vmpl=0, access=2, private=True) is Fault.NPF_SIZE
    expect_exc(e, 512)
    assert e.psmash(0, head) == Rc.SUCCESS
    assert all(e.rmp_entry(0, head + i) == priv(i) for i in range(512))
    assert e.rmp_entry(0, head + 512) == ZERO
    expect_exc(e, 0)
    # a 2M range across the guest's end into the VMSA spares (gfns 512..1023 are pages, the rest spares)
    tail = e.spa(0, 1023) + 1  # first spare, 2M-aligned here
    assert tail % 512 == 0
    assert e.rmpupdate(0, tail, assigned=True, asid=1, gfn=1024, size_2m=True) == Rc.SUCCESS
    assert e.rmp_entry(0, tail + 100) == RmpEntry(True, 1, 1124, True, False, False, False, (15, 0, 0, 0))
    expect_exc(e, 512)
    assert e.rmpupdate(0, tail, assigned=False, size_2m=True) == Rc.SUCCESS
    assert e.rmp_entry(0, tail + 100) == RmpEntry(False, 0, 0, True, False, False, False, (15, 0, 0, 0))
    expect_exc(e, 512)  # unassigned but size_2m: not the zero entry
    assert e.psmash(0, tail) == Rc.FAIL_INPUT  # not assigned
    for i in range(512):  # 4K updates back to the zero entry empty the table
        assert e.rmpupdate(0, tail + i, assigned=False) == Rc.SUCCESS
    expect_exc(e, 0)


def test_many_exceptions_in_and_out_agree_with_reference():
    """Thousands of entries into the table (growing it many times), then out in a shuffled order (deletions
    that move other entries), then back: every entry of every SPA agrees with the reference engine at each
    step, and the table ends empty."""
    n = 3000
    engines = [make_engine(k, npages=n, vcpus=1, os_vmpl=2) for k in ("cython", "reference")]
    order = np.random.default_rng(13).permutation(n)
    for e in engines:
        e.launch(0, [(0, 99)])
    assert exceptions(engines[0]) == 0
    for e in engines:
        for g in range(100, n):  # perms of VMPL3 set: no longer canonical
            assert e.rmpadjust(0, e.spa(0, g), asid=1, gfn=g, caller_vmpl=0, target_vmpl=3, perms=1) == Rc.SUCCESS
        for g in range(100):  # shared pages assigned to the wrong gfn
            assert e.rmpupdate(0, e.spa(0, g), assigned=True, asid=1, gfn=g + 1) == Rc.SUCCESS
    assert exceptions(engines[0]) == n
    assert all_entries(engines[0], 0) == all_entries(engines[1], 0)
    for e in engines:
        for g in (int(x) for x in order[: n // 2]):
            if g >= 100:
                e.rmpadjust(0, e.spa(0, g), asid=1, gfn=g, caller_vmpl=0, target_vmpl=3, perms=0)
            else:
                e.rmpupdate(0, e.spa(0, g), assigned=False)
    assert exceptions(engines[0]) == n - n // 2
    assert all_entries(engines[0], 0) == all_entries(engines[1], 0)
    for e in engines:
        for g in (int(x) for x in order[n // 2:]):
            if g >= 100:
                e.rmpadjust(0, e.spa(0, g), asid=1, gfn=g, caller_vmpl=0, target_vmpl=3, perms=0)
            else:
                e.rmpupdate(0, e.spa(0, g), assigned=False)
    assert exceptions(engines[0]) == 0
    got = all_entries(engines[0], 0)
    assert got == all_entries(engines[1], 0)
    assert got[engines[0].spa(0, 100)] == priv(100, perms=(15, 0, 15, 0)) and got[engines[0].spa(0, 5)] == ZERO
    assert engines[0].counters() == engines[1].counters()


def test_entry_comparison_detects_one_changed_entry():
    """The whole-RMP comparison the tests above rely on fails when one entry of one engine differs
    (an injected extra RMPADJUST on a canonical entry of the Cython engine)."""
    engines = [make_engine(k, npages=32, vcpus=1) for k in ("cython", "reference")]
    for e in engines:
        e.launch(0, [])
    assert all_entries(engines[0], 0) == all_entries(engines[1], 0)
    engines[0].rmpadjust(0, engines[0].spa(0, 7), asid=1, gfn=7, caller_vmpl=0, target_vmpl=1, perms=15)
    a, b = all_entries(engines[0], 0), all_entries(engines[1], 0)
    assert a != b and [i for i in range(len(a)) if a[i] != b[i]] == [engines[0].spa(0, 7)]


def test_target_delivery_uses_the_real_entry(engine_kind):
    """Delivery to a target whose entry is an exception (assigned to another asid) reassigns it; one whose
    entry is canonical private and the page shared releases it."""
    e = make_engine(engine_kind, npages=4, vcpus=1)
    e.launch(0, [(3, 3)])
    assert e.rmpupdate(1, e.spa(1, 0), assigned=True, asid=2, gfn=0) == Rc.SUCCESS
    e.launch(1, [])  # target: every page private, gfn 0's entry made canonical by launch's RMPUPDATE
    assert e.rmpupdate(1, e.spa(1, 1), assigned=True, asid=2, gfn=1) == Rc.SUCCESS
    expect_exc(e, 1, host=1)
    e.reset_counters()
    for g in range(4):
        e.deliver(0, 1, g)
    assert [e.rmp_entry(1, e.spa(1, g)) for g in range(4)] == [priv(0), priv(1), priv(2), ZERO]
    # gfn 1 reassigned (RMPUPDATE, PVALIDATE), gfn 3 released (PVALIDATE(0), RMPUPDATE); 0 and 2 kept
    assert e.counters()["rmp_by_host"][1] == {"rmpupdate": 2, "pvalidate": 2, "rmpadjust": 0, "psmash": 0, "psc": 0}
    expect_exc(e, 0, host=1)


def test_digest_over_chunk_boundaries(make_batch):
    """digest() hashes in bounded chunks (2**18 versions, 2**20 attribute bytes); the result is the hash of
    the whole arrays, computed here from a model of the guest's memory."""
    n = (1 << 20) + 5
    e = make_engine("cython", npages=n, vcpus=1)
    e.launch(0, [(1 << 18, (1 << 18) + 3), (n - 2, n - 1)])
    ver = np.zeros(n, "<u4")
    prv = np.ones(n, np.uint8)
    prv[1 << 18 : (1 << 18) + 4] = 0
    prv[n - 2 :] = 0
    touched = [0, (1 << 18) - 1, 1 << 18, (1 << 20) - 1, 1 << 20, n - 1]
    rows = [(i, 0, g * P, 8, Op.WRITE) for i, g in enumerate(touched)] + [(9, 0, (n - 1) * P, 8, Op.WRITE)]
    assert e.replay(0, make_batch(rows), 0, 0, 2**64 - 1) == len(rows)
    for g in touched:
        ver[g] += 1
    ver[n - 1] += 1
    want = hashlib.blake2b(ver.tobytes() + prv.tobytes(), digest_size=32).hexdigest()
    assert e.digest(0) == want
    # One more write at the chunk edge: the engine's digest follows the model's, and differs from before.
    assert e.replay(0, make_batch([(10, 0, (1 << 20) * P, 8, Op.WRITE)]), 0, len(rows), 2**64 - 1) == 1
    ver[1 << 20] += 1
    assert e.digest(0) == hashlib.blake2b(ver.tobytes() + prv.tobytes(), digest_size=32).hexdigest() != want


_TIB_SCRIPT = r"""
import json, resource, sys
from replay.engines import make_engine
from replay.model.snp import Rc

def peak():  # bytes (ru_maxrss is KiB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

n = 1 << 28  # 1 TiB of 4 KiB pages
out = {"start": peak()}
e = make_engine("cython", npages=n, vcpus=4, os_vmpl=2)
e.launch(0, [(1000, 1999)])
out["entry_last"] = list(e.rmp_entry(0, e.spa(0, n - 1)))
out["entry_shared"] = list(e.rmp_entry(0, e.spa(0, 1000)))
out["exceptions"] = e.rmp_exceptions(0)
out["counters"] = e.counters()["rmp"]
e.digest(0)
out["launched"] = peak()
# pre-copy's first pass: every page to the target through the bitmap walk
e.begin_transfer(0, 0, bandwidth_bytes_per_s=10**12, page_bytes=4096, header_bytes=8, pack_private_ns=0,
                 pack_zero_ns=0, batch_pages=64, vmgexit_ns=0, charge_guest=False)
e.mark_send_all(0)
row, k = e.transfer(0, 1, None, 0, None, 0, 0, 0)
out["sent"] = e.transfer_state()["pages"]
out["target_last"] = list(e.rmp_entry(1, e.spa(1, n - 1)))
out["target_exceptions"] = e.rmp_exceptions(1)
out["digests_equal"] = e.digest(0) == e.digest(1)
out["transferred"] = peak()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_tib_guest_fits_in_bounded_memory():
    """An engine for a 1 TiB guest (2**28 pages): launch and digest of the source in under 2 GiB, and with
    every page delivered to the target (both hosts' state fully touched) at most 16 bytes per page.
    The old layout (8 + 16 bytes per page per host) needed 6 GiB for the launch alone."""
    proc = subprocess.run([sys.executable, "-c", _TIB_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    n = 1 << 28
    assert out["entry_last"] == [True, 1, n - 1, False, False, True, False, [15, 0, 15, 0]]
    assert out["entry_shared"] == [False, 0, 0, False, False, False, False, [15, 0, 0, 0]]
    assert out["exceptions"] == 0 and out["target_exceptions"] == 0
    assert out["counters"] == {"rmpupdate": n - 1000, "pvalidate": n - 1000, "rmpadjust": n - 1000,
                               "psmash": 0, "psc": 0}
    assert out["sent"] == n and out["digests_equal"]
    assert out["target_last"] == out["entry_last"]
    assert out["launched"] <= 2 << 30, f"launch + digest peaked at {out['launched'] / 2**30:.2f} GiB"
    assert out["transferred"] <= 16 * n, f"two hosts peaked at {out['transferred'] / n:.1f} bytes per page"


_UNTOUCHED_SCRIPT = r"""
import json, sys
from replay.engines import make_engine

def rss():  # bytes resident now (VmRSS): growth, not the peak of the interpreter's start
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))

n = 1 << 24  # a 64 GiB guest
e = make_engine("cython", npages=n, vcpus=1)
r0 = rss()
e.launch(0, [])
r1 = rss()
e.begin_transfer(0, 0, bandwidth_bytes_per_s=10**12, page_bytes=4096, header_bytes=8, pack_private_ns=0,
                 pack_zero_ns=0, batch_pages=64, vmgexit_ns=0, charge_guest=False)
e.mark_send_all(0)
e.transfer(0, 1, None, 0, None, 0, 0, 0)
r2 = rss()
print(json.dumps({"launch": r1 - r0, "transfer": r2 - r1, "sent": e.transfer_state()["pages"],
                  "zero": e.transfer_state()["zero_pages"], "equal": e.digest(0) == e.digest(1)}))
"""


def test_zero_versions_stay_untouched():
    """Versions are stored only when they change: launching a fresh host and delivering every (zero) page
    to a fresh target leave both hosts' version arrays untouched (calloc's pages, never resident), so the
    page state costs one flags byte per page per host, not five. The bound (1.25 bytes per page per step)
    fails if either step writes the versions (4 more bytes a page)."""
    proc = subprocess.run([sys.executable, "-c", _UNTOUCHED_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    n = 1 << 24
    assert out["sent"] == n and out["zero"] == n and out["equal"]
    assert out["launch"] <= 1.25 * n, f"launch grew RSS by {out['launch'] / n:.2f} bytes per page"
    assert out["transfer"] <= 1.25 * n, f"the transfer grew RSS by {out['transfer'] / n:.2f} bytes per page"


@pytest.mark.parametrize("strategy", ["mirror-vm", "shadow-vcpu"])
@pytest.mark.parametrize("mode", ["precopy", "postcopy", "hybrid"])
def test_untouched_versions_give_the_dense_metrics(tmp_path, strategy, mode):
    """Storing only the versions that change (the Cython engine: untouched pages never stored) against the
    reference engine's dense numpy arrays: the whole run record agrees, in every mode and strategy, on a
    256-page guest whose trace writes 12 pages (some again during the migration, some before it, most
    pages never): the untouched pages go as zero pages, the written ones with their versions."""
    from test_postcopy import pc_scenario, pc_trace

    from replay.migration import run

    rows = [(100 * i, i % 2, 3 * i) for i in range(8)] + [(3000 + 41 * i, i % 2, (5 * i) % 12) for i in range(60)]
    trace = pc_trace(tmp_path / "sparse.arrow", rows=rows, npages=256, vcpus=2)
    s = pc_scenario(mode=mode, precopy_rounds=1, prepaging=(strategy == "shadow-vcpu"), prepage_pages=3,
                    downtime_limit_ns=1 if mode == "hybrid" else 10_000, bandwidth_period_ns=1)
    a = run(s, strategy=strategy, engine="cython", trace_path=trace)
    b = run(s, strategy=strategy, engine="reference", trace_path=trace)
    a.summary["tool"]["engine"] = b.summary["tool"]["engine"] = ""
    assert a.summary == b.summary
    for x, y in ((a.faults, b.faults), (a.rounds, b.rounds), (a.events, b.events)):
        assert (x is None and y is None) or x.equals(y)
    m = a.summary["metrics"]
    assert 200 <= m["zero_pages"] < m["pages_sent"]  # most pages never written: sent as zero pages
    d = a.summary["digests"]
    assert a.status == "completed" and d["end_of_trace"] == d["no_migration"]
    assert all(a.summary["invariants"].values())


_FLAGS_SCRIPT = r"""
import json, sys
import numpy as np
import pyarrow as pa
from replay.engines import make_engine

def status(key):  # bytes (VmRSS: resident now; VmHWM: the peak so far)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

n = 1 << 24  # a 64 GiB guest: 16 MiB of flags bytes a host if they were stored
mode = sys.argv[1]
e = make_engine("cython", npages=n, vcpus=2)
params = dict(bandwidth_bytes_per_s=10**12, page_bytes=4096, header_bytes=8, pack_private_ns=0,
              pack_zero_ns=0, batch_pages=64, vmgexit_ns=0, charge_guest=False)
# everything the steps use, made before they are measured (pyarrow's allocator starts with a few MiB)
ready = np.zeros(n, np.uint64)
delays = np.array([5, 7], np.uint64)
batch = pa.RecordBatch.from_arrays(
    [pa.array([10**15], pa.uint64()), pa.array([0], pa.uint16()), pa.array([0], pa.uint64()),
     pa.array([8], pa.uint32()), pa.array([0], pa.uint8()), pa.array([0], pa.uint64())],
    names=["t_ns", "vcpu", "gpa", "len", "op", "value"])
out = {}
r0 = status("VmRSS")
e.launch(0, [(100, 199)])  # a shared range: its 100 flags bytes differ from a private page's
out["launch"] = status("VmRSS") - r0
h0 = status("VmHWM")
r1 = status("VmRSS")
if mode == "precopy":
    e.begin_transfer(0, 0, **params)
    e.mark_send_all(0)
    e.transfer(0, 1, None, 0, None, 0, 0, 0)
    out["send_count"] = e.send_count(0)
else:
    # post-copy's push: the pages the target lacks, in gfn order, beside a guest whose next row (and its
    # vCPUs' delays) lie after the push: no page's ready time can matter, none is stored
    e.deliver(0, 1, 5)  # a fault served before the push (the push skips it)
    e.begin_transfer(0, 0, skip_present=True, **params)
    row, k = e.transfer(0, 1, None, 0, batch, 0, 0, 1, delays, ready, walk_end=n)
    out["row"], out["k"] = row, k
    out["ready_stored"] = int(np.count_nonzero(ready))
out["transfer"] = status("VmRSS") - r1
out["transfer_peak"] = status("VmHWM") - h0
st = e.transfer_state()
out["sent"], out["present"] = st["pages"], e.count_present(1)
out["equal"] = e.digest(0) == e.digest(1) and e.set_digest(0) == e.set_digest(1) == e.received_digest(1)
out["flags"] = [e.flags(h, [0, 5, 99, 100, 199, 200, 4095, 4096, n - 1]).tolist() for h in (0, 1)]
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_flags_and_ready_stay_untouched(mode):
    """Flags bytes are stored as changes to their chunk's mask, and a chunk left uniform is given back: a
    launch, then every page sent (pre-copy's first pass: send bit set on all, cleared page by page; or
    post-copy's push of the pages the target lacks, with page-ready times) leave almost no flags byte
    resident and store no ready time no row can wait for. Each bound (0.05 bytes per page per step, peak
    included) fails if a step stores a flags byte per page (1 byte) or a ready time per page (8 bytes);
    the flags read back are a launched and a delivered page's, exactly."""
    proc = subprocess.run([sys.executable, "-c", _FLAGS_SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    n = 1 << 24
    assert out["present"] == n and out["equal"]
    if mode == "precopy":
        assert out["sent"] == n and out["send_count"] == 0
        src = [5, 5, 5, 4, 4, 5, 5, 5, 5]  # PRIVATE|PRESENT, the shared range PRESENT only
    else:
        assert out["sent"] == n - 1 and out["k"] == n and out["row"] == 0 and out["ready_stored"] == 0
        src = [5, 5, 5, 4, 4, 5, 5, 5, 5]
    assert out["flags"] == [src, src]
    for step in ("launch", "transfer", "transfer_peak"):
        assert out[step] <= 0.05 * n, f"{step} grew RSS by {out[step] / n:.3f} bytes per page"


def _whole_state(e, n):
    g = np.arange(n)
    return {
        "flags": [e.flags(h, g).tolist() for h in (0, 1)],
        "versions": [e.versions(h, g).tolist() for h in (0, 1)],
        "digests": [(e.digest(h), e.set_digest(h), e.received_digest(h), e.count_present(h)) for h in (0, 1)],
        "send": e.send_count(0),
        "xfer": e.transfer_state(),
        "counters": e.counters(),
    }


def test_chunked_flags_agree_with_reference(make_batch):
    """Flags held as chunk masks plus changed bytes (Cython) against plain arrays (reference), on a guest of
    three chunks and a part, with every way a chunk is written and folded: a launch with shared ranges across
    chunk boundaries (and a chunk with none, launched as a whole), writes with dirty logging on, pre-copy's send bitmap set by one mask flip and walked
    in parts (the walk stops mid-chunk, goes on, wraps), a dirty sync, the hybrid switchover's discard, then
    post-copy's push with a guest whose delays make some ready times matter, and a launch of the target
    after all that: every page's flags and version, the digests, the counters and the ready times agree
    after each step."""
    n = 3 * 4096 + 100
    P = 4096
    engines = [make_engine(k, npages=n, vcpus=2, os_vmpl=1) for k in ("cython", "reference")]
    readies = [np.zeros(n, np.uint64) for _ in engines]
    params = dict(bandwidth_bytes_per_s=4 * 10**9, page_bytes=P, header_bytes=8, pack_private_ns=300,
                  pack_zero_ns=20, batch_pages=64, vmgexit_ns=1000, charge_guest=False)
    writes = make_batch([(10 * i, i % 2, g * P, 8, Op.WRITE) for i, g in enumerate((0, 4095, 4096, 4100, 8191, 12000))]
                        + [(100, 0, 4150 * P, 8, Op.TO_PRIVATE), (110, 1, 5000 * P, 8, Op.TO_SHARED)])
    later = make_batch([(20_000 + 50 * i, i % 2, ((37 * i) % n) * P, 8, Op.WRITE) for i in range(200)])
    # vCPU 1, 3 us behind: its rows run 3 us after their t_ns, so pages pushed meanwhile are not ready for
    # a row of vCPU 0 (no delay) that could come at the same t_ns: their times are kept
    post = make_batch([(30_500 + 100 * i, 1, 1 * P, 8, Op.READ) for i in range(50)])
    steps = []
    for e, ready in zip(engines, readies):
        log = []
        e.launch(0, [(4000, 4200), (8191, 8191), (n - 3, n - 1)])  # chunk 2 all private: launched at once
        log.append(_whole_state(e, n))
        e.set_dirty_logging(0, True)
        assert e.replay(0, writes, 0, 0, 2**64 - 1) == writes.num_rows
        e.begin_transfer(0, 0, **params)
        e.mark_send_all(0)
        log.append(_whole_state(e, n))
        assert e.transfer(0, 1, None, 0, later, 0, 0, 0, until_v=6_000) [1] > 0
        log.append(_whole_state(e, n))
        e.sync_dirty(0)
        row, k = e.transfer(0, 1, None, 4097, later, 0, 0, 0, until_v=40_000)
        log.append((row, k, _whole_state(e, n)))
        e.discard_stale(0, 1)
        log.append(_whole_state(e, n))
        e.begin_transfer(30_000, 30_000, skip_present=True, **params)
        delays = np.array([0, 3_000], np.uint64)
        row2, k2 = e.transfer(0, 1, None, 0, post, 0, 0, 1, delays, ready, walk_end=n)
        log.append((row2, k2, e.last_stop, ready.tolist(), _whole_state(e, n)))
        e.launch(1, [(5, 9)])  # a host that is not fresh: page by page
        log.append(_whole_state(e, n))
        steps.append(log)
    assert steps[0] == steps[1]
    assert 0 < np.count_nonzero(readies[0]) < n  # some ready times mattered, most did not
