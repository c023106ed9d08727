"""LinuxSnapshot on disk: a small format of its own, so the SDK's snapshot format stays as it is.

    offset 0   header: magic, version, memory size, then a table of sections, each (name, offset,
               length, CRC-32); the header carries a CRC-32 of itself
    ...        "meta"   JSON: how to rebuild the sandbox (argv, read policy, sizes), the address
                        space, the signal table, pending input, the vCPU state part sizes
               "vcpu"   the backend's raw register structs, concatenated
               "fs"     FileSystem.encode() of the file system's state
               "bitmap" the image's non-zero pages, uint64 words
    (64 KiB    "image"  the memory image, memory_size bytes at the first 64 KiB boundary after the
    aligned)            bitmap. Only its extents (runs of non-zero pages, merged across small gaps:
                        snapshot._extents of the bitmap, so the file need not list them) are
                        written; the rest is a hole, so the file is sparse. Its CRC-32 covers the
                        extents' bytes in order.

A sandbox made from the file maps the extents copy-on-write (whpfast.snapshot.map_image, as the
SDK's Sandbox.from_snapshot does): sandboxes made from one file share its page cache and pay only
for the pages they write. Snapshot files are therefore immutable once written; save() writes a
new file and renames it over the old one.

Everything read is untrusted: every length, offset, checksum and field is checked before use
and any problem is a SnapshotError saying what is wrong."""

import json
import os
import stat
import struct
import zlib

import numpy as np

from .. import backend, cpu
from ..errors import SnapshotError
from ..snapshot import IMAGE_ALIGN, _extents, extents_crc, write_sparse
from .mm import PAGE, USER_MIN, MmState, Vma, page_table_bytes

MAGIC = b"WHPFLNX1"
VERSION = 3            # 2: the image, page aligned and sparse (was packed); 3: "meta" records
                       # the CPU identity (whpfast/cpu.py)
HEADER = struct.Struct("<8sIIQI")          # magic, version, header size, memory size, sections
SECTION = struct.Struct("<8sQQI4x")
SECTIONS = ("meta", "vcpu", "fs", "bitmap", "image")
MAX_META = 64 << 20
MAX_MEMORY = 64 << 30
# Each extent is one host mapping per sandbox made from the file (vm.max_map_count is 65530):
# fewer, larger extents let many sandboxes share one file, at the cost of a few zero pages stored.
MAX_EXTENTS = 512


def save(snapshot, path):
    path = os.fspath(path)
    meta = dict(snapshot.meta)
    mm_state, fs_state, proc, io = snapshot._components
    fs_bytes = snapshot._fs_codec.encode(fs_state)
    meta["mm"] = {"vmas": [[v.start, v.end, v.prot, v.name.hex(), v.offset, v.pristine] for v in mm_state.vmas],
                  "brk_start": mm_state.brk_start, "brk": mm_state.brk}
    meta["proc"] = {"actions": [a.hex() for a in proc.actions], "sigmask": proc.sigmask,
                    "altstack": proc.altstack.hex()}
    meta["io"] = {"input": io.input.hex(), "eof": io.eof, "waiting": io.waiting, "exit_code": io.exit_code}
    parts = backend.impl.STATE_PARTS
    meta["vcpu_parts"] = [[p, len(snapshot._state[p])] for p in parts]
    memory_size = snapshot.meta["memory_size"]
    extents = _extents(snapshot._nonzero, memory_size // PAGE, MAX_EXTENTS)
    view = snapshot._image_view
    sections = {
        "meta": json.dumps(meta, sort_keys=True).encode(),
        "vcpu": b"".join(snapshot._state[p] for p in parts),
        "fs": fs_bytes,
        "bitmap": snapshot._nonzero.tobytes(),
    }
    image_crc = extents_crc(view, extents)
    header_size = HEADER.size + SECTION.size * len(SECTIONS) + 4
    table, offset = [], header_size
    for name in SECTIONS[:-1]:
        table.append(SECTION.pack(name.encode(), offset, len(sections[name]), zlib.crc32(sections[name])))
        offset += len(sections[name])
    image_offset = _image_offset(offset)
    table.append(SECTION.pack(b"image", image_offset, memory_size, image_crc))
    header = HEADER.pack(MAGIC, VERSION, header_size, memory_size, len(SECTIONS)) + b"".join(table)
    header += struct.pack("<I", zlib.crc32(header))
    return write_sparse(path, header + b"".join(sections[name] for name in SECTIONS[:-1]), view,
                        extents, image_offset, memory_size)


def _image_offset(end):
    """Where the image starts: the first 64 KiB boundary after the sections (Windows maps file
    views only there; on Linux any page would do)."""
    return -(-end // IMAGE_ALIGN) * IMAGE_ALIGN


def load(path, fs_decode):
    """Reads and checks a snapshot file; returns (meta, vcpu state, components, image, nonzero,
    file, extents, image offset) with the components decoded (fs through fs_decode). The image
    is the file's image section mapped read-only; file is the open file it came from (the
    caller's to close, with the image), extents its non-zero runs."""
    path = os.fspath(path)

    def bad(why):
        return SnapshotError(f"{path} is not a usable Linux snapshot: {why}")

    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore it)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"cannot open snapshot {path!r}: {e.strerror}") from e
    f = os.fdopen(fd, "rb")
    try:
        return _load(f, path, bad, fs_decode)
    except BaseException:
        f.close()
        raise


