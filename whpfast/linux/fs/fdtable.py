"""The fd table: fd -> (open file description, close-on-exec), its calls (close, dup*, fcntl,
ioctl) and the bound on the host memory its descriptions hold (_HELD_MAX)."""

from ..errno import EBADF, EINVAL, EMFILE, ENOMEM, ENOTTY
from . import common
from .common import (_LISTING_ENTRY, _SETFL_FLAGS, _STATUS_FLAGS, F_DUPFD, F_DUPFD_CLOEXEC, F_GETFD,
                     F_GETFL, F_SETFD, F_SETFL, FIOCLEX, FIONCLEX, O_CLOEXEC, O_LARGEFILE, O_PATH,
                     _fail, _s32)
from .nodes import _Open


class FdTable:
    """The FileSystem's fd table (a mixin: _fds lives on the FileSystem)."""

    def _desc(self, fd, err=EBADF):
        entry = self._fds.get(fd & 0xFFFFFFFF)      # the kernel takes fds as unsigned int
        if entry is None:
            _fail(err)
        return entry[0]

    def _free_fd(self, lowest=0):
        fd = lowest
        while fd in self._fds:
            fd += 1
        if fd >= self.max_fds:
            _fail(EMFILE, f"{self.max_fds} fds open")
        return fd

    def _install(self, fd, node, flags, data=None):
        self._fds[fd] = (_Open(node, (flags & _STATUS_FLAGS) | O_LARGEFILE, 0, data),
                         bool(flags & O_CLOEXEC))
        self._table_changed = self._dirty = True
        return fd

    def console(self, fd):
        """"stdin", "stdout" or "stderr" when fd is a console file (also after dup), else None."""
        entry = self._fds.get(fd & 0xFFFFFFFF)
        return None if entry is None else entry[0].node.console

    def close(self, fd):
        entry = self._fds.pop(fd & 0xFFFFFFFF, None)
        if entry is None:
            _fail(EBADF)
        self._table_changed = self._dirty = True
        if self._nlocks:
            self._unlock_closed(entry[0])

    def dup(self, fd):
        desc = self._desc(fd)
        new = self._free_fd()
        self._fds[new] = (desc, False)
        self._table_changed = self._dirty = True
        return new

    def dup2(self, old, new):
        old, new = old & 0xFFFFFFFF, new & 0xFFFFFFFF
        desc = self._desc(old)
        if old == new:
            return new
        return self._dup_to(desc, new, False)

    def dup3(self, old, new, flags):
        old, new = old & 0xFFFFFFFF, new & 0xFFFFFFFF
        if flags & ~O_CLOEXEC or old == new:
            _fail(EINVAL)
        return self._dup_to(self._desc(old), new, bool(flags & O_CLOEXEC))

    def _dup_to(self, desc, new, cloexec):
        if not 0 <= new < self.max_fds:
            _fail(EBADF)
        replaced = self._fds.get(new)
        self._fds[new] = (desc, cloexec)
        self._table_changed = self._dirty = True
        if replaced is not None and self._nlocks:
            self._unlock_closed(replaced[0])
        return new

    def fcntl(self, fd, cmd, arg=0):
        fd &= 0xFFFFFFFF
        desc, cloexec = self._fds.get(fd) or _fail(EBADF)
        if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
            arg = _s32(arg)
            if not 0 <= arg < self.max_fds:
                _fail(EINVAL)
            new = self._free_fd(arg)
            self._fds[new] = (desc, cmd == F_DUPFD_CLOEXEC)
        elif cmd == F_GETFD:
            return int(cloexec)
        elif cmd == F_SETFD:
            self._fds[fd] = (desc, bool(arg & 1))
            new = 0
        elif cmd == F_GETFL:
            return desc.flags
        elif cmd == F_SETFL:
            if desc.flags & O_PATH:
                _fail(EBADF)
            desc.flags = (desc.flags & ~_SETFL_FLAGS) | (arg & _SETFL_FLAGS)
            self._moved(desc)
            return 0
        else:
            _fail(EINVAL, f"fcntl command {cmd} is not supported")
        self._table_changed = self._dirty = True
        return new

    def ioctl(self, fd, request, arg=0):
        fd &= 0xFFFFFFFF
        desc = self._desc(fd)
        if desc.flags & O_PATH:
            _fail(EBADF)
        if request in (FIOCLEX, FIONCLEX):
            self._fds[fd] = (desc, request == FIOCLEX)
            self._table_changed = self._dirty = True
            return 0
        _fail(ENOTTY)                           # no terminals here (TCGETS, TIOCGWINSZ, ...)


    def _hold(self, n):
        """Charges n host bytes that an open description is about to keep (ENOMEM past
        common._HELD_MAX): without it each of max_fds fds could hold its own copy of a large
        /proc/self/maps or /tmp directory listing. `_held` only ever overestimates (closing
        refunds nothing), so it is recounted exactly when a request would not fit."""
        if self._held + n > common._HELD_MAX:
            self._held = self._recount_held()
            if self._held + n > common._HELD_MAX:
                _fail(ENOMEM, f"open files hold more than {common._HELD_MAX >> 20} MiB of host memory")
        self._held += n

    def _recount_held(self):
        held, seen = 0, set()
        for desc, _ in self._fds.values():
            if id(desc) not in seen:
                seen.add(id(desc))
                if desc.data is not None:
                    held += len(desc.data)
                if desc.listing is not None and not self._shared_listing(desc.node, desc.listing):
                    held += len(desc.listing) * _LISTING_ENTRY
        return held

