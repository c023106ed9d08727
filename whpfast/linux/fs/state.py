"""The saved form of the Linux file system's state: `FsState` (immutable, what `capture()`
returns) and its bytes for snapshot files. `decode` treats its input as hostile: every length,
index, name and number is checked before a state is built (ValueError says what is wrong)."""

import struct
from typing import NamedTuple
from stat import S_IFDIR, S_IFLNK, S_IFREG

PATH_MAX, NAME_MAX = 4096, 255
MAX_FILE = (1 << 63) - 1
O_ACCMODE, O_RDONLY, O_PATH = 3, 0, 0o10000000
LOCK_POSIX, LOCK_OFD, LOCK_FLOCK = 0, 1, 2
MAX_LOCKS = 4096            # fs.MAX_LOCKS: locks held at once in a sandbox
# The synthesized regular files (fs.FileSystem._build_synthetic): a description of one holds its
# contents as of the open, and only such a description holds contents.
SYNTHESIZED_FILES = frozenset((b"/proc/self/maps", b"/proc/self/status",
                               b"/sys/devices/system/cpu/online", b"/sys/devices/system/cpu/possible"))
# Synthesized unless the read policy shows the host's (then read from the host: no contents).
SYNTHESIZED_UNLESS_MAPPED = frozenset((b"/etc/passwd", b"/etc/group"))


class FsState(NamedTuple):
    """An immutable capture of everything the guest can observe of the file system."""
    fds: tuple          # ((fd, description index, cloexec), ...), by fd
    descs: tuple        # ((ref, flags, offset, synthesized contents or None), ...)
    cwd: tuple          # a ref: ("p", canonical path) | ("t", /tmp index) | ("c", console) | ("f", fd)
    umask: int
    tmp: tuple          # ((ino, fmt, mode, mtime, ctime, parent index or -1, name, payload, atime),
                        # ...): the root first, every parent before its children (so no cycles)
    next_ino: int
    locks: tuple = ()   # ((kind, description index, type, first, last), ...): kind LOCK_POSIX,
                        # LOCK_OFD (owned by the description) or LOCK_FLOCK (first = last = 0);
                        # type F_RDLCK 0 or F_WRLCK 1; the range inclusive, last MAX_FILE: to EOF


def encode(state):
    out = [_MAGIC]
    _dump(tuple(state), out)
    return b"".join(out)


def decode(data):
    data = bytes(data)
    if not data.startswith(_MAGIC):
        raise ValueError("file-system state: bad magic or version")
    obj, pos = _load(data, len(_MAGIC), 0)
    if pos != len(data):
        raise ValueError("file-system state: trailing bytes")
    return _validate(obj)


_MAGIC = b"WFLXFS\x00\x01"


def _dump(obj, out):
    t = type(obj)
    if obj is None:
        out.append(b"N")
    elif t is bool:
        out.append(b"T" if obj else b"F")
    elif t is int:
        out.append(b"I" + struct.pack("<q", obj))
    elif t is bytes:
        out.append(b"B" + struct.pack("<I", len(obj)))
        out.append(obj)
    elif t is str:
        _dump(obj.encode(), out)
        out[-2] = b"S" + out[-2][1:]
    elif t is tuple:
        out.append(b"L" + struct.pack("<I", len(obj)))
        for item in obj:
            _dump(item, out)
    else:
        raise TypeError(f"cannot encode {t.__name__}")


