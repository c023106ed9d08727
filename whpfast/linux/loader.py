"""Loads an x86-64 Linux ELF program (static, static-pie, or dynamic through its PT_INTERP) into an
address space and builds the initial stack (argv, envp, auxv) the way Linux's binfmt_elf does.

Every header field is untrusted: a malformed file becomes GuestLoadError saying what is wrong."""

import struct
from dataclasses import dataclass

from ..errors import GuestLoadError
from .errno import LinuxError
from .mm import PAGE, PROT_EXEC, PROT_READ, PROT_WRITE, USER_MIN, page_up

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
ET_EXEC, ET_DYN = 2, 3
EM_X86_64 = 62
PT_LOAD, PT_INTERP, PT_PHDR = 1, 3, 6
MAX_PHNUM = 1024
PIE_BASE = 0x400000          # where a position-independent main program goes

# auxv keys (<elf.h>)
AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_BASE, AT_FLAGS, AT_ENTRY = 0, 3, 4, 5, 6, 7, 8, 9
AT_UID, AT_EUID, AT_GID, AT_EGID, AT_PLATFORM, AT_HWCAP, AT_CLKTCK = 11, 12, 13, 14, 15, 16, 17
AT_SECURE, AT_RANDOM, AT_HWCAP2, AT_EXECFN, AT_SYSINFO_EHDR, AT_MINSIGSTKSZ = 23, 25, 26, 31, 33, 51


@dataclass(frozen=True)
class Segment:
    vaddr: int
    memsz: int
    offset: int
    filesz: int
    prot: int


@dataclass(frozen=True)
class ElfFile:
    name: str
    type: int
    entry: int
    phoff: int
    phnum: int
    segments: tuple
    interp: bytes          # b"" when none
    phdr: int              # p_vaddr of the program headers in memory (unbiased), or -1

    @property
    def span(self):
        lo = self.segments[0].vaddr & ~(PAGE - 1)
        return lo, page_up(max(s.vaddr + s.memsz for s in self.segments))


class Image:
    """An ELF file as the loader reads it: its size, and reads at an offset into a buffer.
    parse() reads only the headers through it and load() reads each segment straight into guest
    memory, so a program is never held whole in host memory (python3: 7 MB read into a bytes
    object and then copied, every cold boot). read_into(buf, offset) fills buf from offset and
    returns the count (short only at the end of the file); Image.of(bytes) for bytes."""

    def __init__(self, size, read_into):
        self.size = size
        self._read_into = read_into

    @classmethod
    def of(cls, data):
        view = memoryview(data).cast("B")

        def read_into(buf, offset):
            part = view[offset:offset + len(buf)]
            buf[:len(part)] = part
            return len(part)
        return cls(len(view), read_into)

    def read_into(self, buf, offset):
        done = 0
        while done < len(buf):
            n = self._read_into(buf[done:], offset + done)
            if n <= 0:
                break
            done += n
        return done

    def read(self, offset, n):
        """Up to n bytes from offset (fewer at the end of the file)."""
        buf = bytearray(max(0, min(n, self.size - offset)))
        return bytes(buf[:self.read_into(memoryview(buf), offset)])


def parse(data, name):
    """Checks and decodes the headers of an ELF file (an Image, or bytes)."""
    def fail(why):
        raise GuestLoadError(f"{name} cannot be run: {why}")

    image = data if isinstance(data, Image) else Image.of(data)
    size = image.size
    head = image.read(0, EHDR.size)
    if len(head) < EHDR.size or head[:4] != b"\x7fELF":
        fail("not an ELF file")
    ident, etype, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, \
        *_ = EHDR.unpack_from(head)
    if ident[4] != 2 or ident[5] != 1:
        fail("not a 64-bit little-endian ELF")
    if machine != EM_X86_64:
        fail(f"built for machine {machine}, not x86-64 ({EM_X86_64})")
    if etype not in (ET_EXEC, ET_DYN):
        fail(f"ELF type {etype} is neither an executable nor a shared object")
    if phentsize != PHDR.size or not 0 < phnum <= MAX_PHNUM or phoff + phnum * PHDR.size > size:
        fail(f"bad program header table ({phnum} entries of {phentsize} bytes at {phoff:#x})")
    table = image.read(phoff, phnum * PHDR.size)
    if len(table) != phnum * PHDR.size:
        fail("the file is shorter than its size (it changed while it was read)")
    segments, interp, phdr = [], b"", -1
    for i in range(phnum):
        ptype, flags, offset, vaddr, _paddr, filesz, memsz, _align = PHDR.unpack_from(table, i * PHDR.size)
        if ptype == PT_INTERP:
            raw = image.read(offset, filesz) if 2 <= filesz <= 4096 and offset + filesz <= size else b""
            if not raw or len(raw) != filesz or raw[-1] != 0:
                fail("bad PT_INTERP")
            interp = raw[:-1]
            if b"\0" in interp:
                fail("bad PT_INTERP")
        elif ptype == PT_PHDR:
            phdr = vaddr
        elif ptype == PT_LOAD:
            if memsz == 0:
                continue
            if filesz > memsz or offset + filesz > size or (vaddr - offset) % PAGE \
                    or vaddr + memsz > 1 << 47:
                fail(f"segment {i} is inconsistent (vaddr {vaddr:#x}, offset {offset:#x}, "
                     f"filesz {filesz:#x}, memsz {memsz:#x})")
            if segments and vaddr < segments[-1].vaddr:
                fail("PT_LOAD segments are not in ascending order")
            prot = (PROT_READ if flags & 4 else 0) | (PROT_WRITE if flags & 2 else 0) | \
                (PROT_EXEC if flags & 1 else 0)
            segments.append(Segment(vaddr, memsz, offset, filesz, prot))
    if not segments:
        fail("no loadable segment")
    if phdr < 0:
        for s in segments:        # the headers inside a loaded segment, as Linux finds them
            if s.offset <= phoff and phoff + phnum * PHDR.size <= s.offset + s.filesz:
                phdr = s.vaddr + (phoff - s.offset)
                break
    return ElfFile(name, etype, entry, phoff, phnum, tuple(segments), interp, phdr)


