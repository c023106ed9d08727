"""The Linux personality's file system, host side: real host trees (files, directories, symlinks
relative, absolute, pointing outside, looping; a FIFO), no VM needed."""

import errno as host_errno
import gc
import os
import stat
import struct

import pytest

from whpfast.errors import SnapshotError, WhpfastError
from whpfast.linux import errno as E
from whpfast.linux.errno import LinuxError, from_oserror
from whpfast.linux.fs import (AT_EMPTY_PATH, AT_FDCWD, AT_REMOVEDIR, AT_SYMLINK_NOFOLLOW,
                              F_DUPFD_CLOEXEC, F_GETFD, F_GETFL, F_GETLK, F_OFD_GETLK, F_OFD_SETLK,
                              F_RDLCK, F_SETFD, F_SETFL, F_SETLK, F_WRLCK, LOCK_EX, LOCK_NB, LOCK_SH,
                              MAX_LOCKS, FileSystem,
                              O_APPEND, O_CLOEXEC, O_CREAT, O_DIRECTORY, O_EXCL, O_NOFOLLOW,
                              O_NONBLOCK, O_PATH, O_RDONLY, O_RDWR, O_TMPFILE, O_TRUNC, O_WRONLY,
                              RENAME_EXCHANGE, RENAME_NOREPLACE, UTIME_NOW, UTIME_OMIT,
                              ReadPolicyError)

STAT = struct.Struct("<QQQIIIiQqqqqqqqqq24x")


def st(raw):
    """The fields of a struct stat we check, by name."""
    assert len(raw) == 144
    f = STAT.unpack(raw)
    return dict(dev=f[0], ino=f[1], nlink=f[2], mode=f[3], uid=f[4], gid=f[5], rdev=f[7],
                size=f[8], blksize=f[9], blocks=f[10], mtime=f[13], mtime_nsec=f[14])


def err(fn, *args):
    with pytest.raises(LinuxError) as info:
        fn(*args)
    return info.value.errno


def dents(fs, fd, count=4096):
    """[(name, d_type, d_off)] from getdents64 calls of `count` bytes until the end."""
    out = []
    while True:
        buf = fs.getdents64(fd, count)
        if not buf:
            return out
        assert len(buf) <= count
        pos = 0
        while pos < len(buf):
            ino, off, reclen, dtype = struct.unpack_from("<QqHB", buf, pos)
            assert reclen % 8 == 0 and ino
            name = buf[pos + 19:pos + reclen].split(b"\0")[0]
            out.append((name, dtype, off))
            pos += reclen


@pytest.fixture(autouse=True)
def _release_host_fds():
    """A FileSystem holds host fds until close_all() or its collection (it has reference
    cycles): collect here, so none outlives its test (test_sandbox counts the process's fds)."""
    yield
    gc.collect()


@pytest.fixture
def tree(tmp_path):
    data = tmp_path / "data"
    (data / "sub" / "deep").mkdir(parents=True)
    (data / "a.txt").write_bytes(b"hello world\n" * 1000)
    (data / "sub" / "b.bin").write_bytes(os.urandom(10000))
    (data / "sub" / "deep" / "c").write_bytes(b"c")
    (data / "run.sh").write_bytes(b"#!/bin/sh\n")
    (data / "run.sh").chmod(0o755)
    os.symlink("../a.txt", data / "sub" / "rel")              # stays inside
    os.symlink("/data/sub/b.bin", data / "abs")                 # absolute, inside the namespace
    os.symlink("../../outside/secret", data / "sub" / "out")   # relative, leaves on the host
    os.symlink(str(tmp_path / "outside" / "secret"), data / "hostabs")   # absolute host path
    os.symlink("/etc/passwd", data / "etc")
    os.symlink("loop2", data / "loop1")
    os.symlink("loop1", data / "loop2")
    os.symlink("..", data / "sub" / "up")
    os.symlink("/other/c.txt", data / "to_other")
    os.mkfifo(data / "fifo")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"SECRET")
    other = tmp_path / "other"
    other.mkdir()
    (other / "c.txt").write_bytes(b"other root\n")
    os.symlink("/data/sub/b.bin", other / "to_data")
    return tmp_path


@pytest.fixture
def fs(tree):
    f = FileSystem({"/data": tree / "data", "/other": tree / "other"}, cwd="/data",
                   exe="/data/run.sh", tmp_size=1 << 20, proc_maps=lambda: b"00400000-00401000 r-xp\n")
    yield f
    f.close_all()


def read_all(fs, fd, chunk=4096):
    out = []
    while True:
        b = fs.read(fd, chunk)
        if not b:
            return b"".join(out)
        out.append(b)


# ------------------------------------------------------------------------------- host files

def test_host_files_read_back_identical(fs, tree):
    host = (tree / "data" / "sub" / "b.bin").read_bytes()
    fd = fs.openat(AT_FDCWD, b"sub/b.bin", O_RDONLY | O_CLOEXEC, 0)
    assert fd == 3
    assert read_all(fs, fd, 777) == host
    assert fs.lseek(fd, 0, 1) == len(host)
    assert fs.lseek(fd, -10, 2) == len(host) - 10
    assert fs.read(fd, 100) == host[-10:]
    assert fs.pread(fd, 50, 1234) == host[1234:1284]
    assert fs.lseek(fd, 0, 1) == len(host)          # pread leaves the offset alone
    assert fs.contents(fd) == host
    hostfd, size = fs.host_file(fd)
    assert size == len(host) and os.pread(hostfd, len(host), 0) == host
    assert fs.fcntl(fd, F_GETFD) == 1
    # the same file opened again shares the host fd; close_all releases it
    fd2 = fs.openat(AT_FDCWD, b"/data/abs", O_RDONLY, 0)
    assert fs.host_file(fd2)[0] == hostfd
    fs.close_all()
    with pytest.raises(OSError):
        os.fstat(hostfd)
    assert fs.pread(fd2, 5, 0) == host[:5]          # reopened lazily
    assert err(fs.lseek, fd, -1, 0) == E.EINVAL
    assert err(fs.lseek, fd, 0, 9) == E.EINVAL


def test_symlinks_resolve_inside_the_namespace(fs, tree):
    a = (tree / "data" / "a.txt").read_bytes()
    for path in (b"/data/sub/rel", b"sub/up/a.txt", b"/data/sub/../sub/./rel", b"//data///a.txt"):
        assert read_all(fs, fs.openat(AT_FDCWD, path, 0, 0)) == a, path
    # an absolute link names the inside path; a link into another read root works
    assert read_all(fs, fs.openat(AT_FDCWD, b"/other/to_data", 0, 0)) == (tree / "data/sub/b.bin").read_bytes()
    assert read_all(fs, fs.openat(AT_FDCWD, b"to_other", 0, 0)) == b"other root\n"
    assert fs.readlinkat(AT_FDCWD, b"sub/rel") == b"../a.txt"
    assert err(fs.readlinkat, AT_FDCWD, b"a.txt") == E.EINVAL
    assert err(fs.openat, AT_FDCWD, b"loop1", 0, 0) == E.ELOOP
    assert err(fs.openat, AT_FDCWD, b"sub/rel", O_NOFOLLOW, 0) == E.ELOOP
    lst = st(fs.fstatat(AT_FDCWD, b"sub/rel", AT_SYMLINK_NOFOLLOW))
    assert stat.S_ISLNK(lst["mode"]) and lst["size"] == len(b"../a.txt")
    assert stat.S_ISREG(st(fs.fstatat(AT_FDCWD, b"sub/rel", 0))["mode"])
    assert err(fs.fstatat, AT_FDCWD, b"a.txt/", 0) == E.ENOTDIR
    assert err(fs.openat, AT_FDCWD, b"a.txt/x", 0, 0) == E.ENOTDIR


def test_cached_walks_follow_tmp_and_fd_changes(fs, tree):
    os.symlink("/tmp/f", tree / "data" / "totmp")
    os.symlink("/proc/self/fd/5", tree / "data" / "tofd")
    for _ in range(2):                              # the second round runs on cached look-ups
        assert err(fs.fstatat, AT_FDCWD, b"/data/totmp", 0) == E.ENOENT
        fd = fs.openat(AT_FDCWD, b"/tmp/f", O_CREAT | O_WRONLY, 0o600)
        assert fs.fstatat(AT_FDCWD, b"/data/totmp", 0) == fs.fstat(fd)
        fs.unlinkat(AT_FDCWD, b"/tmp/f", 0)
        fs.close(fd)
        assert err(fs.fstatat, AT_FDCWD, b"tofd", 0) == E.ENOENT
        five = fs.openat(AT_FDCWD, b"sub/b.bin", 0, 0)
        fs.dup2(five, 5)
        assert fs.fstatat(AT_FDCWD, b"tofd", 0) == fs.fstat(five)
        fs.dup2(fs.openat(AT_FDCWD, b"a.txt", 0, 0), 5)
        assert fs.fstatat(AT_FDCWD, b"tofd", 0) == fs.fstatat(AT_FDCWD, b"a.txt", 0)
        for n in range(3, 8):
            try:
                fs.close(n)
            except LinuxError:
                pass
        state = fs.capture()
        fs.mkdirat(AT_FDCWD, b"/tmp/d", 0o700)
        fs.chdir(b"/tmp/d")
        assert fs.fstatat(AT_FDCWD, b".", 0) == fs.fstatat(AT_FDCWD, b"/proc/self/cwd", 0)
        fs.reset(state)
        assert err(fs.fstatat, AT_FDCWD, b"/tmp/d", 0) == E.ENOENT
        assert fs.getcwd() == b"/data"


def test_escapes_are_enoent(fs, tree):
    secret = str(tree / "outside" / "secret").encode()
    dirfd = fs.openat(AT_FDCWD, b"/data/sub", O_DIRECTORY, 0)
    for path in (b"/data/../outside/secret", b"../outside/secret", b"../../../../../outside/secret",
                 b"sub/out", b"hostabs", secret, str(tree / "data" / "a.txt").encode(),
                 b"/proc/self/fd/%d/../../outside/secret" % dirfd, b"/proc/self/root/etc/passwd",
                 b"/etc/shadow", b"/data/sub/up/../../outside/secret"):
        assert err(fs.openat, AT_FDCWD, path, 0, 0) == E.ENOENT, path
        assert err(fs.fstatat, AT_FDCWD, path, 0) == E.ENOENT, path
        assert err(fs.faccessat, AT_FDCWD, path, 0) == E.ENOENT, path
    for path in (b"/etc/passwd", b"/proc/self/fd/%d/../../etc/passwd" % dirfd):     # the sandbox's
        assert read_all(fs, fs.openat(AT_FDCWD, path, 0, 0)).startswith(b"root:x:0:0:root:/root:/bin/sh\n")
    assert err(fs.openat, dirfd, b"../../outside/secret", 0, 0) == E.ENOENT
    # ".." of a mount point is its inside parent: the root, which lists only what is inside
    up = fs.openat(AT_FDCWD, b"/proc/self/fd/%d/../.." % dirfd, O_DIRECTORY, 0)
    assert fs.fstat(up) == fs.fstatat(AT_FDCWD, b"/", 0) == fs.fstatat(AT_FDCWD, b"/..", 0)
    names = {n for n, _, _ in dents(fs, up)}
    assert names == {b".", b"..", b"data", b"other", b"proc", b"dev", b"sys", b"tmp", b"etc"}
    # /proc/self/fd/N leads to the very node the fd holds
    assert fs.fstatat(AT_FDCWD, b"/proc/self/fd/%d" % dirfd, 0) == fs.fstat(dirfd)
    assert fs.readlinkat(AT_FDCWD, b"/proc/self/fd/%d" % dirfd) == b"/data/sub"
    assert err(fs.fstatat, AT_FDCWD, b"/proc/self/fd/99", 0) == E.ENOENT


