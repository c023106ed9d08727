"""What this host has already verified of a file, remembered across processes, so that the
second process to load a snapshot file does not hash its ~70 MiB of referenced libraries and
checksum its image again (issue 21: the first from_snapshot of a process).

A record says "the file with this identity -- device, inode, size, modification and change
times, in ns -- was checked and gave this value". The change time (ctime) is the key's anchor:
every write, truncate, rename, chmod or utime of a file sets it to the current time, and no
caller but root can set it back, so an unchanged identity means unchanged bytes. Two guards:
- a file whose ctime is within RACY_NS of the check is not recorded (a write in the same clock
  tick as the check could leave the identity unchanged: git's "racy" rule);
- records live in a directory of the caller's own ($XDG_CACHE_HOME or ~/.cache, then
  whpfast/verified), owned by the effective user, writable by no one else, reached without
  following symlinks; anything else and nothing is remembered or believed (a record is a
  shortcut, never authority: who can write there could edit the user's files anyway).
WHPFAST_VERIFY_CACHE=0 turns it off."""

import hashlib
import os
import stat
import time
from typing import Any, Optional

RACY_NS = 2_000_000_000
_OPEN = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _enabled() -> bool:
    return os.environ.get("WHPFAST_VERIFY_CACHE", "1") != "0" and hasattr(os, "geteuid")


def _private(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _directory(create: bool) -> Optional[str]:
    """The records' directory, when it is the caller's own all the way from the cache root."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = base
    for part in ("whpfast", "verified"):
        path = os.path.join(path, part)
        try:
            if create:
                os.makedirs(path, mode=0o700, exist_ok=True)
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode) or not _private(st):
            return None
    return path


def _name(kind: str, st: os.stat_result, detail: Any) -> str:
    identity = (kind, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, detail)
    return hashlib.sha256(repr(identity).encode()).hexdigest()


def known(kind: str, st: os.stat_result, detail: Any = None) -> Optional[str]:
    """The value recorded for the file with identity `st` (an fstat of the open file) and this
    kind of check and detail, or None."""
    if not _enabled():
        return None
    directory = _directory(create=False)
    if directory is None:
        return None
    try:
        fd = os.open(os.path.join(directory, _name(kind, st, detail)), _OPEN)
    except OSError:
        return None
    try:
        if not _private(os.fstat(fd)):
            return None
        return os.read(fd, 4096).decode("ascii", "replace")
    finally:
        os.close(fd)


def remember(kind: str, st: os.stat_result, detail: Any, value: str,
             newest_ns: Optional[int] = None) -> None:
    """Records `value` for the file with identity `st`, unless its ctime (or newest_ns, the
    newest ctime of other files the detail names) is too recent to tell a later write apart
    (RACY_NS) or the directory is not the caller's own. Never raises."""
    newest = st.st_ctime_ns if newest_ns is None else max(newest_ns, st.st_ctime_ns)
    if not _enabled() or time.time_ns() - newest < RACY_NS:
        return
    directory = _directory(create=True)
    if directory is None:
        return
    name = os.path.join(directory, _name(kind, st, detail))
    tmp = f"{name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN, 0o600)
        try:
            os.write(fd, value.encode("ascii"))
        finally:
            os.close(fd)
        os.replace(tmp, name)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