def _load(data, pos, depth):
    if depth > 8:
        raise ValueError("file-system state: nested too deep")
    if pos >= len(data):
        raise ValueError("file-system state: truncated")
    tag = data[pos]
    pos += 1
    if tag == 0x4E:                                         # N
        return None, pos
    if tag in (0x54, 0x46):                                 # T, F
        return tag == 0x54, pos
    if tag == 0x49:                                         # I
        if pos + 8 > len(data):
            raise ValueError("file-system state: truncated integer")
        return struct.unpack_from("<q", data, pos)[0], pos + 8
    if pos + 4 > len(data):
        raise ValueError("file-system state: truncated length")
    n = struct.unpack_from("<I", data, pos)[0]
    pos += 4
    if n > len(data) - pos:
        raise ValueError("file-system state: a length runs past the end")
    if tag == 0x42:                                         # B
        return data[pos:pos + n], pos + n
    if tag == 0x53:                                         # S
        try:
            return data[pos:pos + n].decode(), pos + n
        except UnicodeDecodeError:
            raise ValueError("file-system state: a string is not UTF-8") from None
    if tag == 0x4C:                                         # L
        items = []
        for _ in range(n):
            item, pos = _load(data, pos, depth + 1)
            items.append(item)
        return tuple(items), pos
    raise ValueError(f"file-system state: unknown tag {tag:#x}")


def _is_int(v, lo, hi):
    return type(v) is int and lo <= v <= hi


def _valid_name(name):
    return (type(name) is bytes and 0 < len(name) <= NAME_MAX and b"/" not in name
            and b"\0" not in name and name not in (b".", b".."))


def _valid_path(path):
    """A path a symlink may hold or an unlinked node may show: what symlink() would accept."""
    return type(path) is bytes and 0 < len(path) < PATH_MAX and b"\0" not in path


