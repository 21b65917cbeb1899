"""``DataPlane`` (replay/security/session.py): the data-mode calls a migration driver makes, phase by
phase, on a real trace: handshake, pre-copy rounds, stop-and-copy with VMSAs and the token, the guest
running on at the target; refusals and a tampering adversary; the facts for the run record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from replay.core.errors import InvariantError
from replay.traces.generators import generate
from replay.security.attestation import TcbVersion
from replay.security.channel import Flag, Outcome, parse_header
from replay.security.memory import replay_plaintext_digest
from replay.security.session import AttestationSetup, DataPlane
from replay.security.token import TokenOutcome
from replay.model.snp import Op
from replay.traces.format import open_trace

PAGE = 4096


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("dp") / "t.arrow"
    generate("psc", path, guest_bytes=32 * PAGE, vcpus=2, events=3000, seed=8, burst_every=400, burst_pages=3,
             shared_bytes=4 * PAGE, batch_rows=500)
    with open_trace(path) as tr:
        cols = [{n: np.asarray(b.column(n)) for n in ("gpa", "len", "op", "value")} for _, b in tr]
        return path, tr.meta, cols


def pages_written(b):
    """gfns a batch's WRITE and page-state rows touch (the dirty log of that batch), by this test's own rule."""
    out = set()
    for gpa, ln, op in zip(b["gpa"].tolist(), b["len"].tolist(), b["op"].tolist()):
        if op != Op.READ:
            out.update(range(gpa // PAGE, (gpa + ln - 1) // PAGE + 1))
    return sorted(out)


def migrate(trace, *, level=None, setup=AttestationSetup(), tamper_round=None, tamper_token=None):
    path, meta, batches = trace
    dp = DataPlane(5, npages=meta.npages, spa_base=(1024, 4096), shared_ranges=meta.shared_ranges,
                   compress_level=level, setup=setup)
    rows = lambda host, b: dp.guest_rows(host, b["gpa"], b["len"], b["op"], b["value"])  # noqa: E731
    rows(0, batches[0])
    hs = dp.attest()
    if not hs.accepted:
        return dp, None
    outcomes = [dp.send(range(meta.npages), 0, stream=1)]  # round 0: every page
    for rnd, b in enumerate(batches[1:3], start=1):  # the guest runs on; each round sends what it dirtied
        rows(0, b)
        outcomes.append(dp.send(pages_written(b), rnd, stream=1 + rnd % 2,
                                tamper=tamper_round if rnd == 2 else None))
    outcomes.append(dp.send_vmsas(2, (0, 2), stream=3))
    token = dp.finish(tamper=tamper_token)
    if token is TokenOutcome.MATCH:
        for b in batches[3:]:
            rows(1, b)
    return dp, (outcomes, token)


def test_a_clean_migration_ends_with_the_straight_replay_memory(trace):
    dp, (outcomes, token) = migrate(trace, level=3)
    assert all(set(o) == {Outcome.ACCEPTED} for o in outcomes) and token is TokenOutcome.MATCH
    assert dp.memory[1].plaintext_digest() == replay_plaintext_digest(trace[0])
    f = dp.facts()
    assert f["handshake_verdict"] == "accepted" and f["handshake_refused_by"] == "" and f["token"] == "match"
    assert f["source"]["vmsas"] == f["target"]["vmsas"] == 4
    assert f["source"]["sequences"] == f["target"]["sequences"]
    assert f["source"]["shared_pages"] == f["shared_pages_unprotected"] > 0
    assert f["compress"] and f["zstd_level"] == 3 and f["source"]["compressed_pages"] > 0


def test_the_facts_are_byte_identical_for_the_same_seed(trace):
    a, b = migrate(trace, level=1)[0].facts(), migrate(trace, level=1)[0].facts()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_a_refused_handshake_moves_no_page(trace):
    dp, result = migrate(trace, setup=AttestationSetup(target_tcb=TcbVersion(snp=1)))
    assert result is None
    with pytest.raises(InvariantError, match="nothing may be sent before an accepted handshake"):
        dp.send([0], 0, stream=1)
    f = dp.facts()
    assert (f["handshake_refused_by"], f["handshake_verdict"], f["source"], f["target"]) == ("source", "tcb", {}, {})
    assert dp.memory[1].stored_pages == 0


def test_a_tampered_page_is_caught_and_the_target_never_runs(trace):
    def flip_first_sealed(packets):
        out = list(packets)
        i = next(i for i, p in enumerate(out) if parse_header(p).flags == Flag.PRIVATE)  # private, not zero
        out[i] = out[i][:-1] + bytes([out[i][-1] ^ 1])
        return out

    dp, (outcomes, token) = migrate(trace, tamper_round=flip_first_sealed)
    assert Outcome.BAD_TAG in outcomes[2]
    assert token is TokenOutcome.COUNT_MISMATCH  # the target does not resume...
    path, meta, batches = trace
    source_only = DataPlane(5, npages=meta.npages, spa_base=(1024, 4096), shared_ranges=meta.shared_ranges)
    for b in batches[:3]:
        source_only.guest_rows(0, b["gpa"], b["len"], b["op"], b["value"])
    assert dp.memory[0].plaintext_digest() == source_only.memory[0].plaintext_digest()  # ...the source is intact


def test_a_lost_token_is_rejected(trace):
    dp, (outcomes, token) = migrate(trace, tamper_token=lambda packets: [])
    assert token is TokenOutcome.TOKEN_REJECTED and dp.facts()["token"] == "token_rejected"


def test_next_touch_of_each_sent_page():
    """The driver packages a group of sends at once unless a row between a page's send and the group's
    end changes that page: for each sent page, the first WRITE or page-state row at or after its send
    row spanning it (READs do not count), or the end of the rows."""
    import pyarrow as pa

    from replay.migration.data import DataMode
    from replay.traces.format import SCHEMA

    rows = [  # (gpa, len, op): row numbers are 10.. (a = 10)
        (5 * PAGE, 8, Op.WRITE),  # 10: gfn 5
        (7 * PAGE, 8, Op.READ),  # 11: a read of gfn 7 changes nothing
        (6 * PAGE - 4, 8, Op.WRITE),  # 12: gfns 5 and 6 (crosses)
        (8 * PAGE, 2 * PAGE, Op.TO_SHARED),  # 13: gfns 8 and 9
        (7 * PAGE, 1, Op.WRITE),  # 14: gfn 7
    ]
    pad = [(0, 1, Op.READ)] * 10
    cols = list(zip(*(pad + rows)))
    n = len(pad) + len(rows)
    batch = pa.record_batch([pa.array(np.zeros(n), pa.uint64()), pa.array(np.zeros(n), pa.uint16()),
                             pa.array(cols[0], pa.uint64()), pa.array(cols[1], pa.uint32()),
                             pa.array([int(o) for o in cols[2]], pa.uint8()), pa.array(np.zeros(n), pa.uint64())],
                            schema=SCHEMA)
    gfns = np.array([5, 5, 6, 7, 9, 9, 4], np.int64)
    sent = np.array([10, 11, 12, 12, 13, 14, 10], np.int64)
    got = DataMode._next_touch(batch, 10, 15, gfns, sent)
    assert got.tolist() == [10, 12, 12, 14, 13, 15, 15]


@pytest.mark.parametrize("stale", [False, True])
def test_captured_groups_send_like_the_calls_one_by_one(trace, stale, monkeypatch):
    """Groups captured as the guest runs and sent at the end (``send_captured``) give the outcomes, the
    counters, the token and the target memory of sending each group when it was captured; a clean set
    goes through as one batch, a set with a rejected packet group by group, stopping after that group."""
    path, meta, batches = trace
    planes = []
    for _ in range(2):
        dp = DataPlane(5, npages=meta.npages, spa_base=(1024, 4096), shared_ranges=meta.shared_ranges)
        dp.guest_rows(0, *(batches[0][n] for n in ("gpa", "len", "op", "value")))
        assert dp.attest().accepted
        planes.append(dp)
    one, later = planes
    # stale: gfns 5..9 again, at an older version than the 3 they hold (a repeat: group by group)
    g1, g2, g3 = np.arange(0, 10), np.arange(5, 15) if stale else np.arange(10, 20), np.arange(20, 24)
    v1, v2, v3 = np.full(10, 3), np.full(10, 1 if stale else 4), np.full(4, 4)
    rows = lambda dp, b: dp.guest_rows(0, *(b[n] for n in ("gpa", "len", "op", "value")))  # noqa: E731
    expected = [one.send(g1, v1, stream=1)]
    c1 = later.capture(g1)
    rows(one, batches[1])
    rows(later, batches[1])
    expected.append(one.send(g2, v2, stream=1))
    c2 = later.capture(g2)
    if not stale:
        expected.append(one.send(g3, v3, stream=1))
    c3 = later.capture(g3)
    if not stale:  # clean: one batch, never packet by packet
        monkeypatch.setattr(type(later.receiver), "receive_many", lambda *a: pytest.fail("not one batch"))
    contents = tuple(np.concatenate([c[k] for c in (c1, c2, c3)]) for k in (0, 1))
    got = later.send_captured([(g1, v1), (g2, v2), (g3, v3)], contents, stream=1)
    assert got == expected
    assert (Outcome.STALE_VERSION in got[1]) == stale
    assert later.sender.token() == one.sender.token() and later.receiver.token() == one.receiver.token()
    f1, f2 = one.facts(), later.facts()
    assert (f2["source"], f2["target"], f2["digests"]) == (f1["source"], f1["target"], f1["digests"])


class _SendLog:
    """Just what ``DataMode`` asks of the page engine: SPAs and one transfer's send log."""

    def __init__(self):
        self.log = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint64))

    def set_send_log(self, on):
        pass

    def spa(self, host, gfn):
        return (1024, 4096)[host] + gfn

    def take_send_log(self):
        log, self.log = self.log, (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint64))
        return log


