"""The sandbox's /tmp: a tmpfs of _Tmp inodes in host memory, every inode, name and byte charged
against tmp_size (the quota), with the read entries below /tmp as read-only bind mounts in it
(the read roots hung in its tree, see _mount_tmp); its calls (mkdir, symlink, unlink, rename,
chmod, utimensat, ftruncate) and its capture into an FsState (_freeze_tmp, _thaw_tmp)."""

import os
import time

from ...errors import SnapshotError
from ..errno import (EBADF, EBUSY, EEXIST, EFBIG, EINVAL, EISDIR, ENAMETOOLONG, ENOENT, ENOSPC, ENOTDIR,
                     ENOTEMPTY, EOPNOTSUPP, EROFS, EXDEV, LinuxError)
from .common import (_DT, _INODE_COST, _READ_ONLY, _TMP_DEV, AT_EMPTY_PATH, AT_REMOVEDIR,
                     AT_SYMLINK_NOFOLLOW, MAX_FILE, NAME_MAX, O_ACCMODE, O_PATH, O_RDONLY,
                     O_TRUNC, PATH_MAX, RENAME_EXCHANGE, RENAME_NOREPLACE, S_IFDIR, S_IFLNK,
                     S_IFREG, TMPFS_MAGIC, UTIME_NOW, UTIME_OMIT, ReadPolicyError, _fail, _s64,
                     _split)
from .nodes import _Node


class _Tmp(_Node):
    """A directory, regular file or symlink of /tmp. `data`: dict name -> _Tmp (directory),
    bytes or bytearray (file; bytes while shared with a captured state), bytes (symlink).
    `name` is None once unlinked (the node lives on while an fd or the cwd holds it), and `gone`
    then holds the path it had, which readlink of /proc/self/fd/N shows."""
    __slots__ = ("ino", "fmt", "mode", "data", "parent", "name", "atime", "mtime", "ctime", "gone")
    cacheable = False        # changes while the guest runs
    tmpfs = True

    def __init__(self, ino, fmt, mode, data, parent, name, now, gone=None):
        self.ino, self.fmt, self.mode, self.data = ino, fmt, mode, data
        self.parent, self.name, self.mtime, self.ctime, self.gone = parent, name, now, now, gone
        self.atime = now            # set at creation and by utimensat only (reads: noatime)

    def child(self, fs, name):
        child = self.data.get(name)
        if child is None:
            _fail(ENAMETOOLONG if len(name) > NAME_MAX else ENOENT)
        return child

    def target(self, fs):
        return self.data

    def display(self, fs):
        """A /tmp path can grow without bound (chdir and relative names make any depth), but
        this one never exceeds PATH_MAX - 1 bytes: ENAMETOOLONG beyond, as Linux's getcwd and
        readlink of /proc/self/fd/N give, and the walk up stops there."""
        parts, size = [], 4                 # len(b"/tmp")
        n, root = self, fs._tmp_root
        while n is not root:
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

    def removed(self, fs):
        """Whether this directory was removed (the cwd or an fd may still hold it)."""
        return self.name is None and self is not fs._tmp_root

    def listing(self, fs, dots):
        return dots + sorted((n, c.ino, _DT.get(c.fmt, 0)) for n, c in self.data.items())

    def check_write(self):
        pass

    def opened(self, fs, flags):
        if flags & O_TRUNC and self.fmt == S_IFREG and self.data:
            fs._tmp_resize(self, 0)
        return None

    def read(self, fs, desc, n, offset):
        return bytes(self.data[offset:offset + n])

    def size(self, desc):
        return len(self.data)

    def attrs(self, fs):
        if self.fmt == S_IFDIR:
            nlink = 2 + sum(1 for c in self.data.values() if c.fmt == S_IFDIR)
            size = 40 + 20 * len(self.data)
        else:
            nlink, size = 1, len(self.data)
        if self.name is None and self is not fs._tmp_root:
            nlink = 0
        return (_TMP_DEV, self.ino, self.fmt | self.mode, nlink, fs._uid, fs._gid, 0, size,
                self.atime, self.mtime, self.ctime)

    def ref(self):
        raise AssertionError("a /tmp node is named by its index (see warm.py)")

    def statfs_kind(self):
        return TMPFS_MAGIC, False

    def whole(self, fs, desc, start, end):
        with memoryview(self.data) as view:
            return view[start:end].tobytes()

    def open_error(self, flags):
        if flags & O_ACCMODE != O_RDONLY and self.fmt != S_IFREG:
            return "write access to a file that is not writable"
        return None



