"""The Cython page engine (``replay.engines._engine.Engine``): the Engine API of docs/internals.md, fast.

Same semantics as the reference engine (replay/engines/reference.py), which is the readable statement of the rules;
tests/test_engine_agree.py checks the two against each other. Layout (cext/_engine.pxd): per host a uint32
version and a uint8 flags array over gfns, and the RMP held as exceptions to two canonical entries (two
bits of the flags byte say which; other entries are in a hash table keyed by SPA); the RMP instructions, the access check, the per-row replay loop and
the transfer loop are ``cdef ... noexcept nogil`` functions over raw pointers, and ``replay``/``transfer``
run them with the GIL released. Record-batch columns are taken zero-copy (Arrow data buffer + offset).
C-level error codes become Python exceptions only in ``_raise_row_error`` (and enums in the wrappers).
Compiler directives live in setup.py.
"""

import hashlib

import numpy as np

from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memset
from posix.mman cimport mmap, munmap, madvise, PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FAILED
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, UINT64_MAX

from _engine cimport *

from replay.engines.common import (
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
    check_transfer_add,
    check_transfer_limits,
    check_transfer_params,
)
from replay.core.errors import TraceError
from replay.model.snp import FAULT_KINDS, Fault, Rc

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

cdef extern from "sys/mman.h":
    enum:
        MADV_DONTNEED
        MADV_NOHUGEPAGE
        MAP_NORESERVE

cdef enum:
    PREFETCH = 8  # rows ahead whose page state and RMP entry are prefetched

cdef enum:
    DIGEST_CHUNK = 1 << 18  # versions hashed per update() in digest(): a 1 MiB buffer

cdef enum:
    RMP_KEEP = 0
    RMP_ASSIGN = 1
    RMP_RELEASE = 2

_FAULT_KEYS = {int(f): f.key for f in Fault}


# ---------------------------------------------------------------------------------------------- C core

cdef inline void count_fault(State* s, int kind, int64_t ev, int64_t gfn) noexcept nogil:
    s.faults[kind] += 1
    if s.n_ff < FIRST_FAULTS_MAX:
        s.ff[s.n_ff][0] = ev
        s.ff[s.n_ff][1] = kind
        s.ff[s.n_ff][2] = gfn
        s.n_ff += 1


# ------------------------------------------------------------------ flags bytes: stored XOR their chunk's mask
#
# A page's flags are its stored byte XOR the mask of its chunk (CHUNK gfns, one 4 KiB page of bytes). A chunk
# whose stored bytes are all equal is folded into its mask and its page handed back to the kernel
# (collapse), so a run of pages in one state costs nothing, whatever that state: launch leaves every private
# page's byte at zero, the first pass of pre-copy sets and clears the send bit chunk by chunk, a delivery
# gives the target the state the source's page had. Every write is a change (XOR of old and new flags), so
# an unchanged page's byte is never stored.

cdef inline uint8_t fget(const State* s, int host, int64_t g) noexcept nogil:
    return s.flg[host][g] ^ s.cm[host][g >> CHUNK_SHIFT]


cdef inline void fset(State* s, int host, int64_t g, uint8_t v) noexcept nogil:
    cdef uint8_t d = v ^ fget(s, host, g)
    if d:
        s.flg[host][g] ^= d


cdef void collapse(State* s, int host, int64_t c) noexcept nogil:
    """If chunk c's stored bytes are all equal, fold that value into its mask and drop its page (MADV_DONTNEED
    gives zeros back; where it fails, the bytes are zeroed in place: same flags, page kept)."""
    cdef uint8_t* p = s.flg[host] + (c << CHUNK_SHIFT)
    cdef uint8_t v = p[0]
    if memcmp(p, p + 1, CHUNK - 1) != 0:
        return
    s.cm[host][c] ^= v
    if madvise(p, CHUNK, MADV_DONTNEED) != 0:
        memset(p, 0, CHUNK)


# ------------------------------------------------------------------ the RMP: canonical entries + exceptions
#
# A guest page's own entry is held as two bits of its flags byte: PG_RMP_PRIV (the canonical private entry,
# what launch makes: assigned to the engine's asid at this gfn, 4K, mutable, validated, not a VMSA,
# perms[0] = ALL and perms[os_vmpl] = ALL), PG_RMP_EXC (anything else, in the table), or neither (the zero
# entry: unassigned, perms[0] = ALL). Every instruction reads an entry by value (rmp_get), changes the copy
# and stores it back (rmp_put), which picks the representation; so what an instruction computes never
# depends on how an entry is held.

cdef inline void zero_entry(RmpEntry* e) noexcept nogil:
    e.gfn = 0
    e.asid = 0
    e.flags = 0
    e.perms[0] = PERM_ALL
    e.perms[1] = 0
    e.perms[2] = 0
    e.perms[3] = 0
    e.pad[0] = e.pad[1] = e.pad[2] = 0


cdef inline void priv_entry(const State* s, int64_t gfn, RmpEntry* e) noexcept nogil:
    zero_entry(e)
    e.gfn = <uint32_t>gfn
    e.asid = s.asid
    e.flags = R_ASSIGNED | R_VALIDATED
    if s.os_vmpl > 0:
        e.perms[s.os_vmpl] = PERM_ALL


cdef inline bint same_entry(const RmpEntry* a, const RmpEntry* b) noexcept nogil:
    return (a.gfn == b.gfn and a.asid == b.asid and a.flags == b.flags and a.perms[0] == b.perms[0]
            and a.perms[1] == b.perms[1] and a.perms[2] == b.perms[2] and a.perms[3] == b.perms[3])


cdef inline uint64_t slot_of(int64_t spa, int64_t cap) noexcept nogil:
    cdef uint64_t h = (<uint64_t>spa) * <uint64_t>0x9E3779B97F4A7C15ULL
    return (h ^ (h >> 29)) & <uint64_t>(cap - 1)


cdef inline RmpSlot* tab_find(const RmpTable* t, int64_t spa) noexcept nogil:
    cdef uint64_t i
    if t.cap == 0:
        return NULL
    i = slot_of(spa, t.cap)
    while t.slots[i].spa != -1:
        if t.slots[i].spa == spa:
            return &t.slots[i]
        i = (i + 1) & <uint64_t>(t.cap - 1)
    return NULL


cdef int tab_grow(RmpTable* t) noexcept nogil:
    """Double the table (16 slots at first); -1 when memory runs out (the old table is kept)."""
    cdef int64_t cap = t.cap * 2 if t.cap else 16
    cdef RmpSlot* slots = <RmpSlot*>malloc(cap * sizeof(RmpSlot))
    cdef int64_t j
    cdef uint64_t i
    if slots == NULL:
        return -1
    for j in range(cap):
        slots[j].spa = -1
    for j in range(t.cap):
        if t.slots[j].spa != -1:
            i = slot_of(t.slots[j].spa, cap)
            while slots[i].spa != -1:
                i = (i + 1) & <uint64_t>(cap - 1)
            slots[i] = t.slots[j]
    free(t.slots)
    t.slots = slots
    t.cap = cap
    return 0


cdef int tab_set(RmpTable* t, int64_t spa, const RmpEntry* e) noexcept nogil:
    cdef uint64_t i
    cdef RmpSlot* p = tab_find(t, spa)
    if p != NULL:
        p.e = e[0]
        return 0
    if (t.n + 1) * 2 > t.cap and tab_grow(t) != 0 and t.n + 1 >= t.cap:
        return -1  # full and cannot grow (below that, a failed growth only raises the load)
    i = slot_of(spa, t.cap)
    while t.slots[i].spa != -1:
        i = (i + 1) & <uint64_t>(t.cap - 1)
    t.slots[i].spa = spa
    t.slots[i].e = e[0]
    t.n += 1
    return 0


cdef void tab_del(RmpTable* t, int64_t spa) noexcept nogil:
    cdef uint64_t i, j, k, mask
    cdef RmpSlot* p = tab_find(t, spa)
    if p == NULL:
        return
    mask = <uint64_t>(t.cap - 1)
    i = <uint64_t>(p - t.slots)
    j = i
    while True:  # backward-shift deletion: no tombstones, probes stay short
        j = (j + 1) & mask
        if t.slots[j].spa == -1:
            break
        k = slot_of(t.slots[j].spa, t.cap)
        # move slot j into the hole at i unless its home k lies cyclically in (i, j]
        if (i <= j and (k <= i or k > j)) or (i > j and k <= i and k > j):
            t.slots[i] = t.slots[j]
            i = j
    t.slots[i].spa = -1
    t.n -= 1


cdef inline void rmp_get(const State* s, int host, int64_t spa, RmpEntry* out) noexcept nogil:
    cdef int64_t g = spa - s.spa_base[host]
    cdef uint8_t f
    cdef const RmpSlot* p
    if 0 <= g < s.npages:
        f = fget(s, host, g)
        if f & PG_RMP_PRIV:
            priv_entry(s, g, out)
            return
        if not (f & PG_RMP_EXC):
            zero_entry(out)
            return
    p = tab_find(&s.exc[host], spa)
    if p != NULL:
        out[0] = p.e
    else:
        zero_entry(out)