def test_writes_outside_tmp_are_erofs_and_never_touch_the_host(fs, tree):
    path = tree / "data" / "a.txt"
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    for flags in (O_WRONLY, O_RDWR, O_RDONLY | O_TRUNC, O_WRONLY | O_APPEND, O_WRONLY | O_CREAT):
        assert err(fs.openat, AT_FDCWD, b"a.txt", flags, 0o644) == E.EROFS
    assert err(fs.openat, AT_FDCWD, b"new", O_WRONLY | O_CREAT, 0o644) == E.EROFS
    assert err(fs.openat, AT_FDCWD, b"/new", O_WRONLY | O_CREAT, 0o644) == E.EROFS
    assert err(fs.openat, AT_FDCWD, b"a.txt", O_WRONLY | O_CREAT | O_EXCL, 0o644) == E.EEXIST
    assert err(fs.mkdirat, AT_FDCWD, b"d", 0o755) == E.EROFS
    assert err(fs.mkdirat, AT_FDCWD, b"sub", 0o755) == E.EEXIST
    assert err(fs.unlinkat, AT_FDCWD, b"a.txt", 0) == E.EROFS
    assert err(fs.unlinkat, AT_FDCWD, b"sub", AT_REMOVEDIR) == E.EROFS
    assert err(fs.renameat, AT_FDCWD, b"a.txt", AT_FDCWD, b"b.txt") == E.EROFS
    assert err(fs.renameat, AT_FDCWD, b"a.txt", AT_FDCWD, b"/tmp/a.txt") == E.EXDEV
    assert err(fs.faccessat, AT_FDCWD, b"a.txt", 2) == E.EROFS
    fd = fs.openat(AT_FDCWD, b"a.txt", O_RDONLY, 0)
    assert err(fs.write, fd, b"x") == E.EBADF
    assert err(fs.pwrite, fd, b"x", 0) == E.EBADF
    assert err(fs.ftruncate, fd, 0) == E.EINVAL
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert os.listdir(tree / "data").count("new") == 0
    # a host FIFO (or device) is never opened: no hang, no host side effect
    assert err(fs.openat, AT_FDCWD, b"fifo", O_RDONLY | O_NONBLOCK, 0) == E.EACCES
    assert stat.S_ISFIFO(st(fs.fstatat(AT_FDCWD, b"fifo", 0))["mode"])


def test_stat_matches_host(fs, tree):
    for inside, host in ((b"/data/a.txt", "data/a.txt"), (b"/data/sub", "data/sub"),
                         (b"/data/run.sh", "data/run.sh"), (b"/other", "other")):
        want = os.stat(tree / host)
        got = st(fs.fstatat(AT_FDCWD, inside, 0))
        assert (got["mode"], got["size"], got["ino"], got["dev"], got["nlink"]) == \
            (want.st_mode, want.st_size, want.st_ino, want.st_dev, want.st_nlink)
        assert got["mtime"] * 10**9 + got["mtime_nsec"] == want.st_mtime_ns
        assert got["blocks"] == (want.st_size + 511) // 512
        fd = fs.openat(AT_FDCWD, inside, O_RDONLY, 0)
        assert fs.fstat(fd) == fs.fstatat(fd, b"", AT_EMPTY_PATH) == fs.fstatat(AT_FDCWD, inside, 0)
        sx = fs.statx(AT_FDCWD, inside, 0, 0xFFF)
        assert len(sx) == 256
        mask, _, _, nlink, uid, gid, mode = struct.unpack_from("<IIQIIIH", sx)
        ino, size = struct.unpack_from("<QQ", sx, 32)
        msec, mnsec = struct.unpack_from("<qI", sx, 112)
        dev_major, dev_minor = struct.unpack_from("<II", sx, 136)
        assert (mode, ino, size, nlink) == (want.st_mode, want.st_ino, want.st_size, want.st_nlink)
        assert msec * 10**9 + mnsec == want.st_mtime_ns
        assert (dev_major, dev_minor) == (os.major(want.st_dev), os.minor(want.st_dev))
    # the cwd's stat through AT_FDCWD + AT_EMPTY_PATH, and through 4294967196 (AT_FDCWD unsigned)
    assert fs.fstatat(AT_FDCWD, b"", AT_EMPTY_PATH) == fs.fstatat(0xFFFFFF9C, b".", 0)
    assert err(fs.fstatat, AT_FDCWD, b"", 0) == E.ENOENT
    assert err(fs.fstatat, AT_FDCWD, b"a.txt", 0x4) == E.EINVAL
    assert err(fs.statx, AT_FDCWD, b"a.txt", 0x6000, 0) == E.EINVAL
    # synthesized and /tmp inodes are stable and distinct
    a = st(fs.fstatat(AT_FDCWD, b"/dev/null", 0))
    assert stat.S_ISCHR(a["mode"]) and a["rdev"] == (1 << 8) | 3
    assert a == st(fs.fstatat(AT_FDCWD, b"/dev/null", 0))
    assert a["ino"] != st(fs.fstatat(AT_FDCWD, b"/dev/zero", 0))["ino"]


def test_faccessat(fs):
    fs.faccessat(AT_FDCWD, b"a.txt", 4)
    fs.faccessat(AT_FDCWD, b"run.sh", 1)
    fs.faccessat(AT_FDCWD, b"sub", 1)
    fs.faccessat(AT_FDCWD, b"/tmp", 2)
    fs.faccessat(AT_FDCWD, b"/dev/null", 6)
    assert err(fs.faccessat, AT_FDCWD, b"a.txt", 1) == E.EACCES
    assert err(fs.faccessat, AT_FDCWD, b"a.txt", 8) == E.EINVAL
    assert err(fs.faccessat, AT_FDCWD, b"missing", 0) == E.ENOENT


def test_getdents_lists_the_host_directory(fs, tree):
    fd = fs.openat(AT_FDCWD, b"/data", O_RDONLY | O_DIRECTORY, 0)
    whole = dents(fs, fd)
    assert sorted(n.decode() for n, _, _ in whole) == sorted(os.listdir(tree / "data") + [".", ".."])
    types = {n: t for n, t, _ in whole}
    assert (types[b"sub"], types[b"a.txt"], types[b"abs"], types[b"fifo"]) == (4, 8, 10, 1)
    assert fs.getdents64(fd, 4096) == b""
    assert fs.lseek(fd, 0, 0) == 0                  # rewinddir
    small = dents(fs, fd, 32)                        # one record per call
    assert small == whole
    assert fs.lseek(fd, whole[3][2], 0) == 4         # seekdir to a d_off
    assert dents(fs, fd)[0] == whole[4]
    fs.lseek(fd, 0, 0)
    assert err(fs.getdents64, fd, 16) == E.EINVAL
    assert err(fs.getdents64, fs.openat(AT_FDCWD, b"a.txt", 0, 0), 4096) == E.ENOTDIR
    assert err(fs.read, fd, 10) == E.EISDIR
    assert err(fs.openat, AT_FDCWD, b"a.txt", O_DIRECTORY, 0) == E.ENOTDIR
    assert err(fs.openat, AT_FDCWD, b"sub", O_WRONLY, 0) == E.EISDIR
    # the synthesized directories list their contents
    fdd = fs.openat(AT_FDCWD, b"/proc/self/fd", O_DIRECTORY, 0)
    first = {n for n, _, _ in dents(fs, fdd)}
    assert {b".", b"..", b"0", b"1", b"2", b"%d" % fd, b"%d" % fdd} <= first
    fs.close(fd)
    fs.lseek(fdd, 0, 0)                             # rewinddir sees the fd table of now
    assert {n for n, _, _ in dents(fs, fdd)} == first - {b"%d" % fd}


def test_fd_table_limits_and_bad_fds(tree):
    fs = FileSystem({"/data": tree / "data"}, max_fds=6)
    fds = [fs.openat(AT_FDCWD, b"/data/a.txt", 0, 0) for _ in range(3)]
    assert fds == [3, 4, 5]
    assert err(fs.openat, AT_FDCWD, b"/data/a.txt", 0, 0) == E.EMFILE
    assert err(fs.dup, 3) == E.EMFILE
    assert err(fs.openat, AT_FDCWD, b"/tmp/x", O_CREAT | O_WRONLY, 0o600) == E.EMFILE
    assert err(fs.openat, AT_FDCWD, b"/tmp", O_TMPFILE | O_RDWR, 0o600) == E.EMFILE
    fs.close(4)
    for bad in (-1, 6, 99, (1 << 32) - 1):
        assert err(fs.openat, bad, b"a.txt", 0, 0) == E.EBADF
    assert fs.dup(3) == 4
    assert fs.fstat((1 << 32) | 3) == fs.fstat(3)     # fd arguments are 32-bit, as in Linux
    for bad in (-1, 6, 99, (1 << 32) - 1):
        assert err(fs.close, bad) == E.EBADF
        assert err(fs.read, bad, 1) == E.EBADF
        assert err(fs.fstat, bad) == E.EBADF
        assert err(fs.lseek, bad, 0, 0) == E.EBADF
        assert err(fs.fcntl, bad, F_GETFD, 0) == E.EBADF
    assert err(fs.dup3, 3, 3, 0) == E.EINVAL
    assert err(fs.dup3, 3, 6, 0) == E.EBADF
    assert err(fs.dup3, 3, 1, 0x1) == E.EINVAL
    assert fs.dup2(3, 3) == 3
    fs.close(5)
    assert fs.fcntl(3, F_DUPFD_CLOEXEC, 5) == 5 and fs.fcntl(5, F_GETFD) == 1
    assert err(fs.fcntl, 3, F_DUPFD_CLOEXEC, 2) == E.EMFILE
    assert err(fs.fcntl, 3, 9999, 0) == E.EINVAL
    assert err(fs.ioctl, 3, 0x5401, 0) == E.ENOTTY            # TCGETS


def test_dup_shares_the_offset_and_flags(fs):
    fd = fs.openat(AT_FDCWD, b"a.txt", 0, 0)
    fd2 = fs.dup(fd)
    assert fs.read(fd, 6) == b"hello "
    assert fs.read(fd2, 5) == b"world"
    fs.fcntl(fd, F_SETFL, O_NONBLOCK)
    assert fs.fcntl(fd2, F_GETFL) & O_NONBLOCK
    fs.fcntl(fd2, F_SETFD, 1)
    assert (fs.fcntl(fd, F_GETFD), fs.fcntl(fd2, F_GETFD)) == (0, 1)
    fs.ioctl(fd, 0x5451)                                       # FIOCLEX
    assert fs.fcntl(fd, F_GETFD) == 1
    fs.close(fd)
    assert fs.read(fd2, 1) == b"\n"


