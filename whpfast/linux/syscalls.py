"""The system call table of the Linux personality: {number: handler}. Every handler takes the
process and the six raw argument registers (unsigned 64-bit), returns a non-negative result or
raises LinuxError; `dispatch()` is the one place an error becomes -errno and an unknown number
becomes ENOSYS (counted in the process's `unsupported_syscalls`).

Guest pointers are only ever touched through the address space's checked accessors (EFAULT);
lengths are capped before any host work, so a hostile length costs nothing."""

import errno as E
import os
import struct
import time

from .errno import LinuxError
from ._fsstate import MAX_FILE
from ._sysnames import NAMES, NUMBERS
from .fs import (F_GETLK, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW, F_SETLK, F_SETLKW, F_UNLCK,
                 UTIME_NOW, UTIME_OMIT)
from .mm import PAGE, PROT_EXEC, PROT_READ, PROT_WRITE, PURE_PYTHON

AT_FDCWD = -100
MAX_IO = 16 << 20           # bytes moved by one read/write (short counts are legal)
UIO_MAXIOV = 1024
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x1, 0x2, 0x10, 0x20
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
PID = 1000                  # what the program sees as its pid/tid
UID = 1000
SIGKILL, SIGSTOP = 9, 19
SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT",
                7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2",
                13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM"}