def _load(f, path, bad, fs_decode):
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        raise bad("not a regular file")
    size = st.st_size
    head = f.read(HEADER.size)
    if len(head) != HEADER.size:
        raise bad("too short")
    magic, version, header_size, memory_size, n = HEADER.unpack(head)
    if magic != MAGIC:
        raise bad("wrong magic (not a whpfast Linux snapshot)")
    if version != VERSION:
        raise bad(f"format version {version}, this whpfast reads {VERSION}")
    if n != len(SECTIONS) or header_size != HEADER.size + SECTION.size * n + 4:
        raise bad("wrong section count")
    if memory_size % (2 << 20) or not 16 << 20 <= memory_size <= MAX_MEMORY:
        raise bad(f"memory size {memory_size:#x} is invalid")
    rest = f.read(header_size - HEADER.size)
    if len(rest) != header_size - HEADER.size:
        raise bad("truncated header")
    if zlib.crc32(head + rest[:-4]) != struct.unpack("<I", rest[-4:])[0]:
        raise bad("header checksum mismatch")
    table = {}
    expected = header_size
    for i, name in enumerate(SECTIONS):
        raw_name, offset, length, crc = SECTION.unpack_from(rest, i * SECTION.size)
        if name == "image":
            expected = _image_offset(expected)
            if length != memory_size:
                raise bad(f"the image has {length} bytes, memory {memory_size}")
        if raw_name.rstrip(b"\0") != name.encode() or offset != expected or offset + length > size:
            raise bad(f"section {name!r} is misplaced or truncated")
        table[name] = (offset, length, crc)
        expected = offset + length
    if expected != size:
        raise bad("trailing or missing bytes")

    def section(name, limit):
        offset, length, crc = table[name]
        if length > limit:
            raise bad(f"section {name!r} is too large")
        f.seek(offset)
        data = f.read(length)
        if len(data) != length or zlib.crc32(data) != crc:
            raise bad(f"section {name!r} checksum mismatch")
        return data

    pages = memory_size // PAGE
    words = (pages + 63) // 64
    try:
        meta = json.loads(section("meta", MAX_META))
    except (ValueError, RecursionError) as e:       # RecursionError: nesting too deep
        raise bad(f"metadata is not JSON ({str(e)[:200]})") from None
    state_bytes = section("vcpu", 1 << 20)
    fs_bytes = section("fs", 1 << 30)
    bitmap = section("bitmap", words * 8)
    if len(bitmap) != words * 8:
        raise bad("page bitmap has the wrong size")
    nonzero = np.frombuffer(bitmap, dtype=np.uint64).copy()
    if pages % 64 and int(nonzero[-1]) >> (pages % 64):
        raise bad("page bitmap marks pages past the end of memory")
    try:
        state, components = _decode_meta(meta, state_bytes, memory_size, fs_bytes, fs_decode)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise bad(f"metadata is inconsistent ({type(e).__name__}: {e})") from None
    why = cpu.incompatibility(meta["cpu"])          # before anything is mapped or runs
    if why:
        raise bad(why)
    # The extents follow from the bitmap (they cover every non-zero page by construction);
    # pages outside them come from anonymous memory, zero whatever the file's holes hold.
    extents = _extents(nonzero, pages, MAX_EXTENTS)
    offset, _, crc = table["image"]
    image = backend.impl.FileMapping(f.fileno(), offset, memory_size)
    try:
        with memoryview(image) as view:
            got = 0
            for first, count in extents:
                got = zlib.crc32(view[first * PAGE:(first + count) * PAGE], got)
            if got != crc:
                raise bad("page data checksum mismatch")
            # Zero pages inside an extent (a merged gap) are mapped from the file too: they must
            # be zero there, as the bitmap says (restores zero them; a guest must never see the
            # file's bytes there instead).
            bits = np.unpackbits(nonzero.view(np.uint8), bitorder="little")
            for first, count in extents:
                for page in (np.flatnonzero(bits[first:first + count] == 0) + first).tolist():
                    if np.frombuffer(view, np.uint64, PAGE // 8, page * PAGE).any():
                        raise bad(f"page {page} is marked zero but holds data")
    except BaseException:
        image.close()
        raise
    return meta, state, components, image, nonzero, f, extents, offset


def _decode_meta(meta, state_bytes, memory_size, fs_bytes, fs_decode):
    from .process import IoState, ProcState      # (process imports this module)
    if meta["memory_size"] != memory_size:
        raise ValueError("memory size differs from the header's")
    cpu.parse(meta["cpu"])
    parts = backend.impl.STATE_PARTS
    names = [p for p, _ in meta["vcpu_parts"]]
    if names != list(parts):
        raise ValueError(f"vCPU state parts {names} are not this backend's {list(parts)}")
    state, at = {}, 0
    for part, length in meta["vcpu_parts"]:
        if not isinstance(length, int) or length < 0:
            raise ValueError("bad vCPU part length")
        state[part] = state_bytes[at:at + length]
        at += length
    if at != len(state_bytes):
        raise ValueError("vCPU state length mismatch")
    top = memory_size - page_table_bytes(memory_size) - PAGE
    vmas, previous_end = [], USER_MIN
    for start, end, prot, name, offset, pristine in meta["mm"]["vmas"]:
        for value in (start, end, prot, offset):
            if not isinstance(value, int) or value < 0:
                raise ValueError("bad mapping field")
        if start % PAGE or end % PAGE or not previous_end <= start < end <= top or prot > 7:
            raise ValueError(f"mapping {start:#x}-{end:#x} is invalid")
        vmas.append(Vma(start, end, prot, bytes.fromhex(name), offset, bool(pristine)))
        previous_end = end
    brk_start, brk = meta["mm"]["brk_start"], meta["mm"]["brk"]
    if not (isinstance(brk_start, int) and isinstance(brk, int) and USER_MIN <= brk_start <= brk <= top):
        raise ValueError("brk is invalid")
    mm_state = MmState(tuple(vmas), tuple(v.start for v in vmas), brk_start, brk)
    p = meta["proc"]
    actions = tuple(bytes.fromhex(a) for a in p["actions"])
    if len(actions) != 65 or any(len(a) != 32 for a in actions):
        raise ValueError("signal table is invalid")
    altstack = bytes.fromhex(p["altstack"])
    if len(altstack) != 24 or not isinstance(p["sigmask"], int):
        raise ValueError("signal state is invalid")
    proc = ProcState(actions, p["sigmask"] & ((1 << 64) - 1), altstack)
    io = meta["io"]
    exit_code = io["exit_code"]
    if exit_code is not None and not (isinstance(exit_code, int) and 0 <= exit_code <= 255):
        raise ValueError("exit code is invalid")
    io_state = IoState(bytes.fromhex(io["input"]), bool(io["eof"]), bool(io["waiting"]), exit_code)
    fs_state = fs_decode(fs_bytes)
    return state, (mm_state, fs_state, proc, io_state)
