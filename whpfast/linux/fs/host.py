"""The host file system: the read roots and everything below them (_HostNode), reached only
through "host access" below, with the per-FileSystem caches of host fds (HostFiles)."""

import errno as _host_errno
import os
import time

from ..errno import EACCES, ENAMETOOLONG, ENOENT, EROFS, ESTALE, from_oserror
from . import common
from .common import (_DT, _READ_ONLY, _WINDOWS, MAX_IO, NAME_MAX, OVERLAYFS_MAGIC, S_IFDIR, S_IFLNK,
                     S_IFMT, S_IFREG, ReadPolicyError, _fail, _split, _windows_name_ok)
from .nodes import _UNKNOWN, _Node

# A host file: read-only, never through a symlink, and never blocking or becoming a terminal
# should a FIFO or device be put where the look-up saw a file (the inode check then refuses it).
_HOST_OPEN = (os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
              | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
# A host directory to look up names in: O_PATH where there is one (no read permission needed,
# nothing read); O_DIRECTORY | O_NOFOLLOW refuse a symlink put in its place.
_DIR_OPEN = (getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))


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


class _HostNode(_Node):
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

    def child(self, fs, name):
        """The child `name` of this directory (one component, not "." or "..")."""
        path = self.path + b"/" + name
        node = fs._canon.get(path, _UNKNOWN)
        if node is not _UNKNOWN:
            if node is None:
                _fail(ENOENT)
            return node
        if len(name) > NAME_MAX:
            _fail(ENAMETOOLONG)
        if _WINDOWS and not _windows_name_ok(name):
            _fail(ENOENT)
        node = fs._host_child(self, name, path)
        if len(fs._canon) < common._CACHE_MAX:     # bounded: a guest may probe endless names
            fs._canon[path] = node
        if node is None:
            _fail(ENOENT)
        return node

    def target(self, fs):
        target = fs._links.get(self.host)
        if target is None:          # (a read root is never a symlink: see _host_root)
            try:
                target = os.fsencode(_readlink_at(fs._dirfd(self.parent), self.name))
            except OSError as e:
                if e.errno == _host_errno.EINVAL:      # no symlink now (not Linux's EINVAL)
                    _fail(ESTALE, f"{os.fsdecode(self.host)} was replaced on the host")
                raise from_oserror(e) from None
            fs._links[self.host] = target
        return target

    def entries(self, fs):
        """{name: (ino, d_type)} the host directory lists (shared: not to be modified)."""
        return _host_entries(self.host, fs._dirfd(self))

    def read(self, fs, desc, n, offset):
        try:
            return _host_pread(fs._hostfd(self), n, offset)
        except OSError as e:
            raise from_oserror(e) from None

    def read_into(self, fs, desc, buf, offset):
        if self.fmt == S_IFREG and _host_preadv is not None:
            try:
                return _host_preadv(fs._hostfd(self), [buf[:MAX_IO]], offset)
            except OSError as e:
                raise from_oserror(e) from None
        return _Node.read_into(self, fs, desc, buf, offset)

    def check_write(self):
        _fail(EROFS, _READ_ONLY)

    def opened(self, fs, flags):
        if self.fmt not in (S_IFREG, S_IFDIR):
            _fail(EACCES, "host devices, FIFOs and sockets are never opened")
        return None

    def size(self, desc):
        return self.st.st_size

    def lock_key(self):
        return _file_key(self)

    def host_key(self):
        """What FileSystem._hostfds knows it by (None: no host file)."""
        return _file_key(self)

    def attrs(self, fs):
        """(dev, ino, mode, nlink, uid, gid, rdev, size, atime, mtime, ctime), times in ns."""
        st = self.st
        return (st.st_dev, st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
                getattr(st, "st_rdev", 0), st.st_size, st.st_atime_ns, st.st_mtime_ns,
                st.st_ctime_ns)

    def stat_bytes(self, fs):
        if self.packed is None:
            self.packed = fs._pack_stat(self)
        return self.packed

    def host_file(self, fs):
        if self.fmt != S_IFREG:
            return None
        try:
            return fs._hostfd(self), self.st.st_size
        except OSError as e:
            raise from_oserror(e) from None

    def whole(self, fs, desc, start, end):
        """The contents of this regular file from `start` to `end` (None: its end), read in
        MAX_IO pieces."""
        if start or end is not None:
            return self.whole(fs, desc, 0, None)[start:end]
        chunks, offset = [], 0
        while True:
            chunk = self.read(fs, desc, MAX_IO, offset)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            offset += len(chunk)

    def statfs_kind(self):
        return OVERLAYFS_MAGIC, True

    def open_error(self, flags):
        if self.fmt not in (S_IFREG, S_IFDIR):
            return "a host device, FIFO or socket open"
        return _Node.open_error(self, flags)



class HostFiles:
    """The FileSystem's part that opens host files and directories (a mixin: its state lives on
    the FileSystem, made in its __init__)."""

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
        while len(dirfds) > common._DIRFD_CACHE:       # the one just opened is the newest: it stays
            os.close(dirfds.pop(next(iter(dirfds))))
        return fd

    def _hostfd(self, node):
        """A read-only host fd of the regular file `node`: opened from its directory's fd (a
        read root file: from the path the caller named) and checked to be the inode the
        look-up saw; shared by every node of that inode."""
        key = _file_key(node)
        fd = self._hostfds.get(key)
        if fd is None:
            if len(self._hostfds) >= common._HOSTFD_CACHE:
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
        held = {d.node.host_key() for d, _ in self._fds.values()}
        for key in [k for k in self._hostfds if k not in held]:
            os.close(self._hostfds.pop(key))

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

    def _cached_listing(self, d, dots):
        """The listing of a directory that does not change (a host or synthesized one, with the
        nodes placed in it), remembered per path."""
        cached = self._listings.get(d.path)
        if cached is not None:
            return cached
        entries = dict(d.entries(self))
        for name, node in self._overlay.get(d.path, {}).items():
            entries[name] = (node.ino, _DT.get(node.fmt, 0))
        listing = dots + [(n, ino, dt) for n, (ino, dt) in sorted(entries.items())]
        if len(self._listings) < common._CACHE_MAX >> 4:
            self._listings[d.path] = listing
        return listing