class ProgramExit(Exception):
    """exit/exit_group: the program ended with this status."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


class ProgramKilled(Exception):
    """The program sent itself a signal it has no way to receive here (abort(), raise())."""

    def __init__(self, signal):
        super().__init__(signal)
        self.signal = signal


class Park(Exception):
    """A read of stdin with no input left: the run stops, waiting for more input."""


def s32(v):
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def s64(v):
    return v - (1 << 64) if v & (1 << 63) else v


def _path(p, addr):
    return p.mm.read_cstring(addr)


TABLE = {}
NAMED_NR_MAX = 4096         # unknown numbers past this are counted together (the guest picks
                            # them: one name each would grow unsupported_syscalls without bound)


def unsupported_name(nr):
    """The key of unsupported_syscalls for system call nr."""
    name = NAMES.get(nr)
    if name is None:
        name = f"syscall_{nr}" if 0 <= nr < NAMED_NR_MAX else f"syscall_{NAMED_NR_MAX}+"
    return name


def syscall(*names):
    def register(fn):
        for name in names:
            TABLE[NUMBERS[name]] = fn
        return fn
    return register


def py_dispatch(p, nr, args):
    """Runs system call nr; returns the value for RAX (negative errno on failure). In C:
    _linux.Dispatcher (bound as `dispatch` at the end of this module)."""
    fn = TABLE.get(nr)
    if fn is None:
        name = unsupported_name(nr)
        p.unsupported_syscalls[name] = p.unsupported_syscalls.get(name, 0) + 1
        return -E.ENOSYS
    try:
        result = fn(p, *args)
    except LinuxError as e:
        return -e.errno
    return result


def _fail(err, why=""):
    raise LinuxError(err, why or os.strerror(err))


# -- files ----------------------------------------------------------------------------------

@syscall("read")
def sys_read(p, fd, buf, count, *_):
    fd, count = s32(fd), min(count, MAX_IO)
    p.mm.check(buf, count, write=True)
    console = p.fs.console(fd)
    if console == "stdin":
        data = p.take_input(count)
    elif console is not None:
        _fail(E.EBADF)
    elif count:
        # straight into the checked guest buffer (fill marks what was written for the restore)
        return p.mm.fill(buf, count, lambda view: p.fs.read_into(fd, view))
    else:
        data = p.fs.read(fd, count)
    p.mm.write(buf, data[:count])
    return len(data[:count])


@syscall("pread64")
def sys_pread64(p, fd, buf, count, offset, *_):
    count = min(count, MAX_IO)
    p.mm.check(buf, count, write=True)
    if s64(offset) < 0:
        _fail(E.EINVAL)
    if count:
        return p.mm.fill(buf, count, lambda view: p.fs.pread_into(s32(fd), view, offset))
    data = p.fs.pread(s32(fd), count, offset)[:count]
    p.mm.write(buf, data)
    return len(data)


def _write_fd(p, fd, data):
    console = p.fs.console(fd)
    if console in ("stdout", "stderr"):
        return p.output(console, data)
    if console == "stdin":
        _fail(E.EBADF)
    return p.fs.write(fd, data)


@syscall("write")
def sys_write(p, fd, buf, count, *_):
    return _write_fd(p, s32(fd), p.mm.read(buf, min(count, MAX_IO)))


@syscall("pwrite64")
def sys_pwrite64(p, fd, buf, count, offset, *_):
    if s64(offset) < 0:
        _fail(E.EINVAL)
    return p.fs.pwrite(s32(fd), p.mm.read(buf, min(count, MAX_IO)), offset)


def _iovecs(p, iov, iovcnt):
    if iovcnt > UIO_MAXIOV:
        _fail(E.EINVAL)
    if iovcnt == 0:
        return []
    words = p.mm.read_u64s(iov, 2 * iovcnt)
    vecs, total = [], 0
    for i in range(iovcnt):
        base, length = words[2 * i], words[2 * i + 1]
        if length >> 63:
            _fail(E.EINVAL)
        length = min(length, MAX_IO - total)
        vecs.append((base, length))
        total += length
    return vecs


@syscall("writev")
def sys_writev(p, fd, iov, iovcnt, *_):
    data = b"".join(p.mm.read(base, n) for base, n in _iovecs(p, iov, iovcnt))
    return _write_fd(p, s32(fd), data)


@syscall("readv")
def sys_readv(p, fd, iov, iovcnt, *_):
    vecs = _iovecs(p, iov, iovcnt)
    for base, n in vecs:
        p.mm.check(base, n, write=True)
    total = sum(n for _, n in vecs)
    fd = s32(fd)
    console = p.fs.console(fd)
    if console == "stdin":
        data = p.take_input(total)
    elif console is not None:
        _fail(E.EBADF)
    else:
        data = p.fs.read(fd, total)
    done = 0
    for base, n in vecs:
        part = data[done:done + n]
        p.mm.write(base, part)
        done += len(part)
        if done >= len(data):
            break
    return len(data)


@syscall("openat")
def sys_openat(p, dirfd, path, flags, mode, *_):
    return p.fs.openat(s32(dirfd), _path(p, path), s32(flags), mode & 0o7777)


@syscall("close")
def sys_close(p, fd, *_):
    p.fs.close(s32(fd))
    return 0


@syscall("dup")
def sys_dup(p, fd, *_):
    return p.fs.dup(s32(fd))


@syscall("dup2")
def sys_dup2(p, old, new, *_):
    return p.fs.dup2(s32(old), s32(new))


@syscall("dup3")
def sys_dup3(p, old, new, flags, *_):
    return p.fs.dup3(s32(old), s32(new), s32(flags))


_LOCK_CMDS = (F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW)
_GETLK_CMDS = (F_GETLK, F_OFD_GETLK)
_FLOCK = struct.Struct("<hh4xqqi4x")    # struct flock: type, whence, start, len, pid


@syscall("fcntl")
def sys_fcntl(p, fd, cmd, arg, *_):
    cmd = s32(cmd)
    if cmd not in _LOCK_CMDS:
        return p.fs.fcntl(s32(fd), cmd, arg)
    p.mm.check(arg, _FLOCK.size, write=cmd in _GETLK_CMDS)
    typ, whence, start, length, pid = _FLOCK.unpack(p.mm.read(arg, _FLOCK.size))
    found = p.fs.record_lock(s32(fd), cmd, typ, whence, start, length, pid)
    if cmd in _GETLK_CMDS:
        if found is None:
            p.mm.write(arg, struct.pack("<h", F_UNLCK))                 # the rest unchanged
        else:
            typ, first, last, posix = found
            length = 0 if last == MAX_FILE else last - first + 1
            p.mm.write(arg, _FLOCK.pack(typ, 0, first, length, PID if posix else -1))
    return 0


@syscall("flock")
def sys_flock(p, fd, op, *_):
    return p.fs.flock(s32(fd), s32(op))


@syscall("lseek")
def sys_lseek(p, fd, offset, whence, *_):
    return p.fs.lseek(s32(fd), s64(offset), s32(whence))


@syscall("fstat")
def sys_fstat(p, fd, buf, *_):
    p.mm.check(buf, 144, write=True)
    p.mm.write(buf, p.fs.fstat(s32(fd)))
    return 0


@syscall("statfs")
def sys_statfs(p, path, buf, *_):
    p.mm.check(buf, 120, write=True)
    p.mm.write(buf, p.fs.statfs(_path(p, path)))
    return 0


@syscall("fstatfs")
def sys_fstatfs(p, fd, buf, *_):
    p.mm.check(buf, 120, write=True)
    p.mm.write(buf, p.fs.fstatfs(s32(fd)))
    return 0


_UTIME_NOW, _UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


def _utime(sec, nsec):
    """A timespec's time for fs.utimensat: ns, or its UTIME_NOW / UTIME_OMIT."""
    if nsec == _UTIME_NOW:
        return UTIME_NOW
    if nsec == _UTIME_OMIT:
        return UTIME_OMIT
    if not 0 <= nsec < 10**9:
        _fail(E.EINVAL)
    return sec * 10**9 + nsec


