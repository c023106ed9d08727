/* Hands the host bad buffers on the calls the C fast paths serve (whpfast/_linux.pyx: the checked
 * copies every call with a pointer makes): NULL, the kernel area, unmapped pages, a PROT_NONE
 * guard, read-only pages, ranges that run into the guard or wrap around 2^64, huge lengths, a
 * path with no NUL. Prints one line per call: its name and the raw result (-errno on failure).
 * argv[1]: a readable file. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static long raw(long nr, long a, long b, long c, long d) {
    long r;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(r) : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return r;
}

#define SHOW(name, call) printf("%s %ld\n", name, (long)(call))
#define P(x) ((long)(uintptr_t)(x))

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);       /* printed at exit: output is not a syscall path here */
    char *rw = mmap(0, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mprotect(rw + 4096, 4096, PROT_NONE);          /* rw: page 0 writable, page 1 a guard, 2-3 writable */
    char *ro = mmap(0, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *gone = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(gone, 4096);
    int fd = (int)raw(SYS_openat, AT_FDCWD, P(argv[1]), O_RDONLY, 0);
    SHOW("open", fd >= 0 ? 0 : fd);

    /* read into: fine, NULL, kernel area, unmapped, guard, read-only, across into the guard,
       wrapping, huge length */
    SHOW("read ok", raw(SYS_pread64, fd, P(rw), 16, 0));
    SHOW("read null", raw(SYS_pread64, fd, 0, 16, 0));
    SHOW("read kernel", raw(SYS_pread64, fd, 0x2000, 16, 0));
    SHOW("read unmapped", raw(SYS_pread64, fd, P(gone), 16, 0));
    SHOW("read guard", raw(SYS_pread64, fd, P(rw + 4096), 16, 0));
    SHOW("read readonly", raw(SYS_pread64, fd, P(ro), 16, 0));
    SHOW("read into guard", raw(SYS_pread64, fd, P(rw + 4096 - 8), 16, 0));
    SHOW("read wraps", raw(SYS_pread64, fd, -4096, 8192, 0));
    SHOW("read huge", raw(SYS_pread64, fd, P(rw), -1, 0));
    SHOW("read top", raw(SYS_read, fd, P(rw + 2 * 4096), 2 * 4096, 0) >= 0);

    /* write from: read-only is fine (readable), the guard is not, nor a wrapping range */
    int null = (int)raw(SYS_openat, AT_FDCWD, P("/dev/null"), O_WRONLY, 0);
    SHOW("write readonly", raw(SYS_write, null, P(ro), 5, 0));
    SHOW("write guard", raw(SYS_write, null, P(rw + 4096), 1, 0));
    SHOW("write wraps", raw(SYS_write, null, -16, 32, 0));
    SHOW("write kernel", raw(SYS_write, null, 0x10000 - 8, 16, 0));

    /* struct results written by the host */
    SHOW("fstat ok", raw(SYS_fstat, fd, P(rw + 2 * 4096), 0, 0));
    SHOW("fstat readonly", raw(SYS_fstat, fd, P(ro), 0, 0));
    SHOW("fstat into guard", raw(SYS_fstat, fd, P(rw + 4096 - 100), 0, 0));
    SHOW("clock_gettime readonly", raw(SYS_clock_gettime, CLOCK_MONOTONIC, P(ro), 0, 0));
    SHOW("getcwd readonly", raw(SYS_getcwd, P(ro), 100, 0, 0));
    SHOW("getrandom guard", raw(SYS_getrandom, P(rw + 4096), 8, 0, 0));
    SHOW("uname unmapped", raw(SYS_uname, P(gone), 0, 0, 0));

    /* paths (NUL-terminated strings read by the host) */
    strcpy(rw + 2 * 4096, argv[1]);
    SHOW("stat ok", raw(SYS_newfstatat, AT_FDCWD, P(rw + 2 * 4096), P(rw + 3 * 4096), 0));
    SHOW("stat path null", raw(SYS_newfstatat, AT_FDCWD, 0, P(rw + 3 * 4096), 0));
    SHOW("stat path kernel", raw(SYS_newfstatat, AT_FDCWD, 0x3000, P(rw + 3 * 4096), 0));
    memcpy(rw + 4096 - 3, "/et", 3);              /* no NUL before the guard */
    SHOW("stat path into guard", raw(SYS_newfstatat, AT_FDCWD, P(rw + 4096 - 3), P(rw + 3 * 4096), 0));
    memset(rw + 2 * 4096, 'a', 2 * 4096);         /* no NUL in 8 KiB */
    SHOW("stat path too long", raw(SYS_newfstatat, AT_FDCWD, P(rw + 2 * 4096), P(rw + 3 * 4096), 0));
    rw[4 * 4096 - 1] = 0;
    SHOW("open path long", raw(SYS_openat, AT_FDCWD, P(rw + 3 * 4096 + 100), O_RDONLY, 0));
    SHOW("open path wraps", raw(SYS_openat, AT_FDCWD, -2, O_RDONLY, 0));

    /* iovecs: the array itself bad, an entry bad, a length with the top bit, too many */
    struct iovec *iov = (struct iovec *)(rw + 2 * 4096);
    iov[0].iov_base = rw; iov[0].iov_len = 8;
    iov[1].iov_base = rw + 4096; iov[1].iov_len = 8;
    SHOW("readv array in guard", raw(SYS_readv, fd, P(rw + 4096), 1, 0));
    SHOW("readv entry in guard", raw(SYS_readv, fd, P(iov), 2, 0));
    SHOW("writev entry in guard", raw(SYS_writev, null, P(iov), 2, 0));
    iov[1].iov_base = ro; iov[1].iov_len = 8;
    SHOW("readv entry readonly", raw(SYS_readv, fd, P(iov), 2, 0));
    iov[1].iov_len = (size_t)1 << 63;
    SHOW("readv length top bit", raw(SYS_readv, fd, P(iov), 2, 0));
    SHOW("readv too many", raw(SYS_readv, fd, P(iov), 100000, 0));
    SHOW("readv array wraps", raw(SYS_readv, fd, -16, 2, 0));

    /* signal structures read and written by the host */
    SHOW("sigaction act guard", raw(SYS_rt_sigaction, SIGUSR1, P(rw + 4096), 0, 8));
    SHOW("sigaction oact readonly", raw(SYS_rt_sigaction, SIGUSR1, 0, P(ro), 8));
    SHOW("sigprocmask set unmapped", raw(SYS_rt_sigprocmask, SIG_BLOCK, P(gone), 0, 8));
    SHOW("close", raw(SYS_close, fd, 0, 0, 0));
    SHOW("close again", raw(SYS_close, fd, 0, 0, 0));
    return 0;
}
