/* A warm-start subject for the address space: a mapping filled with a pattern at start, then one
 * command per line of stdin:
 *   u  munmap the mapping and map fresh zero pages at the same place, filled with another byte
 *   n  mprotect the mapping PROT_NONE
 *   m  map a new page, write to it, print its address
 *   t ADDR  touch (read) ADDR
 *   r  print the first byte of each page of the mapping (summed)
 *   l  loop forever
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define SIZE (64 * 4096)

int main(void) {
    unsigned char *p = mmap(0, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(p, 7, SIZE);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'u') {
            munmap(p, SIZE);
            unsigned char *q = mmap(p, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            memset(q, 9, SIZE);
            printf("remapped\n");
        } else if (line[0] == 'n') {
            mprotect(p, SIZE, PROT_NONE);
            printf("protected\n");
        } else if (line[0] == 'm') {
            char *q = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            q[0] = 1;
            printf("%p\n", (void *)q);
        } else if (line[0] == 't') {
            volatile char *q = (char *)strtoull(line + 2, 0, 16);
            printf("read %d\n", *q);
        } else if (line[0] == 'l') {
            for (volatile int spin = 0;; spin++)
                ;
        } else if (line[0] == 'r') {
            long sum = 0;
            for (int i = 0; i < SIZE; i += 4096) sum += p[i];
            printf("sum %ld\n", sum);
        }
        fflush(stdout);
    }
    return 0;
}