def test_console_fds(fs):
    assert [fs.console(fd) for fd in range(4)] == ["stdin", "stdout", "stderr", None]
    d = fs.dup(1)
    assert fs.console(d) == "stdout"
    via = fs.openat(AT_FDCWD, b"/dev/stderr", O_WRONLY, 0)
    assert fs.console(via) == "stderr"
    assert stat.S_ISFIFO(st(fs.fstat(0))["mode"])
    assert err(fs.lseek, 1, 0, 1) == E.ESPIPE
    assert err(fs.read, 0, 1) == E.EIO                          # the caller serves consoles
    assert err(fs.read, 1, 1) == E.EBADF                        # stdout is write-only
    assert err(fs.ioctl, 1, 0x5401, 0) == E.ENOTTY
    assert fs.readlinkat(AT_FDCWD, b"/proc/self/fd/1").startswith(b"pipe:[")
    fs.close(1)
    assert fs.console(1) is None and fs.console(d) == "stdout"


def test_synthesized_files(fs):
    assert fs.readlinkat(AT_FDCWD, b"/proc/self/exe") == b"/data/run.sh"
    assert read_all(fs, fs.openat(AT_FDCWD, b"/proc/self/exe", 0, 0)) == b"#!/bin/sh\n"
    assert read_all(fs, fs.openat(AT_FDCWD, b"/proc/self/maps", 0, 0)) == b"00400000-00401000 r-xp\n"
    assert read_all(fs, fs.openat(AT_FDCWD, b"/sys/devices/system/cpu/online", 0, 0)) == b"0\n"
    assert b"Pid:" in read_all(fs, fs.openat(AT_FDCWD, b"/proc/self/status", 0, 0))
    assert fs.readlinkat(AT_FDCWD, b"/proc/self/cwd") == b"/data"
    assert err(fs.openat, AT_FDCWD, b"/proc/self/maps", O_WRONLY, 0) == E.EACCES
    null = fs.openat(AT_FDCWD, b"/dev/null", O_RDWR, 0)
    assert fs.read(null, 100) == b"" and fs.write(null, b"abc") == 3 and fs.lseek(null, 5, 0) == 0
    zero = fs.openat(AT_FDCWD, b"/dev/zero", O_RDONLY, 0)
    assert fs.read(zero, 10) == bytes(10)
    assert len(fs.read(zero, 1 << 40)) <= 1 << 20               # short read, no host blow-up
    calls = []
    fs2 = FileSystem([], entropy=lambda n: calls.append(n) or b"\x07" * n)
    ur = fs2.openat(AT_FDCWD, b"/dev/urandom", O_RDONLY, 0)
    assert fs2.read(ur, 16) == b"\x07" * 16 and calls == [16]
    assert fs2.getcwd() == b"/"
    assert err(fs2.readlinkat, AT_FDCWD, b"/proc/self/exe") == E.ENOENT   # no exe given
    assert err(fs.contents, null) == E.ENODEV
    assert fs.contents(fs.openat(AT_FDCWD, b"/sys/devices/system/cpu/possible", 0, 0)) == b"0\n"
    assert fs.host_file(fs.openat(AT_FDCWD, b"/proc/self/maps", 0, 0)) is None


def test_cwd(fs):
    assert fs.getcwd() == b"/data"
    fs.chdir(b"sub/deep")
    assert fs.getcwd() == b"/data/sub/deep"
    assert read_all(fs, fs.openat(AT_FDCWD, b"c", 0, 0)) == b"c"
    fs.chdir(b"../../..")
    assert fs.getcwd() == b"/"
    assert err(fs.chdir, b"/data/a.txt") == E.ENOTDIR
    assert err(fs.chdir, b"/nowhere") == E.ENOENT
    fs.fchdir(fs.openat(AT_FDCWD, b"/tmp", O_DIRECTORY, 0))
    assert fs.getcwd() == b"/tmp"
    fs.mkdirat(AT_FDCWD, b"gone", 0o755)
    fs.chdir(b"gone")
    fs.unlinkat(AT_FDCWD, b"/tmp/gone", AT_REMOVEDIR)
    assert err(fs.getcwd) == E.ENOENT
    assert err(fs.openat, AT_FDCWD, b"x", O_CREAT | O_WRONLY, 0o600) == E.ENOENT
    assert err(fs.mkdirat, AT_FDCWD, b"x", 0o700) == E.ENOENT
    fs.close(fs.openat(AT_FDCWD, b"/tmp/f", O_CREAT | O_WRONLY, 0o600))
    assert err(fs.renameat, AT_FDCWD, b"/tmp/f", AT_FDCWD, b"x") == E.ENOENT
    assert fs.fstatat(AT_FDCWD, b"..", 0) == fs.fstatat(AT_FDCWD, b"/tmp", 0)


# ----------------------------------------------------------------------------------------- /tmp

def test_tmp_files(fs):
    fd = fs.openat(AT_FDCWD, b"/tmp/f", O_CREAT | O_RDWR | O_EXCL, 0o666)
    assert fs.write(fd, b"hello") == 5
    assert fs.lseek(fd, 0, 0) == 0 and fs.read(fd, 100) == b"hello"
    assert fs.pwrite(fd, b"J", 0) == 1 and fs.pread(fd, 5, 0) == b"Jello"
    assert fs.lseek(fd, 10, 0) == 10 and fs.write(fd, b"!") == 1          # a hole reads as zeros
    assert fs.contents(fd) == b"Jello\0\0\0\0\0!"
    assert fs.host_file(fd) is None
    fs.ftruncate(fd, 3)
    assert fs.pread(fd, 100, 0) == b"Jel"
    s = st(fs.fstat(fd))
    assert s["mode"] == stat.S_IFREG | 0o644 and s["size"] == 3           # umask 022
    assert err(fs.openat, AT_FDCWD, b"/tmp/f", O_CREAT | O_EXCL, 0) == E.EEXIST
    ap = fs.openat(AT_FDCWD, b"/tmp/f", O_WRONLY | O_APPEND, 0)
    fs.write(ap, b"+")
    assert fs.pread(fd, 100, 0) == b"Jel+"
    tr = fs.openat(AT_FDCWD, b"/tmp/f", O_WRONLY | O_TRUNC, 0)
    assert fs.pread(fd, 100, 0) == b"" and fs.lseek(tr, 0, 2) == 0
    ro = fs.openat(AT_FDCWD, b"/tmp/f", O_RDONLY, 0)
    assert err(fs.write, ro, b"x") == E.EBADF and err(fs.ftruncate, ro, 0) == E.EINVAL
    # directories, listing, rename, unlink
    fs.mkdirat(AT_FDCWD, b"/tmp/d", 0o700)
    assert err(fs.mkdirat, AT_FDCWD, b"/tmp/d", 0o700) == E.EEXIST
    fs.renameat(AT_FDCWD, b"/tmp/f", AT_FDCWD, b"/tmp/d/g")
    assert err(fs.fstatat, AT_FDCWD, b"/tmp/f", 0) == E.ENOENT
    assert fs.fstatat(AT_FDCWD, b"/tmp/d/g", 0) == fs.fstat(fd)
    assert fs.readlinkat(AT_FDCWD, b"/proc/self/fd/%d" % fd) == b"/tmp/d/g"
    dfd = fs.openat(AT_FDCWD, b"/tmp/d", O_DIRECTORY, 0)
    assert [n for n, _, _ in dents(fs, dfd)] == [b".", b"..", b"g"]
    assert err(fs.unlinkat, AT_FDCWD, b"/tmp/d", AT_REMOVEDIR) == E.ENOTEMPTY
    assert err(fs.unlinkat, AT_FDCWD, b"/tmp/d", 0) == E.EISDIR
    assert err(fs.unlinkat, AT_FDCWD, b"/tmp/d/g", AT_REMOVEDIR) == E.ENOTDIR
    assert err(fs.renameat, AT_FDCWD, b"/tmp/d", AT_FDCWD, b"/tmp/d/x") == E.EINVAL
    fs.unlinkat(dfd, b"g", 0)
    assert fs.readlinkat(AT_FDCWD, b"/proc/self/fd/%d" % fd) == b"/tmp/d/g (deleted)"
    assert fs.write(fd, b"still open") == 10                                # unlinked, open
    assert st(fs.fstat(fd))["nlink"] == 0
    fs.unlinkat(AT_FDCWD, b"/tmp/d", AT_REMOVEDIR)
    assert [n for n, _, _ in dents(fs, fs.openat(AT_FDCWD, b"/tmp", O_DIRECTORY, 0))] == [b".", b".."]
    # rename flags
    for name in (b"/tmp/p", b"/tmp/q"):
        fs.write(fs.openat(AT_FDCWD, name, O_CREAT | O_WRONLY, 0o600), name)
    assert err(fs.renameat, AT_FDCWD, b"/tmp/p", AT_FDCWD, b"/tmp/q", RENAME_NOREPLACE) == E.EEXIST
    fs.renameat(AT_FDCWD, b"/tmp/p", AT_FDCWD, b"/tmp/q", RENAME_EXCHANGE)
    assert read_all(fs, fs.openat(AT_FDCWD, b"/tmp/q", 0, 0)) == b"/tmp/p"
    fs.renameat(AT_FDCWD, b"/tmp/p", AT_FDCWD, b"/tmp/q")
    assert read_all(fs, fs.openat(AT_FDCWD, b"/tmp/q", 0, 0)) == b"/tmp/q"
    # chmod in /tmp only
    fs.fchmodat(AT_FDCWD, b"/tmp/q", 0o4755)
    assert st(fs.fstatat(AT_FDCWD, b"/tmp/q", 0))["mode"] == stat.S_IFREG | 0o4755
    fs.fchmod(fs.openat(AT_FDCWD, b"/tmp", O_DIRECTORY, 0), 0o700)
    assert st(fs.fstatat(AT_FDCWD, b"/tmp", 0))["mode"] == stat.S_IFDIR | 0o700
    assert err(fs.fchmodat, AT_FDCWD, b"/data/a.txt", 0o777) == E.EROFS
    assert err(fs.fchmod, 0, 0o777) == E.EROFS
    # O_TMPFILE: an unnamed file
    t = fs.openat(AT_FDCWD, b"/tmp", O_TMPFILE | O_RDWR, 0o600)
    assert fs.write(t, b"anon") == 4 and fs.pread(t, 9, 0) == b"anon"
    assert err(fs.openat, AT_FDCWD, b"/data", O_TMPFILE | O_RDWR, 0o600) == E.EOPNOTSUPP


