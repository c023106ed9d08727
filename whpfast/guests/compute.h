/*
 * The benchmark kernel, compiled both into the test guest and into a host program, so that guest
 * and native speed can be compared on the same code. Plain C with no SDK dependency.
 */
#ifndef WHPFAST_COMPUTE_H
#define WHPFAST_COMPUTE_H

#include <stdint.h>

/* n iterations of a multiply/xor-shift mix fed with the counter. Each iteration depends on the
 * previous one through x (a serial chain of ~5 cycles: no vectorization, no closed form), so the
 * time is proportional to n and the result depends on every iteration. */
static inline uint64_t wf_compute_loop(uint64_t n)
{
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (uint64_t i = 0; i < n; i++) {
        x = (x ^ i) * 0xBF58476D1CE4E5B9ull;
        x ^= x >> 31;
    }
    return x;
}

#endif
