"""What an open file description does: read, write, seek, list a directory (getdents64), and
the calls the loader and mmap make on an fd (host_file, regular_size, contents)."""

import struct

from ..errno import (EBADF, EINVAL, EIO, EISDIR, ENODEV, ENOENT, ENOTDIR, ENXIO, EOVERFLOW, ESPIPE)
from .common import (_LISTING_ENTRY, MAX_FILE, MAX_IO, O_ACCMODE, O_APPEND, O_PATH, O_RDONLY,
                     O_WRONLY, S_IFCHR, S_IFDIR, S_IFIFO, S_IFREG, SEEK_CUR, SEEK_DATA, SEEK_END,
                     SEEK_HOLE, SEEK_SET, _fail, _s64)


class FileOps:
    """The FileSystem's calls on open files (a mixin)."""

    def _io_desc(self, fd, write, positional=False):
        desc = self._desc(fd)
        acc = desc.flags & (O_ACCMODE | O_PATH)
        if acc == O_PATH or acc == (O_RDONLY if write else O_WRONLY):
            _fail(EBADF)
        if desc.node.console is not None:
            if positional:
                _fail(ESPIPE)                   # a pipe has no offsets
            _fail(EIO, "console fds are served by the caller (see FileSystem.console)")
        return desc

    def _read_at(self, desc, n, offset):
        if n < 0:
            _fail(EINVAL)
        node = desc.node
        if node.fmt == S_IFDIR:
            _fail(EISDIR)
        return node.read(self, desc, min(n, MAX_IO), offset)

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
        return self._advance(desc, desc.node.read_into(self, desc, buf, desc.offset))

    def pread_into(self, fd, buf, offset):
        """pread() into a writable buffer; returns the count."""
        desc, offset = self._positional(fd, offset)
        return desc.node.read_into(self, desc, buf, offset)

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

    def write(self, fd, data):
        desc = self._io_desc(fd, True)
        node = desc.node
        if not node.tmpfs:
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
        if not node.tmpfs:
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
        if node.fmt == S_IFIFO:                 # a console: a pipe
            _fail(ESPIPE)
        if node.fmt == S_IFCHR:                 # a device (host ones are never opened)
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
        return desc.node.size(desc)

    def getdents64(self, fd, count):
        desc = self._desc(fd)
        if desc.flags & O_PATH:
            _fail(EBADF)
        if desc.node.fmt != S_IFDIR:
            _fail(ENOTDIR)
        node = desc.node
        if node.tmpfs and node.removed(self):
            _fail(ENOENT, "the directory was removed")      # as Linux lists a removed one
        listing = desc.listing
        if listing is None or (desc.offset == 0 and not node.cacheable):
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

    def _shared_listing(self, d, listing):
        """Whether `listing` is the one cached for d's path (shared by every description)."""
        return d.cacheable and listing is self._listings.get(d.path)

    def _listing(self, d):
        """[(name, ino, d_type)] of a directory, "." and ".." first, then sorted by name."""
        return d.listing(self, [(b".", d.ino, 4), (b"..", (d.parent or self._tmp_root).ino, 4)])

    def host_file(self, fd):
        """(host fd, size) of a regular host file, for a MAP_PRIVATE mapping; None for /tmp and
        synthesized files. The host fd belongs to this FileSystem: map (or dup) it at once."""
        desc = self._desc(fd)
        if desc.flags & O_PATH:
            _fail(EBADF)
        return desc.node.host_file(self)

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
        return node.whole(self, desc, start, None if n is None else start + n)