@pytest.mark.parametrize("cache_pages", [None, 0, 3])
@pytest.mark.parametrize("capture", [16384, 5])
def test_each_page_arrives_with_the_contents_of_its_send_row(trace, cache_pages, capture, monkeypatch):
    """One transfer over a real batch, with sends between its rows: pages written again later in the
    transfer (copied aside when sent), pages left alone (sealed where they lie when the batch goes),
    never-written, shared and repeated pages, and private pages whose DRAM holds ciphertext (a small or no
    write-back cache). Every page must reach the target with the contents and attribute it had at its
    send row (the last send of a page wins), read off a second memory replayed row by row; the channel's
    two ends must agree."""
    from replay.migration import data as datamod
    from replay.security.memory import HostMemory
    from replay.scenario.strategies import SOURCE, TARGET
    from replay.traces.format import open_trace

    monkeypatch.setattr(datamod, "CAPTURE_PAGES", capture)  # 5: the batch goes in several parts
    path, meta, _ = trace
    with open_trace(path) as tr:
        (base0, b0), (base1, b1) = list(tr)[:2]
    eng = _SendLog()
    dm = datamod.DataMode(5, eng, meta, 0)
    for h in (SOURCE, TARGET):
        if cache_pages is not None:
            dm.dp.memory[h].cache_pages = cache_pages
    dm.rows(SOURCE, b0, 0, b0.num_rows)
    dm.handshake()
    rng = np.random.default_rng(3)
    n = b1.num_rows
    sent_at = np.sort(rng.integers(0, n + 1, 60))  # rows applied before each send (0..n)
    gfns = rng.integers(0, meta.npages, 60)
    gfns[:4] = gfns[4:8]  # some pages twice
    eng.log = (gfns.astype(np.int64), sent_at + base1, np.arange(1, 61, dtype=np.uint64))
    dm.after_transfer(SOURCE, b1, base1, 0, n, "precopy")

    ref = HostMemory.for_host(1, 0, npages=meta.npages, spa_base=77, shared_ranges=meta.shared_ranges)
    ref.apply_batch(b0)
    cols = [np.asarray(b1.column(c)) for c in ("gpa", "len", "op", "value")]
    expect, done = {}, 0
    for g, r in zip(gfns.tolist(), sent_at.tolist()):
        ref.apply(*(c[done:r] for c in cols))
        done = r
        expect[g] = (ref.read_plain(g), ref.is_private(g))
    target = dm.dp.memory[TARGET]
    for g, (page, private) in expect.items():
        assert target.read_plain(g) == page, f"gfn {g}"
        assert target.is_private(g) == private
    assert dm.dp.sender.token() == dm.dp.receiver.token()
    src, dst = dm.dp.sender.stats.to_json(), dm.dp.receiver.stats.to_json()
    assert src["sequences"] == dst["sequences"] == {"0": 60} and dst["outcomes"] == {"accepted": 60}
    ref.apply(*(c[done:] for c in cols))
    assert dm.dp.memory[SOURCE].plaintext_digest() == ref.plaintext_digest()  # the guest ran every row