def place(mm, elf, *, main):
    """The load bias: 0 for ET_EXEC; PIE_BASE for a position-independent main program; a free
    range of the mmap area for an interpreter."""
    lo, hi = elf.span
    if elf.type == ET_EXEC:
        bias = 0
    elif main:
        bias = PIE_BASE - lo
    else:
        bias = mm.find_free(hi - lo) - lo
    if lo + bias < USER_MIN or hi + bias > mm.top:
        raise GuestLoadError(
            f"{elf.name} wants addresses {lo + bias:#x}..{hi + bias:#x}, outside the sandbox's "
            f"user range {USER_MIN:#x}..{mm.top:#x}; give the sandbox a larger memory_size")
    return bias


def load(mm, elf, data, bias, name):
    """Maps every PT_LOAD segment at bias and reads its file bytes in (as a private file mapping
    would show them); the rest of each segment is zero. data: the Image (or bytes) parse() read.
    Returns the end of the image."""
    image = data if isinstance(data, Image) else Image.of(data)
    end = 0
    for s in elf.segments:
        start = (s.vaddr + bias) & ~(PAGE - 1)
        stop = page_up(s.vaddr + bias + s.memsz)
        file_start = s.offset - (s.vaddr + bias - start)
        mm.map(start, stop - start, s.prot, fixed=True, name=name, offset=file_start)
        want = s.offset + s.filesz - file_start
        got = mm.fill(start, want, lambda view: image.read_into(view, file_start))
        if want > 0 and got != want:
            raise GuestLoadError(f"{elf.name} cannot be run: the file is shorter than its size "
                                 f"(it changed while it was read)")
        end = max(end, s.vaddr + bias + s.memsz)
    return end


def build_stack(mm, top, argv, envp, auxv, execfn, random16):
    """Writes the initial process stack below top: argc, argv, envp, auxv (whose AT_RANDOM,
    AT_EXECFN and AT_PLATFORM values are filled in here) and the strings; returns the stack
    pointer (16-byte aligned, pointing at argc)."""
    strings = bytearray()

    def add(s):
        strings.extend(s + b"\0")
        return len(strings) - len(s) - 1

    offsets = {"execfn": add(execfn), "platform": add(b"x86_64")}
    strings.extend(random16)
    offsets["random"] = len(strings) - 16
    arg_offsets = [add(a) for a in argv]
    env_offsets = [add(e) for e in envp]
    base = (top - len(strings)) & ~15
    auxv = list(auxv) + [(AT_RANDOM, base + offsets["random"]), (AT_EXECFN, base + offsets["execfn"]),
                         (AT_PLATFORM, base + offsets["platform"]), (AT_NULL, 0)]
    words = [len(argv)] + [base + o for o in arg_offsets] + [0] + [base + o for o in env_offsets] + [0]
    for key, value in auxv:
        words += [key, value]
    sp = (base - 8 * len(words)) & ~15
    block = struct.pack(f"<{len(words)}Q", *words)
    try:
        mm.write(sp, block)
        mm.write(base, bytes(strings))
    except LinuxError:
        raise GuestLoadError(f"the arguments and environment ({len(strings)} bytes) do not fit "
                             f"the stack") from None
    return sp
