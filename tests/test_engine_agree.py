"""Property tests: random traces and random operation sequences applied to both engines give equal results.

Every return value (or exception type and message), and at the end every RMP entry of every SPA, every
page of every gfn, ``counters()``, ``transfer_state()``, ``last_stop`` and ``digest`` of both engines must
be equal. Batches are built with pyarrow directly (no dependency on replay/traces/format.py).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.engines.common import BATCH_COLUMNS
from replay.engines import make_engine

ENGINE = settings.get_profile("engine")
P = 4096


@st.composite
def batches(draw, npages, vcpus, bad=True):
    n = draw(st.integers(0, 24))
    t = sorted(draw(st.lists(st.integers(0, 5000), min_size=n, max_size=n)))
    rows = []
    for i in range(n):
        gfn = draw(st.integers(0, npages - 1))
        off = draw(st.integers(0, P - 1))
        ln = draw(st.sampled_from([1, 8, 64, P, P + 1, 3 * P]))
        op = draw(st.sampled_from([0, 0, 0, 1, 2, 3]))
        vcpu = draw(st.integers(0, vcpus - 1))
        rows.append([t[i], vcpu, gfn * P + off, ln, op, i])
    if bad and n and draw(st.integers(0, 9)) == 0:  # now and then an invalid row
        i = draw(st.integers(0, n - 1))
        col, val = draw(st.sampled_from([(1, vcpus), (3, 0), (2, npages * P), (4, 7)]))
        rows[i][col] = val
    cols = list(zip(*rows)) if rows else [()] * 6
    b = pa.RecordBatch.from_arrays(
        [pa.array(list(c), type=ty) for c, (_, ty) in zip(cols, BATCH_COLUMNS)],
        names=[nm for nm, _ in BATCH_COLUMNS],
    )
    if n > 2 and draw(st.booleans()):
        b = b.slice(1)  # non-zero column offsets
    return b


@st.composite
def scenarios(draw):
    npages = draw(st.integers(1, 24))
    vcpus = draw(st.integers(1, 3))
    hosts = draw(st.integers(1, 2))
    os_vmpl = draw(st.integers(0, 3))
    asid = draw(st.integers(1, 2))
    host = st.integers(0, hosts - 1)
    gfn = st.integers(0, npages - 1)
    any_gfn = st.integers(0, npages + 1)  # also gfns no page has, for RMP entries
    spa = st.one_of(
        st.builds(lambda h, g: 1024 * (h + 1) + g, host, gfn),
        st.sampled_from([1024, 1536, 2048, 2560]),
        st.integers(1020, 1024 + npages + 4),
    )
    # (host, spa, gfn) of an RMP instruction: mostly the page's own entry, or a 2M head with its gfn
    target = st.one_of(
        st.builds(lambda h, g: (h, 1024 * (h + 1) + g, g), host, gfn),
        st.builds(lambda h, g: (h, 1024 * (h + 1) + g, g), host, gfn),
        st.builds(lambda h, i: (h, 1024 * (h + 1) + 512 * i, 512 * i), host, st.integers(0, 1)),
        st.tuples(host, spa, any_gfn),
    )
    asids = st.sampled_from([asid, asid, asid, 3 - asid])
    b = batches(npages, vcpus)
    delays = st.one_of(st.none(), st.lists(st.integers(0, 3000), min_size=vcpus, max_size=vcpus))
    ops = [
        st.tuples(st.just("rmpupdate"), target, st.fixed_dictionaries(dict(
            assigned=st.sampled_from([True, True, False]), asid=asids, size_2m=st.sampled_from([False, False, True]),
            immutable=st.sampled_from([False] * 9 + [True])))),
        st.tuples(st.just("pvalidate"), target, st.fixed_dictionaries(dict(
            asid=asids, vmpl=st.sampled_from([0, 0, 0, 1]), validate=st.sampled_from([True, True, False]),
            size_2m=st.sampled_from([False, False, True])))),
        st.tuples(st.just("rmpadjust"), target, st.fixed_dictionaries(dict(
            asid=asids, caller_vmpl=st.integers(0, 3), target_vmpl=st.integers(-1, 4),
            perms=st.integers(0, 15), vmsa=st.booleans(), size_2m=st.sampled_from([False, False, True])))),
        st.tuples(st.just("psmash"), host, spa),
        st.tuples(st.just("check_access"), host, gfn, st.fixed_dictionaries(dict(
            vmpl=st.integers(0, 3), access=st.sampled_from([1, 2]), private=st.booleans()))),
        st.tuples(st.just("host_write"), host, spa),
        st.tuples(st.just("launch"), host, st.lists(st.tuples(gfn, st.integers(0, 3)), max_size=2)),
        st.tuples(st.just("set_dirty_logging"), host, st.booleans()),
        st.tuples(st.just("collect_dirty"), host),
        st.tuples(st.just("reset_counters")),
        st.tuples(st.just("replay"), host, b, st.integers(0, 3), st.integers(0, 1000),
                  st.integers(0, 6000), delays),
        st.tuples(st.just("begin_transfer"), st.integers(0, 5000), st.integers(0, 5000), st.fixed_dictionaries(dict(
            bandwidth_bytes_per_s=st.sampled_from([1000, 10**6, 10**9, 3 * 10**9 + 7]),
            page_bytes=st.sampled_from([0, 4096, 4200]), header_bytes=st.integers(0, 100),
            agents=st.integers(1, 3), pack_private_ns=st.integers(0, 2000), pack_zero_ns=st.integers(0, 300),
            batch_pages=st.integers(1, 4), vmgexit_ns=st.integers(0, 5000), charge_guest=st.booleans(),
            unpack_private_ns=st.integers(0, 50), target_rmp=st.booleans(), skip_present=st.booleans(),
            src_cpus=st.sampled_from([None, (1, 1), (4, 3), (6, 5)]), dst_cpus=st.sampled_from([None, (2, 1), (3, 4)]),
            src_pool_cpus=st.sampled_from([0, 0, 1, 2]), dst_pool_cpus=st.sampled_from([0, 1]),
            rmpupdate_ns=st.integers(0, 900), pvalidate_ns=st.integers(0, 900), rmpadjust_ns=st.integers(0, 900),
            first_touch_ns=st.sampled_from([0, 0, 777]), host_page_ns=st.integers(0, 600),
            wp_fault_ns=st.sampled_from([0, 260]), charge_target_guest=st.booleans()))),
        st.tuples(st.just("transfer"), host, host, st.one_of(st.lists(gfn, max_size=12), st.none()),
                  st.integers(0, 2), st.one_of(st.none(), b), st.integers(0, 3), st.integers(0, 100), host, delays,
                  st.one_of(st.none(), st.integers(0, 30000)), st.one_of(st.none(), st.integers(0, 30000)),
                  st.one_of(st.none(), st.integers(0, npages))),
        st.tuples(st.just("transfer_add"), st.integers(0, 9000), st.integers(0, 3000), st.integers(0, 3000)),
        st.tuples(st.just("mark_send_all"), host),
        st.tuples(st.just("sync_dirty"), host),
        st.tuples(st.just("send_count"), host),
        st.tuples(st.just("discard_stale"), host, host),
        st.tuples(st.just("wp_faults"), host),
        st.tuples(st.just("received_digest"), host),
        st.tuples(st.just("set_digest"), host),
        st.tuples(st.just("clear_present"), host, st.lists(gfn, max_size=4)),
        st.tuples(st.just("deliver"), host, host, gfn),
        st.tuples(st.just("set_send_log"), st.booleans()),
        st.tuples(st.just("take_send_log")),
    ]
    seq = draw(st.lists(st.one_of(ops), min_size=1, max_size=30))
    if draw(st.booleans()):
        seq.insert(0, ("launch", 0, []))
    return dict(npages=npages, vcpus=vcpus, hosts=hosts, os_vmpl=os_vmpl, asid=asid), seq


def norm(x):
    if isinstance(x, np.ndarray):
        return ("ndarray", str(x.dtype), x.tolist())
    if isinstance(x, tuple):
        return tuple(norm(y) for y in x)
    return x


def apply(e, op):
    name, *args = op
    try:
        if name in ("rmpupdate", "pvalidate", "rmpadjust"):
            (h, spa, gfn), kw = args
            return norm(getattr(e, name)(h, spa, gfn=gfn, **kw))
        if name == "check_access":
            return norm(e.check_access(*args[:-1], **args[-1]))
        if name == "begin_transfer":
            return norm(e.begin_transfer(args[0], args[1], **args[2]))
        if name == "replay":
            h, b, start, base, stop, delays = args
            return norm(e.replay(h, b, start, base, stop, delays))
        if name == "transfer":
            src, dst, gfns, k, b, start, base, run_host, delays, until, deadline, walk_end = args
            gfns = None if gfns is None else np.array(gfns, np.uint32)
            return norm(e.transfer(src, dst, gfns, k, b, start, base, run_host, delays, until_v=until,
                                   deadline_v=deadline, walk_end=walk_end if gfns is None else None))
        if name == "launch":
            h, ranges = args
            return norm(e.launch(h, [(g, g + n) for g, n in ranges]))
        return norm(getattr(e, name)(*args))
    except Exception as exc:  # the same error must come out of both engines
        return ("raised", type(exc).__name__, str(exc))


def state(e):
    out = {
        "counters": e.counters(),
        "transfer_state": e.transfer_state(),
        "last_stop": e.last_stop,
    }
    for h in range(e.hosts):
        out[f"rmp{h}"] = [e.rmp_entry(h, s) for s in range(e.rmp_size(h))]
        out[f"pages{h}"] = [e.page(h, g) for g in range(e.npages)]
        out[f"flags{h}"] = e.flags(h, range(e.npages)).tolist()
        out[f"digest{h}"] = e.digest(h)
        out[f"present{h}"] = e.count_present(h)
        out[f"send{h}"] = e.send_count(h)
        out[f"wp{h}"] = e.wp_faults(h)
        out[f"recv{h}"] = e.received_digest(h)
        out[f"set{h}"] = e.set_digest(h)
    return out


def run_both(cfg, seq):
    engines = [make_engine(kind, **cfg) for kind in ("cython", "reference")]
    for i, op in enumerate(seq):
        got = [apply(e, op) for e in engines]
        assert got[0] == got[1], f"op {i} {op[0]}: cython {got[0]!r} != reference {got[1]!r}"
        ls = [e.last_stop for e in engines]
        assert ls[0] == ls[1], f"op {i} {op[0]}: last_stop {ls}"
    s0, s1 = (state(e) for e in engines)
    for key in s0:
        assert s0[key] == s1[key], key
    return engines


@ENGINE
@given(scenarios())
def test_random_operations_agree(sc):
    run_both(*sc)


@ENGINE
@given(st.data())
def test_random_traces_replay_agree(data):
    """Whole random traces (several batches), with dirty collection between batches, on a launched guest."""
    npages = data.draw(st.integers(1, 40))
    vcpus = data.draw(st.integers(1, 4))
    shared = data.draw(st.lists(st.tuples(st.integers(0, npages - 1), st.integers(0, 5)), max_size=3))
    seq = [("launch", 0, shared), ("set_dirty_logging", 0, data.draw(st.booleans()))]
    base = 0
    for _ in range(data.draw(st.integers(1, 4))):
        b = data.draw(batches(npages, vcpus, bad=False))
        seq.append(("replay", 0, b, 0, base, data.draw(st.sampled_from([2**64 - 1, 2500])), None))
        seq.append(("collect_dirty", 0))
        base += b.num_rows
    run_both(dict(npages=npages, vcpus=vcpus, os_vmpl=data.draw(st.integers(0, 3))), seq)


@pytest.mark.slow
@settings(ENGINE, max_examples=400)
@given(scenarios())
def test_random_operations_agree_long(sc):
    run_both(*sc)