def _times(p, addr, usec):
    """(atime, mtime) from two timespecs (or timevals: usec), both now for NULL."""
    if not addr:
        return UTIME_NOW, UTIME_NOW
    a_sec, a_frac, m_sec, m_frac = struct.unpack("<qqqq", p.mm.read(addr, 32))
    if usec:
        if not (0 <= a_frac < 10**6 and 0 <= m_frac < 10**6):
            _fail(E.EINVAL)
        return a_sec * 10**9 + a_frac * 1000, m_sec * 10**9 + m_frac * 1000
    return _utime(a_sec, a_frac), _utime(m_sec, m_frac)


@syscall("utimensat")
def sys_utimensat(p, dirfd, path, times, flags, *_):
    atime, mtime = _times(p, times, False)
    return p.fs.utimensat(s32(dirfd), _path(p, path) if path else None, atime, mtime, s32(flags))


@syscall("futimesat")
def sys_futimesat(p, dirfd, path, times, *_):
    atime, mtime = _times(p, times, True)
    return p.fs.utimensat(s32(dirfd), _path(p, path) if path else None, atime, mtime, 0)


@syscall("utimes")
def sys_utimes(p, path, times, *_):
    atime, mtime = _times(p, times, True)
    return p.fs.utimensat(AT_FDCWD, _path(p, path), atime, mtime, 0)


@syscall("utime")
def sys_utime(p, path, times, *_):
    if times:
        atime, mtime = (t * 10**9 for t in struct.unpack("<qq", p.mm.read(times, 16)))
    else:
        atime = mtime = UTIME_NOW
    return p.fs.utimensat(AT_FDCWD, _path(p, path), atime, mtime, 0)


@syscall("newfstatat")
def sys_newfstatat(p, dirfd, path, buf, flags, *_):
    p.mm.check(buf, 144, write=True)
    p.mm.write(buf, p.fs.fstatat(s32(dirfd), _path(p, path), s32(flags)))
    return 0


@syscall("statx")
def sys_statx(p, dirfd, path, flags, mask, buf, *_):
    p.mm.check(buf, 256, write=True)
    p.mm.write(buf, p.fs.statx(s32(dirfd), _path(p, path), s32(flags), mask & 0xFFFFFFFF))
    return 0


@syscall("faccessat")
def sys_faccessat(p, dirfd, path, mode, *_):
    p.fs.faccessat(s32(dirfd), _path(p, path), s32(mode), 0)
    return 0


@syscall("faccessat2")
def sys_faccessat2(p, dirfd, path, mode, flags, *_):
    p.fs.faccessat(s32(dirfd), _path(p, path), s32(mode), s32(flags))
    return 0


@syscall("readlinkat")
def sys_readlinkat(p, dirfd, path, buf, size, *_):
    if s32(size) <= 0:
        _fail(E.EINVAL)
    data = p.fs.readlinkat(s32(dirfd), _path(p, path))[:size]
    p.mm.write(buf, data)
    return len(data)


@syscall("getdents64")
def sys_getdents64(p, fd, buf, count, *_):
    count = min(count, MAX_IO)
    p.mm.check(buf, count, write=True)
    data = p.fs.getdents64(s32(fd), count)
    p.mm.write(buf, data)
    return len(data)


