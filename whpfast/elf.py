"""Loads a guest ELF built with the whpfast SDK: a static x86-64 executable linked at
WF_IMAGE_BASE with an export table in section "wf_exports". Every header, segment and string is
checked against the file and the image's limits before anything is used."""

import hashlib
import os
import stat
import struct
from dataclasses import dataclass

from . import abi
from .errors import GuestLoadError

PAGE = abi.PAGE
IMAGE_LIMIT = 1 << 30            # images live in [WF_IMAGE_BASE, 1 GiB)
MAX_FILE_SIZE = 256 << 20

ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
PT_LOAD, PF_X, PF_W, PF_R = 1, 1, 2, 4
EXPORT_ENTRY = struct.Struct("<QQQQ")


@dataclass(frozen=True)
class Segment:
    vaddr: int
    data: bytes          # file bytes; the rest up to memsz is zero
    memsz: int
    writable: bool
    executable: bool

    @property
    def page_start(self):
        return self.vaddr // PAGE * PAGE

    @property
    def page_end(self):
        return (self.vaddr + self.memsz + PAGE - 1) // PAGE * PAGE


@dataclass(frozen=True)
class Export:
    index: int
    name: str
    params: str
    result: str


@dataclass(frozen=True)
class GuestImage:
    path: str
    entry: int
    segments: tuple
    exports: dict        # name -> Export
    end: int             # first byte after the last segment
    digest: str          # sha256 of the file: the guest's identity (snapshots check it)


_cache = {}
# Opening never blocks (a FIFO would wait for a writer) and never makes a terminal ours.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def load(path):
    """Parses and validates the guest ELF at path, a regular file of at most MAX_FILE_SIZE
    bytes (cached by path, inode, size, mtime and ctime)."""
    path = os.fspath(path)
    fd, st = _open_regular(path, "guest", "a guest is an ELF file built with "
                                          "`python -m whpfast build-guest`")
    try:
        key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        image = _cache.get(key)
        if image is None:
            image = parse(_read_whole(fd, path, "guest"), path)
            _cache[key] = image
        return image
    except OSError as e:
        raise GuestLoadError(f"cannot read guest {path!r}: {e.strerror}") from e
    finally:
        os.close(fd)


def read_program(path, what="the program"):
    """The bytes of the regular file at path (at most MAX_FILE_SIZE), read without ever blocking
    or reading forever: a Linux program the host names (LinuxSandbox's argv[0])."""
    path = os.fspath(path)
    fd, _ = _open_regular(path, what, "give the path of an ELF executable")
    try:
        return _read_whole(fd, path, what)
    except OSError as e:
        raise GuestLoadError(f"cannot read {what} {path!r}: {e.strerror}") from e
    finally:
        os.close(fd)