cdef void rmp_put(State* s, int host, int64_t spa, const RmpEntry* e) noexcept nogil:
    cdef int64_t g = spa - s.spa_base[host]
    cdef RmpEntry c
    cdef uint8_t rs, f
    zero_entry(&c)
    if 0 <= g < s.npages:
        f = fget(s, host, g)
        if same_entry(e, &c):
            rs = 0
        else:
            priv_entry(s, g, &c)
            rs = PG_RMP_PRIV if same_entry(e, &c) else PG_RMP_EXC
        if rs == PG_RMP_EXC:
            if tab_set(&s.exc[host], spa, e) != 0:
                s.oom = 1
                return
        elif f & PG_RMP_EXC:
            tab_del(&s.exc[host], spa)
        fset(s, host, g, (f & ~PG_RMP) | rs)
    elif same_entry(e, &c):
        tab_del(&s.exc[host], spa)
    elif tab_set(&s.exc[host], spa, e) != 0:
        s.oom = 1


# ------------------------------------------------------------------ RMP instructions
#
# Each *_do works on the entry at spa loaded by the caller (``head``, changed in place; the caller stores it
# when the instruction succeeds) and reads/writes the other 511 entries of a 2M request itself. The *_c
# functions are the single instructions; make_private/make_shared chain several on one loaded entry.

cdef inline int npf_kind(const RmpEntry* e, uint32_t asid, uint32_t gfn) noexcept nogil:
    if (e.flags & R_ASSIGNED) and e.gfn != gfn:
        return F_NPF_GPA_MISMATCH
    if not (e.flags & R_ASSIGNED):
        return F_NPF_NOT_ASSIGNED
    if e.asid != asid:
        return F_NPF_ASID
    return F_NONE


cdef inline void update_entry(RmpEntry* e, bint assigned, uint32_t asid, uint32_t new_gfn, bint size_2m,
                              bint immutable) noexcept nogil:
    cdef bint changed = ((e.flags & R_ASSIGNED) != 0) != assigned or e.asid != asid or e.gfn != new_gfn \
        or ((e.flags & R_SIZE_2M) != 0) != size_2m
    cdef uint8_t keep = e.flags & (R_VALIDATED | R_VMSA)
    if changed:
        keep = 0
        e.perms[0] = PERM_ALL
        e.perms[1] = e.perms[2] = e.perms[3] = 0
    e.flags = keep | (R_ASSIGNED if assigned else 0) | (R_SIZE_2M if size_2m else 0) \
        | (R_IMMUTABLE if immutable else 0)
    e.asid = asid
    e.gfn = new_gfn


cdef int rmpupdate_do(State* s, int host, int64_t spa, RmpEntry* head, bint assigned, uint32_t asid,
                      uint32_t gfn, bint size_2m, bint immutable) noexcept nogil:
    cdef int64_t i
    cdef RmpEntry e
    s.n_rmpupdate[host] += 1
    if head.flags & R_IMMUTABLE:
        return RC_FAIL_PERMISSION
    if size_2m:
        if spa % PAGES_PER_2M or gfn % PAGES_PER_2M or spa + PAGES_PER_2M > s.rmp_size[host]:
            return RC_FAIL_INPUT
        for i in range(1, PAGES_PER_2M):
            rmp_get(s, host, spa + i, &e)
            if (e.flags & R_IMMUTABLE) != 0:
                return RC_FAIL_PERMISSION
        for i in range(1, PAGES_PER_2M):
            rmp_get(s, host, spa + i, &e)
            if (e.flags & (R_ASSIGNED | R_SIZE_2M)) == R_ASSIGNED:
                return RC_FAIL_OVERLAP
    if not assigned:
        asid = 0
        gfn = 0
    update_entry(head, assigned, asid, gfn, size_2m, immutable)
    if size_2m:
        for i in range(1, PAGES_PER_2M):
            rmp_get(s, host, spa + i, &e)
            update_entry(&e, assigned, asid, <uint32_t>(gfn + i) if assigned else 0, size_2m, immutable)
            rmp_put(s, host, spa + i, &e)
    return RC_SUCCESS


cdef int pvalidate_do(State* s, int host, int64_t spa, RmpEntry* head, uint32_t asid, uint32_t gfn, int vmpl,
                      bint validate, bint size_2m, int64_t ev) noexcept nogil:
    cdef int64_t i
    cdef int npf
    cdef RmpEntry e
    s.n_pvalidate[host] += 1
    if vmpl != 0:
        return RC_FAIL_PERMISSION
    if size_2m and (spa % PAGES_PER_2M or spa + PAGES_PER_2M > s.rmp_size[host]):
        return RC_FAIL_INPUT
    npf = npf_kind(head, asid, gfn)
    if npf != F_NONE:
        count_fault(s, npf, ev, gfn)
        return RC_NESTED_PF
    if size_2m and not (head.flags & R_SIZE_2M):
        return RC_FAIL_SIZEMISMATCH
    if ((head.flags & R_VALIDATED) != 0) == validate:
        return RC_FAIL_NOUPDATE
    head.flags = (head.flags | R_VALIDATED) if validate else (head.flags & ~R_VALIDATED)
    if size_2m:
        for i in range(spa + 1, spa + PAGES_PER_2M):
            rmp_get(s, host, i, &e)
            e.flags = (e.flags | R_VALIDATED) if validate else (e.flags & ~R_VALIDATED)
            rmp_put(s, host, i, &e)
    return RC_SUCCESS


cdef inline void adjust_entry(RmpEntry* e, int caller_vmpl, int target_vmpl, int perms, bint vmsa) noexcept nogil:
    e.perms[target_vmpl] = <uint8_t>perms
    if caller_vmpl == 0:
        e.flags = (e.flags & ~R_VMSA) | (R_VMSA if vmsa else 0)


cdef int rmpadjust_do(State* s, int host, int64_t spa, RmpEntry* head, uint32_t asid, uint32_t gfn,
                      int caller_vmpl, int target_vmpl, int perms, bint vmsa, bint size_2m, int64_t ev) noexcept nogil:
    cdef int64_t i
    cdef int npf
    cdef RmpEntry e
    s.n_rmpadjust[host] += 1
    if target_vmpl <= caller_vmpl or target_vmpl >= VMPLS:
        return RC_FAIL_PERMISSION
    if vmsa and caller_vmpl != 0:
        return RC_FAIL_PERMISSION
    if perms & ~(<int>head.perms[caller_vmpl]):
        return RC_FAIL_PERMISSION
    if size_2m and (spa % PAGES_PER_2M or spa + PAGES_PER_2M > s.rmp_size[host]):
        return RC_FAIL_INPUT
    npf = npf_kind(head, asid, gfn)
    if npf != F_NONE:
        count_fault(s, npf, ev, gfn)
        return RC_NESTED_PF
    if not (head.flags & R_VALIDATED):
        return RC_FAIL_INPUT
    if ((head.flags & R_SIZE_2M) != 0) != size_2m:
        return RC_FAIL_SIZEMISMATCH
    adjust_entry(head, caller_vmpl, target_vmpl, perms, vmsa)
    if size_2m:
        for i in range(spa + 1, spa + PAGES_PER_2M):
            rmp_get(s, host, i, &e)
            adjust_entry(&e, caller_vmpl, target_vmpl, perms, vmsa)
            rmp_put(s, host, i, &e)
    return RC_SUCCESS


cdef int rmpupdate_c(State* s, int host, int64_t spa, bint assigned, uint32_t asid, uint32_t gfn,
                     bint size_2m, bint immutable) noexcept nogil:
    cdef RmpEntry e
    cdef int rc
    rmp_get(s, host, spa, &e)
    rc = rmpupdate_do(s, host, spa, &e, assigned, asid, gfn, size_2m, immutable)
    if rc == RC_SUCCESS:
        rmp_put(s, host, spa, &e)
    return rc


cdef int pvalidate_c(State* s, int host, int64_t spa, uint32_t asid, uint32_t gfn, int vmpl, bint validate,
                     bint size_2m, int64_t ev) noexcept nogil:
    cdef RmpEntry e
    cdef int rc
    rmp_get(s, host, spa, &e)
    rc = pvalidate_do(s, host, spa, &e, asid, gfn, vmpl, validate, size_2m, ev)
    if rc == RC_SUCCESS:
        rmp_put(s, host, spa, &e)
    return rc


cdef int rmpadjust_c(State* s, int host, int64_t spa, uint32_t asid, uint32_t gfn, int caller_vmpl,
                     int target_vmpl, int perms, bint vmsa, bint size_2m, int64_t ev) noexcept nogil:
    cdef RmpEntry e
    cdef int rc
    rmp_get(s, host, spa, &e)
    rc = rmpadjust_do(s, host, spa, &e, asid, gfn, caller_vmpl, target_vmpl, perms, vmsa, size_2m, ev)
    if rc == RC_SUCCESS:
        rmp_put(s, host, spa, &e)
    return rc


