#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/mman.h>
int main(int argc, char **argv) {
    int mode = atoi(argv[1]);
    char *p = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(p, 7, 1 << 20);
    if (mode == 1) { mprotect(p, 4096, PROT_NONE); printf("before\n"); fflush(stdout); return p[10]; }
    if (mode == 2) { munmap(p, 1 << 20); printf("before\n"); fflush(stdout); return p[10]; }
    if (mode == 3) { mprotect(p, 4096, PROT_READ); p[5] = 1; return 9; }
    if (mode == 4) { p[0] = 0xc3; ((void(*)(void))p)(); return 8; }
    if (mode == 5) { for (int i = 0; i < 50; i++) { munmap(p, 1 << 20); char *q = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                     if (q != p) { printf("moved\n"); } for (int j = 0; j < (1<<20); j += 4096) if (q[j]) { printf("nonzero %d\n", j); return 1; } memset(q, i+1, 1<<20); p = q; } printf("ok\n"); return 0; }
    if (mode == 6) { long n = 0; for (;;) { void *m = malloc(1 << 20); if (!m) break; memset(m, 1, 4096); n++; } printf("got %ld MiB\n", n); return 0; }
    if (mode == 7) { *(volatile int *)0 = 1; }
    if (mode == 8) { for (;;) ; }
    if (mode == 9) { abort(); }
    if (mode == 10) { char *q = mremap(p, 1 << 20, 8 << 20, MREMAP_MAYMOVE); printf("%d %d\n", q[100], q[(8<<20)-1]); return 0; }
    if (mode == 11) { __builtin_trap(); }
    if (mode == 12) { volatile int zero = 0; return 10 / zero; }
    return 0;
}