@syscall("getcwd")
def sys_getcwd(p, buf, size, *_):
    cwd = p.fs.getcwd() + b"\0"
    if size < len(cwd):
        _fail(E.ERANGE)
    p.mm.write(buf, cwd)
    return len(cwd)


@syscall("chdir")
def sys_chdir(p, path, *_):
    p.fs.chdir(_path(p, path))
    return 0


@syscall("fchdir")
def sys_fchdir(p, fd, *_):
    p.fs.fchdir(s32(fd))
    return 0


@syscall("mkdirat")
def sys_mkdirat(p, dirfd, path, mode, *_):
    p.fs.mkdirat(s32(dirfd), _path(p, path), mode & 0o7777)
    return 0


@syscall("unlinkat")
def sys_unlinkat(p, dirfd, path, flags, *_):
    p.fs.unlinkat(s32(dirfd), _path(p, path), s32(flags))
    return 0


@syscall("renameat")
def sys_renameat(p, olddir, old, newdir, new, *_):
    p.fs.renameat(s32(olddir), _path(p, old), s32(newdir), _path(p, new))
    return 0


@syscall("renameat2")
def sys_renameat2(p, olddir, old, newdir, new, flags, *_):
    p.fs.renameat(s32(olddir), _path(p, old), s32(newdir), _path(p, new), flags & 0xFFFFFFFF)
    return 0


@syscall("symlinkat")
def sys_symlinkat(p, target, dirfd, path, *_):
    p.fs.symlinkat(_path(p, target), s32(dirfd), _path(p, path))
    return 0


@syscall("fchmodat")
def sys_fchmodat(p, dirfd, path, mode, *_):
    p.fs.fchmodat(s32(dirfd), _path(p, path), mode & 0o7777)
    return 0


@syscall("fchmod")
def sys_fchmod(p, fd, mode, *_):
    p.fs.fchmod(s32(fd), mode & 0o7777)
    return 0


@syscall("ftruncate")
def sys_ftruncate(p, fd, length, *_):
    if s64(length) < 0:
        _fail(E.EINVAL)
    p.fs.ftruncate(s32(fd), length)
    return 0


@syscall("ioctl")
def sys_ioctl(p, fd, request, arg, *_):
    fd = s32(fd)
    if p.fs.console(fd) is not None:
        _fail(E.ENOTTY)          # the console is not a terminal: programs buffer fully
    return p.fs.ioctl(fd, request & 0xFFFFFFFF, arg)


@syscall("poll")
def sys_poll(p, fds, nfds, timeout, *_):
    if nfds > 1024:
        _fail(E.EINVAL)
    raw = bytearray(p.mm.read(fds, 8 * nfds))
    ready = 0
    for i in range(nfds):
        fd, events = struct.unpack_from("<ih", raw, 8 * i)
        revents = events & 0x5 if fd >= 0 else 0            # POLLIN | POLLOUT: never blocks
        struct.pack_into("<h", raw, 8 * i + 6, revents)
        ready += bool(revents)
    p.mm.write(fds, bytes(raw))
    return ready


@syscall("fadvise64", "fsync", "fdatasync", "sync", "syncfs")
def sys_nothing(p, *_):
    return 0


# -- memory ---------------------------------------------------------------------------------

def _prot(prot):
    if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC | 0x01000000 | 0x02000000):   # GROWSDOWN/UP
        _fail(E.EINVAL)
    return prot & (PROT_READ | PROT_WRITE | PROT_EXEC)


