"""What every part of the file system shares: the Linux x86-64 values of its calls' flags and
limits, the read-policy helpers the sandboxes use (inside_path, read_mapping), and the small
helpers that raise LinuxError or take a register value as the kernel's `int`."""

import os
import struct
import sys

from ... import errors
from ..errno import LinuxError
from .state import MAX_FILE, MAX_LOCKS, NAME_MAX, PATH_MAX  # noqa: F401 (re-exported)


# Linux x86-64 values (written out: the host's os.O_* differ on Windows).
O_ACCMODE, O_RDONLY, O_WRONLY, O_RDWR = 3, 0, 1, 2
O_CREAT, O_EXCL, O_NOCTTY, O_TRUNC, O_APPEND = 0o100, 0o200, 0o400, 0o1000, 0o2000
O_NONBLOCK, O_DSYNC, O_ASYNC, O_DIRECT, O_LARGEFILE = 0o4000, 0o10000, 0o20000, 0o40000, 0o100000
O_DIRECTORY, O_NOFOLLOW, O_NOATIME, O_CLOEXEC = 0o200000, 0o400000, 0o1000000, 0o2000000
O_SYNC, O_PATH, O_TMPFILE = 0o4010000, 0o10000000, 0o20000000 | O_DIRECTORY
_STATUS_FLAGS = (O_ACCMODE | O_APPEND | O_NONBLOCK | O_SYNC | O_ASYNC | O_DIRECT | O_NOATIME
                 | O_PATH | O_LARGEFILE)
_SETFL_FLAGS = O_APPEND | O_NONBLOCK | O_ASYNC | O_DIRECT | O_NOATIME

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW, AT_REMOVEDIR, AT_EACCESS, AT_NO_AUTOMOUNT = 0x100, 0x200, 0x200, 0x800
AT_EMPTY_PATH, AT_STATX_SYNC_TYPE = 0x1000, 0x6000
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC = 0, 1, 2, 3, 4, 1030
F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 5, 6, 7, 36, 37, 38
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 4, 8     # flock operations; MAX_LOCKS bounds all locks
FIONCLEX, FIOCLEX = 0x5450, 0x5451
SEEK_SET, SEEK_CUR, SEEK_END, SEEK_DATA, SEEK_HOLE = 0, 1, 2, 3, 4

S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000
S_IFCHR, S_IFIFO = 0o020000, 0o010000
_STATFS = struct.Struct("<qqQQQQQiiqqq32x")     # struct statfs: type, bsize, blocks, bfree,
_STATFS_BLOCK = 4096                            # bavail, files, ffree, fsid, namelen, frsize, flags
TMPFS_MAGIC, PROC_SUPER_MAGIC, SYSFS_MAGIC = 0x01021994, 0x9FA0, 0x62656572
PIPEFS_MAGIC, OVERLAYFS_MAGIC = 0x50495045, 0x794C7630
ST_RDONLY, ST_NOSUID, ST_NODEV, ST_VALID = 1, 2, 4, 0x20
SANDBOX_USER = b"sandbox"    # the user name of the synthesized /etc/passwd (its uid: FileSystem's)
UTIME_NOW, UTIME_OMIT = "now", "omit"     # utimensat's times besides ns
_DT = {S_IFDIR: 4, S_IFREG: 8, S_IFLNK: 10, S_IFCHR: 2, S_IFIFO: 1, 0o140000: 12, 0o060000: 6}

MAXSYMLINKS = 40
MAX_IO = 1 << 24            # largest read served at once: a short read, as Linux allows
STATX_BASIC_STATS = 0x7FF
_INODE_COST = 256           # /tmp bytes charged per inode and per name (plus the name's bytes),
                            # so metadata is capped too: a name of 255 bytes costs 511
_HOSTFD_CACHE = 64          # host fds kept for files no guest fd holds open
_DIRFD_CACHE = 64           # host fds kept for directories below the read roots (least recently
                            # used closed first; reopened from the parent, checked, when needed)
_HELD_MAX = 64 << 20        # host bytes the open descriptions may hold in all (a synthesized
_LISTING_ENTRY = 128        # file's contents as of its open, a directory's listing at about
                            # this much per entry): past that, open or getdents64 is ENOMEM
_CACHE_MAX = 1 << 16        # look-ups remembered per FileSystem, per kind (paths, walks, listings):
_CACHE_PATH = 512           # bounded, and walks of longer paths are not remembered, so that a
                            # guest probing endless names costs the host tens of MiB at most
_SYN_DEV, _TMP_DEV, _PIPE_DEV = 0x13, 0x14, 0x0C     # st_dev of synthesized, /tmp, console nodes
_SYN_TIME = 0               # their times: fixed, so a state decoded elsewhere looks the same

_WINDOWS = sys.platform == "win32"
MAX_EXTRA_FILES, MAX_EXTRA_BYTES = 64, 1 << 20     # FileSystem(extra_files=): files, bytes
_RESERVED = (b"/proc", b"/dev")   # always synthesized: a read entry there is refused
_TMP = b"/tmp"                  # the sandbox's tmpfs: a read entry below it is a bind mount in it
_READ_ONLY = "read-only (read= paths are mounted read-only; /tmp is writable)"


def inside_path(host_path):
    """Where a `read=` mapping built with read_mapping() shows `host_path` inside: the same
    path (a host path under /tmp too: read entries there are mounted in the sandbox's /tmp)."""
    return os.path.abspath(os.fsdecode(host_path))


def read_mapping(host_paths):
    """{inside path: host path} for `read=`: each host path where inside_path() shows it."""
    return {inside_path(p): os.path.abspath(os.fsdecode(p)) for p in host_paths}


ReadPolicyError = errors.ReadPolicyError        # (defined with the other errors; raised here)


def _fail(err, msg=None):
    raise LinuxError(err, msg)


def _s32(v):
    """A register value as the kernel's `int` argument (fcntl's F_DUPFD lower bound)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _s64(v):
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >> 63 else v


_WINDOWS_DEVICES = {b"CON", b"PRN", b"AUX", b"NUL", b"CONIN$", b"CONOUT$",
                    *(b"COM%d" % i for i in range(10)), *(b"LPT%d" % i for i in range(10))}


def _windows_name_ok(name):
    """Whether a Linux name means just itself on a Windows host: no separator (a backslash),
    no stream (a colon), no device name (NUL, CON.txt, ...), no trailing dot or space (Windows
    drops them: "a." would name "a"), no wildcard or other character Windows refuses."""
    if any(c < 32 or c in b'\\:*?"<>|' for c in name) or name[-1:] in (b".", b" "):
        return False
    return name.split(b".")[0].rstrip(b" ").upper() not in _WINDOWS_DEVICES


def _split(path):
    return [c for c in path.split(b"/") if c]
