"""Snapshots: a sandbox's memory and complete vCPU state at one moment, in memory or on disk.

Disk format (all integers little-endian):

    offset 0     header, 144 bytes (HEADER below), with a CRC-32 of itself
    144          metadata: JSON (guest identity and exports, memory layout, files, extents)
    ...          vCPU state: the backend's raw register structs, concatenated
    ...          non-zero page bitmap: one bit per page, uint64 words
    image_offset (64 KiB aligned) the memory image, memory_size bytes. Only the extents (runs of
                 non-zero pages) are written; everything else is a hole, so the file is sparse.

Every section has a CRC-32, and the image's CRC covers the bytes of all extents. Loading checks
every field, length and checksum before anything is mapped into a guest: corruption becomes a
SnapshotError that says what is wrong. A sandbox cold-started from a file maps the extents
MAP_PRIVATE straight from it (copy-on-write), so sandboxes made from one file share its page cache
and pay privately only for the pages they write; pages outside the extents come from anonymous
memory and are zero whatever the file holds. save() writes a new file and renames it over the
old one: a file that live sandboxes map is never written.

Snapshot files are immutable once written: sandboxes map their pages, so a file changed in place
changes what those sandboxes see. A file that a user other than root or this process's owner can
write is never mapped (load_image): it is read into private memory once, at load. Loading validates a file once per version; a rewrite in place
(even with size and mtime put back) changes its ctime and the bytes before the image, either of
which makes the next load validate it again.
"""

import json
import os
import stat
import struct
import threading
import weakref
import zlib
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import numpy as np

from . import _pages, abi, backend, cpu, elf, machine
from .core.files import shareable
from .errors import SnapshotError
from ._typing import StrPath

PAGE = abi.PAGE
MAGIC = b"WHPFSNAP"
FORMAT_VERSION = 3      # 2: the KVM vCPU state holds the whole XSAVE area (was KVM_GET_FPU's)
                        # 3: the metadata records the CPU identity ("cpu", see whpfast/cpu.py)
ARCH_X86_64 = 1
HEADER = struct.Struct("<8sIIII 12Q 5I 4x")
assert HEADER.size == 144
MAX_MEMORY = 64 << 30
MAX_META = 1 << 20
MAX_STATE = 1 << 16
MAX_EXTENTS = 4096
MAX_EXPORTS = 4096
MAX_REGIONS = 64
MAX_PATH = 4096
MAX_IO_BUFFER = 256 << 20
MAX_TOP = machine.MAX_TOP       # RAM and file mappings: what the page tables can map
IMAGE_ALIGN = 65536     # Windows maps file views only at multiples of its allocation granularity

impl = backend.impl
STATE_PARTS = impl.STATE_PARTS


def words_for(pages):
    return (pages + 63) // 64


