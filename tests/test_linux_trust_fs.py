"""The file system's trust boundary on the host side: whoever can write inside a read root (another
host user, not the guest) swapping directories and files for symlinks while a guest runs never
gets the guest a host file outside `read`, and requests any guest can make never fail on the host
with anything but a Linux errno (issue 16, items 5 and 7)."""

import errno as host_errno
import gc
import os
import struct
import subprocess
import sys
import threading
import time

import pytest

import whpfast
from conftest import build_c
from whpfast.linux import errno as E
from whpfast.linux.errno import LinuxError
from whpfast.linux.fs import (AT_FDCWD, AT_SYMLINK_NOFOLLOW, O_CREAT, O_DIRECTORY, O_EXCL,
                              O_NOFOLLOW, O_PATH, O_RDONLY, O_TRUNC, O_WRONLY, FileSystem)

# The *at calls this relies on are POSIX (a Windows host resolves joined paths: see fs/host.py).
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux host only")

MB = 1 << 20
SECRET = b"SECRET, outside every read root\n"


def err(fn, *args):
    with pytest.raises(LinuxError) as e:
        fn(*args)
    return e.value.errno


def read_all(fs, fd):
    out = []
    while True:
        b = fs.read(fd, 4096)
        if not b:
            return b"".join(out)
        out.append(b)


@pytest.fixture(autouse=True)
def _release_host_fds():
    yield
    gc.collect()                # a FileSystem's host fds go with it (it has reference cycles)


@pytest.fixture
def host(tmp_path):
    """root/ (the read root) with d/f and d/sub/g; secret/ beside it (outside `read`) holding
    the same names and more, all reading SECRET."""
    root, secret = tmp_path / "root", tmp_path / "secret"
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"public f\n")
    (root / "d" / "sub" / "g").write_bytes(b"public g\n")
    os.symlink("f", root / "d" / "l")
    (secret / "sub").mkdir(parents=True)
    for name in ("f", "g", "shadow", "sub/g", "sub/shadow"):
        (secret / name).write_bytes(SECRET)
    os.symlink("shadow", secret / "l")
    return root, secret


def swap_for_link(path, target):
    """Puts a symlink to `target` where `path` is; returns a function that puts it back."""
    aside = path.with_name(path.name + ".aside")
    os.rename(path, aside)
    os.symlink(target, path)

    def back():
        os.unlink(path)
        os.rename(aside, path)
    return back


# ------------------------------------------------------------------- one swap, between two calls

def test_directory_swapped_after_its_lookup_is_never_followed(host):
    """The guest looked at /r/d (a directory), then d became a symlink to the secret directory:
    names below /r/d are looked up in no directory but the one it saw (was: the host followed
    the symlink, and /r/d/shadow read the secret)."""
    root, secret = host
    fs = FileSystem({"/r": str(root)})
    assert fs.fstatat(AT_FDCWD, b"/r/d", 0)                      # d looked up: a directory
    back = swap_for_link(root / "d", secret)
    for path in (b"/r/d/shadow", b"/r/d/f", b"/r/d/sub/shadow", b"/r/d/l"):
        try:
            fd = fs.openat(AT_FDCWD, path, O_RDONLY)
        except LinuxError as e:
            assert e.errno in (E.ENOENT, E.ENOTDIR, E.ELOOP, E.ESTALE), (path, e)
            continue
        try:
            assert SECRET not in read_all(fs, fd), path
        except LinuxError as e:
            assert e.errno in (E.ELOOP, E.ESTALE), (path, e)
    try:
        names = {n for n, _ in _names(fs, b"/r/d")}
        assert not names & {b"shadow", b"g"}, names
    except LinuxError as e:
        assert e.errno in (E.ENOTDIR, E.ELOOP, E.ESTALE)
    try:
        assert fs.readlinkat(AT_FDCWD, b"/r/d/l") == b"f"       # never the secret link's
    except LinuxError as e:
        assert e.errno in (E.ENOENT, E.ENOTDIR, E.ELOOP, E.ESTALE)
    back()
    fs.close_all()


