"""The snapshot container: one file format for both personalities' snapshots (after Firecracker's
`snapshot` crate and its `Persist` trait).

A snapshot file is a header, a table of named sections, the sections, and the memory image
(all integers little-endian):

    offset 0     HEADER (48 bytes): magic b"WHPFSNPC", format major and minor (u16 each), the
                 personality ("sdk" or "linux", NUL-padded to 8 bytes), header size (u32),
                 memory size (u64), section count, the extent limit the image was written with,
                 architecture (1: x86-64), flags (0) (u32 each)
    48           the section table: one SECTION (32 bytes) per section: name (NUL-padded to 8
                 bytes), offset, length, CRC-32, the section's own version, 0
    ...          a CRC-32 of the header and table
    header size  the component sections, in table order, back to back: each is one component's
                 encode() (its name and version in the table), then "pages": the bitmap of the
                 pages the image stores, one bit a page, uint64 words
    (64 KiB      "image": the memory image, memory-size bytes, at the first 64 KiB boundary after
    aligned)     "pages" (Windows maps file views only there). Only its extents (runs of stored
                 pages, merged across the smallest gaps until at most the header's extent limit
                 remain: extents() of the bitmap, so the file need not list them) are written; the
                 rest is a hole, so the file is sparse. Its CRC-32 covers the extents' bytes in
                 order, and a page inside an extent that the bitmap calls zero must be zero.

Version policy: a file of this format's major and a minor up to this one's is read (an older
minor's missing pieces get their defaults); anything else is refused saying which whpfast made
it. Files of the formats before the container (magic b"WHPFSNAP", the SDK's, and b"WHPFLNX1",
the Linux personality's) are refused with "made by an older whpfast: make it again". Each
section's version is its component's: a component reads the versions up to its own.

Everything read is untrusted: the header, every offset, length (each section has a size cap),
checksum and version is checked here before any section is handed to its component, whose
decode() checks every field (a ValueError saying what is wrong), and the caller's `bad` turns
every problem into its personality's SnapshotError.

Also here, for both personalities: extents(), writing a sparse file atomically, and the image's
load and copy-on-write mapping (load_image, map_image)."""

import json
import os
import stat
import struct
import threading
import weakref
import zlib
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import _pages, backend
from ..errors import SnapshotError
from .files import shareable

PAGE = 4096
MAGIC = b"WHPFSNPC"
MAJOR, MINOR = 1, 0
OLD_MAGICS = (b"WHPFSNAP", b"WHPFLNX1")     # the formats before the container
KINDS = ("sdk", "linux")
HEADER = struct.Struct("<8sHH8sIQIIII")     # magic, major, minor, kind, header size, memory
assert HEADER.size == 48                    # size, sections, extent limit, architecture, flags
SECTION = struct.Struct("<8sQQIHH")         # name, offset, length, CRC-32, version, reserved
MAX_SECTIONS = 16
MAX_MEMORY = 64 << 30
MIN_MEMORY = 1 << 20
MAX_EXTENTS = 4096          # the largest extent limit a file may declare
IMAGE_ALIGN = 65536         # Windows maps file views only at multiples of its allocation granularity
ARCH_X86_64 = 1
IMAGE_VERSION = 1           # the "pages" and "image" sections' version


def words_for(pages: int) -> int:
    return (pages + 63) // 64


class Component:
    """One named, versioned piece of a snapshot's state in a file: encode() gives its section's
    bytes, decode() reads them back from a file (untrusted input: every field checked, a
    ValueError saying what is wrong). `reads`: the oldest section version decode() reads;
    `version` is what encode() writes (and the newest read); `max_size` caps the section."""

    name = ""
    version = 1
    reads = 1
    max_size = 1 << 20

    def encode(self, value: Any) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes, version: int, context: Any) -> Any:
        raise NotImplementedError