cdef int psmash_c(State* s, int host, int64_t spa) noexcept nogil:
    cdef RmpEntry e
    cdef int64_t i
    s.n_psmash[host] += 1
    rmp_get(s, host, spa, &e)
    if spa % PAGES_PER_2M or not (e.flags & R_ASSIGNED) or not (e.flags & R_SIZE_2M):
        return RC_FAIL_INPUT
    for i in range(spa, spa + PAGES_PER_2M):
        rmp_get(s, host, i, &e)
        e.flags &= ~R_SIZE_2M
        rmp_put(s, host, i, &e)
    return RC_SUCCESS


cdef void make_private(State* s, int host, int64_t gfn, int64_t ev) noexcept nogil:
    make_private_f(s, host, gfn, ev, fget(s, host, gfn))


cdef void make_private_f(State* s, int host, int64_t gfn, int64_t ev, uint8_t f) noexcept nogil:
    """RMPUPDATE (assign asid, gfn, 4K), PVALIDATE(1), and RMPADJUST(VMPL0 -> os_vmpl, ALL) when os_vmpl > 0:
    a page becoming private (launch, a page-state change, delivery to the target); f: its flags now."""
    cdef int64_t spa = s.spa_base[host] + gfn
    cdef RmpEntry e
    if not (f & PG_RMP_EXC):
        # From the zero entry: the update changes it (perms reset), PVALIDATE sets validated, the adjust
        # sets perms[os_vmpl] and clears vmsa. From the canonical private entry: the update changes nothing,
        # PVALIDATE answers FAIL_NOUPDATE, the adjust rewrites what is there. No fault either way; the
        # result is the canonical private entry.
        s.n_rmpupdate[host] += 1
        s.n_pvalidate[host] += 1
        if s.os_vmpl > 0:
            s.n_rmpadjust[host] += 1
        if not (f & PG_RMP_PRIV):
            s.flg[host][gfn] ^= PG_RMP_PRIV
        return
    rmp_get(s, host, spa, &e)
    # a failing step leaves the entry as it was, so one store at the end is enough
    rmpupdate_do(s, host, spa, &e, True, s.asid, <uint32_t>gfn, False, False)
    pvalidate_do(s, host, spa, &e, s.asid, <uint32_t>gfn, 0, True, False, ev)
    if s.os_vmpl > 0:
        rmpadjust_do(s, host, spa, &e, s.asid, <uint32_t>gfn, 0, s.os_vmpl, PERM_ALL, False, False, ev)
    rmp_put(s, host, spa, &e)


cdef void make_shared(State* s, int host, int64_t gfn, int64_t ev) noexcept nogil:
    """PVALIDATE(0) then RMPUPDATE to unassigned: a private page becoming shared (page-state change,
    delivery of a shared page over an assigned target entry)."""
    cdef int64_t spa = s.spa_base[host] + gfn
    cdef uint8_t f = fget(s, host, gfn)
    cdef RmpEntry e
    if (f & PG_RMP) == PG_RMP_PRIV:
        # the canonical private entry: PVALIDATE clears validated, the update (a change) gives the zero entry
        s.n_pvalidate[host] += 1
        s.n_rmpupdate[host] += 1
        s.flg[host][gfn] ^= PG_RMP_PRIV  # the RMP bits were exactly PG_RMP_PRIV
        return
    rmp_get(s, host, spa, &e)
    pvalidate_do(s, host, spa, &e, s.asid, <uint32_t>gfn, 0, False, False, ev)
    rmpupdate_do(s, host, spa, &e, False, 0, 0, False, False)
    rmp_put(s, host, spa, &e)


# ------------------------------------------------------------------ access checks, launch, replay

cdef inline int check_entry(const RmpEntry* e, uint32_t gfn, uint32_t asid, int vmpl, int access,
                            bint private) noexcept nogil:
    if not private:
        return F_NPF_SHARED_ASSIGNED if (e.flags & R_ASSIGNED) else F_NONE
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
    cdef RmpEntry e
    rmp_get(s, host, s.spa_base[host] + gfn, &e)
    return check_entry(&e, <uint32_t>gfn, s.asid, vmpl, access, private)


cdef inline int guest_check(State* s, int host, int64_t gfn, uint8_t f, int access) noexcept nogil:
    """check_c at the guest's own VMPL for a page whose flags byte is f. The fast case: a shared page over
    the zero entry, or a private page over the canonical private entry (which grants ALL at os_vmpl)."""
    cdef uint8_t k = f & (PG_PRIVATE | PG_RMP)
    if SNP_LIKELY(k == 0 or k == (PG_PRIVATE | PG_RMP_PRIV)):
        return F_NONE
    return check_c(s, host, gfn, s.os_vmpl, access, (f & PG_PRIVATE) != 0)


cdef bint launch_chunk(State* s, int host, int64_t c) noexcept nogil:
    """Launch a whole chunk none of whose pages is shared at once, if every page's flags are 0 (a fresh
    host): each page's launch would run make_private's shortcut from the zero entry and leave the same
    flags, so the counters grow by the chunk and its mask takes the launched flags; False otherwise."""
    cdef uint8_t* p = s.flg[host] + (c << CHUNK_SHIFT)
    if p[0] != s.cm[host][c] or memcmp(p, p + 1, CHUNK - 1) != 0:
        return False
    s.cm[host][c] ^= PG_RMP_PRIV | PG_PRIVATE | PG_PRESENT
    s.n_rmpupdate[host] += CHUNK
    s.n_pvalidate[host] += CHUNK
    if s.os_vmpl > 0:
        s.n_rmpadjust[host] += CHUNK
    return True


cdef void launch_c(State* s, int host, const int64_t* ranges, int64_t nranges) noexcept nogil:
    """ranges: nranges sorted, disjoint, inclusive [first, last] pairs of shared gfns."""
    cdef int64_t gfn = 0, end, r = 0
    cdef uint32_t* ver = s.ver[host]
    cdef bint shared
    cdef RmpEntry e
    while gfn < s.npages:
        while r < nranges and ranges[2 * r + 1] < gfn:
            r += 1
        end = gfn + CHUNK
        if (gfn & (CHUNK - 1)) == 0 and end <= s.npages and not (r < nranges and ranges[2 * r] < end) \
                and launch_chunk(s, host, gfn >> CHUNK_SHIFT):
            while gfn < end:
                if ver[gfn] != 0:
                    ver[gfn] = 0
                gfn += 1
            continue
        shared = r < nranges and ranges[2 * r] <= gfn
        if shared:
            rmp_get(s, host, s.spa_base[host] + gfn, &e)
            if e.flags & R_ASSIGNED:
                rmpupdate_c(s, host, s.spa_base[host] + gfn, False, 0, 0, False, False)
            fset(s, host, gfn, (fget(s, host, gfn) & PG_RMP) | PG_PRESENT)
        else:
            make_private(s, host, gfn, -1)
            fset(s, host, gfn, (fget(s, host, gfn) & PG_RMP) | PG_PRIVATE | PG_PRESENT)
        # Stored only when it changes: a fresh host's versions are calloc's untouched zero pages, which a
        # read maps to the kernel's shared zero page and never makes resident (4 bytes a page saved).
        if ver[gfn] != 0:
            ver[gfn] = 0
        if (gfn + 1) & (CHUNK - 1) == 0:
            collapse(s, host, gfn >> CHUNK_SHIFT)  # a chunk of launched pages is one mask: its page goes back
        gfn += 1


cdef void apply_page(State* s, int host, int64_t gfn, int op, int64_t ev, uint8_t dirty) noexcept nogil:
    """One page of a row (PRESENT already checked): the per-page part of replay()."""
    cdef uint8_t f = fget(s, host, gfn)
    cdef int r
    cdef bint private = (f & PG_PRIVATE) != 0
    if op == OP_WRITE or op == OP_READ:
        r = guest_check(s, host, gfn, f, PERM_WRITE if op == OP_WRITE else PERM_READ)
        if r != F_NONE:
            count_fault(s, r, ev, gfn)
        elif op == OP_WRITE:
            s.ver[host][gfn] += 1
            s.wp_faults[host] += (dirty & ~f) >> 1
            fset(s, host, gfn, f | dirty)
    elif op == OP_TO_SHARED:
        if private:
            make_shared(s, host, gfn, ev)
            fset(s, host, gfn, (fget(s, host, gfn) & ~PG_PRIVATE) | dirty)
            s.n_psc[host] += 1
    else:
        if not private:
            make_private_f(s, host, gfn, ev, f)
            fset(s, host, gfn, fget(s, host, gfn) | PG_PRIVATE | dirty)
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
    cdef uint8_t o, fl
    cdef uint8_t dirty = PG_DIRTY if s.logging[host] else 0
    cdef uint8_t* flg = s.flg[host]
    cdef const uint8_t* cm = s.cm[host]
    cdef uint32_t* ver = s.ver[host]
    cdef int f
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
                SNP_PREFETCH(&flg[pf])
                SNP_PREFETCH(&ver[pf])
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
            fl = flg[first] ^ cm[first >> CHUNK_SHIFT]
            if not (fl & PG_PRESENT) or (ready != NULL and ready[first] > t):
                s.ls_fault = F_USERFAULT
                s.ls_gfn = first
                s.ls_vcpu = v
                s.ls_row = r
                return r
            if o == OP_WRITE:
                f = guest_check(s, host, first, fl, PERM_WRITE)  # inline: its fast case is two compares
                if SNP_LIKELY(f == F_NONE):
                    ver[first] += 1
                    if dirty:  # (without dirty logging nothing about the flags changes)
                        s.wp_faults[host] += (dirty & ~fl) >> 1
                        flg[first] ^= dirty & ~fl
                else:
                    count_fault(s, f, base_index + r, first)
            else:
                apply_page(s, host, first, o, base_index + r, dirty)
        else:
            for g in range(first, last + 1):
                if not ((flg[g] ^ cm[g >> CHUNK_SHIFT]) & PG_PRESENT) or (ready != NULL and ready[g] > t):
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