def test_an_open_directory_is_pinned(host):
    """Once the guest reached into /r/d, the sandbox holds that directory: swapping it for a
    symlink (or another directory) on the host changes nothing the guest sees there."""
    root, secret = host
    fs = FileSystem({"/r": str(root)})
    assert read_all(fs, fs.openat(AT_FDCWD, b"/r/d/f", O_RDONLY)) == b"public f\n"
    back = swap_for_link(root / "d", secret)
    assert err(fs.openat, AT_FDCWD, b"/r/d/shadow", O_RDONLY) == E.ENOENT
    assert read_all(fs, fs.openat(AT_FDCWD, b"/r/d/sub/g", O_RDONLY)) == b"public g\n"
    assert {n for n, _ in _names(fs, b"/r/d")} == {b".", b"..", b"f", b"sub", b"l"}
    back()
    fs.close_all()


def test_file_swapped_after_its_lookup_is_never_opened(host):
    root, secret = host
    fs = FileSystem({"/r": str(root)})
    assert fs.fstatat(AT_FDCWD, b"/r/d/f", 0)
    back = swap_for_link(root / "d" / "f", secret / "f")
    fd = fs.openat(AT_FDCWD, b"/r/d/f", O_RDONLY)             # the node looked up: a file
    assert err(fs.read, fd, 100) == E.ELOOP                     # the host open refuses the link
    back()
    os.rename(root / "d" / "f", root / "d" / "f.old")           # another file by that name
    (root / "d" / "f").write_bytes(SECRET)
    assert err(fs.read, fd, 100) == E.ESTALE
    fs.close_all()


def test_symlink_swapped_back_after_its_lookup_is_estale(host):
    """/r/d/sub was a symlink when looked up and is a directory again when followed: the
    guest gets ESTALE (was: readlink's EINVAL, which no path walk of Linux returns)."""
    root, _ = host
    fs = FileSystem({"/r": str(root)})
    back = swap_for_link(root / "d" / "sub", "../../secret/sub")
    assert fs.fstatat(AT_FDCWD, b"/r/d/sub", AT_SYMLINK_NOFOLLOW)
    back()
    assert err(fs.openat, AT_FDCWD, b"/r/d/sub/g", O_RDONLY) == E.ESTALE
    assert err(fs.readlinkat, AT_FDCWD, b"/r/d/sub") == E.ESTALE
    fs.close_all()


def test_read_root_is_opened_once(host, tmp_path):
    """The root the caller named is the directory it was when the FileSystem was made: renaming
    it away and putting a symlink to the secret in its place changes nothing, also after
    close_all (its fds reopen only the inodes they had)."""
    root, secret = host
    fs = FileSystem({"/r": str(root)})
    moved = tmp_path / "moved"
    os.rename(root, moved)
    os.symlink(secret, root)
    assert read_all(fs, fs.openat(AT_FDCWD, b"/r/d/f", O_RDONLY)) == b"public f\n"
    assert err(fs.fstatat, AT_FDCWD, b"/r/shadow", 0) == E.ENOENT
    fs.close_all()
    assert err(fs.fstatat, AT_FDCWD, b"/r/d/shadow", 0) in (E.ENOENT, E.ENOTDIR, E.ELOOP, E.ESTALE)
    fs.close_all()


def test_directory_fds_are_bounded_and_reopened_checked(host, monkeypatch):
    """Directory fds are kept up to _DIRFD_CACHE; one closed and needed again is reopened from
    its parent and must be the directory first seen."""
    import whpfast.linux.fs as fsmod
    monkeypatch.setattr(fsmod.common, "_DIRFD_CACHE", 2)
    root, secret = host
    for i in range(6):
        (root / f"e{i}").mkdir()
        (root / f"e{i}" / "f").write_bytes(b"%d" % i)
    fs = FileSystem({"/r": str(root)})
    for i in range(6):
        assert fs.fstatat(AT_FDCWD, b"/r/e%d/f" % i, 0)
    assert len(fs._dirfds) <= 2
    back = swap_for_link(root / "e0", secret)                    # e0's fd was closed
    assert err(fs.fstatat, AT_FDCWD, b"/r/e0/shadow", 0) in (E.ENOTDIR, E.ELOOP)
    back()
    os.rename(root / "e1", root / "e1.old")                      # another directory by that name
    os.mkdir(root / "e1")
    (root / "e1" / "shadow").write_bytes(SECRET)
    assert err(fs.fstatat, AT_FDCWD, b"/r/e1/shadow", 0) == E.ESTALE
    fs.close_all()


