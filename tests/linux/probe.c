/* Prints what the sandbox answers to the calls a one-thread, no-network process may not make. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/auxv.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/utsname.h>

static void report(const char *what, long rc) {
    printf("%s=%ld %s\n", what, rc, rc < 0 ? strerrorname_np(errno) : "");
}

int main(void) {
    cpu_set_t set;
    report("fork", fork());
    report("socket", socket(AF_INET, SOCK_STREAM, 0));
    report("execve", execve("/bin/sh", (char *[]){"sh", 0}, (char *[]){0}));
    report("affinity", sched_getaffinity(0, sizeof set, &set));
    printf("cpus=%d\n", CPU_COUNT(&set));
    report("unknown", syscall(500));
    report("unknown", syscall(500));
    report("sigaction", sigaction(SIGUSR1, &(struct sigaction){.sa_handler = SIG_IGN}, 0));
    struct sigaction old;
    sigaction(SIGUSR1, 0, &old);
    printf("ignored=%d\n", old.sa_handler == SIG_IGN);
    struct timespec ts;
    report("clock", clock_gettime(CLOCK_REALTIME, &ts));
    printf("year>=2024 %d\n", ts.tv_sec > 1704067200);
    struct utsname u;
    uname(&u);
    printf("uname=%s %s\n", u.sysname, u.machine);
    printf("pagesz=%lu random=%d execfn=%s\n", getauxval(AT_PAGESZ), getauxval(AT_RANDOM) != 0,
           (char *)getauxval(AT_EXECFN));
    report("badptr", syscall(SYS_write, 1, (void *)0x2000, 10));
    report("badfd", write(99, "x", 1));
    return 0;
}
