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
"""

import json
import os
import struct
import threading
import weakref
import zlib
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import numpy as np

from . import _pages, abi, backend, machine
from .errors import SnapshotError
from ._typing import StrPath

PAGE = 4096
MAGIC = b"WHPFSNAP"
FORMAT_VERSION = 2      # 2: the KVM vCPU state holds the whole XSAVE area (was KVM_GET_FPU's)
ARCH_X86_64 = 1
HEADER = struct.Struct("<8sIIII 12Q 5I 4x")
assert HEADER.size == 144
MAX_MEMORY = 64 << 30
MAX_META = 1 << 20
MAX_STATE = 1 << 16
MAX_EXTENTS = 4096
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
        return None

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
        image_crc = _extents_crc(view, extents)
        fields = [MAGIC, FORMAT_VERSION, ARCH_X86_64, HEADER.size, 0,
                  self.memory_size, self.memory_size // PAGE,
                  meta_off, len(meta_bytes), state_off, len(state_bytes), bitmap_off, len(bitmap_bytes),
                  image_off, self.memory_size, len(extents), 0,
                  zlib.crc32(meta_bytes), zlib.crc32(state_bytes), zlib.crc32(bitmap_bytes), image_crc, 0]
        header = bytearray(HEADER.pack(*fields))
        struct.pack_into("<I", header, _HEADER_CRC_OFFSET, zlib.crc32(header))
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(header + meta_bytes + state_bytes + bitmap_bytes)
                for first, count in extents:
                    f.seek(image_off + first * PAGE)
                    f.write(view[first * PAGE:(first + count) * PAGE])
                f.truncate(image_off + self.memory_size)       # the rest is a hole
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

    @classmethod
    def load(cls, path: StrPath) -> "Snapshot":
        """Reads and validates a snapshot file; raises SnapshotError on any problem. Loading the
        same unchanged file again returns the same Snapshot (validated once, mapped once)."""
        path = os.fspath(path)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise SnapshotError(f"cannot open snapshot {path!r}: {e.strerror}") from e
        try:
            st = os.fstat(f.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            with _loaded_lock:
                snap = _loaded.get(key)
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
            layout = machine.Layout.from_dict(meta["layout"])
            if layout.memory_size != memory_size:
                raise ValueError("layout memory size differs from the header's")
            extents = [(int(a), int(b)) for a, b in meta["extents"]]
            guest = meta["guest"]
            for key, kind in (("path", str), ("digest", str), ("entry", int), ("exports", list)):
                if not isinstance(guest.get(key), kind):
                    raise ValueError(f"guest {key} missing")
            if meta.get("backend") != backend.NAME:
                raise ValueError(f"taken with the {meta.get('backend')!r} backend, this is {backend.NAME!r}")
            if meta.get("abi") != abi.ABI_VERSION:
                raise ValueError(f"guest ABI version {meta.get('abi')}, this whpfast speaks {abi.ABI_VERSION}")
            state = _split_state(state_bytes, meta["state_sizes"])
        except (ValueError, KeyError, TypeError) as e:
            raise bad(f"metadata is inconsistent: {e}") from None
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
        image = impl.FileMapping(f.fileno(), image_off, memory_size)
        with memoryview(image) as view:
            crc = _extents_crc(view, extents)
        if crc != image_crc:
            image.close()
            raise bad("memory image checksum mismatch (the image is corrupt)")
        return cls(image, nonzero, state, meta, path=path, file=f, extents=extents, image_offset=image_off)

    def map_into(self, memory: Any) -> None:
        """Fills fresh guest memory with this snapshot's image: copy-on-write mappings of the
        file's extents when it came from a file (and the backend can: KVM), else copies of the
        non-zero pages."""
        if self._file is not None and hasattr(memory, "overlay_file"):
            for first, count in self._extents:
                memory.overlay_file(self._file.fileno(), self._image_offset + first * PAGE,
                                    first * PAGE, count * PAGE)
        else:
            _pages.restore(memoryview(memory), self._image_view, self._nonzero, self._nonzero)


_HEADER_CRC_OFFSET = HEADER.size - 8
_loaded = weakref.WeakValueDictionary()    # (dev, inode, size, mtime) -> Snapshot
_loaded_lock = threading.Lock()


def _extents_crc(view, extents):
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
