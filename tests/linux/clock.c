/* Reads the clocks many times: with the vDSO mapped, none of these calls leaves the guest. */
#include <stdio.h>
#include <sys/time.h>
#include <time.h>

int main(void) {
    struct timespec a, b, r;
    struct timeval tv;
    long backwards = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < 1000; i++) {
        clock_gettime(CLOCK_MONOTONIC, &b);
        if (b.tv_sec < a.tv_sec || (b.tv_sec == a.tv_sec && b.tv_nsec < a.tv_nsec))
            backwards++;
        a = b;
        clock_gettime(CLOCK_REALTIME, &r);
        gettimeofday(&tv, 0);
        (void)time(0);
    }
    printf("backwards=%ld realtime=%ld tv=%ld\n", backwards, (long)r.tv_sec, (long)tv.tv_sec);
    return 0;
}
