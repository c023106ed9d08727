"""The file system a Linux guest sees: pure Python on the host side, no guest memory access.

The namespace is built from `read` (host directories and files, read-only), a size-capped
in-memory /tmp (a read entry below /tmp is a read-only bind mount in it, see _mount_tmp), and a
few synthesized files (/proc/self/..., /dev/null, ...). Every path the guest
names is walked here, component by component, by ONE walker (`_walk`): ".." is taken on the
inside path (the parent of a mount point is its inside parent, never the host's), symlink targets
are re-interpreted inside the namespace and walked again, and /proc/self/fd/N leads to the very
node that fd holds. Host special files (devices, FIFOs, sockets) under a read root are never
opened.

The host kernel never resolves a path the guest influenced (see "host access" below): a read
root is the host path the caller named, opened once when the FileSystem is made; everything
below it is reached one component at a time from its parent directory's fd, without following
a symlink (fstatat/openat/readlinkat with AT_SYMLINK_NOFOLLOW or O_NOFOLLOW, directories with
O_DIRECTORY), and every fd opened must be the inode the look-up saw. So whoever can write in a
read root (not the guest: another host user) swapping a directory or file for a symlink to
/etc while the guest runs gets the guest an error (ENOTDIR, ELOOP, ESTALE), never a file
outside `read`; a directory fd pins the directory the guest looked into.

Host look-ups (lstat, readlink, directory listings) are cached per FileSystem for its lifetime:
the read roots are taken as unchanging while a sandbox lives, which keeps CPython's thousands of
stat/open calls cheap and a restore free of host calls. Directory listings are also shared by
the file systems of the whole process while the directory's mtime says it has not changed (see
_host_entries): a host file changed between two sandboxes is seen by the second.

Warm start: `capture()` returns an immutable `FsState` (fd table with offsets and flags, cwd,
umask, the /tmp tree with its contents); `reset(state)` puts exactly that back. /tmp file contents
are `bytes` shared between the live tree and every state taken from it, and become a private
`bytearray` on the first write after a capture or reset (copy-on-write), so both are O(changes).
Host fds are not part of any state: they live in per-FileSystem caches keyed by node or inode
(shared between equal opens, opened lazily, released by `close_all()`). A reset back to the
state last captured or reset to puts back only the descriptions whose offset or flags moved.

Checked against the kernel itself (tests/test_linux_fs.py runs random calls on /tmp and random
walks through a host tree both here and through os.*). Not provided, on purpose or not yet: hard
links, file locks, statfs, atime updates, xattrs; /tmp files are not sparse (a hole costs its
bytes against tmp_size); host files show the host's inode numbers, owners and times.

What the guest may cost the host here is bounded: /tmp by tmp_size, charged per inode, per name
by its length and per byte of contents or symlink target; every path shown back (getcwd,
readlink of /proc/self/fd/N, mapping names, an unlinked file's former path) by PATH_MAX, as
Linux bounds getcwd and readlink (a mapping of a file whose path is longer is named
/tmp/#<inode> (path too long), where Linux would show the whole path); what open descriptions
hold (a synthesized file's contents, a directory listing) by _HELD_MAX; look-up caches by
_CACHE_MAX."""

import errno as _host_errno
import os
import struct
import sys
import time

from .. import errors
from ..errors import SnapshotError
from . import _fsstate
from ._fsstate import (LOCK_FLOCK, LOCK_OFD, LOCK_POSIX, MAX_FILE, MAX_LOCKS, NAME_MAX, PATH_MAX,
                       FsState)