class Snapshot:
    """A sandbox's memory and complete vCPU state. Restore it any number of times, into the
    sandbox that took it or into sandboxes made from it (Sandbox.from_snapshot)."""

    def __init__(self, image: Any, nonzero: "np.ndarray[Any, np.dtype[np.uint64]]",
                 state: Dict[str, bytes], meta: Dict[str, Any], *, path: Optional[str] = None,
                 file: Optional[BinaryIO] = None, extents: Optional[List[Tuple[int, int]]] = None,
                 image_offset: Optional[int] = None) -> None:
        self._image = image                    # a mapping of memory_size bytes: the memory image
        self._image_view = memoryview(image)
        self._nonzero = nonzero                # uint64 bitmap of the image's non-zero pages
        self._state = state                    # {part: bytes}, backend specific
        self.meta = meta
        self.path = path
        self._file = file                      # open file the extents are mapped from
        if file is not None:
            weakref.finalize(self, file.close)  # closed with the snapshot, never left to the GC
        self._extents = extents
        self._image_offset = image_offset      # where the image starts in that file
        self.nonzero_pages = _pages.count_bits(nonzero)

    @property
    def memory_size(self) -> int:
        return self.meta["layout"]["memory_size"]

    def __repr__(self) -> str:
        where = f" from {self.path!r}" if self.path else ""
        return (f"<whpfast.Snapshot{where} of {self.meta['guest']['path']!r}, "
                f"{self.memory_size >> 20} MiB, {self.nonzero_pages} non-zero pages>")

    def compatible_with(self, layout_dict: Dict[str, Any], guest_digest: str) -> Optional[str]:
        """Why this snapshot cannot go into a sandbox with that layout and guest, or None."""
        if self.meta["guest"]["digest"] != guest_digest:
            return (f"it was taken of guest {self.meta['guest']['path']!r} "
                    f"(sha256 {self.meta['guest']['digest'][:12]}...), not this sandbox's guest")
        if self.meta["layout"] != layout_dict:
            return "its memory layout (memory size, buffers, stack, files) differs from this sandbox's"
        return cpu.incompatibility(self.meta["cpu"])

    # -- disk ---------------------------------------------------------------------------------

    def save(self, path: StrPath) -> str:
        """Writes the snapshot to path atomically: a new file, fsynced, then renamed over path."""
        path = os.fspath(path)
        extents = _extents(self._nonzero, self.memory_size // PAGE)
        meta = dict(self.meta, extents=extents)
        meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        state_bytes = b"".join(self._state[p] for p in STATE_PARTS)
        bitmap_bytes = self._nonzero.tobytes()
        meta_off = HEADER.size
        state_off = meta_off + len(meta_bytes)
        bitmap_off = state_off + len(state_bytes)
        image_off = -(-(bitmap_off + len(bitmap_bytes)) // IMAGE_ALIGN) * IMAGE_ALIGN
        view = self._image_view
        image_crc = extents_crc(view, extents)
        fields = [MAGIC, FORMAT_VERSION, ARCH_X86_64, HEADER.size, 0,
                  self.memory_size, self.memory_size // PAGE,
                  meta_off, len(meta_bytes), state_off, len(state_bytes), bitmap_off, len(bitmap_bytes),
                  image_off, self.memory_size, len(extents), 0,
                  zlib.crc32(meta_bytes), zlib.crc32(state_bytes), zlib.crc32(bitmap_bytes), image_crc, 0]
        header = bytearray(HEADER.pack(*fields))
        struct.pack_into("<I", header, _HEADER_CRC_OFFSET, zlib.crc32(header))
        return write_sparse(path, bytes(header) + meta_bytes + state_bytes + bitmap_bytes, view,
                            extents, image_off, self.memory_size)

    @classmethod
    def load(cls, path: StrPath) -> "Snapshot":
        """Reads and validates a snapshot file; raises SnapshotError on any problem. Loading the
        same unchanged file again returns the same Snapshot (validated once, mapped once)."""
        path = os.fspath(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore it)
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                         | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise SnapshotError(f"cannot open snapshot {path!r}: {e.strerror}") from e
        f = os.fdopen(fd, "rb", buffering=0)
        try:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SnapshotError(f"snapshot {path!r} is not a regular file")
            # What an in-place rewrite cannot keep: the ctime (a utime() that puts the mtime back
            # sets it), and the bytes before the image, compared on every hit.
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with _loaded_lock:
                snap = _loaded.get(key)
                if snap is not None and os.pread(f.fileno(), len(snap._prefix), 0) != snap._prefix:
                    snap = None
                if snap is None:
                    snap = cls._load(f, path)
                    _loaded[key] = snap
                    return snap
            f.close()
            return snap
        except BaseException:
            f.close()
            raise

    @classmethod
    def _load(cls, f, path):
        def bad(why):
            return SnapshotError(f"snapshot {path!r} is unusable: {why}")

        file_size = os.fstat(f.fileno()).st_size
        raw = os.pread(f.fileno(), HEADER.size, 0)
        if len(raw) < HEADER.size:
            raise bad(f"truncated: {file_size} bytes, the header alone needs {HEADER.size}")
        (magic, version, arch, header_size, flags, memory_size, pages, meta_off, meta_len,
         state_off, state_len, bitmap_off, bitmap_len, image_off, image_len, n_extents, _reserved,
         meta_crc, state_crc, bitmap_crc, image_crc, header_crc) = HEADER.unpack(raw)
        if magic != MAGIC:
            raise bad(f"not a whpfast snapshot (magic {magic!r})")
        if version != FORMAT_VERSION:
            raise bad(f"format version {version}; this whpfast reads version {FORMAT_VERSION}")
        zeroed = bytearray(raw)
        struct.pack_into("<I", zeroed, _HEADER_CRC_OFFSET, 0)
        if zlib.crc32(zeroed) != header_crc:
            raise bad("header checksum mismatch (the header is corrupt)")
        if arch != ARCH_X86_64:
            raise bad(f"architecture {arch}, this machine is x86-64 ({ARCH_X86_64})")
        if header_size != HEADER.size or flags != 0 or _reserved != 0:
            raise bad(f"header size {header_size} / flags {flags:#x} / reserved {_reserved:#x} unsupported")
        if not (1 << 20) <= memory_size <= MAX_MEMORY or memory_size % PAGE:
            raise bad(f"memory size {memory_size} is absurd (must be a multiple of {PAGE} in 1 MiB..64 GiB)")
        if pages != memory_size // PAGE or image_len != memory_size:
            raise bad("page count or image length disagrees with the memory size")
        if not 0 < n_extents <= MAX_EXTENTS:
            raise bad(f"{n_extents} extents (limit {MAX_EXTENTS})")
        sections = [("metadata", meta_off, meta_len, MAX_META), ("vCPU state", state_off, state_len, MAX_STATE),
                    ("page bitmap", bitmap_off, bitmap_len, words_for(pages) * 8)]
        end = HEADER.size
        for name, off, length, limit in sections:
            if off != end or not 0 < length <= limit:
                raise bad(f"{name} at {off} ({length} bytes) is out of place or too large")
            end = off + length
        if bitmap_len != words_for(pages) * 8:
            raise bad(f"page bitmap has {bitmap_len} bytes, expected {words_for(pages) * 8}")
        if image_off % IMAGE_ALIGN or image_off < end or image_off >= end + IMAGE_ALIGN:
            raise bad(f"image offset {image_off} is not the first 64 KiB boundary after the sections")
        if file_size != image_off + memory_size:
            raise bad(f"truncated or padded: {file_size} bytes, expected {image_off + memory_size}")

        def section(off, length, crc, name):
            data = os.pread(f.fileno(), length, off)
            if len(data) != length:
                raise bad(f"{name} could not be read")
            if zlib.crc32(data) != crc:
                raise bad(f"{name} checksum mismatch")
            return data

        meta_bytes = section(meta_off, meta_len, meta_crc, "metadata")
        state_bytes = section(state_off, state_len, state_crc, "vCPU state")
        bitmap_bytes = section(bitmap_off, bitmap_len, bitmap_crc, "page bitmap")
        try:
            meta = json.loads(meta_bytes)
        except (ValueError, RecursionError) as e:      # RecursionError: nesting too deep
            raise bad(f"metadata is not JSON: {str(e)[:200]}") from None
        try:
            check_meta(meta, memory_size, state_len)
            extents = [tuple(e) for e in meta["extents"]]
            state = _split_state(state_bytes, meta["state_sizes"])
        except ValueError as e:
            raise bad(f"metadata is inconsistent: {e}") from None
        why = cpu.incompatibility(meta["cpu"])      # before anything is mapped or runs
        if why:
            raise bad(why)
        nonzero = np.frombuffer(bytearray(bitmap_bytes), dtype=np.uint64)
        covered = np.zeros(words_for(pages) * 64, dtype=bool)
        last = 0
        for first, count in extents:
            if first < last or count <= 0 or first + count > pages:
                raise bad("extents are unordered, overlapping or outside the image")
            last = first + count
            covered[first:last] = True
        covered = np.packbits(covered, bitorder="little").view(np.uint64)
        if len(extents) != n_extents:
            raise bad("extent count disagrees with the header")
        if np.any(nonzero & ~covered):
            raise bad("the page bitmap marks non-zero pages that no extent stores")
        image = load_image(f, image_off, memory_size, extents)
        with memoryview(image) as view:
            crc = extents_crc(view, extents)
        if crc != image_crc:
            image.close()
            raise bad("memory image checksum mismatch (the image is corrupt)")
        snap = cls(image, nonzero, state, meta, path=path, file=f, extents=extents, image_offset=image_off)
        snap._prefix = os.pread(f.fileno(), bitmap_off + bitmap_len, 0)
        return snap

    def map_into(self, memory: Any) -> None:
        """Fills fresh guest memory with this snapshot's image: copy-on-write mappings of the
        file's extents when it came from a file (and the backend can: KVM), else copies of the
        non-zero pages."""
        map_image(memory, self._file, self._image_offset, self._extents, self._image_view, self._nonzero)


_HEADER_CRC_OFFSET = HEADER.size - 8


def load_image(file: BinaryIO, image_offset: int, memory_size: int,
               extents: List[Tuple[int, int]], writable: bool = False) -> Any:
    """A snapshot file's image section (at image_offset, its stored pages within extents) as
    memory, for Snapshot.load and the Linux snapshot's load alike. A file only root and this
    process's owner can write (core.files.shareable) is mapped: read-only as it lies, or
    (writable) as guest-sized memory with the extents mapped over it copy-on-write where the
    backend can (KVM). Any other file is read into private memory and never mapped, nor are
    sandboxes' pages mapped from it (map_image): another user could truncate it, and the host's
    next access to a mapped page past the end (a restore's copy, a fault) would be a SIGBUS that
    kills the process and every sandbox in it."""
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


# -- metadata validation: the JSON of a snapshot file is untrusted input ----------------------
# Every field is checked for its exact type (bool is not int), range and nesting, and unknown
# keys are refused, so a malformed file is a SnapshotError and nothing past here meets a
# surprise. A new metadata field needs its check here.

def _expect(value, kind, what):
    if type(value) is not kind:            # exact: True is not an int, 1.0 not an int
        raise ValueError(f"{what} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _int(value, what, lo=0, hi=1 << 64):
    _expect(value, int, what)
    if not lo <= value < hi:
        raise ValueError(f"{what} = {value} is outside {lo}..{hi - 1}")
    return value


def _str(value, what, max_len=MAX_PATH):
    _expect(value, str, what)
    if len(value) > max_len or "\0" in value:
        raise ValueError(f"{what} is longer than {max_len} characters or holds a NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} holds a lone surrogate") from None
    return value


def _list(value, what, length=None, max_len=None):
    _expect(value, list, what)
    if length is not None and len(value) != length:
        raise ValueError(f"{what} must have {length} items, has {len(value)}")
    if max_len is not None and len(value) > max_len:
        raise ValueError(f"{what} has {len(value)} items, at most {max_len} allowed")
    return value


def _dict(value, what, keys):
    _expect(value, dict, what)
    if set(value) != set(keys):
        raise ValueError(f"{what} must have the keys {sorted(keys)}, has {sorted(value)}")
    return value


def check_meta(meta, memory_size, state_len):
    """Checks a snapshot's metadata against what Sandbox.snapshot() writes; raises ValueError
    saying what is wrong."""
    _dict(meta, "metadata", ("backend", "abi", "cpu", "guest", "layout", "files", "state_sizes", "extents"))
    if meta["backend"] != backend.NAME:
        raise ValueError(f"taken with the {meta['backend']!r} backend, this is {backend.NAME!r}")
    if meta["abi"] != abi.ABI_VERSION or type(meta["abi"]) is not int:
        raise ValueError(f"guest ABI version {meta['abi']!r}, this whpfast speaks {abi.ABI_VERSION}")
    cpu.parse(meta["cpu"])

    guest = _dict(meta["guest"], "guest", ("path", "digest", "entry", "exports"))
    _str(guest["path"], "guest path")
    digest = _str(guest["digest"], "guest digest", 64)
    if len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise ValueError("guest digest is not a sha256 in hex")
    _int(guest["entry"], "guest entry", abi.IMAGE_BASE, elf.IMAGE_LIMIT)
    exports = _list(guest["exports"], "guest exports", max_len=MAX_EXPORTS)
    if not exports:
        raise ValueError("guest exports no functions")
    names, indexes = set(), set()
    for i, export in enumerate(exports):
        name, index, params, result = _list(export, f"export #{i}", 4)
        _str(name, f"export #{i} name", 255)
        _int(index, f"export {name!r} index", 0, MAX_EXPORTS)
        _str(params, f"export {name!r} parameters", abi.MAX_ARGS)
        _str(result, f"export {name!r} result", 1)
        if not name or not name.isascii() or name in names or index in indexes:
            raise ValueError(f"export #{i} has an empty, non-ASCII or repeated name or index")
        if any(p not in abi.SIGNATURE or p == "n" for p in params) or result not in abi.SIGNATURE:
            raise ValueError(f"export {name!r} has an invalid signature {params!r} -> {result!r}")
        names.add(name)
        indexes.add(index)

    layout = _dict(meta["layout"], "layout", ("memory_size", "cr3", "top", "page_tables", "regions", "files"))
    if _int(layout["memory_size"], "layout memory size") != memory_size:
        raise ValueError("layout memory size differs from the header's")
    _int(layout["cr3"], "cr3", PAGE, memory_size)
    if layout["cr3"] % PAGE:
        raise ValueError("cr3 is not page aligned")
    top = _int(layout["top"], "layout top", memory_size, MAX_TOP + 1)
    for i, v in enumerate(_list(layout["page_tables"], "page table location", 2)):
        _int(v, f"page table location [{i}]", 0, memory_size + 1)
    region_names = set()
    for i, region in enumerate(_list(layout["regions"], "regions", max_len=MAX_REGIONS)):
        name, gpa, size, *flags = _list(region, f"region #{i}", 6)
        _str(name, f"region #{i} name", 64)
        if name in region_names:
            raise ValueError(f"region {name!r} appears twice")
        region_names.add(name)
        _int(gpa, f"region {name!r} address", 0, memory_size)
        _int(size, f"region {name!r} size", PAGE, memory_size + 1)
        for flag in flags:
            _expect(flag, bool, f"region {name!r} flags")
    file_regions = _list(layout["files"], "file regions", max_len=abi.MAX_FILES)
    for i, region in enumerate(file_regions):
        name, gpa, size, file_size = _list(region, f"file region #{i}", 4)
        _str(name, f"file region #{i} name", abi.FILE_NAME_MAX)
        _int(gpa, f"file region {name!r} address", memory_size, top)
        _int(file_size, f"file region {name!r} file size", 1, top)
        # the memslot covers exactly the host mapping (the file rounded up to pages): a larger
        # one would hand the guest whatever the host maps after it
        if size != -(-file_size // PAGE) * PAGE:
            raise ValueError(f"file region {name!r} maps {size} bytes for a {file_size}-byte file")
    spans = sorted((r[1], r[1] + r[2]) for r in file_regions)
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        raise ValueError("file regions overlap")
    try:
        parsed = machine.Layout.from_dict(layout)
    except KeyError as e:
        raise ValueError(f"layout region {e} is missing") from None
    sizes = {parsed.region(n).size for n in ("input", "output", "exchange")}
    if len(sizes) != 1 or not PAGE <= sizes.pop() <= MAX_IO_BUFFER:
        raise ValueError(f"the I/O buffers must have one size of 4 KiB..{MAX_IO_BUFFER >> 20} MiB")

    files = _list(meta["files"], "files", len(file_regions))
    for i, (entry, region) in enumerate(zip(files, file_regions)):
        _dict(entry, f"file #{i}", ("name", "path"))
        if not _str(entry["path"], f"file #{i} path") or not entry["name"]:
            raise ValueError(f"file #{i} has an empty name or path")
        if _str(entry["name"], f"file #{i} name", abi.FILE_NAME_MAX) != region[0]:
            raise ValueError(f"file #{i} is {entry['name']!r}, its region {region[0]!r}")
        abi.check_file_name(entry["name"])
    if len({entry["name"] for entry in files}) != len(files):
        raise ValueError("two files have the same name")

    state_sizes = _list(meta["state_sizes"], "vCPU state sizes", len(STATE_PARTS))
    for part, size in zip(STATE_PARTS, state_sizes):
        _int(size, f"vCPU state part {part!r} size", 0, MAX_STATE + 1)
    if sum(state_sizes) != state_len:
        raise ValueError("vCPU state sizes disagree with its length")

    extents = _list(meta["extents"], "extents", max_len=MAX_EXTENTS)
    for i, extent in enumerate(extents):
        for v in _list(extent, f"extent #{i}", 2):
            _int(v, f"extent #{i}", 0, memory_size // PAGE + 1)
_loaded = weakref.WeakValueDictionary()    # (dev, inode, size, mtime) -> Snapshot
_loaded_lock = threading.Lock()


def write_sparse(path, head, view, extents, image_offset, memory_size):
    """Writes a snapshot file (both personalities' formats): `head` (everything before the
    image), then the image's extents at image_offset, the rest a hole, so the file is sparse."""
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


def extents_crc(view, extents):
    """CRC-32 of the image bytes the extents cover, in order: what the file stores."""
    crc = 0
    for first, count in extents:
        crc = zlib.crc32(view[first * PAGE:(first + count) * PAGE], crc)
    return crc


def _split_state(data, sizes):
    if not isinstance(sizes, list) or len(sizes) != len(STATE_PARTS) or sum(sizes) != len(data):
        raise ValueError("vCPU state sizes disagree with its length")
    state, off = {}, 0
    for part, size in zip(STATE_PARTS, sizes):
        state[part] = bytes(data[off:off + size])
        off += size
    return state


def _extents(nonzero, pages, max_extents=MAX_EXTENTS):
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