def _names(fs, path):
    fd = fs.openat(AT_FDCWD, path, O_DIRECTORY)
    out = []
    while True:
        buf = fs.getdents64(fd, 4096)
        if not buf:
            return out
        pos = 0
        while pos < len(buf):
            _, _, reclen, dtype = struct.unpack_from("<QqHB", buf, pos)
            out.append((buf[pos + 19:pos + reclen].split(b"\0")[0], dtype))
            pos += reclen


# ------------------------------------------------------------- /proc/self/fd/N of a symlink

def test_fd_link_to_a_symlink_with_o_creat_is_eloop(host):
    """/proc/self/fd/N where N is an O_PATH | O_NOFOLLOW fd of a symlink (host or /tmp),
    opened with O_CREAT: what Linux answers (checked on the host kernel here), never a host
    TypeError (was: the symlink node reached the walker as a path)."""
    root, _ = host
    scratch = root.parent / "scratch"
    scratch.mkdir()
    os.symlink("t", scratch / "l")
    fs = FileSystem({"/r": str(root)})
    fs.symlinkat(b"/tmp/t", AT_FDCWD, b"/tmp/l")
    cases = [O_CREAT | O_WRONLY, O_CREAT | O_RDONLY, O_CREAT | O_WRONLY | O_TRUNC,
             O_CREAT | O_EXCL | O_WRONLY, O_CREAT | O_NOFOLLOW | O_WRONLY, O_RDONLY,
             O_RDONLY | O_NOFOLLOW, O_RDONLY | O_DIRECTORY]
    hfd = os.open(scratch / "l", os.O_PATH | os.O_NOFOLLOW)
    try:
        for flags in cases:
            with pytest.raises(OSError) as e:
                os.open(f"/proc/self/fd/{hfd}", flags, 0o644)   # Linux's and x86-64's flags agree
            want = getattr(E, host_errno.errorcode[e.value.errno])
            for link in (b"/r/d/l", b"/tmp/l"):
                fd = fs.openat(AT_FDCWD, link, O_PATH | O_NOFOLLOW)
                assert err(fs.openat, AT_FDCWD, b"/proc/self/fd/%d" % fd, flags, 0o644) == want, \
                    (link, oct(flags))
    finally:
        os.close(hfd)
    assert os.listdir(scratch) == ["l"]
    assert read_all(fs, fs.openat(AT_FDCWD, b"/r/d/l", O_RDONLY)) == b"public f\n"   # still fine
    assert err(fs.fstatat, AT_FDCWD, b"/tmp/t", AT_SYMLINK_NOFOLLOW) == E.ENOENT   # not created
    fs.close_all()


# ----------------------------------------------------------------------------- with a guest

NDIR = 80                   # more than _DIRFD_CACHE and _HOSTFD_CACHE: fds are closed and reopened
NSECRET = 1000

SWAP_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NDIR %(ndir)d
#define NSECRET %(nsecret)d
static long leaks, oks, errs[256];

static void fail(void) { errs[errno & 255]++; }

static void check_read(const char *path) {
    char buf[256];
    int fd = open(path, O_RDONLY);
    if (fd < 0) { fail(); return; }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    if (n < 0) fail();
    else if (memmem(buf, n, "SECRET", 6)) { leaks++; printf("LEAK read %%s\n", path); }
    else oks++;
    close(fd);
}

