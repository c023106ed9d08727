/* Issues seeded random system calls with hostile arguments: bad and kernel-area pointers, huge
 * lengths, negative fds. The host must answer every one with a result or -errno and never crash;
 * the program prints how many calls it made. Calls that end or re-shape the process (exit, kill,
 * the memory-map calls, arch_prctl) are left out so the run lasts; a second mode issues only the
 * memory-map calls, which may well unmap the program itself (a fault then ends the run). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>

static uint64_t state;
static uint64_t next(void) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state; }

static char buffer[65536];

static uint64_t arg(void) {
    switch (next() % 12) {
    case 0: return 0;
    case 1: return next() % 64;
    case 2: return (uint64_t)-1;
    case 3: return next();
    case 4: return (uint64_t)(buffer + next() % sizeof buffer);       /* valid, maybe too short */
    case 5: return 0x1000 + next() % 0xF000;                          /* the kernel area */
    case 6: return (uint64_t)1 << (next() % 64);
    case 7: return (uint64_t)buffer;
    case 8: return next() % 0x100000000ULL;
    case 9: return (uint64_t)-100;                                    /* AT_FDCWD */
    case 10: return (uint64_t)"/proc/self/maps";
    default: return (uint64_t)"/tmp/x";
    }
}

static char *scratch;
#define SCRATCH (16 << 20)

/* Memory-map arguments: addresses inside a scratch area (aligned or not), garbage, kernel-area
 * addresses, page counts and huge lengths; never the program's own image or stack. */
static uint64_t marg(void) {
    switch (next() % 9) {
    case 0: return 0;
    case 1: return next() % 64;
    case 2: return (uint64_t)-1;
    case 3: return next();
    case 4: return (uint64_t)(scratch + next() % SCRATCH);
    case 5: case 7: return (uint64_t)(scratch + (next() % (SCRATCH / 4096)) * 4096);
    case 6: return 0x1000 + next() % 0xF000;
    default: return (uint64_t)1 << (30 + next() % 20);
    }
}

static uint64_t mlen(void) {        /* lengths: mostly inside the scratch area, rarely huge */
    switch (next() % 16) {
    case 0: return 0;
    case 1: return (uint64_t)1 << (30 + next() % 30);
    case 2: return next() % 10000;
    default: return (next() % (SCRATCH / 4096 / 4)) * 4096;
    }
}

int main(int argc, char **argv) {
    state = argc > 1 ? strtoull(argv[1], 0, 0) : 1;
    long count = argc > 2 ? atol(argv[2]) : 2000;
    int memory = argc > 3;          /* any third argument: only the memory-map calls */
    if (memory) {                   /* fds 3 and 4: a synthesized file and (if readable) a host file */
        open("/proc/self/maps", O_RDONLY);
        open("/etc/passwd", O_RDONLY);
        scratch = mmap(0, SCRATCH, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    static const long mm_calls[] = {SYS_mmap, SYS_munmap, SYS_mprotect, SYS_mremap, SYS_brk, SYS_madvise};
    for (long i = 0; i < count; i++) {
        long nr = memory ? mm_calls[next() % 6] : (long)(next() % 460);
        if (memory) {
            /* addr, length, prot / new length, flags, fd (3 and 4 are files), offset / new addr */
            syscall(nr, marg(), mlen(), nr == SYS_mremap ? mlen() : next() % 8,
                    next() % 0x200000 | (next() % 2 ? 0x2 : 0x1), next() % 6, marg());
            continue;
        }
        switch (nr) {
        case SYS_exit: case SYS_exit_group: case SYS_kill: case SYS_tkill: case SYS_tgkill:
        case SYS_mmap: case SYS_munmap: case SYS_mprotect: case SYS_mremap: case SYS_brk:
        case SYS_arch_prctl: case SYS_rt_sigreturn: case SYS_madvise: case SYS_shmat:
        case SYS_execve: case SYS_execveat: case SYS_rt_tgsigqueueinfo: case SYS_rt_sigqueueinfo:
        case SYS_seccomp: case SYS_vfork: case SYS_fork: case SYS_clone: case SYS_clone3:
        case SYS_nanosleep: case SYS_clock_nanosleep: case SYS_pause:
            continue;
        }
        syscall(nr, arg(), arg(), arg(), arg(), arg(), arg());
    }
    printf("made %ld calls\n", count);
    return 0;
}
