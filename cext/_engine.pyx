"""The Cython page engine (``replay._engine.Engine``): the Engine API of docs/internals.md, fast.

Same semantics as the reference engine (replay/refengine.py), which is the readable statement of the rules;
tests/test_engine_agree.py checks the two against each other. Layout: page state and RMP entries are C
arrays of structs (cext/_engine.pxd); the RMP instructions, the access check, the per-row replay loop and
the transfer loop are ``cdef ... noexcept nogil`` functions over raw pointers, and ``replay``/``transfer``
run them with the GIL released. Record-batch columns are taken zero-copy (Arrow data buffer + offset).
C-level error codes become Python exceptions only in ``_raise_row_error`` (and enums in the wrappers).
Compiler directives live in setup.py.
"""

import hashlib

import numpy as np

from libc.stdlib cimport calloc, free
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, UINT64_MAX

from _engine cimport *

from replay.engine import (
    PageView,
    RmpEntry as _RmpEntryT,
    U64_MAX,
    as_delays,
    check_engine_args,
    check_u32,
    check_vmpl,
    as_ready,
    as_gfns,
    check_batch,
)
from replay.errors import TraceError
from replay.snp import FAULT_KINDS, Fault, Rc

cdef extern from *:
    """
    typedef unsigned __int128 snp_u128;
    #if defined(__GNUC__)
    #define SNP_PREFETCH(p) __builtin_prefetch((p), 1, 3)
    #define SNP_LIKELY(x) __builtin_expect(!!(x), 1)
    #else
    #define SNP_PREFETCH(p) ((void)0)
    #define SNP_LIKELY(x) (x)
    #endif
    """
    ctypedef unsigned long long snp_u128
    void SNP_PREFETCH(const void* p) noexcept nogil
    bint SNP_LIKELY(bint x) noexcept nogil

cdef enum:
    PREFETCH = 8  # rows ahead whose page state and RMP entry are prefetched

_FAULT_KEYS = {int(f): f.key for f in Fault}


# ---------------------------------------------------------------------------------------------- C core

cdef inline void count_fault(State* s, int kind, int64_t ev, int64_t gfn) noexcept nogil:
    s.faults[kind] += 1
    if s.n_ff < FIRST_FAULTS_MAX:
        s.ff[s.n_ff][0] = ev
        s.ff[s.n_ff][1] = kind
        s.ff[s.n_ff][2] = gfn
        s.n_ff += 1


cdef inline int npf_kind(const RmpEntry* e, uint32_t asid, uint32_t gfn) noexcept nogil:
    if (e.flags & R_ASSIGNED) and e.gfn != gfn:
        return F_NPF_GPA_MISMATCH
    if not (e.flags & R_ASSIGNED):
        return F_NPF_NOT_ASSIGNED
    if e.asid != asid:
        return F_NPF_ASID
    return F_NONE


cdef inline void reset_perms(RmpEntry* e) noexcept nogil:
    e.perms[0] = PERM_ALL
    e.perms[1] = 0
    e.perms[2] = 0
    e.perms[3] = 0


cdef int rmpupdate_c(State* s, int host, int64_t spa, bint assigned, uint32_t asid, uint32_t gfn,
                     bint size_2m, bint immutable) noexcept nogil:
    cdef RmpEntry* t = s.rmp[host]
    cdef int64_t i, n = 1
    cdef RmpEntry* e
    cdef uint32_t new_gfn
    cdef uint8_t keep
    cdef bint changed
    s.n_rmpupdate[host] += 1
    if t[spa].flags & R_IMMUTABLE:
        return RC_FAIL_PERMISSION
    if size_2m:
        n = PAGES_PER_2M
        if spa % PAGES_PER_2M or gfn % PAGES_PER_2M or spa + PAGES_PER_2M > s.rmp_size[host]:
            return RC_FAIL_INPUT
        for i in range(1, PAGES_PER_2M):
            e = &t[spa + i]
            if (e.flags & R_IMMUTABLE) != 0:
                return RC_FAIL_PERMISSION
        for i in range(1, PAGES_PER_2M):
            e = &t[spa + i]
            if (e.flags & (R_ASSIGNED | R_SIZE_2M)) == R_ASSIGNED:
                return RC_FAIL_OVERLAP
    if not assigned:
        asid = 0
        gfn = 0
    for i in range(n):
        e = &t[spa + i]
        new_gfn = <uint32_t>(gfn + i) if assigned else 0
        changed = ((e.flags & R_ASSIGNED) != 0) != assigned or e.asid != asid or e.gfn != new_gfn \
            or ((e.flags & R_SIZE_2M) != 0) != size_2m
        keep = e.flags & (R_VALIDATED | R_VMSA)
        if changed:
            keep = 0
            reset_perms(e)
        e.flags = keep | (R_ASSIGNED if assigned else 0) | (R_SIZE_2M if size_2m else 0) \
            | (R_IMMUTABLE if immutable else 0)
        e.asid = asid
        e.gfn = new_gfn
    return RC_SUCCESS


cdef int pvalidate_c(State* s, int host, int64_t spa, uint32_t asid, uint32_t gfn, int vmpl, bint validate,
                     bint size_2m, int64_t ev) noexcept nogil:
    cdef RmpEntry* t = s.rmp[host]
    cdef int64_t i, n
    cdef int npf
    s.n_pvalidate[host] += 1
    if vmpl != 0:
        return RC_FAIL_PERMISSION
    if size_2m and (spa % PAGES_PER_2M or spa + PAGES_PER_2M > s.rmp_size[host]):
        return RC_FAIL_INPUT
    npf = npf_kind(&t[spa], asid, gfn)
    if npf != F_NONE:
        count_fault(s, npf, ev, gfn)
        return RC_NESTED_PF
    if size_2m and not (t[spa].flags & R_SIZE_2M):
        return RC_FAIL_SIZEMISMATCH
    if ((t[spa].flags & R_VALIDATED) != 0) == validate:
        return RC_FAIL_NOUPDATE
    n = PAGES_PER_2M if size_2m else 1
    for i in range(spa, spa + n):
        if validate:
            t[i].flags |= R_VALIDATED
        else:
            t[i].flags &= ~R_VALIDATED
    return RC_SUCCESS


