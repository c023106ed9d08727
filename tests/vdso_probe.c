/* A whpfast SDK guest that runs the Linux personality's vDSO in a real VM at CPL3 (used by
 * tests/test_linux_vdso.py and bench/bench_vdso.py). Built with -DAREA_PATH="<file>" (the data
 * area, written by the host, followed by IMAGE) and -DDATA_SIZE=<bytes of data area>; the
 * exports take the offsets of the vDSO's symbols in IMAGE. */
#include "whpfast_guest.h"

/* [data area][vDSO image], page aligned, in the guest's text segment: the image runs where it
 * lies and reaches its data PC-relative, as in a Linux guest (the host wrote the data area). */
__asm__(".section .text.vdso_area,\"ax\",@progbits\n"
        ".balign 4096\n"
        "vdso_area:\n"
        ".incbin \"" AREA_PATH "\"\n"
        ".previous\n");
extern const unsigned char vdso_area[];

struct ts { int64_t sec, nsec; };
struct tv { int64_t sec, usec; };

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile ("lfence; rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((uint64_t)hi << 32) | lo;
}

static const void *sym(int64_t offset) { return vdso_area + DATA_SIZE + offset; }

static struct { uint64_t t0, t1; int64_t rc, sec, nsec; } one;

/* clock_gettime(clock) between two reads of the guest's TSC */
WF_EXPORT(clock, "ii", 'b')
{
    int (*clock_gettime)(int, struct ts *) = sym(args[0].i);
    struct ts ts = { -1, -1 };
    one.t0 = rdtsc();
    one.rc = clock_gettime((int)args[1].i, &ts);
    one.t1 = rdtsc();
    one.sec = ts.sec;
    one.nsec = ts.nsec;
    return wf_ok(ret, wf_bytes(&one, sizeof one));
}

/* n calls of clock_gettime(clock): how often time went backwards */
WF_EXPORT(backwards, "iii", 'i')
{
    int (*clock_gettime)(int, struct ts *) = sym(args[0].i);
    struct ts ts;
    int64_t last = 0, now, count = 0;
    for (int64_t i = 0; i < args[2].i; i++) {
        if (clock_gettime((int)args[1].i, &ts) != 0)
            return wf_error(ret, "clock_gettime failed");
        now = ts.sec * 1000000000 + ts.nsec;
        count += now < last;
        last = now;
    }
    return wf_ok(ret, wf_int(count));
}

static struct { uint64_t t0, t1; int64_t rc, sec, usec, time, rc_cpu; uint32_t cpu, node; } rest;

/* gettimeofday, time, getcpu */
WF_EXPORT(others, "iii", 'b')
{
    int (*gettimeofday)(struct tv *, void *) = sym(args[0].i);
    int64_t (*time)(int64_t *) = sym(args[1].i);
    int (*getcpu)(uint32_t *, uint32_t *, void *) = sym(args[2].i);
    struct tv tv = { -1, -1 };
    rest.cpu = rest.node = 77;
    rest.t0 = rdtsc();
    rest.rc = gettimeofday(&tv, 0);
    rest.time = time(0);
    rest.t1 = rdtsc();
    rest.rc_cpu = getcpu(&rest.cpu, &rest.node, 0);
    rest.sec = tv.sec;
    rest.usec = tv.usec;
    return wf_ok(ret, wf_bytes(&rest, sizeof rest));
}

WF_EXPORT(tsc, "", 'i') { return wf_ok(ret, wf_int((int64_t)rdtsc())); }
