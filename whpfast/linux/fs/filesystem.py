"""FileSystem, the facade: the namespace, fd table, cwd and /tmp of one Linux process, made of
its parts (see the package's docstring for the whole and the security properties):

  walk.py      path resolution: the one walker, creation included, and the mount table
  fdtable.py   the fd table (fd -> open description, close-on-exec) and its host-memory bound
  locks.py     POSIX, OFD and flock locks
  fileops.py   read, write, seek, getdents64 and the loader's calls on an open file
  meta.py      stat, statx, statfs, access, readlink
  host.py      the read roots (_HostNode) and the only calls that reach the host's files
  tmpfs.py     /tmp (_Tmp) with its quota and read-only bind mounts
  synth.py     /proc, /sys, /dev, the user database, extra_files, the consoles
  warm.py      capture() and reset(); state.py is the FsState codec

Here: the constructor (the read policy checked and mounted), open, the cwd and the umask."""

import os

from ..errno import EINVAL, EISDIR, ELOOP, ENOENT, ENOTDIR, EOPNOTSUPP, LinuxError
from .common import (_INODE_COST, _RESERVED, _TMP, AT_FDCWD, O_ACCMODE, O_CLOEXEC, O_CREAT,
                     O_DIRECTORY, O_NOFOLLOW, O_PATH, O_RDONLY, O_TMPFILE, O_TRUNC, O_WRONLY,
                     S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG, ReadPolicyError, _fail, _split)
from .fdtable import FdTable
from .fileops import FileOps
from .host import HostFiles
from .locks import Locks
from .meta import Metadata
from .nodes import _Open
from .synth import _Console, _SynDir, _SynFile, Synthesized
from .tmpfs import Tmpfs
from .walk import Walker
from .warm import WarmStart


class FileSystem(Walker, FdTable, FileOps, Metadata, Locks, HostFiles, Tmpfs, Synthesized, WarmStart):
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
        self._make_tmp_root()
        self._build_users()
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
        self._ranges = {}           # node.lock_key() -> [(owner, type, first, last), ...] by first:
                                    # record locks; owner _PROCESS (POSIX) or a description (OFD)
        self._flocks = {}           # node.lock_key() -> {description: F_RDLCK or F_WRLCK}
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

    def _new_ino(self):
        self._ino += 1
        return self._ino

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
            if not d.tmpfs:
                _fail(EOPNOTSUPP, "O_TMPFILE works under /tmp only")
            node = self._tmp_new(d, None, S_IFREG, mode, bytearray())
            return self._install(fd, node, flags & ~O_TMPFILE)
        if flags & (O_CREAT | O_DIRECTORY) == O_CREAT | O_DIRECTORY:
            _fail(EINVAL)                       # as Linux since 6.4: it would create a file
        if flags & O_CREAT:
            node, name = self._walk(dirfd, path, create=flags)
            if name is not None:
                return self._install(fd, self._tmp_new(node, name, S_IFREG, mode, bytearray()), flags)
        else:
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
            node.check_write()
        return self._install(fd, node, flags, node.opened(self, flags))

    def __del__(self):
        self.close_all()

    # -- cwd, umask

    def getcwd(self):
        if self._cwd.tmpfs and self._cwd.removed(self):
            _fail(ENOENT)
        return self._cwd.display(self)

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


