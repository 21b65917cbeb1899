# C declarations of the Cython page engine (cext/_engine.pyx -> replay.engines._engine): the structs and the
# constants, which mirror replay/model/snp.py and replay/engines/common.py (tests/test_engine_rules.py checks that they agree).
#
# Memory layout (5 bytes per gfn per host, plus a small table): page state is two arrays per host, a uint32
# version and a uint8 flags byte per gfn. The RMP is not an array: nearly every entry of a guest page's own
# SPA is one of two entries fixed by the engine (the zero entry, or the entry launch gives a private page), so
# two bits of the page's flags byte say which (PG_RMP_PRIV) or that the entry is an exception held in a
# per-host open-addressing hash table keyed by SPA (PG_RMP_EXC). SPAs outside the guest's own range (below
# spa_base, the VMSA spares) are in the table or, when absent, the zero entry. A replayed page with a
# canonical entry touches its flags byte (and version on a write) only.
#
# How it is used: Cython looks up a module's own .pxd by the module's qualified name (replay.engines._engine ->
# replay/engines/_engine.pxd or <include dir>/replay.engines._engine.pxd), so this header, named for the cext/ source, is
# cimported explicitly by _engine.pyx (`from _engine cimport *`, found through setup.py's include_path).
# It therefore holds only types and constants (a cimported pxd's cdef functions would be imported from a
# module "_engine" at run time). The C functions of the engine, all defined in _engine.pyx, are:
#
#   int rmpupdate_c(State* s, int host, int64_t spa, bint assigned, uint32_t asid, uint32_t gfn,
#                   bint size_2m, bint immutable) noexcept nogil                       -> RC_*
#   int pvalidate_c(State* s, int host, int64_t spa, uint32_t asid, uint32_t gfn, int vmpl,
#                   bint validate, bint size_2m, int64_t ev) noexcept nogil           -> RC_*
#   int rmpadjust_c(State* s, int host, int64_t spa, uint32_t asid, uint32_t gfn, int caller_vmpl,
#                   int target_vmpl, int perms, bint vmsa, bint size_2m, int64_t ev) noexcept nogil -> RC_*
#   int psmash_c(State* s, int host, int64_t spa) noexcept nogil                      -> RC_*
#   int check_c(State* s, int host, int64_t gfn, int vmpl, int access, bint private) noexcept nogil -> F_*
#   void launch_c(State* s, int host, const int64_t* ranges, int64_t nranges) noexcept nogil
#   void rmp_get(State* s, int host, int64_t spa, RmpEntry* out) noexcept nogil   (the entry, by value)
#   void rmp_put(State* s, int host, int64_t spa, const RmpEntry* e) noexcept nogil (store; s.oom on failure)
#   void make_private(State* s, int host, int64_t gfn, int64_t ev) noexcept nogil  (RMPUPDATE+PVALIDATE[+RMPADJUST])
#   void make_shared(State* s, int host, int64_t gfn, int64_t ev) noexcept nogil   (PVALIDATE(0)+RMPUPDATE)
#   int64_t replay_rows(State* s, int host, const Cols* c, int64_t start, int64_t base_index,
#                       uint64_t stop, const uint64_t* delays) noexcept nogil   -> next row, or ERR_*
#   int64_t transfer_pages(State* s, int src, int dst, const uint32_t* gfns, int64_t n, int64_t k,
#                          const Cols* c, int64_t* row, int64_t base_index, int run_host,
#                          const uint64_t* delays) noexcept nogil                 -> next k, or ERR_*
#
# (ev: event index recorded in first_faults, -1 outside replay.)

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    PAGE_SHIFT = 12
    PAGES_PER_2M = 512
    VMPLS = 4
    VMSA_SPARE = 1024          # replay.engines.common.VMSA_SPARE
    FIRST_FAULTS_MAX = 16
    MAX_HOSTS = 64