class JsonComponent(Component):
    """A component stored as JSON (sorted keys, compact); check(value, version, context) gives
    the decoded value or raises ValueError."""

    def __init__(self, name: str, check: Callable[[Any, int, Any], Any], *, version: int = 1,
                 max_size: int = 1 << 20, dump: Optional[Callable[[Any], Any]] = None) -> None:
        self.name, self.version, self.max_size = name, version, max_size
        self._check, self._dump = check, dump

    def encode(self, value: Any) -> bytes:
        if self._dump is not None:
            value = self._dump(value)
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

    def decode(self, data: bytes, version: int, context: Any) -> Any:
        try:
            value = json.loads(data)
        except (ValueError, RecursionError) as e:      # RecursionError: nesting too deep
            raise ValueError(f"{self.name} is not JSON: {str(e)[:200]}") from None
        return self._check(value, version, context)


class BytesComponent(Component):
    """A component whose value is its bytes (the vCPU state: the backend checks those)."""

    def __init__(self, name: str, max_size: int) -> None:
        self.name, self.max_size = name, max_size

    def encode(self, value: Any) -> bytes:
        return bytes(value)

    def decode(self, data: bytes, version: int, context: Any) -> Any:
        return data


class ImageAccessors:
    """The public accessors both personalities' snapshots share over what the warm-start core
    (core/warm.py) reads of them: _image_view, _nonzero, _state, and a loaded one's _file and
    _extents."""

    _image_view: Any
    _nonzero: Any
    _state: Dict[str, bytes]
    _file: Optional[BinaryIO]
    _extents: Optional[List[Tuple[int, int]]]

    @property
    def image(self) -> memoryview:
        """The whole memory image (memory_size bytes; read-only where it is a file's)."""
        return self._image_view

    @property
    def nonzero(self) -> Any:
        """The image's non-zero pages: one bit a page, uint64 words."""
        return self._nonzero

    @property
    def vcpu_state(self) -> Dict[str, bytes]:
        """The vCPU state: the backend's raw register structs by part (backend STATE_PARTS)."""
        return self._state

    @property
    def file(self) -> Optional[BinaryIO]:
        """The open file a loaded snapshot's image lies in, else None."""
        return self._file

    @property
    def extents(self) -> Optional[List[Tuple[int, int]]]:
        """A loaded snapshot's stored runs of pages (first, count) in its file, else None."""
        return self._extents


# -- writing ------------------------------------------------------------------------------------

def write(path: str, kind: str, memory_size: int, sections: Sequence[Tuple[Component, Any]],
          view: Any, stored: Any, max_extents: int) -> str:
    """Writes a snapshot file atomically: each (component, value) encoded into its section, then
    the bitmap of the pages stored (`stored`) and the image `view`'s extents of them."""
    pages = memory_size // PAGE
    extents_ = extents(stored, pages, max_extents)
    body = [(c.name, c.version, c.encode(value)) for c, value in sections]
    body.append(("pages", IMAGE_VERSION, np.ascontiguousarray(stored).tobytes()))
    header_size = HEADER.size + SECTION.size * (len(body) + 1) + 4
    table, offset = [], header_size
    for name, version, data in body:
        table.append(SECTION.pack(name.encode(), offset, len(data), zlib.crc32(data), version, 0))
        offset += len(data)
    image_offset = image_offset_after(offset)
    table.append(SECTION.pack(b"image", image_offset, memory_size, extents_crc(view, extents_),
                              IMAGE_VERSION, 0))
    header = HEADER.pack(MAGIC, MAJOR, MINOR, kind.encode(), header_size, memory_size, len(table),
                         max_extents, ARCH_X86_64, 0) + b"".join(table)
    header += struct.pack("<I", zlib.crc32(header))
    return write_sparse(path, header + b"".join(data for _, _, data in body), view, extents_,
                        image_offset, memory_size)


