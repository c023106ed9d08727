"""File locks: POSIX record locks, OFD locks and flock, bounded by MAX_LOCKS."""

from ..errno import EAGAIN, EBADF, EDEADLK, EINVAL, ENOLCK, EOVERFLOW
from .common import (F_GETLK, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW, F_RDLCK, F_SETLKW, F_UNLCK,
                     F_WRLCK, LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN, MAX_FILE, MAX_LOCKS, O_ACCMODE,
                     O_PATH, O_RDONLY, O_WRONLY, _fail)

_PROCESS = "process"        # the owner of POSIX record locks (descriptions own OFD locks)


class Locks:
    """The FileSystem's locks (a mixin: _ranges, _flocks and _nlocks live on the FileSystem)."""

    # One process, one thread: POSIX record locks never conflict with each other (one owner), so
    # conflicts arise only between OFD locks of different open file descriptions, OFD and POSIX
    # locks, and flock locks of different descriptions (flock and record locks are independent,
    # as on Linux). A request that conflicts can only wait for this very process, which is
    # waiting: F_SETLKW, F_OFD_SETLKW and flock without LOCK_NB fail with EDEADLK instead of
    # hanging (Linux says EDEADLK for POSIX locks; for OFD and flock it would sleep forever).
    # Ranges are inclusive [first, last], last MAX_FILE for "to the end of the file", as Linux.

    def _lock_desc(self, fd, typ):
        desc = self._desc(fd)
        acc = desc.flags & (O_ACCMODE | O_PATH)
        if acc & O_PATH or (typ == F_RDLCK and acc == O_WRONLY) or (typ == F_WRLCK and acc == O_RDONLY):
            _fail(EBADF)
        return desc

    def _lock_range(self, desc, whence, start, length):
        if whence == 1:
            start += desc.offset
        elif whence == 2:
            start += self._size(desc)
        elif whence != 0:
            _fail(EINVAL)
        if length > 0:
            last = start + length - 1
        elif length < 0:
            start, last = start + length, start - 1
        else:
            last = MAX_FILE
        if start < 0:
            _fail(EINVAL)
        if last > MAX_FILE:
            _fail(EOVERFLOW)
        return start, last

    def record_lock(self, fd, cmd, typ, whence, start, length, pid):
        """fcntl F_GETLK, F_SETLK(W) and their F_OFD_ forms with struct flock's fields. The
        *GETLK commands return the first conflicting lock as (type, first, last, is_posix) or
        None (no conflict); the others, None."""
        ofd = cmd in (F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW)
        if typ not in (F_RDLCK, F_WRLCK, F_UNLCK) or (ofd and pid != 0):
            _fail(EINVAL)
        getting = cmd in (F_GETLK, F_OFD_GETLK)
        if getting:
            if typ == F_UNLCK:
                _fail(EINVAL)
            desc = self._desc(fd)
            if desc.flags & O_PATH:
                _fail(EBADF)
        else:
            desc = self._lock_desc(fd, typ)
        first, last = self._lock_range(desc, whence, start, length)
        owner = desc if ofd else _PROCESS
        key = desc.node.lock_key()
        held = self._ranges.get(key, ())
        if getting:
            for o, t, s, e in held:
                if o is not owner and s <= last and first <= e and F_WRLCK in (t, typ):
                    return t, s, e, o is _PROCESS
            return None
        self._set_range(key, owner, typ, first, last, cmd in (F_SETLKW, F_OFD_SETLKW))
        return None

    def _set_range(self, key, owner, typ, first, last, wait):
        held = self._ranges.get(key, ())
        if typ != F_UNLCK:
            for o, t, s, e in held:
                if o is not owner and s <= last and first <= e and F_WRLCK in (t, typ):
                    _fail(EDEADLK if wait else EAGAIN)
        kept = []
        for rec in held:
            o, t, s, e = rec
            if o is not owner or e < first - 1 or s > last + 1:
                kept.append(rec)
            elif t == typ:                      # the same type, overlapping or adjacent: merged
                first, last = min(first, s), max(last, e)
            elif s <= last and first <= e:      # overlapped by another type: the rest stays
                if s < first:
                    kept.append((o, t, s, first - 1))
                if e > last:
                    kept.append((o, t, last + 1, e))
            else:
                kept.append(rec)
        if typ != F_UNLCK:
            kept.append((owner, typ, first, last))
        count = self._nlocks + len(kept) - len(held)
        if count > MAX_LOCKS:
            _fail(ENOLCK, f"more than {MAX_LOCKS} locks")
        kept.sort(key=lambda r: r[2])
        if kept:
            self._ranges[key] = kept
        else:
            self._ranges.pop(key, None)
        self._nlocks = count
        self._dirty = True

    def flock(self, fd, op):
        desc = self._desc(fd)
        if desc.flags & O_PATH:
            _fail(EBADF)
        typ = {LOCK_SH: F_RDLCK, LOCK_EX: F_WRLCK, LOCK_UN: F_UNLCK}.get(op & ~LOCK_NB)
        if typ is None:
            _fail(EINVAL)
        self._set_flock(desc.node.lock_key(), desc, typ, not op & LOCK_NB)
        return 0

    def _set_flock(self, key, desc, typ, wait):
        held = self._flocks.get(key, {})
        mine = held.get(desc)
        if mine == typ:
            return
        if mine is not None:            # a conversion drops the old lock first, as Linux does
            del held[desc]
            self._nlocks -= 1
            self._dirty = True
        if typ == F_UNLCK:
            if not held:
                self._flocks.pop(key, None)
            return
        if any(F_WRLCK in (t, typ) for t in held.values()):
            if not held:
                self._flocks.pop(key, None)
            _fail(EDEADLK if wait else EAGAIN)
        if self._nlocks >= MAX_LOCKS:
            _fail(ENOLCK, f"more than {MAX_LOCKS} locks")
        held[desc] = typ
        self._flocks[key] = held
        self._nlocks += 1
        self._dirty = True

    def _unlock_closed(self, desc):
        """An fd of desc was closed: the process's POSIX locks on its file go (any fd closed
        releases them), and desc's OFD and flock locks when this was its last fd."""
        key = desc.node.lock_key()
        ranges, flocks = self._ranges.get(key), self._flocks.get(key)
        if ranges is None and flocks is None:
            return
        last_fd = not any(d is desc for d, _ in self._fds.values())
        if ranges is not None:
            kept = [r for r in ranges if r[0] is not _PROCESS and (r[0] is not desc or not last_fd)]
            self._nlocks -= len(ranges) - len(kept)
            if kept:
                self._ranges[key] = kept
            else:
                del self._ranges[key]
        if flocks is not None and last_fd and desc in flocks:
            del flocks[desc]
            self._nlocks -= 1
            if not flocks:
                del self._flocks[key]
        self._dirty = True

