/* A subject for snapshot files mapped copy-on-write: a mapping filled with 0xAB at start, then
 * one command per line of stdin, each answering with the number of non-zero bytes it then sees:
 *   u  munmap the mapping and map fresh anonymous pages at the same place
 *   f  map fresh anonymous pages over it with MAP_FIXED (no munmap first)
 *   d  madvise(MADV_DONTNEED) it (anonymous private pages read as zero again)
 *   p  munmap every other page and map a fresh one in its place, one page at a time
 *   wC fill it with the byte C
 *   s  only count
 * Fresh or dropped anonymous pages must read as zero, whatever the snapshot file holds there. */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#define SIZE (256 * 4096)
#define ANON (MAP_PRIVATE | MAP_ANONYMOUS)

int main(void) {
    unsigned char *p = mmap(0, SIZE, PROT_READ | PROT_WRITE, ANON, -1, 0);
    memset(p, 0xAB, SIZE);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'u') {
            munmap(p, SIZE);
            if (mmap(p, SIZE, PROT_READ | PROT_WRITE, ANON | MAP_FIXED, -1, 0) != p) return 2;
        } else if (line[0] == 'f') {
            if (mmap(p, SIZE, PROT_READ | PROT_WRITE, ANON | MAP_FIXED, -1, 0) != p) return 3;
        } else if (line[0] == 'd') {
            if (madvise(p, SIZE, MADV_DONTNEED)) return 4;
        } else if (line[0] == 'p') {
            for (long i = 0; i < SIZE; i += 2 * 4096) {
                munmap(p + i, 4096);
                if (mmap(p + i, 4096, PROT_READ | PROT_WRITE, ANON | MAP_FIXED, -1, 0) != p + i) return 5;
            }
        } else if (line[0] == 'w') {
            memset(p, line[1], SIZE);
        }
        long nonzero = 0;
        for (long i = 0; i < SIZE; i++) nonzero += p[i] != 0;
        printf("nonzero %ld\n", nonzero);
        fflush(stdout);
    }
    return 0;
}