@syscall("mmap")
def sys_mmap(p, addr, length, prot, flags, fd, offset, *_):
    prot, flags, fd = _prot(prot), s32(flags), s32(fd)
    if length == 0 or offset % PAGE or not flags & (MAP_SHARED | MAP_PRIVATE):
        _fail(E.EINVAL)
    if length > p.mm.top:
        _fail(E.ENOMEM)
    if offset + length >= 1 << 63:
        _fail(E.EOVERFLOW)
    fixed = bool(flags & (MAP_FIXED | MAP_FIXED_NOREPLACE))
    anonymous = bool(flags & MAP_ANONYMOUS)
    host = name = None
    if not anonymous:
        if flags & MAP_SHARED and prot & PROT_WRITE:
            _fail(E.ENODEV, "writable shared file mappings are not supported")
        host = p.fs.host_file(fd)             # EBADF for a bad fd
        name = p.fs.mapping_name(fd)
    noreplace = bool(flags & MAP_FIXED_NOREPLACE)
    if anonymous:
        return p.mm.map(addr, length, prot, fixed=fixed, noreplace=noreplace)
    # Whether the file can be mapped at all (ENODEV: a directory, the console) is known before
    # anything is: a failed mmap leaves the address space as it was.
    if host is None:
        p.fs.contents(fd, 0, 0)                 # ENODEV for what is not a regular file
    start, kept = p.mm.map_file(addr, length, prot, fixed=fixed, noreplace=noreplace,
                                name=name or b"", offset=offset, pristine=host is not None and bool(name),
                                host=host)
    length = (length + PAGE - 1) & ~(PAGE - 1)
    try:
        for lo, hi in _gaps(start, start + length, kept):
            at = offset + (lo - start)
            if host is not None:
                host_fd, size = host
                n = max(0, min(hi - lo, size - at))
                p.mm.fill(lo, n, lambda view: os.preadv(host_fd, [view], at))
            else:
                p.mm.store(lo, p.fs.contents(fd, at, hi - lo))
    except BaseException:
        p.mm.unmap(start, length)       # (a read of the host file failed: nothing stays mapped)
        raise
    return start


def _gaps(start, end, ranges):
    """The parts of [start, end) outside ranges."""
    for lo, hi in sorted(ranges):
        if lo > start:
            yield start, lo
        start = max(start, hi)
    if start < end:
        yield start, end


@syscall("munmap")
def sys_munmap(p, addr, length, *_):
    p.mm.unmap(addr, length)
    return 0


@syscall("mprotect")
def sys_mprotect(p, addr, length, prot, *_):
    p.mm.protect(addr, length, _prot(prot))
    return 0


@syscall("brk")
def sys_brk(p, addr, *_):
    return p.mm.brk(addr)


@syscall("mremap")
def sys_mremap(p, old, old_len, new_len, flags, new, *_):
    if flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED) or (flags & MREMAP_FIXED and not flags & MREMAP_MAYMOVE):
        _fail(E.EINVAL)
    return p.mm.remap(old, old_len, new_len, bool(flags & MREMAP_MAYMOVE),
                      new if flags & MREMAP_FIXED else None)


@syscall("madvise")
def sys_madvise(p, addr, length, advice, *_):
    if addr % PAGE:
        _fail(E.EINVAL)
    if s32(advice) == 4:                      # MADV_DONTNEED: anonymous pages read as zero again
        p.mm.drop(addr, length)
    return 0


@syscall("mlock", "munlock", "mlockall", "munlockall", "msync")
def sys_mem_nothing(p, *_):
    return 0


# -- process --------------------------------------------------------------------------------

@syscall("exit", "exit_group")
def sys_exit(p, status, *_):
    raise ProgramExit(status & 0xFF)


# Calls whose answer is a constant (the dispatcher in C answers them without a Python call).
CONSTANTS = {"getpid": PID, "gettid": PID, "getpgrp": PID, "getsid": PID, "getpgid": PID,
             "getppid": PID - 1, "getuid": UID, "geteuid": UID, "getgid": UID, "getegid": UID}


def _constant(value):
    def constant(p, *_):
        return value
    return constant


for _name, _value in CONSTANTS.items():
    TABLE[NUMBERS[_name]] = _constant(_value)


@syscall("getresuid", "getresgid")
def sys_getresuid(p, a, b, c, *_):
    for addr in (a, b, c):
        p.mm.write(addr, struct.pack("<I", UID))
    return 0


@syscall("getgroups")
def sys_getgroups(p, *_):
    return 0


@syscall("uname")
def sys_uname(p, buf, *_):
    fields = (b"Linux", b"whpfast", b"6.1.0", b"#1 SMP whpfast", b"x86_64", b"(none)")
    p.mm.write(buf, b"".join(f.ljust(65, b"\0") for f in fields))
    return 0