def image_offset_after(end: int) -> int:
    """Where the image starts: the first 64 KiB boundary at or after `end`."""
    return -(-end // IMAGE_ALIGN) * IMAGE_ALIGN


def write_sparse(path, head, view, extents, image_offset, memory_size):
    """Writes a snapshot file: `head` (everything before the image), then the image's extents
    at image_offset, the rest a hole, so the file is sparse."""
    def fill(f):
        f.write(head)
        for first, count in extents:
            f.seek(image_offset + first * PAGE)
            f.write(view[first * PAGE:(first + count) * PAGE])
        f.truncate(image_offset + memory_size)
    return write_atomic(path, fill)


def write_atomic(path, fill):
    """A new file written by fill(file), fsynced, then renamed over path: a file that live
    sandboxes map is never written, and nobody sees a partial one."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# -- reading ------------------------------------------------------------------------------------

class Container:
    """A snapshot file read and checked up to its components' bytes: the header, the table,
    each section's size cap, place and checksum, the page bitmap, the image's place and its
    extents. The image itself is checked by check_image (after the caller has mapped it)."""

    def __init__(self, path, file, st, kind, minor, memory_size, max_extents, sections, stored,
                 image_offset, image_crc, prefix):
        self.path, self.file, self.stat = path, file, st
        self.kind, self.minor, self.memory_size, self.max_extents = kind, minor, memory_size, max_extents
        self._sections = sections           # name -> (version, bytes)
        self.stored = stored                # uint64 bitmap of the pages the image stores
        self.extents = extents(stored, memory_size // PAGE, max_extents)
        self.image_offset, self.image_crc = image_offset, image_crc
        self.prefix = prefix                # the bytes before the image (the cache compares them)

    def decode(self, component: Component, context: Any = None) -> Any:
        """The component's value from its section (ValueError when it does not check)."""
        version, data = self._sections[component.name]
        return component.decode(data, version, context)


def open_file(path: str) -> BinaryIO:
    """The snapshot file at path, open for reading (SnapshotError if it cannot be, or is no
    regular file)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore it)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                     | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise SnapshotError(f"cannot open snapshot {path!r}: {e.strerror}") from e
    f = os.fdopen(fd, "rb", buffering=0)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotError(f"snapshot {path!r} is not a regular file")
    except BaseException:
        f.close()
        raise
    return f


def kind_of(head: bytes) -> str:
    """The personality ("sdk", "linux") of a file whose first bytes are `head`; SnapshotError
    saying why (why_not) when it is not a container file this whpfast reads."""
    why = why_not(head)
    kind = head[12:20].rstrip(b"\0").decode("ascii", "replace")
    if why is None and kind not in KINDS:
        why = f"a snapshot of unknown kind {kind!r}"
    if why:
        raise SnapshotError(why)
    return kind


def why_not(head: bytes) -> Optional[str]:
    """Why a file starting with `head` is not a container file this whpfast reads, or None."""
    magic = head[:8]
    if magic in OLD_MAGICS:
        return "made by an older whpfast: make it again (its format predates the snapshot container)"
    if magic != MAGIC:
        return f"not a whpfast snapshot (magic {magic!r})"
    if len(head) < 12:
        return "truncated header"
    major, minor = struct.unpack_from("<HH", head, 8)
    if major != MAJOR or minor > MINOR:
        age = "an older" if major < MAJOR else "a newer"
        return (f"made by {age} whpfast (format {major}.{minor}; this one reads {MAJOR}.0 to "
                f"{MAJOR}.{MINOR}): make it again with this one")
    return None


def read(f: BinaryIO, path: str, kind: str, components: Sequence[Component], max_extents: int,
         bad: Callable[[str], Exception]) -> Container:
    """Reads and checks the container of snapshot file f (open, a regular file) of personality
    `kind` whose sections are `components`, in order, then "pages" and "image"; `bad(why)` is
    the error raised. Nothing is mapped."""
    fd = f.fileno()
    st = os.fstat(fd)
    size = st.st_size
    head = os.pread(fd, HEADER.size, 0)
    why = why_not(head)
    if why:
        raise bad(why)
    if len(head) < HEADER.size:
        raise bad(f"truncated: {size} bytes, the header alone needs {HEADER.size}")
    (_, _, minor, raw_kind, header_size, memory_size, n, limit, arch, flags) = HEADER.unpack(head)
    names = [c.name for c in components] + ["pages", "image"]
    if n != len(names) or header_size != HEADER.size + SECTION.size * n + 4 or n > MAX_SECTIONS:
        raise bad(f"{n} sections (header size {header_size}); a {kind} snapshot has {len(names)}")
    rest = os.pread(fd, header_size - HEADER.size, HEADER.size)
    if len(rest) != header_size - HEADER.size:
        raise bad("truncated header")
    if zlib.crc32(head + rest[:-4]) != struct.unpack("<I", rest[-4:])[0]:
        raise bad("header checksum mismatch (the header is corrupt)")
    if raw_kind.rstrip(b"\0") != kind.encode():
        raise bad(f"a {raw_kind.rstrip(bytes(1)).decode('ascii', 'replace')!r} snapshot, not a {kind} one")
    if arch != ARCH_X86_64:
        raise bad(f"architecture {arch}, this machine is x86-64 ({ARCH_X86_64})")
    if flags:
        raise bad(f"flags {flags:#x} unsupported")
    if not MIN_MEMORY <= memory_size <= MAX_MEMORY or memory_size % PAGE:
        raise bad(f"memory size {memory_size} is absurd (must be a multiple of {PAGE} in 1 MiB..64 GiB)")
    if not 1 <= limit <= max_extents:
        raise bad(f"extent limit {limit} (this whpfast allows 1..{max_extents})")
    pages = memory_size // PAGE
    caps = {c.name: c.max_size for c in components}
    caps["pages"] = words_for(pages) * 8
    by_name = {c.name: c for c in components}
    table, expected = {}, header_size
    for i, name in enumerate(names):
        raw_name, offset, length, crc, version, reserved = SECTION.unpack_from(rest, i * SECTION.size)
        if raw_name.rstrip(b"\0") != name.encode():
            raise bad(f"section #{i} is {raw_name.rstrip(bytes(1))!r}, expected {name!r}")
        if name == "image":
            expected = image_offset_after(expected)
            if length != memory_size:
                raise bad(f"the image has {length} bytes, memory {memory_size}")
        elif not length <= caps[name]:
            raise bad(f"section {name!r} has {length} bytes (limit {caps[name]})")
        if offset != expected or reserved:
            raise bad(f"section {name!r} at {offset} ({length} bytes) is out of place")
        component = by_name.get(name)
        lo, hi = (component.reads, component.version) if component else (IMAGE_VERSION, IMAGE_VERSION)
        if not lo <= version <= hi:
            raise bad(f"section {name!r} has version {version}; this whpfast reads {lo}..{hi}: "
                      f"made by {'an older' if version < lo else 'a newer'} whpfast, make it again")
        table[name] = (version, offset, length, crc)
        expected = offset + length
    if size != expected:
        raise bad(f"truncated or padded: {size} bytes, expected {expected}")

    sections = {}
    for name in names[:-1]:
        version, offset, length, crc = table[name]
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise bad(f"section {name!r} could not be read")
        if zlib.crc32(data) != crc:
            raise bad(f"section {name!r} checksum mismatch")
        sections[name] = (version, data)
    bitmap = sections.pop("pages")[1]
    if len(bitmap) != words_for(pages) * 8:
        raise bad(f"page bitmap has {len(bitmap)} bytes, expected {words_for(pages) * 8}")
    stored = np.frombuffer(bitmap, dtype=np.uint64).copy()
    if pages % 64 and int(stored[-1]) >> (pages % 64):
        raise bad("page bitmap marks pages past the end of memory")
    _, image_offset, _, image_crc = table["image"]
    _, pages_offset, pages_length, _ = table["pages"]
    prefix = head + rest + os.pread(fd, pages_offset + pages_length - header_size, header_size)
    return Container(path, f, st, kind, minor, memory_size, limit, sections, stored, image_offset,
                     image_crc, prefix)


def check_image(view: Any, container: Container, bad: Callable[[str], Exception]) -> None:
    """The image (as loaded by load_image) against the file's checksum, and every page inside
    an extent that the bitmap calls zero checked zero: extents are mapped from the file whole,
    and a guest must never see the file's bytes where the bitmap says zero."""
    ext = container.extents
    if extents_crc(view, ext) != container.image_crc:
        raise bad("memory image checksum mismatch (the image is corrupt)")
    bits = np.unpackbits(container.stored.view(np.uint8), bitorder="little")
    for first, count in ext:
        for page in (np.flatnonzero(bits[first:first + count] == 0) + first).tolist():
            if np.frombuffer(view, np.uint64, PAGE // 8, page * PAGE).any():
                raise bad(f"page {page} is marked zero but holds data")


class Cache:
    """Loaded snapshots by file identity: a file is validated once per version. A rewrite in
    place (even with size and mtime put back) changes its ctime and the bytes before the image
    (compared on every hit), either of which makes the next load validate it again."""

    def __init__(self) -> None:
        self._loaded = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get(self, f: BinaryIO, load: Callable[[], Any], prefix: Callable[[Any], bytes]) -> Any:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            value = self._loaded.get(key)
            if value is not None:
                want = prefix(value)
                if os.pread(f.fileno(), len(want), 0) == want:
                    return value
            value = load()
            self._loaded[key] = value
            return value


# -- crafted files (tests, the fuzzer) -----------------------------------------------------------

def sections_of(data: bytes) -> Dict[str, bytes]:
    """The sections of a container file's bytes, by name, unchecked (for tests and the fuzzer)."""
    n = HEADER.unpack_from(data)[6]
    out = {}
    for i in range(n):
        name, offset, length, *_ = SECTION.unpack_from(data, HEADER.size + i * SECTION.size)
        out[name.rstrip(b"\0").decode()] = bytes(data[offset:offset + length])
    return out


def rebuild(data: bytes, changes: Dict[str, Optional[bytes]], image: Optional[bytes] = None) -> bytes:
    """A container file's bytes with sections replaced (a None drops the section) and, given,
    a new image (stored pages at their offsets), every offset and checksum made right: a crafted
    file, not a corrupt one (for tests and the fuzzer)."""
    fields = list(HEADER.unpack_from(data))
    entries = [list(SECTION.unpack_from(data, HEADER.size + i * SECTION.size)) for i in range(fields[6])]
    img = entries.pop()
    old_image = bytes(data[img[1]:img[1] + img[2]]) if image is None else image
    body = []
    for e in entries:
        name = e[0].rstrip(b"\0").decode()
        section = changes.get(name, bytes(data[e[1]:e[1] + e[2]]))
        if section is not None:
            body.append([e[0], section, e[4]])
    header_size = HEADER.size + SECTION.size * (len(body) + 1) + 4
    table, offset = [], header_size
    for name, section, version in body:
        table.append(SECTION.pack(name, offset, len(section), zlib.crc32(section), version, 0))
        offset += len(section)
    image_offset = image_offset_after(offset)
    stored = np.frombuffer(next(s for n, s, _ in body if n.rstrip(b"\0") == b"pages"), dtype=np.uint64)
    ext = extents(stored, len(old_image) // PAGE, fields[7])
    crc = extents_crc(memoryview(old_image), ext)
    table.append(SECTION.pack(img[0], image_offset, len(old_image), crc, img[4], 0))
    fields[4], fields[6] = header_size, len(table)
    header = HEADER.pack(*fields) + b"".join(table)
    header += struct.pack("<I", zlib.crc32(header))
    out = header + b"".join(s for _, s, _ in body)
    return out + bytes(image_offset - len(out)) + old_image


# -- the image ------------------------------------------------------------------------------------

def extents_crc(view, extents):
    """CRC-32 of the image bytes the extents cover, in order: what the file stores."""
    crc = 0
    for first, count in extents:
        crc = zlib.crc32(view[first * PAGE:(first + count) * PAGE], crc)
    return crc


def extents(nonzero, pages, max_extents=MAX_EXTENTS):
    """Runs of non-zero pages, merged across the smallest gaps until at most max_extents remain
    (gap pages are stored as zeros: a few more bytes on disk for far fewer mappings)."""
    bits = np.unpackbits(nonzero.view(np.uint8), bitorder="little")[:pages].astype(np.int8)
    if not bits.any():
        return [(0, 1)]        # an all-zero image: one page, so the file has one extent
    edges = np.flatnonzero(np.diff(np.concatenate(([0], bits, [0]))))
    runs = [[int(a), int(b - a)] for a, b in zip(edges[::2], edges[1::2])]
    gap = 1
    while len(runs) > max_extents:
        merged = [runs[0]]
        for first, count in runs[1:]:
            prev = merged[-1]
            if first - (prev[0] + prev[1]) <= gap:
                prev[1] = first + count - prev[0]
            else:
                merged.append([first, count])
        runs, gap = merged, gap * 2
    return [tuple(r) for r in runs]


def load_image(file: BinaryIO, image_offset: int, memory_size: int,
               extents: List[Tuple[int, int]], writable: bool = False) -> Any:
    """A snapshot file's image section (at image_offset, its stored pages within extents) as
    memory. A file only root and this process's owner can write (core.files.shareable) is
    mapped: read-only as it lies, or (writable) as guest-sized memory with the extents mapped
    over it copy-on-write where the backend can (KVM). Any other file is read into private
    memory and never mapped, nor are sandboxes' pages mapped from it (map_image): another user
    could truncate it, and the host's next access to a mapped page past the end (a restore's
    copy, a fault) would be a SIGBUS that kills the process and every sandbox in it."""
    impl = backend.impl
    mappable = shareable(os.fstat(file.fileno()))
    if mappable and not writable:
        return impl.FileMapping(file.fileno(), image_offset, memory_size)
    image = impl.GuestMemory(memory_size)
    try:
        if mappable and backend.capabilities.file_overlay:
            for first, count in extents:
                image.overlay_file(file.fileno(), image_offset + first * PAGE, first * PAGE, count * PAGE)
        else:
            with memoryview(image) as view:
                for first, count in extents:
                    _read_into(file, view[first * PAGE:(first + count) * PAGE], image_offset + first * PAGE)
    except BaseException:
        image.close()
        raise
    return image


def _read_into(file, view, offset):
    file.seek(offset)
    done = 0
    while done < len(view):
        n = file.readinto(view[done:])
        if not n:
            raise SnapshotError(f"the snapshot file ended at {offset + done} bytes while it was read "
                                f"(truncated meanwhile?)")
        done += n


def map_image(memory: Any, file: Optional[BinaryIO], image_offset: Optional[int],
              extents: Optional[List[Tuple[int, int]]], image_view: Any, nonzero: Any) -> None:
    """Fills fresh (all-zero) guest memory with a snapshot image: where the image lies in an open
    file (at image_offset, its non-zero pages within extents) that may be mapped (see
    load_image) and the backend can (KVM), the extents are mapped copy-on-write from the file,
    so sandboxes made from one file share its page cache; otherwise the non-zero pages are
    copied from image_view. Used by Sandbox and LinuxSandbox alike."""
    if file is not None and backend.capabilities.file_overlay and shareable(os.fstat(file.fileno())):
        for first, count in extents:
            memory.overlay_file(file.fileno(), image_offset + first * PAGE, first * PAGE, count * PAGE)
    else:
        _pages.restore(memoryview(memory), image_view, nonzero, nonzero)
