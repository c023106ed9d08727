"""The base of the nodes and the open file description. A node is anything a path can name; each
file system has its kinds (host.py: _HostNode; synth.py: _SynDir, _SynFile, ...; tmpfs.py:
_Tmp). What differs by kind is a method of the node (look a name up, read, size, stat, check a
write, show its path, name it in a state), so the walker, the fd table and the facade never
ask a node its type.

Each node has `path`, its canonical inside path (b"" for the root, else b"/a/b": no symlink, no
"." or "..") where it has one, and `parent`, the directory ".." leads to. Methods that need the
file system's caches or host fds take the FileSystem as `fs`."""

from ..errno import EACCES, EINVAL
from .common import (O_ACCMODE, O_PATH, O_RDONLY, OVERLAYFS_MAGIC, PROC_SUPER_MAGIC, S_IFLNK,
                     SYSFS_MAGIC, TMPFS_MAGIC, _fail)

_UNKNOWN = object()         # FileSystem._canon's "not looked up yet"


class _Node:
    """What every kind answers the same unless it says otherwise."""
    __slots__ = ()
    cacheable = True        # a walk from or through it, and its listing, may be remembered
    tmpfs = False           # a /tmp inode: the guest may change it (see tmpfs.py)
    contents = False        # its descriptions hold its contents as of the open (a synthesized file)
    console = None          # "stdin", "stdout" or "stderr" for a console node

    def display(self, fs):
        """The path readlink shows for an fd's node (/proc/self/fd/N, /proc/self/cwd), getcwd
        and a mapping's name (at most PATH_MAX - 1 bytes, see _Tmp.display)."""
        return self.path or b"/"

    def listing(self, fs, dots):
        """[(name, ino, d_type)] of this directory after `dots` ("." and ".."), by name."""
        return fs._cached_listing(self, dots)

    def check_write(self):
        """Raises unless the node may be opened for writing."""
        _fail(EACCES)

    def opened(self, fs, flags):
        """What a new description of it holds (a synthesized file's contents), checked."""
        return None

    def read(self, fs, desc, n, offset):
        _fail(EINVAL)

    def read_into(self, fs, desc, buf, offset):
        """A read into a writable buffer; the count."""
        data = fs._read_at(desc, len(buf), offset)
        buf[:len(data)] = data
        return len(data)

    def size(self, desc):
        return 0

    def host_key(self):
        """What FileSystem._hostfds knows its host file by (None: no host file)."""
        return None

    def host_file(self, fs):
        """(host fd, size) of a regular host file for a mapping, else None."""
        return None

    def lock_key(self):
        return self

    def stat_bytes(self, fs):
        return fs._pack_stat(self)

    def statfs_kind(self):
        """(f_type, read-only) of the file system holding it."""
        top = (self.path or b"/").split(b"/")[1:2]
        return {b"proc": PROC_SUPER_MAGIC, b"sys": SYSFS_MAGIC, b"dev": TMPFS_MAGIC}.get(
            top[0] if top else b"", OVERLAYFS_MAGIC), True

    def ref(self):
        """How an FsState names the node (a /tmp node: by its index, see warm.py)."""
        return ("p", self.path)

    def restore_error(self, desc):
        """Why a decoded description of it is not one an open here could have made, or None."""
        if self.contents != (desc.data is not None):
            return "synthesized contents do not match the file"
        if desc.flags & O_PATH:
            return None
        if self.fmt == S_IFLNK:
            return "a symlink open without O_PATH"
        return self.open_error(desc.flags)

    def open_error(self, flags):
        if flags & O_ACCMODE != O_RDONLY:
            return "write access to a file that is not writable"
        return None


class _Open:
    """An open file description (shared by dup'ed fds). `data` holds a synthesized file's
    contents as of the open; `listing` caches a directory's entries for getdents64; `idx` is its
    index in the state last captured or reset to (-1: opened since)."""
    __slots__ = ("node", "flags", "offset", "data", "listing", "idx", "touched")

    def __init__(self, node, flags, offset=0, data=None, idx=-1):
        self.node, self.flags, self.offset, self.data, self.listing = node, flags, offset, data, None
        self.idx, self.touched = idx, False