@syscall("arch_prctl")
def sys_arch_prctl(p, code, addr, *_):
    which = {0x1002: "fs", 0x1001: "gs", 0x1003: "fs", 0x1004: "gs"}.get(code)
    if which is None:
        _fail(E.EINVAL)
    if code in (0x1002, 0x1001):               # ARCH_SET_FS / ARCH_SET_GS
        if addr >= 1 << 47:
            _fail(E.EPERM)
        p.set_segment_base(which, addr)
        return 0
    p.mm.write(addr, struct.pack("<Q", p.set_segment_base(which, None)))
    return 0


@syscall("set_tid_address")
def sys_set_tid_address(p, *_):
    return PID


@syscall("set_robust_list")
def sys_set_robust_list(p, *_):
    return 0


@syscall("futex")
def sys_futex(p, uaddr, op, val, timeout, *_):
    cmd = op & 0x7F
    if cmd in (1, 10):                          # FUTEX_WAKE(_BITSET): nobody else to wake
        return 0
    if cmd in (0, 9):                           # FUTEX_WAIT(_BITSET)
        current = struct.unpack("<I", p.mm.read(uaddr, 4))[0]
        if current != val & 0xFFFFFFFF:
            _fail(E.EAGAIN)
        # One thread: no one can ever wake this wait. Report a timeout instead of hanging.
        _fail(E.ETIMEDOUT)
    _fail(E.ENOSYS)


@syscall("sched_getaffinity")
def sys_sched_getaffinity(p, pid, size, mask, *_):
    if size < 8 or size % 8:
        _fail(E.EINVAL)
    p.mm.write(mask, struct.pack("<Q", 1))     # one CPU
    return 8


@syscall("sched_setaffinity", "sched_yield")
def sys_sched_nothing(p, *_):
    return 0


@syscall("getcpu")
def sys_getcpu(p, cpu, node, *_):
    for addr in (cpu, node):
        if addr:
            p.mm.write(addr, struct.pack("<I", 0))
    return 0


RLIM_INFINITY = (1 << 64) - 1


@syscall("prlimit64")
def sys_prlimit64(p, pid, resource, new, old, *_):
    if pid not in (0, PID):
        _fail(E.ESRCH)
    return _rlimit(p, resource, old)


@syscall("getrlimit")
def sys_getrlimit(p, resource, old, *_):
    return _rlimit(p, resource, old)


@syscall("setrlimit")
def sys_setrlimit(p, *_):
    return 0


def _rlimit(p, resource, old):
    if resource > 15:
        _fail(E.EINVAL)
    limit = {3: p.stack_size, 7: 1024, 9: p.memory_size}.get(resource, RLIM_INFINITY)
    if old:
        p.mm.write(old, struct.pack("<QQ", limit, limit))
    return 0


@syscall("getrusage")
def sys_getrusage(p, who, buf, *_):
    p.mm.write(buf, bytes(144))
    return 0


@syscall("times")
def sys_times(p, buf, *_):
    if buf:
        p.mm.write(buf, bytes(32))
    return p.guest_clock_ns(time.CLOCK_MONOTONIC) // 10**7 & ((1 << 63) - 1)   # 100 Hz ticks


