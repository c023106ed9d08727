/* Small C helpers for the KVM backend: the vCPU kick signal and per-thread timers. These need
 * C-level signal handling (an async-signal-safe handler, no SA_RESTART) that Cython cannot write. */
#ifndef WHPFAST_COMPAT_H
#define WHPFAST_COMPAT_H

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/kvm.h>

/* The kvm_run of the vCPU this thread is running, if any. The kick handler sets immediate_exit on
 * it: a signal that lands just before KVM_RUN enters the guest then still makes it return EINTR
 * at once, instead of being lost (the race `immediate_exit` exists to close). */
static __thread struct kvm_run *volatile whpfast_current_run;

static void whpfast_kick_handler(int sig) {
    struct kvm_run *run = whpfast_current_run;
    (void)sig;
    if (run)
        run->immediate_exit = 1;
}

static int whpfast_kick_signal(void) { return SIGRTMIN + 6; }

/* Installed once per process. No SA_RESTART: KVM_RUN must return EINTR. */
static int whpfast_install_kick_handler(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = whpfast_kick_handler;
    sigemptyset(&sa.sa_mask);
    return sigaction(whpfast_kick_signal(), &sa, NULL);
}

static void whpfast_set_current_run(struct kvm_run *run) { whpfast_current_run = run; }

static pid_t whpfast_gettid(void) { return (pid_t)syscall(SYS_gettid); }

static int whpfast_kick_thread(pid_t tid) {
    return (int)syscall(SYS_tgkill, getpid(), tid, whpfast_kick_signal());
}

/* A one-shot CLOCK_MONOTONIC timer that sends the kick signal to this very thread. */
static int whpfast_timer_create(timer_t *timer) {
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = whpfast_kick_signal();
    sev._sigev_un._tid = whpfast_gettid();
    return timer_create(CLOCK_MONOTONIC, &sev, timer);
}

static int whpfast_timer_arm(timer_t timer, long long ns) {
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = ns / 1000000000LL;
    its.it_value.tv_nsec = ns % 1000000000LL;
    if (ns > 0 && its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
        its.it_value.tv_nsec = 1;
    return timer_settime(timer, 0, &its, NULL);
}

static long long whpfast_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#endif
