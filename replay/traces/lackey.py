"""Record a real program into a trace with valgrind's lackey (``--tool=lackey --trace-mem=yes``).

How a recording is made (docs/recording.md is the user's version of this):

1. ``valgrind --tool=lackey --trace-mem=yes --trace-sched=yes --log-fd=N CMD...`` runs the program with
   its log on a pipe of ours, so the program's own stdout/stderr stay untouched. Lackey prints one line
   per guest instruction (``I  addr,size``) and per data access (`` S``tore, `` M``odify, `` L``oad).
2. Pass 1 parses that stream *as it is produced*, in chunks of a few MiB, vectorised with numpy
   (:class:`LackeyParser`), and spools the accesses as raw column files in a temporary directory, so a
   long program's trace never sits whole in memory. It also collects which virtual regions were touched.
3. The touched virtual address space is laid out into guest-physical memory (:class:`AddressMap`):
   maximal runs of touched 1 MiB chunks, sorted by address, packed contiguously from gpa 0. Offsets
   within a region are kept, so neighbouring virtual pages stay neighbours and page offsets are kept.
4. Pass 2 maps the spooled rows and writes the trace with :class:`replay.traces.format.TraceWriter` (zstd Arrow
   batches; the file appears atomically, so a failed recording leaves nothing behind).

Threads: lackey's access lines carry no thread id. Valgrind runs one thread at a time (its "big lock"),
and with the debugging option ``--trace-sched=yes`` it logs ``SCHED[tid]:  acquired lock`` each time a
thread takes the CPU; every access after that line belongs to thread ``tid``. With ``--vcpus-from
threads`` (the default) valgrind thread ``tid`` (1-based, slots are reused after a thread exits) becomes
vCPU ``tid - 1``; with ``single`` everything is vCPU 0. Time is one clock for all threads because valgrind
serialises them: ``t_ns = ns_per_instr * instructions executed before the accessing one``. A vCPU is busy
while its thread holds valgrind's lock and idle otherwise: those idle intervals go into the trace (format
version 2) for the guest's CPU-demand model. A single-threaded program keeps its one vCPU busy throughout
(a version 1 trace, as before). Valgrind serialises threads, so a recording never shows two vCPUs busy at
once: the demand it records is that of the program under valgrind, not of the program on real cores.

Determinism: the content seed ``value`` of a WRITE is its row index in the trace (0 for other ops), so
the same lackey output always gives the same trace. Valgrind places the client (stack, ld.so, mmaps)
itself, independently of the kernel's ASLR, so nothing needs ``setarch -R``; what does move addresses is
the size of argv and the environment (they sit on the initial stack) and, for loads only, a few lookups
that ld.so makes with the kernel's AT_RANDOM bytes. Recording the same program with the same arguments and
environment (``--clean-env`` fixes it) with ``--no-reads`` gives the same digest; with reads a handful of
load addresses may differ.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..core.errors import RecordError, UsageError
from ..model.snp import Op

PAGE_SIZE = 4096
GUEST_ALIGN = 2 << 20  # guest sizes are rounded up to 2 MiB, like a VM's memory size
MAX_ACCESS = 4096  # lackey never reports more than 512 bytes (MAX_DSIZE); anything bigger is garbage
INSTALL_HINT = "install it with `apt-get install valgrind` (Debian/Ubuntu) or your distribution's package"

# Byte -> digit value; 255 marks "not a digit".
_HEX = np.full(256, 255, dtype=np.uint8)
_DEC = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789"):
    _HEX[_c] = _i
    _DEC[_c] = _i
for _i, _c in enumerate(b"abcdef"):
    _HEX[_c] = 10 + _i
    _HEX[_c - 32] = 10 + _i  # upper case
_MAX_HEX = 16  # a 64-bit address
_MAX_DEC = 5  # sizes are <= MAX_ACCESS
_PAD = _MAX_HEX + 8  # bytes of padding so that fixed-offset gathers never run off the buffer

_SCHED = re.compile(rb"SCHED\[(\d+)\]:\s+acquired lock")
_BANNER_PID = re.compile(rb"==(\d+)==")

VCPUS_FROM = ("threads", "single")
# argv and the environment sit on the program's initial stack, so their total size shifts every stack
# address; a fixed environment makes recordings independent of the shell they were started from (bash's
# `_`, PWD, OLDPWD, ...). Valgrind itself gets --command-line-only=yes so ~/.valgrindrc, ./.valgrindrc and
# VALGRIND_OPTS cannot change how it runs.
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"}


@dataclass(frozen=True)
class RecordOptions:
    """What to run and how to turn its accesses into a trace."""

    argv: tuple[str, ...]
    ns_per_instr: int = 1
    reads: bool = True
    vcpus_from: str = "threads"
    guest_bytes: int | None = None  # None: the smallest 2 MiB multiple covering what was touched
    region_shift: int = 20  # virtual memory is laid out in 1 MiB chunks
    chunk_bytes: int = 4 << 20  # how much of the lackey stream is parsed at once
    valgrind: str = "valgrind"
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal
    tmp_dir: str | None = None  # where pass 1 spools its columns (default: beside the output)
    clean_env: bool = False  # run the program with CLEAN_ENV instead of our environment (reproducibility)

    def __post_init__(self) -> None:
        if not self.argv:
            raise UsageError("record: no command given (usage: replay record --out FILE -- CMD [ARGS...])")
        if self.ns_per_instr < 1:
            raise UsageError(f"record: --rate-ns-per-instr must be >= 1, not {self.ns_per_instr}")
        if self.vcpus_from not in VCPUS_FROM:
            raise UsageError(f"record: --vcpus-from must be one of {', '.join(VCPUS_FROM)}")
        if not 12 <= self.region_shift <= 30:
            raise UsageError("record: region size must be between 4 KiB and 1 GiB")


# --------------------------------------------------------------------------------------------------
# Pass 1a: the lackey stream parser
# --------------------------------------------------------------------------------------------------


@dataclass
class ParsedChunk:
    """The accesses of one chunk of lackey output, in stream order."""

    vaddr: np.ndarray  # uint64
    size: np.ndarray  # uint32
    op: np.ndarray  # uint8 (Op.WRITE for S and M, Op.READ for L)
    instr: np.ndarray  # uint64: instructions executed before the accessing one
    tid: np.ndarray  # uint16: valgrind thread id (1-based)

    def __len__(self) -> int:
        return len(self.vaddr)


@dataclass
class ParseStats:
    """Counts of what the parser saw; odd lines are skipped and counted, never fatal."""

    lines: int = 0
    instructions: int = 0
    stores: int = 0
    modifies: int = 0
    loads: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    thread_switches: int = 0
    max_tid: int = 1
    pids: set[int] = field(default_factory=set)

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + int(n)

    def to_json(self) -> dict:
        return {
            "lines": self.lines, "instructions": self.instructions, "stores": self.stores,
            "modifies": self.modifies, "loads": self.loads, "skipped": dict(sorted(self.skipped.items())),
            "thread_switches": self.thread_switches, "threads": self.max_tid, "processes": max(1, len(self.pids)),
        }


class LackeyParser:
    """Incremental, vectorised parser of ``--trace-mem=yes`` output.

    ``feed(data)`` takes any slice of the stream (lines may be cut anywhere) and returns the accesses of
    the complete lines; ``finish()`` handles a final line without newline (valgrind killed mid-write): it
    is parsed if it is well-formed, otherwise counted as ``truncated``. Lines that are not instruction or
    access lines (the ``==pid==`` banner and summary, ``--pid--`` debug lines, blanks, anything else) are
    counted in ``stats.skipped`` by kind; ``SCHED[tid]:  acquired lock`` debug lines switch the thread.
    """

    def __init__(self, *, reads: bool = True) -> None:
        self.reads = reads
        self.stats = ParseStats()
        self._rest = b""
        self._tid = 1
        self._switch_lines: list[int] = []
        self._switch_tids: list[int] = []
        # Every thread switch as (instructions executed before it, thread that takes the CPU): valgrind runs
        # one thread at a time, so these are the threads' run intervals on the instruction clock.
        self.switches: list[tuple[int, int]] = []

    def feed(self, data: bytes) -> ParsedChunk:
        buf = self._rest + data if self._rest else data
        cut = buf.rfind(b"\n") + 1
        self._rest = buf[cut:]
        return self._parse(buf[:cut]) if cut else _empty_chunk()

    def finish(self) -> ParsedChunk:
        rest, self._rest = self._rest, b""
        if not rest:
            return _empty_chunk()
        before = dict(self.stats.skipped)
        chunk = self._parse(rest + b"\n")
        for kind, n in self.stats.skipped.items():
            if n != before.get(kind, 0):  # the cut line was not a valid line: it counts as truncated
                self.stats.skipped[kind] -= 1
                self.stats.skip("truncated")
                break
        self.stats.skipped = {k: v for k, v in self.stats.skipped.items() if v}
        return chunk

    def _parse(self, buf: bytes) -> ParsedChunk:
        """Parse complete lines (``buf`` ends with a newline)."""
        a = np.frombuffer(buf, dtype=np.uint8)
        ends = np.flatnonzero(a == 10)
        n = len(ends)
        self.stats.lines += n
        starts = np.empty(n, dtype=np.int64)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        lens = ends - starts
        ap = np.concatenate([a, np.zeros(_PAD, dtype=np.uint8)])  # fixed-offset gathers stay in bounds
        c0, c1, c2 = ap[starts], ap[starts + 1], ap[starts + 2]
        # Guard with lens so that a short line's neighbour bytes (the newline) never pass for content.
        is_instr = (c0 == ord("I")) & (c1 == ord(" ")) & (c2 == ord(" ")) & (lens >= 6)
        is_access = (c0 == ord(" ")) & ((c1 == ord("S")) | (c1 == ord("M")) | (c1 == ord("L"))) & (c2 == ord(" "))
        is_access &= lens >= 6
        cand = np.flatnonzero(is_instr | is_access)

        # The comma: the last one before each candidate's newline (a data line has exactly one).
        commas = np.flatnonzero(a == ord(","))
        ci = np.searchsorted(commas, ends[cand]) - 1
        comma = np.where(ci >= 0, commas[np.maximum(ci, 0)] if len(commas) else 0, -1)
        hexlen = comma - (starts[cand] + 3)
        declen = ends[cand] - comma - 1
        ok = (ci >= 0) & (hexlen >= 1) & (hexlen <= _MAX_HEX) & (declen >= 1) & (declen <= _MAX_DEC)

        addr = _decode(ap, comma, hexlen, ok, _HEX, 16, np.uint64)
        size = _decode(ap, ends[cand], declen, ok, _DEC, 10, np.int64)

        line_instr = np.zeros(n, dtype=bool)
        line_instr[cand[ok & is_instr[cand]]] = True
        # Accesses: a size of 0, above MAX_ACCESS, or running past 2^64 is not something lackey prints.
        acc_ok = ok & is_access[cand]
        bad_size = acc_ok & ((size < 1) | (size > MAX_ACCESS))
        wrap = acc_ok & ~bad_size & (addr > np.uint64(2**64 - 1) - (size.astype(np.uint64) - np.uint64(1)))
        acc_ok &= ~bad_size & ~wrap
        self.stats.skip("bad_size", int(bad_size.sum()))
        self.stats.skip("address_overflow", int(wrap.sum()))

        valid = np.zeros(n, dtype=bool)
        valid[cand[ok]] = True
        valid[cand[bad_size | wrap]] = True  # already counted above
        self._classify_odd(buf, np.flatnonzero(~valid), starts, ends, c0, c1, lens)

        # Instruction clock: cumulative count of I lines up to each line, carried across chunks.
        cum = np.cumsum(line_instr, dtype=np.int64) + self.stats.instructions
        self.switches += [(int(cum[i]), t) for i, t in zip(self._switch_lines, self._switch_tids)]
        acc_idx = cand[acc_ok]
        instr = np.maximum(cum[acc_idx] - 1, 0).astype(np.uint64)
        self.stats.instructions = int(cum[-1]) if n else self.stats.instructions

        # Thread in effect at each access: the last SCHED switch before it, else the carried one.
        sw_lines, sw_tids = self._switch_lines, self._switch_tids
        if sw_lines:
            sl = np.asarray(sw_lines, dtype=np.int64)
            st = np.asarray(sw_tids, dtype=np.uint16)
            k = np.searchsorted(sl, acc_idx, side="right") - 1
            tid = np.where(k >= 0, st[np.maximum(k, 0)], np.uint16(self._tid)).astype(np.uint16)
            self._tid = int(st[-1])
        else:
            tid = np.full(len(acc_idx), self._tid, dtype=np.uint16)

        kind = c1[acc_idx]
        self.stats.stores += int((kind == ord("S")).sum())
        self.stats.modifies += int((kind == ord("M")).sum())
        loads = kind == ord("L")
        self.stats.loads += int(loads.sum())
        op = np.where(loads, np.uint8(Op.READ), np.uint8(Op.WRITE)).astype(np.uint8)
        asize = size[acc_ok].astype(np.uint32)
        aaddr = addr[acc_ok]
        if not self.reads:
            keep = ~loads
            aaddr, asize, op, instr, tid = aaddr[keep], asize[keep], op[keep], instr[keep], tid[keep]
        return ParsedChunk(aaddr, asize, op, instr, tid)

    def _classify_odd(self, buf, odd, starts, ends, c0, c1, lens) -> None:
        """Count the non-data lines by kind; pick thread switches and process ids out of them."""
        self._switch_lines, self._switch_tids = [], []
        if not len(odd):
            return
        blank = lens[odd] == 0
        banner = ~blank & (c0[odd] == ord("=")) & (c1[odd] == ord("="))
        debug = ~blank & (c0[odd] == ord("-")) & (c1[odd] == ord("-"))
        data_like = ~blank & ~banner & ~debug & np.isin(c0[odd], np.frombuffer(b"I ", dtype=np.uint8))
        unknown = ~blank & ~banner & ~debug & ~data_like
        self.stats.skip("blank", int(blank.sum()))
        self.stats.skip("banner", int(banner.sum()))
        self.stats.skip("debug", int(debug.sum()))
        self.stats.skip("unknown", int(unknown.sum()))
        # Lines that look like data ("I..." or " ...") but did not parse: bad prefix, bad digits, an
        # address longer than 64 bits, no comma.
        self.stats.skip("malformed", int(data_like.sum()))
        for i in odd[debug]:
            m = _SCHED.search(buf, int(starts[i]), int(ends[i]))
            if m:
                tid = int(m.group(1))
                if 1 <= tid <= 0xFFFF:
                    self._switch_lines.append(int(i))
                    self._switch_tids.append(tid)
                    self.stats.thread_switches += 1
                    self.stats.max_tid = max(self.stats.max_tid, tid)
        for i in odd[banner]:
            m = _BANNER_PID.match(buf, int(starts[i]), int(ends[i]))
            if m:
                self.stats.pids.add(int(m.group(1)))


def idle_intervals(switches: list[tuple[int, int]], end: int, vcpus: int, ns_per_instr: int) -> list[list[int]] | None:
    """Per-vCPU idle intervals (trace ns) from valgrind's thread switches: thread ``tid`` (vCPU tid - 1) runs
    from a switch to it until the next switch (thread 1 from the start), on the instruction clock that
    ends at ``end`` instructions; every other stretch is idle for it. None when nothing is ever idle."""
    busy: list[list[int]] = [[] for _ in range(vcpus)]
    cur, since = 1, 0
    for at, tid in switches + [(end, 0)]:
        if tid == cur and at < end:
            continue
        if at > since and 1 <= cur <= vcpus:
            b = busy[cur - 1]
            if b and b[-1] == since:
                b[-1] = at
            else:
                b += [since, at]
        cur, since = tid, at
    idle: list[list[int]] = []
    for b in busy:
        iv, t = [], 0
        for i in range(0, len(b), 2):
            if b[i] > t:
                iv += [t * ns_per_instr, b[i] * ns_per_instr]
            t = b[i + 1]
        if end > t:
            iv += [t * ns_per_instr, end * ns_per_instr]
        idle.append(iv)
    return idle if any(idle) else None


def _decode(ap, stop, length, ok, table, radix, dtype) -> np.ndarray:
    """Numbers whose digits are ``ap[stop - length : stop]``; clears ``ok`` where a byte is no digit.

    Lines are grouped by digit count (lackey pads addresses to 8 digits, so there are only a few
    groups); each group is one 2-D gather and a Horner loop over its columns, all in numpy.
    """
    out = np.zeros(len(stop), dtype=dtype)
    for width in np.flatnonzero(np.bincount(length[ok])).tolist():
        sel = np.flatnonzero(ok & (length == width))
        digits = table[ap[(stop[sel] - width)[:, None] + np.arange(width)]]
        good = (digits != 255).all(axis=1)
        ok[sel[~good]] = False
        digits = digits.astype(dtype)
        value = np.zeros(len(sel), dtype=dtype)
        for j in range(width):
            value = value * dtype(radix) + digits[:, j]
        out[sel] = value
    return out


def _empty_chunk() -> ParsedChunk:
    return ParsedChunk(np.zeros(0, np.uint64), np.zeros(0, np.uint32), np.zeros(0, np.uint8),
                       np.zeros(0, np.uint64), np.zeros(0, np.uint16))


# --------------------------------------------------------------------------------------------------
# Pass 1b: spooling, and the virtual -> guest-physical layout
# --------------------------------------------------------------------------------------------------

_SPOOL_COLUMNS = (("vaddr", np.uint64), ("size", np.uint32), ("op", np.uint8), ("instr", np.uint64), ("tid", np.uint16))


class Spool:
    """Raw column files of pass 1 in a temporary directory (23 bytes a row), read back by memory map.

    The lackey stream can be consumed only once, and the address layout is known only at its end, so the
    accesses wait here between the two passes instead of in memory.
    """

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.rows = 0
        self._files = {name: open(self.dir / f"{name}.bin", "wb") for name, _ in _SPOOL_COLUMNS}

    def append(self, chunk: ParsedChunk) -> None:
        for name, dtype in _SPOOL_COLUMNS:
            np.ascontiguousarray(getattr(chunk, name), dtype=dtype).tofile(self._files[name])
        self.rows += len(chunk)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def batches(self, rows: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(first row, columns) in batches of ``rows``."""
        if not self.rows:
            return
        maps = {name: np.memmap(self.dir / f"{name}.bin", dtype=dtype, mode="r", shape=(self.rows,))
                for name, dtype in _SPOOL_COLUMNS}
        for start in range(0, self.rows, rows):
            yield start, {name: np.asarray(m[start:start + rows]) for name, m in maps.items()}


