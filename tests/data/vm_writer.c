/* A guest program for tests/test_vmrecord.py: it allocates NPAGES pages, finds their guest-physical
 * frames in /proc/self/pagemap and prints them, executes the start marker, then fills page i at guest
 * time i * PERIOD_NS after the marker (busy-waiting on CLOCK_MONOTONIC), and executes the stop marker.
 * Usage: vm_writer NPAGES PERIOD_NS */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    long n = atol(argv[1]);
    uint64_t period = strtoull(argv[2], NULL, 10);
    char *buf = mmap(NULL, n * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (buf == MAP_FAILED || mlock(buf, n * 4096) != 0)
        return 3;
    memset(buf, 1, n * 4096); /* private frames now, so the pagemap and the later writes agree */
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0)
        return 4;
    for (long i = 0; i < n; i++) {
        uint64_t e;
        if (pread(fd, &e, 8, ((uintptr_t)buf / 4096 + i) * 8) != 8 || !(e >> 63))
            return 5;
        printf("vm_writer: page %ld pfn %llu\n", i, (unsigned long long)(e & ((1ull << 55) - 1)));
    }
    fflush(stdout);
    uint64_t t0 = now_ns();
    __asm__ volatile(".byte 0x0f, 0x1f, 0x80; .long 0x31504e53" ::: "memory"); /* start marker */
    for (long i = 0; i < n; i++) {
        while (now_ns() - t0 < i * period)
            ;
        memset(buf + i * 4096, (int)(i + 2), 4096);
    }
    __asm__ volatile(".byte 0x0f, 0x1f, 0x80; .long 0x30504e53" ::: "memory"); /* stop marker */
    printf("vm_writer: done\n");
    return 0;
}