def _open_regular(path, what, hint):
    """(fd, stat) of path, opened read-only without blocking; GuestLoadError unless it is a
    regular file of at most MAX_FILE_SIZE bytes."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise GuestLoadError(f"cannot read {what} {path!r}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            # /dev/zero would be read forever, a FIFO until its writer stops
            raise GuestLoadError(f"{what} {path!r} is not a regular file; {hint}")
        if st.st_size > MAX_FILE_SIZE:
            raise GuestLoadError(f"{what} {path!r} is {st.st_size} bytes; the limit is {MAX_FILE_SIZE}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _read_whole(fd, path, what):
    data = _read_at_most(fd, MAX_FILE_SIZE + 1)       # the file may grow meanwhile
    if len(data) > MAX_FILE_SIZE:
        raise GuestLoadError(f"{what} {path!r} grew past the limit of {MAX_FILE_SIZE} bytes")
    return data


def _read_at_most(fd, limit):
    chunks, n = [], 0
    while n < limit:
        chunk = os.read(fd, min(limit - n, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        n += len(chunk)
    return b"".join(chunks)


def parse(data, path="<bytes>"):
    def fail(why):
        raise GuestLoadError(f"guest {path!r} cannot be loaded: {why}")

    if len(data) < ELF_HEADER.size:
        fail("file is too short to be an ELF")
    (ident, e_type, machine, version, entry, phoff, shoff, flags, ehsize, phentsize, phnum,
     shentsize, shnum, shstrndx) = ELF_HEADER.unpack_from(data, 0)
    if ident[:4] != b"\x7fELF":
        fail("not an ELF file (bad magic)")
    if ident[4] != 2 or ident[5] != 1:
        fail("not a 64-bit little-endian ELF")
    if e_type != 2 or machine != 62:
        fail(f"not an x86-64 executable (type {e_type}, machine {machine}); build it with "
             f"`python -m whpfast build-guest`")

    def table(off, entsize, count, fmt, what):
        if count and (entsize != fmt.size or off + count * entsize > len(data) or off < ELF_HEADER.size):
            fail(f"{what} table at {off:#x} ({count} x {entsize} bytes) lies outside the file")
        return [fmt.unpack_from(data, off + i * entsize) for i in range(count)]

    segments = []
    for p_type, p_flags, p_offset, p_vaddr, _, p_filesz, p_memsz, _ in table(
            phoff, phentsize, phnum, PROGRAM_HEADER, "program header"):
        if p_type != PT_LOAD:
            if p_type in (2, 3):   # PT_DYNAMIC, PT_INTERP
                fail("dynamically linked; guests must be static")
            continue
        if p_filesz > p_memsz:
            fail(f"segment at {p_vaddr:#x} has more file bytes ({p_filesz}) than memory ({p_memsz})")
        if p_offset + p_filesz > len(data):
            fail(f"segment at {p_vaddr:#x} reads bytes {p_offset}..{p_offset + p_filesz} past the file end")
        if not abi.IMAGE_BASE <= p_vaddr or p_vaddr + p_memsz > IMAGE_LIMIT:
            fail(f"segment {p_vaddr:#x}+{p_memsz:#x} lies outside the image area "
                 f"{abi.IMAGE_BASE:#x}..{IMAGE_LIMIT:#x}; link with the SDK's linker script")
        if p_memsz == 0:
            continue
        segments.append(Segment(p_vaddr, bytes(data[p_offset:p_offset + p_filesz]), p_memsz,
                                writable=bool(p_flags & PF_W), executable=bool(p_flags & PF_X)))
    if not segments:
        fail("no loadable segments")
    segments.sort(key=lambda s: s.vaddr)
    for a, b in zip(segments, segments[1:]):
        if b.page_start < a.page_end:
            fail(f"segments at {a.vaddr:#x} and {b.vaddr:#x} share a page; each needs its own "
                 f"page-aligned range (link with the SDK's linker script)")
    if not any(s.executable and s.vaddr <= entry < s.vaddr + s.memsz for s in segments):
        fail(f"entry point {entry:#x} is not in an executable segment")

    def read_string(addr, what):
        for s in segments:
            if s.vaddr <= addr < s.vaddr + len(s.data):
                chunk = s.data[addr - s.vaddr:addr - s.vaddr + 256]
                end = chunk.find(b"\0")
                if end < 0:
                    fail(f"{what} at {addr:#x} is not NUL-terminated within 256 bytes")
                try:
                    return chunk[:end].decode("ascii")
                except UnicodeDecodeError:
                    fail(f"{what} at {addr:#x} is not ASCII")
        fail(f"{what} points to {addr:#x}, outside the image's initialized data")

    sections = table(shoff, shentsize, shnum, SECTION_HEADER, "section header")
    exports = {}
    if sections:
        if shstrndx >= len(sections):
            fail("section name table index out of range")
        names_off, names_size = sections[shstrndx][4], sections[shstrndx][5]
        if names_off + names_size > len(data):
            fail("section name table lies outside the file")
        for sh_name, sh_type, _, _, sh_offset, sh_size, *_ in sections:
            end = data.find(b"\0", names_off + sh_name, names_off + names_size)
            if data[names_off + sh_name:end] != b"wf_exports" or sh_type == 8:   # 8: NOBITS
                continue
            if sh_size % EXPORT_ENTRY.size or sh_offset + sh_size > len(data):
                fail("export table (section wf_exports) is malformed")
            for index in range(sh_size // EXPORT_ENTRY.size):
                name_ptr, params_ptr, result, fn = EXPORT_ENTRY.unpack_from(data, sh_offset + index * 32)
                name = read_string(name_ptr, f"export #{index} name")
                params = read_string(params_ptr, f"export {name!r} parameters")
                result_letter = chr(result) if result < 128 else "?!"
                if len(params) > abi.MAX_ARGS or any(p not in abi.SIGNATURE or p == "n" for p in params):
                    fail(f"export {name!r} has invalid parameters {params!r}")
                if result_letter not in abi.SIGNATURE:
                    fail(f"export {name!r} has invalid result letter {result!r}")
                if name in exports:
                    fail(f"function {name!r} is exported twice")
                exports[name] = Export(index, name, params, result_letter)
    if not exports:
        fail("exports no functions (no wf_exports section); define them with WF_EXPORT")
    return GuestImage(path=str(path), entry=entry, segments=tuple(segments), exports=exports,
                      end=max(s.vaddr + s.memsz for s in segments),
                      digest=hashlib.sha256(data).hexdigest())