# page-state flags (replay.engines.common PRIVATE / DIRTY / PRESENT)
cdef enum:
    PG_PRIVATE = 1
    PG_DIRTY = 2
    PG_PRESENT = 4
    PG_SEND = 8                # the migration's own "still to send" bitmap (QEMU's RAM bitmap)
    PG_MAPPED = 16             # an agent has touched the page through its own nested page table
    PG_VISIBLE = 31            # the bits above, the ones flags() shows
    PG_RMP_PRIV = 32           # the RMP entry of the page's SPA is the canonical private entry
    PG_RMP_EXC = 64            # ... is an exception, held in the host's RMP table (neither: the zero entry)
    PG_RMP = 96

# Flags chunks: a flags byte is stored XOR the mask of its chunk (CHUNK gfns, one 4 KiB page of bytes,
# cm[host][gfn >> CHUNK_SHIFT]); a chunk whose stored bytes are all equal is folded into its mask and its
# page handed back (collapse, in _engine.pyx), so pages in one state cost no resident memory, whatever the
# state.
cdef enum:
    CHUNK_SHIFT = 12
    CHUNK = 4096

# RMP entry flags
cdef enum:
    R_ASSIGNED = 1
    R_SIZE_2M = 2
    R_IMMUTABLE = 4
    R_VALIDATED = 8
    R_VMSA = 16

# snp.Op
cdef enum:
    OP_WRITE = 0
    OP_READ = 1
    OP_TO_SHARED = 2
    OP_TO_PRIVATE = 3

# snp.Perm / snp.Access
cdef enum:
    PERM_READ = 1
    PERM_WRITE = 2
    PERM_USER_EXEC = 4
    PERM_SUPERVISOR_EXEC = 8
    PERM_ALL = 15

# snp.Rc
cdef enum:
    RC_SUCCESS = 0
    RC_FAIL_INPUT = 1
    RC_FAIL_PERMISSION = 2
    RC_FAIL_INUSE = 3
    RC_FAIL_OVERLAP = 4
    RC_FAIL_SIZEMISMATCH = 6
    RC_FAIL_NOUPDATE = 255
    RC_NESTED_PF = 0x100

# snp.Fault
cdef enum:
    F_NONE = 0
    F_NPF_GPA_MISMATCH = 1
    F_NPF_NOT_ASSIGNED = 2
    F_NPF_ASID = 3
    F_NPF_IMMUTABLE = 4
    F_NPF_SIZE = 5
    F_VC_NOT_VALIDATED = 6
    F_NPF_VMPL = 7
    F_NPF_SHARED_ASSIGNED = 8
    F_HOST_RMP_PF = 9
    F_USERFAULT = 10
    NFAULTS = 11

# errors of a trace row (negative returns of replay_rows / transfer_pages); raised as TraceError in one place
cdef enum:
    ERR_VCPU = -1
    ERR_LEN = -2
    ERR_RANGE = -3
    ERR_OP = -4

ctypedef struct RmpEntry:         # 16 bytes; only exceptions are stored (RmpTable)
    uint32_t gfn
    uint32_t asid
    uint8_t flags                 # R_*
    uint8_t perms[4]              # per VMPL; perms[0] is always PERM_ALL
    uint8_t pad[3]                # always 0

ctypedef struct RmpSlot:
    int64_t spa                   # -1: empty
    RmpEntry e

ctypedef struct RmpTable:         # open addressing, linear probing, backward-shift deletion
    RmpSlot* slots
    int64_t cap                   # 0 or a power of two
    int64_t n

ctypedef struct Cols:             # zero-copy views of one record batch's columns
    const uint64_t* t_ns
    const uint16_t* vcpu
    const uint64_t* gpa
    const uint32_t* len
    const uint8_t* op
    int64_t n