cdef int rmpadjust_c(State* s, int host, int64_t spa, uint32_t asid, uint32_t gfn, int caller_vmpl,
                     int target_vmpl, int perms, bint vmsa, bint size_2m, int64_t ev) noexcept nogil:
    cdef RmpEntry* t = s.rmp[host]
    cdef int64_t i, n
    cdef int npf
    s.n_rmpadjust[host] += 1
    if target_vmpl <= caller_vmpl or target_vmpl >= VMPLS:
        return RC_FAIL_PERMISSION
    if vmsa and caller_vmpl != 0:
        return RC_FAIL_PERMISSION
    if perms & ~(<int>t[spa].perms[caller_vmpl]):
        return RC_FAIL_PERMISSION
    if size_2m and (spa % PAGES_PER_2M or spa + PAGES_PER_2M > s.rmp_size[host]):
        return RC_FAIL_INPUT
    npf = npf_kind(&t[spa], asid, gfn)
    if npf != F_NONE:
        count_fault(s, npf, ev, gfn)
        return RC_NESTED_PF
    if not (t[spa].flags & R_VALIDATED):
        return RC_FAIL_INPUT
    if ((t[spa].flags & R_SIZE_2M) != 0) != size_2m:
        return RC_FAIL_SIZEMISMATCH
    n = PAGES_PER_2M if size_2m else 1
    for i in range(spa, spa + n):
        t[i].perms[target_vmpl] = <uint8_t>perms
        if caller_vmpl == 0:
            t[i].flags = (t[i].flags & ~R_VMSA) | (R_VMSA if vmsa else 0)
    return RC_SUCCESS


cdef int psmash_c(State* s, int host, int64_t spa) noexcept nogil:
    cdef RmpEntry* t = s.rmp[host]
    cdef int64_t i
    s.n_psmash[host] += 1
    if spa % PAGES_PER_2M or not (t[spa].flags & R_ASSIGNED) or not (t[spa].flags & R_SIZE_2M):
        return RC_FAIL_INPUT
    for i in range(spa, spa + PAGES_PER_2M):
        t[i].flags &= ~R_SIZE_2M
    return RC_SUCCESS


cdef inline int check_entry(const RmpEntry* e, uint32_t gfn, uint32_t asid, int vmpl, int access,
                            bint private) noexcept nogil:
    if not private:
        return F_NPF_SHARED_ASSIGNED if (e.flags & R_ASSIGNED) else F_NONE
    # fast path: assigned, validated, 4K, mutable, ours, allowed
    if SNP_LIKELY((e.flags & (R_ASSIGNED | R_IMMUTABLE | R_SIZE_2M | R_VALIDATED)) == (R_ASSIGNED | R_VALIDATED)
                  and e.gfn == gfn and e.asid == asid and (e.perms[vmpl] & access)):
        return F_NONE
    if (e.flags & R_ASSIGNED) and e.gfn != gfn:
        return F_NPF_GPA_MISMATCH
    if not (e.flags & R_ASSIGNED):
        return F_NPF_NOT_ASSIGNED
    if e.asid != asid:
        return F_NPF_ASID
    if e.flags & R_IMMUTABLE:
        return F_NPF_IMMUTABLE
    if e.flags & R_SIZE_2M:  # the guest's nested mapping is always 4K in this model
        return F_NPF_SIZE
    if not (e.flags & R_VALIDATED):
        return F_VC_NOT_VALIDATED
    if not (e.perms[vmpl] & access):
        return F_NPF_VMPL
    return F_NONE


cdef int check_c(State* s, int host, int64_t gfn, int vmpl, int access, bint private) noexcept nogil:
    return check_entry(&s.rmp[host][s.spa_base[host] + gfn], <uint32_t>gfn, s.asid, vmpl, access, private)


cdef void launch_c(State* s, int host, const uint8_t* shared) noexcept nogil:
    cdef int64_t gfn, spa
    cdef PageState* img = s.img[host]
    for gfn in range(s.npages):
        spa = s.spa_base[host] + gfn
        if shared[gfn]:
            if s.rmp[host][spa].flags & R_ASSIGNED:
                rmpupdate_c(s, host, spa, False, 0, 0, False, False)
            img[gfn].flags = PG_PRESENT
        else:
            rmpupdate_c(s, host, spa, True, s.asid, <uint32_t>gfn, False, False)
            pvalidate_c(s, host, spa, s.asid, <uint32_t>gfn, 0, True, False, -1)
            if s.os_vmpl > 0:
                rmpadjust_c(s, host, spa, s.asid, <uint32_t>gfn, 0, s.os_vmpl, PERM_ALL, False, False, -1)
            img[gfn].flags = PG_PRIVATE | PG_PRESENT
        img[gfn].version = 0


