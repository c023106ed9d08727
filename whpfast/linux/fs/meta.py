"""What the guest can ask of a node's metadata: stat, statx, statfs, access, readlink, and the
name a mapping of it shows."""

import struct

from ..errno import EACCES, EINVAL, ENOENT, LinuxError
from .common import (_INODE_COST, _STATFS, _STATFS_BLOCK, AT_EACCESS, AT_EMPTY_PATH, AT_FDCWD,
                     AT_NO_AUTOMOUNT, AT_STATX_SYNC_TYPE, AT_SYMLINK_NOFOLLOW, NAME_MAX, PATH_MAX,
                     S_IFDIR, S_IFLNK, ST_NODEV, ST_NOSUID, ST_RDONLY, ST_VALID, STATX_BASIC_STATS,
                     _fail)


class Metadata:
    """The FileSystem's metadata calls (a mixin)."""

    def _pack_stat(self, node):
        dev, ino, mode, nlink, uid, gid, rdev, size, at, mt, ct = node.attrs(self)
        return struct.pack("<QQQIIIiQqqqqqqqqq24x", dev & 0xFFFFFFFFFFFFFFFF, ino, nlink, mode,
                           uid, gid, 0, rdev, size, 4096, (size + 511) // 512,
                           at // 10**9, at % 10**9, mt // 10**9, mt % 10**9, ct // 10**9, ct % 10**9)

    def fstat(self, fd):
        """struct stat (x86-64, 144 bytes) of the file open at fd."""
        return self._desc(fd).node.stat_bytes(self)

    def fstatat(self, dirfd, path, flags):
        if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | AT_NO_AUTOMOUNT):
            _fail(EINVAL)
        node = self._walk(dirfd, path, follow=not flags & AT_SYMLINK_NOFOLLOW,
                          empty=bool(flags & AT_EMPTY_PATH))
        return node.stat_bytes(self)

    def statfs(self, path):
        """struct statfs (x86-64, 120 bytes) of the file system holding path (followed)."""
        return self._statfs_bytes(self._walk(AT_FDCWD, path))

    def fstatfs(self, fd):
        return self._statfs_bytes(self._desc(fd).node)

    def _statfs_bytes(self, node):
        # /tmp answers from its quota (inodes at the bytes each costs); the rest is read-only and
        # has no space to give: read roots show no host numbers (the host's disk is not the
        # guest's business), with overlayfs' magic for a view layered over host directories.
        magic, read_only = node.statfs_kind()
        blocks = free = files = ffree = 0
        flags = ST_VALID | ST_NOSUID | ST_NODEV
        if node.tmpfs:
            room = max(0, self._tmp_size - self._tmp_used)
            blocks, free = self._tmp_size // _STATFS_BLOCK, room // _STATFS_BLOCK
            files, ffree = self._tmp_size // _INODE_COST, room // _INODE_COST
        if read_only:
            flags |= ST_RDONLY
        return _STATFS.pack(magic, _STATFS_BLOCK, blocks, free, free, files, ffree, 0, 0, NAME_MAX,
                            _STATFS_BLOCK, flags)

    def statx(self, dirfd, path, flags, mask):
        """struct statx (256 bytes); every basic field is filled whatever `mask` asks."""
        if (flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | AT_NO_AUTOMOUNT | AT_STATX_SYNC_TYPE)
                or flags & AT_STATX_SYNC_TYPE == AT_STATX_SYNC_TYPE or mask & 0x80000000):
            _fail(EINVAL)
        node = self._walk(dirfd, path, follow=not flags & AT_SYMLINK_NOFOLLOW,
                          empty=bool(flags & AT_EMPTY_PATH))
        dev, ino, mode, nlink, uid, gid, rdev, size, at, mt, ct = node.attrs(self)

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
            node.check_write()
        if mode & 1 and node.fmt != S_IFDIR and not node.attrs(self)[2] & 0o111:
            _fail(EACCES)

    def mapping_name(self, fd):
        """The name /proc/self/maps shows for a mapping of the file open at fd: its path as
        readlink of /proc/self/fd/N shows it (at most PATH_MAX - 1 bytes). Linux would show
        a longer /tmp path in full; here it is /tmp/#<inode> (path too long), so that a
        mapping's name never costs the host more than PATH_MAX bytes."""
        node = self._desc(fd).node
        try:
            name = node.display(self)
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
        target = node.target(self)
        return target if isinstance(target, bytes) else target.display(self)

