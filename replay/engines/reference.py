"""The reference page engine: the executable statement of the engine semantics, in plain Python.

This engine exists to be read and to be compared against, not to be fast. It implements the Engine API of
docs/internals.md ("Engine API") with the same semantics as the Cython engine (``replay.engines._engine``), which
is the one the driver uses. Every rule is written once, as straight-line Python over numpy arrays, in the
order docs/internals.md states it; ``tests/test_engine_agree.py`` applies random operation sequences to
both engines and requires every observable (return values, RMP entries, pages, counters, transfer clock,
``last_stop``, digests) to be equal. When the two disagree, this file and docs/internals.md decide.

State per host ``h``: a memory image (``version`` uint32 and ``flags`` uint8 per gfn, flags PRIVATE=1,
DIRTY=2, PRESENT=4, SEND=8, MAPPED=16) and an RMP table indexed by SPA, ``spa(h, gfn) = spa_base[h] + gfn``.
"""

from __future__ import annotations

import hashlib

import numpy as np

from replay.engines.common import (
    DIRTY,
    MAPPED,
    PRESENT,
    PRIVATE,
    SEND,
    U64_MAX,
    VMSA_SPARE,
    PageView,
    RmpEntry,
    as_delays,
    check_engine_args,
    check_u32,
    check_vmpl,
    as_ready,
    as_gfns,
    check_batch,
    check_transfer_add,
    check_transfer_limits,
    check_transfer_params,
)
from replay.model.demand import agent_share
from replay.core.errors import TraceError
from replay.model.snp import FAULT_KINDS, PAGE_SHIFT, PAGES_PER_2M, VMPLS, Access, Fault, Op, Perm, Rc

# RMP entry flag bits (internal; mirrored in cext/_engine.pxd)
R_ASSIGNED = 1
R_SIZE_2M = 2
R_IMMUTABLE = 4
R_VALIDATED = 8
R_VMSA = 16

FIRST_FAULTS_MAX = 16
U32_MASK = 0xFFFFFFFF
_NO_STOP = (Fault.NONE, 0, 0, 0)


U64_MASK = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finalizer (the per-page term of the set hash; as in the Cython engine)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64_MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64_MASK
    return z ^ (z >> 31)


def _page_terms(gfn: int, version: int, flags: int) -> tuple[int, int]:
    key = _mix64((gfn + 0x9E3779B97F4A7C15) & U64_MASK) ^ ((version << 1) | (flags & PRIVATE))
    return _mix64(key), _mix64(key ^ 0xD1B54A32D192ED03)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _ready_matters(cols, row: int, dmin: int, g: int) -> bool:
    """Whether a row from ``row`` on could find a page not ready at guest time g (docs/internals.md, "Memory"):
    a row's effective time is at least t_ns[row] + the smallest vCPU delay (t_ns is non-decreasing and
    delays only grow), and a ready time at or below that acts as 0. Without rows (post-copy's push after
    the trace's last row) nothing waits."""
    if cols is None:
        return False
    t_ns = cols[0]
    if len(t_ns) == 0:
        return True
    lb = int(t_ns[min(row, len(t_ns) - 1)]) + dmin
    return lb <= U64_MAX and g > lb


