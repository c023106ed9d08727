/* Record locks (POSIX and OFD) and flock on one file, from one process: each step prints its
   result, and the test compares the lines with the same program run natively. argv[1]: the
   file; argv[2] "sandbox": also the steps whose native answer is to wait forever or that need
   thousands of locks (their sandbox answers: EDEADLK, ENOLCK). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

static const char *path;

static void result(const char *what, int r) {
    if (r < 0) printf("%s=-1 errno %d\n", what, errno);
    else printf("%s=%d\n", what, r);
}

static int lk(int fd, int cmd, short type, short whence, long start, long len) {
    struct flock f = {.l_type = type, .l_whence = whence, .l_start = start, .l_len = len};
    return fcntl(fd, cmd, &f);
}

static void get(const char *what, int fd, int cmd, short type, long start, long len) {
    struct flock f = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
    if (fcntl(fd, cmd, &f) < 0) { result(what, -1); return; }
    if (f.l_type == F_UNLCK) { printf("%s: unlocked\n", what); return; }
    printf("%s: type %d start %ld len %ld pid %s\n", what, f.l_type, (long)f.l_start, (long)f.l_len,
           f.l_pid == getpid() ? "self" : f.l_pid == -1 ? "-1" : "other");
}

static int reopen(int flags) { return open(path, flags); }

int main(int argc, char **argv) {
    path = argv[1];
    int a = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    char buf[100] = {0};
    write(a, buf, sizeof buf);
    int b = reopen(O_RDWR), r = reopen(O_RDONLY), w = reopen(O_WRONLY);

    result("posix wr 0-9", lk(a, F_SETLK, F_WRLCK, SEEK_SET, 0, 10));
    get("posix getlk via b", b, F_GETLK, F_WRLCK, 0, 0);       /* own POSIX locks: no conflict */
    get("ofd getlk via b", b, F_OFD_GETLK, F_WRLCK, 0, 0);
    result("ofd rd 5-19", lk(b, F_OFD_SETLK, F_RDLCK, SEEK_SET, 5, 15));
    result("ofd rd 20-29", lk(b, F_OFD_SETLK, F_RDLCK, SEEK_SET, 20, 10));
    get("posix getlk 10-", a, F_GETLK, F_WRLCK, 10, 0);
    struct flock bad = {.l_type = F_RDLCK, .l_pid = 5};
    result("ofd pid 5", fcntl(b, F_OFD_SETLK, &bad));
    result("getlk unlck", lk(a, F_GETLK, F_UNLCK, SEEK_SET, 0, 0));
    result("bad type", lk(a, F_SETLK, 7, SEEK_SET, 0, 0));
    result("bad whence", lk(a, F_SETLK, F_RDLCK, 9, 0, 0));
    result("posix unlock 3-5", lk(a, F_SETLK, F_UNLCK, SEEK_SET, 3, 3));
    get("ofd getlk 3-5", b, F_OFD_GETLK, F_WRLCK, 3, 3);
    get("ofd getlk 6", b, F_OFD_GETLK, F_WRLCK, 6, 1);
    get("ofd getlk 0", b, F_OFD_GETLK, F_RDLCK, 0, 1);
    result("posix wr via rdonly", lk(r, F_SETLK, F_WRLCK, SEEK_SET, 50, 10));
    result("posix rd via wronly", lk(w, F_SETLK, F_RDLCK, SEEK_SET, 50, 10));
    result("posix rd 50-59 via rdonly", lk(r, F_SETLK, F_RDLCK, SEEK_SET, 50, 10));
    result("posix rd 60-69", lk(a, F_SETLK, F_RDLCK, SEEK_SET, 60, 10));
    get("ofd getlk 40-79 (merged)", b, F_OFD_GETLK, F_WRLCK, 40, 40);
    result("posix wr 65-66", lk(a, F_SETLK, F_WRLCK, SEEK_SET, 65, 2));
    get("ofd getlk 60-64", b, F_OFD_GETLK, F_WRLCK, 60, 5);
    get("ofd getlk rd 65", b, F_OFD_GETLK, F_RDLCK, 65, 1);
    get("ofd getlk 67-", b, F_OFD_GETLK, F_WRLCK, 67, 0);
    result("posix rd negative len", lk(a, F_SETLK, F_RDLCK, SEEK_SET, 90, -5));
    get("ofd getlk 80-", b, F_OFD_GETLK, F_WRLCK, 80, 0);
    lseek(a, 10, SEEK_SET);
    result("posix wr seek_cur", lk(a, F_SETLK, F_WRLCK, SEEK_CUR, 85, 3));
    get("ofd getlk 91-", b, F_OFD_GETLK, F_WRLCK, 91, 0);
    result("posix wr seek_end", lk(a, F_SETLK, F_WRLCK, SEEK_END, 10, 0));
    get("ofd getlk 100-", b, F_OFD_GETLK, F_WRLCK, 100, 0);
    result("before start", lk(a, F_SETLK, F_RDLCK, SEEK_SET, 5, -10));
    result("posix wr over ofd", lk(a, F_SETLK, F_WRLCK, SEEK_SET, 25, 1));
    get("posix getlk 25", a, F_GETLK, F_WRLCK, 25, 1);
    result("close rdonly", close(r));                /* releases every POSIX lock on the file */
    get("ofd getlk 0- after close", b, F_OFD_GETLK, F_WRLCK, 0, 0);
    int b2 = dup(b);
    close(b);
    get("posix getlk ofd kept by dup", a, F_GETLK, F_WRLCK, 0, 0);
    close(b2);                                       /* the description's last fd: OFD locks go */
    get("posix getlk ofd gone", a, F_GETLK, F_WRLCK, 0, 0);

    b = reopen(O_RDWR); r = reopen(O_RDONLY);
    result("flock ex a", flock(a, LOCK_EX));
    result("flock ex a again", flock(a, LOCK_EX | LOCK_NB));
    result("flock sh b", flock(b, LOCK_SH | LOCK_NB));
    int d = dup(a);
    close(a);
    result("flock sh b, kept by dup", flock(b, LOCK_SH | LOCK_NB));
    close(d);
    result("flock sh b, released", flock(b, LOCK_SH | LOCK_NB));
    result("flock sh rdonly", flock(r, LOCK_SH | LOCK_NB));
    result("flock ex b conflicts", flock(b, LOCK_EX | LOCK_NB));  /* drops b's shared lock */
    close(r);
    a = reopen(O_RDONLY);
    result("flock ex, b's dropped", flock(a, LOCK_EX | LOCK_NB));
    result("posix beside flock", lk(b, F_SETLK, F_WRLCK, SEEK_SET, 0, 0));
    result("flock un", flock(a, LOCK_UN));
    result("flock sh b again", flock(b, LOCK_SH | LOCK_NB));
    result("flock bad op", flock(b, 3));
    result("flock bad fd", flock(99, LOCK_SH));
    result("setlk bad fd", lk(99, F_SETLK, F_RDLCK, SEEK_SET, 0, 0));

    if (argc > 2 && !strcmp(argv[2], "sandbox")) {
        result("posix unlock", lk(b, F_SETLK, F_UNLCK, SEEK_SET, 0, 0));
        result("ofd rd", lk(a, F_OFD_SETLK, F_RDLCK, SEEK_SET, 0, 0));
        result("setlkw", lk(b, F_SETLKW, F_WRLCK, SEEK_SET, 0, 0));
        result("setlkw free", lk(b, F_SETLKW, F_RDLCK, SEEK_SET, 0, 0));
        result("ofd setlkw", lk(w, F_OFD_SETLKW, F_WRLCK, SEEK_SET, 0, 0));
        result("flock blocking", flock(a, LOCK_EX));
        lk(b, F_SETLK, F_UNLCK, SEEK_SET, 0, 0);
        int i, n = 0;
        errno = 0;
        for (i = 0; i < 5000; i++) {
            if (lk(b, F_SETLK, F_RDLCK, SEEK_SET, 1000 + 2 * i, 1) < 0) break;
            n++;
        }
        printf("locks until errno %d: %d\n", errno, n);
        result("posix unlock all", lk(b, F_SETLK, F_UNLCK, SEEK_SET, 0, 0));
        result("posix after", lk(b, F_SETLK, F_RDLCK, SEEK_SET, 1000, 1));
    }
    return 0;
}