ctypedef struct Xfer:             # begin_transfer parameters and the transfer clock
    int active
    int charge_src                # source agents' CPU comes out of the running guest's quota
    int charge_dst                # target agents' CPU comes out of the running guest's quota
    int target_rmp
    int skip_present
    int link_dead                 # the last transfer() stopped at the link's deadline
    int64_t bandwidth
    int64_t page_bytes
    int64_t header_bytes
    int64_t src_num               # source agents' CPU capacity: src_num / src_den CPUs
    int64_t src_den
    int64_t dst_num
    int64_t dst_den
    int64_t src_pool              # >0: source agents and the source host thread share this many CPUs
    int64_t dst_pool
    int64_t pack_private_ns
    int64_t pack_zero_ns
    int64_t batch_pages
    int64_t vmgexit_ns
    int64_t unpack_private_ns
    int64_t rmpupdate_ns
    int64_t pvalidate_ns
    int64_t rmpadjust_ns
    int64_t first_touch_ns
    int64_t host_page_ns
    int64_t wp_fault_ns
    int64_t v0
    int64_t g0
    int64_t v
    int64_t g
    int64_t pages
    int64_t zero_pages
    int64_t private_pages
    int64_t shared_pages
    int64_t bytes
    int64_t agent_cpu_ns          # source agents
    int64_t vmgexits
    int64_t target_cpu_ns         # target agents
    int64_t src_host_cpu_ns
    int64_t dst_host_cpu_ns
    int64_t first_touches
    int64_t priv_in_batch
    uint64_t wp0                  # write-protect faults counted when the demand segment began
    # The guest's CPU demand, a step function of trace time (replay.model.demand): v0/g0, wp0 and the b_*
    # totals are re-based where the guest's progress enters the next step, so that within a step the
    # clock is the closed form of one constant demand.
    int64_t b_bytes
    int64_t b_agent
    int64_t b_target
    int64_t b_src_host
    int64_t b_dst_host
    int src_shared                # source agents' capacity is a share of the guest's quota (per step)
    int dst_shared
    int fair                      # that share is CFS's fair one (else agents first)
    int64_t agents
    int64_t quota                 # the guest's CPU quota, milli-CPUs
    int64_t dem                   # demand of the current step, milli-CPUs (at most quota)
    uint64_t seg_end              # trace time where the current step ends (UINT64 max: never)
    int64_t seg
    int64_t nseg
    const uint64_t* dem_at        # step starts (dem_at[0] == 0), increasing
    const int64_t* dem_mcpu       # each step's demand, milli-CPUs, already capped at quota

ctypedef struct State:
    int64_t npages
    int64_t vcpus
    uint32_t asid
    int os_vmpl
    int hosts
    uint32_t* ver[MAX_HOSTS]              # per gfn
    uint8_t* flg[MAX_HOSTS]               # per gfn: PG_* XOR the chunk's mask (an mmap of nchunks pages)
    uint8_t* cm[MAX_HOSTS]                # per chunk of CHUNK gfns: the mask its stored bytes are XORed with
    int64_t nchunks
    RmpTable exc[MAX_HOSTS]               # RMP entries other than the canonical ones
    int oom                               # the RMP table could not grow (raised as MemoryError)
    int64_t spa_base[MAX_HOSTS]
    int64_t rmp_size[MAX_HOSTS]
    uint8_t logging[MAX_HOSTS]
    int64_t send_count[MAX_HOSTS]          # pages with PG_SEND
    uint64_t wp_faults[MAX_HOSTS]          # first writes to a clean page while dirty logging is on
    uint64_t recv_sum[MAX_HOSTS][2]        # set hash of the pages delivered to each host (received_digest)
    uint64_t n_rmpupdate[MAX_HOSTS]        # per host
    uint64_t n_pvalidate[MAX_HOSTS]
    uint64_t n_rmpadjust[MAX_HOSTS]
    uint64_t n_psmash[MAX_HOSTS]
    uint64_t n_psc[MAX_HOSTS]
    uint64_t faults[NFAULTS]
    int64_t ff[FIRST_FAULTS_MAX][3]   # first faults: event index (-1 outside replay), kind, gfn
    int n_ff
    int ls_fault                      # last_stop
    int64_t ls_gfn
    int64_t ls_vcpu
    int64_t ls_row
    int64_t err_row                   # row and offending value of the last row error
    int64_t err_val
    Xfer x
    int64_t* slog                     # send log: (gfn, global row, version) of each page transfer() sent
    int64_t slog_n                    # triples logged
    int64_t slog_cap
    int slog_on
    int slog_oom
