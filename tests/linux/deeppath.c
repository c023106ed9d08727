/* A hostile guest for the host's memory: it builds a chain of directories with 255-byte names
 * in /tmp (a path far longer than PATH_MAX, which the quota alone does not prevent), then asks
 * the host for that path again and again: mmap of a file there (a mapping is named by its path),
 * getcwd, readlink of /proc/self/fd/N, /proc/self/maps, files unlinked while an fd holds them.
 * It prints what each call answered: "key=value" lines, values are results or -errno. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>

static char name[256];
static char big[1 << 16];

static long rc(long r) { return r < 0 ? -errno : r; }

int main(int argc, char **argv) {
    int levels = argc > 1 ? atoi(argv[1]) : 4096;      /* directories in the chain */
    int rounds = argc > 2 ? atoi(argv[2]) : 100;       /* calls of each kind */
    memset(name, 'd', 255);
    if (chdir("/tmp")) return 1;
    int made = 0;
    for (; made < levels; made++) {
        if (mkdir(name, 0700) || chdir(name)) break;
    }
    printf("levels=%d\nlevels_errno=%d\n", made, made < levels ? errno : 0);
    int fd = open("f", O_CREAT | O_RDWR, 0600);
    if (fd < 0 || write(fd, big, 4096) != 4096) { printf("file=%d\n", -errno); return 2; }
    /* each mmap of that file stays mapped, at offset 0: no two mappings merge */
    long mapped = 0;
    for (int i = 0; i < rounds; i++)
        if (mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, fd, 0) != MAP_FAILED) mapped++;
    printf("mapped=%ld\n", mapped);
    long cwd = 0, link = 0, maps = 0;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    for (int i = 0; i < rounds; i++) {
        cwd = rc(syscall(SYS_getcwd, big, sizeof big));
        link = rc(readlink(path, big, sizeof big));
        if (i >= 3) continue;                          /* (its text is long: three reads) */
        int m = open("/proc/self/maps", O_RDONLY);
        long n, total = 0;
        while (m >= 0 && (n = read(m, big, sizeof big)) > 0) total += n;
        maps = m < 0 ? -errno : total;
        if (m >= 0) close(m);
    }
    printf("getcwd=%ld\nreadlink=%ld\nmaps=%ld\n", cwd, link, maps);
    /* files unlinked while an fd holds them: each keeps the path it had */
    long held = 0;
    for (int i = 0; i < rounds; i++) {
        char n2[32];
        snprintf(n2, sizeof n2, "u%d", i);
        int u = open(n2, O_CREAT | O_RDWR, 0600);
        if (u >= 0 && unlink(n2) == 0) held++;
    }
    printf("unlinked=%ld\n", held);
    /* over-long arguments */
    memset(big, 'a', 5000);
    big[5000] = 0;
    printf("open_long=%ld\n", rc(open(big, O_RDONLY)));
    big[256] = 0;
    printf("mkdir_long_name=%ld\n", rc(mkdir(big, 0700)));
    return 0;
}
