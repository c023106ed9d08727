/* A subject for file pages shared, not copied: maps the file argv[1] read-only (MAP_PRIVATE, the
 * way ld.so maps a library's code), then one command per line of stdin, each answering with
 * what it then sees there:
 *   s  only look
 *   u  munmap it and map fresh anonymous pages at the same place (they must read zero)
 *   m  map the file read-only again at the same place (MAP_FIXED)
 *   w  mprotect it writable and fill it with the byte that follows (a private copy-on-write
 *      write: the file must never change), then make it read-only again
 * The answer: "fnv H tail T": H the FNV-1a hash of the file's size bytes there, T the number of
 * non-zero bytes between the end of the file and the end of its last page (must be 0). */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) return 1;
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st)) return 2;
    long size = st.st_size, span = (size + 4095) & ~4095L;
    unsigned char *p = mmap(0, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) return 3;
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'u') {
            munmap(p, size);
            if (mmap(p, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != p) return 4;
        } else if (line[0] == 'm') {
            if (mmap(p, size, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0) != p) return 5;
        } else if (line[0] == 'w') {
            if (mprotect(p, span, PROT_READ | PROT_WRITE)) return 6;
            memset(p, line[1], size);
            if (mprotect(p, span, PROT_READ)) return 7;
        }
        unsigned long h = 0xcbf29ce484222325UL;
        for (long i = 0; i < size; i++) h = (h ^ p[i]) * 0x100000001b3UL;
        long tail = 0;
        for (long i = size; i < span; i++) tail += p[i] != 0;
        printf("fnv %016lx tail %ld\n", h, tail);
        fflush(stdout);
    }
    return 0;
}