cdef inline void apply_page(State* s, int host, int64_t gfn, int op, int64_t ev, uint8_t dirty) noexcept nogil:
    """One page of a row (PRESENT already checked): the per-page part of replay()."""
    cdef PageState* p = &s.img[host][gfn]
    cdef int64_t spa = s.spa_base[host] + gfn
    cdef int f
    cdef bint private = (p.flags & PG_PRIVATE) != 0
    if op == OP_WRITE or op == OP_READ:
        f = check_entry(&s.rmp[host][spa], <uint32_t>gfn, s.asid, s.os_vmpl,
                        PERM_WRITE if op == OP_WRITE else PERM_READ, private)
        if f != F_NONE:
            count_fault(s, f, ev, gfn)
        elif op == OP_WRITE:
            p.version += 1
            p.flags |= dirty
    elif op == OP_TO_SHARED:
        if private:
            pvalidate_c(s, host, spa, s.asid, <uint32_t>gfn, 0, False, False, ev)
            rmpupdate_c(s, host, spa, False, 0, 0, False, False)
            p.flags = (p.flags & ~PG_PRIVATE) | dirty
            s.n_psc[host] += 1
    else:
        if not private:
            rmpupdate_c(s, host, spa, True, s.asid, <uint32_t>gfn, False, False)
            pvalidate_c(s, host, spa, s.asid, <uint32_t>gfn, 0, True, False, ev)
            if s.os_vmpl > 0:
                rmpadjust_c(s, host, spa, s.asid, <uint32_t>gfn, 0, s.os_vmpl, PERM_ALL, False, False, ev)
            p.flags |= PG_PRIVATE | dirty
            s.n_psc[host] += 1


cdef int64_t replay_rows(State* s, int host, const Cols* c, int64_t start, int64_t base_index,
                         uint64_t stop, const uint64_t* delays, const uint64_t* ready) noexcept nogil:
    """Rows start.. of c on image host until effective time >= stop; returns the first row not applied,
    or an ERR_* code (s.err_row / s.err_val say where). With ``ready`` (post-copy), a page is usable only
    from guest time ready[gfn] on: a row that needs it earlier stops as a userfault (in flight)."""
    cdef int64_t r, n = c.n, npages = s.npages
    cdef int64_t first, last, g, pf
    cdef uint64_t t, d, a, end
    cdef uint32_t ln
    cdef uint16_t v
    cdef uint8_t o
    cdef uint8_t dirty = PG_DIRTY if s.logging[host] else 0
    cdef PageState* img = s.img[host]
    cdef RmpEntry* rmp = s.rmp[host] + s.spa_base[host]    # indexed by gfn
    cdef PageState* p
    cdef const RmpEntry* e
    cdef int f
    cdef uint32_t asid = s.asid
    cdef int vmpl = s.os_vmpl
    cdef int64_t vcpus = s.vcpus
    # locals, not c->/s-> loads: the uint8 flag stores below may alias anything, so the compiler would
    # reload every field it reads through a pointer on each row
    cdef const uint64_t* gpa = c.gpa
    cdef const uint64_t* tns = c.t_ns
    cdef const uint16_t* vcpu = c.vcpu
    cdef const uint32_t* lens = c.len
    cdef const uint8_t* ops = c.op
    for r in range(start, n):
        if r + PREFETCH < n:
            pf = <int64_t>(gpa[r + PREFETCH] >> PAGE_SHIFT)
            if pf < npages:
                SNP_PREFETCH(&img[pf])
                SNP_PREFETCH(&rmp[pf])
        v = vcpu[r]
        if v >= vcpus:
            s.err_row = r
            s.err_val = v
            return ERR_VCPU
        t = tns[r]
        if delays != NULL:
            d = delays[v]
            t = t + d
            if t < d:
                t = UINT64_MAX
        if t >= stop:
            return r
        ln = lens[r]
        a = gpa[r]
        if ln == 0:
            s.err_row = r
            return ERR_LEN
        end = a + (ln - 1)
        if end < a or (end >> PAGE_SHIFT) >= <uint64_t>npages:
            s.err_row = r
            return ERR_RANGE
        o = ops[r]
        if o > OP_TO_PRIVATE:
            s.err_row = r
            s.err_val = o
            return ERR_OP
        first = <int64_t>(a >> PAGE_SHIFT)
        last = <int64_t>(end >> PAGE_SHIFT)
        if SNP_LIKELY(first == last):
            p = &img[first]
            if not (p.flags & PG_PRESENT) or (ready != NULL and ready[first] > t):
                s.ls_fault = F_USERFAULT
                s.ls_gfn = first
                s.ls_vcpu = v
                s.ls_row = r
                return r
            if o == OP_WRITE:
                e = &rmp[first]
                f = check_entry(e, <uint32_t>first, asid, vmpl, PERM_WRITE, (p.flags & PG_PRIVATE) != 0)
                if SNP_LIKELY(f == F_NONE):
                    p.version += 1
                    p.flags |= dirty
                else:
                    count_fault(s, f, base_index + r, first)
            else:
                apply_page(s, host, first, o, base_index + r, dirty)
        else:
            for g in range(first, last + 1):
                if not (img[g].flags & PG_PRESENT) or (ready != NULL and ready[g] > t):
                    s.ls_fault = F_USERFAULT
                    s.ls_gfn = g
                    s.ls_vcpu = v
                    s.ls_row = r
                    return r
            for g in range(first, last + 1):
                apply_page(s, host, g, o, base_index + r, dirty)
    return n