class Engine:
    """Pure-Python page engine; see the module docstring and docs/internals.md."""

    def __init__(self, npages, vcpus, *, asid=1, os_vmpl=0, hosts=2, spa_base=None):
        npages, vcpus, asid, os_vmpl, hosts, spa_base = check_engine_args(npages, vcpus, asid, os_vmpl, hosts, spa_base)
        self.npages, self.vcpus, self.asid, self.os_vmpl, self.hosts = npages, vcpus, asid, os_vmpl, hosts
        self.spa_base = spa_base
        # memory images
        self._version = [np.zeros(npages, np.uint32) for _ in range(hosts)]
        self._flags = [np.zeros(npages, np.uint8) for _ in range(hosts)]
        self._logging = [False] * hosts
        self._send_count = [0] * hosts
        self._slog_on, self._slog = False, []
        self._recv_sum = [[0, 0] for _ in range(hosts)]
        # RMP tables: per entry gfn, asid, flags, perms[4] (perms[0] is always Perm.ALL)
        sizes = [b + npages + VMSA_SPARE for b in spa_base]
        self._r_gfn = [np.zeros(n, np.uint32) for n in sizes]
        self._r_asid = [np.zeros(n, np.uint32) for n in sizes]
        self._r_flags = [np.zeros(n, np.uint8) for n in sizes]
        self._r_perms = [np.zeros((n, VMPLS), np.uint8) for n in sizes]
        for p in self._r_perms:
            p[:, 0] = Perm.ALL
        self._last_stop = _NO_STOP
        self.reset_counters()
        self._xfer = None
        self._xfer_reset()

    # ------------------------------------------------------------------ helpers

    def _host(self, host):
        host = int(host)
        if not 0 <= host < self.hosts:
            raise ValueError(f"host {host} out of range (hosts={self.hosts})")
        return host

    def _spa(self, host, spa):
        spa = int(spa)
        if not 0 <= spa < len(self._r_flags[host]):
            raise ValueError(f"spa {spa} out of range for host {host} (RMP size {len(self._r_flags[host])})")
        return spa

    def _gfn(self, gfn):
        gfn = int(gfn)
        if not 0 <= gfn < self.npages:
            raise ValueError(f"gfn {gfn} out of range (npages={self.npages})")
        return gfn

    def _count_fault(self, kind, event_index, gfn):
        self._faults[kind] += 1
        if len(self._first_faults) < FIRST_FAULTS_MAX:
            self._first_faults.append([int(event_index), Fault(kind).key, int(gfn)])

    def _npf_kind(self, host, spa, asid, gfn):
        """The nested #PF an instruction on (asid, gfn) takes at ``spa``, or NONE (checks in check_access order)."""
        f = int(self._r_flags[host][spa])
        if f & R_ASSIGNED and int(self._r_gfn[host][spa]) != gfn:
            return Fault.NPF_GPA_MISMATCH
        if not f & R_ASSIGNED:
            return Fault.NPF_NOT_ASSIGNED
        if int(self._r_asid[host][spa]) != asid:
            return Fault.NPF_ASID
        return Fault.NONE

    def rmp_size(self, host):
        """Number of RMP entries of ``host`` (valid SPAs are ``range(rmp_size(host))``)."""
        return len(self._r_flags[self._host(host)])

    def spa(self, host, gfn):
        return self.spa_base[self._host(host)] + self._gfn(gfn)

    # ------------------------------------------------------------------ RMP instructions

    def rmpupdate(self, host, spa, *, assigned, asid=0, gfn=0, size_2m=False, immutable=False):
        host = self._host(host)
        spa = self._spa(host, spa)
        asid, gfn = check_u32("asid", asid), check_u32("gfn", gfn)
        return Rc(self._rmpupdate(host, spa, bool(assigned), asid, gfn, bool(size_2m), bool(immutable)))

    def _rmpupdate(self, host, spa, assigned, asid, gfn, size_2m, immutable):
        self._rmp[host]["rmpupdate"] += 1
        rf = self._r_flags[host]
        if rf[spa] & R_IMMUTABLE:
            return Rc.FAIL_PERMISSION
        n = 1
        if size_2m:
            n = PAGES_PER_2M
            if spa % PAGES_PER_2M or gfn % PAGES_PER_2M or spa + PAGES_PER_2M > len(rf):
                return Rc.FAIL_INPUT
            for i in range(1, PAGES_PER_2M):
                if rf[spa + i] & R_IMMUTABLE:
                    return Rc.FAIL_PERMISSION
            for i in range(1, PAGES_PER_2M):
                if rf[spa + i] & R_ASSIGNED and not rf[spa + i] & R_SIZE_2M:
                    return Rc.FAIL_OVERLAP
        if not assigned:
            asid, gfn = 0, 0
        for i in range(n):
            e = spa + i
            new_gfn = gfn + i if assigned else 0
            old = int(rf[e])
            changed = (
                bool(old & R_ASSIGNED) != assigned
                or int(self._r_asid[host][e]) != asid
                or int(self._r_gfn[host][e]) != new_gfn
                or bool(old & R_SIZE_2M) != size_2m
            )
            keep = old & (R_VALIDATED | R_VMSA)
            if changed:
                keep = 0
                self._r_perms[host][e] = (Perm.ALL, 0, 0, 0)
            rf[e] = (
                keep
                | (R_ASSIGNED if assigned else 0)
                | (R_SIZE_2M if size_2m else 0)
                | (R_IMMUTABLE if immutable else 0)
            )
            self._r_asid[host][e] = asid
            self._r_gfn[host][e] = new_gfn
        return Rc.SUCCESS

    def pvalidate(self, host, spa, *, asid, gfn, vmpl, validate, size_2m=False):
        host = self._host(host)
        spa = self._spa(host, spa)
        asid, gfn = check_u32("asid", asid), check_u32("gfn", gfn)
        vmpl = check_vmpl("vmpl", vmpl)
        return Rc(self._pvalidate(host, spa, asid, gfn, vmpl, bool(validate), bool(size_2m), -1))

    def _guest_entry(self, host, spa, asid, gfn, size_2m, event_index):
        """What PVALIDATE and RMPADJUST both check of the entry: a 2M request is aligned and inside the
        table, and the page is assigned to this ASID at this gfn (else a nested #PF, counted)."""
        if size_2m and (spa % PAGES_PER_2M or spa + PAGES_PER_2M > len(self._r_flags[host])):
            return Rc.FAIL_INPUT
        npf = self._npf_kind(host, spa, asid, gfn)
        if npf != Fault.NONE:
            self._count_fault(npf, event_index, gfn)
            return Rc.NESTED_PF
        return None

    def _pvalidate(self, host, spa, asid, gfn, vmpl, validate, size_2m, event_index):
        self._rmp[host]["pvalidate"] += 1
        rf = self._r_flags[host]
        if vmpl != 0:
            return Rc.FAIL_PERMISSION
        rc = self._guest_entry(host, spa, asid, gfn, size_2m, event_index)
        if rc is not None:
            return rc
        if size_2m and not rf[spa] & R_SIZE_2M:
            return Rc.FAIL_SIZEMISMATCH
        if bool(rf[spa] & R_VALIDATED) == validate:
            return Rc.FAIL_NOUPDATE
        for e in range(spa, spa + (PAGES_PER_2M if size_2m else 1)):
            if validate:
                rf[e] |= R_VALIDATED
            else:
                rf[e] &= ~R_VALIDATED & 0xFF
        return Rc.SUCCESS

    def rmpadjust(self, host, spa, *, asid, gfn, caller_vmpl, target_vmpl, perms, vmsa=False, size_2m=False):
        host = self._host(host)
        spa = self._spa(host, spa)
        asid, gfn = check_u32("asid", asid), check_u32("gfn", gfn)
        caller_vmpl = check_vmpl("caller_vmpl", caller_vmpl)
        target_vmpl, perms = int(target_vmpl), int(perms)
        if not 0 <= perms <= Perm.ALL:
            raise ValueError(f"perms must be in [0, 15], got {perms}")
        return Rc(
            self._rmpadjust(host, spa, asid, gfn, caller_vmpl, target_vmpl, perms, bool(vmsa), bool(size_2m), -1)
        )

    def _rmpadjust(self, host, spa, asid, gfn, caller_vmpl, target_vmpl, perms, vmsa, size_2m, event_index):
        self._rmp[host]["rmpadjust"] += 1
        rf = self._r_flags[host]
        if target_vmpl <= caller_vmpl or target_vmpl >= VMPLS:
            return Rc.FAIL_PERMISSION
        if vmsa and caller_vmpl != 0:
            return Rc.FAIL_PERMISSION
        if perms & ~int(self._r_perms[host][spa, caller_vmpl]):
            return Rc.FAIL_PERMISSION
        rc = self._guest_entry(host, spa, asid, gfn, size_2m, event_index)
        if rc is not None:
            return rc
        if not rf[spa] & R_VALIDATED:
            return Rc.FAIL_INPUT
        if bool(rf[spa] & R_SIZE_2M) != size_2m:
            return Rc.FAIL_SIZEMISMATCH
        for e in range(spa, spa + (PAGES_PER_2M if size_2m else 1)):
            self._r_perms[host][e, target_vmpl] = perms
            if caller_vmpl == 0:
                rf[e] = (int(rf[e]) & ~R_VMSA) | (R_VMSA if vmsa else 0)
        return Rc.SUCCESS

    def psmash(self, host, spa):
        host = self._host(host)
        spa = self._spa(host, spa)
        self._rmp[host]["psmash"] += 1
        rf = self._r_flags[host]
        if spa % PAGES_PER_2M or not rf[spa] & R_ASSIGNED or not rf[spa] & R_SIZE_2M:
            return Rc.FAIL_INPUT
        for e in range(spa, spa + PAGES_PER_2M):
            rf[e] = int(rf[e]) & ~R_SIZE_2M
        return Rc.SUCCESS

    def rmp_entry(self, host, spa):
        host = self._host(host)
        spa = self._spa(host, spa)
        f = int(self._r_flags[host][spa])
        return RmpEntry(
            assigned=bool(f & R_ASSIGNED),
            asid=int(self._r_asid[host][spa]),
            gfn=int(self._r_gfn[host][spa]),
            size_2m=bool(f & R_SIZE_2M),
            immutable=bool(f & R_IMMUTABLE),
            validated=bool(f & R_VALIDATED),
            vmsa=bool(f & R_VMSA),
            perms=tuple(int(p) for p in self._r_perms[host][spa]),
        )

    # ------------------------------------------------------------------ access checks

    def check_access(self, host, gfn, *, vmpl, access, private):
        host = self._host(host)
        gfn = self._gfn(gfn)
        vmpl = check_vmpl("vmpl", vmpl)
        access = int(access)
        if not 1 <= access <= Perm.ALL:
            raise ValueError(f"access must be in [1, 15], got {access}")
        return Fault(self._check(host, gfn, vmpl, access, bool(private)))

    def check_access_many(self, host, gfns, *, vmpl, access, private):
        """``check_access`` of each of ``gfns``, as a uint8 array of ``Fault`` values."""
        host = self._host(host)
        vmpl = check_vmpl("vmpl", vmpl)
        access = int(access)
        if not 1 <= access <= Perm.ALL:
            raise ValueError(f"access must be in [1, 15], got {access}")
        return np.array([self._check(host, g, vmpl, access, bool(private)) for g in self._gfn_array(gfns).tolist()],
                        dtype=np.uint8)

    def _check(self, host, gfn, vmpl, access, private):
        spa = self.spa_base[host] + gfn
        f = int(self._r_flags[host][spa])
        if not private:
            return Fault.NPF_SHARED_ASSIGNED if f & R_ASSIGNED else Fault.NONE
        if f & R_ASSIGNED and int(self._r_gfn[host][spa]) != gfn:
            return Fault.NPF_GPA_MISMATCH
        if not f & R_ASSIGNED:
            return Fault.NPF_NOT_ASSIGNED
        if int(self._r_asid[host][spa]) != self.asid:
            return Fault.NPF_ASID
        if f & R_IMMUTABLE:
            return Fault.NPF_IMMUTABLE
        if f & R_SIZE_2M:  # the guest's nested mapping is always 4K in this model
            return Fault.NPF_SIZE
        if not f & R_VALIDATED:
            return Fault.VC_NOT_VALIDATED
        if not int(self._r_perms[host][spa, vmpl]) & access:
            return Fault.NPF_VMPL
        return Fault.NONE

    def host_write(self, host, spa):
        host = self._host(host)
        spa = self._spa(host, spa)
        if self._r_flags[host][spa] & R_ASSIGNED:
            self._count_fault(Fault.HOST_RMP_PF, -1, int(self._r_gfn[host][spa]))
            return Fault.HOST_RMP_PF
        return Fault.NONE

    # ------------------------------------------------------------------ guest page state

    def launch(self, host, shared_ranges):
        host = self._host(host)
        shared = np.zeros(self.npages, bool)
        for r in shared_ranges:
            first, last = (int(x) for x in r)
            if not 0 <= first <= last < self.npages:
                raise ValueError(f"shared range [{first}, {last}] out of range (npages={self.npages})")
            shared[first : last + 1] = True
        base = self.spa_base[host]
        for gfn in range(self.npages):
            spa = base + gfn
            if shared[gfn]:
                if self._r_flags[host][spa] & R_ASSIGNED:
                    self._rmpupdate(host, spa, False, 0, 0, False, False)
                self._flags[host][gfn] = PRESENT
            else:
                self._rmpupdate(host, spa, True, self.asid, gfn, False, False)
                self._pvalidate(host, spa, self.asid, gfn, 0, True, False, -1)
                if self.os_vmpl > 0:
                    self._rmpadjust(host, spa, self.asid, gfn, 0, self.os_vmpl, Perm.ALL, False, False, -1)
                self._flags[host][gfn] = PRIVATE | PRESENT
            self._version[host][gfn] = 0
        self._send_count[host] = 0

    def page(self, host, gfn):
        host = self._host(host)
        gfn = self._gfn(gfn)
        f = int(self._flags[host][gfn])
        return PageView(int(self._version[host][gfn]), bool(f & PRIVATE), bool(f & DIRTY), bool(f & PRESENT))

    def _gfn_array(self, gfns):
        arr = np.asarray(gfns, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.npages):
            raise ValueError(f"gfn out of range (npages={self.npages})")
        return arr

    def flags(self, host, gfns):
        host = self._host(host)
        return self._flags[host][self._gfn_array(gfns)].copy()

    def versions(self, host, gfns):
        host = self._host(host)
        return self._version[host][self._gfn_array(gfns)].copy()

    def set_dirty_logging(self, host, enabled):
        self._logging[self._host(host)] = bool(enabled)

    def collect_dirty(self, host):
        host = self._host(host)
        out = []
        for gfn in range(self.npages):
            if self._flags[host][gfn] & DIRTY:
                out.append(gfn)
                self._flags[host][gfn] &= ~DIRTY & 0xFF
        return np.array(out, dtype=np.uint32)

    def count_present(self, host):
        host = self._host(host)
        return sum(1 for gfn in range(self.npages) if self._flags[host][gfn] & PRESENT)

    def missing_bytes(self, src, dst, page_bytes, header_bytes):
        """Bytes the pages ``dst`` lacks take on the wire as ``src`` holds them: a header each, plus a page
        unless it is a zero page (version 0)."""
        src, dst = self._host(src), self._host(dst)
        total = 0
        for gfn in range(self.npages):
            if not self._flags[dst][gfn] & PRESENT:
                total += int(header_bytes) + (int(page_bytes) if self._version[src][gfn] else 0)
        return total

    def first_touch(self, host, gfn):
        """Whether ``host``'s mirror agents had not mapped ``gfn`` yet (a first-touch NPF); maps it."""
        host, gfn = self._host(host), self._gfn(gfn)
        if self._flags[host][gfn] & MAPPED:
            return False
        self._flags[host][gfn] |= MAPPED
        return True

    def digest(self, host):
        """blake2b-256 over the little-endian uint32 versions of all gfns, then one byte (PRIVATE bit) each."""
        host = self._host(host)
        h = hashlib.blake2b(digest_size=32)
        h.update(self._version[host].astype("<u4").tobytes())
        h.update((self._flags[host] & PRIVATE).astype(np.uint8).tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ replay

    @property
    def last_stop(self):
        f, gfn, vcpu, row = self._last_stop
        return (Fault(f), gfn, vcpu, row)

    def replay(self, host, batch, start, base_index, stop_t_ns, delays=None, ready=None):
        host = self._host(host)
        check_batch(batch)
        delays = as_delays(delays, self.vcpus)
        ready = None if ready is None else as_ready(ready, self.npages)
        start, base_index, stop_t_ns = int(start), int(base_index), int(stop_t_ns)
        if not 0 <= start <= batch.num_rows:
            raise ValueError(f"start {start} out of range (batch has {batch.num_rows} rows)")
        if base_index < 0:
            raise ValueError(f"base_index must be >= 0, got {base_index}")
        if not 0 <= stop_t_ns <= U64_MAX:
            raise ValueError(f"stop_t_ns must be in [0, 2**64), got {stop_t_ns}")
        self._last_stop = _NO_STOP
        cols = [batch.column(i).to_numpy(zero_copy_only=True) for i in range(6)]
        return self._replay(host, cols, start, base_index, stop_t_ns, delays, ready)

    def _replay(self, host, cols, start, base_index, stop_t_ns, delays, ready=None):
        t_ns, vcpu, gpa, length, op, _value = cols
        n = len(t_ns)
        flags = self._flags[host]
        for row in range(start, n):
            v = int(vcpu[row])
            if v >= self.vcpus:
                raise TraceError(f"event {base_index + row} (batch row {row}): vcpu {v} >= vcpus {self.vcpus}")
            t = int(t_ns[row])
            if delays is not None:
                t = min(t + int(delays[v]), U64_MAX)
            if t >= stop_t_ns:
                return row
            ln, a, o = int(length[row]), int(gpa[row]), int(op[row])
            if ln == 0:
                raise TraceError(f"event {base_index + row} (batch row {row}): len is 0")
            first, last = a >> PAGE_SHIFT, (a + ln - 1) >> PAGE_SHIFT
            if last >= self.npages:
                raise TraceError(
                    f"event {base_index + row} (batch row {row}): gpa+len beyond the guest ({self.npages} pages)"
                )
            if o > Op.TO_PRIVATE:
                raise TraceError(f"event {base_index + row} (batch row {row}): unknown op {o}")
            # post-copy: the whole row waits until every page it spans is present (and, with ready,
            # has arrived by the row's effective time)
            for gfn in range(first, last + 1):
                if not flags[gfn] & PRESENT or (ready is not None and int(ready[gfn]) > t):
                    self._last_stop = (Fault.USERFAULT, gfn, v, row)
                    return row
            ev = base_index + row
            for gfn in range(first, last + 1):
                self._apply(host, gfn, o, ev)
        return n

    def _apply(self, host, gfn, op, ev):
        flags = self._flags[host]
        private = bool(flags[gfn] & PRIVATE)
        spa = self.spa_base[host] + gfn
        if op == Op.WRITE or op == Op.READ:
            access = Access.WRITE if op == Op.WRITE else Access.READ
            f = self._check(host, gfn, self.os_vmpl, access, private)
            if f != Fault.NONE:
                self._count_fault(f, ev, gfn)
            elif op == Op.WRITE:
                self._version[host][gfn] = (int(self._version[host][gfn]) + 1) & U32_MASK
                if self._logging[host]:
                    if not flags[gfn] & DIRTY:
                        self._wp_faults[host] += 1  # the first write since the last sync faults
                    flags[gfn] |= DIRTY
        elif op == Op.TO_SHARED:
            if private:
                self._pvalidate(host, spa, self.asid, gfn, 0, False, False, ev)
                self._rmpupdate(host, spa, False, 0, 0, False, False)
                flags[gfn] &= ~PRIVATE & 0xFF
                if self._logging[host]:
                    flags[gfn] |= DIRTY
                self._rmp[host]["psc"] += 1
        else:  # TO_PRIVATE
            if not private:
                self._rmpupdate(host, spa, True, self.asid, gfn, False, False)
                self._pvalidate(host, spa, self.asid, gfn, 0, True, False, ev)
                if self.os_vmpl > 0:
                    self._rmpadjust(host, spa, self.asid, gfn, 0, self.os_vmpl, Perm.ALL, False, False, ev)
                flags[gfn] |= PRIVATE
                if self._logging[host]:
                    flags[gfn] |= DIRTY
                self._rmp[host]["psc"] += 1

    # ------------------------------------------------------------------ transfer

    def _xfer_reset(self, params=None):
        self._xfer = dict(params or {})
        self._xs = dict(
            v_ns=0, g_ns=0, pages=0, zero_pages=0, private_pages=0, shared_pages=0,
            bytes=0, agent_cpu_ns=0, vmgexits=0, target_cpu_ns=0, src_host_cpu_ns=0, dst_host_cpu_ns=0,
            first_touches=0, link_dead=False,
        )  # fmt: skip
        self._v0 = self._g0 = 0
        self._priv_in_batch = 0
        self._wp0 = 0
        self._base = (0, 0, 0, 0, 0)  # totals when the current demand step began
        self._seg = 0

    def begin_transfer(self, v_ns, g_ns, **params):
        p = check_transfer_params(v_ns, g_ns, params, self.vcpus)
        # Python ints before _xfer_reset copies the parameters (it used to come after: numpy ints then
        # reached the clock and the run record's JSON, which refuses them)
        p["demand_at_ns"], p["demand_mcpu"] = [int(x) for x in p["demand_at_ns"]], [int(x) for x in p["demand_mcpu"]]
        self._xfer_reset(p)
        self._v0 = self._xs["v_ns"] = p["v_ns"]
        self._g0 = self._xs["g_ns"] = p["g_ns"]
        self._wp0 = sum(self._wp_faults)
        self._demand_step(p["g_ns"])

    def _demand_step(self, g):
        """Enter the demand step holding guest time ``g``: its demand and end, and the shared capacities
        (agents on the guest's quota Q beside D busy vCPUs: fair, each runnable thread min(1, Q/(D+A)) of a
        CPU; agents first, min(A, Q))."""
        p = self._xfer
        at, mc = p["demand_at_ns"], p["demand_mcpu"]
        while self._seg + 1 < len(at) and at[self._seg + 1] <= g:
            self._seg += 1
        self._dem = mc[self._seg]
        self._seg_end = at[self._seg + 1] if self._seg + 1 < len(at) else U64_MASK
        share = agent_share(p["agents"], self._dem, p["quota_mcpu"], p["fair"])
        for side in ("src", "dst"):
            if p[f"{side}_shared"]:
                p[f"{side}_cpus"] = share

    def transfer_state(self):
        return dict(self._xs)

    def transfer(self, src, dst, gfns, k, batch, start, base_index, run_host, delays=None, ready=None, *,
                 until_v=None, deadline_v=None, walk_end=None):
        src, dst, run_host = self._host(src), self._host(dst), self._host(run_host)
        if not self._xfer:
            raise RuntimeError("transfer() before begin_transfer()")
        k, start, base_index = int(k), int(start), int(base_index)
        until_v, deadline_v = check_transfer_limits(until_v, deadline_v)
        walk = gfns is None and walk_end is None  # the send bitmap, cyclically
        missing = gfns is None and walk_end is not None  # the pages dst lacks in [k, walk_end)
        if gfns is None:
            if src == dst:
                raise ValueError("transfer: src and dst must differ")
            if missing:
                walk_end = int(walk_end)
                if not 0 <= k <= walk_end <= self.npages:
                    raise ValueError(f"transfer: need 0 <= k <= walk_end <= npages, got k={k} walk_end={walk_end}")
            elif not 0 <= k < self.npages:
                raise ValueError(f"k {k} out of range for the bitmap walk (npages={self.npages})")
        else:
            gfns = as_gfns(gfns)
            if not 0 <= k <= len(gfns):
                raise ValueError(f"k {k} out of range (len(gfns) = {len(gfns)})")
            if len(gfns) > k and int(gfns[k:].max()) >= self.npages:
                raise ValueError(f"gfn out of range in gfns (npages={self.npages})")
        cols = None
        if batch is not None:
            check_batch(batch)
            if not 0 <= start <= batch.num_rows:
                raise ValueError(f"start {start} out of range (batch has {batch.num_rows} rows)")
            if base_index < 0:
                raise ValueError(f"base_index must be >= 0, got {base_index}")
            cols = [batch.column(i).to_numpy(zero_copy_only=True) for i in range(6)]
        delays = as_delays(delays, self.vcpus)
        ready = None if ready is None else as_ready(ready, self.npages)
        dmin = 0 if delays is None else min(int(d) for d in delays)
        self._last_stop = _NO_STOP
        p, xs = self._xfer, self._xs
        xs["link_dead"] = False
        row = start
        sflags, dflags = self._flags[src], self._flags[dst]
        while True:
            if walk:
                if self._send_count[src] == 0:
                    return (row, k)
            elif missing:
                while k < walk_end and dflags[k] & PRESENT:
                    k += 1
                if k >= walk_end:
                    return (row, k)
            elif k >= len(gfns):
                return (row, k)
            # 1. the guest runs up to the transfer clock
            if cols is not None:
                row = self._replay(run_host, cols, row, base_index, xs["g_ns"], delays, ready)
                if row == len(cols[0]) or self._last_stop[0] == Fault.USERFAULT:
                    return (row, k)
            if xs["v_ns"] >= until_v:
                return (row, k)
            if walk:
                while not sflags[k] & SEND:
                    k = (k + 1) % self.npages
                gfn = k
            else:
                gfn = k if missing else int(gfns[k])
            if p["skip_present"] and dflags[gfn] & PRESENT:
                k += 1
                continue
            # 2. what the page costs: source agents / target agents / each side's host thread
            version = int(self._version[src][gfn])
            private = bool(sflags[gfn] & PRIVATE)
            zero = version == 0
            nbytes = p["header_bytes"] + (0 if zero else p["page_bytes"])
            plan = self._target_rmp_plan(dst, gfn, private) if p["target_rmp"] else None
            n_upd = n_pval = n_adj = 0
            if plan == "assign":
                n_upd = n_pval = 1
                n_adj = 1 if self.os_vmpl > 0 else 0
            elif plan == "release":
                n_upd = n_pval = 1
            src_cpu = dst_cpu = src_host = dst_host = 0
            vmgexit = touch_src = touch_dst = False
            if private:
                src_cpu = p["pack_zero_ns"] if zero else p["pack_private_ns"]
                vmgexit = self._priv_in_batch + 1 == p["batch_pages"]
                src_cpu += p["vmgexit_ns"] if vmgexit else 0
                dst_cpu = p["unpack_private_ns"]
                if p["first_touch_ns"] > 0:  # the mirror VM maps the page on its agents' first touch
                    touch_src = not sflags[gfn] & MAPPED
                    touch_dst = not dflags[gfn] & MAPPED
                    src_cpu += touch_src * p["first_touch_ns"]
                    dst_cpu += touch_dst * p["first_touch_ns"]
            else:
                src_host = dst_host = p["host_page_ns"]
            dst_cpu += n_pval * p["pvalidate_ns"] + n_adj * p["rmpadjust_ns"]
            dst_host += n_upd * p["rmpupdate_ns"]
            # 3. the clock; nothing arrives after the link's deadline
            totals = (xs["bytes"] + nbytes, xs["agent_cpu_ns"] + src_cpu, xs["target_cpu_ns"] + dst_cpu,
                      xs["src_host_cpu_ns"] + src_host, xs["dst_host_cpu_ns"] + dst_host)
            if self._v0 + self._elapsed(*(t - b for t, b in zip(totals, self._base))) > deadline_v:
                xs["link_dead"] = True
                return (row, k)
            (xs["bytes"], xs["agent_cpu_ns"], xs["target_cpu_ns"], xs["src_host_cpu_ns"],
             xs["dst_host_cpu_ns"]) = totals
            if private:
                self._priv_in_batch = 0 if vmgexit else self._priv_in_batch + 1
                xs["vmgexits"] += vmgexit
                if touch_src:
                    sflags[gfn] |= MAPPED
                xs["first_touches"] += touch_src + touch_dst
            self._clock()
            # 4. delivery; with ready, the page is usable on the target from the end of its slot
            if self._slog_on:
                self._slog.append((gfn, base_index + row, version))
            self._deliver(src, dst, gfn, plan)
            if touch_dst:
                dflags[gfn] |= MAPPED
            if ready is not None and (int(ready[gfn]) != 0 or _ready_matters(cols, row, dmin, xs["g_ns"])):
                ready[gfn] = xs["g_ns"]
            xs["pages"] += 1
            xs["zero_pages"] += zero
            xs["private_pages"] += private
            xs["shared_pages"] += not private
            if walk:
                sflags[gfn] &= ~SEND & 0xFF
                self._send_count[src] -= 1
                k = (k + 1) % self.npages
            else:
                k += 1

    def _elapsed(self, nbytes, src_cpu, dst_cpu, src_host, dst_host):
        """The slowest of the link, each side's agents, each side's host thread and shared CPU pools."""
        p = self._xfer
        (sn, sd), (dn, dd) = p["src_cpus"], p["dst_cpus"]  # may change per demand step
        t = max(_ceil_div(nbytes * 10**9, p["bandwidth_bytes_per_s"]), _ceil_div(src_cpu * sd, sn),
                _ceil_div(dst_cpu * dd, dn), src_host, dst_host)
        if p["src_pool_cpus"]:
            t = max(t, _ceil_div(src_cpu + src_host, p["src_pool_cpus"]))
        if p["dst_pool_cpus"]:
            t = max(t, _ceil_div(dst_cpu + dst_host, p["dst_pool_cpus"]))
        return t

    def _clock(self):
        """v = v0 + the time the totals take; g follows v, less the guest progress lost meanwhile: within a
        demand step D (milli-CPUs) under quota Q, agents on the guest's quota take its spare CPU first, so
        it loses (max(0, 1000 x agent CPU - (Q - D) x elapsed) + 1000 x write-protect fault time) / D; an
        idle guest (D = 0) loses nothing. Entering the next step re-bases v0, g0 and the totals there."""
        p, xs = self._xfer, self._xs
        totals = (xs["bytes"], xs["agent_cpu_ns"], xs["target_cpu_ns"], xs["src_host_cpu_ns"], xs["dst_host_cpu_ns"])
        b = self._base
        elapsed = self._elapsed(*(t - x for t, x in zip(totals, b)))
        xs["v_ns"] = self._v0 + elapsed
        wp = sum(self._wp_faults)
        direct = (wp - self._wp0) * p["wp_fault_ns"]
        agent = (totals[1] - b[1] if p["charge_guest"] else 0) + (totals[2] - b[2] if p["charge_target_guest"] else 0)
        if self._dem > 0:
            lost = (max(0, 1000 * agent - (p["quota_mcpu"] - self._dem) * elapsed) + 1000 * direct) // self._dem
            cand = self._g0 + elapsed - lost if lost <= elapsed else self._g0
        else:
            cand = self._g0 + elapsed
        xs["g_ns"] = max(xs["g_ns"], cand)
        if xs["g_ns"] >= self._seg_end:
            self._v0, self._g0, self._wp0, self._base = xs["v_ns"], xs["g_ns"], wp, totals
            self._demand_step(xs["g_ns"])

    def _deliver(self, src, dst, gfn, plan):
        private = bool(self._flags[src][gfn] & PRIVATE)
        if self._flags[dst][gfn] & PRESENT:
            self._recv_add(dst, gfn, -1)
        self._version[dst][gfn] = self._version[src][gfn]
        self._flags[dst][gfn] = (int(self._flags[dst][gfn]) & ~(PRIVATE | DIRTY)) | PRESENT | (PRIVATE if private else 0)
        self._recv_add(dst, gfn, 1)
        if plan is not None:
            self._target_rmp(dst, gfn, plan)

    def _recv_add(self, host, gfn, sign):
        a, b = _page_terms(gfn, int(self._version[host][gfn]), int(self._flags[host][gfn]))
        r = self._recv_sum[host]
        r[0] = (r[0] + sign * a) & U64_MASK
        r[1] = (r[1] + sign * b) & U64_MASK

    def transfer_add(self, nbytes, agent_cpu_ns, target_cpu_ns=0):
        """Traffic outside the page list (post-copy fault pages) moves the transfer clock."""
        nbytes, agent_cpu_ns, target_cpu_ns = check_transfer_add(bool(self._xfer), nbytes, agent_cpu_ns, target_cpu_ns)
        self._xs["bytes"] += nbytes
        self._xs["agent_cpu_ns"] += agent_cpu_ns
        self._xs["target_cpu_ns"] += target_cpu_ns
        self._clock()

    def set_send_log(self, enabled):
        """Log every page transfer() sends with the trace row the guest had reached (see take_send_log)."""
        self._slog_on = bool(enabled)

    def take_send_log(self):
        """(gfns uint32, rows int64, versions uint32) of the pages sent since the last call, in order."""
        log, self._slog = self._slog, []
        return (np.array([x[0] for x in log], np.uint32), np.array([x[1] for x in log], np.int64),
                np.array([x[2] for x in log], np.uint32))

    # ------------------------------------------------------------------ the migration's send bitmap

    def mark_send_all(self, host):
        """Every page is to be sent (the bitmap at the start of pre-copy)."""
        host = self._host(host)
        self._flags[host] |= SEND
        self._send_count[host] = self.npages

    def sync_dirty(self, host):
        """Dirty-log get-and-clear into the send bitmap; returns the number of pages the log held."""
        host = self._host(host)
        f = self._flags[host]
        n = 0
        for gfn in range(self.npages):
            if f[gfn] & DIRTY:
                n += 1
                if not f[gfn] & SEND:
                    self._send_count[host] += 1
                f[gfn] = (int(f[gfn]) & ~DIRTY) | SEND
        return n

    def send_count(self, host):
        return self._send_count[self._host(host)]

    def discard_stale(self, src, dst):
        """The pages still to send from src are stale on dst (hybrid switchover); returns how many dst held."""
        src, dst = self._host(src), self._host(dst)
        n = 0
        for gfn in range(self.npages):
            if self._flags[src][gfn] & SEND:
                self._flags[src][gfn] &= ~SEND & 0xFF
                if self._flags[dst][gfn] & PRESENT:
                    self._recv_add(dst, gfn, -1)
                    self._flags[dst][gfn] &= ~PRESENT & 0xFF
                    n += 1
        self._send_count[src] = 0
        return n

    def wp_faults(self, host):
        """First writes to a clean page while dirty logging was on (write-protect faults), so far."""
        return self._wp_faults[self._host(host)]

    def received_digest(self, host):
        """Set hash of (gfn, version, private) over the pages delivered to host and still held."""
        a, b = self._recv_sum[self._host(host)]
        return f"{a:016x}{b:016x}"

    def set_digest(self, host):
        """The same set hash over every page of host's image."""
        host = self._host(host)
        a = b = 0
        for gfn in range(self.npages):
            x, y = _page_terms(gfn, int(self._version[host][gfn]), int(self._flags[host][gfn]))
            a, b = (a + x) & U64_MASK, (b + y) & U64_MASK
        return f"{a:016x}{b:016x}"

    def deliver(self, src, dst, gfn, target_rmp=True):
        """One page src -> dst outside the transfer clock (a post-copy fault being served)."""
        src, dst = self._host(src), self._host(dst)
        gfn = self._gfn(gfn)
        private = bool(self._flags[src][gfn] & PRIVATE)
        self._deliver(src, dst, gfn, self._target_rmp_plan(dst, gfn, private) if target_rmp else None)

    def clear_present(self, host, gfns):
        """The host's copies of gfns are stale (hybrid switchover): they must be fetched again."""
        host = self._host(host)
        for g in self._gfn_array(gfns):
            if self._flags[host][int(g)] & PRESENT:
                self._recv_add(host, int(g), -1)
            self._flags[host][int(g)] &= ~PRESENT & 0xFF

    def _target_rmp_plan(self, dst, gfn, private):
        """What delivering gfn does to the target's RMP: None, "assign" or "release"."""
        spa = self.spa_base[dst] + gfn
        assigned = bool(int(self._r_flags[dst][spa]) & R_ASSIGNED)
        if private:
            if not (assigned and int(self._r_asid[dst][spa]) == self.asid and int(self._r_gfn[dst][spa]) == gfn):
                return "assign"
        elif assigned:
            return "release"
        return None

    def _target_rmp(self, dst, gfn, plan):
        spa = self.spa_base[dst] + gfn
        if plan == "assign":
            self._rmpupdate(dst, spa, True, self.asid, gfn, False, False)
            self._pvalidate(dst, spa, self.asid, gfn, 0, True, False, -1)
            if self.os_vmpl > 0:
                self._rmpadjust(dst, spa, self.asid, gfn, 0, self.os_vmpl, Perm.ALL, False, False, -1)
        elif plan == "release":
            self._pvalidate(dst, spa, self.asid, gfn, 0, False, False, -1)
            self._rmpupdate(dst, spa, False, 0, 0, False, False)

    # ------------------------------------------------------------------ counters

    def counters(self):
        by_host = [dict(d) for d in self._rmp]
        return {
            "rmp": {k: sum(d[k] for d in by_host) for k in by_host[0]},
            "rmp_by_host": by_host,
            "faults": {Fault(k).key: n for k, n in self._faults.items()},
            "first_faults": [list(x) for x in self._first_faults],
        }

    def reset_counters(self):
        self._rmp = [{"rmpupdate": 0, "pvalidate": 0, "rmpadjust": 0, "psmash": 0, "psc": 0} for _ in range(self.hosts)]
        self._faults = {int(f): 0 for f in FAULT_KINDS}
        self._first_faults = []
        self._wp_faults = [0] * self.hosts
