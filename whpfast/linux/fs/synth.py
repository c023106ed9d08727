"""The synthesized files: /proc/self (fd, maps, status, exe, cwd), /sys's CPU lists, /dev's
devices and console links, the user database unless the read policy shows one, and the
caller's `extra_files`; the consoles (fds 0, 1, 2 at start)."""

import os

from ..errno import EACCES, ENAMETOOLONG, ENOENT, EROFS
from ..errno import LinuxError
from .common import (_PIPE_DEV, _READ_ONLY, _RESERVED, _SYN_DEV, _SYN_TIME, _TMP, AT_FDCWD,
                     MAX_EXTRA_BYTES, MAX_EXTRA_FILES, NAME_MAX, PIPEFS_MAGIC, S_IFCHR, S_IFDIR,
                     S_IFLNK, S_IFMT, S_IFREG, SANDBOX_USER, ReadPolicyError, _fail, _split)
from .nodes import _Node


class _Syn(_Node):
    """A synthesized node. `value` is per kind: a dict of children (directory), a callable
    returning the contents (file), a callable returning the target (symlink: bytes, or the node
    itself for /proc/self magic links), the device name, or the console name."""
    __slots__ = ("path", "parent", "fmt", "mode", "ino", "rdev", "value")

    def __init__(self, path, parent, mode, ino, value, rdev=0):
        self.path, self.parent, self.mode, self.ino, self.value, self.rdev = (
            path, parent, mode, ino, value, rdev)
        self.fmt = mode & S_IFMT

    def attrs(self, fs):
        nlink = 2 if self.fmt == S_IFDIR else 1
        return (_SYN_DEV, self.ino, self.mode, nlink, fs._uid, fs._gid, self.rdev, self._size(fs),
                _SYN_TIME, _SYN_TIME, _SYN_TIME)

    def _size(self, fs):
        return 0


class _SynDir(_Syn):
    __slots__ = ()

    def child(self, fs, name):
        node = fs._canon.get(self.path + b"/" + name)
        if node is None:
            _fail(ENAMETOOLONG if len(name) > NAME_MAX else ENOENT)
        return node

    def entries(self, fs):
        return {}

    def check_write(self):
        _fail(EROFS, _READ_ONLY)


class _FdDir(_Syn):          # /proc/self/fd: its entries are the open fds
    __slots__ = ()
    cacheable = False        # changes while the guest runs

    def child(self, fs, name):
        return fs._fd_link(name)

    def listing(self, fs, dots):
        return dots + [(b"%d" % fd, fs._fd_dir_ino(fd), 10) for fd in sorted(fs._fds)]


class _SynFile(_Syn):
    __slots__ = ()
    contents = True

    def whole(self, fs, desc, start, end):
        return desc.data[start:end]

    def opened(self, fs, flags):
        data = self.value()
        fs._hold(len(data))
        return data

    def read(self, fs, desc, n, offset):
        return desc.data[offset:offset + n]

    def size(self, desc):
        return len(desc.data)

    def _size(self, fs):
        return len(self.value())


class _SynLink(_Syn):
    __slots__ = ()

    def target(self, fs):
        return self.value()

    def _size(self, fs):
        target = self.value()
        try:
            return len(target if isinstance(target, bytes) else target.display(fs))
        except LinuxError:           # a path too long to show: readlink fails
            return 0

    def ref(self):
        if self.path.startswith(b"/proc/self/fd/"):
            return ("f", int(self.path[14:]))
        return ("p", self.path)


class _Device(_Syn):         # /dev/null, /dev/zero, /dev/random, /dev/urandom
    __slots__ = ()

    def check_write(self):
        pass

    def open_error(self, flags):
        return None

    def read(self, fs, desc, n, offset):
        if self.value == b"null":
            return b""
        if self.value == b"zero":
            return bytes(min(n, 1 << 20))
        return bytes(fs._entropy(min(n, 1 << 20)))


class _Console(_Syn):        # fds 0, 1, 2 at start: the caller serves their reads and writes
    __slots__ = ("console",)   # = value
    cacheable = False

    def __init__(self, path, parent, mode, ino, value, rdev=0):
        _Syn.__init__(self, path, parent, mode, ino, value, rdev)
        self.console = value

    def display(self, fs):
        return b"pipe:[%d]" % self.ino

    def check_write(self):
        if self.value == "stdin":
            _fail(EACCES)

    def attrs(self, fs):
        return (_PIPE_DEV,) + _Syn.attrs(self, fs)[1:]

    def ref(self):
        return ("c", self.value)

    def statfs_kind(self):
        return PIPEFS_MAGIC, False

    def open_error(self, flags):
        return None




class Synthesized:
    """The FileSystem's part that makes the synthesized nodes (a mixin)."""

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

    def _build_synthetic(self):
        """/proc, /sys and /dev (the user database comes after /tmp: see _build_users)."""
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

    def _build_users(self):
        # A user database naming the sandbox's identity (getpass.getuser, pwd.getpwuid, `id`),
        # unless the read policy shows one: a caller who maps /etc gets what it mapped.
        users = {b"/etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n%s:x:%d:%d:whpfast sandbox:/tmp:/bin/sh\n"
                 % (SANDBOX_USER, self._uid, self._gid),
                 b"/etc/group": b"root:x:0:\n%s:x:%d:\n" % (SANDBOX_USER, self._gid)}
        for path, contents in users.items():
            try:
                self._walk(AT_FDCWD, path, start=self._root)
            except LinuxError:
                self._place(path, _SynFile(path, None, S_IFREG | 0o444, self._new_ino(),
                                           lambda contents=contents: contents))

    def _status(self):
        name = os.path.basename(self._exe or b"?")[:15]
        return (b"Name:\t%s\nUmask:\t%04o\nState:\tR (running)\nTgid:\t1\nPid:\t1\nPPid:\t0\n"
                b"Uid:\t%d\t%d\t%d\t%d\nGid:\t%d\t%d\t%d\t%d\nThreads:\t1\n"
                b"Cpus_allowed_list:\t0\n" % (name, self._umask, *[self._uid] * 4, *[self._gid] * 4))

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

