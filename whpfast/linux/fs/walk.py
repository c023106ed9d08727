"""Path resolution: the one walker every path the guest names goes through (`_walk`), its form
for open(O_CREAT) too (`create`), its form for creating and removing (`_walk_parent`), and the
mount table it walks (`_place`: read roots, synthesized nodes and extra files over the host's).

".." is taken on the inside path (the parent of a mount point is its inside parent, never the
host's), symlink targets are re-interpreted inside the namespace and walked again (MAXSYMLINKS
in all), and /proc/self/fd/N leads to the very node that fd holds. Walks that start and stay
on nodes whose path names them for good (`cacheable`) are remembered, bounded (_CACHE_MAX
walks of paths up to _CACHE_PATH bytes)."""

import os

from ..errno import EEXIST, EINVAL, EISDIR, ELOOP, ENAMETOOLONG, ENOENT, ENOTDIR, EROFS, LinuxError
from . import common
from .common import (_READ_ONLY, AT_FDCWD, MAXSYMLINKS, NAME_MAX, O_EXCL, O_NOFOLLOW, PATH_MAX,
                     S_IFDIR, S_IFLNK, ReadPolicyError, _fail, _split)
from .synth import _SynDir

_CWD = AT_FDCWD & 0xFFFFFFFF    # dirfd is compared as the kernel's int: AT_FDCWD either way


class Walker:
    """The FileSystem's path walker (a mixin: its caches _canon, _walks and _overlay live on the
    FileSystem)."""

    def _start(self, dirfd):
        """The node a relative path starts from: the cwd or dirfd's node. dirfd is the guest's
        int, signed or as its register holds it (4294967196 is AT_FDCWD): compared here once."""
        if dirfd & 0xFFFFFFFF == _CWD:
            return self._cwd
        return self._desc(dirfd).node

    def _walk(self, dirfd, path, *, follow=True, empty=False, start=None, create=0):
        """The node `path` (bytes, without the guest's NUL) names, relative to `dirfd` (or
        `start`). `follow`: follow a symlink in the last component; `empty`: an empty path names
        dirfd's own node (AT_EMPTY_PATH).

        `create`: open(O_CREAT)'s flags, and the answer is a pair: (the node, None), or (a /tmp
        directory, a name) to create (EROFS elsewhere). A symlink in the last component is
        followed (unless O_NOFOLLOW) and its target is what is created, as Linux does; O_EXCL
        refuses any existing node, a symlink too; a last component ".", ".." or one with a
        trailing slash is EEXIST (O_EXCL) or EISDIR."""
        if len(path) >= PATH_MAX:
            _fail(ENAMETOOLONG)
        if b"\0" in path:
            _fail(EINVAL, "a path with a NUL byte")
        if not path:
            if empty:
                return self._start(dirfd) if start is None else start
            _fail(ENOENT)
        if path[0] == 0x2F:
            cur = self._root
        else:
            cur = self._start(dirfd) if start is None else start
        key = None
        slash = path[-1] == 0x2F
        if create:
            head, _, last = path.rstrip(b"/").rpartition(b"/")
            if head and last != b"." and last != b"..":
                # the directory by a walk of its own, remembered as any other
                cur, comps = self._walk(dirfd, head + b"/", start=start), [last]
            else:
                comps = _split(path)
                comps.reverse()
        else:
            if cur.cacheable:                   # a start with a canonical path
                key = (cur.path, path, follow)
                hit = self._walks.get(key)
                if hit is not None:
                    return hit
            comps = _split(path)
            if slash:
                comps.append(b".")              # "name/" must be a directory: follow it, check it
            comps.reverse()
        links = 0
        while comps:
            if cur.fmt != S_IFDIR:
                _fail(ENOTDIR)
            name = comps.pop()
            if name == b".":
                if create and not comps:
                    break
                continue
            if name == b"..":
                cur = cur.parent or self._tmp_root
                if create and not comps:
                    break
                if not cur.cacheable:           # (from a mount in /tmp) changes: not cached
                    key = None
                continue
            if create and not comps:            # the name to open or create
                if len(name) > NAME_MAX:
                    _fail(ENAMETOOLONG)
                if slash:
                    _fail(EISDIR)
                try:
                    child = cur.child(self, name)
                except LinuxError as e:
                    if e.errno != ENOENT:
                        raise
                    if not cur.tmpfs:
                        _fail(EROFS, f"{os.fsdecode(path)}: {_READ_ONLY}")
                    return cur, name
                if create & O_EXCL:
                    _fail(EEXIST)
                if child.fmt != S_IFLNK or create & O_NOFOLLOW:
                    return child, None
            else:
                child = cur.child(self, name)
            if child.fmt == S_IFLNK and (comps or follow):
                links += 1
                if links > MAXSYMLINKS:
                    _fail(ELOOP)
                target = child.target(self)
                if not isinstance(target, bytes):   # a magic link: the node itself
                    if create and not comps:
                        if target.fmt == S_IFLNK:
                            _fail(ELOOP)        # an O_PATH fd of a symlink: never opened
                        return target, None
                    cur, key = target, None
                    continue
                if not target:
                    _fail(ENOENT)
                if target[0] == 0x2F:
                    cur = self._root
                more = _split(target)
                if target[-1] == 0x2F:
                    if create and not comps:
                        slash = True            # O_CREAT through a symlink to "name/"
                    else:
                        more.append(b".")
                more.reverse()
                comps.extend(more)
                continue
            if not (child.cacheable and cur.cacheable):
                key = None                      # changes while the guest runs: not cached
            cur = child
        if create:                              # "/", or a last "." or "..": a directory
            _fail(EEXIST if create & O_EXCL else EISDIR)
        if key is not None and len(path) <= common._CACHE_PATH and len(self._walks) < common._CACHE_MAX:
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

    def _exists(self, d, name):
        try:
            d.child(self, name)
            return True
        except LinuxError as e:
            if e.errno != ENOENT:
                raise
            return False

    # -- the mount table

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
            try:
                node = parent.child(self, name)
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
