/*
 * snp_record: a QEMU TCG plugin that streams every guest-physical store of a whole VM to a file
 * descriptor, for `replay record --vm` (replay/vmrecord.py reads the stream and writes the trace).
 *
 * QEMU ships no plugin header on Debian, so the small part of the plugin API (version 1, QEMU 7.2)
 * used here is declared below by hand.
 *
 * Records: 24 bytes, little endian: u64 t (guest ns), u64 addr, u32 info (kind | size << 8), u32 vcpu.
 *   kind 0 STORE   addr = guest-physical address, size = bytes. Consecutive stores of one vCPU within
 *                  COALESCE_NS of guest time that extend or repeat the bytes of the pending record, in one
 *                  4 KiB page, are coalesced into it (`rep stos` clearing a page is 512..4096 stores, a
 *                  run of pushes is a descending run): one record, at the first store's time
 *   kind 1 HALT    the vCPU executed HLT at t
 *   kind 2 RESUME  the halted vCPU ran again at t (its idle interval is [HALT t, RESUME t))
 *   kind 3 START   the guest executed the start marker (recording of stores begins)
 *   kind 4 STOP    the guest executed the stop marker (recording of stores ends)
 *   kind 5 IO      a store to MMIO (addr = its physical address; not a RAM write)
 *   kind 6 NOADDR  a store whose physical address QEMU could not give
 *
 * Time. With `-icount shift=N,sleep=off` QEMU's virtual clock is (instructions << N) + bias, where the
 * bias is the virtual time skipped while every vCPU was halted. The plugin counts instructions itself
 * (one inline add per instruction, exact because icount runs all vCPUs on one thread); the 7.2 API has
 * no way to read the bias, but QEMU exports its `timers_state` symbol, so when the recorder passes the
 * bias' offset (`bias=OFF`, checked against the shift stored beside it) the plugin reads it after every
 * HLT. Without it (`bias=-1`) time is instructions << shift and idle time is dropped.
 *
 * Markers: a guest program starts/stops recording by executing `nopl MAGIC(%rax)` (0f 1f 80 + imm32)
 * with MAGIC "SNP1" (start) or "SNP0" (stop); the instruction is a no-op for the CPU and is spotted at
 * translation, so the start is a deterministic point in the guest's execution.
 *
 * Arguments: fd=N (where records go), shift=N, bias=OFF|-1, shiftoff=OFF, start=boot (default: marker).
 */
#include <dlfcn.h>
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- the QEMU 7.2 plugin API (include/qemu/qemu-plugin.h, QEMU_PLUGIN_VERSION 1) ---- */
typedef uint64_t qemu_plugin_id_t;
typedef uint32_t qemu_plugin_meminfo_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
struct qemu_plugin_hwaddr;
typedef struct {
    const char *target_name;
    struct { int min; int cur; } version;
    bool system_emulation;
    union { struct { int smp_vcpus; int max_vcpus; } system; };
} qemu_info_t;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
enum qemu_plugin_mem_rw { QEMU_PLUGIN_MEM_R = 1, QEMU_PLUGIN_MEM_W, QEMU_PLUGIN_MEM_RW };
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*exec_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*mem_cb_t)(unsigned int vcpu_index, qemu_plugin_meminfo_t info, uint64_t vaddr, void *userdata);

extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id,
                                                  void (*cb)(qemu_plugin_id_t, struct qemu_plugin_tb *));
extern void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, exec_cb_t cb,
                                                 enum qemu_plugin_cb_flags flags, void *userdata);
extern void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn, exec_cb_t cb,
                                                   enum qemu_plugin_cb_flags flags, void *userdata);
extern void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn, enum qemu_plugin_op op,
                                                       void *ptr, uint64_t imm);
extern void qemu_plugin_register_vcpu_mem_cb(struct qemu_plugin_insn *insn, mem_cb_t cb,
                                             enum qemu_plugin_cb_flags flags, enum qemu_plugin_mem_rw rw,
                                             void *userdata);
extern void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, void (*cb)(qemu_plugin_id_t, void *),
                                           void *userdata);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