cdef inline int target_rmp_plan(State* s, int dst, int64_t gfn, bint private, uint8_t f) noexcept nogil:
    """What delivering gfn does to the target's RMP: RMP_KEEP, RMP_ASSIGN (RMPUPDATE + PVALIDATE
    [+ RMPADJUST]) or RMP_RELEASE (PVALIDATE(0) + RMPUPDATE to shared)."""
    cdef RmpEntry e
    cdef bint assigned, ours
    if f & PG_RMP_EXC:  # f: the page's flags on dst
        rmp_get(s, dst, s.spa_base[dst] + gfn, &e)
        assigned = (e.flags & R_ASSIGNED) != 0
        ours = assigned and e.asid == s.asid and e.gfn == <uint32_t>gfn
    else:
        assigned = ours = (f & PG_RMP_PRIV) != 0
    if private:
        if not ours:
            return RMP_ASSIGN
    elif assigned:
        return RMP_RELEASE
    return RMP_KEEP


cdef inline void target_rmp(State* s, int dst, int64_t gfn, int plan, uint8_t f) noexcept nogil:
    if plan == RMP_ASSIGN:
        make_private_f(s, dst, gfn, -1, f)
    elif plan == RMP_RELEASE:
        make_shared(s, dst, gfn, -1)



cdef inline uint64_t mix64(uint64_t z) noexcept nogil:
    """splitmix64's finalizer: the per-page term of the set hash (received_digest / set_digest)."""
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline void page_terms(int64_t gfn, uint32_t version, uint8_t flags, uint64_t* t) noexcept nogil:
    cdef uint64_t key = mix64(<uint64_t>gfn + <uint64_t>0x9E3779B97F4A7C15ULL)
    key ^= (<uint64_t>version << 1) | <uint64_t>((flags & PG_PRIVATE) != 0)
    t[0] = mix64(key)
    t[1] = mix64(key ^ <uint64_t>0xD1B54A32D192ED03ULL)


cdef inline void recv_add(State* s, int host, int64_t gfn, int sign) noexcept nogil:
    recv_add_f(s, host, gfn, fget(s, host, gfn), sign)


cdef inline void recv_add_f(State* s, int host, int64_t gfn, uint8_t flags, int sign) noexcept nogil:
    cdef uint64_t t[2]
    page_terms(gfn, s.ver[host][gfn], flags, t)
    if sign > 0:
        s.recv_sum[host][0] += t[0]
        s.recv_sum[host][1] += t[1]
    else:
        s.recv_sum[host][0] -= t[0]
        s.recv_sum[host][1] -= t[1]


cdef inline int64_t cpu_time(int64_t cpu, int64_t num, int64_t den) noexcept nogil:
    """Time ``cpu`` ns of work takes on num/den CPUs (rounded up). den can be large (a share of a quota in
    milli-CPUs): 128-bit arithmetic then, 64-bit in the common case (a division per page matters here)."""
    if SNP_LIKELY(den == 1):
        return ceil_div(cpu, num)
    if SNP_LIKELY(cpu < (<int64_t>1 << 40) and den < (<int64_t>1 << 22)):
        return ceil_div(cpu * den, num)
    return <int64_t>(((<snp_u128>cpu) * <snp_u128>den + <snp_u128>(num - 1)) / <snp_u128>num)


cdef inline int64_t xfer_elapsed(const Xfer* x, int64_t nbytes, int64_t src_cpu, int64_t dst_cpu,
                                 int64_t src_host, int64_t dst_host) noexcept nogil:
    """Virtual time the totals so far take: the slowest of the link, each side's agents (capacity
    num/den CPUs), each side's host migration thread (one CPU) and, where agents and host thread share a
    pool of CPUs (mirror VM), that pool."""
    cdef int64_t t, c
    t = <int64_t>(((<snp_u128>nbytes) * 1000000000 + <snp_u128>(x.bandwidth - 1)) / <snp_u128>x.bandwidth)
    c = cpu_time(src_cpu, x.src_num, x.src_den)
    if c > t:
        t = c
    c = cpu_time(dst_cpu, x.dst_num, x.dst_den)
    if c > t:
        t = c
    if src_host > t:
        t = src_host
    if dst_host > t:
        t = dst_host
    if x.src_pool > 0:
        c = ceil_div(src_cpu + src_host, x.src_pool)
        if c > t:
            t = c
    if x.dst_pool > 0:
        c = ceil_div(dst_cpu + dst_host, x.dst_pool)
        if c > t:
            t = c
    return t


cdef inline int64_t seg_elapsed(const Xfer* x, int64_t nbytes, int64_t src_cpu, int64_t dst_cpu,
                                int64_t src_host, int64_t dst_host) noexcept nogil:
    """xfer_elapsed of the totals since the current demand step began."""
    return xfer_elapsed(x, nbytes - x.b_bytes, src_cpu - x.b_agent, dst_cpu - x.b_target,
                        src_host - x.b_src_host, dst_host - x.b_dst_host)


cdef inline void shared_capacity(const Xfer* x, int64_t* num, int64_t* den) noexcept nogil:
    """Agents on the guest's own quota Q beside D busy vCPUs (milli-CPUs): fair (CFS): every runnable thread
    gets min(1, Q/(D+A)) of a CPU; agents first: min(A, Q)."""
    cdef int64_t a = 1000 * x.agents
    if x.fair:
        if x.dem + a <= x.quota:
            num[0], den[0] = x.agents, 1
        else:
            num[0], den[0] = x.agents * x.quota, x.dem + a
    else:
        num[0], den[0] = (a if a < x.quota else x.quota), 1000


cdef inline void demand_step(Xfer* x, uint64_t g) noexcept nogil:
    """Enter the demand step holding guest time g: its demand, its end, and the shared capacities."""
    while x.seg + 1 < x.nseg and x.dem_at[x.seg + 1] <= g:
        x.seg += 1
    x.dem = x.dem_mcpu[x.seg]
    x.seg_end = x.dem_at[x.seg + 1] if x.seg + 1 < x.nseg else <uint64_t>0xFFFFFFFFFFFFFFFFULL
    if x.src_shared:
        shared_capacity(x, &x.src_num, &x.src_den)
    if x.dst_shared:
        shared_capacity(x, &x.dst_num, &x.dst_den)


cdef inline void xfer_clock(State* s) noexcept nogil:
    """The clock after the totals changed outside a page (transfer_add)."""
    cdef Xfer* x = &s.x
    xfer_clock_at(s, seg_elapsed(x, x.bytes, x.agent_cpu_ns, x.target_cpu_ns, x.src_host_cpu_ns, x.dst_host_cpu_ns))


cdef inline void xfer_clock_at(State* s, int64_t elapsed) noexcept nogil:
    """v = v0 + ``elapsed``, the time the totals take; g follows v, less the guest progress lost
    meanwhile. Within one demand step D (milli-CPUs) under quota Q, agents on the guest's quota (shadow
    vCPUs, on the side where the guest runs) take from its spare CPU first: the guest loses (max(0, 1000 x
    agent CPU - (Q - D) x elapsed) + 1000 x write-protect fault time) / D of progress; an idle guest (D = 0)
    loses none."""
    cdef Xfer* x = &s.x
    cdef int64_t cand, agent = 0, direct
    cdef uint64_t wp = 0
    cdef snp_u128 spare, take, lost
    cdef int h
    x.v = x.v0 + elapsed
    for h in range(s.hosts):
        wp += s.wp_faults[h]
    direct = <int64_t>(wp - x.wp0) * x.wp_fault_ns
    if x.charge_src:
        agent += x.agent_cpu_ns - x.b_agent
    if x.charge_dst:
        agent += x.target_cpu_ns - x.b_target
    if agent == 0 and direct == 0:
        cand = x.g0 + elapsed  # nothing taken from the guest (the common mirror-VM case)
    elif x.dem > 0:
        spare = (<snp_u128>(x.quota - x.dem)) * <snp_u128>elapsed
        take = (<snp_u128>agent) * 1000
        lost = ((take - spare) if take > spare else 0) + (<snp_u128>direct) * 1000
        lost = lost / <snp_u128>x.dem
        cand = x.g0 + elapsed - <int64_t>lost if lost <= <snp_u128>elapsed else x.g0
    else:
        cand = x.g0 + elapsed
    if cand > x.g:
        x.g = cand
    if <uint64_t>x.g >= x.seg_end:  # the guest entered the next demand step: re-base there
        x.v0, x.g0, x.wp0 = x.v, x.g, wp
        x.b_bytes, x.b_agent, x.b_target = x.bytes, x.agent_cpu_ns, x.target_cpu_ns
        x.b_src_host, x.b_dst_host = x.src_host_cpu_ns, x.dst_host_cpu_ns
        demand_step(x, <uint64_t>x.g)


