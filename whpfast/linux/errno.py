"""Errors inside the Linux personality.

A handler that refuses a system call raises `LinuxError(errno, message)`; the syscall layer turns
it into `-errno` in one place. The numbers are Linux's own (x86-64), written out here rather than
taken from the host's `errno` module, whose values differ on Windows (the guest is always Linux).
`from_oserror` is the one place where a failed host call becomes a LinuxError."""

import errno as _host_errno

from ..errors import WhpfastError

EPERM = 1
ENOENT = 2
ESRCH = 3
EINTR = 4
EIO = 5
ENXIO = 6
E2BIG = 7
ENOEXEC = 8
EBADF = 9
ECHILD = 10
EAGAIN = 11
ENOMEM = 12
EACCES = 13
EFAULT = 14
EBUSY = 16
EEXIST = 17
EXDEV = 18
ENODEV = 19
ENOTDIR = 20
EISDIR = 21
EINVAL = 22
ENFILE = 23
EMFILE = 24
ENOTTY = 25
ETXTBSY = 26
EFBIG = 27
ENOSPC = 28
ESPIPE = 29
EROFS = 30
EMLINK = 31
EPIPE = 32
ERANGE = 34
EDEADLK = 35
ENAMETOOLONG = 36
ENOLCK = 37
ENOSYS = 38
ENOTEMPTY = 39
ELOOP = 40
ENODATA = 61
EOVERFLOW = 75
ENOTSUP = EOPNOTSUPP = 95
ESTALE = 116

_NAMES = {v: k for k, v in sorted(globals().items(), reverse=True)
          if k.isupper() and k.startswith("E") and isinstance(v, int)}


class LinuxError(WhpfastError):
    """A system call of the guest failed with `errno` (a Linux errno value)."""

    def __init__(self, errno, message=None):
        self.errno = errno
        name = _NAMES.get(errno, f"errno {errno}")
        super().__init__(f"{name}: {message}" if message else name)


def from_oserror(exc, what=None):
    """The host's OSError (from a read-only look at a host file) as the LinuxError the guest sees:
    the host's errno translated by name to Linux's number, EIO when Linux has no such name."""
    name = _host_errno.errorcode.get(exc.errno or 0)
    err = globals().get(name, EIO) if name else EIO
    return LinuxError(err, what or exc.strerror)
