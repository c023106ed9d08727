/*
 * The data area ("vvar") of the whpfast vDSO: DATA_PAGES pages mapped read-only into the guest
 * right BEFORE the vDSO image, written only by the host (whpfast/linux/vdso.py, write_data).
 * vdso.py packs the same layout with struct; keep the two in step (the tests check it).
 *
 * Time is a linear function of the guest's TSC:
 *     ns(clock) = base_ns[clock] + ((tsc - tsc_base) * mult) >> shift
 * with the 64x64->128-bit product (no overflow however long the VM runs). The host writes a new
 * (tsc_base, base_ns) pair whenever a VM starts or is restored, because a new VM's TSC is not
 * the old one's.
 */
#ifndef WHPFAST_VDSO_DATA_H
#define WHPFAST_VDSO_DATA_H

#include <stdint.h>

#define WHPFAST_VDSO_DATA_PAGES 1

/* mode: what the vDSO may do with the data */
#define WHPFAST_VDSO_MODE_SYSCALL 0  /* never written, or no invariant TSC: every call is a syscall */
#define WHPFAST_VDSO_MODE_TSC     1  /* clocks from the TSC */

/* Index into base_ns */
#define WHPFAST_VDSO_REALTIME  0
#define WHPFAST_VDSO_MONOTONIC 1
#define WHPFAST_VDSO_RAW       2
#define WHPFAST_VDSO_BOOTTIME  3
#define WHPFAST_VDSO_BASES     4

struct whpfast_vdso_data {
    uint32_t seq;             /*  0: seqlock, odd while the host is writing */
    uint32_t mode;            /*  4: WHPFAST_VDSO_MODE_* */
    uint64_t tsc_base;        /*  8: guest TSC at which base_ns were taken */
    uint64_t mult;            /* 16: ns per TSC tick, as a binary fraction with `shift` bits */
    uint32_t shift;           /* 24 */
    uint32_t coarse_res_ns;   /* 28: what clock_getres says for the *_COARSE clocks */
    uint64_t base_ns[WHPFAST_VDSO_BASES];  /* 32: REALTIME, MONOTONIC, MONOTONIC_RAW, BOOTTIME */
};                            /* 64 bytes */

#endif
