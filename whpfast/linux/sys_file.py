"""The file system calls: I/O on fds, opening, metadata, directories, and the pre-*at calls as
their *at forms. Handlers take the Task (whpfast/linux/task.py) and the raw argument registers;
lengths are capped before any host work, so a hostile length costs nothing."""

import errno as E
import os
import struct

from .fs.state import MAX_FILE
from .fs import (F_GETLK, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW, F_SETLK, F_SETLKW, F_UNLCK,
                 UTIME_NOW, UTIME_OMIT)
from .task import AT_FDCWD, CWD, MAX_IO, PID, fail, read_path, s32, s64

UIO_MAXIOV = 1024


def read_stdin(t, fd, buf, count):
    """sys_read's decision, before anything is read: raises what the read fails with (EFAULT for
    the buffer, EBADF for stdout or stderr); for stdin, takes and returns the bytes it reads (Park
    when there are none yet); None when fd is not the console. count: capped at MAX_IO. The warm
    path (LinuxSandbox._resume_plan) answers a parked read of stdin through it too."""
    t.mm.check(buf, count, write=True)
    console = t.fs.console(fd)
    if console == "stdin":
        return t.take_input(count)
    if console is not None:
        fail(E.EBADF)
    return None


def sys_read(t, fd, buf, count, *_):
    fd, count = s32(fd), min(count, MAX_IO)
    data = read_stdin(t, fd, buf, count)
    if data is not None:
        t.mm.write(buf, data)
        return len(data)
    if count:
        # straight into the checked guest buffer (fill marks what was written for the restore)
        return t.mm.fill(buf, count, lambda view: t.fs.read_into(fd, view))
    t.fs.read(fd, 0)                                    # (its errors: EBADF, EISDIR, ...)
    return 0


def sys_pread64(t, fd, buf, count, offset, *_):
    count = min(count, MAX_IO)
    t.mm.check(buf, count, write=True)
    if s64(offset) < 0:
        fail(E.EINVAL)
    if count:
        return t.mm.fill(buf, count, lambda view: t.fs.pread_into(s32(fd), view, offset))
    data = t.fs.pread(s32(fd), count, offset)[:count]
    t.mm.write(buf, data)
    return len(data)


def _write_fd(t, fd, data):
    console = t.fs.console(fd)
    if console in ("stdout", "stderr"):
        return t.output(console, data)
    if console == "stdin":
        fail(E.EBADF)
    return t.fs.write(fd, data)


def sys_write(t, fd, buf, count, *_):
    return _write_fd(t, s32(fd), t.mm.read(buf, min(count, MAX_IO)))


def sys_pwrite64(t, fd, buf, count, offset, *_):
    if s64(offset) < 0:
        fail(E.EINVAL)
    return t.fs.pwrite(s32(fd), t.mm.read(buf, min(count, MAX_IO)), offset)


def _iovecs(t, iov, iovcnt):
    if iovcnt > UIO_MAXIOV:
        fail(E.EINVAL)
    if iovcnt == 0:
        return []
    words = t.mm.read_u64s(iov, 2 * iovcnt)
    vecs, total = [], 0
    for i in range(iovcnt):
        base, length = words[2 * i], words[2 * i + 1]
        if length >> 63:
            fail(E.EINVAL)
        length = min(length, MAX_IO - total)
        vecs.append((base, length))
        total += length
    return vecs


def sys_writev(t, fd, iov, iovcnt, *_):
    data = b"".join(t.mm.read(base, n) for base, n in _iovecs(t, iov, iovcnt))
    return _write_fd(t, s32(fd), data)


def sys_readv(t, fd, iov, iovcnt, *_):
    vecs = _iovecs(t, iov, iovcnt)
    for base, n in vecs:
        t.mm.check(base, n, write=True)
    total = sum(n for _, n in vecs)
    fd = s32(fd)
    console = t.fs.console(fd)
    if console == "stdin":
        data = t.take_input(total)
    elif console is not None:
        fail(E.EBADF)
    else:
        data = t.fs.read(fd, total)
    done = 0
    for base, n in vecs:
        part = data[done:done + n]
        t.mm.write(base, part)
        done += len(part)
        if done >= len(data):
            break
    return len(data)


def sys_openat(t, dirfd, path, flags, mode, *_):
    return t.fs.openat(s32(dirfd), read_path(t, path), s32(flags), mode & 0o7777)


def sys_close(t, fd, *_):
    t.fs.close(s32(fd))
    return 0


def sys_dup(t, fd, *_):
    return t.fs.dup(s32(fd))


def sys_dup2(t, old, new, *_):
    return t.fs.dup2(s32(old), s32(new))


def sys_dup3(t, old, new, flags, *_):
    return t.fs.dup3(s32(old), s32(new), s32(flags))