from .errno import (EACCES, EAGAIN, EBADF, EBUSY, EDEADLK, EEXIST, EFBIG, EINVAL, EIO, EISDIR,
                    ELOOP, EMFILE, ENAMETOOLONG, ENODEV, ENOENT, ENOLCK, ENOMEM, ENOSPC, ENOTDIR,
                    ENOTEMPTY, ENOTTY, ENXIO, EOPNOTSUPP, EOVERFLOW, EROFS, ESPIPE, ESTALE, EXDEV, LinuxError, from_oserror)

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
# A host file: read-only, never through a symlink, and never blocking or becoming a terminal
# should a FIFO or device be put where the look-up saw a file (the inode check then refuses it).
_HOST_OPEN = (os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
              | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
# A host directory to look up names in: O_PATH where there is one (no read permission needed,
# nothing read); O_DIRECTORY | O_NOFOLLOW refuse a symlink put in its place.
_DIR_OPEN = (getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
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


# ---------------------------------------------------------------------------------------- nodes
# Each node is something a path can name. `path` is its canonical inside path (b"" for the root,
# else b"/a/b": no symlink, no "." or ".."), `parent` the directory ".." leads to.

class _HostNode:
    """A file, directory or symlink under a read root, with its (cached) lstat. `name` is its
    name in its host directory, which is `parent` (None for a read root itself); `host`, its
    host path, is for messages and snapshot records only: the host never resolves it."""
    __slots__ = ("path", "parent", "host", "st", "fmt", "ino", "packed", "name")

    def __init__(self, path, parent, host, st, name=None):
        self.path, self.parent, self.host, self.st, self.name = path, parent, host, st, name
        self.fmt = st.st_mode & S_IFMT
        if _WINDOWS and getattr(st, "st_file_attributes", 0) & 0x400 and self.fmt != S_IFLNK:
            self.fmt = 0        # a junction or other reparse point: never entered nor opened
        self.ino = st.st_ino
        self.packed = None                  # its struct stat, made once


class _Syn:
    """A synthesized node. `value` is per kind: a dict of children (directory), a callable
    returning the contents (file), a callable returning the target (symlink: bytes, or the node
    itself for /proc/self magic links), the device name, or the console name."""
    __slots__ = ("path", "parent", "fmt", "mode", "ino", "rdev", "value")

    def __init__(self, path, parent, mode, ino, value, rdev=0):
        self.path, self.parent, self.mode, self.ino, self.value, self.rdev = (
            path, parent, mode, ino, value, rdev)
        self.fmt = mode & S_IFMT


class _SynDir(_Syn):
    __slots__ = ()


class _FdDir(_Syn):          # /proc/self/fd: its entries are the open fds
    __slots__ = ()


class _SynFile(_Syn):
    __slots__ = ()


class _SynLink(_Syn):
    __slots__ = ()


class _Device(_Syn):         # /dev/null, /dev/zero, /dev/random, /dev/urandom
    __slots__ = ()


class _Console(_Syn):        # fds 0, 1, 2 at start: the caller serves their reads and writes
    __slots__ = ()


class _Tmp:
    """A directory, regular file or symlink of /tmp. `data`: dict name -> _Tmp (directory),
    bytes or bytearray (file; bytes while shared with a captured state), bytes (symlink).
    `name` is None once unlinked (the node lives on while an fd or the cwd holds it), and `gone`
    then holds the path it had, which readlink of /proc/self/fd/N shows."""
    __slots__ = ("ino", "fmt", "mode", "data", "parent", "name", "atime", "mtime", "ctime", "gone")

    def __init__(self, ino, fmt, mode, data, parent, name, now, gone=None):
        self.ino, self.fmt, self.mode, self.data = ino, fmt, mode, data
        self.parent, self.name, self.mtime, self.ctime, self.gone = parent, name, now, now, gone
        self.atime = now            # set at creation and by utimensat only (reads: noatime)


class _Open:
    """An open file description (shared by dup'ed fds). `data` holds a synthesized file's
    contents as of the open; `listing` caches a directory's entries for getdents64; `idx` is its
    index in the state last captured or reset to (-1: opened since)."""
    __slots__ = ("node", "flags", "offset", "data", "listing", "idx", "touched")

    def __init__(self, node, flags, offset=0, data=None, idx=-1):
        self.node, self.flags, self.offset, self.data, self.listing = node, flags, offset, data, None
        self.idx, self.touched = idx, False


def _s32(v):
    """A register value as the kernel's `int` argument (dirfd: AT_FDCWD arrives as 2**32-100)."""
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


def _file_key(node):
    """What FileSystem._hostfds knows a host file by: its inode (on Windows its host path, as
    st_ino can be 0 there)."""
    return node.host if _WINDOWS else (node.st.st_dev, node.st.st_ino)


_host_preadv = getattr(os, "preadv", None)     # not on Windows: read, then copy
if hasattr(os, "pread"):
    _host_pread = os.pread
else:                       # Windows: the host fd is private to this FileSystem, so seek + read
    def _host_pread(fd, n, offset):
        os.lseek(fd, offset, 0)
        return os.read(fd, n)


# ------------------------------------------------------------------------------ host access
# The only calls that reach the host's file system below a read root. `at` is a host directory
# as FileSystem._dirfd gives it, `name` one component the walker checked (no "/", not "." or
# ".."): the host kernel looks `name` up in that very directory and follows no symlink.

if _WINDOWS:
    # No *at calls: `at` is the directory's host path, resolved again by each call (junctions
    # and other reparse points are never entered, see _HostNode; a read root must not be
    # writable by anyone the sandbox guards against).
    def _stat_at(at, name):
        return os.lstat(at + b"/" + name)

    def _open_at(at, name, flags):
        return os.open(at + b"/" + name, flags)

    def _readlink_at(at, name):
        return os.readlink(at + b"/" + name)

    def _stat_dir(at):
        return os.lstat(at)

    def _scan_dir(at, add):
        with os.scandir(at) as it:
            for e in it:
                add(e)
else:
    def _stat_at(at, name):
        return os.stat(name, dir_fd=at, follow_symlinks=False)

    def _open_at(at, name, flags):
        return os.open(name, flags, dir_fd=at)

    def _readlink_at(at, name):
        return os.readlink(name, dir_fd=at)

    def _stat_dir(at):
        return os.fstat(at)

    def _scan_dir(at, add):
        # `at` is O_PATH, which cannot be read: "." opened from it is the same directory
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=at)
        try:
            with os.scandir(fd) as it:
                for e in it:
                    add(e)
        finally:
            os.close(fd)


# Host directory listings shared by every FileSystem of the process, {host path: ((mtime_ns,
# ino, dev), {name: (ino, d_type)})}: a cold boot lists the same large directories as the last one
# did (python3 -c 'print(1)': /usr/lib/python3.11 and others, ~0.3-0.5 ms each, a fifth of its
# host time). An entry is used only while the directory's mtime, inode and device are unchanged
# (creating, removing or renaming an entry changes the mtime), and stored only when that mtime is
# more than _RACY_NS old when it is read: a change within the file system's timestamp
# granularity (ext4: a jiffy) after the listing could otherwise keep the same mtime ("racy
# git"). Bounded in directories and entries. The host path is a key only: the inode and device
# come from the directory's own fd.
_SHARED_LISTINGS = {}
_SHARED_LISTINGS_ENTRIES = [0]
_SHARED_LISTINGS_MAX = 1 << 18      # entries, all directories together
_RACY_NS = 2 * 10**9


def _host_entries(host, at):
    """{name: (ino, d_type)} of the host directory `at` (see _stat_at), whose host path is
    `host` (not to be modified)."""
    try:
        st = _stat_dir(at)
        key = (st.st_mtime_ns, st.st_ino, st.st_dev)
        hit = _SHARED_LISTINGS.get(host)
        if hit is not None and hit[0] == key:
            return hit[1]
        entries = {}

        def add(e):
            if e.is_symlink():
                dtype = 10
            elif e.is_dir(follow_symlinks=False):
                dtype = 4
            elif e.is_file(follow_symlinks=False):
                dtype = 8
            else:                   # rare: a device, FIFO or socket
                dtype = _DT.get(e.stat(follow_symlinks=False).st_mode & S_IFMT, 0)
            entries[os.fsencode(e.name)] = (e.inode(), dtype)
        _scan_dir(at, add)
    except OSError as e:
        raise from_oserror(e) from None
    if time.time_ns() - st.st_mtime_ns > _RACY_NS \
            and _SHARED_LISTINGS_ENTRIES[0] + len(entries) <= _SHARED_LISTINGS_MAX:
        old = _SHARED_LISTINGS.get(host)
        _SHARED_LISTINGS[host] = (key, entries)
        _SHARED_LISTINGS_ENTRIES[0] += len(entries) - (len(old[1]) if old else 0)
    return entries


# ----------------------------------------------------------------------------------- the class

class FileSystem:
    """The namespace, fd table, cwd and /tmp of one Linux process. Methods raise LinuxError."""

    def __init__(self, read, *, cwd="/", exe=None, tmp_size=64 << 20, proc_maps=lambda: b"",
                 entropy=os.urandom, max_fds=1024, uid=0, gid=0, extra_files=None):
        self.max_fds = max_fds
        self._tmp_size, self._proc_maps, self._entropy = tmp_size, proc_maps, entropy
        self._uid, self._gid = uid, gid
        self._exe = os.fsencode(exe) if exe is not None else None
        self._ino = 1
        self._canon = {}            # canonical inside path -> node, or None (does not exist)
        self._overlay = {}          # directory path -> {name: node} placed there (mounts, synth)
        self._listings = {}         # directory path -> getdents entries (non-/tmp directories)
        self._links = {}            # host path -> symlink target
        self._walks = {}            # (start path, path, follow) -> node, for walks off /tmp
        self._hostfds = {}          # _file_key(node) -> host fd (read-only)
        self._rootfds = {}          # read root directory node -> its host fd, until close_all
        self._dirfds = {}           # other host directory node -> its fd, least recently used first
        self._root_names = {}       # read root's inside path -> names found in it (looked_up)
        mounts = self._parse_read(read)
        in_tmp = {k: mounts.pop(k) for k in [k for k in mounts if k.startswith(_TMP + b"/")]}
        root = mounts.pop(b"", None)
        if root is not None:
            self._root = self._host_root(b"", root)
            if self._root.fmt != S_IFDIR:
                raise ReadPolicyError(f"read maps '/' to {os.fsdecode(root)}, which is not a directory")
        else:
            self._root = _SynDir(b"", None, S_IFDIR | 0o555, self._new_ino(), {})
        self._root.parent = self._root
        self._canon[b""] = self._root
        extra = self._parse_extra_files(extra_files or {})
        for inside in sorted({*mounts, *extra}):    # parents first: a mount in an empty directory
            if inside in mounts and inside not in extra:
                self._place(inside, self._host_root(inside, mounts[inside]))
            elif extra[inside] is None:
                self._place(inside, _SynDir(inside, None, S_IFDIR | 0o555, self._new_ino(), {}))
            else:
                self._place(inside, _SynFile(inside, None, S_IFREG | 0o444, self._new_ino(),
                                             lambda data=extra[inside]: data))
        self._build_synthetic()
        self._umask = 0o022
        self._tmp_used = _INODE_COST  # the root's inode (as _recount counts it)
        self._held = 0              # bytes held by open descriptions (over-estimated, see _hold)
        self._tmp_frozen = None     # (FsState.tmp, {id(node): index}) of the current /tmp tree
        self._tmp_nodes = None      # the nodes behind _tmp_frozen, kept alive for their ids
        self._tmp_dirty = True
        self._grafts = []           # (names below /tmp, read root): the mounts in the tmpfs tree
        self._pinned = set()        # the tmpfs directories on the way to them (see renameat)
        self._dirty = True          # anything changed since _last (fds, offsets, cwd, umask)
        self._table_changed = True  # the fd -> description table changed since _last
        self._touched = []          # descriptions whose offset or flags changed since _last
        self._live = None           # the descriptions of _last, by index
        self._last = None           # the state last captured or reset to
        self._fds = {}
        self._ranges = {}           # _lock_key(node) -> [(owner, type, first, last), ...] by first:
                                    # record locks; owner _PROCESS (POSIX) or a description (OFD)
        self._flocks = {}           # _lock_key(node) -> {description: F_RDLCK or F_WRLCK}
        self._nlocks = 0            # records in both, at most MAX_LOCKS
        self._consoles = {}
        for fd, name in enumerate(("stdin", "stdout", "stderr")):
            node = self._consoles[name] = _Console(b"", None, S_IFIFO | 0o600, self._new_ino(), name)
            self._fds[fd] = (_Open(node, (O_RDONLY, O_WRONLY, O_WRONLY)[fd]), False)
        self._base_ino = self._ino          # /tmp inodes count on from here
        self._cwd = self._root
        try:
            self._mount_tmp(in_tmp)
        except BaseException:
            self.close_all()
            raise
        try:
            self._cwd = self._walk(AT_FDCWD, os.fsencode(cwd), start=self._root)
        except LinuxError as e:
            self.close_all()            # now, not when a collection finds the cycles above
            raise ReadPolicyError(f"cwd {cwd!r} is not inside the sandbox's file system ({e})") from None
        if self._cwd.fmt != S_IFDIR:
            self.close_all()
            raise ReadPolicyError(f"cwd {cwd!r} is not a directory")

    # -- construction

    @staticmethod
    def _parse_read(read):
        """{inside path: real host path} from `read`: host paths (same path inside) or a mapping."""
        if isinstance(read, (str, bytes, os.PathLike)):
            raise TypeError("read must be an iterable of host paths or a {inside: host} mapping, "
                            "not a single path")
        pairs = read.items() if hasattr(read, "items") else ((p, p) for p in read)
        mounts = {}
        for inside, host in pairs:
            inside, host = os.fsencode(inside), os.fsencode(host)
            if not inside.startswith(b"/") or b"\0" in inside:
                raise ReadPolicyError(f"read: inside path {os.fsdecode(inside)!r} must be absolute "
                                      "(a Linux path like /usr/lib)")
            parts = _split(inside)
            if b".." in parts or b"." in parts:
                raise ReadPolicyError(f"read: inside path {os.fsdecode(inside)!r} has '.' or '..'")
            key = b"".join(b"/" + p for p in parts)
            if any(key == r or key.startswith(r + b"/") for r in _RESERVED):
                raise ReadPolicyError(f"read: inside path {os.fsdecode(inside)!r} is under /proc or /dev, "
                                      "which the sandbox synthesizes: choose another inside path "
                                      f"(read={{'/data': {os.fsdecode(host)!r}}} maps inside -> host)")
            if key == _TMP:
                raise ReadPolicyError(f"read: inside path {os.fsdecode(inside)!r} is the sandbox's own "
                                      "/tmp: mount below it (e.g. '/tmp/data') or elsewhere")
            real = os.path.realpath(host)
            if not os.path.exists(real):
                swapped = (" (a mapping is {inside: host}: the host path is the value)"
                           if key and inside != host and os.path.exists(inside) else "")
                raise ReadPolicyError(f"read: host path {os.fsdecode(host)!r} does not exist{swapped}")
            if key in mounts and mounts[key] != real:
                raise ReadPolicyError(f"read: {os.fsdecode(key) or '/'} is mapped twice")
            mounts[key] = real
        return mounts

    @classmethod
    def of_config(cls, config, **kwargs):
        """The FileSystem a LinuxSandbox's recorded config (a snapshot's meta["config"]) makes:
        its read policy, cwd, exe, /tmp quota and extra files (stored as latin-1 text)."""
        extra = {k: None if v is None else v.encode("latin-1")
                 for k, v in config.get("extra_files", {}).items()}
        return cls(config["read"], cwd=config["cwd"], exe=config["exe"], tmp_size=config["tmp_size"],
                   extra_files=extra, **kwargs)

    @staticmethod
    def _parse_extra_files(files):
        """{inside path: contents} of `extra_files` (read-only files made up by the caller, such
        as a PythonSandbox's pyvenv.cfg; None: an empty directory, over whatever `read` shows
        there), checked: at most MAX_EXTRA_FILES, MAX_EXTRA_BYTES in all (a snapshot file
        declares them too: they cost the host what they hold)."""
        if not isinstance(files, dict) or len(files) > MAX_EXTRA_FILES:
            raise ReadPolicyError(f"extra_files must be a mapping of at most {MAX_EXTRA_FILES} "
                                  "{inside path: bytes}")
        out, total = {}, 0
        for inside, data in files.items():
            inside = os.fsencode(inside)
            parts = _split(inside)
            key = b"".join(b"/" + p for p in parts)
            if (not inside.startswith(b"/") or b"\0" in inside or b".." in parts or b"." in parts
                    or not key or any(key == r or key.startswith(r + b"/") for r in (*_RESERVED, _TMP))):
                raise ReadPolicyError(f"extra_files: inside path {os.fsdecode(inside)!r} must be an "
                                      "absolute path without '.' or '..', outside /proc, /dev and /tmp")
            if data is not None and not isinstance(data, bytes):
                raise TypeError(f"extra_files: the contents of {os.fsdecode(inside)} must be bytes "
                                "(or None: an empty directory)")
            total += len(data or b"") + len(key)
            if total > MAX_EXTRA_BYTES:
                raise ReadPolicyError(f"extra_files hold more than {MAX_EXTRA_BYTES} bytes")
            out[key] = data
        return out

    def _new_ino(self):
        self._ino += 1
        return self._ino

    def _host_root(self, path, host):
        """The node of a read root at inside `path`: the host path the caller named (made real
        by _parse_read), opened here once; the inode found now is the root for the sandbox's
        lifetime (an open after close_all must find it again, see _dirfd and _hostfd)."""
        try:
            if _WINDOWS:
                st = os.lstat(host)
            else:
                fd = os.open(host, getattr(os, "O_PATH", os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
                st = os.fstat(fd)
        except OSError as e:
            raise ReadPolicyError(f"read: cannot open {os.fsdecode(host)}: {e.strerror}") from None
        node = _HostNode(path, None, host, st)
        if not _WINDOWS:
            if node.fmt == S_IFDIR:
                self._rootfds[node] = fd
            else:                   # a file is opened for reading by _hostfd, checked likewise
                os.close(fd)
            if node.fmt == S_IFLNK:
                raise ReadPolicyError(f"read: {os.fsdecode(host)} became a symlink while it was opened")
        return node

    def _place(self, path, node):
        """Puts `node` at inside `path`, over whatever the host has there."""
        head, _, name = path.rpartition(b"/")
        parent = self._ensure_dir(head)
        node.parent = parent
        self._canon[path] = node
        self._overlay.setdefault(head, {})[name] = node

    def _ensure_dir(self, path):
        """The directory at inside `path` for placing something in it: the host's own directory
        when a read root already has a real one there, else a synthesized one."""
        node = self._canon.get(path)
        if node is None:
            head, _, name = path.rpartition(b"/")
            parent = self._ensure_dir(head)
            if type(parent) is _HostNode:
                try:
                    node = self._host_child(parent, name, path)
                except LinuxError:
                    pass
            if node is not None and node.fmt == S_IFDIR:
                self._canon[path] = node
            else:
                node = _SynDir(path, None, S_IFDIR | 0o555, self._new_ino(), {})
                self._place(path, node)
        if node.fmt != S_IFDIR:
            raise ReadPolicyError(f"read: {os.fsdecode(path)} is a file, yet something is mapped below it")
        return node

    def _mount_tmp(self, mounts):
        """The read entries below /tmp, as a container's bind mounts over its tmpfs: each
        mount point's directories are ordinary /tmp directories (made here, charged to tmp_size,
        kept by every state: see _graft), the mount point itself the read root. An entry below
        another one is placed in it like any nested read root."""
        done = []
        for inside in sorted(mounts):
            node = self._host_root(inside, mounts[inside])
            if any(inside.startswith(p + b"/") for p in done):
                self._place(inside, node)
            else:
                parts = _split(inside)[1:]
                if max(map(len, parts)) > NAME_MAX:
                    raise ReadPolicyError(f"read: inside path {os.fsdecode(inside)!r} has a name "
                                          f"longer than {NAME_MAX} bytes")
                self._canon[inside] = node
                self._grafts.append((parts, node))
                try:
                    self._graft(parts, node, make=True)
                except LinuxError:
                    raise ReadPolicyError(f"read: the mount points below /tmp need more than "
                                          f"tmp_size ({self._tmp_size} bytes)") from None
            done.append(inside)

    def _graft(self, parts, node, make):
        """Hangs the read root `node` at /tmp/<parts> in the /tmp tree: the directories on the
        way are made when `make` (else the tree has them: _graft_cost checked it), the name is
        charged like any other. Those directories are pinned: a rename would move the mount."""
        d = self._tmp_root
        for name in parts[:-1]:
            child = d.data.get(name)
            if child is None and make:
                child = self._tmp_new(d, name, S_IFDIR, 0o755, {})
            self._pinned.add(child)
            d = child
        if make:
            self._charge(_INODE_COST + len(parts[-1]))
        d.data[parts[-1]] = node
        node.parent = d

    def _graft_cost(self, tmp):
        """The /tmp bytes the mounts add to the tree of FsState.tmp `tmp`; SnapshotError when
        that tree has no directory where one goes or something at a mount point (every state
        captured here has the directories and nothing else there: it was taken under another
        read policy, or made up)."""
        kids = {(e[5], e[6]): i for i, e in enumerate(tmp) if e[5] >= 0}
        cost = 0
        for parts, node in self._grafts:
            i = 0
            for name in parts[:-1]:
                i = kids.get((i, name))
                if i is None or tmp[i][1] != S_IFDIR:
                    raise SnapshotError(f"the snapshot's /tmp has no directory for the read mount "
                                        f"{os.fsdecode(node.path)} (taken under another read policy?)")
            if (i, parts[-1]) in kids:
                raise SnapshotError(f"the snapshot's /tmp has a file at the read mount "
                                    f"{os.fsdecode(node.path)} (taken under another read policy?)")
            cost += _INODE_COST + len(parts[-1])
        return cost

    def _build_synthetic(self):
        def syn(cls, path, mode, value, rdev=0):
            self._place(path, cls(path, None, mode, self._new_ino(), value, rdev))

        def text(path, fn):
            syn(_SynFile, path, S_IFREG | 0o444, fn)

        def link(path, target):
            syn(_SynLink, path, S_IFLNK | 0o777, target)

        for d in (b"/proc", b"/proc/self", b"/dev"):
            syn(_SynDir, d, S_IFDIR | 0o555, {})
        syn(_FdDir, b"/proc/self/fd", S_IFDIR | 0o500, None)
        text(b"/proc/self/maps", lambda: bytes(self._proc_maps()))
        text(b"/proc/self/status", self._status)
        if self._exe is not None:
            link(b"/proc/self/exe", lambda: self._exe)
        link(b"/proc/self/cwd", lambda: self._cwd)
        for name in (b"online", b"possible"):
            text(b"/sys/devices/system/cpu/" + name, lambda: b"0\n")
        for name, minor in ((b"null", 3), (b"zero", 5), (b"random", 8), (b"urandom", 9)):
            syn(_Device, b"/dev/" + name, S_IFCHR | 0o666, name, rdev=(1 << 8) | minor)
        link(b"/dev/fd", lambda: b"/proc/self/fd")
        for fd, name in enumerate((b"stdin", b"stdout", b"stderr")):
            link(b"/dev/" + name, lambda fd=fd: b"/proc/self/fd/%d" % fd)
        self._tmp_root = _Tmp(self._new_ino(), S_IFDIR, 0o1777, {}, None, b"tmp", time.time_ns())
        self._place(b"/tmp", self._tmp_root)    # the one /tmp node a reset keeps (and refills)
        # A user database naming the sandbox's identity (getpass.getuser, pwd.getpwuid, `id`),
        # unless the read policy shows one: a caller who maps /etc gets what it mapped.
        users = {b"/etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n%s:x:%d:%d:whpfast sandbox:/tmp:/bin/sh\n"
                 % (SANDBOX_USER, self._uid, self._gid),
                 b"/etc/group": b"root:x:0:\n%s:x:%d:\n" % (SANDBOX_USER, self._gid)}
        for path, contents in users.items():
            try:
                self._walk(AT_FDCWD, path, start=self._root)
            except LinuxError:
                text(path, lambda contents=contents: contents)

    def _status(self):
        name = os.path.basename(self._exe or b"?")[:15]
        return (b"Name:\t%s\nUmask:\t%04o\nState:\tR (running)\nTgid:\t1\nPid:\t1\nPPid:\t0\n"
                b"Uid:\t%d\t%d\t%d\t%d\nGid:\t%d\t%d\t%d\t%d\nThreads:\t1\n"
                b"Cpus_allowed_list:\t0\n" % (name, self._umask, *[self._uid] * 4, *[self._gid] * 4))

    # -- the one path walker

    def _start(self, dirfd):
        if dirfd == AT_FDCWD:
            return self._cwd
        return self._desc(dirfd).node

    def _walk(self, dirfd, path, *, follow=True, empty=False, start=None):
        """The node `path` (bytes, without the guest's NUL) names, relative to `dirfd` (or
        `start`). `follow`: follow a symlink in the last component; `empty`: an empty path names
        dirfd's own node (AT_EMPTY_PATH)."""
        if len(path) >= PATH_MAX:
            _fail(ENAMETOOLONG)
        if b"\0" in path:
            _fail(EINVAL, "a path with a NUL byte")
        if not path:
            if empty:
                return self._start(_s32(dirfd)) if start is None else start
            _fail(ENOENT)
        if path[0] == 0x2F:
            cur = self._root
        else:
            cur = self._start(_s32(dirfd)) if start is None else start
        key = None
        if type(cur) is _HostNode or type(cur) is _SynDir:     # a start with a canonical path
            key = (cur.path, path, follow)
            hit = self._walks.get(key)
            if hit is not None:
                return hit
        comps = _split(path)
        if path[-1] == 0x2F:
            comps.append(b".")                  # "name/" must be a directory: follow it, check it
        comps.reverse()
        links = 0
        lookup = self._lookup
        while comps:
            if cur.fmt != S_IFDIR:
                _fail(ENOTDIR)
            name = comps.pop()
            if name == b".":
                continue
            if name == b"..":
                cur = cur.parent or self._tmp_root
                if type(cur) is _Tmp:           # (from a mount in /tmp) changes: not cached
                    key = None
                continue
            child = lookup(cur, name)
            if child.fmt == S_IFLNK and (comps or follow):
                links += 1
                if links > MAXSYMLINKS:
                    _fail(ELOOP)
                target = self._link_target(child)
                if not isinstance(target, bytes):   # a magic link: the node itself
                    cur, key = target, None
                    continue
                if not target:
                    _fail(ENOENT)
                if target[0] == 0x2F:
                    cur = self._root
                more = _split(target)
                if target[-1] == 0x2F:
                    more.append(b".")
                more.reverse()
                comps.extend(more)
                continue
            if type(child) is _Tmp or type(cur) is _FdDir:
                key = None                      # changes while the guest runs: not cached
            cur = child
        if key is not None and len(path) <= _CACHE_PATH and len(self._walks) < _CACHE_MAX:
            self._walks[key] = cur
        return cur

    def _walk_parent(self, dirfd, path, start=None):
        """(directory, last name) for creating or removing; name None when the path ends in
        "." or ".." or is "/" (it then names an existing directory, returned as the first)."""
        if len(path) >= PATH_MAX:
            _fail(ENAMETOOLONG)
        if b"\0" in path:
            _fail(EINVAL, "a path with a NUL byte")
        stripped = path.rstrip(b"/")
        if not stripped:
            if not path:
                _fail(ENOENT)
            return self._root, None
        head, _, name = stripped.rpartition(b"/")
        if name in (b".", b".."):
            return self._walk(dirfd, path, start=start), None
        parent = self._walk(dirfd, head + b"/" if head or stripped[0] == 0x2F else b".", start=start)
        if len(name) > NAME_MAX:
            _fail(ENAMETOOLONG)
        return parent, name

    def _lookup(self, d, name):
        """The child `name` of directory `d` (one component, not "." or "..")."""
        if type(d) is _Tmp:
            child = d.data.get(name)
            if child is None:
                _fail(ENAMETOOLONG if len(name) > NAME_MAX else ENOENT)
            return child
        path = d.path + b"/" + name
        node = self._canon.get(path, _UNKNOWN)
        if node is not _UNKNOWN:
            if node is None:
                _fail(ENOENT)
            return node
        if type(d) is _FdDir:
            return self._fd_link(name)
        if len(name) > NAME_MAX:
            _fail(ENAMETOOLONG)
        if _WINDOWS and not _windows_name_ok(name):
            _fail(ENOENT)
        if type(d) is not _HostNode:
            _fail(ENOENT)
        node = self._host_child(d, name, path)
        if len(self._canon) < _CACHE_MAX:     # bounded: a guest may probe endless names
            self._canon[path] = node
        if node is None:
            _fail(ENOENT)
        return node

    def _fd_link(self, name):
        if (not name.isdigit() or len(name) > 10 or (name[0] == 0x30 and len(name) > 1)
                or int(name) not in self._fds):
            _fail(ENOENT)
        return self._fd_link_node(int(name))

    def _fd_link_node(self, fd):
        """/proc/self/fd/N: a magic link to the node fd N holds (ENOENT once it is closed)."""
        return _SynLink(b"/proc/self/fd/%d" % fd, self._canon[b"/proc/self/fd"], S_IFLNK | 0o700,
                        self._fd_dir_ino(fd), lambda: self._desc(fd, ENOENT).node)

    def _fd_dir_ino(self, fd):
        return (1 << 40) + fd

    def _link_target(self, node):
        """bytes, or the node itself for /proc/self magic links."""
        if type(node) is _HostNode:
            target = self._links.get(node.host)
            if target is None:          # (a read root is never a symlink: see _host_root)
                try:
                    target = os.fsencode(_readlink_at(self._dirfd(node.parent), node.name))
                except OSError as e:
                    if e.errno == _host_errno.EINVAL:   # no symlink now (not Linux's EINVAL)
                        _fail(ESTALE, f"{os.fsdecode(node.host)} was replaced on the host")
                    raise from_oserror(e) from None
                self._links[node.host] = target
            return target
        if type(node) is _Tmp:
            return node.data
        return node.value()

    def _display(self, node):
        """The path readlink shows for an fd's node (/proc/self/fd/N, /proc/self/cwd), getcwd
        and a mapping's name. A /tmp path can grow without bound (chdir and relative names make
        any depth), but this one never exceeds PATH_MAX - 1 bytes: ENAMETOOLONG beyond, as
        Linux's getcwd and readlink of /proc/self/fd/N give, and the walk up stops there."""
        if type(node) is _Tmp:
            parts, size = [], 4                 # len(b"/tmp")
            n = node
            while n is not self._tmp_root:
                if n.name is None:
                    path = b"/".join([n.gone] + parts[::-1]) + b" (deleted)"
                    if len(path) >= PATH_MAX:
                        _fail(ENAMETOOLONG)
                    return path
                parts.append(n.name)
                size += 1 + len(n.name)
                if size >= PATH_MAX:
                    _fail(ENAMETOOLONG)
                n = n.parent
            return b"/".join([b"/tmp"] + parts[::-1])
        if type(node) is _Console:
            return b"pipe:[%d]" % node.ino
        return node.path or b"/"

    # -- fds

    def _desc(self, fd, err=EBADF):
        entry = self._fds.get(fd & 0xFFFFFFFF)      # the kernel takes fds as unsigned int
        if entry is None:
            _fail(err)
        return entry[0]

    def _free_fd(self, lowest=0):
        fd = lowest
        while fd in self._fds:
            fd += 1
        if fd >= self.max_fds:
            _fail(EMFILE, f"{self.max_fds} fds open")
        return fd

    def _install(self, fd, node, flags, data=None):
        self._fds[fd] = (_Open(node, (flags & _STATUS_FLAGS) | O_LARGEFILE, 0, data),
                         bool(flags & O_CLOEXEC))
        self._table_changed = self._dirty = True
        return fd

    def console(self, fd):
        """"stdin", "stdout" or "stderr" when fd is a console file (also after dup), else None."""
        entry = self._fds.get(fd & 0xFFFFFFFF)
        if entry is not None and type(entry[0].node) is _Console:
            return entry[0].node.value
        return None

    def openat(self, dirfd, path, flags, mode=0):
        flags &= 0xFFFFFFFF
        acc = flags & O_ACCMODE
        fd = self._free_fd()
        if flags & O_PATH:
            node = self._walk(dirfd, path, follow=not flags & O_NOFOLLOW)
            if flags & O_DIRECTORY and node.fmt != S_IFDIR:
                _fail(ENOTDIR)
            return self._install(fd, node, O_PATH | (flags & O_CLOEXEC))
        if acc == O_ACCMODE:
            _fail(EINVAL)
        if flags & O_TMPFILE & ~O_DIRECTORY:
            # checked before the walk, as Linux does: with O_DIRECTORY, without O_CREAT, writable
            if flags & (O_TMPFILE | O_CREAT) != O_TMPFILE or acc == O_RDONLY:
                _fail(EINVAL)
            d = self._walk(dirfd, path, follow=not flags & O_NOFOLLOW)
            if d.fmt != S_IFDIR:
                _fail(ENOTDIR)
            if type(d) is not _Tmp:
                _fail(EOPNOTSUPP, "O_TMPFILE works under /tmp only")
            node = self._tmp_new(d, None, S_IFREG, mode, bytearray())
            return self._install(fd, node, flags & ~O_TMPFILE)
        if flags & (O_CREAT | O_DIRECTORY) == O_CREAT | O_DIRECTORY:
            _fail(EINVAL)                       # as Linux since 6.4: it would create a file
        node = None
        if flags & O_CREAT:
            d, name = self._walk_parent(dirfd, path)
            links = 0
            while True:
                if name is None:                # ".", ".." or "/"
                    _fail(EEXIST if flags & O_EXCL else EISDIR)
                if path.endswith(b"/"):
                    _fail(EISDIR)
                try:
                    node = self._lookup(d, name)
                except LinuxError as e:
                    if e.errno != ENOENT:
                        raise
                    if type(d) is not _Tmp:
                        _fail(EROFS, f"{os.fsdecode(path)}: {_READ_ONLY}")
                    return self._install(fd, self._tmp_new(d, name, S_IFREG, mode, bytearray()), flags)
                if flags & O_EXCL:
                    _fail(EEXIST)
                if node.fmt != S_IFLNK or flags & O_NOFOLLOW:
                    break
                links += 1                      # O_CREAT through a symlink creates its target
                if links > MAXSYMLINKS:
                    _fail(ELOOP)
                target = self._link_target(node)
                if not isinstance(target, bytes):   # a magic link: the node an fd holds
                    if target.fmt == S_IFLNK:
                        _fail(ELOOP)            # an O_PATH fd of a symlink: never opened
                    node = target
                    break
                path = target
                if not path:
                    _fail(ENOENT)
                d, name = self._walk_parent(AT_FDCWD, path, start=d)
        if node is None or node.fmt == S_IFLNK:
            node = self._walk(dirfd, path, follow=not flags & O_NOFOLLOW)
        fmt = node.fmt
        if flags & O_DIRECTORY and fmt != S_IFDIR:
            _fail(ENOTDIR)                      # before ELOOP, as Linux
        if fmt == S_IFLNK:
            _fail(ELOOP)                        # O_NOFOLLOW on a symlink, or an fd's symlink
        writes = acc != O_RDONLY or (flags & O_TRUNC and fmt == S_IFREG)
        if fmt == S_IFDIR:
            if acc != O_RDONLY or flags & (O_CREAT | O_TRUNC):
                _fail(EISDIR)
        elif writes:
            self._check_write(node)
        t = type(node)
        data = None
        if t is _HostNode and fmt not in (S_IFREG, S_IFDIR):
            _fail(EACCES, "host devices, FIFOs and sockets are never opened")
        elif t is _SynFile:
            data = node.value()
            self._hold(len(data))
        elif t is _Tmp and flags & O_TRUNC and fmt == S_IFREG and node.data:
            self._tmp_resize(node, 0)
        return self._install(fd, node, flags, data)

    def _check_write(self, node):
        t = type(node)
        if t is _Tmp or t is _Device or (t is _Console and node.value != "stdin"):
            return
        if t is _HostNode or t is _SynDir:
            _fail(EROFS, _READ_ONLY)
        _fail(EACCES)

    def close(self, fd):
        entry = self._fds.pop(fd & 0xFFFFFFFF, None)
        if entry is None:
            _fail(EBADF)
        self._table_changed = self._dirty = True
        if self._nlocks:
            self._unlock_closed(entry[0])

    def dup(self, fd):
        desc = self._desc(fd)
        new = self._free_fd()
        self._fds[new] = (desc, False)
        self._table_changed = self._dirty = True
        return new

    def dup2(self, old, new):
        old, new = old & 0xFFFFFFFF, new & 0xFFFFFFFF
        desc = self._desc(old)
        if old == new:
            return new
        return self._dup_to(desc, new, False)

    def dup3(self, old, new, flags):
        old, new = old & 0xFFFFFFFF, new & 0xFFFFFFFF
        if flags & ~O_CLOEXEC or old == new:
            _fail(EINVAL)
        return self._dup_to(self._desc(old), new, bool(flags & O_CLOEXEC))

    def _dup_to(self, desc, new, cloexec):
        if not 0 <= new < self.max_fds:
            _fail(EBADF)
        replaced = self._fds.get(new)
        self._fds[new] = (desc, cloexec)
        self._table_changed = self._dirty = True
        if replaced is not None and self._nlocks:
            self._unlock_closed(replaced[0])
        return new

    def fcntl(self, fd, cmd, arg=0):
        fd &= 0xFFFFFFFF
        desc, cloexec = self._fds.get(fd) or _fail(EBADF)
        if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
            arg = _s32(arg)
            if not 0 <= arg < self.max_fds:
                _fail(EINVAL)
            new = self._free_fd(arg)
            self._fds[new] = (desc, cmd == F_DUPFD_CLOEXEC)
        elif cmd == F_GETFD:
            return int(cloexec)
        elif cmd == F_SETFD:
            self._fds[fd] = (desc, bool(arg & 1))
            new = 0
        elif cmd == F_GETFL:
            return desc.flags
        elif cmd == F_SETFL:
            if desc.flags & O_PATH:
                _fail(EBADF)
            desc.flags = (desc.flags & ~_SETFL_FLAGS) | (arg & _SETFL_FLAGS)
            self._moved(desc)
            return 0
        else:
            _fail(EINVAL, f"fcntl command {cmd} is not supported")
        self._table_changed = self._dirty = True
        return new

    def ioctl(self, fd, request, arg=0):
        fd &= 0xFFFFFFFF
        desc = self._desc(fd)
        if desc.flags & O_PATH:
            _fail(EBADF)
        if request in (FIOCLEX, FIONCLEX):
            self._fds[fd] = (desc, request == FIOCLEX)
            self._table_changed = self._dirty = True
            return 0
        _fail(ENOTTY)                           # no terminals here (TCGETS, TIOCGWINSZ, ...)


    # -- locks
    # One process, one thread: POSIX record locks never conflict with each other (one owner), so
    # conflicts arise only between OFD locks of different open file descriptions, OFD and POSIX
    # locks, and flock locks of different descriptions (flock and record locks are independent,
    # as on Linux). A request that conflicts can only wait for this very process, which is
    # waiting: F_SETLKW, F_OFD_SETLKW and flock without LOCK_NB fail with EDEADLK instead of
    # hanging (Linux says EDEADLK for POSIX locks; for OFD and flock it would sleep forever).
    # Ranges are inclusive [first, last], last MAX_FILE for "to the end of the file", as Linux.

    @staticmethod
    def _lock_key(node):
        return _file_key(node) if type(node) is _HostNode else node

    def _lock_desc(self, fd, typ):
        desc = self._desc(fd)
        acc = desc.flags & (O_ACCMODE | O_PATH)
        if acc & O_PATH or (typ == F_RDLCK and acc == O_WRONLY) or (typ == F_WRLCK and acc == O_RDONLY):
            _fail(EBADF)
        return desc

    def _lock_range(self, desc, whence, start, length):
        if whence == 1:
            start += desc.offset
        elif whence == 2:
            start += self._size(desc)
        elif whence != 0:
            _fail(EINVAL)
        if length > 0:
            last = start + length - 1
        elif length < 0:
            start, last = start + length, start - 1
        else:
            last = MAX_FILE
        if start < 0:
            _fail(EINVAL)
        if last > MAX_FILE:
            _fail(EOVERFLOW)
        return start, last

    def record_lock(self, fd, cmd, typ, whence, start, length, pid):
        """fcntl F_GETLK, F_SETLK(W) and their F_OFD_ forms with struct flock's fields. The
        *GETLK commands return the first conflicting lock as (type, first, last, is_posix) or
        None (no conflict); the others, None."""
        ofd = cmd in (F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW)
        if typ not in (F_RDLCK, F_WRLCK, F_UNLCK) or (ofd and pid != 0):
            _fail(EINVAL)
        getting = cmd in (F_GETLK, F_OFD_GETLK)
        if getting:
            if typ == F_UNLCK:
                _fail(EINVAL)
            desc = self._desc(fd)
            if desc.flags & O_PATH:
                _fail(EBADF)
        else:
            desc = self._lock_desc(fd, typ)
        first, last = self._lock_range(desc, whence, start, length)
        owner = desc if ofd else _PROCESS
        key = self._lock_key(desc.node)
        held = self._ranges.get(key, ())
        if getting:
            for o, t, s, e in held:
                if o is not owner and s <= last and first <= e and F_WRLCK in (t, typ):
                    return t, s, e, o is _PROCESS
            return None
        self._set_range(key, owner, typ, first, last, cmd in (F_SETLKW, F_OFD_SETLKW))
        return None

    def _set_range(self, key, owner, typ, first, last, wait):
        held = self._ranges.get(key, ())
        if typ != F_UNLCK:
            for o, t, s, e in held:
                if o is not owner and s <= last and first <= e and F_WRLCK in (t, typ):
                    _fail(EDEADLK if wait else EAGAIN)
        kept = []
        for rec in held:
            o, t, s, e = rec
            if o is not owner or e < first - 1 or s > last + 1:
                kept.append(rec)
            elif t == typ:                      # the same type, overlapping or adjacent: merged
                first, last = min(first, s), max(last, e)
            elif s <= last and first <= e:      # overlapped by another type: the rest stays
                if s < first:
                    kept.append((o, t, s, first - 1))
                if e > last:
                    kept.append((o, t, last + 1, e))
            else:
                kept.append(rec)
        if typ != F_UNLCK:
            kept.append((owner, typ, first, last))
        count = self._nlocks + len(kept) - len(held)
        if count > MAX_LOCKS:
            _fail(ENOLCK, f"more than {MAX_LOCKS} locks")
        kept.sort(key=lambda r: r[2])
        if kept:
            self._ranges[key] = kept
        else:
            self._ranges.pop(key, None)
        self._nlocks = count
        self._dirty = True

    def flock(self, fd, op):
        desc = self._desc(fd)
        if desc.flags & O_PATH:
            _fail(EBADF)
        typ = {LOCK_SH: F_RDLCK, LOCK_EX: F_WRLCK, LOCK_UN: F_UNLCK}.get(op & ~LOCK_NB)
        if typ is None:
            _fail(EINVAL)
        self._set_flock(self._lock_key(desc.node), desc, typ, not op & LOCK_NB)
        return 0

    def _set_flock(self, key, desc, typ, wait):
        held = self._flocks.get(key, {})
        mine = held.get(desc)
        if mine == typ:
            return
        if mine is not None:            # a conversion drops the old lock first, as Linux does
            del held[desc]
            self._nlocks -= 1
            self._dirty = True
        if typ == F_UNLCK:
            if not held:
                self._flocks.pop(key, None)
            return
        if any(F_WRLCK in (t, typ) for t in held.values()):
            if not held:
                self._flocks.pop(key, None)
            _fail(EDEADLK if wait else EAGAIN)
        if self._nlocks >= MAX_LOCKS:
            _fail(ENOLCK, f"more than {MAX_LOCKS} locks")
        held[desc] = typ
        self._flocks[key] = held
        self._nlocks += 1
        self._dirty = True

    def _unlock_closed(self, desc):
        """An fd of desc was closed: the process's POSIX locks on its file go (any fd closed
        releases them), and desc's OFD and flock locks when this was its last fd."""
        key = self._lock_key(desc.node)
        ranges, flocks = self._ranges.get(key), self._flocks.get(key)
        if ranges is None and flocks is None:
            return
        last_fd = not any(d is desc for d, _ in self._fds.values())
        if ranges is not None:
            kept = [r for r in ranges if r[0] is not _PROCESS and (r[0] is not desc or not last_fd)]
            self._nlocks -= len(ranges) - len(kept)
            if kept:
                self._ranges[key] = kept
            else:
                del self._ranges[key]
        if flocks is not None and last_fd and desc in flocks:
            del flocks[desc]
            self._nlocks -= 1
            if not flocks:
                del self._flocks[key]
        self._dirty = True

    # -- reading and writing

    def _io_desc(self, fd, write, positional=False):
        desc = self._desc(fd)
        acc = desc.flags & (O_ACCMODE | O_PATH)
        if acc == O_PATH or acc == (O_RDONLY if write else O_WRONLY):
            _fail(EBADF)
        if type(desc.node) is _Console:
            if positional:
                _fail(ESPIPE)                   # a pipe has no offsets
            _fail(EIO, "console fds are served by the caller (see FileSystem.console)")
        return desc

    def _read_at(self, desc, n, offset):
        if n < 0:
            _fail(EINVAL)
        n = min(n, MAX_IO)
        node = desc.node
        t = type(node)
        if node.fmt == S_IFDIR:
            _fail(EISDIR)
        if t is _HostNode:
            try:
                return _host_pread(self._hostfd(node), n, offset)
            except OSError as e:
                raise from_oserror(e) from None
        if t is _Tmp:
            return bytes(node.data[offset:offset + n])
        if t is _SynFile:
            return desc.data[offset:offset + n]
        if node.value == b"null":
            return b""
        if node.value == b"zero":
            return bytes(min(n, 1 << 20))
        return bytes(self._entropy(min(n, 1 << 20)))

    def read(self, fd, n):
        desc = self._io_desc(fd, False)
        data = self._read_at(desc, n, desc.offset)
        self._advance(desc, len(data))
        return data

    def pread(self, fd, n, offset):
        desc, offset = self._positional(fd, offset)
        return self._read_at(desc, n, offset)

    def read_into(self, fd, buf):
        """read() into a writable buffer (the guest's, in guest memory); returns the count.
        For a host file that is one preadv into it: no bytes object in between, which for the
        reads of a Python import (~9 KiB on average, some over 100 KiB) was an allocation and a
        copy per call."""
        desc = self._io_desc(fd, False)
        return self._advance(desc, self._read_at_into(desc, buf, desc.offset))

    def pread_into(self, fd, buf, offset):
        """pread() into a writable buffer; returns the count."""
        desc, offset = self._positional(fd, offset)
        return self._read_at_into(desc, buf, offset)

    def _advance(self, desc, n):
        """A read of n bytes moved the file offset (a regular file's; a device has none)."""
        if n and desc.node.fmt == S_IFREG:
            desc.offset += n
            self._moved(desc)
        return n

    def _positional(self, fd, offset):
        """(the description, the offset) of a pread: a negative offset is EINVAL."""
        desc = self._io_desc(fd, False, positional=True)
        offset = _s64(offset)
        if offset < 0:
            _fail(EINVAL)
        return desc, offset

    def _read_at_into(self, desc, buf, offset):
        node = desc.node
        if type(node) is _HostNode and node.fmt == S_IFREG and _host_preadv is not None:
            try:
                return _host_preadv(self._hostfd(node), [buf[:MAX_IO]], offset)
            except OSError as e:
                raise from_oserror(e) from None
        data = self._read_at(desc, len(buf), offset)
        buf[:len(data)] = data
        return len(data)

    def write(self, fd, data):
        desc = self._io_desc(fd, True)
        node = desc.node
        if type(node) is not _Tmp:
            return len(data)                    # a device: /dev/null and friends take anything
        if not data:
            return 0                            # not even O_APPEND moves the offset then
        offset = len(node.data) if desc.flags & O_APPEND else desc.offset
        n = self._tmp_write(node, offset, data)
        desc.offset = offset + n
        self._moved(desc)
        return n

    def pwrite(self, fd, data, offset):
        desc = self._io_desc(fd, True, positional=True)
        offset = _s64(offset)
        node = desc.node
        if type(node) is not _Tmp:
            return len(data)                    # a device
        if offset < 0:
            _fail(EINVAL)
        if desc.flags & O_APPEND:
            offset = len(node.data)             # Linux appends even for pwrite
        return self._tmp_write(node, offset, data)

    def lseek(self, fd, offset, whence):
        desc = self._desc(fd)
        node = desc.node
        offset = _s64(offset)
        if desc.flags & O_PATH:
            _fail(EBADF)
        if type(node) is _Console:
            _fail(ESPIPE)
        if type(node) is _Device:
            return 0
        if node.fmt == S_IFDIR:
            if whence == SEEK_SET:
                new = offset
            elif whence == SEEK_CUR:
                new = desc.offset + offset
            else:
                _fail(EINVAL)
        else:
            size = self._size(desc)
            if whence == SEEK_SET:
                new = offset
            elif whence == SEEK_CUR:
                new = desc.offset + offset
            elif whence == SEEK_END:
                new = size + offset
            elif whence in (SEEK_DATA, SEEK_HOLE):
                if not 0 <= offset < size:
                    _fail(ENXIO)
                new = offset if whence == SEEK_DATA else size
            else:
                _fail(EINVAL)
        if new < 0:
            _fail(EINVAL)
        if new > MAX_FILE:
            _fail(EOVERFLOW)
        if new != desc.offset:
            desc.offset = new
            self._moved(desc)
        return new

    def _size(self, desc):
        node = desc.node
        t = type(node)
        if t is _HostNode:
            return node.st.st_size
        if t is _Tmp:
            return len(node.data)
        if t is _SynFile:
            return len(desc.data)
        return 0

    def getdents64(self, fd, count):
        desc = self._desc(fd)
        if desc.flags & O_PATH:
            _fail(EBADF)
        if desc.node.fmt != S_IFDIR:
            _fail(ENOTDIR)
        node = desc.node
        if type(node) is _Tmp and node.name is None and node is not self._tmp_root:
            _fail(ENOENT, "the directory was removed")      # as Linux lists a removed one
        listing = desc.listing
        if listing is None or (desc.offset == 0 and type(desc.node) in (_Tmp, _FdDir)):
            listing = self._listing(desc.node)
            if not self._shared_listing(desc.node, listing):
                self._hold(len(listing) * _LISTING_ENTRY)
            desc.listing = listing
        out = []
        size = 0
        pos = desc.offset
        while pos < len(listing):
            name, ino, dtype = listing[pos]
            reclen = (19 + len(name) + 1 + 7) & ~7
            if size + reclen > count:
                break
            out.append(struct.pack("<QqHB", ino, pos + 1, reclen, dtype))
            out.append(name.ljust(reclen - 19, b"\0"))
            size += reclen
            pos += 1
        if not out and pos < len(listing):
            _fail(EINVAL, "buffer too small for the next entry")
        if pos != desc.offset:
            desc.offset = pos
            self._moved(desc)
        return b"".join(out)

    def _hold(self, n):
        """Charges n host bytes that an open description is about to keep (ENOMEM past
        _HELD_MAX): without it each of max_fds fds could hold its own copy of a large
        /proc/self/maps or /tmp directory listing. `_held` only ever overestimates (closing
        refunds nothing), so it is recounted exactly when a request would not fit."""
        if self._held + n > _HELD_MAX:
            self._held = self._recount_held()
            if self._held + n > _HELD_MAX:
                _fail(ENOMEM, f"open files hold more than {_HELD_MAX >> 20} MiB of host memory")
        self._held += n

    def _recount_held(self):
        held, seen = 0, set()
        for desc, _ in self._fds.values():
            if id(desc) not in seen:
                seen.add(id(desc))
                if desc.data is not None:
                    held += len(desc.data)
                if desc.listing is not None and not self._shared_listing(desc.node, desc.listing):
                    held += len(desc.listing) * _LISTING_ENTRY
        return held

    def _shared_listing(self, d, listing):
        """Whether `listing` is the one cached for d's path (shared by every description)."""
        return type(d) is not _Tmp and listing is self._listings.get(d.path)

    def _listing(self, d):
        """[(name, ino, d_type)] of a directory, "." and ".." first, then sorted by name."""
        dots = [(b".", d.ino, 4), (b"..", (d.parent or self._tmp_root).ino, 4)]
        if type(d) is _Tmp:
            return dots + sorted((n, c.ino, _DT.get(c.fmt, 0)) for n, c in d.data.items())
        if type(d) is _FdDir:
            return dots + [(b"%d" % fd, self._fd_dir_ino(fd), 10) for fd in sorted(self._fds)]
        cached = self._listings.get(d.path)
        if cached is not None:
            return cached
        entries = dict(_host_entries(d.host, self._dirfd(d))) if type(d) is _HostNode else {}
        for name, node in self._overlay.get(d.path, {}).items():
            entries[name] = (node.ino, _DT.get(node.fmt, 0))
        listing = dots + [(n, ino, dt) for n, (ino, dt) in sorted(entries.items())]
        if len(self._listings) < _CACHE_MAX >> 4:
            self._listings[d.path] = listing
        return listing

    # -- host files

    def _host_child(self, d, name, path):
        """The _HostNode of `name` in the host directory `d` (inside path `path`); None when
        the host has no such name."""
        at = self._dirfd(d)
        try:
            st = _stat_at(at, name)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise from_oserror(e) from None
        if d.name is None:                      # a read root: remembered for looked_up()
            self._root_names.setdefault(d.path, set()).add(name)
        return _HostNode(path, d, d.host + b"/" + name, st, name)

    def looked_up(self, root):
        """The names in the read root at inside path `root` that the guest has looked up and
        found so far (a PythonSandbox narrows its site-packages to them)."""
        return frozenset(self._root_names.get(b"".join(b"/" + p for p in _split(os.fsencode(root))), ()))

    def _dirfd(self, node):
        """The host directory `node` as the `at` of "host access": its fd, opened from its
        parent's fd (parents first, as needed) without following a symlink and checked to be
        the inode the look-up saw. Kept, as an fd pins its directory: a read root's until
        close_all (then opened again from the path the caller named, and checked likewise),
        others up to _DIRFD_CACHE, the least recently used closed first."""
        if _WINDOWS:
            return node.host
        fd = self._rootfds.get(node)
        if fd is not None:
            return fd
        dirfds = self._dirfds
        fd = dirfds.pop(node, None)
        if fd is not None:
            dirfds[node] = fd                   # the most recently used now
            return fd
        chain = [node]                          # node and the ancestors it needs opened
        while node.name is not None:
            node = node.parent
            fd = self._rootfds.get(node, dirfds.get(node))
            if fd is not None:
                break
            chain.append(node)
        try:
            for node in reversed(chain):
                if node.name is None:
                    fd = os.open(node.host, _DIR_OPEN)
                else:
                    fd = _open_at(fd, node.name, _DIR_OPEN)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (node.st.st_dev, node.st.st_ino):
                    os.close(fd)
                    _fail(ESTALE, f"{os.fsdecode(node.host)} was replaced on the host")
                (self._rootfds if node.name is None else dirfds)[node] = fd
        except OSError as e:
            raise from_oserror(e) from None
        while len(dirfds) > _DIRFD_CACHE:       # the one just opened is the newest: it stays
            os.close(dirfds.pop(next(iter(dirfds))))
        return fd

    def _hostfd(self, node):
        """A read-only host fd of the regular file `node`: opened from its directory's fd (a
        read root file: from the path the caller named) and checked to be the inode the
        look-up saw; shared by every node of that inode."""
        key = _file_key(node)
        fd = self._hostfds.get(key)
        if fd is None:
            if len(self._hostfds) >= _HOSTFD_CACHE:
                self._evict_hostfds()
            if node.name is None:
                fd = os.open(node.host, _HOST_OPEN)
            else:
                fd = _open_at(self._dirfd(node.parent), node.name, _HOST_OPEN)
            st = os.fstat(fd)
            if not _WINDOWS and (st.st_dev, st.st_ino) != (node.st.st_dev, node.st.st_ino):
                os.close(fd)
                _fail(ESTALE, f"{os.fsdecode(node.host)} was replaced on the host")
            self._hostfds[key] = fd
        return fd

    def _evict_hostfds(self):
        """Closes the cached host fds that no guest fd holds open."""
        held = {_file_key(d.node) for d, _ in self._fds.values() if type(d.node) is _HostNode}
        for key in [k for k in self._hostfds if k not in held]:
            os.close(self._hostfds.pop(key))

    def host_file(self, fd):
        """(host fd, size) of a regular host file, for a MAP_PRIVATE mapping; None for /tmp and
        synthesized files. The host fd belongs to this FileSystem: map (or dup) it at once."""
        desc = self._desc(fd)
        if desc.flags & O_PATH:
            _fail(EBADF)
        node = desc.node
        if type(node) is not _HostNode or node.fmt != S_IFREG:
            return None
        try:
            return self._hostfd(node), node.st.st_size
        except OSError as e:
            raise from_oserror(e) from None

    def regular_size(self, fd):
        """The size of the regular file open at fd (for the loader, which then reads it with
        pread_into); ENODEV for anything that is not a regular file."""
        desc = self._desc(fd)
        if desc.flags & O_PATH:
            _fail(EBADF)
        if desc.node.fmt != S_IFREG:
            _fail(ENODEV)
        return self._size(desc)

    def contents(self, fd, start=0, n=None):
        """The contents of the regular file open at fd (for mmap of /tmp and synthesized files),
        whole or its n bytes from `start` (only those copied: an mmap of one page of a large
        /tmp file does not copy all of it); ENODEV for anything that is not a regular file."""
        desc = self._desc(fd)
        if desc.flags & O_PATH:
            _fail(EBADF)
        node = desc.node
        if node.fmt != S_IFREG:
            _fail(ENODEV)
        end = None if n is None else start + n
        if type(node) is _Tmp:
            with memoryview(node.data) as view:
                return view[start:end].tobytes()
        if type(node) is _SynFile:
            return desc.data[start:end]
        if start or n is not None:
            return self.contents(fd)[start:end]
        chunks, offset = [], 0
        while True:
            chunk = self._read_at(desc, MAX_IO, offset)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            offset += len(chunk)

    def close_all(self):
        """Releases every host fd (the sandbox is closing; later reads reopen them)."""
        for name in ("_hostfds", "_dirfds", "_rootfds"):
            fds = getattr(self, name, None)
            if fds:
                setattr(self, name, {})
                for fd in fds.values():
                    try:
                        os.close(fd)
                    except OSError:
                        pass

    def __del__(self):
        self.close_all()

    # -- metadata

    def _attrs(self, node):
        """(dev, ino, mode, nlink, uid, gid, rdev, size, atime, mtime, ctime), times in ns."""
        t = type(node)
        if t is _HostNode:
            st = node.st
            return (st.st_dev, st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
                    getattr(st, "st_rdev", 0), st.st_size, st.st_atime_ns, st.st_mtime_ns,
                    st.st_ctime_ns)
        if t is _Tmp:
            if node.fmt == S_IFDIR:
                nlink = 2 + sum(1 for c in node.data.values() if c.fmt == S_IFDIR)
                size = 40 + 20 * len(node.data)
            else:
                nlink, size = 1, len(node.data)
            if node.name is None and node is not self._tmp_root:
                nlink = 0
            return (_TMP_DEV, node.ino, node.fmt | node.mode, nlink, self._uid, self._gid, 0, size,
                    node.atime, node.mtime, node.ctime)
        size = 0
        if t is _SynFile:
            size = len(node.value())
        elif t is _SynLink:
            target = node.value()
            try:
                size = len(target if isinstance(target, bytes) else self._display(target))
            except LinuxError:                  # a path too long to show: readlink fails
                size = 0
        nlink = 2 if node.fmt == S_IFDIR else 1
        dev = _PIPE_DEV if t is _Console else _SYN_DEV
        return (dev, node.ino, node.mode, nlink, self._uid, self._gid, node.rdev, size,
                _SYN_TIME, _SYN_TIME, _SYN_TIME)

    def _stat_bytes(self, node):
        if type(node) is _HostNode:
            if node.packed is None:
                node.packed = self._pack_stat(node)
            return node.packed
        return self._pack_stat(node)

    def _pack_stat(self, node):
        dev, ino, mode, nlink, uid, gid, rdev, size, at, mt, ct = self._attrs(node)
        return struct.pack("<QQQIIIiQqqqqqqqqq24x", dev & 0xFFFFFFFFFFFFFFFF, ino, nlink, mode,
                           uid, gid, 0, rdev, size, 4096, (size + 511) // 512,
                           at // 10**9, at % 10**9, mt // 10**9, mt % 10**9, ct // 10**9, ct % 10**9)

    def fstat(self, fd):
        """struct stat (x86-64, 144 bytes) of the file open at fd."""
        return self._stat_bytes(self._desc(fd).node)

    def fstatat(self, dirfd, path, flags):
        if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | AT_NO_AUTOMOUNT):
            _fail(EINVAL)
        node = self._walk(dirfd, path, follow=not flags & AT_SYMLINK_NOFOLLOW,
                          empty=bool(flags & AT_EMPTY_PATH))
        return self._stat_bytes(node)

    def statfs(self, path):
        """struct statfs (x86-64, 120 bytes) of the file system holding path (followed)."""
        return self._statfs_bytes(self._walk(AT_FDCWD, path))

    def fstatfs(self, fd):
        return self._statfs_bytes(self._desc(fd).node)

    def _statfs_bytes(self, node):
        # /tmp answers from its quota (inodes at the bytes each costs); the rest is read-only and
        # has no space to give: read roots show no host numbers (the host's disk is not the
        # guest's business), with overlayfs' magic for a view layered over host directories.
        t = type(node)
        blocks = free = files = ffree = 0
        flags = ST_VALID | ST_NOSUID | ST_NODEV
        if t is _Tmp:
            magic = TMPFS_MAGIC
            room = max(0, self._tmp_size - self._tmp_used)
            blocks, free = self._tmp_size // _STATFS_BLOCK, room // _STATFS_BLOCK
            files, ffree = self._tmp_size // _INODE_COST, room // _INODE_COST
        elif t is _Console:
            magic = PIPEFS_MAGIC
        else:
            top = (node.path or b"/").split(b"/")[1:2]
            magic = {b"proc": PROC_SUPER_MAGIC, b"sys": SYSFS_MAGIC, b"dev": TMPFS_MAGIC}.get(
                top[0] if top and t is not _HostNode else b"", OVERLAYFS_MAGIC)
            flags |= ST_RDONLY
        return _STATFS.pack(magic, _STATFS_BLOCK, blocks, free, free, files, ffree, 0, 0, NAME_MAX,
                            _STATFS_BLOCK, flags)

    def utimensat(self, dirfd, path, atime, mtime, flags):
        """Sets a /tmp file's times: each is ns, UTIME_NOW or UTIME_OMIT. path None: dirfd's
        file (futimens). Elsewhere EROFS, as for any other change outside /tmp."""
        if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
            _fail(EINVAL)
        if path is None:
            if flags & AT_SYMLINK_NOFOLLOW:
                _fail(EINVAL)
            node = self._desc(dirfd).node
        else:
            node = self._walk(dirfd, path, follow=not flags & AT_SYMLINK_NOFOLLOW,
                              empty=bool(flags & AT_EMPTY_PATH))
        if atime == UTIME_OMIT and mtime == UTIME_OMIT:
            return 0
        if type(node) is not _Tmp:
            _fail(EROFS, _READ_ONLY)
        now = time.time_ns()
        if atime != UTIME_OMIT:
            node.atime = now if atime == UTIME_NOW else max(-MAX_FILE - 1, min(MAX_FILE, atime))
        if mtime != UTIME_OMIT:
            node.mtime = now if mtime == UTIME_NOW else max(-MAX_FILE - 1, min(MAX_FILE, mtime))
        node.ctime = now
        self._tmp_dirty = True
        return 0

    def statx(self, dirfd, path, flags, mask):
        """struct statx (256 bytes); every basic field is filled whatever `mask` asks."""
        if (flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | AT_NO_AUTOMOUNT | AT_STATX_SYNC_TYPE)
                or flags & AT_STATX_SYNC_TYPE == AT_STATX_SYNC_TYPE or mask & 0x80000000):
            _fail(EINVAL)
        node = self._walk(dirfd, path, follow=not flags & AT_SYMLINK_NOFOLLOW,
                          empty=bool(flags & AT_EMPTY_PATH))
        dev, ino, mode, nlink, uid, gid, rdev, size, at, mt, ct = self._attrs(node)

        def ts(ns):
            return struct.pack("<qIi", ns // 10**9, ns % 10**9, 0)

        def split_dev(d):
            return ((d >> 8) & 0xFFF) | ((d >> 32) & ~0xFFF & 0xFFFFFFFF), (d & 0xFF) | ((d >> 12) & ~0xFF & 0xFFFFFFFF)

        head = struct.pack("<IIQIIIHHQQQQ", STATX_BASIC_STATS, 4096, 0, nlink, uid, gid, mode, 0,
                           ino, size, (size + 511) // 512, 0)
        tail = struct.pack("<IIII", *split_dev(rdev), *split_dev(dev))
        return (head + ts(at) + ts(0) + ts(ct) + ts(mt) + tail).ljust(256, b"\0")

    def faccessat(self, dirfd, path, mode, flags=0):
        if mode & ~7 or flags & ~(AT_EACCESS | AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
            _fail(EINVAL)
        node = self._walk(dirfd, path, follow=not flags & AT_SYMLINK_NOFOLLOW,
                          empty=bool(flags & AT_EMPTY_PATH))
        if mode & 2:
            self._check_write(node)
        if mode & 1 and node.fmt != S_IFDIR and not self._attrs(node)[2] & 0o111:
            _fail(EACCES)

    def mapping_name(self, fd):
        """The name /proc/self/maps shows for a mapping of the file open at fd: its path as
        readlink of /proc/self/fd/N shows it (at most PATH_MAX - 1 bytes). Linux would show
        a longer /tmp path in full; here it is /tmp/#<inode> (path too long), so that a
        mapping's name never costs the host more than PATH_MAX bytes."""
        node = self._desc(fd).node
        try:
            name = self._display(node)
            if len(name) < PATH_MAX:
                return name
        except LinuxError:
            pass
        return b"/tmp/#%d (path too long)" % node.ino

    def readlinkat(self, dirfd, path):
        """The target of a symlink (the caller truncates it to the guest's buffer); an empty
        path reads the symlink dirfd holds (opened with O_PATH | O_NOFOLLOW)."""
        node = self._walk(dirfd, path, follow=False, empty=True)
        if node.fmt != S_IFLNK:
            _fail(EINVAL if path else ENOENT)
        target = self._link_target(node)
        return target if isinstance(target, bytes) else self._display(target)

    # -- cwd, umask

    def getcwd(self):
        if type(self._cwd) is _Tmp and self._cwd.name is None and self._cwd is not self._tmp_root:
            _fail(ENOENT)
        return self._display(self._cwd)

    def chdir(self, path):
        self._set_cwd(self._walk(AT_FDCWD, path))

    def fchdir(self, fd):
        self._set_cwd(self._desc(fd).node)

    def _set_cwd(self, node):
        if node.fmt != S_IFDIR:
            _fail(ENOTDIR)
        self._cwd = node
        self._dirty = True

    def umask(self, mask):
        old, self._umask = self._umask, mask & 0o777
        self._dirty = True
        return old

    # -- changing /tmp

    def mkdirat(self, dirfd, path, mode):
        d, name = self._walk_parent(dirfd, path)
        if name is None or self._exists(d, name):
            _fail(EEXIST)
        if type(d) is not _Tmp:
            _fail(EROFS, _READ_ONLY)
        # mkdir(2) drops setuid and setgid, and a setgid parent passes its setgid on
        self._tmp_new(d, name, S_IFDIR, mode & 0o1777 | d.mode & 0o2000, {})

    def symlinkat(self, target, dirfd, path):
        if not target:
            _fail(ENOENT)
        if len(target) >= PATH_MAX:
            _fail(ENAMETOOLONG)
        if b"\0" in target:
            _fail(EINVAL, "a target with a NUL byte")
        d, name = self._walk_parent(dirfd, path)
        if name is None or self._exists(d, name):
            _fail(EEXIST)
        if path.endswith(b"/"):
            _fail(ENOENT)                       # "name/" can only be a directory
        if type(d) is not _Tmp:
            _fail(EROFS, _READ_ONLY)
        self._tmp_new(d, name, S_IFLNK, 0, bytes(target)).mode = 0o777    # links ignore umask

    def fchmodat(self, dirfd, path, mode, flags=0):
        if flags & ~AT_SYMLINK_NOFOLLOW:
            _fail(EINVAL)
        self._chmod(self._walk(dirfd, path, follow=not flags & AT_SYMLINK_NOFOLLOW), mode)

    def fchmod(self, fd, mode):
        desc = self._desc(fd)
        if desc.flags & O_PATH:
            _fail(EBADF)
        self._chmod(desc.node, mode)

    def _chmod(self, node, mode):
        if type(node) is not _Tmp:
            _fail(EROFS, _READ_ONLY)
        if node.fmt == S_IFLNK:
            _fail(EOPNOTSUPP)
        node.mode = mode & 0o7777
        node.ctime = time.time_ns()
        self._tmp_dirty = True

    def _exists(self, d, name):
        try:
            self._lookup(d, name)
            return True
        except LinuxError as e:
            if e.errno != ENOENT:
                raise
            return False

    def unlinkat(self, dirfd, path, flags):
        if flags & ~AT_REMOVEDIR:
            _fail(EINVAL)
        rmdir = bool(flags & AT_REMOVEDIR)
        d, name = self._walk_parent(dirfd, path)
        if name is None:
            last = _split(path)[-1:]
            _fail(EISDIR if not rmdir else EINVAL if last == [b"."] else EBUSY if not last else ENOTEMPTY)
        node = self._lookup(d, name)
        if type(d) is not _Tmp:
            _fail(EROFS, _READ_ONLY)
        if rmdir:
            if node.fmt != S_IFDIR:
                _fail(ENOTDIR)
            if type(node) is not _Tmp:
                _fail(EBUSY, "a read= mount point")
            if node.data:
                _fail(ENOTEMPTY)
        elif node.fmt == S_IFDIR:
            _fail(EISDIR)
        elif path.endswith(b"/"):
            _fail(ENOTDIR)
        elif type(node) is not _Tmp:
            _fail(EBUSY, "a read= mount point")
        self._tmp_detach(d, name)

    def renameat(self, olddirfd, oldpath, newdirfd, newpath, flags=0):
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            _fail(EINVAL)
        od, on = self._walk_parent(olddirfd, oldpath)
        nd, nn = self._walk_parent(newdirfd, newpath)
        if on is None:
            _fail(EBUSY)
        if nn is None:                          # "." or "..": Linux's order of checks
            _fail(EEXIST if flags & RENAME_NOREPLACE else EBUSY)
        src = self._lookup(od, on)
        if type(od) is not _Tmp or type(nd) is not _Tmp:
            if src.fmt != S_IFDIR and (oldpath.endswith(b"/") or newpath.endswith(b"/")):
                _fail(ENOTDIR)
            _fail(EXDEV if (type(od) is _Tmp) != (type(nd) is _Tmp) else EROFS, _READ_ONLY)
        if nd.name is None and nd is not self._tmp_root:
            _fail(ENOENT, "the directory was removed")
        # Linux's order: the flags against the new name, then trailing slashes on a non-directory
        dst = nd.data.get(nn)
        if dst is not None and flags & RENAME_NOREPLACE:
            _fail(EEXIST)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                _fail(ENOENT)
            if dst.fmt != S_IFDIR and newpath.endswith(b"/"):
                _fail(ENOTDIR)
        if src.fmt != S_IFDIR and (oldpath.endswith(b"/") or
                                   not flags & RENAME_EXCHANGE and newpath.endswith(b"/")):
            _fail(ENOTDIR)
        if src is dst:
            return
        # one inside the other: src above the new place is EINVAL, dst above src ENOTEMPTY
        for node, into, err in ((src, nd, EINVAL),
                                (dst, od, EINVAL if flags & RENAME_EXCHANGE else ENOTEMPTY)):
            if node is not None and node.fmt == S_IFDIR:
                n = into
                while n is not self._tmp_root:
                    if n is node:
                        _fail(err, "a directory cannot move below itself")
                    n = n.parent
        # A mount point does not move (EBUSY, as Linux), nor here a directory with a mount below
        # it (Linux moves the mount along): a mount's inside path stays what read= says.
        if type(src) is not _Tmp or src in self._pinned or flags & RENAME_EXCHANGE and (
                type(dst) is not _Tmp or dst in self._pinned):
            _fail(EBUSY, "a read= mount point, or a directory on the way to one")
        if flags & RENAME_EXCHANGE:
            od.data[on], nd.data[nn] = dst, src
            dst.parent, dst.name, src.parent, src.name = od, on, nd, nn
        else:
            if dst is not None:
                if src.fmt == S_IFDIR and dst.fmt != S_IFDIR:
                    _fail(ENOTDIR)
                if src.fmt != S_IFDIR and dst.fmt == S_IFDIR:
                    _fail(EISDIR)
                if type(dst) is not _Tmp:
                    _fail(EBUSY, "a read= mount point")
                if dst.fmt == S_IFDIR and dst.data:
                    _fail(ENOTEMPTY)
                self._tmp_detach(nd, nn)
            else:
                self._charge(_INODE_COST + len(nn))     # the new name; the old one is refunded by recount
            del od.data[on]
            nd.data[nn] = src
            src.parent, src.name = nd, nn
        now = time.time_ns()
        src.ctime = od.mtime = od.ctime = nd.mtime = nd.ctime = now
        self._tmp_dirty = True

    def ftruncate(self, fd, length):
        desc = self._desc(fd)
        length = _s64(length)
        if desc.flags & O_PATH:
            _fail(EBADF)
        if desc.flags & O_ACCMODE == O_RDONLY or type(desc.node) is not _Tmp or desc.node.fmt != S_IFREG:
            _fail(EINVAL)
        if length < 0:
            _fail(EINVAL)
        self._tmp_resize(desc.node, length)

    def _tmp_new(self, d, name, fmt, mode, data):
        if d.name is None and d is not self._tmp_root:
            _fail(ENOENT, "the directory was removed")
        gone = None
        if name is None:                        # O_TMPFILE: shown as /tmp/dir/#<inode> (deleted)
            gone = self._former_path(d, b"/#%d" % (self._ino + 1), self._ino + 1)
        # one charge for all (a recount between two would forget the first): the inode, its
        # name, its contents (a symlink's target)
        self._charge(_INODE_COST + (0 if name is None else _INODE_COST + len(name)) + len(data))
        node = _Tmp(self._new_ino(), fmt, mode & ~self._umask & 0o7777, data, d, name, time.time_ns(),
                    gone)
        if name is not None:
            d.data[name] = node
            d.mtime = d.ctime = node.mtime
        self._tmp_dirty = True
        return node

    def _tmp_detach(self, d, name):
        node = d.data[name]
        node.gone = self._former_path(d, b"/" + name, node.ino)
        del d.data[name]
        node.name = None
        d.mtime = d.ctime = node.ctime = time.time_ns()
        self._tmp_dirty = True

    def _former_path(self, d, tail, ino):
        """The path an unlinked or O_TMPFILE node (inode `ino`) shows: `tail` in directory `d`,
        what readlink then gives with " (deleted)" appended. It is kept with the node while an
        fd or the cwd holds it, so less than PATH_MAX bytes (a longer one becomes /tmp/#<inode>):
        (max_fds + 1) x PATH_MAX at most in all. Not charged to tmp_size: an unlink must not
        make /tmp hold more than a snapshot of it may (_thaw_tmp)."""
        try:
            path = self._display(d) + tail
        except LinuxError:
            path = b""
        if not 0 < len(path) < PATH_MAX:
            path = b"/tmp/#%d" % ino
        return path

    def _tmp_write(self, node, offset, data):
        if not data:
            return 0                            # not even a hole: the size stays
        end = offset + len(data)
        if end > MAX_FILE:
            _fail(EFBIG)
        grow = end - len(node.data)
        if grow > 0:
            room = self._room(grow)
            if grow > room:                     # a short write, as a full file system gives
                data = data[:len(data) - (grow - room)] if grow - room < len(data) else b""
                if not data:
                    _fail(ENOSPC)
                end = offset + len(data)
            self._tmp_used += end - len(node.data)
        buf = node.data
        if type(buf) is not bytearray:
            buf = node.data = bytearray(buf)    # copy-on-write: the captured bytes stay intact
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset:end] = data
        node.mtime = node.ctime = time.time_ns()
        self._tmp_dirty = True
        return len(data)

    def _tmp_resize(self, node, length):
        grow = length - len(node.data)
        if grow > 0:
            if grow > self._room(grow):
                _fail(ENOSPC)
            self._tmp_used += grow
        buf = node.data
        if type(buf) is not bytearray:
            buf = node.data = bytearray(buf)
        if grow > 0:
            buf.extend(bytes(grow))
        else:
            del buf[length:]
        node.mtime = node.ctime = time.time_ns()
        self._tmp_dirty = True

    def _charge(self, n):
        if n > self._room(n):
            _fail(ENOSPC)
        self._tmp_used += n

    def _room(self, want):
        """Free /tmp bytes; `_tmp_used` only ever overestimates (unlinks and shrinks are not
        refunded at once), so it is recounted exactly when a request would not fit."""
        room = self._tmp_size - self._tmp_used
        if want > room:
            self._tmp_used = self._recount()
            room = self._tmp_size - self._tmp_used
        return room

    def _recount(self):
        seen = set()
        used = 0
        stack = [self._tmp_root]
        stack.extend(d.node for d, _ in self._fds.values() if type(d.node) is _Tmp)
        if type(self._cwd) is _Tmp:
            stack.append(self._cwd)
        while stack:
            node = stack.pop()
            if id(node) in seen or type(node) is not _Tmp:     # (a mount: its name is counted)
                continue
            seen.add(id(node))
            used += _INODE_COST
            if node.fmt == S_IFDIR:
                used += sum(_INODE_COST + len(name) for name in node.data)
                stack.extend(node.data.values())
            else:
                used += len(node.data)
        return used

    # -- warm start

    def capture(self):
        """An immutable FsState of everything the guest can observe here (host fds excluded)."""
        if self._last is not None and not self._dirty and not self._tmp_dirty:
            return self._last
        tmp, index = self._freeze_tmp()
        descs, live, fds = [], [], []
        for fd in sorted(self._fds):
            desc, cloexec = self._fds[fd]
            if desc.idx < 0 or desc.idx >= len(live) or live[desc.idx] is not desc:
                desc.idx = len(descs)
                live.append(desc)
                descs.append((self._ref(desc.node, index), desc.flags, desc.offset, desc.data))
            fds.append((fd, desc.idx, cloexec))
        state = FsState(tuple(fds), tuple(descs), self._ref(self._cwd, index), self._umask, tmp,
                        self._ino, self._freeze_locks(live) if self._nlocks else ())
        self._settled(state, live)
        return state

    def _freeze_locks(self, live):
        """FsState.locks: (kind, description index, type, first, last) per lock. A POSIX lock
        names any description of its file: one is open while the lock lives (a close of any fd
        of the file releases it)."""
        by_key = {}
        for desc in live:
            by_key.setdefault(self._lock_key(desc.node), desc.idx)
        locks = []
        for key, ranges in self._ranges.items():
            for owner, typ, first, last in ranges:
                if owner is _PROCESS:
                    locks.append((LOCK_POSIX, by_key[key], typ, first, last))
                else:
                    locks.append((LOCK_OFD, owner.idx, typ, first, last))
        for held in self._flocks.values():
            for desc, typ in held.items():
                locks.append((LOCK_FLOCK, desc.idx, typ, 0, 0))
        return tuple(sorted(locks))

    def _thaw_locks(self, locks, descs):
        """Takes the locks of a state, each through the checks a request gets (access mode,
        conflicts, the bound): a decoded state is untrusted. On failure the locks stay as they were."""
        before = self._ranges, self._flocks, self._nlocks
        self._ranges, self._flocks, self._nlocks = {}, {}, 0
        for kind, i, typ, first, last in locks:
            desc = descs[i]
            try:
                if desc.flags & O_PATH or (typ == F_RDLCK and desc.flags & O_ACCMODE == O_WRONLY) or (
                        typ == F_WRLCK and desc.flags & O_ACCMODE == O_RDONLY):
                    _fail(EBADF, "the description's access mode does not allow it")
                key = self._lock_key(desc.node)
                if kind == LOCK_FLOCK:
                    self._set_flock(key, desc, typ, False)
                else:
                    self._set_range(key, _PROCESS if kind == LOCK_POSIX else desc, typ, first, last, False)
            except LinuxError as e:
                self._ranges, self._flocks, self._nlocks = before
                raise SnapshotError(f"the snapshot's lock on description {i} cannot be held: {e}") from None

    def _moved(self, desc):
        """desc's offset or flags changed: reset puts back only such descriptions (those of
        the last state: one opened since is dropped with the fd table anyway), each listed once."""
        if desc.idx >= 0 and not desc.touched:
            desc.touched = True
            self._touched.append(desc)
        self._dirty = True

    def _settled(self, state, live):
        self._last, self._live = state, live
        self._dirty = self._table_changed = False
        for desc in self._touched:
            desc.touched = False
        self._touched = []

    def _ref(self, node, index):
        t = type(node)
        if t is _Tmp:
            return ("t", index[id(node)])
        if t is _Console:
            return ("c", node.value)
        if t is _SynLink and node.path.startswith(b"/proc/self/fd/"):
            return ("f", int(node.path[14:]))
        return ("p", node.path)

    def _freeze_tmp(self):
        """(FsState.tmp, {id(node): index}) of the /tmp tree, plus the unlinked nodes that an fd
        or the cwd still holds; file contents become shared bytes (copied on the next write)."""
        if not self._tmp_dirty and self._tmp_frozen is not None:
            return self._tmp_frozen
        entries, index, nodes = [], {}, []

        def add(node, parent):
            if type(node.data) is bytearray:
                node.data = bytes(node.data)
            index[id(node)] = len(entries)
            nodes.append(node)
            entries.append((node.ino, node.fmt, node.mode, node.mtime, node.ctime, parent,
                            node.name if parent >= 0 else node.gone or b"",
                            None if node.fmt == S_IFDIR else node.data, node.atime))

        stack = [(self._tmp_root, -1)]
        while stack:                            # pre-order: every parent before its children
            node, parent = stack.pop()
            add(node, parent)
            if node.fmt == S_IFDIR:
                me = len(entries) - 1
                stack.extend((node.data[name], me) for name in sorted(node.data, reverse=True)
                             if type(node.data[name]) is _Tmp)     # a mount: see _graft
        held = [d.node for d, _ in self._fds.values()] + [self._cwd]
        for node in held:
            if type(node) is _Tmp and id(node) not in index:
                add(node, -1)
        self._tmp_frozen = (tuple(entries), index)
        self._tmp_nodes, self._tmp_dirty = nodes, False
        return self._tmp_frozen

    def reset(self, state):
        """Back to exactly `state` (from capture() or decode()): fds with their offsets and
        flags, cwd, umask, /tmp. Skipped when nothing changed since that state was taken."""
        if state is self._last and not self._dirty and not self._tmp_dirty:
            return
        if not isinstance(state, FsState):
            raise TypeError(f"reset needs an FsState, not {type(state).__name__}")
        if state is self._last and not self._tmp_dirty:
            # back to the state we left: only what moved since (usual warm restore)
            descs = self._live
            for desc in self._touched:
                if 0 <= desc.idx < len(descs) and descs[desc.idx] is desc:
                    _, desc.flags, desc.offset, _ = state.descs[desc.idx]
        else:
            if self._tmp_dirty or self._tmp_frozen is None or self._tmp_frozen[0] is not state.tmp:
                self._thaw_tmp(state.tmp)
            nodes = self._tmp_nodes
            descs = [_Open(self._deref(ref, nodes), flags, offset, data, i)
                     for i, (ref, flags, offset, data) in enumerate(state.descs)]
            for desc in descs:
                self._check_desc(desc)
            if state.fds and max(fd for fd, _, _ in state.fds) >= self.max_fds:
                raise SnapshotError(f"the snapshot has an fd past this sandbox's {self.max_fds}")
            self._table_changed = True
        if state.locks or self._nlocks:
            self._thaw_locks(state.locks, descs)
        if self._table_changed:
            self._fds = {fd: (descs[i], cloexec) for fd, i, cloexec in state.fds}
        cwd = self._deref(state.cwd, self._tmp_nodes)
        if cwd.fmt != S_IFDIR:
            raise SnapshotError(f"the snapshot's cwd {os.fsdecode(self._display(cwd))} is not a directory")
        self._cwd, self._umask = cwd, state.umask
        self._ino = max(self._base_ino, state.next_ino)
        self._held = _HELD_MAX                  # other descriptions now: recounted when needed
        self._settled(state, descs)

    def _check_desc(self, desc):
        """A decoded description must be one an open here could have made (decode checked what
        it could without the file system): else a read, lseek or stat of it would fail on the
        host instead of answering the guest."""
        node, flags, t = desc.node, desc.flags, type(desc.node)
        why = None
        if (t is _SynFile) != (desc.data is not None):
            why = "synthesized contents do not match the file"
        elif flags & O_PATH:
            pass
        elif node.fmt == S_IFLNK:
            why = "a symlink open without O_PATH"
        elif t is _HostNode and node.fmt not in (S_IFREG, S_IFDIR):
            why = "a host device, FIFO or socket open"
        elif flags & O_ACCMODE != O_RDONLY and not (
                (t is _Tmp and node.fmt == S_IFREG) or t is _Device or t is _Console):
            why = "write access to a file that is not writable"
        if why is not None:
            raise SnapshotError(f"the snapshot's open file description {desc.idx} "
                                f"({type(node).__name__.lstrip('_')}): {why}")

    def _thaw_tmp(self, tmp):
        used = sum((_INODE_COST * 2 + len(name) if parent >= 0 else _INODE_COST)
                   + (len(payload) if payload else 0) for _, _, _, _, _, parent, name, payload, _ in tmp)
        if self._grafts:
            used += self._graft_cost(tmp)
        if used > self._tmp_size:
            raise SnapshotError(f"the snapshot's /tmp holds {used} bytes, more than this "
                                f"sandbox's tmp_size ({self._tmp_size})")
        root = self._tmp_root
        nodes = []
        for ino, fmt, mode, mtime, ctime, parent, name, payload, atime in tmp:
            if nodes:
                node = _Tmp(ino, fmt, mode, {} if fmt == S_IFDIR else payload, None, None, mtime,
                            name if parent < 0 else None)
                if parent >= 0:
                    node.parent, node.name = nodes[parent], name
                    node.parent.data[name] = node
            else:
                node, root.data, root.mode = root, {}, mode
            node.atime, node.mtime, node.ctime = atime, mtime, ctime
            nodes.append(node)
        if self._grafts:
            self._pinned = set()
            for parts, node in self._grafts:
                self._graft(parts, node, make=False)
        self._tmp_frozen = (tmp, {id(n): i for i, n in enumerate(nodes)})
        self._tmp_nodes, self._tmp_used, self._tmp_dirty = nodes, used, False

    def _deref(self, ref, nodes):
        kind, value = ref
        if kind == "t":
            return nodes[value]
        if kind == "c":
            return self._consoles[value]
        if kind == "f":
            return self._fd_link_node(value)
        node = self._canon.get(value, _UNKNOWN)
        if node is None or node is _UNKNOWN:
            try:
                node = self._walk(AT_FDCWD, value or b"/", follow=False, start=self._root)
            except LinuxError as e:
                raise SnapshotError(f"the snapshot holds {os.fsdecode(value or b'/')} open, which "
                                    f"this sandbox cannot reach ({e}): give it the same read paths") from None
        return node

    def encode(self, state):
        """`state` as bytes for a snapshot file (decode() reads them back)."""
        return _fsstate.encode(state)

    @staticmethod
    def decode(data):
        """The FsState in `data`, checked field by field (a snapshot file is untrusted input):
        ValueError says what is wrong."""
        return _fsstate.decode(data)


_UNKNOWN = object()
_PROCESS = "process"        # the owner of POSIX record locks (descriptions own OFD locks)
