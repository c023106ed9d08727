"""Snapshots: a sandbox's memory and complete vCPU state at one moment, in memory or on disk.

On disk a snapshot is a container file (whpfast/core/container.py: header, section table with
a CRC-32 and size cap per section, the sparse page-aligned image) of kind "sdk" with two
components: "sdk" (JSON metadata: backend, guest ABI, CPU identity, the guest's identity and
exports, the memory layout, files, the vCPU state part sizes) and "vcpu" (the backend's raw
register structs, concatenated). Loading checks every field, length and checksum before
anything is mapped into a guest: corruption becomes a SnapshotError that says what is wrong.
A sandbox cold-started from a file maps the extents MAP_PRIVATE straight from it
(copy-on-write), so sandboxes made from one file share its page cache and pay privately only
for the pages they write; pages outside the extents come from anonymous memory and are zero
whatever the file holds. save() writes a new file and renames it over the old one: a file that
live sandboxes map is never written.

Snapshot files are immutable once written: sandboxes map their pages, so a file changed in place
changes what those sandboxes see. A file that a user other than root or this process's owner can
write is never mapped (container.load_image): it is read into private memory once, at load.
Loading validates a file once per version (container.Cache).
"""

import os
import weakref
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import numpy as np

from . import _pages, abi, backend, cpu, elf, machine
from .core import container
from .core.container import PAGE, BytesComponent, ImageAccessors, JsonComponent, map_image
from .errors import SnapshotError
from ._typing import StrPath

MAX_MEMORY = container.MAX_MEMORY
MAX_META = 1 << 20
MAX_STATE = 1 << 16
MAX_EXTENTS = 4096
MAX_EXPORTS = 4096
MAX_REGIONS = 64
MAX_PATH = 4096
MAX_IO_BUFFER = 256 << 20
MAX_TOP = machine.MAX_TOP       # RAM and file mappings: what the page tables can map

impl = backend.impl
STATE_PARTS = impl.STATE_PARTS


class Snapshot(ImageAccessors):
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
        return container.write(os.fspath(path), "sdk", self.memory_size,
                               [(META, self.meta), (VCPU, b"".join(self._state[p] for p in STATE_PARTS))],
                               self._image_view, self._nonzero, MAX_EXTENTS)

    @classmethod
    def load(cls, path: StrPath) -> "Snapshot":
        """Reads and validates a snapshot file; raises SnapshotError on any problem. Loading the
        same unchanged file again returns the same Snapshot (validated once, mapped once)."""
        path = os.fspath(path)
        f = container.open_file(path)
        try:
            snap = _loaded.get(f, lambda: cls._load(f, path), lambda snap: snap._prefix)
        except BaseException:
            f.close()
            raise
        if snap._file is not f:
            f.close()
        return snap

    @classmethod
    def _load(cls, f, path):
        def bad(why):
            return SnapshotError(f"snapshot {path!r} is unusable: {why}")

        box = container.read(f, path, "sdk", (META, VCPU), MAX_EXTENTS, bad)
        try:
            state_bytes = box.decode(VCPU)
            meta = box.decode(META, (box.memory_size, len(state_bytes)))
            state = _split_state(state_bytes, meta["state_sizes"])
        except ValueError as e:
            raise bad(f"metadata is inconsistent: {e}") from None
        why = cpu.incompatibility(meta["cpu"])      # before anything is mapped or runs
        if why:
            raise bad(why)
        image = container.load_image(f, box.image_offset, box.memory_size, box.extents)
        try:
            with memoryview(image) as view:
                container.check_image(view, box, bad)
        except BaseException:
            image.close()
            raise
        snap = cls(image, box.stored, state, meta, path=path, file=f, extents=box.extents,
                   image_offset=box.image_offset)
        snap._prefix = box.prefix
        return snap

    def map_into(self, memory: Any) -> None:
        """Fills fresh guest memory with this snapshot's image: copy-on-write mappings of the
        file's extents when it came from a file (and the backend can: KVM), else copies of the
        non-zero pages."""
        map_image(memory, self._file, self._image_offset, self._extents, self._image_view, self._nonzero)


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
    _dict(meta, "metadata", ("backend", "abi", "cpu", "guest", "layout", "files", "state_sizes"))
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

    return meta


def _check_meta(meta, version, context):
    memory_size, state_len = context
    return check_meta(meta, memory_size, state_len)


META = JsonComponent("sdk", _check_meta, max_size=MAX_META)
VCPU = BytesComponent("vcpu", MAX_STATE)
_loaded = container.Cache()


def _split_state(data, sizes):
    if not isinstance(sizes, list) or len(sizes) != len(STATE_PARTS) or sum(sizes) != len(data):
        raise ValueError("vCPU state sizes disagree with its length")
    state, off = {}, 0
    for part, size in zip(STATE_PARTS, sizes):
        state[part] = bytes(data[off:off + size])
        off += size
    return state
