/*
 * Host-side helper of whpfast/linux/vdso.py, loaded with ctypes (not part of the guest): reads
 * the host's TSC paired with the kernel's clocks, as tightly as C allows (a Python round trip
 * between the two reads would cost a microsecond; here they are tens of ns apart).
 */
#include <stdint.h>
#include <time.h>

struct whpfast_clock_sample {
    uint64_t tsc;          /* TSC at the middle of the clock reads */
    uint64_t gap;          /* TSC ticks the clock reads took: the pairing's uncertainty */
    int64_t realtime_ns, monotonic_ns, raw_ns, boottime_ns;
};

static inline uint64_t rdtsc_ordered(void)
{
    uint32_t lo, hi;
    __asm__ volatile ("lfence; rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((uint64_t)hi << 32) | lo;
}

static int64_t now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The tightest of `tries` samples: a preemption or an interrupt between the TSC reads only
 * widens the gap, so the narrowest one is the best pairing. */
void whpfast_clock_sample(struct whpfast_clock_sample *out, int tries)
{
    struct whpfast_clock_sample s;
    uint64_t t0, t1;

    out->gap = UINT64_MAX;
    for (int i = 0; i < tries; i++) {
        t0 = rdtsc_ordered();
        s.monotonic_ns = now_ns(CLOCK_MONOTONIC);
        s.realtime_ns = now_ns(CLOCK_REALTIME);
        s.raw_ns = now_ns(CLOCK_MONOTONIC_RAW);
        s.boottime_ns = now_ns(CLOCK_BOOTTIME);
        t1 = rdtsc_ordered();
        s.tsc = t0 + (t1 - t0) / 2;
        s.gap = t1 - t0;
        if (s.gap < out->gap)
            *out = s;
    }
}