@syscall("sysinfo")
def sys_sysinfo(p, buf, *_):
    uptime = p.guest_clock_ns(time.CLOCK_BOOTTIME) // 10**9      # the guest's, not the host's
    info = struct.pack("<q3Q6QHH4xQQI", uptime, 0, 0, 0, p.memory_size,
                       p.memory_size // 2, 0, 0, 0, 0, 1, 0, 0, 0, 1)
    p.mm.write(buf, info.ljust(112, b"\0"))
    return 0


@syscall("getrandom")
def sys_getrandom(p, buf, length, flags, *_):
    length = min(length, 1 << 20)
    p.mm.check(buf, length, write=True)
    p.mm.write(buf, os.urandom(length))
    return length


@syscall("umask")
def sys_umask(p, mask, *_):
    return p.fs.umask(mask & 0o777)


@syscall("personality")
def sys_personality(p, *_):
    return 0


# Calls the sandbox refuses: the errno the program gets, and why. clone3 is ENOSYS so that glibc
# falls back to clone, which then fails the way a process at its limit would.
REFUSED = {
    ("clone", "fork", "vfork"): (E.EAGAIN, "one thread, one process: the sandbox cannot create another"),
    ("clone3",): (E.ENOSYS, "clone3 is not implemented"),
    ("execve", "execveat"): (E.EACCES, "the sandbox runs one program"),
    ("wait4", "waitid"): (E.ECHILD, "there are no child processes"),
    ("socket", "socketpair"): (E.EACCES, "no network in the sandbox"),
    ("pipe", "pipe2"): (E.ENOSYS, "pipes are not supported"),
    ("setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setsid", "setpgid",
     "setgroups"): (E.EPERM, "the sandbox's identity is fixed"),
}


# Not implemented, so ENOSYS and counted in unsupported_syscalls: alarm, setitimer, getitimer,
# timer_create. No signal is ever delivered to the program, so no timer could fire: a failure says
# so (alarm(2) cannot fail on Linux, so a C program sees (unsigned)-1 from it; PythonSandbox's
# signal.alarm raises OSError ENOSYS, signal.setitimer signal.ItimerError).


def _refuse(err, why):
    def refuse(p, *_):
        _fail(err, why)
    return refuse


for _names, (_err, _why) in REFUSED.items():
    for _name in _names:
        TABLE[NUMBERS[_name]] = _refuse(_err, _why)


# -- time -----------------------------------------------------------------------------------

# The clock a guest's clock id reads (LinuxSandbox.guest_clock_ns: the host's, less the offset
# that makes the guest's start near zero at its boot), for the ids the sandbox serves. The CPU-time
# clocks read the guest's monotonic time: one process, always running.
_GUEST_CLOCKS = {1: time.CLOCK_MONOTONIC, 6: time.CLOCK_MONOTONIC, 2: time.CLOCK_MONOTONIC,
                 3: time.CLOCK_MONOTONIC, 4: time.CLOCK_MONOTONIC_RAW, 7: time.CLOCK_BOOTTIME,
                 9: time.CLOCK_BOOTTIME}


def _clock_ns(p, clock):
    if clock == 0 or clock == 8 or clock == 5 or clock == 11:      # REALTIME(_ALARM, _COARSE), TAI
        return time.time_ns()
    if clock in _GUEST_CLOCKS:                # MONOTONIC(_COARSE, _RAW), BOOTTIME(_ALARM), CPU
        return p.guest_clock_ns(_GUEST_CLOCKS[clock])
    _fail(E.EINVAL)


@syscall("clock_gettime")
def sys_clock_gettime(p, clock, tp, *_):
    ns = _clock_ns(p, s32(clock))
    p.mm.write(tp, struct.pack("<qq", ns // 10**9, ns % 10**9))
    return 0


@syscall("clock_getres")
def sys_clock_getres(p, clock, res, *_):
    _clock_ns(p, s32(clock))
    if res:
        p.mm.write(res, struct.pack("<qq", 0, 1))
    return 0


@syscall("gettimeofday")
def sys_gettimeofday(p, tv, tz, *_):
    ns = time.time_ns()
    if tv:
        p.mm.write(tv, struct.pack("<qq", ns // 10**9, ns % 10**9 // 1000))
    if tz:
        p.mm.write(tz, bytes(8))
    return 0


@syscall("time")
def sys_time(p, tloc, *_):
    now = time.time_ns() // 10**9
    if tloc:
        p.mm.write(tloc, struct.pack("<q", now))
    return now


def _sleep(p, req):
    sec, nsec = struct.unpack("<qq", p.mm.read(req, 16))
    if sec < 0 or not 0 <= nsec < 10**9:
        _fail(E.EINVAL)
    p.sleep(sec + nsec / 1e9)
    return 0


@syscall("nanosleep")
def sys_nanosleep(p, req, rem, *_):
    return _sleep(p, req)


@syscall("clock_nanosleep")
def sys_clock_nanosleep(p, clock, flags, req, rem, *_):
    _clock_ns(p, s32(clock))
    if flags & 1:                              # TIMER_ABSTIME
        sec, nsec = struct.unpack("<qq", p.mm.read(req, 16))
        p.sleep(max(0.0, sec + nsec / 1e9 - _clock_ns(p, s32(clock)) / 1e9))
        return 0
    return _sleep(p, req)


# -- signals (recorded; never delivered) -----------------------------------------------------

@syscall("rt_sigaction")
def sys_rt_sigaction(p, sig, act, oact, sigsetsize, *_):
    if sigsetsize != 8 or not 1 <= sig <= 64:
        _fail(E.EINVAL)
    actions = p.proc.actions
    new = p.mm.read(act, 32) if act else None          # read before oact is written: may alias
    if new is not None and sig in (SIGKILL, SIGSTOP):
        _fail(E.EINVAL)
    if oact:
        p.mm.write(oact, actions[sig])
    if new is not None:
        p.proc = p.proc._replace(actions=actions[:sig] + (new,) + actions[sig + 1:])
    return 0


@syscall("rt_sigprocmask")
def sys_rt_sigprocmask(p, how, set_, oset, sigsetsize, *_):
    if sigsetsize != 8:
        _fail(E.EINVAL)
    mask = p.proc.sigmask
    value = struct.unpack("<Q", p.mm.read(set_, 8))[0] if set_ else None
    if value is not None and how not in (0, 1, 2):
        _fail(E.EINVAL)
    if oset:
        p.mm.write(oset, struct.pack("<Q", mask))
    if value is not None:
        mask = (mask | value, mask & ~value, value)[how]
        mask &= ~((1 << (SIGKILL - 1)) | (1 << (SIGSTOP - 1)))
        p.proc = p.proc._replace(sigmask=mask)
    return 0


@syscall("sigaltstack")
def sys_sigaltstack(p, ss, old, *_):
    new = p.mm.read(ss, 24) if ss else None
    if old:
        p.mm.write(old, p.proc.altstack)
    if new is not None:
        p.proc = p.proc._replace(altstack=new)
    return 0


@syscall("kill", "tkill")
def sys_kill(p, pid, sig, *_):
    return _kill(p, s32(pid), s32(sig))


@syscall("tgkill")
def sys_tgkill(p, tgid, tid, sig, *_):
    return _kill(p, s32(tid), s32(sig))


def _kill(p, pid, sig):
    if pid not in (0, -1, PID):
        _fail(E.ESRCH)
    if not 0 <= sig <= 64:
        _fail(E.EINVAL)
    if sig == 0 or p.proc.actions[sig][:8] == struct.pack("<Q", 1):     # SIG_IGN
        return 0
    raise ProgramKilled(sig)


# The pre-*at calls are their *at form with dirfd = AT_FDCWD (and the flags they imply).
CWD = AT_FDCWD & ((1 << 64) - 1)


def _legacy(name, at_name, arguments):
    at = TABLE[NUMBERS[at_name]]
    TABLE[NUMBERS[name]] = lambda p, a, b, c, *_: at(p, *arguments(a, b, c), 0, 0, 0)


_legacy("open", "openat", lambda path, flags, mode: (CWD, path, flags, mode))
_legacy("creat", "openat", lambda path, mode, _: (CWD, path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode))
_legacy("stat", "newfstatat", lambda path, buf, _: (CWD, path, buf, 0))
_legacy("lstat", "newfstatat", lambda path, buf, _: (CWD, path, buf, 0x100))       # AT_SYMLINK_NOFOLLOW
_legacy("access", "faccessat", lambda path, mode, _: (CWD, path, mode))
_legacy("readlink", "readlinkat", lambda path, buf, size: (CWD, path, buf, size))
_legacy("mkdir", "mkdirat", lambda path, mode, _: (CWD, path, mode))
_legacy("unlink", "unlinkat", lambda path, _, __: (CWD, path, 0))
_legacy("rmdir", "unlinkat", lambda path, _, __: (CWD, path, 0x200))               # AT_REMOVEDIR
_legacy("rename", "renameat", lambda old, new, _: (CWD, old, CWD, new))
_legacy("symlink", "symlinkat", lambda target, path, _: (target, CWD, path))
_legacy("chmod", "fchmodat", lambda path, mode, _: (CWD, path, mode))


dispatch = py_dispatch
if not PURE_PYTHON:
    from .. import _linux
    dispatch = _linux.Dispatcher(TABLE, {NUMBERS[n]: v for n, v in CONSTANTS.items()}, unsupported_name)
