"""Synthetic workloads (SPEC section 2): traces that are pure functions of their parameters and a seed.

``generate(kind, out, ...)`` streams a workload into a ``TraceWriter`` in bounded chunks, so a
100M-event trace never sits in memory. Kinds (``GENERATORS``):

- ``uniform``  accesses uniformly at random over guest memory (``len``: byte-granular spans that may
  cross page boundaries);
- ``hotcold``  a hot set (``hot_bytes`` or ``hot_fraction_ppm`` of memory, scattered over the guest)
  receiving ``hot_probability_ppm`` of the accesses, or a Zipf law over pages (``zipf_ppm``: exponent
  in millionths, e.g. 1_200_000 for s = 1.2);
- ``stress``   QEMU tests/migration/stress.c: each vCPU rewrites its own slice (guest_bytes / vcpus,
  page-aligned) in address order, forever; page-sized writes by default;
- ``ab``       QEMU migration-test's A-B boot block: vCPU 0 writes one byte at the start of each page of
  ``[start, end)`` (default 1 MiB..100 MiB, end clipped to the guest) in address order, pass after pass;
- ``phased``   ``phases`` working sets of ``window_bytes`` each, spread evenly over the guest, one after
  the other (the events are split evenly between phases);
- ``psc``      uniform writes with bursts of page-state changes every ``burst_every`` events: a burst
  picks a random window of ``burst_pages`` pages and a direction, and converts the pages of the window
  not already in that state (one 4 KiB event per page). The generator tracks the state of every page,
  so it only ever converts private->shared and shared->private; the initial shared pages are
  ``[0, shared_bytes)`` and are recorded in ``shared_ranges``.

Common parameters: ``guest_bytes``, ``vcpus``, ``events`` (not counting fill), ``seed``, ``rate``
(accesses per guest second: row i of the trace is at ``t_ns = i * 10**9 // rate``, exact integers),
``fill`` (first write every page once, whole-page writes in address order, *in addition to* ``events``;
a migration starting after them sees no zero pages), ``read_ppm`` (millionths of the non-fill accesses
that are READs rather than WRITEs) and ``access_bytes`` (size of each access, a power of two <= 4096,
naturally aligned; default 8, 4096 for stress, 1 for ab), ``utilization_ppm`` (millionths of the time the
vCPUs run: each ``period_ns`` cycle, default 10 ms, they run first and then halt; the rows are laid out in
run time and the halts are the trace's idle intervals, format version 2; default: always running) and
``period_ns``. vCPUs take rows in turn (row i is vCPU
``i % vcpus``) except in stress (each vCPU its slice) and ab (vCPU 0). ``value`` is a random 64-bit
word per row.

Determinism: fractions are integers (ppm), never floats. Each concern draws from its own stream
(``SeedSequence(seed).spawn``: addresses, values, read/write choice, layout), and workloads produce
rows in fixed-size pieces that do not depend on the chunk size given to the writer, so the same
parameters give the same digest however the trace is chunked or batched.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..core.errors import UsageError
from ..model.snp import Op
from .format import MAX_IDLE_INTERVALS, MAX_VCPUS, PAGE_SHIFT, PAGE_SIZE, TraceMeta, TraceWriter

DEFAULT_RATE = 10_000_000  # accesses per guest second: 100 ns apart
PIECE = 1 << 16  # rows per workload piece: part of the definition of the streams, do not change
DEFAULT_CHUNK = 1 << 20
PPM = 1_000_000

# One piece of workload output: gpa, len, op, vcpu (arrays, or scalars for len/op; vcpu None = turns).
Piece = tuple[np.ndarray, Any, Any, Any]


@dataclass(frozen=True)
class Params:
    """The common, validated parameters every workload sees."""

    guest_bytes: int
    vcpus: int
    events: int
    seed: int
    rate: int
    fill: bool
    read_ppm: int
    access_bytes: int

    @property
    def npages(self) -> int:
        return self.guest_bytes >> PAGE_SHIFT


class Streams:
    """Independent random streams, one per concern, all derived from the seed."""

    def __init__(self, seed: int):
        kids = np.random.SeedSequence(seed).spawn(4)
        self.addr, self.value, self.op, self.layout = (np.random.Generator(np.random.PCG64(k)) for k in kids)


@dataclass(frozen=True)
class Workload:
    """A generator kind: its options (name -> default; None means derived) and how it runs.

    ``setup(params, opts, streams) -> (effective options, shared_ranges, pieces)`` where ``pieces``
    is an iterator of ``Piece`` covering exactly ``params.events`` rows.
    """

    name: str
    help: str
    options: Mapping[str, Any]
    setup: Callable[[Params, dict, Streams], tuple[dict, list, Iterator[Piece]]]
    default_access_bytes: int = 8


# ----------------------------------------------------------------------------------------------------
# helpers


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise UsageError(msg)


def _int_opt(kind: str, opts: dict, key: str, lo: int, hi: int | None = None) -> int:
    v = opts[key]
    _need(isinstance(v, int) and not isinstance(v, bool), f"{kind}: {key} must be an integer, not {v!r}")
    _need(v >= lo and (hi is None or v <= hi), f"{kind}: {key} {v} out of range {lo}..{'' if hi is None else hi}")
    return v


def _sizes(n_total: int) -> Iterator[int]:
    done = 0
    while done < n_total:
        n = min(PIECE, n_total - done)
        yield n
        done += n


def _slots(rng: np.random.Generator, n: int, slots: int) -> np.ndarray:
    # 64-bit bounded draws consume the stream element by element (no buffered 32-bit halves).
    return rng.integers(0, slots, size=n, dtype=np.uint64)


def _bijection(rng: np.random.Generator, npages: int) -> tuple[int, int]:
    """(a, b) with gcd(a, npages) == 1: r -> (a*r + b) % npages scatters ranks over the guest."""
    if npages <= 2:
        return 1, 0
    while True:
        a = int(rng.integers(npages // 3 + 1, npages))
        if math.gcd(a, npages) == 1:
            return a, int(rng.integers(0, npages))


def _permute(r: np.ndarray, ab: tuple[int, int], npages: int) -> np.ndarray:
    a, b = ab
    # a < npages < 2**32 and r < npages, so a*r + b < 2**64: exact in uint64.
    return (r * np.uint64(a) + np.uint64(b)) % np.uint64(npages)


def _in_page(rng: np.random.Generator, n: int, access_bytes: int) -> np.ndarray:
    per = PAGE_SIZE // access_bytes
    if per == 1:
        return np.zeros(n, np.uint64)
    return _slots(rng, n, per) * np.uint64(access_bytes)


# ----------------------------------------------------------------------------------------------------
# workloads


def _uniform(p: Params, o: dict, s: Streams):
    span = o["len"]
    eff: dict[str, Any] = {"len": span}
    if span is None:
        ab = p.access_bytes
        slots = p.guest_bytes // ab

        def pieces():
            for n in _sizes(p.events):
                yield _slots(s.addr, n, slots) * np.uint64(ab), ab, Op.WRITE, None
    else:
        span = _int_opt("uniform", o, "len", 1, min(p.guest_bytes, (1 << 32) - 1))

        def pieces():
            for n in _sizes(p.events):
                yield _slots(s.addr, n, p.guest_bytes - span + 1), span, Op.WRITE, None
    return eff, [], pieces()


def _hotcold(p: Params, o: dict, s: Streams):
    npages = p.npages
    ab = p.access_bytes
    given = [k for k in ("hot_bytes", "hot_fraction_ppm", "zipf_ppm") if o[k] is not None]
    _need(len(given) <= 1, f"hotcold: give at most one of hot_bytes, hot_fraction_ppm, zipf_ppm (got {', '.join(given)})")
    perm = _bijection(s.layout, npages)
    if o["zipf_ppm"] is not None:
        _need(o["hot_probability_ppm"] is None, "hotcold: hot_probability_ppm does not apply with zipf_ppm")
        z = _int_opt("hotcold", o, "zipf_ppm", 1, 100 * PPM)
        # Inverse-CDF sampling over ranks 1..npages (works for any exponent > 0, unlike numpy's zipf).
        # Float arithmetic here is internal and deterministic (sequential cumsum); nothing float is recorded.
        weights = np.arange(1, npages + 1, dtype=np.float64) ** (-z / PPM)
        cdf = np.cumsum(weights)
        cdf /= cdf[-1]

        def pieces():
            for n in _sizes(p.events):
                u = (s.addr.bit_generator.random_raw(n) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
                rank = np.minimum(np.searchsorted(cdf, u, side="right"), npages - 1).astype(np.uint64)
                page = _permute(rank, perm, npages)
                yield (page << np.uint64(PAGE_SHIFT)) + _in_page(s.addr, n, ab), ab, Op.WRITE, None

        return {"mode": "zipf", "zipf_ppm": z}, [], pieces()

    if o["hot_fraction_ppm"] is not None:
        frac = _int_opt("hotcold", o, "hot_fraction_ppm", 1, PPM)
        hot_pages = max(1, npages * frac // PPM)
    else:
        hb = o["hot_bytes"]
        if hb is None:
            hb = min(64 << 20, p.guest_bytes // 8)
        _need(isinstance(hb, int) and hb >= 1, f"hotcold: hot_bytes must be a positive integer, not {hb!r}")
        hot_pages = max(1, min(npages, hb // PAGE_SIZE))
    prob = 800_000 if o["hot_probability_ppm"] is None else o["hot_probability_ppm"]
    o = dict(o, hot_probability_ppm=prob)
    prob = _int_opt("hotcold", o, "hot_probability_ppm", 0, PPM)
    cold_pages = npages - hot_pages

    def pieces():
        for n in _sizes(p.events):
            hot = (s.addr.bit_generator.random_raw(n) % np.uint64(PPM)) < np.uint64(prob)
            if cold_pages == 0:
                hot[:] = True
            rank = np.empty(n, np.uint64)
            k = int(hot.sum())
            rank[hot] = _slots(s.addr, k, hot_pages)
            if k < n:
                rank[~hot] = np.uint64(hot_pages) + _slots(s.addr, n - k, cold_pages)
            page = _permute(rank, perm, npages)
            yield (page << np.uint64(PAGE_SHIFT)) + _in_page(s.addr, n, ab), ab, Op.WRITE, None

    eff = {"mode": "hotset", "hot_bytes": hot_pages * PAGE_SIZE, "hot_probability_ppm": prob}
    return eff, [], pieces()


def hot_pages_of(meta_source: dict, guest_bytes: int, seed: int) -> np.ndarray:
    """The gfns of a hotcold (hot-set mode) trace's hot set, from its parameters (for tests/analysis)."""
    npages = guest_bytes >> PAGE_SHIFT
    perm = _bijection(Streams(seed).layout, npages)
    hot_pages = meta_source["hot_bytes"] // PAGE_SIZE
    return np.sort(_permute(np.arange(hot_pages, dtype=np.uint64), perm, npages))