def test_tmp_is_capped(tree):
    fs = FileSystem([], tmp_size=64 << 10)
    fd = fs.openat(AT_FDCWD, b"/tmp/big", O_CREAT | O_RDWR, 0o600)
    n = fs.write(fd, bytes(100 << 10))
    assert 0 < n < 64 << 10                                 # a short write, then ENOSPC
    assert err(fs.write, fd, b"x") == E.ENOSPC
    assert err(fs.ftruncate, fd, 1 << 40) == E.ENOSPC
    assert err(fs.pwrite, fd, b"x", 1 << 50) == E.ENOSPC
    # many empty files: metadata is charged too
    with pytest.raises(LinuxError) as info:
        for i in range(1000):
            fs.close(fs.openat(AT_FDCWD, b"/tmp/%d" % i, O_CREAT | O_WRONLY, 0o600))
    assert info.value.errno == E.ENOSPC
    for i in range(1000):
        try:
            fs.unlinkat(AT_FDCWD, b"/tmp/%d" % i, 0)
        except LinuxError:
            break
    # unlinked space is freed only once no fd holds the file
    fs.unlinkat(AT_FDCWD, b"/tmp/big", 0)
    assert err(fs.openat, AT_FDCWD, b"/tmp/x", O_CREAT | O_WRONLY, 0o600) == E.ENOSPC
    fs.close(fd)
    x = fs.openat(AT_FDCWD, b"/tmp/x", O_CREAT | O_WRONLY, 0o600)
    assert fs.write(x, bytes(32 << 10)) == 32 << 10


# ---------------------------------------------------------------------------------- warm start

def observe(fs):
    """What the guest can see: every fd's offset/flags/cloexec/target, cwd, umask, /tmp tree."""
    fds = {}
    for fd in range(32):
        try:
            raw = fs.fstat(fd)                      # less st_atime: reads move the host's
            fds[fd] = (fs.lseek(fd, 0, 1) if fs.console(fd) is None else None,
                       fs.fcntl(fd, F_GETFL), fs.fcntl(fd, F_GETFD), raw[:72] + raw[88:],
                       fs.readlinkat(AT_FDCWD, b"/proc/self/fd/%d" % fd))
        except LinuxError as e:
            assert e.errno == E.EBADF
    tmp = {}

    def walk(path):
        d = fs.openat(AT_FDCWD, path, O_DIRECTORY, 0)
        for name, dtype, _ in dents(fs, d):
            if name in (b".", b".."):
                continue
            p = path + b"/" + name
            meta = fs.fstatat(AT_FDCWD, p, AT_SYMLINK_NOFOLLOW)
            if dtype == 4:
                tmp[p] = meta
                walk(p)
            else:
                f = fs.openat(AT_FDCWD, p, 0, 0)
                tmp[p] = (meta, fs.contents(f))
                fs.close(f)
        fs.close(d)

    walk(b"/tmp")
    old = fs.umask(0)
    fs.umask(old)
    return fds, fs.getcwd(), old, tmp


def test_capture_reset_restores_exactly(fs):
    a = fs.openat(AT_FDCWD, b"a.txt", O_RDONLY | O_CLOEXEC, 0)
    fs.read(a, 100)
    fs.dup2(a, 7)
    fs.mkdirat(AT_FDCWD, b"/tmp/d", 0o755)
    t = fs.openat(AT_FDCWD, b"/tmp/d/f", O_CREAT | O_RDWR | O_APPEND, 0o644)
    fs.write(t, b"v1")
    gone = fs.openat(AT_FDCWD, b"/tmp/gone", O_CREAT | O_RDWR, 0o600)
    fs.write(gone, b"unlinked but open")
    fs.unlinkat(AT_FDCWD, b"/tmp/gone", 0)
    fs.chdir(b"/tmp/d")
    fs.umask(0o077)
    before = observe(fs)
    state = fs.capture()
    assert fs.capture() is state                     # nothing changed: the same state
    with pytest.raises(AttributeError):
        state.umask = 0                              # immutable
    # change everything
    fs.read(a, 7)
    fs.close(7)
    fs.write(t, b"v2" * 1000)
    fs.pwrite(gone, b"UN", 0)
    fs.fcntl(t, F_SETFL, 0)
    fs.renameat(AT_FDCWD, b"/tmp/d/f", AT_FDCWD, b"/tmp/moved")
    fs.mkdirat(AT_FDCWD, b"/tmp/new", 0o700)
    fs.chdir(b"/")
    fs.umask(0)
    for _ in range(5):
        fs.dup(0)
    assert observe(fs) != before
    fs.reset(state)
    assert observe(fs) == before
    assert fs.lseek(a, 0, 1) == 100 and fs.fcntl(7, F_GETFD) == 0
    assert fs.pread(gone, 100, 0) == b"unlinked but open"
    assert fs.capture() == state
    # the captured contents were never written through (copy-on-write)
    fs.reset(state)
    fs.write(t, b"v3")
    fs.reset(state)
    assert fs.pread(t, 100, 0) == b"v1"
    fs.reset(state)                                  # unchanged since: a no-op
    assert observe(fs) == before


def test_reset_offsets_exact(fs, tree):
    host = (tree / "data" / "a.txt").read_bytes()
    fd = fs.openat(AT_FDCWD, b"a.txt", 0, 0)
    fs.read(fd, 123)
    state = fs.capture()
    fs.read(fd, 1000)
    fs.reset(state)
    assert fs.read(fd, 10) == host[123:133]
    fs.close(fd)
    fs.reset(state)
    assert fs.read(fd, 10) == host[123:133]


def test_reset_rounds_and_older_states(fs, tree):
    """Many warm rounds (only what moved is put back), then states older than the last one."""
    host = (tree / "data" / "a.txt").read_bytes()
    a = fs.openat(AT_FDCWD, b"a.txt", 0, 0)
    b = fs.dup(a)
    d = fs.openat(AT_FDCWD, b"sub", O_DIRECTORY, 0)
    fs.read(a, 10)
    first = fs.capture()
    before = observe(fs)
    for i in range(5):
        assert fs.read(b, 7) == host[10:17]         # the shared offset came back
        fs.lseek(a, 3 * i, 1)
        fs.fcntl(b, F_SETFL, O_APPEND | O_NONBLOCK)
        fs.getdents64(d, 64)
        if i % 2:
            fs.close(a)
            fs.dup2(d, 12)
            fs.openat(AT_FDCWD, b"/other/c.txt", 0, 0)
        fs.reset(first)
        assert observe(fs) == before
    fs.read(a, 90)
    second = fs.capture()
    assert second != first and fs.lseek(a, 0, 1) == 100
    fs.close(b)
    fs.reset(first)                                 # older than the last capture
    assert observe(fs) == before
    fs.reset(second)
    assert fs.lseek(b, 0, 1) == 100
    fs.reset(first)
    assert fs.read(a, 7) == host[10:17]
    for _ in range(5000):                           # a long run between restores stays small
        fs.lseek(a, 1, 1)
        fs.close(fs.openat(AT_FDCWD, b"a.txt", 0, 0))
    assert len(fs._touched) == 1
    fs.reset(first)
    assert observe(fs) == before


def test_reset_makes_no_host_calls(fs, monkeypatch):
    fds = [fs.openat(AT_FDCWD, p, 0, 0) for p in (b"a.txt", b"sub/b.bin", b"/other/c.txt", b"sub")]
    for fd in fds[:-1]:
        fs.read(fd, 10)
    fs.getdents64(fds[-1], 100)
    state = fs.capture()
    fs.read(fds[0], 10)
    fs.close(fds[1])
    calls = []
    for name in ("lstat", "stat", "open", "readlink", "scandir", "listdir"):
        monkeypatch.setattr(os, name, lambda *a, _n=name, **k: calls.append(_n))
    fs.reset(state)
    fs.capture()
    assert calls == []


def test_encode_decode_round_trip(fs, tree):
    a = fs.openat(AT_FDCWD, b"a.txt", 0, 0)
    fs.read(a, 50)
    fs.mkdirat(AT_FDCWD, b"/tmp/d", 0o755)
    t = fs.openat(AT_FDCWD, b"/tmp/d/f", O_CREAT | O_RDWR, 0o644)
    fs.write(t, bytes(range(256)) * 10)
    gone = fs.openat(AT_FDCWD, b"/tmp/x", O_CREAT | O_RDWR, 0o600)
    fs.unlinkat(AT_FDCWD, b"/tmp/x", 0)
    fs.openat(AT_FDCWD, b"/proc/self/maps", 0, 0)
    fs.openat(AT_FDCWD, b"/proc/self/fd/%d" % a, O_PATH | O_NOFOLLOW, 0)
    fs.chdir(b"/tmp/d")
    fs.dup2(1, 9)
    before = observe(fs)
    state = fs.capture()
    blob = fs.encode(state)
    back = FileSystem.decode(blob)
    assert back == state
    # a fresh FileSystem with the same read paths takes it
    fresh = FileSystem({"/data": tree / "data", "/other": tree / "other"}, tmp_size=1 << 20,
                       exe="/data/run.sh", proc_maps=lambda: b"00400000-00401000 r-xp\n")
    fresh.reset(back)
    assert observe(fresh) == before
    assert fresh.console(9) == "stdout"
    assert fresh.pread(gone, 10, 0) == b""
    # ... and one without them cannot, and says why
    bare = FileSystem([])
    with pytest.raises(SnapshotError, match="/data/a.txt"):
        bare.reset(back)
    small = FileSystem({"/data": tree / "data", "/other": tree / "other"}, tmp_size=1000)
    with pytest.raises(SnapshotError, match="tmp_size"):
        small.reset(back)


def test_decode_rejects_garbage(fs):
    fs.write(fs.openat(AT_FDCWD, b"/tmp/f", O_CREAT | O_WRONLY, 0o600), b"data")
    fs.openat(AT_FDCWD, b"a.txt", 0, 0)
    blob = fs.encode(fs.capture())
    for bad in (b"", b"junk", blob[:7], blob + b"\0", os.urandom(200), blob[:8] + os.urandom(100)):
        with pytest.raises(ValueError):
            FileSystem.decode(bad)
    for cut in range(8, len(blob), 7):                      # every truncation
        with pytest.raises(ValueError):
            FileSystem.decode(blob[:cut])
    import random
    rng = random.Random(1)
    for _ in range(300):                                    # bit flips: ValueError or a valid state
        b = bytearray(blob)
        b[rng.randrange(8, len(b))] ^= 1 << rng.randrange(8)
        try:
            FileSystem.decode(bytes(b))
        except ValueError:
            pass