cdef inline void deliver_page(State* s, int src, int dst, int64_t gfn, int plan, uint8_t fd,
                              bint private) noexcept nogil:
    """The target receives gfn as the source holds it: content, attribute, its RMP state (plan) and the
    received-set hash. fd: the page's flags on dst; private: on src."""
    cdef uint8_t* df = &s.flg[dst][gfn]
    cdef uint8_t nf = (fd & ~(PG_PRIVATE | PG_DIRTY)) | PG_PRESENT | (PG_PRIVATE if private else 0)
    if fd & PG_PRESENT:
        recv_add_f(s, dst, gfn, fd, -1)
    if s.ver[dst][gfn] != s.ver[src][gfn]:  # as in launch_c: a zero page stays an untouched zero page
        s.ver[dst][gfn] = s.ver[src][gfn]
    if nf != fd:
        df[0] ^= nf ^ fd
    recv_add_f(s, dst, gfn, nf, 1)
    if plan >= 0:
        target_rmp(s, dst, gfn, plan, nf)


cdef inline void slog_add(State* s, int64_t gfn, int64_t row, uint32_t version) noexcept nogil:
    """Log a sent page and the trace row the guest had reached (rows before it applied): data mode
    replays contents in the same interleaving."""
    cdef int64_t cap
    cdef int64_t* p
    if s.slog_n == s.slog_cap:
        cap = 3 * 1024 if s.slog_cap == 0 else 2 * s.slog_cap
        p = <int64_t*>realloc(s.slog, cap * 3 * sizeof(int64_t))
        if p == NULL:
            s.slog_oom = 1
            return
        s.slog, s.slog_cap = p, cap
    s.slog[3 * s.slog_n] = gfn
    s.slog[3 * s.slog_n + 1] = row
    s.slog[3 * s.slog_n + 2] = version
    s.slog_n += 1


cdef int64_t transfer_pages(State* s, int src, int dst, const uint32_t* gfns, int64_t n, int64_t k,
                            const Cols* c, int64_t* row, int64_t base_index, int run_host,
                            const uint64_t* delays, uint64_t* ready, int64_t until_v,
                            int64_t deadline_v, int64_t walk_end) noexcept nogil:
    """Send pages src -> dst on the transfer clock while the guest replays c on run_host: gfns[k:n]; or,
    with gfns == NULL, the source's PG_SEND pages, walking cyclically from gfn k (QEMU's bitmap walk); or,
    with walk_end >= 0, the pages dst lacks among gfns [k, walk_end) (the post-copy push).
    Stops before a page once the clock reaches until_v (a burst's end); a page whose last byte would
    arrive after deadline_v (the link's death less its latency) is not sent: x.link_dead is set.
    Returns the next k (== n when done; the walk's cursor), or an ERR_* code; *row is updated.
    The walks collapse (flags chunks) each chunk they leave on both hosts, so a walk over a guest in one
    state leaves no page of flags resident. With ready, a page's time is stored only if a row still to
    come could wait for it (ready_matters)."""
    cdef int64_t lastc = -1
    cdef int64_t res
    cdef uint64_t dmin = UINT64_MAX
    cdef int64_t v
    if ready != NULL:
        if delays == NULL:
            dmin = 0
        else:
            for v in range(s.vcpus):
                if delays[v] < dmin:
                    dmin = delays[v]
    res = transfer_loop(s, src, dst, gfns, n, k, c, row, base_index, run_host, delays, ready, until_v,
                        deadline_v, walk_end, dmin, &lastc)
    if lastc >= 0:
        collapse(s, src, lastc)
        collapse(s, dst, lastc)
    return res


cdef inline bint ready_matters(const Cols* c, int64_t row, uint64_t dmin, uint64_t g) noexcept nogil:
    """Whether a row from ``row`` on could find a page not ready at guest time g: its effective time is at
    least t_ns[row] + the smallest vCPU delay (t_ns is non-decreasing, as the trace's validation requires,
    and delays only grow); a ready time at or below that bound acts as 0, the value of a page never
    stored. Without rows (c NULL: post-copy's push after the trace's last row), nothing waits."""
    cdef uint64_t lb
    if c == NULL:
        return False
    if c.n == 0:
        return True
    lb = c.t_ns[row if row < c.n else c.n - 1] + dmin
    if lb < dmin:
        return False  # saturated: nothing is later
    return g > lb