extern const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *insn);
extern size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
extern unsigned int qemu_plugin_mem_size_shift(qemu_plugin_meminfo_t info);
extern struct qemu_plugin_hwaddr *qemu_plugin_get_hwaddr(qemu_plugin_meminfo_t info, uint64_t vaddr);
extern bool qemu_plugin_hwaddr_is_io(const struct qemu_plugin_hwaddr *haddr);
extern uint64_t qemu_plugin_hwaddr_phys_addr(const struct qemu_plugin_hwaddr *haddr);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

/* ---- state ---- */
enum { K_STORE, K_HALT, K_RESUME, K_START, K_STOP, K_IO, K_NOADDR };
#define MAGIC_START 0x31504e53u /* "SNP1" */
#define MAGIC_STOP 0x30504e53u  /* "SNP0" */
#define MAX_VCPUS 256
#define PAGE_MASK (~(uint64_t)4095)
/* Stores are coalesced only within this much guest time of the first one, so a row is never more than
 * ~1 us earlier than the last store it stands for. */
#define COALESCE_NS 1024

struct rec { uint64_t t, addr; uint32_t info, vcpu; };

static int out_fd = -1;
static unsigned shift;
static volatile const int64_t *bias_ptr; /* NULL: no bias (idle time dropped) */
static bool recording;
static uint64_t insns; /* executed instructions, all vCPUs (one TCG thread) */
static int64_t bias_seen;
static bool halted[MAX_VCPUS];
static unsigned n_halted;

static struct rec buf[2730]; /* 64 KiB of records */
static size_t nbuf;
static struct rec pend; /* a store being coalesced */
static bool have_pend;

static void flush_buf(void)
{
    const char *p = (const char *)buf;
    size_t left = nbuf * sizeof(struct rec);
    while (left) {
        ssize_t n = write(out_fd, p, left);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            /* The recorder went away (it stopped at a limit or was interrupted): nothing to keep. */
            _exit(0);
        }
        p += n;
        left -= (size_t)n;
    }
    nbuf = 0;
}

static inline void put(uint64_t t, uint64_t addr, uint32_t info, uint32_t vcpu)
{
    struct rec *r = &buf[nbuf++];
    r->t = t; r->addr = addr; r->info = info; r->vcpu = vcpu;
    if (nbuf == sizeof(buf) / sizeof(buf[0]))
        flush_buf();
}

static inline void put_pending(void)
{
    if (have_pend) {
        put(pend.t, pend.addr, pend.info, pend.vcpu);
        have_pend = false;
    }
}

static inline uint64_t now(void)
{
    return (insns << shift) + (uint64_t)bias_seen;
}

static void resume(unsigned vcpu)
{
    if (bias_ptr)
        bias_seen = *bias_ptr;
    halted[vcpu] = false;
    n_halted--;
    put_pending();
    put(now(), 0, K_RESUME, vcpu);
}

static void on_tb(unsigned vcpu, void *ud)
{
    (void)ud;
    if (n_halted && vcpu < MAX_VCPUS && halted[vcpu])
        resume(vcpu);
}

static void on_hlt(unsigned vcpu, void *ud)
{
    (void)ud;
    if (vcpu >= MAX_VCPUS || halted[vcpu])
        return;
    put_pending();
    put(now(), 0, K_HALT, vcpu);
    halted[vcpu] = true;
    n_halted++;
}

static void on_marker(unsigned vcpu, void *ud)
{
    bool start = (uintptr_t)ud == MAGIC_START;
    put_pending();
    put(now(), 0, start ? K_START : K_STOP, vcpu);
    recording = start;
}