class TouchedChunks:
    """The set of touched virtual chunks (``vaddr >> shift``), kept as a sorted unique array."""

    def __init__(self, shift: int) -> None:
        self.shift = np.uint64(shift)
        self._parts: list[np.ndarray] = []
        self._chunks = np.zeros(0, dtype=np.uint64)
        self._pending = 0

    def add(self, vaddr: np.ndarray, size: np.ndarray) -> None:
        if not len(vaddr):
            return
        first = vaddr >> self.shift
        last = (vaddr + (size.astype(np.uint64) - np.uint64(1))) >> self.shift
        # An access spans at most two chunks (sizes <= MAX_ACCESS <= chunk size).
        self._parts.append(np.unique(np.concatenate([first, last])))
        self._pending += 1
        if self._pending >= 64:
            self._merge()

    def _merge(self) -> None:
        if self._parts:
            self._chunks = np.unique(np.concatenate([self._chunks, *self._parts]))
            self._parts, self._pending = [], 0

    def result(self) -> np.ndarray:
        self._merge()
        return self._chunks


@dataclass(frozen=True)
class AddressMap:
    """Layout-keeping map from virtual to guest-physical addresses.

    The touched chunks are grouped into regions (maximal runs of consecutive chunks); regions are sorted
    by virtual address and packed contiguously from gpa 0: region i starts at the sum of the sizes of the
    regions before it. Inside a region the offset is kept, so page offsets, page neighbours and the order
    of regions are all preserved, and the gaps between regions (unmapped virtual space) are squeezed out.
    """

    shift: int
    vstart: np.ndarray  # uint64: virtual start of each region (chunk-aligned), ascending
    gstart: np.ndarray  # uint64: guest-physical start of each region
    nbytes: np.ndarray  # uint64: bytes of each region (a multiple of the chunk size)

    @classmethod
    def from_chunks(cls, chunks: np.ndarray, shift: int) -> AddressMap:
        chunks = np.asarray(chunks, dtype=np.uint64)
        if not len(chunks):
            z = np.zeros(0, dtype=np.uint64)
            return cls(shift, z, z, z)
        breaks = np.flatnonzero(np.diff(chunks) != 1) + 1
        first = chunks[np.concatenate([[0], breaks])]
        count = np.diff(np.concatenate([[0], breaks, [len(chunks)]])).astype(np.uint64)
        nbytes = count << np.uint64(shift)
        gstart = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).astype(np.uint64)
        return cls(shift, first << np.uint64(shift), gstart, nbytes)

    @property
    def mapped_bytes(self) -> int:
        return int(self.nbytes.sum()) if len(self.nbytes) else 0

    def gpa(self, vaddr: np.ndarray) -> np.ndarray:
        vaddr = np.asarray(vaddr, dtype=np.uint64)
        r = np.searchsorted(self.vstart, vaddr, side="right") - 1
        if len(vaddr) and (r.min() < 0 or (vaddr - self.vstart[r] >= self.nbytes[r]).any()):
            raise RecordError("internal: an access outside every touched region (address map bug)")
        return vaddr - self.vstart[r] + self.gstart[r]

    def summary(self, limit: int = 64) -> dict:
        """For the trace's ``source`` metadata: the regions (first ``limit``), as hex strings and ints."""
        regions = [{"vaddr": f"{int(v):#x}", "gpa": int(g), "bytes": int(n)}
                   for v, g, n in zip(self.vstart[:limit], self.gstart[:limit], self.nbytes[:limit])]
        return {"scheme": "layout-keeping", "chunk_bytes": 1 << self.shift, "regions": len(self.vstart),
                "mapped_bytes": self.mapped_bytes, "first_regions": regions}


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def content_seeds(first_row: int, op: np.ndarray) -> np.ndarray:
    """The ``value`` column: a WRITE's seed is its row index in the trace, other ops get 0.

    A pure function of the position, so the same input stream always gives the same trace; row indices
    are distinct, so no two writes of a trace write the same content. (Shared with replay.traces.importers.)
    """
    rows = np.arange(first_row, first_row + len(op), dtype=np.uint64)
    return np.where(np.asarray(op) == Op.WRITE, rows, np.uint64(0)).astype(np.uint64)