cdef int64_t transfer_loop(State* s, int src, int dst, const uint32_t* gfns, int64_t n, int64_t k,
                           const Cols* c, int64_t* row, int64_t base_index, int run_host,
                           const uint64_t* delays, uint64_t* ready, int64_t until_v,
                           int64_t deadline_v, int64_t walk_end, uint64_t dmin, int64_t* lastc) noexcept nogil:
    cdef Xfer* x = &s.x
    cdef int64_t gfn, r, nbytes, src_cpu, dst_cpu, src_host, dst_host, elapsed, npages = s.npages
    cdef int64_t n_upd, n_pval, n_adj
    cdef int plan, vmgexit, touch_src, touch_dst
    cdef uint32_t version
    cdef bint private, zero
    cdef uint8_t ps, pd
    # the hosts' flags and chunk masks (fget, without reloading them through s after every store)
    cdef uint8_t* sf = s.flg[src]
    cdef uint8_t* df = s.flg[dst]
    cdef const uint8_t* sc = s.cm[src]
    cdef const uint8_t* dc = s.cm[dst]
    cdef int64_t cur_c = lastc[0]  # the chunk the walk is in (lastc: the caller's copy, for the last one)
    x.link_dead = 0
    while True:
        if gfns != NULL:
            if k >= n:
                return k
        elif walk_end >= 0:
            while k < walk_end and ((df[k] ^ dc[k >> CHUNK_SHIFT]) & PG_PRESENT):
                k += 1
            if k >= walk_end:
                return k
        elif s.send_count[src] == 0:
            return k
        # 1. the guest runs up to the transfer clock
        if c != NULL:
            r = replay_rows(s, run_host, c, row[0], base_index, <uint64_t>x.g, delays, ready)
            if r < 0:
                return r
            row[0] = r
            if r == c.n or s.ls_fault == F_USERFAULT:
                return k
        if x.v >= until_v:
            return k
        if gfns != NULL or walk_end >= 0:
            gfn = gfns[k] if gfns != NULL else k
        else:
            while not ((sf[k] ^ sc[k >> CHUNK_SHIFT]) & PG_SEND):
                k += 1
                if k == npages:
                    k = 0
            gfn = k
        pd = df[gfn] ^ dc[gfn >> CHUNK_SHIFT]
        if x.skip_present and (pd & PG_PRESENT):
            k += 1
            continue
        # 2. what the page costs
        ps = sf[gfn] ^ sc[gfn >> CHUNK_SHIFT]
        version = s.ver[src][gfn]
        private = (ps & PG_PRIVATE) != 0
        zero = version == 0
        nbytes = x.header_bytes + (0 if zero else x.page_bytes)
        plan = target_rmp_plan(s, dst, gfn, private, pd) if x.target_rmp else -1
        n_upd = n_pval = n_adj = 0
        if plan == RMP_ASSIGN:
            n_upd = n_pval = 1
            n_adj = 1 if s.os_vmpl > 0 else 0
        elif plan == RMP_RELEASE:
            n_upd = n_pval = 1
        src_cpu = dst_cpu = src_host = dst_host = 0
        vmgexit = 0
        touch_src = touch_dst = 0
        if private:
            src_cpu = x.pack_zero_ns if zero else x.pack_private_ns
            if x.priv_in_batch + 1 == x.batch_pages:
                src_cpu += x.vmgexit_ns
                vmgexit = 1
            dst_cpu = x.unpack_private_ns
            if x.first_touch_ns > 0:
                touch_src = (ps & PG_MAPPED) == 0
                touch_dst = (pd & PG_MAPPED) == 0
                src_cpu += touch_src * x.first_touch_ns
                dst_cpu += touch_dst * x.first_touch_ns
        else:
            src_host = x.host_page_ns
            dst_host = x.host_page_ns
        dst_cpu += n_pval * x.pvalidate_ns + n_adj * x.rmpadjust_ns
        dst_host += n_upd * x.rmpupdate_ns
        # 3. the clock; nothing arrives after the link's deadline
        elapsed = seg_elapsed(x, x.bytes + nbytes, x.agent_cpu_ns + src_cpu, x.target_cpu_ns + dst_cpu,
                              x.src_host_cpu_ns + src_host, x.dst_host_cpu_ns + dst_host)
        if x.v0 + elapsed > deadline_v:
            x.link_dead = 1
            return k
        x.bytes += nbytes
        x.agent_cpu_ns += src_cpu
        x.target_cpu_ns += dst_cpu
        x.src_host_cpu_ns += src_host
        x.dst_host_cpu_ns += dst_host
        if private:
            x.priv_in_batch = 0 if vmgexit else x.priv_in_batch + 1
            x.vmgexits += vmgexit
            if touch_src:
                sf[gfn] ^= PG_MAPPED  # it was clear
            x.first_touches += touch_src + touch_dst
        xfer_clock_at(s, elapsed)  # the totals are the candidate's: its time is the clock's
        # 4. delivery; with ready, the page is usable on the target from the end of its slot
        if s.slog_on:
            slog_add(s, gfn, base_index + row[0], version)
        deliver_page(s, src, dst, gfn, plan, pd, private)
        if touch_dst:
            df[gfn] ^= PG_MAPPED  # clear before, and a delivery keeps it
        if ready != NULL and (ready[gfn] != 0 or ready_matters(c, row[0], dmin, <uint64_t>x.g)):
            ready[gfn] = <uint64_t>x.g
        x.pages += 1
        x.zero_pages += zero
        x.private_pages += private
        x.shared_pages += not private
        if gfns == NULL and walk_end < 0:
            sf[gfn] ^= PG_SEND  # set: the walk chose the page for it
            s.send_count[src] -= 1
        if gfns == NULL and (gfn >> CHUNK_SHIFT) != cur_c:
            if cur_c >= 0:  # the walk left that chunk: fold what it made uniform
                collapse(s, src, cur_c)
                collapse(s, dst, cur_c)
            cur_c = gfn >> CHUNK_SHIFT
            lastc[0] = cur_c
        k += 1
        if gfns == NULL and walk_end < 0 and k == npages:
            k = 0


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
    cdef object _dem_at  # the current transfer's demand steps (st.x points into them)
    cdef object _dem_mcpu

    def __cinit__(self):
        cdef int h
        self.st.slog = NULL
        self.st.slog_n = self.st.slog_cap = 0
        self.st.slog_on = self.st.slog_oom = 0
        for h in range(MAX_HOSTS):
            self.st.ver[h] = NULL
            self.st.flg[h] = NULL
            self.st.cm[h] = NULL
            self.st.exc[h].slots = NULL
            self.st.exc[h].cap = self.st.exc[h].n = 0
        self.st.oom = 0

    def __init__(self, npages, vcpus, *, asid=1, os_vmpl=0, hosts=2, spa_base=None):
        cdef int h
        cdef int64_t i
        cdef void* p
        npages, vcpus, asid, os_vmpl, hosts, spa_base = check_engine_args(npages, vcpus, asid, os_vmpl, hosts, spa_base)
        if self.st.ver[0] != NULL:
            raise RuntimeError("Engine.__init__ called twice")
        self.st.npages = npages
        self.st.vcpus = vcpus
        self.st.asid = asid
        self.st.os_vmpl = os_vmpl
        self.st.hosts = hosts
        self.st.nchunks = (npages + CHUNK - 1) >> CHUNK_SHIFT
        self.spa_base = spa_base
        for h in range(hosts):
            self.st.spa_base[h] = spa_base[h]
            self.st.rmp_size[h] = spa_base[h] + npages + VMSA_SPARE
            self.st.logging[h] = 0
            self.st.send_count[h] = 0
            self.st.recv_sum[h][0] = self.st.recv_sum[h][1] = 0
            # calloc: all-zero is the fresh state (version 0, no flags, every RMP entry the zero entry)
            self.st.ver[h] = <uint32_t*>calloc(npages, sizeof(uint32_t))
            # flags: whole pages of their own (collapse hands a chunk's page back), never huge pages (a
            # write would make 2 MiB resident, and khugepaged would fill collapsed chunks in again)
            p = mmap(NULL, self.st.nchunks * CHUNK, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            if p != MAP_FAILED:
                self.st.flg[h] = <uint8_t*>p
                madvise(p, self.st.nchunks * CHUNK, MADV_NOHUGEPAGE)  # advice only: a failure costs memory
            self.st.cm[h] = <uint8_t*>calloc(self.st.nchunks, sizeof(uint8_t))
            if self.st.ver[h] == NULL or self.st.flg[h] == NULL or self.st.cm[h] == NULL:
                raise MemoryError(f"engine: cannot allocate the page state of {npages} pages")
        self.st.ls_fault = F_NONE
        self.st.ls_gfn = self.st.ls_vcpu = self.st.ls_row = 0
        self.reset_counters()
        self.st.x.active = 0
        self._xfer_zero()

    def __dealloc__(self):
        cdef int h
        free(self.st.slog)
        self.st.slog = NULL
        for h in range(MAX_HOSTS):
            free(self.st.ver[h])
            if self.st.flg[h] != NULL:
                munmap(self.st.flg[h], self.st.nchunks * CHUNK)
            free(self.st.cm[h])
            free(self.st.exc[h].slots)
            self.st.ver[h] = NULL
            self.st.flg[h] = NULL
            self.st.cm[h] = NULL
            self.st.exc[h].slots = NULL

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

    cdef int _oom(self) except -1:
        if self.st.oom:
            self.st.oom = 0
            raise MemoryError("engine: cannot grow the RMP exception table")
        return 0

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
        rc = rmpupdate_c(&self.st, h, s, bool(assigned), a, g, bool(size_2m), bool(immutable))
        self._oom()
        return Rc(rc)

    def pvalidate(self, host, spa, *, asid, gfn, vmpl, validate, size_2m=False):
        cdef int h = self._host(host)
        cdef int64_t s = self._spa(h, spa)
        a, g = check_u32("asid", asid), check_u32("gfn", gfn)
        vm = check_vmpl("vmpl", vmpl)
        rc = pvalidate_c(&self.st, h, s, a, g, vm, bool(validate), bool(size_2m), -1)
        self._oom()
        return Rc(rc)

    def rmpadjust(self, host, spa, *, asid, gfn, caller_vmpl, target_vmpl, perms, vmsa=False, size_2m=False):
        cdef int h = self._host(host)
        cdef int64_t s = self._spa(h, spa)
        a, g = check_u32("asid", asid), check_u32("gfn", gfn)
        cv = check_vmpl("caller_vmpl", caller_vmpl)
        tv, p = int(target_vmpl), int(perms)
        if not 0 <= p <= PERM_ALL:
            raise ValueError(f"perms must be in [0, 15], got {p}")
        tv = max(-1, min(tv, VMPLS))  # only its comparison with caller_vmpl and VMPLS matters
        rc = rmpadjust_c(&self.st, h, s, a, g, cv, tv, p, bool(vmsa), bool(size_2m), -1)
        self._oom()
        return Rc(rc)

    def psmash(self, host, spa):
        cdef int h = self._host(host)
        cdef int64_t s = self._spa(h, spa)
        rc = psmash_c(&self.st, h, s)
        self._oom()
        return Rc(rc)

    def rmp_entry(self, host, spa):
        cdef int h = self._host(host)
        cdef int64_t s = self._spa(h, spa)
        cdef RmpEntry e
        rmp_get(&self.st, h, s, &e)
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

    def rmp_exceptions(self, host):
        """How many RMP entries of ``host`` the exception table holds (Cython engine only: how the RMP is
        stored, not what it holds; for tests and memory accounting)."""
        return self.st.exc[self._host(host)].n

    # ------------------------------------------------------------------ access checks

    def check_access(self, host, gfn, *, vmpl, access, private):
        cdef int h = self._host(host)
        cdef int64_t g = self._gfn(gfn)
        vm = check_vmpl("vmpl", vmpl)
        acc = int(access)
        if not 1 <= acc <= PERM_ALL:
            raise ValueError(f"access must be in [1, 15], got {acc}")
        return Fault(check_c(&self.st, h, g, vm, acc, bool(private)))

    def check_access_many(self, host, gfns, *, vmpl, access, private):
        """``check_access`` of each of ``gfns``, as a uint8 array of ``Fault`` values: one call for an
        agent that checks every page it holds (a Python call and a ``Fault`` per page cost ~3 us)."""
        cdef int h = self._host(host)
        cdef const int64_t[::1] g = self._gfn_array(gfns)
        cdef int vm = check_vmpl("vmpl", vmpl)
        cdef int acc = int(access)
        if not 1 <= acc <= PERM_ALL:
            raise ValueError(f"access must be in [1, 15], got {acc}")
        cdef bint priv = bool(private)
        out = np.empty(g.shape[0], np.uint8)
        cdef uint8_t[::1] o = out
        cdef Py_ssize_t i
        with nogil:
            for i in range(g.shape[0]):
                o[i] = <uint8_t>check_c(&self.st, h, g[i], vm, acc, priv)
        return out

    def host_write(self, host, spa):
        cdef int h = self._host(host)
        cdef int64_t s = self._spa(h, spa)
        cdef RmpEntry e
        rmp_get(&self.st, h, s, &e)
        if e.flags & R_ASSIGNED:
            count_fault(&self.st, F_HOST_RMP_PF, -1, e.gfn)
            return Fault.HOST_RMP_PF
        return Fault.NONE

    # ------------------------------------------------------------------ guest page state

    def launch(self, host, shared_ranges):
        cdef int h = self._host(host)
        ranges = []
        for r in shared_ranges:
            first, last = (int(x) for x in r)
            if not 0 <= first <= last < self.st.npages:
                raise ValueError(f"shared range [{first}, {last}] out of range (npages={self.st.npages})")
            ranges.append((first, last))
        merged = []  # sorted and disjoint, for one pass in C (no per-page array)
        for first, last in sorted(ranges):  # (no negative indices: this module is built without wraparound)
            if merged and first <= merged[len(merged) - 1][1] + 1:
                merged[len(merged) - 1][1] = max(merged[len(merged) - 1][1], last)
            else:
                merged.append([first, last])
        cdef const int64_t[::1] rv = np.array(merged, np.int64).reshape(-1) if merged else np.zeros(2, np.int64)
        cdef int64_t nr = len(merged)
        with nogil:
            launch_c(&self.st, h, &rv[0], nr)
        self.st.send_count[h] = 0
        self._oom()

    def page(self, host, gfn):
        cdef int h = self._host(host)
        cdef int64_t g = self._gfn(gfn)
        cdef uint8_t f = fget(&self.st, h, g)
        return PageView(self.st.ver[h][g], bool(f & PG_PRIVATE), bool(f & PG_DIRTY), bool(f & PG_PRESENT))

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
        for i in range(g.shape[0]):
            o[i] = fget(&self.st, h, g[i]) & PG_VISIBLE
        return out

    def versions(self, host, gfns):
        cdef int h = self._host(host)
        cdef const int64_t[::1] g = self._gfn_array(gfns)
        out = np.empty(g.shape[0], np.uint32)
        cdef uint32_t[::1] o = out
        cdef Py_ssize_t i
        cdef const uint32_t* ver = self.st.ver[h]
        for i in range(g.shape[0]):
            o[i] = ver[g[i]]
        return out

    def set_dirty_logging(self, host, enabled):
        self.st.logging[self._host(host)] = 1 if enabled else 0

    def collect_dirty(self, host):
        cdef int h = self._host(host)
        cdef State* s = &self.st
        cdef int64_t i, n = 0, j = 0
        with nogil:
            for i in range(s.npages):
                n += (fget(s, h, i) & PG_DIRTY) != 0
        out = np.empty(n, np.uint32)
        cdef uint32_t[::1] o = out
        with nogil:
            for i in range(s.npages):
                if fget(s, h, i) & PG_DIRTY:
                    o[j] = <uint32_t>i
                    j += 1
                    fset(s, h, i, fget(s, h, i) & ~PG_DIRTY)
        return out

    def count_present(self, host):
        cdef int h = self._host(host)
        cdef const State* s = &self.st
        cdef int64_t i, n = 0
        with nogil:
            for i in range(s.npages):
                n += (fget(s, h, i) & PG_PRESENT) != 0
        return n

    def missing_bytes(self, src, dst, page_bytes, header_bytes):
        """Bytes the pages ``dst`` lacks take on the wire as ``src`` holds them: a header each, plus a page
        unless it is a zero page (version 0)."""
        cdef int s = self._host(src)
        cdef int d = self._host(dst)
        cdef int64_t pb = int(page_bytes), hb = int(header_bytes)
        cdef const State* st = &self.st
        cdef const uint32_t* sv = self.st.ver[s]
        cdef int64_t i, n = 0, nz = 0
        with nogil:
            for i in range(st.npages):
                if not (fget(st, d, i) & PG_PRESENT):
                    n += 1
                    nz += sv[i] != 0
        return n * hb + nz * pb

    def first_touch(self, host, gfn):
        """Whether ``host``'s mirror agents had not mapped ``gfn`` yet (a first-touch NPF); maps it."""
        cdef int h = self._host(host)
        cdef int64_t g = self._gfn(gfn)
        cdef uint8_t f = fget(&self.st, h, g)
        if f & PG_MAPPED:
            return False
        fset(&self.st, h, g, f | PG_MAPPED)
        return True

    def digest(self, host):
        """blake2b-256 over the little-endian uint32 versions of all gfns, then one byte (PRIVATE bit) each."""
        cdef int h = self._host(host)
        cdef const uint32_t* ver = self.st.ver[h]
        cdef const State* s = &self.st
        cdef int64_t i, j, m, n = self.st.npages
        # hashed in chunks through one bounded buffer: no temporary the size of the guest
        buf = np.empty(DIGEST_CHUNK, "<u4")
        cdef uint32_t[::1] bv = buf
        cdef uint8_t[::1] pv = buf.view(np.uint8)
        d = hashlib.blake2b(digest_size=32)
        for i in range(0, n, DIGEST_CHUNK):
            m = min(DIGEST_CHUNK, n - i)
            with nogil:
                for j in range(m):
                    bv[j] = ver[i + j]
            d.update(buf[:m])  # "<u4": little-endian whatever the host
        for i in range(0, n, 4 * DIGEST_CHUNK):
            m = min(4 * DIGEST_CHUNK, n - i)
            with nogil:
                for j in range(m):
                    pv[j] = fget(s, h, i + j) & PG_PRIVATE
            d.update(pv[:m])
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
        self._oom()
        if r < 0:
            _raise_row_error(&self.st, r, bi)
        return r

    # ------------------------------------------------------------------ transfer

    cdef _xfer_zero(self):
        cdef Xfer* x = &self.st.x
        x.v0 = x.g0 = x.v = x.g = 0
        x.pages = x.zero_pages = x.private_pages = x.shared_pages = 0
        x.bytes = x.agent_cpu_ns = x.vmgexits = x.target_cpu_ns = x.priv_in_batch = 0
        x.src_host_cpu_ns = x.dst_host_cpu_ns = x.first_touches = 0
        x.link_dead = 0

    def begin_transfer(self, v_ns, g_ns, **params):
        p = check_transfer_params(v_ns, g_ns, params, self.st.vcpus)
        self._xfer_zero()
        cdef Xfer* xs = &self.st.x
        cdef int h
        cdef const uint64_t[::1] da
        cdef const int64_t[::1] dm
        xs.active = 1
        xs.charge_src = p["charge_guest"]
        xs.charge_dst = p["charge_target_guest"]
        xs.target_rmp = p["target_rmp"]
        xs.skip_present = p["skip_present"]
        xs.bandwidth = p["bandwidth_bytes_per_s"]
        xs.page_bytes = p["page_bytes"]
        xs.header_bytes = p["header_bytes"]
        xs.src_num, xs.src_den = p["src_cpus"]
        xs.dst_num, xs.dst_den = p["dst_cpus"]
        xs.src_pool = p["src_pool_cpus"]
        xs.dst_pool = p["dst_pool_cpus"]
        xs.pack_private_ns = p["pack_private_ns"]
        xs.pack_zero_ns = p["pack_zero_ns"]
        xs.batch_pages = p["batch_pages"]
        xs.vmgexit_ns = p["vmgexit_ns"]
        xs.unpack_private_ns = p["unpack_private_ns"]
        xs.rmpupdate_ns = p["rmpupdate_ns"]
        xs.pvalidate_ns = p["pvalidate_ns"]
        xs.rmpadjust_ns = p["rmpadjust_ns"]
        xs.first_touch_ns = p["first_touch_ns"]
        xs.host_page_ns = p["host_page_ns"]
        xs.wp_fault_ns = p["wp_fault_ns"]
        xs.v0 = xs.v = p["v_ns"]
        xs.g0 = xs.g = p["g_ns"]
        xs.wp0 = 0
        for h in range(self.st.hosts):
            xs.wp0 += self.st.wp_faults[h]
        xs.b_bytes = xs.b_agent = xs.b_target = xs.b_src_host = xs.b_dst_host = 0
        # The demand arrays live as long as the transfer (the struct holds raw pointers into them).
        self._dem_at, self._dem_mcpu = p["demand_at_ns"], p["demand_mcpu"]
        da = self._dem_at
        dm = self._dem_mcpu
        xs.dem_at, xs.dem_mcpu, xs.nseg, xs.seg = &da[0], &dm[0], da.shape[0], 0
        xs.quota = p["quota_mcpu"]
        xs.agents = p["agents"]
        xs.fair = p["fair"]
        xs.src_shared = p["src_shared"]
        xs.dst_shared = p["dst_shared"]
        demand_step(xs, <uint64_t>xs.g)

    def transfer_state(self):
        cdef Xfer* x = &self.st.x
        return dict(
            v_ns=x.v, g_ns=x.g, pages=x.pages, zero_pages=x.zero_pages, private_pages=x.private_pages,
            shared_pages=x.shared_pages, bytes=x.bytes, agent_cpu_ns=x.agent_cpu_ns, vmgexits=x.vmgexits,
            target_cpu_ns=x.target_cpu_ns, src_host_cpu_ns=x.src_host_cpu_ns, dst_host_cpu_ns=x.dst_host_cpu_ns,
            first_touches=x.first_touches, link_dead=bool(x.link_dead),
        )

    def transfer(self, src, dst, gfns, k, batch, start, base_index, run_host, delays=None, ready=None, *,
                 until_v=None, deadline_v=None, walk_end=None):
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
        cdef int64_t kk, n, row, bi, res, uv, dl, we = -1
        if not self.st.x.active:
            raise RuntimeError("transfer() before begin_transfer()")
        k, start, base_index = int(k), int(start), int(base_index)
        uv, dl = check_transfer_limits(until_v, deadline_v)
        if gfns is None:
            if s == d:
                raise ValueError("transfer: src and dst must differ")
            n = 0
            if walk_end is not None:
                we = int(walk_end)
                if not 0 <= k <= we <= self.st.npages:
                    raise ValueError(f"transfer: need 0 <= k <= walk_end <= npages, got k={k} walk_end={we}")
            elif not 0 <= k < self.st.npages:
                raise ValueError(f"k {k} out of range for the bitmap walk (npages={self.st.npages})")
        else:
            gfns = as_gfns(gfns)
            if not 0 <= k <= len(gfns):
                raise ValueError(f"k {k} out of range (len(gfns) = {len(gfns)})")
            if len(gfns) > k and int(gfns[k:].max()) >= self.st.npages:
                raise ValueError(f"gfn out of range in gfns (npages={self.st.npages})")
            n = len(gfns)
            if n:
                gv = gfns
                gp = &gv[0]
            else:
                gp = <const uint32_t*>&self.st   # non-NULL: an empty list, not the bitmap walk
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
        self.st.ls_fault = F_NONE
        self.st.ls_gfn = self.st.ls_vcpu = self.st.ls_row = 0
        kk, row, bi = k, start, base_index
        with nogil:
            res = transfer_pages(&self.st, s, d, gp, n, kk, cp, &row, bi, rh, dp, rp, uv, dl, we)
        self._oom()
        if res < 0:
            _raise_row_error(&self.st, res, bi)
        return (row, res)

    def transfer_add(self, nbytes, agent_cpu_ns, target_cpu_ns=0):
        """Traffic outside the page list (post-copy fault pages) shares the link and the agents: it moves
        the transfer clock as if sent in the current slot."""
        nbytes, agent_cpu_ns, target_cpu_ns = check_transfer_add(self.st.x.active, nbytes, agent_cpu_ns, target_cpu_ns)
        self.st.x.bytes += nbytes
        self.st.x.agent_cpu_ns += agent_cpu_ns
        self.st.x.target_cpu_ns += target_cpu_ns
        xfer_clock(&self.st)

    def set_send_log(self, enabled):
        """Log every page transfer() sends with the trace row the guest had reached (see take_send_log)."""
        self.st.slog_on = 1 if enabled else 0

    def take_send_log(self):
        """(gfns uint32, rows int64, versions uint32) of the pages sent since the last call, in order; a
        page's row is the global index of the first trace row not yet applied when it was sent."""
        cdef int64_t i, n = self.st.slog_n
        if self.st.slog_oom:
            self.st.slog_oom = 0
            self.st.slog_n = 0
            raise MemoryError("engine: send log")
        g = np.empty(n, np.uint32)
        r = np.empty(n, np.int64)
        v = np.empty(n, np.uint32)
        cdef uint32_t[::1] gv = g
        cdef int64_t[::1] rv = r
        cdef uint32_t[::1] vv = v
        for i in range(n):
            gv[i] = <uint32_t>self.st.slog[3 * i]
            rv[i] = self.st.slog[3 * i + 1]
            vv[i] = <uint32_t>self.st.slog[3 * i + 2]
        self.st.slog_n = 0
        return g, r, v

    # ------------------------------------------------------------------ the migration's send bitmap

    def mark_send_all(self, host):
        """Every page is to be sent (the bitmap at the start of pre-copy)."""
        cdef int h = self._host(host)
        cdef int64_t i
        cdef State* s = &self.st
        with nogil:
            if s.send_count[h] == 0:
                # no page has the bit: flipping it in every chunk's mask sets it on every page, no byte stored
                for i in range(s.nchunks):
                    s.cm[h][i] ^= PG_SEND
            else:
                for i in range(s.npages):
                    fset(s, h, i, fget(s, h, i) | PG_SEND)
                    if (i + 1) & (CHUNK - 1) == 0:
                        collapse(s, h, i >> CHUNK_SHIFT)
        self.st.send_count[h] = self.st.npages

    def sync_dirty(self, host):
        """Dirty-log get-and-clear into the send bitmap; returns the number of pages the log held."""
        cdef int h = self._host(host)
        cdef int64_t i, n = 0, added = 0
        cdef State* s = &self.st
        cdef uint8_t f
        with nogil:
            for i in range(s.npages):
                f = fget(s, h, i)
                if f & PG_DIRTY:
                    n += 1
                    added += (f & PG_SEND) == 0
                    fset(s, h, i, (f & ~PG_DIRTY) | PG_SEND)
        self.st.send_count[h] += added
        return n

    def send_count(self, host):
        return self.st.send_count[self._host(host)]

    def discard_stale(self, src, dst):
        """The pages still to send from src are stale on dst (hybrid switchover): dst drops them and the
        bitmap is emptied; returns how many dst held."""
        cdef int s = self._host(src)
        cdef int d = self._host(dst)
        cdef int64_t i, n = 0
        cdef State* st = &self.st
        with nogil:
            for i in range(st.npages):
                if fget(st, s, i) & PG_SEND:
                    fset(st, s, i, fget(st, s, i) & ~PG_SEND)
                    if fget(st, d, i) & PG_PRESENT:
                        recv_add(st, d, i, -1)
                        fset(st, d, i, fget(st, d, i) & ~PG_PRESENT)
                        n += 1
                if (i + 1) & (CHUNK - 1) == 0:
                    collapse(st, s, i >> CHUNK_SHIFT)
                    collapse(st, d, i >> CHUNK_SHIFT)
        self.st.send_count[s] = 0
        return n

    def wp_faults(self, host):
        """First writes to a clean page while dirty logging was on (write-protect faults), so far."""
        return self.st.wp_faults[self._host(host)]

    def received_digest(self, host):
        """Set hash of (gfn, version, private) over the pages delivered to host and still held."""
        cdef int h = self._host(host)
        return f"{self.st.recv_sum[h][0]:016x}{self.st.recv_sum[h][1]:016x}"

    def set_digest(self, host):
        """The same set hash over every page of host's image (equal to received_digest of a host that
        received exactly this memory)."""
        cdef int h = self._host(host)
        cdef uint64_t a = 0, b = 0
        cdef uint64_t t[2]
        cdef int64_t i
        cdef const uint32_t* ver = self.st.ver[h]
        cdef const State* s = &self.st
        with nogil:
            for i in range(s.npages):
                page_terms(i, ver[i], fget(s, h, i), t)
                a += t[0]
                b += t[1]
        return f"{a:016x}{b:016x}"

    def deliver(self, src, dst, gfn, target_rmp=True):
        """One page src -> dst outside the transfer clock (a post-copy fault being served)."""
        cdef int s = self._host(src)
        cdef int d = self._host(dst)
        cdef int64_t g = self._gfn(gfn)
        cdef bint private = (fget(&self.st, s, g) & PG_PRIVATE) != 0
        cdef uint8_t fd = fget(&self.st, d, g)
        deliver_page(&self.st, s, d, g, target_rmp_plan(&self.st, d, g, private, fd) if target_rmp else -1, fd,
                     private)
        self._oom()

    def clear_present(self, host, gfns):
        """The host's copies of gfns are stale (hybrid switchover): they must be fetched again."""
        cdef int h = self._host(host)
        cdef const int64_t[::1] g = self._gfn_array(gfns)
        cdef Py_ssize_t i
        for i in range(g.shape[0]):
            if fget(&self.st, h, g[i]) & PG_PRESENT:
                recv_add(&self.st, h, g[i], -1)
                fset(&self.st, h, g[i], fget(&self.st, h, g[i]) & ~PG_PRESENT)

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
        for i in range(MAX_HOSTS):
            self.st.wp_faults[i] = 0


def _c_constants():
    """The C-level constants of cext/_engine.pxd, for tests/test_engine_rules.py to compare with replay/model/snp.py."""
    return {
        "PAGE_SHIFT": PAGE_SHIFT, "PAGES_PER_2M": PAGES_PER_2M, "VMPLS": VMPLS, "VMSA_SPARE": VMSA_SPARE,
        "MAX_HOSTS": MAX_HOSTS,
        "PRIVATE": PG_PRIVATE, "DIRTY": PG_DIRTY, "PRESENT": PG_PRESENT, "SEND": PG_SEND, "MAPPED": PG_MAPPED,
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
        "sizeof": {"version": sizeof(uint32_t), "flags": sizeof(uint8_t), "RmpEntry": sizeof(RmpEntry)},
    }