cdef inline int64_t ceil_div(int64_t a, int64_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline void target_rmp(State* s, int dst, int64_t gfn, bint private) noexcept nogil:
    cdef int64_t spa = s.spa_base[dst] + gfn
    cdef RmpEntry* e = &s.rmp[dst][spa]
    cdef bint assigned = (e.flags & R_ASSIGNED) != 0
    if private:
        if not (assigned and e.asid == s.asid and e.gfn == <uint32_t>gfn):
            rmpupdate_c(s, dst, spa, True, s.asid, <uint32_t>gfn, False, False)
            pvalidate_c(s, dst, spa, s.asid, <uint32_t>gfn, 0, True, False, -1)
            if s.os_vmpl > 0:
                rmpadjust_c(s, dst, spa, s.asid, <uint32_t>gfn, 0, s.os_vmpl, PERM_ALL, False, False, -1)
    elif assigned:
        pvalidate_c(s, dst, spa, s.asid, <uint32_t>gfn, 0, False, False, -1)
        rmpupdate_c(s, dst, spa, False, 0, 0, False, False)


cdef inline void xfer_clock(State* s) noexcept nogil:
    """v = v0 + max(link time of the bytes so far, packaging time of the agent CPU so far); g follows v,
    less the agents' share of the guest's CPU quota when they are the guest's own vCPUs."""
    cdef Xfer* x = &s.x
    cdef int64_t link_ns, pack_ns, elapsed, cand
    link_ns = <int64_t>(((<snp_u128>x.bytes) * 1000000000 + <snp_u128>(x.bandwidth - 1))
                        / <snp_u128>x.bandwidth)
    pack_ns = ceil_div(x.agent_cpu_ns, x.agents)
    x.v = x.v0 + (link_ns if link_ns > pack_ns else pack_ns)
    elapsed = x.v - x.v0
    if x.charge_guest:
        cand = x.g0 + elapsed - x.agent_cpu_ns // s.vcpus
        if cand > x.g:
            x.g = cand
    else:
        x.g = x.g0 + elapsed


cdef inline void deliver_page(State* s, int src, int dst, int64_t gfn, bint rmp) noexcept nogil:
    """The target receives gfn as the source holds it: content, attribute, and its RMP state."""
    cdef PageState* ps = &s.img[src][gfn]
    cdef PageState* pd = &s.img[dst][gfn]
    cdef bint private = (ps.flags & PG_PRIVATE) != 0
    pd.version = ps.version
    pd.flags = (pd.flags & ~(PG_PRIVATE | PG_DIRTY)) | PG_PRESENT | (PG_PRIVATE if private else 0)
    if rmp:
        target_rmp(s, dst, gfn, private)


cdef int64_t transfer_pages(State* s, int src, int dst, const uint32_t* gfns, int64_t n, int64_t k,
                            const Cols* c, int64_t* row, int64_t base_index, int run_host,
                            const uint64_t* delays, uint64_t* ready) noexcept nogil:
    """Send gfns[k:n] src -> dst on the transfer clock while the guest replays c on run_host.
    Returns the next k (== n when done), or an ERR_* code from the replay; *row is updated."""
    cdef Xfer* x = &s.x
    cdef int64_t gfn, r, nbytes, cpu
    cdef uint32_t version
    cdef bint private, zero
    cdef PageState* ps
    cdef PageState* pd
    while k < n:
        # 1. the guest runs up to the transfer clock
        if c != NULL:
            r = replay_rows(s, run_host, c, row[0], base_index, <uint64_t>x.g, delays, ready)
            if r < 0:
                return r
            row[0] = r
            if r == c.n or s.ls_fault == F_USERFAULT:
                return k
        gfn = gfns[k]
        pd = &s.img[dst][gfn]
        if x.skip_present and (pd.flags & PG_PRESENT):
            k += 1
            continue
        # 2. what the page costs
        ps = &s.img[src][gfn]
        version = ps.version
        private = (ps.flags & PG_PRIVATE) != 0
        zero = version == 0
        nbytes = x.header_bytes + (0 if zero else x.page_bytes)
        cpu = 0
        if private:
            cpu = x.pack_zero_ns if zero else x.pack_private_ns
            x.priv_in_batch += 1
            if x.priv_in_batch == x.batch_pages:
                cpu += x.vmgexit_ns
                x.vmgexits += 1
                x.priv_in_batch = 0
            x.target_cpu_ns += x.unpack_private_ns
        # 3. the clock
        x.bytes += nbytes
        x.agent_cpu_ns += cpu
        xfer_clock(s)
        # 4. delivery; with ready, the page is usable on the target from the end of its slot
        deliver_page(s, src, dst, gfn, x.target_rmp)
        if ready != NULL:
            ready[gfn] = <uint64_t>x.g
        x.pages += 1
        x.zero_pages += zero
        x.private_pages += private
        x.shared_pages += not private
        k += 1
    return k


# ---------------------------------------------------------------------------------------------- Python glue

cdef int _raise_row_error(State* s, int64_t code, int64_t base_index) except -1:
    """The one place where a C-level row error becomes a Python exception (same text as the reference)."""
    cdef int64_t row = s.err_row
    where = f"event {base_index + row} (batch row {row})"
    if code == ERR_VCPU:
        raise TraceError(f"{where}: vcpu {s.err_val} >= vcpus {s.vcpus}")
    if code == ERR_LEN:
        raise TraceError(f"{where}: len is 0")
    if code == ERR_RANGE:
        raise TraceError(f"{where}: gpa+len beyond the guest ({s.npages} pages)")
    if code == ERR_OP:
        raise TraceError(f"{where}: unknown op {s.err_val}")
    raise AssertionError(f"engine: unknown error code {code}")


cdef const char* _col_ptr(object arr, int width, int64_t n, list keep) except NULL:
    """Zero-copy pointer to element 0 of a primitive Arrow array (data buffer + offset)."""
    cdef const char[::1] mv
    cdef int64_t off = arr.offset
    buf = arr.buffers()[1]
    mv = buf
    if (off + n) * width > mv.shape[0]:
        raise ValueError("arrow column buffer shorter than its length")
    keep.append(mv)
    return &mv[0] + off * width


cdef int _cols(Cols* c, object batch, list keep) except -1:
    cdef int64_t n = batch.num_rows
    c.n = n
    if n == 0:
        c.t_ns = NULL
        c.vcpu = NULL
        c.gpa = NULL
        c.len = NULL
        c.op = NULL
        return 0
    c.t_ns = <const uint64_t*>_col_ptr(batch.column(0), 8, n, keep)
    c.vcpu = <const uint16_t*>_col_ptr(batch.column(1), 2, n, keep)
    c.gpa = <const uint64_t*>_col_ptr(batch.column(2), 8, n, keep)
    c.len = <const uint32_t*>_col_ptr(batch.column(3), 4, n, keep)
    c.op = <const uint8_t*>_col_ptr(batch.column(4), 1, n, keep)
    return 0


cdef class Engine:
    """The Cython page engine; API and semantics in docs/internals.md ("Engine API")."""

    cdef State st
    cdef readonly tuple spa_base

    def __cinit__(self):
        cdef int h
        for h in range(MAX_HOSTS):
            self.st.img[h] = NULL
            self.st.rmp[h] = NULL

    def __init__(self, npages, vcpus, *, asid=1, os_vmpl=0, hosts=2, spa_base=None):
        cdef int h
        cdef int64_t i
        npages, vcpus, asid, os_vmpl, hosts, spa_base = check_engine_args(npages, vcpus, asid, os_vmpl, hosts, spa_base)
        if self.st.img[0] != NULL:
            raise RuntimeError("Engine.__init__ called twice")
        self.st.npages = npages
        self.st.vcpus = vcpus
        self.st.asid = asid
        self.st.os_vmpl = os_vmpl
        self.st.hosts = hosts
        self.spa_base = spa_base
        for h in range(hosts):
            self.st.spa_base[h] = spa_base[h]
            self.st.rmp_size[h] = spa_base[h] + npages + VMSA_SPARE
            self.st.logging[h] = 0
            self.st.img[h] = <PageState*>calloc(npages, sizeof(PageState))
            self.st.rmp[h] = <RmpEntry*>calloc(self.st.rmp_size[h], sizeof(RmpEntry))
            if self.st.img[h] == NULL or self.st.rmp[h] == NULL:
                raise MemoryError("engine: cannot allocate page state / RMP table")
            for i in range(self.st.rmp_size[h]):
                self.st.rmp[h][i].perms[0] = PERM_ALL
        self.st.ls_fault = F_NONE
        self.st.ls_gfn = self.st.ls_vcpu = self.st.ls_row = 0
        self.reset_counters()
        self.st.x.active = 0
        self._xfer_zero()

    def __dealloc__(self):
        cdef int h
        for h in range(MAX_HOSTS):
            free(self.st.img[h])
            free(self.st.rmp[h])
            self.st.img[h] = NULL
            self.st.rmp[h] = NULL

    # ------------------------------------------------------------------ attributes and argument checks

    @property
    def npages(self):
        return self.st.npages

    @property
    def vcpus(self):
        return self.st.vcpus

    @property
    def asid(self):
        return self.st.asid

    @property
    def os_vmpl(self):
        return self.st.os_vmpl

    @property
    def hosts(self):
        return self.st.hosts

    cdef int _host(self, host) except -1:
        host = int(host)
        if not 0 <= host < self.st.hosts:
            raise ValueError(f"host {host} out of range (hosts={self.st.hosts})")
        return host

    cdef int64_t _spa(self, int host, spa) except -1:
        spa = int(spa)
        if not 0 <= spa < self.st.rmp_size[host]:
            raise ValueError(f"spa {spa} out of range for host {host} (RMP size {self.st.rmp_size[host]})")
        return spa

    cdef int64_t _gfn(self, gfn) except -1:
        gfn = int(gfn)
        if not 0 <= gfn < self.st.npages:
            raise ValueError(f"gfn {gfn} out of range (npages={self.st.npages})")
        return gfn

    def rmp_size(self, host):
        """Number of RMP entries of ``host`` (valid SPAs are ``range(rmp_size(host))``)."""
        return self.st.rmp_size[self._host(host)]

    def spa(self, host, gfn):
        cdef int h = self._host(host)
        return self.st.spa_base[h] + self._gfn(gfn)

    # ------------------------------------------------------------------ RMP instructions

    def rmpupdate(self, host, spa, *, assigned, asid=0, gfn=0, size_2m=False, immutable=False):
        cdef int h = self._host(host)
        cdef int64_t s = self._spa(h, spa)
        a, g = check_u32("asid", asid), check_u32("gfn", gfn)
        return Rc(rmpupdate_c(&self.st, h, s, bool(assigned), a, g, bool(size_2m), bool(immutable)))

    def pvalidate(self, host, spa, *, asid, gfn, vmpl, validate, size_2m=False):
        cdef int h = self._host(host)
        cdef int64_t s = self._spa(h, spa)
        a, g = check_u32("asid", asid), check_u32("gfn", gfn)
        vm = check_vmpl("vmpl", vmpl)
        return Rc(pvalidate_c(&self.st, h, s, a, g, vm, bool(validate), bool(size_2m), -1))

    def rmpadjust(self, host, spa, *, asid, gfn, caller_vmpl, target_vmpl, perms, vmsa=False, size_2m=False):
        cdef int h = self._host(host)
        cdef int64_t s = self._spa(h, spa)
        a, g = check_u32("asid", asid), check_u32("gfn", gfn)
        cv = check_vmpl("caller_vmpl", caller_vmpl)
        tv, p = int(target_vmpl), int(perms)
        if not 0 <= p <= PERM_ALL:
            raise ValueError(f"perms must be in [0, 15], got {p}")
        tv = max(-1, min(tv, VMPLS))  # only its comparison with caller_vmpl and VMPLS matters
        return Rc(rmpadjust_c(&self.st, h, s, a, g, cv, tv, p, bool(vmsa), bool(size_2m), -1))

    def psmash(self, host, spa):
        cdef int h = self._host(host)
        cdef int64_t s = self._spa(h, spa)
        return Rc(psmash_c(&self.st, h, s))

    def rmp_entry(self, host, spa):
        cdef int h = self._host(host)
        cdef int64_t s = self._spa(h, spa)
        cdef RmpEntry* e = &self.st.rmp[h][s]
        return _RmpEntryT(
            assigned=bool(e.flags & R_ASSIGNED),
            asid=e.asid,
            gfn=e.gfn,
            size_2m=bool(e.flags & R_SIZE_2M),
            immutable=bool(e.flags & R_IMMUTABLE),
            validated=bool(e.flags & R_VALIDATED),
            vmsa=bool(e.flags & R_VMSA),
            perms=(e.perms[0], e.perms[1], e.perms[2], e.perms[3]),
        )

    # ------------------------------------------------------------------ access checks

    def check_access(self, host, gfn, *, vmpl, access, private):
        cdef int h = self._host(host)
        cdef int64_t g = self._gfn(gfn)
        vm = check_vmpl("vmpl", vmpl)
        acc = int(access)
        if not 1 <= acc <= PERM_ALL:
            raise ValueError(f"access must be in [1, 15], got {acc}")
        return Fault(check_c(&self.st, h, g, vm, acc, bool(private)))

    def host_write(self, host, spa):
        cdef int h = self._host(host)
        cdef int64_t s = self._spa(h, spa)
        if self.st.rmp[h][s].flags & R_ASSIGNED:
            count_fault(&self.st, F_HOST_RMP_PF, -1, self.st.rmp[h][s].gfn)
            return Fault.HOST_RMP_PF
        return Fault.NONE

    # ------------------------------------------------------------------ guest page state

    def launch(self, host, shared_ranges):
        cdef int h = self._host(host)
        cdef uint8_t[::1] shared = np.zeros(self.st.npages, np.uint8)
        for r in shared_ranges:
            first, last = (int(x) for x in r)
            if not 0 <= first <= last < self.st.npages:
                raise ValueError(f"shared range [{first}, {last}] out of range (npages={self.st.npages})")
            shared[first : last + 1] = 1
        with nogil:
            launch_c(&self.st, h, &shared[0])

    def page(self, host, gfn):
        cdef int h = self._host(host)
        cdef int64_t g = self._gfn(gfn)
        cdef PageState* p = &self.st.img[h][g]
        return PageView(p.version, bool(p.flags & PG_PRIVATE), bool(p.flags & PG_DIRTY), bool(p.flags & PG_PRESENT))

    cdef _gfn_array(self, gfns):
        arr = np.ascontiguousarray(np.asarray(gfns, dtype=np.int64).reshape(-1))
        if arr.size and (arr.min() < 0 or arr.max() >= self.st.npages):
            raise ValueError(f"gfn out of range (npages={self.st.npages})")
        return arr

    def flags(self, host, gfns):
        cdef int h = self._host(host)
        cdef const int64_t[::1] g = self._gfn_array(gfns)
        out = np.empty(g.shape[0], np.uint8)
        cdef uint8_t[::1] o = out
        cdef Py_ssize_t i
        cdef PageState* img = self.st.img[h]
        for i in range(g.shape[0]):
            o[i] = img[g[i]].flags
        return out

    def versions(self, host, gfns):
        cdef int h = self._host(host)
        cdef const int64_t[::1] g = self._gfn_array(gfns)
        out = np.empty(g.shape[0], np.uint32)
        cdef uint32_t[::1] o = out
        cdef Py_ssize_t i
        cdef PageState* img = self.st.img[h]
        for i in range(g.shape[0]):
            o[i] = img[g[i]].version
        return out

    def set_dirty_logging(self, host, enabled):
        self.st.logging[self._host(host)] = 1 if enabled else 0

    def collect_dirty(self, host):
        cdef int h = self._host(host)
        cdef PageState* img = self.st.img[h]
        cdef int64_t i, n = 0, j = 0
        with nogil:
            for i in range(self.st.npages):
                n += (img[i].flags & PG_DIRTY) != 0
        out = np.empty(n, np.uint32)
        cdef uint32_t[::1] o = out
        with nogil:
            for i in range(self.st.npages):
                if img[i].flags & PG_DIRTY:
                    o[j] = <uint32_t>i
                    j += 1
                    img[i].flags &= ~PG_DIRTY
        return out

    def count_present(self, host):
        cdef int h = self._host(host)
        cdef PageState* img = self.st.img[h]
        cdef int64_t i, n = 0
        with nogil:
            for i in range(self.st.npages):
                n += (img[i].flags & PG_PRESENT) != 0
        return n

    def digest(self, host):
        """blake2b-256 over the little-endian uint32 versions of all gfns, then one byte (PRIVATE bit) each."""
        cdef int h = self._host(host)
        cdef PageState* img = self.st.img[h]
        cdef int64_t i, n = self.st.npages
        ver = np.empty(n, "<u4")
        prv = np.empty(n, np.uint8)
        cdef uint32_t[::1] vv = ver
        cdef uint8_t[::1] pv = prv
        with nogil:
            for i in range(n):
                vv[i] = img[i].version
                pv[i] = img[i].flags & PG_PRIVATE
        d = hashlib.blake2b(digest_size=32)
        d.update(ver)
        d.update(prv)
        return d.hexdigest()

    # ------------------------------------------------------------------ replay

    @property
    def last_stop(self):
        return (Fault(self.st.ls_fault), self.st.ls_gfn, self.st.ls_vcpu, self.st.ls_row)

    def replay(self, host, batch, start, base_index, stop_t_ns, delays=None, ready=None):
        cdef int h = self._host(host)
        cdef Cols c
        cdef int64_t st, bi, r
        cdef uint64_t stop
        cdef const uint64_t[::1] dv
        cdef const uint64_t* dp = NULL
        cdef const uint64_t[::1] rv
        cdef const uint64_t* rp = NULL
        check_batch(batch)
        delays = as_delays(delays, self.st.vcpus)
        if ready is not None:
            rv = as_ready(ready, self.st.npages)
            rp = &rv[0]
        start, base_index, stop_t_ns = int(start), int(base_index), int(stop_t_ns)
        if not 0 <= start <= batch.num_rows:
            raise ValueError(f"start {start} out of range (batch has {batch.num_rows} rows)")
        if base_index < 0:
            raise ValueError(f"base_index must be >= 0, got {base_index}")
        if not 0 <= stop_t_ns <= U64_MAX:
            raise ValueError(f"stop_t_ns must be in [0, 2**64), got {stop_t_ns}")
        self.st.ls_fault = F_NONE
        self.st.ls_gfn = self.st.ls_vcpu = self.st.ls_row = 0
        keep = []
        _cols(&c, batch, keep)
        if delays is not None:
            dv = delays
            dp = &dv[0]
        st, bi, stop = start, base_index, stop_t_ns
        with nogil:
            r = replay_rows(&self.st, h, &c, st, bi, stop, dp, rp)
        if r < 0:
            _raise_row_error(&self.st, r, bi)
        return r

    # ------------------------------------------------------------------ transfer

    cdef _xfer_zero(self):
        cdef Xfer* x = &self.st.x
        x.v0 = x.g0 = x.v = x.g = 0
        x.pages = x.zero_pages = x.private_pages = x.shared_pages = 0
        x.bytes = x.agent_cpu_ns = x.vmgexits = x.target_cpu_ns = x.priv_in_batch = 0

    def begin_transfer(self, v_ns, g_ns, *, bandwidth_bytes_per_s, page_bytes, header_bytes, agents,
                       pack_private_ns, pack_zero_ns, batch_pages, vmgexit_ns, charge_guest,
                       unpack_private_ns=0, target_rmp=True, skip_present=False):
        p = dict(
            v_ns=v_ns, g_ns=g_ns, bandwidth_bytes_per_s=bandwidth_bytes_per_s, page_bytes=page_bytes,
            header_bytes=header_bytes, agents=agents, pack_private_ns=pack_private_ns, pack_zero_ns=pack_zero_ns,
            batch_pages=batch_pages, vmgexit_ns=vmgexit_ns, unpack_private_ns=unpack_private_ns,
        )
        for k, x in p.items():
            x = p[k] = int(x)
            if not 0 <= x < 1 << 62:
                raise ValueError(f"begin_transfer: {k} must be in [0, 2**62), got {x}")
        for k in ("bandwidth_bytes_per_s", "agents", "batch_pages"):
            if p[k] < 1:
                raise ValueError(f"begin_transfer: {k} must be >= 1, got {p[k]}")
        self._xfer_zero()
        cdef Xfer* xs = &self.st.x
        xs.active = 1
        xs.charge_guest = bool(charge_guest)
        xs.target_rmp = bool(target_rmp)
        xs.skip_present = bool(skip_present)
        xs.bandwidth = p["bandwidth_bytes_per_s"]
        xs.page_bytes = p["page_bytes"]
        xs.header_bytes = p["header_bytes"]
        xs.agents = p["agents"]
        xs.pack_private_ns = p["pack_private_ns"]
        xs.pack_zero_ns = p["pack_zero_ns"]
        xs.batch_pages = p["batch_pages"]
        xs.vmgexit_ns = p["vmgexit_ns"]
        xs.unpack_private_ns = p["unpack_private_ns"]
        xs.v0 = xs.v = p["v_ns"]
        xs.g0 = xs.g = p["g_ns"]

    def transfer_state(self):
        cdef Xfer* x = &self.st.x
        return dict(
            v_ns=x.v, g_ns=x.g, pages=x.pages, zero_pages=x.zero_pages, private_pages=x.private_pages,
            shared_pages=x.shared_pages, bytes=x.bytes, agent_cpu_ns=x.agent_cpu_ns, vmgexits=x.vmgexits,
            target_cpu_ns=x.target_cpu_ns,
        )

    def transfer(self, src, dst, gfns, k, batch, start, base_index, run_host, delays=None, ready=None):
        cdef int s = self._host(src)
        cdef int d = self._host(dst)
        cdef int rh = self._host(run_host)
        cdef Cols c
        cdef const Cols* cp = NULL
        cdef const uint32_t[::1] gv
        cdef const uint32_t* gp = NULL
        cdef const uint64_t[::1] dv
        cdef const uint64_t* dp = NULL
        cdef uint64_t[::1] rv
        cdef uint64_t* rp = NULL
        cdef int64_t kk, n, row, bi, res
        if not self.st.x.active:
            raise RuntimeError("transfer() before begin_transfer()")
        gfns = as_gfns(gfns)
        k, start, base_index = int(k), int(start), int(base_index)
        if not 0 <= k <= len(gfns):
            raise ValueError(f"k {k} out of range (len(gfns) = {len(gfns)})")
        if len(gfns) > k and int(gfns[k:].max()) >= self.st.npages:
            raise ValueError(f"gfn out of range in gfns (npages={self.st.npages})")
        keep = []
        if batch is not None:
            check_batch(batch)
            if not 0 <= start <= batch.num_rows:
                raise ValueError(f"start {start} out of range (batch has {batch.num_rows} rows)")
            if base_index < 0:
                raise ValueError(f"base_index must be >= 0, got {base_index}")
            _cols(&c, batch, keep)
            cp = &c
        delays = as_delays(delays, self.st.vcpus)
        if delays is not None:
            dv = delays
            dp = &dv[0]
        if ready is not None:
            rv = as_ready(ready, self.st.npages)
            rp = &rv[0]
        n = len(gfns)
        if n:
            gv = gfns
            gp = &gv[0]
        self.st.ls_fault = F_NONE
        self.st.ls_gfn = self.st.ls_vcpu = self.st.ls_row = 0
        kk, row, bi = k, start, base_index
        with nogil:
            res = transfer_pages(&self.st, s, d, gp, n, kk, cp, &row, bi, rh, dp, rp)
        if res < 0:
            _raise_row_error(&self.st, res, bi)
        return (row, res)

    def transfer_add(self, nbytes, agent_cpu_ns):
        """Traffic outside the page list (post-copy fault pages) shares the link and the agents: it moves
        the transfer clock as if sent in the current slot."""
        nbytes, agent_cpu_ns = int(nbytes), int(agent_cpu_ns)
        if not self.st.x.active:
            raise RuntimeError("transfer_add() before begin_transfer()")
        if not (0 <= nbytes < 1 << 62 and 0 <= agent_cpu_ns < 1 << 62):
            raise ValueError("transfer_add: nbytes and agent_cpu_ns must be in [0, 2**62)")
        self.st.x.bytes += nbytes
        self.st.x.agent_cpu_ns += agent_cpu_ns
        xfer_clock(&self.st)

    def deliver(self, src, dst, gfn, target_rmp=True):
        """One page src -> dst outside the transfer clock (a post-copy fault being served)."""
        cdef int s = self._host(src)
        cdef int d = self._host(dst)
        cdef int64_t g = self._gfn(gfn)
        deliver_page(&self.st, s, d, g, bool(target_rmp))

    def clear_present(self, host, gfns):
        """The host's copies of gfns are stale (hybrid switchover): they must be fetched again."""
        cdef int h = self._host(host)
        cdef const int64_t[::1] g = self._gfn_array(gfns)
        cdef Py_ssize_t i
        for i in range(g.shape[0]):
            self.st.img[h][g[i]].flags &= ~PG_PRESENT

    # ------------------------------------------------------------------ counters

    def counters(self):
        cdef int i, h
        by_host = [
            {
                "rmpupdate": self.st.n_rmpupdate[h],
                "pvalidate": self.st.n_pvalidate[h],
                "rmpadjust": self.st.n_rmpadjust[h],
                "psmash": self.st.n_psmash[h],
                "psc": self.st.n_psc[h],
            }
            for h in range(self.st.hosts)
        ]
        return {
            "rmp": {k: sum(d[k] for d in by_host) for k in by_host[0]},
            "rmp_by_host": by_host,
            "faults": {f.key: self.st.faults[int(f)] for f in FAULT_KINDS},
            "first_faults": [
                [self.st.ff[i][0], _FAULT_KEYS[self.st.ff[i][1]], self.st.ff[i][2]] for i in range(self.st.n_ff)
            ],
        }

    def reset_counters(self):
        cdef int i
        for i in range(MAX_HOSTS):
            self.st.n_rmpupdate[i] = self.st.n_pvalidate[i] = self.st.n_rmpadjust[i] = 0
            self.st.n_psmash[i] = self.st.n_psc[i] = 0
        for i in range(NFAULTS):
            self.st.faults[i] = 0
        self.st.n_ff = 0


def _c_constants():
    """The C-level constants of cext/_engine.pxd, for tests/test_engine_rules.py to compare with replay/snp.py."""
    return {
        "PAGE_SHIFT": PAGE_SHIFT, "PAGES_PER_2M": PAGES_PER_2M, "VMPLS": VMPLS, "VMSA_SPARE": VMSA_SPARE,
        "MAX_HOSTS": MAX_HOSTS,
        "PRIVATE": PG_PRIVATE, "DIRTY": PG_DIRTY, "PRESENT": PG_PRESENT,
        "Op": {"WRITE": OP_WRITE, "READ": OP_READ, "TO_SHARED": OP_TO_SHARED, "TO_PRIVATE": OP_TO_PRIVATE},
        "Perm": {"READ": PERM_READ, "WRITE": PERM_WRITE, "USER_EXEC": PERM_USER_EXEC,
                 "SUPERVISOR_EXEC": PERM_SUPERVISOR_EXEC, "ALL": PERM_ALL},
        "Rc": {"SUCCESS": RC_SUCCESS, "FAIL_INPUT": RC_FAIL_INPUT, "FAIL_PERMISSION": RC_FAIL_PERMISSION,
               "FAIL_INUSE": RC_FAIL_INUSE, "FAIL_OVERLAP": RC_FAIL_OVERLAP,
               "FAIL_SIZEMISMATCH": RC_FAIL_SIZEMISMATCH, "FAIL_NOUPDATE": RC_FAIL_NOUPDATE,
               "NESTED_PF": RC_NESTED_PF},
        "Fault": {"NONE": F_NONE, "NPF_GPA_MISMATCH": F_NPF_GPA_MISMATCH, "NPF_NOT_ASSIGNED": F_NPF_NOT_ASSIGNED,
                  "NPF_ASID": F_NPF_ASID, "NPF_IMMUTABLE": F_NPF_IMMUTABLE, "NPF_SIZE": F_NPF_SIZE,
                  "VC_NOT_VALIDATED": F_VC_NOT_VALIDATED, "NPF_VMPL": F_NPF_VMPL,
                  "NPF_SHARED_ASSIGNED": F_NPF_SHARED_ASSIGNED, "HOST_RMP_PF": F_HOST_RMP_PF,
                  "USERFAULT": F_USERFAULT},
        "sizeof": {"PageState": sizeof(PageState), "RmpEntry": sizeof(RmpEntry)},
    }