_LOCK_CMDS = (F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW)
_GETLK_CMDS = (F_GETLK, F_OFD_GETLK)
_FLOCK = struct.Struct("<hh4xqqi4x")    # struct flock: type, whence, start, len, pid


def sys_fcntl(t, fd, cmd, arg, *_):
    cmd = s32(cmd)
    if cmd not in _LOCK_CMDS:
        return t.fs.fcntl(s32(fd), cmd, arg)
    t.mm.check(arg, _FLOCK.size, write=cmd in _GETLK_CMDS)
    typ, whence, start, length, pid = _FLOCK.unpack(t.mm.read(arg, _FLOCK.size))
    found = t.fs.record_lock(s32(fd), cmd, typ, whence, start, length, pid)
    if cmd in _GETLK_CMDS:
        if found is None:
            t.mm.write(arg, struct.pack("<h", F_UNLCK))                 # the rest unchanged
        else:
            typ, first, last, posix = found
            length = 0 if last == MAX_FILE else last - first + 1
            t.mm.write(arg, _FLOCK.pack(typ, 0, first, length, PID if posix else -1))
    return 0


def sys_flock(t, fd, op, *_):
    return t.fs.flock(s32(fd), s32(op))


def sys_lseek(t, fd, offset, whence, *_):
    return t.fs.lseek(s32(fd), s64(offset), s32(whence))


def sys_fstat(t, fd, buf, *_):
    t.mm.check(buf, 144, write=True)
    t.mm.write(buf, t.fs.fstat(s32(fd)))
    return 0


def sys_statfs(t, path, buf, *_):
    t.mm.check(buf, 120, write=True)
    t.mm.write(buf, t.fs.statfs(read_path(t, path)))
    return 0


def sys_fstatfs(t, fd, buf, *_):
    t.mm.check(buf, 120, write=True)
    t.mm.write(buf, t.fs.fstatfs(s32(fd)))
    return 0


_UTIME_NOW, _UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


def _utime(sec, nsec):
    """A timespec's time for fs.utimensat: ns, or its UTIME_NOW / UTIME_OMIT."""
    if nsec == _UTIME_NOW:
        return UTIME_NOW
    if nsec == _UTIME_OMIT:
        return UTIME_OMIT
    if not 0 <= nsec < 10**9:
        fail(E.EINVAL)
    return sec * 10**9 + nsec


def _times(t, addr, usec):
    """(atime, mtime) from two timespecs (or timevals: usec), both now for NULL."""
    if not addr:
        return UTIME_NOW, UTIME_NOW
    a_sec, a_frac, m_sec, m_frac = struct.unpack("<qqqq", t.mm.read(addr, 32))
    if usec:
        if not (0 <= a_frac < 10**6 and 0 <= m_frac < 10**6):
            fail(E.EINVAL)
        return a_sec * 10**9 + a_frac * 1000, m_sec * 10**9 + m_frac * 1000
    return _utime(a_sec, a_frac), _utime(m_sec, m_frac)


def sys_utimensat(t, dirfd, path, times, flags, *_):
    atime, mtime = _times(t, times, False)
    return t.fs.utimensat(s32(dirfd), read_path(t, path) if path else None, atime, mtime, s32(flags))


def sys_futimesat(t, dirfd, path, times, *_):
    atime, mtime = _times(t, times, True)
    return t.fs.utimensat(s32(dirfd), read_path(t, path) if path else None, atime, mtime, 0)


def sys_utimes(t, path, times, *_):
    atime, mtime = _times(t, times, True)
    return t.fs.utimensat(AT_FDCWD, read_path(t, path), atime, mtime, 0)


def sys_utime(t, path, times, *_):
    if times:
        atime, mtime = (t * 10**9 for t in struct.unpack("<qq", t.mm.read(times, 16)))
    else:
        atime = mtime = UTIME_NOW
    return t.fs.utimensat(AT_FDCWD, read_path(t, path), atime, mtime, 0)


def sys_newfstatat(t, dirfd, path, buf, flags, *_):
    t.mm.check(buf, 144, write=True)
    t.mm.write(buf, t.fs.fstatat(s32(dirfd), read_path(t, path), s32(flags)))
    return 0


def sys_statx(t, dirfd, path, flags, mask, buf, *_):
    t.mm.check(buf, 256, write=True)
    t.mm.write(buf, t.fs.statx(s32(dirfd), read_path(t, path), s32(flags), mask & 0xFFFFFFFF))
    return 0


def sys_faccessat(t, dirfd, path, mode, *_):
    t.fs.faccessat(s32(dirfd), read_path(t, path), s32(mode), 0)
    return 0


def sys_faccessat2(t, dirfd, path, mode, flags, *_):
    t.fs.faccessat(s32(dirfd), read_path(t, path), s32(mode), s32(flags))
    return 0