static void on_store(unsigned vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr, void *ud)
{
    (void)ud;
    if (n_halted && vcpu < MAX_VCPUS && halted[vcpu])
        resume(vcpu);
    if (!recording)
        return;
    struct qemu_plugin_hwaddr *hw = qemu_plugin_get_hwaddr(info, vaddr);
    uint32_t size = 1u << qemu_plugin_mem_size_shift(info);
    if (!hw) {
        put_pending();
        put(now(), vaddr, K_NOADDR | size << 8, vcpu);
        return;
    }
    if (qemu_plugin_hwaddr_is_io(hw)) {
        put_pending();
        put(now(), qemu_plugin_hwaddr_phys_addr(hw), K_IO | size << 8, vcpu);
        return;
    }
    uint64_t pa = qemu_plugin_hwaddr_phys_addr(hw), t = now();
    if (have_pend && pend.vcpu == vcpu && t - pend.t < COALESCE_NS &&
        (pa & PAGE_MASK) == (pend.addr & PAGE_MASK) && ((pa + size - 1) & PAGE_MASK) == (pa & PAGE_MASK)) {
        uint64_t lo = pend.addr, hi = pend.addr + (pend.info >> 8);
        if (pa >= lo && pa + size <= hi)
            return; /* inside the pending range: the same bytes again */
        if (pa == hi || pa + size == lo) { /* adjacent: `rep stos`, a run of pushes */
            if (pa < lo)
                pend.addr = pa;
            pend.info += size << 8;
            return;
        }
    }
    put_pending();
    pend.t = t; pend.addr = pa; pend.info = K_STORE | size << 8; pend.vcpu = vcpu;
    have_pend = true;
}

static void on_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_tb, QEMU_PLUGIN_CB_NO_REGS, NULL);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        const uint8_t *d = qemu_plugin_insn_data(insn);
        size_t len = qemu_plugin_insn_size(insn);
        qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64, &insns, 1);
        if (len == 1 && d[0] == 0xf4) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_hlt, QEMU_PLUGIN_CB_NO_REGS, NULL);
        } else if (len == 7 && d[0] == 0x0f && d[1] == 0x1f && d[2] == 0x80) {
            uint32_t imm;
            memcpy(&imm, d + 3, 4);
            if (imm == MAGIC_START || imm == MAGIC_STOP)
                qemu_plugin_register_vcpu_insn_exec_cb(insn, on_marker, QEMU_PLUGIN_CB_NO_REGS,
                                                       (void *)(uintptr_t)imm);
        }
        qemu_plugin_register_vcpu_mem_cb(insn, on_store, QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_MEM_W, NULL);
    }
}

static void on_atexit(qemu_plugin_id_t id, void *ud)
{
    (void)id; (void)ud;
    put_pending();
    flush_buf();
}

static long arg_long(const char *a, const char *key, long dflt)
{
    size_t k = strlen(key);
    if (strncmp(a, key, k) == 0 && a[k] == '=')
        return strtol(a + k + 1, NULL, 0);
    return dflt;
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                                               int argc, char **argv)
{
    long bias_off = -1, shift_off = -1;
    recording = false;
    for (int i = 0; i < argc; i++) {
        out_fd = (int)arg_long(argv[i], "fd", out_fd);
        shift = (unsigned)arg_long(argv[i], "shift", shift);
        bias_off = arg_long(argv[i], "bias", bias_off);
        shift_off = arg_long(argv[i], "shiftoff", shift_off);
        if (strcmp(argv[i], "start=boot") == 0)
            recording = true;
    }
    if (out_fd < 0 || !info->system_emulation) {
        fprintf(stderr, "snp_record: needs fd=N and system emulation\n");
        return -1;
    }
    if (info->system.max_vcpus > MAX_VCPUS) {
        fprintf(stderr, "snp_record: at most %d vCPUs\n", MAX_VCPUS);
        return -1;
    }
    if (bias_off >= 0) {
        /* Only trust the offset when the shift stored beside the bias is the one QEMU was given. */
        const char *ts = dlsym(RTLD_DEFAULT, "timers_state");
        if (!ts || shift_off < 0 || *(const int16_t *)(ts + shift_off) != (int16_t)shift) {
            fprintf(stderr, "snp_record: cannot find QEMU's icount bias (timers_state)\n");
            return -1;
        }
        bias_ptr = (volatile const int64_t *)(ts + bias_off);
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_trans);
    qemu_plugin_register_atexit_cb(id, on_atexit, NULL);
    return 0;
}
