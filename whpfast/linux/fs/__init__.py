"""The file system a Linux guest sees: pure Python on the host side, no guest memory access.

The namespace is built from `read` (host directories and files, read-only), a size-capped
in-memory /tmp (a read entry below /tmp is a read-only bind mount in it, see _mount_tmp), and a
few synthesized files (/proc/self/..., /dev/null, ...). Every path the guest
names is walked here, component by component, by ONE walker (`_walk` in walk.py): ".." is taken on the
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
_CACHE_MAX.

The parts (after gVisor's vfs: path resolution, the fd table and each file system apart):
filesystem.py is the facade, FileSystem, made of the parts' mixins (walk.py, fdtable.py,
locks.py, fileops.py, meta.py, host.py, tmpfs.py, synth.py, warm.py); nodes.py is the base of
the nodes, which answer by method what differs by kind; common.py the Linux values and limits;
state.py the FsState codec."""

from .common import (  # noqa: F401 (the package's names, as whpfast.linux.fs always had them)
    _split, _windows_name_ok,
    AT_EACCESS, AT_EMPTY_PATH, AT_FDCWD, AT_NO_AUTOMOUNT, AT_REMOVEDIR, AT_STATX_SYNC_TYPE,
    AT_SYMLINK_NOFOLLOW, F_DUPFD, F_DUPFD_CLOEXEC, F_GETFD, F_GETFL, F_GETLK, F_OFD_GETLK,
    F_OFD_SETLK, F_OFD_SETLKW, F_RDLCK, F_SETFD, F_SETFL, F_SETLK, F_SETLKW, F_UNLCK, F_WRLCK,
    FIOCLEX, FIONCLEX, LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN, MAX_EXTRA_BYTES, MAX_EXTRA_FILES,
    MAX_FILE, MAX_IO, MAX_LOCKS, MAXSYMLINKS, NAME_MAX, O_ACCMODE, O_APPEND, O_ASYNC, O_CLOEXEC,
    O_CREAT, O_DIRECT, O_DIRECTORY, O_DSYNC, O_EXCL, O_LARGEFILE, O_NOATIME, O_NOCTTY, O_NOFOLLOW,
    O_NONBLOCK, O_PATH, O_RDONLY, O_RDWR, O_SYNC, O_TMPFILE, O_TRUNC, O_WRONLY, PATH_MAX,
    RENAME_EXCHANGE, RENAME_NOREPLACE, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG,
    SANDBOX_USER, SEEK_CUR, SEEK_DATA, SEEK_END, SEEK_HOLE, SEEK_SET, STATX_BASIC_STATS,
    UTIME_NOW, UTIME_OMIT, ReadPolicyError, inside_path, read_mapping)
from .filesystem import FileSystem  # noqa: F401
from .host import _SHARED_LISTINGS  # noqa: F401
from .state import FsState  # noqa: F401