def test_locks_are_captured_reset_and_decoded_exactly(fs, tree):
    """Record locks and flock locks are file-system state: a reset puts back exactly the
    snapshot's (taken since: gone; released since: back), also through encode/decode into a fresh
    FileSystem; a decoded lock is taken as a request would be (conflicts, access mode, bound)."""
    a = fs.openat(AT_FDCWD, b"/tmp/db", O_CREAT | O_RDWR, 0o644)
    b = fs.openat(AT_FDCWD, b"/tmp/db", O_RDWR, 0)
    host = fs.openat(AT_FDCWD, b"a.txt", O_RDONLY, 0)
    fs.record_lock(a, F_SETLK, F_WRLCK, 0, 0, 10, 0)
    fs.record_lock(b, F_OFD_SETLK, F_RDLCK, 0, 20, 0, 0)
    fs.record_lock(host, F_SETLK, F_RDLCK, 0, 0, 0, 0)          # a read lock on a read root's file
    assert err(fs.record_lock, host, F_SETLK, F_WRLCK, 0, 0, 0, 0) == E.EBADF
    fs.flock(a, LOCK_EX)
    probe = fs.openat(AT_FDCWD, b"/tmp/db", O_RDWR, 0)

    def seen():
        return (fs.record_lock(probe, F_OFD_GETLK, F_WRLCK, 0, 0, 0, 0),
                fs.record_lock(probe, F_OFD_GETLK, F_WRLCK, 0, 15, 0, 0),
                fs.record_lock(a, F_GETLK, F_WRLCK, 0, 25, 1, 0))

    before = seen()
    assert before == ((F_WRLCK, 0, 9, True), (F_RDLCK, 20, (1 << 63) - 1, False),
                      (F_RDLCK, 20, (1 << 63) - 1, False))
    assert err(fs.flock, probe, LOCK_SH | LOCK_NB) == E.EAGAIN
    state = fs.capture()
    fs.close(b)                                         # all of them go: b's last fd, a POSIX close
    fs.flock(a, 8)
    fs.record_lock(probe, F_OFD_SETLK, F_WRLCK, 0, 0, 0, 0)
    assert seen() == (None, None, (F_WRLCK, 0, (1 << 63) - 1, False))   # probe's own only
    fs.reset(state)
    assert seen() == before and err(fs.flock, probe, LOCK_SH | LOCK_NB) == E.EAGAIN
    fresh = FileSystem({"/data": tree / "data", "/other": tree / "other"}, tmp_size=1 << 20,
                       exe="/data/run.sh", proc_maps=lambda: b"00400000-00401000 r-xp\n")
    back = FileSystem.decode(fs.encode(state))
    assert back == state and len(back.locks) == 4
    fresh.reset(back)
    fs = fresh
    assert seen() == before and err(fs.flock, probe, LOCK_SH | LOCK_NB) == E.EAGAIN
    # hostile lock records: decode or reset refuses them
    fields = tuple(back)
    idx = {fd: i for fd, i, _ in back.fds}
    for locks in (((0, idx[a], 1, 5, 4),), ((3, idx[a], 1, 0, 0),), ((0, idx[a], 2, 0, 0),),
                  ((0, 99, 1, 0, 0),), ((2, idx[a], 1, 3, 9),), ((0, idx[a], 1, -1, 0),),
                  ((0, idx[a], 1, 0, 0),) * (MAX_LOCKS + 1), ((True, idx[a], 1, 0, 0),)):
        with pytest.raises(ValueError):
            FileSystem.decode(_craft(fields[:6] + (locks,)))
    for locks, why in ((((1, idx[a], 1, 0, 0), (1, idx[b], 1, 0, 0)), "cannot be held"),
                       (((0, idx[host], 1, 0, 0),), "access mode")):
        with pytest.raises(SnapshotError, match=why):
            FileSystem({"/data": tree / "data", "/other": tree / "other"}, tmp_size=1 << 20,
                       exe="/data/run.sh").reset(FileSystem.decode(_craft(fields[:6] + (locks,))))
    # a state written before locks existed has none
    assert FileSystem.decode(_craft(fields[:6])).locks == ()


def test_statfs_magic_per_file_system(fs):
    magic = {path: struct.unpack_from("<q", fs.statfs(path))[0]
             for path in (b"/tmp", b"/proc/self", b"/sys", b"/dev/null", b"/data", b"/")}
    assert magic == {b"/tmp": 0x01021994, b"/proc/self": 0x9FA0, b"/sys": 0x62656572,
                     b"/dev/null": 0x01021994, b"/data": 0x794C7630, b"/": 0x794C7630}
    assert len(fs.fstatfs(1)) == 120 and err(fs.statfs, b"/nope") == E.ENOENT
    assert err(fs.fstatfs, 77) == E.EBADF


def test_utimensat_sets_tmp_times_and_snapshots_keep_them(fs, tree):
    fd = fs.openat(AT_FDCWD, b"/tmp/f", O_CREAT | O_RDWR, 0o644)
    times = lambda: (lambda s: (s["atime"], s["mtime"]))(statx_times(fs.fstat(fd)))
    fs.utimensat(AT_FDCWD, b"/tmp/f", 1_500_000_000, 2_000_000_001, 0)
    assert times() == (1_500_000_000, 2_000_000_001)
    fs.utimensat(fd, None, UTIME_OMIT, 7, 0)                        # futimens
    assert times() == (1_500_000_000, 7)
    fs.utimensat(AT_FDCWD, b"/tmp/f", UTIME_NOW, UTIME_OMIT, 0)
    assert times()[0] > 10**18 and times()[1] == 7
    fs.write(fd, b"x")                                              # a write: mtime only
    at = times()[0]
    fs.utimensat(AT_FDCWD, b"/tmp/f", 11, 12, 0)
    state = fs.capture()
    fs.utimensat(AT_FDCWD, b"/tmp/f", 13, 14, 0)
    fs.reset(state)
    assert times() == (11, 12) and at > 10**18
    back = FileSystem.decode(fs.encode(state))
    fresh = FileSystem({"/data": tree / "data", "/other": tree / "other"}, tmp_size=1 << 20,
                       exe="/data/run.sh", proc_maps=lambda: b"00400000-00401000 r-xp\n")
    fresh.reset(back)
    assert statx_times(fresh.fstat(fd))["atime"] == 11
    assert err(fs.utimensat, AT_FDCWD, b"/data/a.txt", UTIME_NOW, UTIME_NOW, 0) == E.EROFS
    assert fs.utimensat(AT_FDCWD, b"/data/a.txt", UTIME_OMIT, UTIME_OMIT, 0) == 0
    assert err(fs.utimensat, fd, None, 1, 1, AT_SYMLINK_NOFOLLOW) == E.EINVAL
    assert err(fs.utimensat, AT_FDCWD, b"/tmp/nope", 1, 1, 0) == E.ENOENT


def statx_times(raw):
    f = STAT.unpack(raw)
    return {"atime": f[11] * 10**9 + f[12], "mtime": f[13] * 10**9 + f[14]}


def test_user_database_is_synthesized_unless_the_policy_maps_one(tmp_path):
    fs = FileSystem([], uid=1000, gid=1000)
    passwd = fs.openat(AT_FDCWD, b"/etc/passwd", O_RDONLY, 0)
    assert read_all(fs, passwd).splitlines()[-1] == b"sandbox:x:1000:1000:whpfast sandbox:/tmp:/bin/sh"
    assert read_all(fs, fs.openat(AT_FDCWD, b"/etc/group", O_RDONLY, 0)).endswith(b"\nsandbox:x:1000:\n")
    assert err(fs.openat, AT_FDCWD, b"/etc/passwd", O_RDWR, 0) == E.EACCES     # as /proc files
    back = FileSystem.decode(fs.encode(fs.capture()))       # open, it is kept as its contents
    fresh = FileSystem([], uid=1000, gid=1000)
    fresh.reset(back)
    assert fresh.pread(passwd, 4, 0) == b"root"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_bytes(b"host:x:5:5::/:/bin/false\n")
    mapped = FileSystem({"/etc": tmp_path / "etc"}, uid=1000, gid=1000)
    passwd = mapped.openat(AT_FDCWD, b"/etc/passwd", O_RDONLY, 0)
    assert read_all(mapped, passwd) == b"host:x:5:5::/:/bin/false\n"
    assert read_all(mapped, mapped.openat(AT_FDCWD, b"/etc/group", O_RDONLY, 0)).startswith(b"root")
    back = FileSystem.decode(mapped.encode(mapped.capture()))  # the host's open: no contents
    again = FileSystem({"/etc": tmp_path / "etc"}, uid=1000, gid=1000)
    again.reset(back)
    assert again.pread(passwd, 4, 0) == b"host"


def test_lock_count_is_bounded(fs):
    a = fs.openat(AT_FDCWD, b"/tmp/f", O_CREAT | O_RDWR, 0o644)
    for i in range(MAX_LOCKS):
        fs.record_lock(a, F_SETLK, F_RDLCK, 0, 2 * i, 1, 0)
    assert err(fs.record_lock, a, F_SETLK, F_RDLCK, 0, 2 * MAX_LOCKS, 1, 0) == E.ENOLCK
    assert err(fs.flock, a, LOCK_SH) == E.ENOLCK
    fs.record_lock(a, F_SETLK, F_RDLCK, 0, 1, 1, 0)          # merges three into one: fine
    fs.flock(a, LOCK_SH)
    fs.close(a)
    b = fs.openat(AT_FDCWD, b"/tmp/f", O_RDWR, 0)
    fs.record_lock(b, F_SETLK, F_WRLCK, 0, 0, 1, 0)            # all released with the close


def _craft(fields):
    from whpfast.linux.fs.state import _MAGIC, _dump
    out = [_MAGIC]
    _dump(fields, out)
    return b"".join(out)


def test_decode_rejects_hostile_states(fs):
    good = tuple(fs.capture())
    fds, descs, cwd, umask, tmp, ino, _ = good
    root = tmp[0]
    child = (99, stat.S_IFREG, 0o644, 0, 0, 0, b"f", b"x")
    cases = {
        "path with ..": (fds, descs + ((("p", b"/data/../../etc/passwd"), 0, 0, None),), cwd, umask, tmp, ino),
        "relative path": (fds, descs, ("p", b"data"), umask, tmp, ino),
        "fd to nowhere": (fds + ((5, 42, False),), descs, cwd, umask, tmp, ino),
        "negative offset": (fds, descs + ((("c", "stdin"), 0, -1, None),), cwd, umask, tmp, ino),
        "child before parent": (fds, descs, cwd, umask, (root, (98, stat.S_IFREG, 0, 0, 0, 2, b"a", b""),
                                                          child), ino),
        "parent is a file": (fds, descs, cwd, umask, (root, child, (97, stat.S_IFREG, 0, 0, 0, 1, b"g", b"")), ino),
        "name with slash": (fds, descs, cwd, umask, (root, child[:6] + (b"a/b", b"")), ino),
        "name ..": (fds, descs, cwd, umask, (root, child[:6] + (b"..", b"")), ino),
        "repeated name": (fds, descs, cwd, umask, (root, child, child[:1] + (100,)[:0] + child[1:]), ino),
        "directory with contents": (fds, descs, cwd, umask, (root[:7] + (b"x",),), ino),
        "cwd is a file": (fds, descs, ("t", 1), umask, (root, child), ino),
        "tmp ref out of range": (fds, descs, ("t", 5), umask, tmp, ino),
        "bad console": (fds, descs + ((("c", "tty"), 0, 0, None),), cwd, umask, tmp, ino),
        "bad mode": (fds, descs, cwd, umask, (root[:2] + (0o170000,) + root[3:],), ino),
        "bool as fd": (((True, 0, False),), descs, cwd, umask, tmp, ino),
        "wrong arity": (fds, descs, cwd, umask, tmp),
    }
    for why, fields in cases.items():
        with pytest.raises(ValueError):
            FileSystem.decode(_craft(fields))
            pytest.fail(why)
    deep = ()
    for _ in range(50):
        deep = (deep,)
    with pytest.raises(ValueError, match="deep"):
        FileSystem.decode(_craft(deep))


