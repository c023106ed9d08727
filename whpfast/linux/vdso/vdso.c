/*
 * The whpfast vDSO: clock_gettime, gettimeofday, time, clock_getres and getcpu answered inside
 * the guest, from the TSC and the data area the host writes (vdso_data.h), so a Linux program
 * asking for the time makes no exit (each exit costs ~25 us on PVM, ~1 us on hardware KVM).
 *
 * Built with -fPIC -nostdlib -shared and linked with vdso.lds: one read+execute PT_LOAD, no
 * relocations, no writable data, no libc. Whatever it cannot answer from the TSC (the CPU-time
 * clocks, unknown ids, a data area in syscall mode) goes to the real system call, which the host
 * serves like any other; the result (0 or -errno) is returned as the kernel's vDSO returns it.
 *
 * Linux ABI constants are spelled out here: libc's headers would declare clock_gettime & co.
 * with other types than the exported aliases below.
 */
#include <stdint.h>
#include "vdso_data.h"

#define CLOCK_REALTIME          0
#define CLOCK_MONOTONIC         1
#define CLOCK_MONOTONIC_RAW     4
#define CLOCK_REALTIME_COARSE   5
#define CLOCK_MONOTONIC_COARSE  6
#define CLOCK_BOOTTIME          7

#define NR_gettimeofday  96
#define NR_time          201
#define NR_clock_gettime 228
#define NR_clock_getres  229

#define NSEC_PER_SEC 1000000000ULL

struct kernel_timespec { int64_t tv_sec; int64_t tv_nsec; };
struct kernel_timeval  { int64_t tv_sec; int64_t tv_usec; };
struct kernel_timezone { int32_t tz_minuteswest; int32_t tz_dsttime; };

/* The data area, placed by vdso.lds right before the image; hidden, so it is reached
 * PC-relative and needs no relocation. */
extern const struct whpfast_vdso_data whpfast_vvar __attribute__((visibility("hidden")));

/* base_ns index served for each clock id 0..7; -1: not served here (PROCESS/THREAD_CPUTIME) */
static const signed char clock_base[8] = {
    [CLOCK_REALTIME] = WHPFAST_VDSO_REALTIME,        [CLOCK_MONOTONIC] = WHPFAST_VDSO_MONOTONIC,
    [2] = -1, [3] = -1,
    [CLOCK_MONOTONIC_RAW] = WHPFAST_VDSO_RAW,        [CLOCK_REALTIME_COARSE] = WHPFAST_VDSO_REALTIME,
    [CLOCK_MONOTONIC_COARSE] = WHPFAST_VDSO_MONOTONIC, [CLOCK_BOOTTIME] = WHPFAST_VDSO_BOOTTIME,
};

static inline int base_of(int clock)
{
    return (unsigned)clock < sizeof clock_base ? clock_base[clock] : -1;
}

static inline long syscall2(long nr, long a, long b)
{
    long ret;
    __asm__ volatile ("syscall" : "=a"(ret) : "0"(nr), "D"(a), "S"(b) : "rcx", "r11", "memory");
    return ret;
}

/* lfence first: rdtsc is not ordered after earlier loads, and the TSC must not be read before
 * the seqlock's first load (it would pair an old TSC with a newer generation of the data). */
