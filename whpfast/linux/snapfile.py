"""LinuxSnapshot on disk: a small format of its own, so the SDK's snapshot format stays as it is.

    offset 0   header: magic, version, memory size, then a table of sections, each (name, offset,
               length, CRC-32); the header carries a CRC-32 of itself
    ...        "meta"   JSON: how to rebuild the sandbox (argv, read policy, sizes), the address
                        space, the signal table, pending input, the vCPU state part sizes
               "vcpu"   the backend's raw register structs, concatenated
               "fs"     FileSystem.encode() of the file system's state
               "bitmap" the image's non-zero pages, uint64 words
               "pages"  the non-zero pages themselves, in page order, packed

Everything read is untrusted: every length, offset, checksum and field is checked before use
and any problem is a SnapshotError saying what is wrong. save() writes a new file and renames it
over the old one."""

import json
import os
import struct
import threading
import zlib

import numpy as np

from .. import backend
from ..errors import SnapshotError
from .mm import PAGE, USER_MIN, MmState, Vma, page_table_bytes

MAGIC = b"WHPFLNX1"
VERSION = 1
HEADER = struct.Struct("<8sIIQI")          # magic, version, header size, memory size, sections
SECTION = struct.Struct("<8sQQI4x")
SECTIONS = ("meta", "vcpu", "fs", "bitmap", "pages")
MAX_META = 64 << 20
MAX_MEMORY = 64 << 30


def _runs(nonzero, pages):
    """(first page, count) of every run of set bits."""
    bits = np.unpackbits(nonzero.view(np.uint8), bitorder="little")[:pages]
    edges = np.flatnonzero(np.diff(np.concatenate(([0], bits.astype(np.int8), [0]))))
    return list(zip(edges[0::2].tolist(), (edges[1::2] - edges[0::2]).tolist()))


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
    pages = snapshot.meta["memory_size"] // PAGE
    runs = _runs(snapshot._nonzero, pages)
    view = snapshot._image_view
    sections = {
        "meta": json.dumps(meta, sort_keys=True).encode(),
        "vcpu": b"".join(snapshot._state[p] for p in parts),
        "fs": fs_bytes,
        "bitmap": snapshot._nonzero.tobytes(),
    }
    pages_crc, pages_len = 0, 0
    for first, count in runs:
        pages_crc = zlib.crc32(view[first * PAGE:(first + count) * PAGE], pages_crc)
        pages_len += count * PAGE
    header_size = HEADER.size + SECTION.size * len(SECTIONS) + 4
    table, offset = [], header_size
    for name in SECTIONS:
        length = pages_len if name == "pages" else len(sections[name])
        crc = pages_crc if name == "pages" else zlib.crc32(sections[name])
        table.append(SECTION.pack(name.encode(), offset, length, crc))
        offset += length
    header = HEADER.pack(MAGIC, VERSION, header_size, snapshot.meta["memory_size"], len(SECTIONS)) + b"".join(table)
    header += struct.pack("<I", zlib.crc32(header))
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for name in SECTIONS[:-1]:
                f.write(sections[name])
            for first, count in runs:
                f.write(view[first * PAGE:(first + count) * PAGE])
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


def load(path, fs_decode):
    """Reads and checks a snapshot file; returns (meta, vcpu state, components, image, nonzero)
    with the components decoded (fs through fs_decode)."""
    path = os.fspath(path)

    def bad(why):
        return SnapshotError(f"{path} is not a usable Linux snapshot: {why}")

    try:
        f = open(path, "rb")
    except OSError as e:
        raise SnapshotError(f"cannot open snapshot {path!r}: {e.strerror}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
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
        except ValueError as e:
            raise bad(f"metadata is not JSON ({e})") from None
        state_bytes = section("vcpu", 1 << 20)
        fs_bytes = section("fs", 1 << 30)
        bitmap = section("bitmap", words * 8)
        if len(bitmap) != words * 8:
            raise bad("page bitmap has the wrong size")
        nonzero = np.frombuffer(bitmap, dtype=np.uint64).copy()
        if pages % 64 and int(nonzero[-1]) >> (pages % 64):
            raise bad("page bitmap marks pages past the end of memory")
        runs = _runs(nonzero, pages)
        offset, length, crc = table["pages"]
        if length != sum(c for _, c in runs) * PAGE:
            raise bad("the page data does not match the page bitmap")
        try:
            state, components = _decode_meta(meta, state_bytes, memory_size, fs_bytes, fs_decode)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise bad(f"metadata is inconsistent ({type(e).__name__}: {e})") from None
        image = backend.impl.GuestMemory(memory_size)
        view = memoryview(image)
        try:
            f.seek(offset)
            got = 0
            for first, count in runs:
                chunk = view[first * PAGE:(first + count) * PAGE]
                if f.readinto(chunk) != count * PAGE:
                    raise bad("page data truncated")
                got = zlib.crc32(chunk, got)
            if got != crc:
                raise bad("page data checksum mismatch")
        finally:
            view.release()
    return meta, state, components, image, nonzero


def _decode_meta(meta, state_bytes, memory_size, fs_bytes, fs_decode):
    from .process import IoState, ProcState      # (process imports this module)
    if meta["memory_size"] != memory_size:
        raise ValueError("memory size differs from the header's")
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