def _stress(p: Params, o: dict, s: Streams):
    slice_pages = p.npages // p.vcpus
    _need(slice_pages >= 1, f"stress: guest of {p.npages} pages is too small for {p.vcpus} vcpus (one page each)")
    slice_bytes = slice_pages * PAGE_SIZE
    ab = p.access_bytes
    per_slice = slice_bytes // ab
    v = p.vcpus

    def pieces():
        j0 = 0
        for n in _sizes(p.events):
            j = np.arange(j0, j0 + n, dtype=np.uint64)
            vcpu = j % np.uint64(v)
            k = (j // np.uint64(v)) % np.uint64(per_slice)
            yield vcpu * np.uint64(slice_bytes) + k * np.uint64(ab), ab, Op.WRITE, vcpu.astype(np.uint16)
            j0 += n

    return {"slice_bytes": slice_bytes}, [], pieces()


def _ab(p: Params, o: dict, s: Streams):
    start = _int_opt("ab", o, "start", 0)
    end = min(_int_opt("ab", o, "end", 1), p.guest_bytes)
    first = -(-start // PAGE_SIZE)
    last = -(-end // PAGE_SIZE)  # pages whose first byte is < end
    _need(first < last, f"ab: empty range [{start:#x}, {end:#x}) in a guest of {p.guest_bytes:#x} bytes")
    npg = last - first

    def pieces():
        j0 = 0
        for n in _sizes(p.events):
            j = np.arange(j0, j0 + n, dtype=np.uint64)
            page = np.uint64(first) + j % np.uint64(npg)
            yield page << np.uint64(PAGE_SHIFT), p.access_bytes, Op.WRITE, 0
            j0 += n

    return {"start": first * PAGE_SIZE, "end": min(last * PAGE_SIZE, p.guest_bytes)}, [], pieces()


def _phased(p: Params, o: dict, s: Streams):
    phases = _int_opt("phased", o, "phases", 1, 1 << 20)
    wb = o["window_bytes"]
    if wb is None:
        wb = max(PAGE_SIZE, p.guest_bytes // (2 * phases))
    _need(isinstance(wb, int) and PAGE_SIZE <= wb <= p.guest_bytes, f"phased: window_bytes {wb!r} must be 4096..guest_bytes")
    wpages = wb // PAGE_SIZE
    wb = wpages * PAGE_SIZE
    room = p.npages - wpages
    starts = np.array([(room * k // max(phases - 1, 1)) * PAGE_SIZE for k in range(phases)], dtype=np.uint64)
    ab = p.access_bytes
    slots = wb // ab
    events = max(p.events, 1)

    def pieces():
        j0 = 0
        for n in _sizes(p.events):
            j = np.arange(j0, j0 + n, dtype=np.uint64)
            # j * phases < 2**64 for any sane trace (checked in generate()).
            phase = (j * np.uint64(phases)) // np.uint64(events)
            yield starts[phase] + _slots(s.addr, n, slots) * np.uint64(ab), ab, Op.WRITE, None
            j0 += n

    return {"phases": phases, "window_bytes": wb}, [], pieces()


def _psc(p: Params, o: dict, s: Streams):
    npages = p.npages
    sb = _int_opt("psc", o, "shared_bytes", 0, p.guest_bytes)
    shared_pages = sb // PAGE_SIZE
    every = _int_opt("psc", o, "burst_every", 1)
    bp = _int_opt("psc", o, "burst_pages", 1, npages)
    ab = p.access_bytes
    slots = p.guest_bytes // ab
    shared = np.zeros(npages, dtype=bool)  # current state of every page, as the engine will see it
    shared[:shared_pages] = True
    ranges = [[0, shared_pages - 1]] if shared_pages else []

    def produce() -> Iterator[Piece]:
        left = p.events
        while left > 0:
            n = min(every, left)
            for m in _sizes(n):
                yield _slots(s.addr, m, slots) * np.uint64(ab), ab, Op.WRITE, None
            left -= n
            if left <= 0:
                break
            to_shared = bool(s.addr.bit_generator.random_raw() & 1)
            # Start the window at a page that can convert (so shared pages do convert back), found by
            # bounded rejection sampling; give up on an empty burst rather than scan the guest.
            first = None
            for _ in range(64):
                g = int(s.addr.integers(0, npages))
                if shared[g] != to_shared:
                    first = min(g, npages - bp)
                    break
            if first is None:
                continue
            window = np.arange(first, first + bp, dtype=np.uint64)
            # Only pages not already in the target state change: never a double conversion.
            todo = window[shared[first:first + bp] != to_shared][:left]
            if todo.size:
                shared[todo.astype(np.intp)] = to_shared
                op = Op.TO_SHARED if to_shared else Op.TO_PRIVATE
                yield todo << np.uint64(PAGE_SHIFT), PAGE_SIZE, op, None
                left -= todo.size

    eff = {"shared_bytes": shared_pages * PAGE_SIZE, "burst_every": every, "burst_pages": bp}
    return eff, ranges, produce()


GENERATORS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("uniform", "uniform random accesses over guest memory", {"len": None}, _uniform),
        Workload(
            "hotcold",
            "hot set (hot_bytes / hot_fraction_ppm, hot_probability_ppm) or zipf over pages",
            {"hot_bytes": None, "hot_fraction_ppm": None, "hot_probability_ppm": None, "zipf_ppm": None},
            _hotcold,
        ),
        Workload("stress", "QEMU stress.c: each vCPU rewrites its own slice in address order", {}, _stress, 4096),
        Workload("ab", "QEMU migration-test A-B: one byte per page, pass after pass", {"start": 1 << 20, "end": 100 << 20}, _ab, 1),
        Workload("phased", "working sets that move over time (phases windows)", {"phases": 4, "window_bytes": None}, _phased),
        Workload(
            "psc",
            "writes with bursts of private<->shared page-state changes",
            {"shared_bytes": 1 << 20, "burst_every": 4096, "burst_pages": 64},
            _psc,
        ),
    )
}
COMMON_OPTIONS = ("read_ppm", "access_bytes", "utilization_ppm", "period_ns")
DEFAULT_PERIOD_NS = 10_000_000  # a utilization's run/idle cycle: busy first, then idle, 10 ms a cycle


def _unknown(kind: str, key: str, valid: list[str]) -> UsageError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UsageError(f"{kind}: unknown option {key!r}{hint}; options: {', '.join(sorted(valid)) or 'none'}")


def generate(
    kind: str,
    out: str | os.PathLike,
    *,
    guest_bytes: int,
    vcpus: int,
    events: int,
    seed: int,
    rate: int = DEFAULT_RATE,
    fill: bool = False,
    compression: str | None = "zstd",
    batch_rows: int = 1 << 20,
    chunk_rows: int = DEFAULT_CHUNK,
    progress: Callable[[int], None] | None = None,
    **opts: Any,
) -> TraceMeta:
    """Write workload ``kind`` to ``out`` and return its metadata. See the module docstring."""
    if kind not in GENERATORS:
        close = difflib.get_close_matches(kind, list(GENERATORS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown generator {kind!r}{hint}; known: {', '.join(GENERATORS)}")
    w = GENERATORS[kind]
    valid = list(w.options) + list(COMMON_OPTIONS)
    for key in opts:
        if key not in valid:
            raise _unknown(kind, key, valid)

    def _intp(name: str, v: Any, lo: int, hi: int) -> int:
        _need(isinstance(v, int) and not isinstance(v, bool), f"{kind}: {name} must be an integer, not {v!r}")
        _need(lo <= v <= hi, f"{kind}: {name} {v} out of range {lo}..{hi}")
        return v

    _intp("guest_bytes", guest_bytes, PAGE_SIZE, (1 << 32) * PAGE_SIZE - PAGE_SIZE)
    _need(guest_bytes % PAGE_SIZE == 0, f"{kind}: guest_bytes {guest_bytes} is not a multiple of {PAGE_SIZE}")
    _intp("vcpus", vcpus, 1, MAX_VCPUS)
    _intp("events", events, 0, 1 << 40)
    _intp("seed", seed, 0, (1 << 64) - 1)
    _intp("rate", rate, 1, 10**15)
    _need(isinstance(fill, bool), f"{kind}: fill must be True or False")
    read_ppm = _intp("read_ppm", opts.get("read_ppm", 0), 0, PPM)
    access_given = "access_bytes" in opts
    ab = _intp("access_bytes", opts.get("access_bytes", w.default_access_bytes), 1, PAGE_SIZE)
    _need(ab & (ab - 1) == 0, f"{kind}: access_bytes {ab} must be a power of two <= {PAGE_SIZE}")
    _need(not (kind == "ab" and access_given and ab != 1), "ab: writes exactly one byte per page (access_bytes 1)")
    _intp("chunk_rows", chunk_rows, 1, 1 << 30)
    util = _intp("utilization_ppm", opts.get("utilization_ppm", PPM), 1, PPM)
    period = _intp("period_ns", opts.get("period_ns", DEFAULT_PERIOD_NS), 1000, 10**12)
    busy_ns = max(1, util * period // PPM)  # of each period; the rest idle

    p = Params(guest_bytes, vcpus, events, seed, rate, fill, read_ppm, ab)
    npages = p.npages
    fill_rows = npages if fill else 0
    total = fill_rows + events
    _need(total == 0 or (total - 1) * 10**9 // rate < 1 << 64, f"{kind}: t_ns of {total} rows at rate {rate}/s overflows 64 bits")
    _need(total * 1024 < 1 << 64, f"{kind}: too many events")
    last_busy = (total - 1) * 10**9 // rate if total else 0
    cycles = last_busy // busy_ns  # whole busy parts before the last row's
    if util < PPM:
        _need(cycles * period + last_busy % busy_ns < 1 << 64,
              f"{kind}: t_ns of {total} rows at rate {rate}/s and utilization {util} ppm overflows 64 bits")
        _need(cycles <= MAX_IDLE_INTERVALS, f"{kind}: {cycles} idle periods at utilization {util} ppm and period "
                                            f"{period} ns: at most {MAX_IDLE_INTERVALS} (a longer period_ns)")

    s = Streams(seed)
    kopts = {k: opts.get(k, d) for k, d in w.options.items()}
    eff, shared_ranges, pieces = w.setup(p, kopts, s)
    source = {
        "generator": kind,
        "guest_bytes": guest_bytes,
        "vcpus": vcpus,
        "events": events,
        "seed": seed,
        "rate": rate,
        "fill": fill,
        "read_ppm": read_ppm,
        "access_bytes": ab,
        **eff,
    }
    idle = None
    if util < PPM:  # recorded only when set, so that busy traces keep their metadata
        source.update(utilization_ppm=util, period_ns=period)
        # Every vCPU runs the first busy_ns of each period and halts for the rest; the trace's rows are laid
        # out in busy time (row i at i / rate of it) and mapped onto that cycle.
        shared = []
        for k in range(cycles):
            shared += [k * period + busy_ns, (k + 1) * period]
        idle = [shared] + [0] * (vcpus - 1)

    def rows() -> Iterator[tuple]:
        """(gpa, len, op, vcpu, is_access) pieces of the whole trace: fill first, then the workload."""
        for start in range(0, fill_rows, PIECE):
            n = min(PIECE, fill_rows - start)
            gpa = np.arange(start, start + n, dtype=np.uint64) << np.uint64(PAGE_SHIFT)
            yield gpa, PAGE_SIZE, Op.WRITE, None, False
        for gpa, ln, op, vc in pieces:
            yield gpa, ln, op, vc, True

    with TraceWriter(
        out, guest_bytes=guest_bytes, vcpus=vcpus, shared_ranges=shared_ranges, source=source,
        batch_rows=batch_rows, compression=compression, vcpu_idle=idle,
    ) as tw:
        row = 0
        buf: list[tuple] = []
        buffered = 0

        def emit(parts: list[tuple]) -> None:
            nonlocal row
            n = sum(pp[0].shape[0] for pp in parts)
            gpa = np.concatenate([pp[0] for pp in parts]) if len(parts) > 1 else parts[0][0]
            ln = np.concatenate([np.broadcast_to(np.asarray(pp[1], np.uint32), pp[0].shape) for pp in parts])
            op = np.concatenate([np.broadcast_to(np.asarray(pp[2], np.uint8), pp[0].shape) for pp in parts])
            idx = np.arange(row, row + n, dtype=np.uint64)
            # vCPU: the workload's own assignment, else rows take turns.
            vcpu = np.empty(n, np.uint16)
            pos = 0
            for pp in parts:
                k = pp[0].shape[0]
                if pp[3] is None:
                    vcpu[pos:pos + k] = (idx[pos:pos + k] % np.uint64(vcpus)).astype(np.uint16)
                else:
                    vcpu[pos:pos + k] = pp[3]
                pos += k
            if read_ppm:
                # One draw per workload row (writes and conversions alike) keeps the stream aligned
                # with the row index; only WRITEs can become READs.
                pos = 0
                for pp in parts:
                    k = pp[0].shape[0]
                    if pp[4]:
                        r = (s.op.bit_generator.random_raw(k) % np.uint64(PPM)) < np.uint64(read_ppm)
                        seg = op[pos:pos + k]
                        seg[r & (seg == Op.WRITE)] = Op.READ
                    pos += k
            if 10**9 % rate == 0:
                t_ns = idx * np.uint64(10**9 // rate)  # the common case: no 64-bit division per row
            elif total * 10**9 < 1 << 64:
                t_ns = idx * np.uint64(10**9) // np.uint64(rate)
            else:
                t_ns = _t_big(row, n, rate)
            if util < PPM:  # busy time -> trace time on the run/idle cycle
                t_ns = (t_ns // np.uint64(busy_ns)) * np.uint64(period) + t_ns % np.uint64(busy_ns)
            value = s.value.bit_generator.random_raw(n)
            tw.write(t_ns, vcpu, gpa, ln, op, value)
            row += n
            if progress is not None:
                progress(n)

        for piece in rows():
            buf.append(piece)
            buffered += piece[0].shape[0]
            while buffered >= chunk_rows:
                # Cut exactly chunk_rows rows off the front (pieces may straddle the cut).
                take, got = [], 0
                while got < chunk_rows:
                    pc = buf[0]
                    k = pc[0].shape[0]
                    if got + k <= chunk_rows:
                        take.append(buf.pop(0))
                        got += k
                    else:
                        cut = chunk_rows - got
                        take.append(_cut(pc, 0, cut))
                        buf[0] = _cut(pc, cut, k)
                        got = chunk_rows
                buffered -= chunk_rows
                emit(take)
        if buffered:
            emit(buf)
        return tw.close()


def _cut(piece: tuple, a: int, b: int) -> tuple:
    gpa, ln, op, vc, acc = piece
    sl = lambda x: x[a:b] if np.ndim(x) else x  # noqa: E731
    return gpa[a:b], sl(ln), sl(op), sl(vc) if vc is not None else None, acc


def _t_big(row: int, n: int, rate: int) -> np.ndarray:
    # i * 10**9 would overflow uint64: compute exactly in Python integers (rare: > 1.8e10 rows).
    return np.array([(i * 10**9) // rate for i in range(row, row + n)], dtype=np.uint64)