class Tmpfs:
    """The FileSystem's part that is its /tmp (a mixin)."""

    def _make_tmp_root(self):
        self._tmp_root = _Tmp(self._new_ino(), S_IFDIR, 0o1777, {}, None, b"tmp", time.time_ns())
        self._place(b"/tmp", self._tmp_root)    # the one /tmp node a reset keeps (and refills)

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

    def mkdirat(self, dirfd, path, mode):
        d, name = self._walk_parent(dirfd, path)
        if name is None or self._exists(d, name):
            _fail(EEXIST)
        if not d.tmpfs:
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
        if not d.tmpfs:
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
        if not node.tmpfs:
            _fail(EROFS, _READ_ONLY)
        if node.fmt == S_IFLNK:
            _fail(EOPNOTSUPP)
        node.mode = mode & 0o7777
        node.ctime = time.time_ns()
        self._tmp_dirty = True

    def unlinkat(self, dirfd, path, flags):
        if flags & ~AT_REMOVEDIR:
            _fail(EINVAL)
        rmdir = bool(flags & AT_REMOVEDIR)
        d, name = self._walk_parent(dirfd, path)
        if name is None:
            last = _split(path)[-1:]
            _fail(EISDIR if not rmdir else EINVAL if last == [b"."] else EBUSY if not last else ENOTEMPTY)
        node = d.child(self, name)
        if not d.tmpfs:
            _fail(EROFS, _READ_ONLY)
        if rmdir:
            if node.fmt != S_IFDIR:
                _fail(ENOTDIR)
            if not node.tmpfs:
                _fail(EBUSY, "a read= mount point")
            if node.data:
                _fail(ENOTEMPTY)
        elif node.fmt == S_IFDIR:
            _fail(EISDIR)
        elif path.endswith(b"/"):
            _fail(ENOTDIR)
        elif not node.tmpfs:
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
        src = od.child(self, on)
        if not (od.tmpfs and nd.tmpfs):
            if src.fmt != S_IFDIR and (oldpath.endswith(b"/") or newpath.endswith(b"/")):
                _fail(ENOTDIR)
            _fail(EXDEV if od.tmpfs != nd.tmpfs else EROFS, _READ_ONLY)
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
        if not src.tmpfs or src in self._pinned or flags & RENAME_EXCHANGE and (
                not dst.tmpfs or dst in self._pinned):
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
                if not dst.tmpfs:
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
        if desc.flags & O_ACCMODE == O_RDONLY or not desc.node.tmpfs or desc.node.fmt != S_IFREG:
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
            path = d.display(self) + tail
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
        stack.extend(d.node for d, _ in self._fds.values() if d.node.tmpfs)
        if self._cwd.tmpfs:
            stack.append(self._cwd)
        while stack:
            node = stack.pop()
            if id(node) in seen or not node.tmpfs:     # (a mount: its name is counted)
                continue
            seen.add(id(node))
            used += _INODE_COST
            if node.fmt == S_IFDIR:
                used += sum(_INODE_COST + len(name) for name in node.data)
                stack.extend(node.data.values())
            else:
                used += len(node.data)
        return used

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
        if not node.tmpfs:
            _fail(EROFS, _READ_ONLY)
        now = time.time_ns()
        if atime != UTIME_OMIT:
            node.atime = now if atime == UTIME_NOW else max(-MAX_FILE - 1, min(MAX_FILE, atime))
        if mtime != UTIME_OMIT:
            node.mtime = now if mtime == UTIME_NOW else max(-MAX_FILE - 1, min(MAX_FILE, mtime))
        node.ctime = now
        self._tmp_dirty = True
        return 0

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
                             if node.data[name].tmpfs)     # a mount: see _graft
        held = [d.node for d, _ in self._fds.values()] + [self._cwd]
        for node in held:
            if node.tmpfs and id(node) not in index:
                add(node, -1)
        self._tmp_frozen = (tuple(entries), index)
        self._tmp_nodes, self._tmp_dirty = nodes, False
        return self._tmp_frozen

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