# --------------------------------------------------------------------------------------------------
# Running valgrind
# --------------------------------------------------------------------------------------------------


def valgrind_version(valgrind: str = "valgrind") -> str:
    """``valgrind --version`` (e.g. ``valgrind-3.19.0``); RecordError with the install hint if missing."""
    exe = shutil.which(valgrind)
    if exe is None:
        raise RecordError(f"record: {valgrind} not found on PATH; {INSTALL_HINT}")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise RecordError(f"record: cannot run {exe}: {exc.strerror or exc}; {INSTALL_HINT}") from None
    version = out.stdout.strip()
    if out.returncode != 0 or not version.startswith("valgrind"):
        raise RecordError(f"record: {exe} --version failed (exit status {out.returncode}); {INSTALL_HINT}")
    return version


def lackey_argv(valgrind: str, log_fd: int, argv: Sequence[str], *, sched: bool) -> list[str]:
    cmd = [valgrind, "--command-line-only=yes", "--tool=lackey", "--trace-mem=yes", f"--log-fd={log_fd}"]
    if sched:
        cmd.append("--trace-sched=yes")  # thread switches (SCHED[tid]: acquired lock) for --vcpus-from threads
    return cmd + ["--", *argv]


def _describe_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by signal {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"failed with exit status {code}"


def stream_lackey(opts: RecordOptions, consume: Callable[[bytes], None]) -> int:
    """Run the program under lackey, handing each chunk of its log to ``consume`` as it arrives.

    Returns valgrind's exit status (the program's, as valgrind passes it on). The log travels on a pipe
    that only valgrind holds (``--log-fd``), so the program's stdin/stdout/stderr are the caller's.
    """
    exe = shutil.which(opts.valgrind)
    if exe is None:
        raise RecordError(f"record: {opts.valgrind} not found on PATH; {INSTALL_HINT}")
    r, w = os.pipe()
    with contextlib.suppress(OSError, AttributeError):
        import fcntl  # a bigger pipe lets valgrind run ahead while a chunk is being parsed

        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    try:
        proc = subprocess.Popen(lackey_argv(exe, w, opts.argv, sched=opts.vcpus_from == "threads"), pass_fds=(w,),
                                env=dict(CLEAN_ENV) if opts.clean_env else None)
    except OSError as exc:
        os.close(r)
        os.close(w)
        raise RecordError(f"record: cannot start {exe}: {exc.strerror or exc}") from None
    os.close(w)
    # A reader thread drains the pipe while this thread parses (numpy releases the GIL), so valgrind
    # rarely waits for us. Valgrind writes its log a line at a time (one write(2) per VG_(printf)), so
    # after a short read the reader naps for a few ms to let the pipe fill: that turns ~1 syscall and
    # wake-up per line into one per ~100 KiB. The nap only changes timing, never the data.
    chunks: queue.Queue = queue.Queue(maxsize=8)
    stop = threading.Event()

    def reader() -> None:
        try:
            with os.fdopen(r, "rb", buffering=0) as pipe:
                buf = bytearray(opts.chunk_bytes)
                view = memoryview(buf)
                filled = 0
                while not stop.is_set():
                    n = pipe.readinto(view[filled:])
                    if not n:
                        break
                    filled += n
                    if filled >= len(buf) - (256 << 10):
                        chunks.put(bytes(view[:filled]))
                        filled = 0
                    elif n < (64 << 10):
                        time.sleep(0.004)
                if filled:
                    chunks.put(bytes(view[:filled]))
        except BaseException as exc:  # handed to the parsing thread, which raises it
            chunks.put(exc)
        finally:
            chunks.put(None)

    thread = threading.Thread(target=reader, name="lackey-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = chunks.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            consume(item)
        thread.join()
        return proc.wait()
    except BaseException:
        stop.set()
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10  # cleanup only: a forked child may still hold the pipe
        while thread.is_alive() and time.monotonic() < deadline:  # unblock a reader stuck on a full queue
            with contextlib.suppress(queue.Empty):
                chunks.get(timeout=0.1)
        raise


# --------------------------------------------------------------------------------------------------
# The recorder
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordResult:
    meta: object  # replay.traces.format.TraceMeta
    stats: dict
    mapping: dict


def _progress(enabled: bool | None, **kw):
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False, **kw)


def record(out: str | os.PathLike, opts: RecordOptions, *, stream: Callable | None = None) -> RecordResult:
    """Record ``opts.argv`` under lackey into the trace ``out``; nothing is left at ``out`` on failure.

    ``stream(opts, consume) -> exit status`` produces the lackey log (default: :func:`stream_lackey`);
    tests pass captured output through it.
    """
    from .format import TraceWriter

    out = Path(out)
    if not out.parent.is_dir():
        raise RecordError(f"record: {out}: directory {out.parent} does not exist")
    version = valgrind_version(opts.valgrind) if stream is None else "captured"
    stream = stream or stream_lackey
    parser = LackeyParser(reads=opts.reads)
    touched = TouchedChunks(opts.region_shift)
    tmp_parent = opts.tmp_dir or str(out.parent)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.spool.", dir=tmp_parent) as tmp:
        spool = Spool(tmp)
        bar = _progress(opts.progress, desc="lackey", unit=" lines", unit_scale=True)

        def consume(data: bytes) -> None:
            chunk = parser.feed(data)
            touched.add(chunk.vaddr, chunk.size)
            spool.append(chunk)
            bar.update(data.count(b"\n"))

        try:
            status = stream(opts, consume)
            tail = parser.finish()
            touched.add(tail.vaddr, tail.size)
            spool.append(tail)
        finally:
            bar.close()
            spool.close()
        if status != 0:
            raise RecordError(f"record: {' '.join(opts.argv)} {_describe_status(status)} under valgrind; no trace written")
        if spool.rows == 0:
            raise RecordError(f"record: no memory accesses in the lackey output of {' '.join(opts.argv)} "
                              "(is the program statically linked to nothing, or not run at all?)")

        amap = AddressMap.from_chunks(touched.result(), opts.region_shift)
        needed = round_up(amap.mapped_bytes, GUEST_ALIGN)
        guest_bytes = opts.guest_bytes if opts.guest_bytes is not None else needed
        if guest_bytes < amap.mapped_bytes:
            raise RecordError(f"record: --guest-size {guest_bytes} is too small: the program touched "
                              f"{amap.mapped_bytes} bytes of address space (needs at least {needed})")
        stats = parser.stats.to_json()
        vcpus = parser.stats.max_tid if opts.vcpus_from == "threads" else 1
        source = {
            "recorder": "lackey",
            "argv": list(opts.argv),
            "valgrind": version,
            "ns_per_instr": opts.ns_per_instr,
            "reads": opts.reads,
            "vcpus_from": opts.vcpus_from,
            "env": "clean" if opts.clean_env else "inherited",
            "instructions": parser.stats.instructions,
            "lackey": stats,
            "mapping": amap.summary(),
            "value": "row index (WRITE), 0 otherwise",
        }
        ns = np.uint64(opts.ns_per_instr)
        # Busy time from the instruction counts: a vCPU runs while its thread holds valgrind's lock.
        idle = (idle_intervals(parser.switches, parser.stats.instructions, vcpus, opts.ns_per_instr)
                if opts.vcpus_from == "threads" else None)
        bar = _progress(opts.progress, desc="write", unit=" rows", unit_scale=True, total=spool.rows)
        try:
            with TraceWriter(out, guest_bytes=guest_bytes, vcpus=vcpus, source=source, vcpu_idle=idle) as writer:
                for start, cols in spool.batches(1 << 20):
                    vcpu = (cols["tid"] - 1 if opts.vcpus_from == "threads" else np.zeros(len(cols["tid"]))).astype(np.uint16)
                    writer.write(cols["instr"] * ns, vcpu, amap.gpa(cols["vaddr"]), cols["size"], cols["op"],
                                 content_seeds(start, cols["op"]))
                    bar.update(len(cols["op"]))
                meta = writer.close()
        finally:
            bar.close()
    return RecordResult(meta, stats, source["mapping"])
