"""Warm start: capture() takes an immutable FsState of everything the guest can observe (fd table
with offsets and flags, cwd, umask, the /tmp tree, locks), reset() puts exactly that back;
encode() and decode() are the state codec of state.py."""

import os

from ...errors import SnapshotError
from ..errno import EBADF, LinuxError
from . import common, state as _fsstate
from .common import (AT_FDCWD, F_RDLCK, F_WRLCK, O_ACCMODE, O_PATH, O_RDONLY, O_WRONLY, S_IFDIR, _fail)
from .locks import _PROCESS
from .nodes import _UNKNOWN, _Open
from .state import LOCK_FLOCK, LOCK_OFD, LOCK_POSIX, FsState


class WarmStart:
    """The FileSystem's capture and reset (a mixin)."""

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
            by_key.setdefault(desc.node.lock_key(), desc.idx)
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
                key = desc.node.lock_key()
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
        return ("t", index[id(node)]) if node.tmpfs else node.ref()

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
            raise SnapshotError(f"the snapshot's cwd {os.fsdecode(cwd.display(self))} is not a directory")
        self._cwd, self._umask = cwd, state.umask
        self._ino = max(self._base_ino, state.next_ino)
        self._held = common._HELD_MAX                  # other descriptions now: recounted when needed
        self._settled(state, descs)

    def _check_desc(self, desc):
        """A decoded description must be one an open here could have made (decode checked what
        it could without the file system): else a read, lseek or stat of it would fail on the
        host instead of answering the guest."""
        why = desc.node.restore_error(desc)
        if why is not None:
            raise SnapshotError(f"the snapshot's open file description {desc.idx} "
                                f"({type(desc.node).__name__.lstrip('_')}): {why}")

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