static inline uint64_t rdtsc_ordered(void)
{
    uint32_t lo, hi;
    __asm__ volatile ("lfence; rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((uint64_t)hi << 32) | lo;
}

/* ticks * mult / 2^shift with the full 128-bit product: no overflow however far the TSC is
 * from tsc_base (gcc emits mul + shrd inline, no libgcc call). */
static inline uint64_t scale(uint64_t ticks, uint64_t mult, uint32_t shift)
{
    return (uint64_t)(((unsigned __int128)ticks * mult) >> shift);
}

/* The clock `base` now, in ns; 0 when the data area says to make the system call instead. */
static inline int read_ns(int base, uint64_t *ns)
{
    const volatile struct whpfast_vdso_data *d = &whpfast_vvar;
    uint64_t tsc, tsc_base, mult, base_ns;
    uint32_t seq, shift;
    int64_t delta;

    do {
        /* The host writes only while the vCPU is stopped today; the seqlock keeps this right
         * if it ever writes while a vCPU runs. x86 keeps loads in order, so volatile (which
         * keeps the compiler from reordering) is all the barrier needed. */
        while ((seq = d->seq) & 1)
            __builtin_ia32_pause();
        if (d->mode != WHPFAST_VDSO_MODE_TSC)
            return 0;
        tsc_base = d->tsc_base;
        mult = d->mult;
        shift = d->shift;
        base_ns = d->base_ns[base];
        tsc = rdtsc_ordered();
    } while (d->seq != seq);

    /* Signed: a TSC slightly before tsc_base (the host's estimate of the guest TSC was a little
     * late) gives a time slightly before base_ns, not one 2^64 ticks later. */
    delta = (int64_t)(tsc - tsc_base);
    *ns = delta >= 0 ? base_ns + scale((uint64_t)delta, mult, shift)
                     : base_ns - scale(-(uint64_t)delta, mult, shift);
    return 1;
}

int __vdso_clock_gettime(int clock, struct kernel_timespec *ts)
{
    int base = base_of(clock);
    uint64_t ns;

    if (base < 0 || !read_ns(base, &ns))
        return syscall2(NR_clock_gettime, clock, (long)ts);
    ts->tv_sec = ns / NSEC_PER_SEC;
    ts->tv_nsec = ns % NSEC_PER_SEC;
    return 0;
}

int __vdso_gettimeofday(struct kernel_timeval *tv, struct kernel_timezone *tz)
{
    uint64_t ns;

    if (!read_ns(WHPFAST_VDSO_REALTIME, &ns))
        return syscall2(NR_gettimeofday, (long)tv, (long)tz);
    if (tv) {
        tv->tv_sec = ns / NSEC_PER_SEC;
        tv->tv_usec = ns % NSEC_PER_SEC / 1000;
    }
    if (tz) {  /* the guest's kernel time zone is UTC */
        tz->tz_minuteswest = 0;
        tz->tz_dsttime = 0;
    }
    return 0;
}

int64_t __vdso_time(int64_t *t)
{
    uint64_t ns;
    int64_t s;

    if (!read_ns(WHPFAST_VDSO_REALTIME, &ns))
        return syscall2(NR_time, (long)t, 0);
    s = ns / NSEC_PER_SEC;
    if (t)
        *t = s;
    return s;
}

int __vdso_clock_getres(int clock, struct kernel_timespec *res)
{
    const volatile struct whpfast_vdso_data *d = &whpfast_vvar;
    int base = base_of(clock);

    /* In syscall mode clock_gettime is the host's, so its resolution is the host's too. */
    if (base < 0 || d->mode != WHPFAST_VDSO_MODE_TSC)
        return syscall2(NR_clock_getres, clock, (long)res);
    if (res) {
        res->tv_sec = 0;
        res->tv_nsec = clock == CLOCK_REALTIME_COARSE || clock == CLOCK_MONOTONIC_COARSE
                       ? d->coarse_res_ns : 1;
    }
    return 0;
}

/* The guest has one vCPU on one node. */
int __vdso_getcpu(unsigned *cpu, unsigned *node, void *unused)
{
    (void)unused;
    if (cpu)
        *cpu = 0;
    if (node)
        *node = 0;
    return 0;
}

/* The unprefixed names the kernel's vDSO exports too (weak aliases, as there). */
int clock_gettime(int, struct kernel_timespec *) __attribute__((weak, alias("__vdso_clock_gettime")));
int gettimeofday(struct kernel_timeval *, struct kernel_timezone *) __attribute__((weak, alias("__vdso_gettimeofday")));
int64_t time(int64_t *) __attribute__((weak, alias("__vdso_time")));
int clock_getres(int, struct kernel_timespec *) __attribute__((weak, alias("__vdso_clock_getres")));
int getcpu(unsigned *, unsigned *, void *) __attribute__((weak, alias("__vdso_getcpu")));
