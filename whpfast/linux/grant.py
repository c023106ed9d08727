"""What the caller grants a Linux snapshot: the only authority a sandbox made from it has.

A snapshot file is untrusted input. It *declares* what its guest needs -- the host paths of its
`read` policy, its memory size, its /tmp quota -- and never grants them: whoever edits the file
(every checksum can be recomputed) could otherwise widen its policy to `{"/loot": "/etc"}`. The
caller's arguments (`read=`, `memory_size=`, `tmp_size=` of `from_snapshot`, `LinuxSnapshot.load`,
`Pool`, `RayPool`, the CLI) are the grant; a snapshot declaring more is a SnapshotError naming
what it asked for, before any host file it names is opened.

A declared read entry {inside I: host H} is covered when the grant has an entry {I': H'} with I
at or under I' and H exactly H' joined with the same relative part, H' taken after resolving the
caller's symlinks and H after resolving the file's: a declared path through a symlink inside a
granted directory that leads outside it is not covered. Only the grant's own host paths are
resolved before the declared strings are matched against them, so a refused file makes the host
look at nothing it names.

The declared environment, cwd and stack size are not authority (the guest's memory holds the
environment anyway; cwd is a path inside the sandbox's own file system), and a snapshot taken in
this process was made under its sandbox's arguments: its grant is what it declares."""

import os
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

from ..errors import SnapshotError
from .fs import FileSystem, ReadPolicyError, _split

DEFAULT_MEMORY_SIZE = 1 << 30           # LinuxSandbox's defaults: what a caller grants by default
DEFAULT_TMP_SIZE = 64 << 20


def _pairs(read: Any):
    """(inside, host) pairs of a read policy as LinuxSandbox takes it: host paths (the same path
    inside), or {inside: host}."""
    if isinstance(read, (str, bytes, os.PathLike)):
        read = [read]
    if isinstance(read, Mapping):
        return [(os.fsencode(k), os.fsencode(v)) for k, v in read.items()]
    return [(os.fsencode(r), os.fsencode(r)) for r in read]


def _join(base: bytes, rest: bytes) -> bytes:
    """base (a normalized absolute path) with rest ("" or "/a/b") appended."""
    return base.rstrip(b"/") + rest or b"/"


class Grant(NamedTuple):
    """The caller's authority over a snapshot: {inside: (host path as given, normalized; the
    same resolved)}, and the most memory and /tmp it may declare."""
    read: Mapping[bytes, Tuple[bytes, bytes]]
    memory_size: int
    tmp_size: int

    @classmethod
    def of(cls, read: Any = (), memory_size: Optional[int] = None,
           tmp_size: Optional[int] = None) -> "Grant":
        """A grant from a caller's arguments; None limits are LinuxSandbox's defaults.
        ReadPolicyError for a read policy LinuxSandbox would refuse."""
        for what, value in (("memory_size", memory_size), ("tmp_size", tmp_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise TypeError(f"{what} must be a positive int number of bytes, not {value!r}")
        granted = {}
        for inside, host in _pairs(read):
            (key, real), = FileSystem._parse_read({inside: host}).items()
            granted[key] = (os.path.normpath(os.path.abspath(host)), real)
        return cls(granted, memory_size or DEFAULT_MEMORY_SIZE, tmp_size or DEFAULT_TMP_SIZE)

    def check(self, config: Dict[str, Any], memory_size: int, what: str) -> None:
        """Raises SnapshotError for the first thing a snapshot's (checked) config and memory size
        declare beyond this grant."""
        if memory_size > self.memory_size:
            raise SnapshotError(f"{what} needs {memory_size >> 20} MiB of guest memory; the caller's "
                                f"memory_size= allows {self.memory_size >> 20} MiB")
        if config["tmp_size"] > self.tmp_size:
            raise SnapshotError(f"{what} needs a /tmp of {config['tmp_size'] >> 20} MiB; the caller's "
                                f"tmp_size= allows {self.tmp_size >> 20} MiB")
        problems = [why for why in (self._uncovered(inside, host) for inside, host in _pairs(config["read"]))
                    if why]
        if problems:
            raise SnapshotError(f"{what} declares more than it is granted: {'; '.join(problems)}")

    def _uncovered(self, inside: bytes, host: bytes) -> Optional[str]:
        """Why the declared entry {inside: host} is not covered, or None."""
        entry = f"host path {os.fsdecode(host)!r} (at {os.fsdecode(inside)!r})"
        refused = f"{entry} is not granted by the caller's read= (pass read= with it to allow it)"
        if not inside.startswith(b"/") or b"\0" in inside or b"\0" in host or not os.path.isabs(host):
            return refused
        parts = _split(inside)
        if b".." in parts or b"." in parts:
            return refused
        key = b"".join(b"/" + p for p in parts)
        host = os.path.normpath(host)
        for granted_inside, (given, real) in self.read.items():
            if key != granted_inside and not key.startswith(granted_inside + b"/"):
                continue
            rest = key[len(granted_inside):]
            # the strings first: a host path outside the grant is never looked at
            if host not in (_join(given, rest), _join(real, rest)):
                continue
            try:
                (_, resolved), = FileSystem._parse_read({b"/": host}).items()
            except ReadPolicyError as e:
                return f"{entry} does not work on this host ({e})"
            if resolved == _join(real, rest):   # no symlink on the way leads elsewhere
                return None
        return refused