def _validate(obj):
    """FsState from decoded tuples, or ValueError naming the first bad field."""
    def bad(why):
        raise ValueError(f"file-system state: {why}")

    if type(obj) is not tuple or len(obj) not in (6, 7):     # 6: written before locks
        bad("not a state record")
    fds, descs, cwd, umask, tmp, next_ino = obj[:6]
    locks = obj[6] if len(obj) == 7 else ()
    if type(tmp) is not tuple or not tmp:
        bad("no /tmp tree")
    inos, names, entries = set(), set(), []
    for i, entry in enumerate(tmp):
        if type(entry) is not tuple or len(entry) not in (8, 9):
            bad(f"/tmp entry {i} malformed")
        if len(entry) == 8:                     # written before atime was kept: atime = mtime
            entry += (entry[3],)
        entries.append(entry)
        ino, fmt, mode, mtime, ctime, parent, name, payload, atime = entry
        if not (_is_int(ino, 1, MAX_FILE) and fmt in (S_IFDIR, S_IFREG, S_IFLNK)
                and _is_int(mode, 0, 0o7777) and _is_int(mtime, -MAX_FILE - 1, MAX_FILE)
                and _is_int(atime, -MAX_FILE - 1, MAX_FILE)
                and _is_int(ctime, -MAX_FILE - 1, MAX_FILE) and _is_int(parent, -1, i - 1)):
            bad(f"/tmp entry {i} has a bad field")
        if ino in inos:
            bad(f"/tmp entry {i} repeats inode {ino}")
        inos.add(ino)
        if (fmt == S_IFDIR) != (payload is None) or (payload is not None and type(payload) is not bytes):
            bad(f"/tmp entry {i}: contents do not match its type")
        if fmt == S_IFLNK and not _valid_path(payload):
            bad(f"/tmp entry {i}: a symlink target must be 1 to {PATH_MAX - 1} bytes without NUL")
        if i == 0 and (fmt != S_IFDIR or parent != -1):
            bad("/tmp root is not a directory")
        if parent >= 0:
            if tmp[parent][1] != S_IFDIR:
                bad(f"/tmp entry {i} is inside a non-directory")
            if not _valid_name(name) or (parent, name) in names:
                bad(f"/tmp entry {i} has a bad or repeated name")
            names.add((parent, name))
        elif not (name == b"" if i == 0 else _valid_path(name)):
            bad(f"/tmp entry {i} (unlinked) has a bad former path")
    tmp = tuple(entries)

    def ref(r, what):
        if type(r) is not tuple or len(r) != 2:
            bad(f"{what}: malformed reference")
        kind, value = r
        if kind == "t" and _is_int(value, 0, len(tmp) - 1):
            return r
        if kind == "c" and value in ("stdin", "stdout", "stderr"):
            return r
        if kind == "f" and _is_int(value, 0, (1 << 31) - 1):
            return r
        if kind == "p" and type(value) is bytes and len(value) < PATH_MAX and (
                value == b"" or (value[:1] == b"/" and all(map(_valid_name, value[1:].split(b"/"))))
                and not value.startswith(b"/proc/self/fd/")):       # those are "f" references
            return r
        bad(f"{what}: bad reference {r!r}"[:200])

    if type(descs) is not tuple:
        bad("descriptions malformed")
    for i, d in enumerate(descs):
        if type(d) is not tuple or len(d) != 4:
            bad(f"description {i} malformed")
        r, flags, offset, data = d
        ref(r, f"description {i}")
        if not (_is_int(flags, 0, 0xFFFFFFFF) and _is_int(offset, 0, MAX_FILE)
                and (data is None or type(data) is bytes)):
            bad(f"description {i} has a bad field")
        # What a read, lseek or stat of it will need (fs.FileSystem._check_desc checks the rest
        # against the file system it is put back into).
        if (r[0] == "p" and r[1] in SYNTHESIZED_FILES) != (data is not None) and not (
                r[0] == "p" and r[1] in SYNTHESIZED_UNLESS_MAPPED):
            bad(f"description {i}: contents only, and always, for a synthesized file")
        if not flags & O_PATH:
            fmt = tmp[r[1]][1] if r[0] == "t" else S_IFLNK if r[0] == "f" else None
            if flags & O_ACCMODE == O_ACCMODE or (fmt == S_IFLNK) or (
                    fmt == S_IFDIR and flags & O_ACCMODE != O_RDONLY):
                bad(f"description {i}: access mode {flags & O_ACCMODE} on a "
                    f"{'symlink' if fmt == S_IFLNK else 'directory' if fmt == S_IFDIR else 'file'}")
    if type(fds) is not tuple:
        bad("fd table malformed")
    seen = set()
    for entry in fds:
        if (type(entry) is not tuple or len(entry) != 3 or not _is_int(entry[0], 0, (1 << 31) - 1)
                or not _is_int(entry[1], 0, len(descs) - 1) or type(entry[2]) is not bool
                or entry[0] in seen):
            bad(f"fd entry {entry!r} is bad"[:200])
        seen.add(entry[0])
    ref(cwd, "cwd")
    if (cwd[0] == "t" and tmp[cwd[1]][1] != S_IFDIR) or cwd[0] in ("c", "f"):
        bad("cwd is not a directory")
    if not _is_int(umask, 0, 0o777) or not _is_int(next_ino, 0, 1 << 62):
        bad("bad umask or inode counter")
    # Each lock's owner is a description an fd holds; fs.FileSystem.reset takes them one by one
    # as requests (access mode, conflicts), so here only their form and number.
    if type(locks) is not tuple or len(locks) > MAX_LOCKS:
        bad("locks malformed or too many")
    in_table = {entry[1] for entry in fds}
    for entry in locks:
        if (type(entry) is not tuple or len(entry) != 5 or entry[0] not in (LOCK_POSIX, LOCK_OFD, LOCK_FLOCK)
                or type(entry[0]) is not int or not _is_int(entry[1], 0, len(descs) - 1)
                or entry[1] not in in_table or not _is_int(entry[2], 0, 1)
                or not _is_int(entry[3], 0, MAX_FILE) or not _is_int(entry[4], entry[3], MAX_FILE)
                or (entry[0] == LOCK_FLOCK and entry[3:] != (0, 0))):
            bad(f"lock {entry!r} is bad"[:200])
    return FsState(fds, descs, cwd, umask, tmp, next_ino, locks)