def sys_readlinkat(t, dirfd, path, buf, size, *_):
    if s32(size) <= 0:
        fail(E.EINVAL)
    data = t.fs.readlinkat(s32(dirfd), read_path(t, path))[:size]
    t.mm.write(buf, data)
    return len(data)


def sys_getdents64(t, fd, buf, count, *_):
    count = min(count, MAX_IO)
    t.mm.check(buf, count, write=True)
    data = t.fs.getdents64(s32(fd), count)
    t.mm.write(buf, data)
    return len(data)


def sys_getcwd(t, buf, size, *_):
    cwd = t.fs.getcwd() + b"\0"
    if size < len(cwd):
        fail(E.ERANGE)
    t.mm.write(buf, cwd)
    return len(cwd)


def sys_chdir(t, path, *_):
    t.fs.chdir(read_path(t, path))
    return 0


def sys_fchdir(t, fd, *_):
    t.fs.fchdir(s32(fd))
    return 0


def sys_mkdirat(t, dirfd, path, mode, *_):
    t.fs.mkdirat(s32(dirfd), read_path(t, path), mode & 0o7777)
    return 0


def sys_unlinkat(t, dirfd, path, flags, *_):
    t.fs.unlinkat(s32(dirfd), read_path(t, path), s32(flags))
    return 0


def sys_renameat(t, olddir, old, newdir, new, *_):
    t.fs.renameat(s32(olddir), read_path(t, old), s32(newdir), read_path(t, new))
    return 0


def sys_renameat2(t, olddir, old, newdir, new, flags, *_):
    t.fs.renameat(s32(olddir), read_path(t, old), s32(newdir), read_path(t, new), flags & 0xFFFFFFFF)
    return 0


def sys_symlinkat(t, target, dirfd, path, *_):
    t.fs.symlinkat(read_path(t, target), s32(dirfd), read_path(t, path))
    return 0


def sys_fchmodat(t, dirfd, path, mode, *_):
    t.fs.fchmodat(s32(dirfd), read_path(t, path), mode & 0o7777)
    return 0


def sys_fchmod(t, fd, mode, *_):
    t.fs.fchmod(s32(fd), mode & 0o7777)
    return 0


def sys_ftruncate(t, fd, length, *_):
    if s64(length) < 0:
        fail(E.EINVAL)
    t.fs.ftruncate(s32(fd), length)
    return 0


def sys_ioctl(t, fd, request, arg, *_):
    fd = s32(fd)
    if t.fs.console(fd) is not None:
        fail(E.ENOTTY)          # the console is not a terminal: programs buffer fully
    return t.fs.ioctl(fd, request & 0xFFFFFFFF, arg)


def sys_poll(t, fds, nfds, timeout, *_):
    if nfds > 1024:
        fail(E.EINVAL)
    raw = bytearray(t.mm.read(fds, 8 * nfds))
    ready = 0
    for i in range(nfds):
        fd, events = struct.unpack_from("<ih", raw, 8 * i)
        revents = events & 0x5 if fd >= 0 else 0            # POLLIN | POLLOUT: never blocks
        struct.pack_into("<h", raw, 8 * i + 6, revents)
        ready += bool(revents)
    t.mm.write(fds, bytes(raw))
    return ready


def sys_nothing(t, *_):
    """fadvise64, fsync, fdatasync, sync, syncfs: nothing to do (the files are the host's or in
    memory)."""
    return 0


# -- the pre-*at calls: their *at form with dirfd = AT_FDCWD (and the flags they imply) ----------

AT_SYMLINK_NOFOLLOW, AT_REMOVEDIR = 0x100, 0x200


def sys_open(t, path, flags, mode, *_):
    return sys_openat(t, CWD, path, flags, mode)


def sys_creat(t, path, mode, *_):
    return sys_openat(t, CWD, path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)


def sys_stat(t, path, buf, *_):
    return sys_newfstatat(t, CWD, path, buf, 0)


def sys_lstat(t, path, buf, *_):
    return sys_newfstatat(t, CWD, path, buf, AT_SYMLINK_NOFOLLOW)


def sys_access(t, path, mode, *_):
    return sys_faccessat(t, CWD, path, mode)


def sys_readlink(t, path, buf, size, *_):
    return sys_readlinkat(t, CWD, path, buf, size)


def sys_mkdir(t, path, mode, *_):
    return sys_mkdirat(t, CWD, path, mode)


def sys_unlink(t, path, *_):
    return sys_unlinkat(t, CWD, path, 0)


def sys_rmdir(t, path, *_):
    return sys_unlinkat(t, CWD, path, AT_REMOVEDIR)


def sys_rename(t, old, new, *_):
    return sys_renameat(t, CWD, old, CWD, new)


def sys_symlink(t, target, path, *_):
    return sys_symlinkat(t, target, CWD, path)


def sys_chmod(t, path, mode, *_):
    return sys_fchmodat(t, CWD, path, mode)
