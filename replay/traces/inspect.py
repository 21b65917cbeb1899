"""What is in a trace: metadata, op counts, write rate and the writable working set over time.

``inspect_trace(path, interval_ns=None) -> dict`` streams the trace batch by batch (validating it, as
every reader does) and aggregates each batch with polars; the per-batch results are then combined, so a
trace of any size is inspected in memory proportional to one batch plus two bitmaps of the guest's
pages. The working-set curve follows Clark et al. (NSDI'05, section 4, the "writable working set"):
for each interval of guest time, the number of distinct pages written during it. Because t_ns is
non-decreasing, intervals are met in order and only the current one needs a page bitmap.

Everything returned is an integer or a string (rates are writes per guest second, integer-divided).
"""

from __future__ import annotations

import os

import numpy as np
import polars as pl

from ..core.errors import TraceError, UsageError
from ..model.snp import Op
from .format import PAGE_SIZE, TraceReader, last_t_ns, open_trace
from ..core.validate import U64_MAX, check_memory, inspect_memory_bytes

DEFAULT_INTERVALS = 20
MAX_INTERVALS = 100_000


def nice_interval(span_ns: int, parts: int = DEFAULT_INTERVALS) -> int:
    """The smallest 1-2-5 x 10^k ns that cuts ``span_ns`` into at most ``parts`` intervals (>= 1 ns)."""
    target = max(1, -(-span_ns // parts))
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale >= target:
                return m * scale
        scale *= 10


def _time_span(r: TraceReader) -> tuple[int, int] | None:
    first = last = None
    for i in range(r.num_batches):
        b = r.batch(i)
        if b.num_rows:
            first = b.column(0)[0].as_py()
            if first is None:  # the full read names it too; this peek must not turn it into a TypeError
                raise TraceError(f"{r.path}: batch {i}, row 0: null in column t_ns")
            first = int(first)
            break
    last = last_t_ns(r)
    if first is not None and last < first:
        raise TraceError(f"{r.path}: t_ns of the last row {last} < first row's {first} (t_ns must be non-decreasing)")
    return None if first is None else (first, last)


def inspect_trace(path: str | os.PathLike, interval_ns: int | None = None, allow_memory: bool = False) -> dict:
    """Summary of the trace at ``path`` (see the module docstring); raises TraceError if it is bad."""
    with open_trace(path) as r:
        meta = r.meta
        span = _time_span(r)
        t0, t1 = span if span else (0, 0)
        if interval_ns is None:
            interval = nice_interval(t1 - t0)
        else:
            if interval_ns < 1:
                raise UsageError(f"interval must be at least 1 ns, not {interval_ns}")
            if interval_ns > U64_MAX:
                raise UsageError(f"interval {interval_ns} ns is longer than any trace (at most 2^64-1 ns)")
            interval = interval_ns
        nbuckets = (t1 - t0) // interval + 1 if span else 0
        if nbuckets > MAX_INTERVALS:
            raise UsageError(f"interval {interval} ns cuts the trace into {nbuckets} intervals (at most {MAX_INTERVALS})")
        check_memory(inspect_memory_bytes(meta.guest_bytes, nbuckets),
                     f"inspecting {path} ({meta.guest_bytes} bytes of guest)", allow_memory)

        # Bucket with an interval no longer than the span: the same buckets (an interval past the span puts
        # every row in the first), and polars' integer division stays within 64 bits.
        step = min(interval, t1 - t0 + 1)
        ops = np.zeros(4, dtype=np.int64)
        writes = np.zeros(nbuckets, dtype=np.int64)
        working = np.zeros(nbuckets, dtype=np.int64)
        bytes_written = 0
        npages = meta.npages
        seen_total = np.zeros(npages, dtype=bool)
        seen_cur = np.zeros(npages, dtype=bool)
        cur_bucket = -1

        for _, batch in r:
            df = pl.from_arrow(batch)
            assert isinstance(df, pl.DataFrame)
            for op, n in df.group_by("op").len().iter_rows():
                ops[op] += n
            w = df.lazy().filter(pl.col("op") == int(Op.WRITE)).select(
                ((pl.col("t_ns") - t0) // step).cast(pl.Int64).alias("bucket"),
                (pl.col("gpa") // PAGE_SIZE).alias("first"),
                ((pl.col("gpa") + pl.col("len").cast(pl.UInt64) - 1) // PAGE_SIZE).alias("last"),
                pl.col("len").cast(pl.UInt64),
            ).collect()
            if w.height == 0:
                continue
            bytes_written += int(w["len"].sum())
            per = w.group_by("bucket").len()
            np.add.at(writes, per["bucket"].to_numpy(), per["len"].to_numpy())
            # Pages written, in row order (so in bucket order: t_ns is sorted); a span crossing page
            # boundaries touches each page, so such rows are expanded.
            if (w["first"] != w["last"]).any():
                w = w.select("bucket", pl.int_ranges("first", pl.col("last") + 1, dtype=pl.UInt64).alias("gfn")).explode("gfn")
            else:
                w = w.select("bucket", pl.col("first").alias("gfn"))
            buckets = w["bucket"].to_numpy()
            gfns = w["gfn"].to_numpy().astype(np.intp)
            seen_total[gfns] = True
            # Combine with the previous batches: one bitmap for the open interval, counted when it closes.
            cuts = np.flatnonzero(np.diff(buckets)) + 1
            starts = np.concatenate([[0], cuts])
            ends = np.concatenate([cuts, [len(buckets)]])
            for a, z in zip(starts, ends):
                b = int(buckets[a])
                if b != cur_bucket:
                    if cur_bucket >= 0:
                        working[cur_bucket] = np.count_nonzero(seen_cur)
                        seen_cur[:] = False
                    cur_bucket = b
                seen_cur[gfns[a:z]] = True
        if cur_bucket >= 0:
            working[cur_bucket] = np.count_nonzero(seen_cur)

    names = {int(o): o.name.lower() for o in Op}
    intervals = [
        {
            "start_ns": t0 + i * interval,
            "writes": int(writes[i]),
            "writes_per_s": int(writes[i]) * 10**9 // interval,
            "pages_written": int(working[i]),
        }
        for i in range(nbuckets)
    ]
    span_ns = t1 - t0
    total_writes = int(ops[Op.WRITE])
    # Activity: the share of vCPU time busy up to the last event, as the CPU-demand model reads the trace.
    from ..model.demand import build_demand

    demand = build_demand("trace", "", meta.vcpus, t1 if span else None, meta.vcpu_idle)
    whole = meta.vcpus * (t1 + 1) if span else 0
    busy_ppm = demand.integral_ns(0, t1 + 1) * 1_000_000 // whole if whole else 0
    return {
        "path": str(path),
        "meta": meta.to_json(),
        "events": int(ops.sum()),
        "ops": {names[i]: int(ops[i]) for i in range(4)},
        "t_first_ns": t0,
        "t_last_ns": t1,
        "span_ns": span_ns,
        "interval_ns": interval,
        "intervals": intervals,
        "writes_per_s": total_writes * 10**9 // span_ns if span_ns else 0,
        "pages_written": int(np.count_nonzero(seen_total)),
        "guest_pages": npages,
        "bytes_written": bytes_written,
        "max_working_set_pages": int(working.max()) if nbuckets else 0,
        "idle_intervals": sum(len(iv) // 2 for iv in meta.vcpu_idle) if meta.vcpu_idle is not None else None,
        "busy_ppm": busy_ppm,
    }