static void check_stat(const char *path) {       /* the path names a secret-only file */
    struct stat st;
    if (stat(path, &st) == 0) { leaks++; printf("LEAK stat %%s\n", path); }
    else fail();
}

static void check_list(const char *path) {
    char buf[4096];
    int fd = open(path, O_RDONLY | O_DIRECTORY);
    if (fd < 0) { fail(); return; }
    for (;;) {
        long n = syscall(SYS_getdents64, fd, buf, sizeof buf);
        if (n <= 0) { if (n < 0) fail(); break; }
        for (long pos = 0; pos < n; pos += *(unsigned short *)(buf + pos + 16)) {
            const char *name = buf + pos + 19;
            if (name[0] == 'x' || !strcmp(name, "shadow")) { leaks++; printf("LEAK name %%s/%%s\n", path, name); }
        }
    }
    close(fd);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    char path[128];
    double end = now() + atof(argv[1]);
    long round = 0;
    while (now() < end) {
        for (int i = 0; i < NDIR; i++) {
            snprintf(path, sizeof path, "/r/d%%d/f", i);
            check_read(path);
            snprintf(path, sizeof path, "/r/d%%d/sub/g", i);
            check_read(path);
            snprintf(path, sizeof path, "/r/d%%d/x%%ld", i, round %% NSECRET);
            check_read(path);
            check_stat(path);
            snprintf(path, sizeof path, "/r/d%%d/sub/x%%ld", i, round %% NSECRET);
            check_read(path);
            if (round %% 8 == 0) {
                snprintf(path, sizeof path, "/r/d%%d", i);
                check_list(path);
            }
        }
        round++;
    }
    long other = 0;
    for (int e = 0; e < 256; e++)
        if (e != ENOENT && e != ENOTDIR && e != ELOOP && e != ESTALE && errs[e]) {
            printf("errno%%d=%%ld ", e, errs[e]);
            other += errs[e];
        }
    printf("rounds=%%ld oks=%%ld leaks=%%ld ENOENT=%%ld ENOTDIR=%%ld ELOOP=%%ld ESTALE=%%ld other=%%ld\n",
           round, oks, leaks, errs[ENOENT], errs[ENOTDIR], errs[ELOOP], errs[ESTALE], other);
    return leaks != 0;
}
""" % {"ndir": NDIR, "nsecret": NSECRET}


@pytest.mark.hypervisor
def test_swapping_under_a_running_guest_never_leaks(tmp_path):
    """A host thread swaps, in a loop, directories of a read root for symlinks to a secret
    directory (and back) and files for symlinks to a secret file, while a guest opens, reads,
    stats and lists through those paths (new names each round, so the sandbox's caches do not
    hide the race). The guest sees the public bytes or an errno, never a secret byte or name,
    and the sandbox is never poisoned."""
    (tmp_path / "bin").mkdir()
    build_c(tmp_path / "bin" / "swapper", SWAP_C, "-static")
    root, secret = tmp_path / "root", tmp_path / "secret"
    for i in range(NDIR):
        (root / f"d{i}" / "sub").mkdir(parents=True)
        (root / f"d{i}" / "f").write_bytes(b"public\n")
        (root / f"d{i}" / "sub" / "g").write_bytes(b"public\n")
    (secret / "sub").mkdir(parents=True)
    for name in ["f", "shadow", "sub/g"] + [f"x{k}" for k in range(NSECRET)] \
            + [f"sub/x{k}" for k in range(NSECRET)]:
        (secret / name).write_bytes(SECRET)

    stop = threading.Event()
    swaps = [0]
    problems = []

    def swapper():
        try:
            while not stop.is_set():
                backs = []
                for i in range(NDIR):
                    d = root / f"d{i}"
                    if i % 2:
                        backs.append(swap_for_link(d, secret))           # absolute host path
                    else:
                        backs.append(swap_for_link(d / "f", secret / "f"))
                        backs.append(swap_for_link(d / "sub", "../../secret/sub"))
                time.sleep(0.002)
                for back in backs:
                    back()
                swaps[0] += 1
                time.sleep(0.002)
        except BaseException as e:                  # noqa: BLE001 (reported by the test)
            problems.append(e)

    read = {"/r": str(root), "/bin": str(tmp_path / "bin")}
    # Without swaps first: the guest reads the public files through those paths (so the run
    # below, whose first look-ups may all fall in swaps and then stay ENOENT -- a sandbox keeps
    # what it first saw of a read root -- is not vacuous).
    with whpfast.LinuxSandbox(["/bin/swapper", "0.05"], read=read, memory_size=64 * MB) as calm:
        quiet = calm.run(timeout=60)
    calm_stats = dict(kv.split("=") for kv in quiet.stdout.decode().split())
    assert int(calm_stats["oks"]) > 0 and int(calm_stats["leaks"]) == 0, quiet

    thread = threading.Thread(target=swapper, daemon=True)
    with whpfast.LinuxSandbox(["/bin/swapper", "3"], read=read, memory_size=64 * MB) as lx:
        thread.start()
        try:
            r = lx.run(timeout=60)
        finally:
            stop.set()
            thread.join()
        poisoned = lx.poisoned
    assert not problems, problems
    out = r.stdout.decode()
    assert "LEAK" not in out and SECRET not in r.stdout, out[:2000]
    assert poisoned is None and r.exit_code == 0, (poisoned, r)
    stats = dict(kv.split("=") for kv in out.split())
    assert int(stats["rounds"]) > 1, out
    assert int(stats["other"]) == 0, out
    assert swaps[0] >= 3, swaps                 # the race did happen, many times over


FDLINK_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    static const int flags[] = {O_CREAT | O_WRONLY, O_CREAT | O_RDONLY, O_CREAT | O_WRONLY | O_TRUNC,
                                O_CREAT | O_EXCL | O_WRONLY, O_CREAT | O_NOFOLLOW | O_WRONLY,
                                O_RDONLY, O_RDONLY | O_NOFOLLOW, O_RDONLY | O_DIRECTORY};
    char path[256], buf[64];
    for (int a = 1; a < argc - 1; a++) {           /* each a symlink; the last one a file */
        int fd = open(argv[a], O_PATH | O_NOFOLLOW);
        if (fd < 0) { printf("open %s: %s\n", argv[a], strerror(errno)); return 1; }
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        for (unsigned i = 0; i < sizeof flags / sizeof *flags; i++) {
            int r = open(path, flags[i], 0644);
            printf("%d:%d:%s ", a, i, r < 0 ? strerror(errno) : "opened");
        }
        printf("\n");
    }
    int fd = open(argv[argc - 1], O_RDONLY);        /* and the sandbox still serves the program */
    ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf);
    printf("then read %zd\n", n);
    return 0;
}
"""