# ----------------------------------------------------------------------------------- read policy

def test_mapping_form_root(tree, tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr" / "lib").mkdir(parents=True)
    (rootfs / "usr" / "lib" / "x.so").write_bytes(b"\x7fELF")
    (rootfs / "proc").mkdir()
    (rootfs / "proc" / "fake").write_bytes(b"not the real proc")
    os.symlink("usr/lib", rootfs / "lib")
    os.symlink("/../../..", rootfs / "usr" / "up")
    fs = FileSystem({"/": rootfs, "/usr/lib/extra": tree / "other"}, cwd="/usr")
    assert read_all(fs, fs.openat(AT_FDCWD, b"/lib/x.so", 0, 0)) == b"\x7fELF"
    assert read_all(fs, fs.openat(AT_FDCWD, b"lib/extra/c.txt", 0, 0)) == b"other root\n"
    assert fs.fstatat(AT_FDCWD, b"/usr/up", 0) == fs.fstatat(AT_FDCWD, b"/", 0)
    assert err(fs.openat, AT_FDCWD, b"/proc/fake", 0, 0) == E.ENOENT         # /proc is ours
    names = {n for n, _, _ in dents(fs, fs.openat(AT_FDCWD, b"/usr/lib", O_DIRECTORY, 0))}
    assert names == {b".", b"..", b"x.so", b"extra"}
    names = {n for n, _, _ in dents(fs, fs.openat(AT_FDCWD, b"/", O_DIRECTORY, 0))}
    assert {b"usr", b"lib", b"proc", b"tmp", b"dev", b"sys"} <= names
    assert fs.getcwd() == b"/usr"


def test_whole_host_root_keeps_proc_dev_tmp_synthesized(tmp_path):
    fs = FileSystem({"/": "/"}, exe="/usr/bin/python3")
    status = read_all(fs, fs.openat(AT_FDCWD, b"/proc/self/status", 0, 0))
    assert b"Pid:\t1\n" in status and b"python3" in status
    assert err(fs.fstatat, AT_FDCWD, b"/proc/1/environ", 0) == E.ENOENT     # not the host's /proc
    assert err(fs.readlinkat, AT_FDCWD, b"/proc/self/root") == E.ENOENT
    assert {n for n, _, _ in dents(fs, fs.openat(AT_FDCWD, b"/tmp", O_DIRECTORY, 0))} == {b".", b".."}
    devs = {n for n, _, _ in dents(fs, fs.openat(AT_FDCWD, b"/dev", O_DIRECTORY, 0))}
    assert devs == {b".", b"..", b"null", b"zero", b"random", b"urandom", b"fd", b"stdin",
                    b"stdout", b"stderr"}
    assert read_all(fs, fs.openat(AT_FDCWD, b"/sys/devices/system/cpu/online", 0, 0)) == b"0\n"
    assert st(fs.fstatat(AT_FDCWD, b"/usr/bin", 0))["ino"] == os.stat("/usr/bin").st_ino
    assert err(fs.openat, AT_FDCWD, b"/etc/hostname", O_WRONLY, 0) == E.EROFS
    assert err(fs.openat, AT_FDCWD, str(tmp_path).encode(), O_DIRECTORY, 0) == E.ENOENT  # host /tmp
    link = fs.openat(AT_FDCWD, b"/dev/stdout", O_PATH | O_NOFOLLOW, 0)
    assert fs.readlinkat(link, b"") == b"/proc/self/fd/1"
    assert err(fs.readlinkat, fs.openat(AT_FDCWD, b"/usr", O_DIRECTORY, 0), b"") == E.ENOENT
    fs.close_all()


def test_read_policy_errors(tree):
    # each message names the side that is wrong: {inside: host}, always
    with pytest.raises(ReadPolicyError, match=r"^read: host path '.*missing' does not exist$"):
        FileSystem({"/m": tree / "missing"})
    with pytest.raises(ReadPolicyError, match=r"^read: inside path '/proc/x' is under /proc or /dev"):
        FileSystem({"/proc/x": tree / "data"})
    with pytest.raises(ReadPolicyError, match=r"^read: inside path '/dev' is under /proc or /dev"):
        FileSystem({"/dev": tree / "data"})
    with pytest.raises(ReadPolicyError, match=r"^read: inside path '/tmp/' is the sandbox's own /tmp"):
        FileSystem({"/tmp/": tree / "data"})
    with pytest.raises(ReadPolicyError, match=r"host path '/data' does not exist \(a mapping is \{inside: host\}"):
        FileSystem({str(tree / "data"): "/data"})   # swapped: the hint says which side is which
    FileSystem([tree / "data"]).close_all()         # pytest's tmp_path is under /tmp: mounted there
    with pytest.raises(ReadPolicyError, match="absolute"):
        FileSystem({"data": tree / "data"})
    with pytest.raises(ReadPolicyError):
        FileSystem({"/a": tree / "data" / "a.txt", "/a/b": tree / "other"})
    with pytest.raises(ReadPolicyError, match="cwd"):
        FileSystem({"/data": tree / "data"}, cwd="/nowhere")
    with pytest.raises(TypeError):
        FileSystem(str(tree / "data"))
    assert issubclass(ReadPolicyError, WhpfastError)
    # a file root is the file itself (its symlink resolved on the host), nothing beside it
    os.symlink(tree / "data" / "a.txt", tree / "alink")
    fs = FileSystem({"/f/a": tree / "alink"})
    assert read_all(fs, fs.openat(AT_FDCWD, b"/f/a", 0, 0)).startswith(b"hello")
    assert stat.S_ISREG(st(fs.fstatat(AT_FDCWD, b"/f/a", AT_SYMLINK_NOFOLLOW))["mode"])
    assert err(fs.openat, AT_FDCWD, b"/f/run.sh", 0, 0) == E.ENOENT


def test_read_entries_under_tmp_are_read_only_mounts_in_the_sandbox_tmp(tree):
    """A read entry below /tmp is a read-only bind mount over the sandbox's own /tmp, at the
    same path (list form) or where {inside: host} says: the host tree through it, writes EROFS,
    the mount point EBUSY to remove or move, and every state keeps it whatever the guest did."""
    data = tree / "data"                            # under the host's /tmp (pytest's tmp_path)
    for read, inside in (([data], os.fsencode(data)), ({"/tmp/in/here": data}, b"/tmp/in/here")):
        fs = FileSystem(read, tmp_size=1 << 20)
        parent = os.path.dirname(inside)
        assert read_all(fs, fs.openat(AT_FDCWD, inside + b"/a.txt", O_RDONLY)) == (data / "a.txt").read_bytes()
        assert read_all(fs, fs.openat(AT_FDCWD, inside + b"/sub/rel", O_RDONLY)).startswith(b"hello")
        assert st(fs.fstatat(AT_FDCWD, inside, 0))["ino"] == os.stat(data).st_ino
        assert [n for n, _, _ in dents(fs, fs.openat(AT_FDCWD, parent, O_DIRECTORY))][-1:] == [os.path.basename(inside)]
        assert err(fs.openat, AT_FDCWD, inside + b"/new", O_CREAT | O_WRONLY, 0o644) == E.EROFS
        assert err(fs.openat, AT_FDCWD, inside + b"/a.txt", O_WRONLY) == E.EROFS
        assert err(fs.mkdirat, AT_FDCWD, inside + b"/d", 0o755) == E.EROFS
        assert err(fs.mkdirat, AT_FDCWD, inside, 0o755) == E.EEXIST
        assert err(fs.unlinkat, AT_FDCWD, inside + b"/a.txt", 0) == E.EROFS
        assert err(fs.unlinkat, AT_FDCWD, inside, AT_REMOVEDIR) == E.EBUSY
        assert err(fs.unlinkat, AT_FDCWD, inside, 0) == E.EISDIR
        assert err(fs.renameat, AT_FDCWD, inside, AT_FDCWD, b"/tmp/moved") == E.EBUSY
        assert err(fs.renameat, AT_FDCWD, inside + b"/a.txt", AT_FDCWD, b"/tmp/a") == E.EXDEV
        fs.openat(AT_FDCWD, b"/tmp/f", O_CREAT | O_WRONLY, 0o644)
        assert err(fs.renameat, AT_FDCWD, b"/tmp/f", AT_FDCWD, inside) == E.EISDIR
        fs.mkdirat(AT_FDCWD, b"/tmp/e", 0o755)
        assert err(fs.renameat, AT_FDCWD, b"/tmp/e", AT_FDCWD, inside) == E.EBUSY
        assert err(fs.renameat, AT_FDCWD, b"/tmp/e", AT_FDCWD, inside, RENAME_EXCHANGE) == E.EBUSY
        if parent != b"/tmp":
            # its directories are ordinary /tmp ones, but stay where they are (documented)
            assert err(fs.renameat, AT_FDCWD, parent, AT_FDCWD, b"/tmp/p2") == E.EBUSY
            assert err(fs.renameat, AT_FDCWD, b"/tmp/e", AT_FDCWD, parent, RENAME_EXCHANGE) == E.EBUSY
            assert err(fs.unlinkat, AT_FDCWD, parent, AT_REMOVEDIR) == E.ENOTEMPTY
            fs.openat(AT_FDCWD, parent + b"/beside", O_CREAT | O_WRONLY, 0o644)
        # ".." from inside the mount is the tmpfs directory it hangs in, across resets too
        state = fs.capture()
        fs.chdir(inside + b"/sub")
        assert fs.getcwd() == inside + b"/sub"
        fs.chdir(b"../..")
        assert fs.getcwd() == parent
        fs.reset(state)
        fs.chdir(inside)
        assert fs.getcwd() == inside
        fs.chdir(b"..")
        assert fs.getcwd() == parent
        fs.chdir(b"/")
        fs.unlinkat(AT_FDCWD, b"/tmp/f", 0)
        fs.reset(fs.decode(fs.encode(state)))       # a snapshot file's state: the mount is back
        assert read_all(fs, fs.openat(AT_FDCWD, inside + b"/sub/deep/c", O_RDONLY)) == b"c"
        assert err(fs.unlinkat, AT_FDCWD, inside, AT_REMOVEDIR) == E.EBUSY
        fs.close_all()
    # a file mount; a mount below another (in the host tree); an entry naming a missing tmp dir
    fs = FileSystem({"/tmp/f.txt": data / "a.txt", "/tmp/d": data, "/tmp/d/sub/deep/x": data / "run.sh"})
    assert err(fs.unlinkat, AT_FDCWD, b"/tmp/f.txt", 0) == E.EBUSY
    assert err(fs.unlinkat, AT_FDCWD, b"/tmp/f.txt", AT_REMOVEDIR) == E.ENOTDIR
    assert read_all(fs, fs.openat(AT_FDCWD, b"/tmp/d/sub/deep/x", O_RDONLY)) == b"#!/bin/sh\n"
    assert b"x" in [n for n, _, _ in dents(fs, fs.openat(AT_FDCWD, b"/tmp/d/sub/deep", O_DIRECTORY))]
    # a state taken under another read policy: refused, and nothing changes
    other, nested = FileSystem({"/tmp/g": data}), FileSystem({"/tmp/in/here": data})
    with pytest.raises(SnapshotError, match="no directory for the read mount /tmp/in/here"):
        nested.reset(other.capture())
    assert read_all(nested, nested.openat(AT_FDCWD, b"/tmp/in/here/a.txt", O_RDONLY)).startswith(b"hello")
    other.openat(AT_FDCWD, b"/tmp/f.txt", O_CREAT | O_WRONLY, 0o644)
    with pytest.raises(SnapshotError, match="a file at the read mount /tmp/f.txt"):
        fs.reset(other.capture())
    assert read_all(fs, fs.openat(AT_FDCWD, b"/tmp/f.txt", O_RDONLY)).startswith(b"hello")
    # the mount points' directories are charged to tmp_size like any other
    with pytest.raises(ReadPolicyError, match="tmp_size"):
        FileSystem({b"/tmp/" + b"/".join([b"d" * 200] * 10): data}, tmp_size=4096)
    for fs in (fs, other, nested):
        fs.close_all()


def test_windows_host_names():
    """On a Windows host a Linux name must not mean a device, a stream or another file."""
    from whpfast.linux.fs import _windows_name_ok
    for name in (b"a.txt", b"python3.11", b".hidden", b"CONSOLE", b"nul_ok", b"x y"):
        assert _windows_name_ok(name), name
    for name in (b"..\\..\\x", b"a\\b", b"file:stream", b"NUL", b"con.txt", b"Com1", b"LPT9.log",
                 b"aux .c", b"a.", b"a ", b"a*", b"a?", b"<", b"a|b", b"a\x01"):
        assert not _windows_name_ok(name), name


def test_linux_error():
    e = LinuxError(E.ENOENT, "no such file")
    assert e.errno == 2 and "ENOENT" in str(e) and isinstance(e, WhpfastError)
    assert from_oserror(OSError(host_errno.ENOTDIR, "x")).errno == E.ENOTDIR
    assert from_oserror(OSError(0, "x")).errno == E.EIO


def test_cpython_stdlib_tree(tmp_path):
    """A real tree: every file of the json package reads back as the host has it."""
    import json
    pkg = os.path.dirname(json.__file__)
    fs = FileSystem([pkg])
    d = fs.openat(AT_FDCWD, pkg.encode(), O_DIRECTORY, 0)
    names = [n for n, _, _ in dents(fs, d) if n.endswith(b".py")]
    assert sorted(n.decode() for n in names) == sorted(n for n in os.listdir(pkg) if n.endswith(".py"))
    for n in names:
        fd = fs.openat(d, n, O_RDONLY | O_CLOEXEC, 0)
        assert st(fs.fstat(fd))["size"] == os.stat(os.path.join(pkg, n.decode())).st_size
        with open(os.path.join(pkg, n.decode()), "rb") as f:
            assert read_all(fs, fd) == f.read()
        fs.close(fd)


# ------------------------------------------------------------------------------------ hostility

def test_hostile_paths_and_numbers(fs):
    long_name = b"n" * 256
    assert err(fs.fstatat, AT_FDCWD, b"/" + b"a/" * 2048, 0) == E.ENAMETOOLONG
    assert err(fs.fstatat, AT_FDCWD, long_name, 0) == E.ENAMETOOLONG
    assert err(fs.openat, AT_FDCWD, b"/tmp/" + long_name, O_CREAT | O_WRONLY, 0o600) == E.ENAMETOOLONG
    assert err(fs.mkdirat, AT_FDCWD, b"/tmp/" + long_name, 0o700) == E.ENAMETOOLONG
    assert err(fs.openat, AT_FDCWD, b"a.txt\0/../../x", 0, 0) == E.EINVAL
    assert err(fs.openat, AT_FDCWD, b"/tmp/a\0b", O_CREAT | O_WRONLY, 0o600) == E.EINVAL
    assert err(fs.fstatat, AT_FDCWD, b"/proc/self/fd/0/x", 0) == E.ENOTDIR
    assert err(fs.fstatat, AT_FDCWD, b"/proc/self/fd/01", 0) == E.ENOENT
    # symlinks in /tmp: 40 in a chain resolve, 41 are ELOOP; a self loop is ELOOP
    fs.write(fs.openat(AT_FDCWD, b"/tmp/l0", O_CREAT | O_WRONLY, 0o600), b"end")
    for i in range(1, 42):
        fs.symlinkat(b"l%d" % (i - 1), AT_FDCWD, b"/tmp/l%d" % i)
    assert read_all(fs, fs.openat(AT_FDCWD, b"/tmp/l40", 0, 0)) == b"end"
    assert err(fs.openat, AT_FDCWD, b"/tmp/l41", 0, 0) == E.ELOOP
    fs.symlinkat(b"self", AT_FDCWD, b"/tmp/self")
    assert err(fs.fstatat, AT_FDCWD, b"/tmp/self/x", 0) == E.ELOOP
    assert fs.readlinkat(AT_FDCWD, b"/tmp/l1") == b"l0"
    # a /tmp symlink cannot leave the namespace either
    fs.symlinkat(b"../../../../../../etc/shadow", AT_FDCWD, b"/tmp/esc")
    assert err(fs.openat, AT_FDCWD, b"/tmp/esc", 0, 0) == E.ENOENT
    fs.symlinkat(b"/data/sub", AT_FDCWD, b"/tmp/in")
    assert fs.fstatat(AT_FDCWD, b"/tmp/in/b.bin", 0) == fs.fstatat(AT_FDCWD, b"/data/sub/b.bin", 0)
    assert err(fs.symlinkat, b"x", AT_FDCWD, b"/data/new") == E.EROFS
    # numbers from registers: huge, negative, unsigned forms
    fd = fs.openat(AT_FDCWD, b"/tmp/n", O_CREAT | O_RDWR, 0o600)
    assert err(fs.read, fd, -1) == E.EINVAL
    assert fs.read(fd, 1 << 62) == b""
    assert err(fs.lseek, fd, (1 << 64) - 1, 0) == E.EINVAL          # -1 as unsigned
    fs.lseek(fd, (1 << 63) - 1, 0)
    assert err(fs.lseek, fd, 1, 1) == E.EOVERFLOW
    assert err(fs.pwrite, fd, b"x", (1 << 63) - 1) == E.EFBIG
    assert err(fs.pread, fd, 1, -5) == E.EINVAL
    assert err(fs.getdents64, fs.openat(AT_FDCWD, b"/tmp", O_DIRECTORY, 0), 0) == E.EINVAL
    assert err(fs.fcntl, fd, 0, 1 << 31) == E.EINVAL
    assert err(fs.fcntl, fd, 0, -1) == E.EINVAL
    assert err(fs.renameat, AT_FDCWD, b"/tmp/n", AT_FDCWD, b"/tmp/m", 4) == E.EINVAL
    assert err(fs.unlinkat, AT_FDCWD, b"/tmp/n", 0x4) == E.EINVAL
    assert err(fs.openat, AT_FDCWD, b"a.txt", O_ACCMODE_ALL, 0) == E.EINVAL
    every = fs.openat(AT_FDCWD, b"sub", 0xFFFFFFFF & ~O_ACCMODE_ALL, 0)    # O_PATH wins
    assert fs.fcntl(every, F_GETFL) & O_PATH and err(fs.getdents64, every, 4096) == E.EBADF
    assert err(fs.openat, AT_FDCWD, b"a.txt", 0xFFFFFFFF & ~O_ACCMODE_ALL, 0) == E.ENOTDIR


O_ACCMODE_ALL = 3


def test_lookup_caches_are_bounded(fs, tree, monkeypatch):
    """A guest probing endless names (or long paths) cannot grow the host's caches without
    bound, and look-ups past the bound still answer right."""
    import whpfast.linux.fs as fsmod
    monkeypatch.setattr(fsmod.common, "_CACHE_MAX", 64)
    for i in range(500):
        assert err(fs.fstatat, AT_FDCWD, b"/data/missing%d" % i, 0) == E.ENOENT
        assert stat.S_ISREG(st(fs.fstatat(AT_FDCWD, b"sub/" + b"./" * i + b"b.bin", 0))["mode"])
        fs.close(fs.openat(AT_FDCWD, b"sub/deep/" + b"../deep/" * (i % 50), O_DIRECTORY, 0))
    assert len(fs._canon) <= 64 and len(fs._walks) <= 64
    (tree / "data" / "missing499").write_bytes(b"late")   # not remembered: seen at once
    assert st(fs.fstatat(AT_FDCWD, b"/data/missing499", 0))["size"] == 4


def test_random_calls_only_raise_linux_errors(tree):
    """A guest calling anything with anything: only LinuxError comes out, and the state it
    leaves always captures, encodes, decodes and resets to itself."""
    import random
    rng = random.Random(8)
    fs = FileSystem({"/data": tree / "data", "/other": tree / "other"}, tmp_size=256 << 10,
                    max_fds=40)
    paths = [b"", b"/", b".", b"..", b"/tmp", b"/tmp/a", b"/tmp/a/b", b"/tmp/c", b"a.txt",
             b"/data/sub/rel", b"/data/loop1", b"/proc/self/fd/3", b"/proc/self/fd/4/..",
             b"/proc/self/cwd", b"/proc/self/exe", b"/dev/null", b"/dev/stdin", b"/data/fifo",
             b"/tmp/a/", b"sub/up/sub", b"/tmp/l", b"/tmp/l/x", b"/other/to_data"]
    ints = [0, 1, 2, 3, 4, 5, 7, 39, 40, -1, -100, 0xFFFFFF9C, 1 << 31, 1 << 32, 1 << 63, (1 << 64) - 1]

    def n():
        return rng.choice(ints) if rng.random() < 0.7 else rng.getrandbits(rng.choice((8, 32, 64)))

    def p():
        return rng.choice(paths)

    calls = [
        lambda: fs.openat(n(), p(), rng.choice([0, 1, 2, 0o100 | 2, 0o300 | 1, 0o1000 | 2, O_TMPFILE | 2,
                                                O_PATH, O_DIRECTORY, n()]), 0o644),
        lambda: fs.close(n()), lambda: fs.dup(n()), lambda: fs.dup3(n(), n(), n() & 0o2000000),
        lambda: fs.read(n(), rng.choice([0, 1, 100, 5000, n()])),
        lambda: fs.write(n(), os.urandom(rng.choice([0, 1, 100, 70000]))),
        lambda: fs.pread(n(), 100, n()), lambda: fs.pwrite(n(), b"xyz", n()),
        lambda: fs.lseek(n(), n(), rng.choice([0, 1, 2, 3, 4, 5, n()])),
        lambda: fs.fstat(n()), lambda: fs.fstatat(n(), p(), rng.choice([0, 0x100, 0x1000, n()])),
        lambda: fs.statx(n(), p(), rng.choice([0, 0x100, n()]), n()),
        lambda: fs.faccessat(n(), p(), rng.choice([0, 1, 2, 4, 7, n()]), rng.choice([0, 0x200, n()])),
        lambda: fs.readlinkat(n(), p()), lambda: fs.getdents64(n(), rng.choice([0, 24, 64, 4096, n()])),
        lambda: fs.chdir(p()), lambda: fs.fchdir(n()), lambda: fs.mkdirat(n(), p(), 0o755),
        lambda: fs.unlinkat(n(), p(), rng.choice([0, 0x200, n()])),
        lambda: fs.renameat(n(), p(), n(), p(), rng.choice([0, 1, 2, 3, n()])),
        lambda: fs.ftruncate(n(), rng.choice([0, 10, 1 << 20, n()])),
        lambda: fs.fcntl(n(), rng.choice([0, 1, 2, 3, 4, 1030, n()]), n()),
        lambda: fs.ioctl(n(), rng.choice([0x5401, 0x5451, 0x5450, n()]), n()),
        lambda: fs.symlinkat(p(), n(), p()), lambda: fs.host_file(n()), lambda: fs.contents(n()),
        lambda: fs.umask(n()), lambda: fs.getcwd(), lambda: fs.console(n()),
        lambda: fs.fchmodat(n(), p(), n(), rng.choice([0, 0x100, n()])), lambda: fs.fchmod(n(), n()),
    ]
    states = []
    for i in range(4000):
        try:
            rng.choice(calls)()
        except LinuxError:
            pass
        if i % 200 == 0:
            state = fs.capture()
            assert FileSystem.decode(fs.encode(state)) == state
            states.append(state)
        if i % 450 == 0 and states:
            back = FileSystem.decode(fs.encode(rng.choice(states)))
            fs.reset(back)
            assert fs.capture() == back
    fs.close_all()


def test_tmp_matches_the_host_kernel(tmp_path):
    """The same random calls on our /tmp and, through os.*, on a real host directory give the
    same results and errnos (differential test against the kernel's own semantics)."""
    import random
    rng = random.Random(5)
    host_root = tmp_path / "ref"
    host_root.mkdir()
    host_root.chmod(0o1777)                     # as /tmp
    hroot = os.open(host_root, os.O_RDONLY | os.O_DIRECTORY)
    fs = FileSystem([], tmp_size=64 << 20)
    groot = fs.openat(AT_FDCWD, b"/tmp", O_DIRECTORY, 0)
    old_umask = os.umask(0o022)
    names = ["a", "b", "d", "d/a", "d/e", "d/e/f", "l", "d/l", "a/x", ".", "d/..", "d/e/..",
             "l/a", "d/", "a/", "d/e/f/g", "m", "d/m"]
    targets = ["a", "d", "d/e", "l", "nonexistent", "e", "e/f", "d/e/.."]   # none leaves
    fds = []                                    # (host fd, guest fd)

    def host(fn):
        try:
            return fn(), None
        except OSError as e:
            return None, e.errno

    def guest(fn):
        try:
            return fn(), None
        except LinuxError as e:
            return None, e.errno

    def same(h, g, what):
        assert h[1] == g[1], f"{what}: host errno {h[1]}, ours {g[1]} (call {i})"

    def meta_h(s):
        return (s.st_mode, s.st_size if stat.S_ISREG(s.st_mode) else 0, s.st_nlink)

    def meta_g(raw):
        s = st(raw)
        return (s["mode"], s["size"] if stat.S_ISREG(s["mode"]) else 0, s["nlink"])

    try:
        for i in range(2500):
            op = rng.randrange(12)
            name = rng.choice(names)
            if op == 0:
                flags = rng.choice([0, 1, 2]) | rng.choice([0, 0o100, 0o300, 0o1000, 0o2000, 0o200000, 0o400000])
                h = host(lambda: os.open(name, flags, 0o666, dir_fd=hroot))
                g = guest(lambda: fs.openat(groot, name.encode(), flags, 0o666))
                same(h, g, f"open {name} {flags:o}")
                if h[0] is not None and stat.S_ISREG(os.fstat(h[0]).st_mode):
                    fds.append((h[0], g[0]))
                elif h[0] is not None:              # directory offsets are ext4 hashes there
                    os.close(h[0])
                    fs.close(g[0])
            elif op == 1 and fds:
                hf, gf = rng.choice(fds)
                data = os.urandom(rng.choice([0, 1, 100, 5000]))
                h, g = host(lambda: os.write(hf, data)), guest(lambda: fs.write(gf, data))
                same(h, g, "write")
                assert h[0] == g[0], (i, op, name)
            elif op == 2 and fds:
                hf, gf = rng.choice(fds)
                n = rng.choice([0, 1, 50, 10000])
                h, g = host(lambda: os.read(hf, n)), guest(lambda: fs.read(gf, n))
                same(h, g, "read")
                assert h[0] == g[0], (i, op, name)
            elif op == 3 and fds:
                hf, gf = rng.choice(fds)
                off, whence = rng.choice([0, 3, -2, 100, 7000]), rng.choice([0, 1, 2])
                h, g = host(lambda: os.lseek(hf, off, whence)), guest(lambda: fs.lseek(gf, off, whence))
                same(h, g, "lseek")
                assert h[0] == g[0], (i, op, name)
            elif op == 4 and fds:
                hf, gf = rng.choice(fds)
                n = rng.choice([0, 10, 3000])
                h, g = host(lambda: os.ftruncate(hf, n)), guest(lambda: fs.ftruncate(gf, n))
                same(h, g, "ftruncate")
            elif op == 5:
                h = host(lambda: os.mkdir(name, 0o755, dir_fd=hroot))
                g = guest(lambda: fs.mkdirat(groot, name.encode(), 0o755))
                same(h, g, f"mkdir {name}")
            elif op == 6:
                rmdir = rng.random() < 0.5
                h = host(lambda: (os.rmdir if rmdir else os.unlink)(name, dir_fd=hroot))
                g = guest(lambda: fs.unlinkat(groot, name.encode(), AT_REMOVEDIR if rmdir else 0))
                same(h, g, f"{'rmdir' if rmdir else 'unlink'} {name}")
            elif op == 7:
                other = rng.choice(names)
                h = host(lambda: os.rename(name, other, src_dir_fd=hroot, dst_dir_fd=hroot))
                g = guest(lambda: fs.renameat(groot, name.encode(), groot, other.encode()))
                same(h, g, f"rename {name} {other}")
            elif op == 8:
                target = rng.choice(targets)
                h = host(lambda: os.symlink(target, name, dir_fd=hroot))
                g = guest(lambda: fs.symlinkat(target.encode(), groot, name.encode()))
                same(h, g, f"symlink {target} {name}")
            elif op == 9:
                follow = rng.random() < 0.5
                h = host(lambda: meta_h(os.stat(name, dir_fd=hroot, follow_symlinks=follow)))
                g = guest(lambda: meta_g(fs.fstatat(groot, name.encode(), 0 if follow else AT_SYMLINK_NOFOLLOW)))
                same(h, g, f"stat {name}")
                assert h[0] == g[0], f"stat {name}"
            elif op == 10:
                h = host(lambda: os.readlink(name, dir_fd=hroot).encode())
                g = guest(lambda: fs.readlinkat(groot, name.encode()))
                same(h, g, f"readlink {name}")
                assert h[0] == g[0], (i, op, name)
            elif op == 11:
                h = host(lambda: sorted(os.fsencode(n) for n in os.listdir(os.path.join(host_root, name))))
                g = guest(lambda: sorted(n for n, _, _ in dents(fs, fs.openat(groot, name.encode(),
                                                                              O_DIRECTORY, 0))
                                         if n not in (b".", b"..")))
                same(h, g, f"listdir {name}")
                assert h[0] == g[0], (i, op, name)
            if rng.random() < 0.05 and fds:
                hf, gf = fds.pop(rng.randrange(len(fds)))
                os.close(hf)
                fs.close(gf)
    finally:
        os.umask(old_umask)
        for hf, _ in fds:
            os.close(hf)
        os.close(hroot)


def test_host_walks_match_the_kernel(tmp_path):
    """Random paths (with ".", "..", trailing slashes, symlink chains and loops) through a real
    host tree: our walker and the kernel's agree on what they name, or on the errno."""
    import random
    rng = random.Random(3)
    root = tmp_path / "root"
    for d in ("a/b/c", "e"):
        (root / d).mkdir(parents=True)
    for f, size in (("f", 3), ("a/g", 10), ("a/b/h", 100), ("e/i", 0)):
        (root / f).write_bytes(b"x" * size)
    links = {"l1": "a", "l2": "a/b/h", "a/l3": "../f", "a/b/l4": "../../e", "a/b/c/l5": "../../..",
             "l6": "l7", "l7": "l6", "l8": "missing", "a/l9": "b/c/l5", "l10": "l1/b/",
             "e/l11": "../l2/", "l12": "a/b/c/l5/l1/l3", "e/l13": "."}
    for name, target in links.items():
        os.symlink(target, root / name)
    fs = FileSystem({"/root": root})
    groot = fs.openat(AT_FDCWD, b"/root", O_DIRECTORY, 0)
    hroot = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    comps = ["a", "b", "c", "e", "f", "g", "h", "i", ".", "..", "missing"] + [n.split("/")[-1] for n in links]
    checked = 0
    try:
        for _ in range(3000):
            parts = [rng.choice(comps) for _ in range(rng.randint(1, 5))]
            path = "/".join(parts) + rng.choice(["", "", "/"])
            prefixes = [os.path.join(root, *parts[:k]) for k in range(1, len(parts) + 1)]
            if any(not os.path.realpath(p).startswith(str(root)) for p in prefixes):
                continue                        # leaves the tree on the host: the kernel's "/" differs
            follow = rng.random() < 0.7
            try:
                s = os.stat(path, dir_fd=hroot, follow_symlinks=follow)
                h = (s.st_mode, s.st_size, s.st_ino)
            except OSError as e:
                h = e.errno
            try:
                g = st(fs.fstatat(groot, path.encode(), 0 if follow else AT_SYMLINK_NOFOLLOW))
                g = (g["mode"], g["size"], g["ino"])
            except LinuxError as e:
                g = e.errno
            assert h == g, (path, follow)
            try:
                h = os.readlink(path, dir_fd=hroot).encode()
            except OSError as e:
                h = e.errno
            try:
                g = fs.readlinkat(groot, path.encode())
            except LinuxError as e:
                g = e.errno
            assert h == g, ("readlink", path)
            flags = rng.choice([0, O_DIRECTORY, O_NOFOLLOW, O_PATH | O_NOFOLLOW])
            try:
                os.close(os.open(path, flags, dir_fd=hroot))
                h = 0
            except OSError as e:
                h = e.errno
            try:
                fs.close(fs.openat(groot, path.encode(), flags, 0))
                g = 0
            except LinuxError as e:
                g = e.errno
            assert h == g, ("open", path, oct(flags))
            checked += 1
    finally:
        os.close(hroot)
    assert checked > 1000