@pytest.mark.hypervisor
def test_fd_link_to_a_symlink_with_o_creat_in_a_guest(tmp_path):
    """The same program run on the host kernel and in the sandbox prints the same errors."""
    (tmp_path / "bin").mkdir()
    program = build_c(tmp_path / "bin" / "fdlink", FDLINK_C, "-static")
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"public\n")
    os.symlink("missing", root / "l")
    os.symlink("f", root / "lf")
    # on the host: the same program in a scratch copy (its O_CREAT could create files there)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "f").write_bytes(b"public\n")
    os.symlink("missing", scratch / "l")
    os.symlink("f", scratch / "lf")
    native = subprocess.run([program, str(scratch / "l"), str(scratch / "lf"), str(scratch / "f")],
                            capture_output=True, check=True).stdout
    assert sorted(os.listdir(scratch)) == ["f", "l", "lf"]
    with whpfast.LinuxSandbox(["/bin/fdlink", "/r/l", "/r/lf", "/r/f"],
                              read={"/r": str(root), "/bin": str(tmp_path / "bin")}, memory_size=64 * MB) as lx:
        r = lx.run(timeout=10)
        assert lx.poisoned is None
    assert r.exit_code == 0 and r.stdout == native, (r.stdout, native)
    assert b"then read 7\n" in r.stdout
