"""The guest's long-mode environment, built by the host in plain Python: the physical memory layout,
identity-mapped 4 KiB page tables, GDT, TSS (with the I/O permission bitmap that lets CPL3 reach
the whpfast ports), IDT and the tiny CPL0 exception stubs that report a fault to the host.

Guest code runs at CPL3 because on the PVM hosts CPL0 code is emulated (about 1000x slower and
SSE fails there). Pages that hold page tables, descriptor tables, the stubs and their stacks are
supervisor pages: CPL3 can neither read nor write them.

Physical layout (GVA == GPA):

    0x0000            null page, not present (catches null pointers)
    0x1000            info page (struct wf_info), user read-only
    0x2000            GDT, TSS and I/O bitmap                 supervisor
    0x3000            IDT                                     supervisor
    0x4000            exception stubs                         supervisor, executable
    0x5000            fault record written by the stubs       supervisor
    0x6000-0x8000     exception stack (TSS.RSP0)              supervisor
    0x9000-0xA000     double-fault stack (TSS.IST1)           supervisor
    0x100000          guest ELF image (WF_IMAGE_BASE)         user, per segment flags
    ...               guard, input/output/exchange buffers, guard, stack, guard
    ...               heap (the rest)                         user
    top of RAM        page tables                             supervisor
    above RAM         read-only file mappings, page aligned   user read-only, never executable
"""

import struct
from dataclasses import dataclass, field

import numpy as np

from . import abi

PAGE = abi.PAGE

INFO_ADDR = abi.INFO_ADDR
GDT_ADDR = 0x2000
TSS_ADDR = 0x2080
IDT_ADDR = 0x3000
STUBS_ADDR = 0x4000
FAULT_RECORD_ADDR = 0x5000
EXCEPTION_STACK = (0x6000, 0x8000)
DOUBLE_FAULT_STACK = (0x9000, 0xA000)

# GDT selectors
KERNEL_CS = 0x08
KERNEL_DS = 0x10
USER_DS = 0x18 | 3
USER_CS = 0x20 | 3
TSS_SEL = 0x28

TSS_SIZE = 104
IO_BITMAP_BYTES = 32          # covers ports 0x00-0xFF; ports beyond the TSS limit are denied
TSS_LIMIT = TSS_SIZE + IO_BITMAP_BYTES + 1 - 1   # + the mandatory 0xFF terminator byte

# Control registers of the state every call runs in (Intel SDM vol. 3, 2.5).
CR0 = 0x80050033      # PG | AM | WP | NE | ET | MP | PE
CR4 = 0x620           # OSXMMEXCPT | OSFXSR | PAE: SSE usable at CPL3, no XSAVE-managed state
EFER = 0xD01          # NXE | LMA | LME | SCE
RFLAGS = 0x2

# Page-table entry bits. Accessed and dirty are preset so the CPU never writes the tables, which
# keeps them out of the dirty log of every call.
PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D = 0x1, 0x2, 0x4, 0x20, 0x40
PTE_PS = 0x80         # in a page directory entry: maps a 2 MiB page
PTE_NX = 1 << 63
LARGE_PAGE = 2 << 20
MAX_TOP = 512 << 30   # the address space one PDPT maps; RAM plus every file must fit

VECTORS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
STUB_SIZE = 16

DEFAULT_MEMORY_SIZE = 16 << 20
DEFAULT_IO_BUFFER_SIZE = 64 << 10
DEFAULT_STACK_SIZE = 256 << 10


def _align_up(value, align=PAGE):
    return (value + align - 1) // align * align


@dataclass(frozen=True)
class Region:
    name: str
    gpa: int
    size: int
    user: bool
    writable: bool
    executable: bool

    @property
    def end(self):
        return self.gpa + self.size


@dataclass(frozen=True)
class FileRegion:
    name: str
    gpa: int
    size: int           # mapped bytes (whole pages)
    file_size: int      # bytes of the file


@dataclass
class Layout:
    """Where everything lives in guest memory, computed from the image and the sandbox's sizes."""
    memory_size: int
    regions: list
    files: list = field(default_factory=list)
    page_tables: tuple = (0, 0)     # (gpa, size)
    cr3: int = 0
    top: int = 0                    # end of the address space the page tables cover

    def region(self, name):
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self):
        return {"memory_size": self.memory_size, "cr3": self.cr3, "top": self.top,
                "page_tables": list(self.page_tables),
                "regions": [[r.name, r.gpa, r.size, r.user, r.writable, r.executable] for r in self.regions],
                "files": [[f.name, f.gpa, f.size, f.file_size] for f in self.files]}

    @classmethod
    def from_dict(cls, d):
        """Rebuilds a layout stored in a snapshot, checking that it is one make_layout() could
        have made: every region page aligned, inside RAM and disjoint, the ones the ABI needs
        present. Raises ValueError saying what is wrong."""
        memory_size = d["memory_size"]
        regions = [Region(str(n), int(g), int(sz), bool(u), bool(w), bool(x)) for n, g, sz, u, w, x in d["regions"]]
        files = [FileRegion(str(n), int(g), int(sz), int(fs)) for n, g, sz, fs in d["files"]]
        spans = sorted([(r.gpa, r.end, r.name) for r in regions])
        for gpa, end, name in spans:
            if gpa % PAGE or end % PAGE or not 0 < gpa < end <= memory_size:
                raise ValueError(f"region {name!r} {gpa:#x}..{end:#x} is unaligned or outside RAM")
        for (_, end, a), (gpa, _, b) in zip(spans, spans[1:]):
            if gpa < end:
                raise ValueError(f"regions {a!r} and {b!r} overlap")
        names = {r.name for r in regions}
        missing = {"info", "gdt", "idt", "stubs", "fault_record", "input", "output", "exchange",
                   "stack", "heap", "page_tables"} - names
        if missing:
            raise ValueError(f"regions missing: {sorted(missing)}")
        top = int(d["top"])
        for f in files:
            if f.gpa % PAGE or f.size % PAGE or f.gpa < memory_size or f.gpa + f.size > top \
                    or not 0 < f.file_size <= f.size:
                raise ValueError(f"file region {f.name!r} is inconsistent")
        layout = cls(memory_size=memory_size, regions=regions, files=files,
                     page_tables=tuple(int(v) for v in d["page_tables"]), cr3=int(d["cr3"]), top=top)
        pt = layout.region("page_tables")
        if layout.page_tables != (pt.gpa, pt.size) or not pt.gpa <= layout.cr3 < pt.end:
            raise ValueError("page table location is inconsistent")
        return layout


def make_layout(image, memory_size, *, io_buffer_size=DEFAULT_IO_BUFFER_SIZE,
                stack_size=DEFAULT_STACK_SIZE, files=()):
    """files: (name, file_size) pairs. Raises ValueError when the sizes cannot work."""
    for what, value in (("memory_size", memory_size), ("io_buffer_size", io_buffer_size),
                        ("stack_size", stack_size)):
        if not isinstance(value, int) or value <= 0 or value % PAGE:
            raise ValueError(f"{what} must be a positive multiple of {PAGE} bytes, got {value!r}")
    if len(files) > abi.MAX_FILES:
        raise ValueError(f"at most {abi.MAX_FILES} read-only files can be mapped, got {len(files)}")

    regions = [
        Region("info", INFO_ADDR, PAGE, user=True, writable=False, executable=False),
        Region("gdt", GDT_ADDR, PAGE, user=False, writable=True, executable=False),
        Region("idt", IDT_ADDR, PAGE, user=False, writable=True, executable=False),
        Region("stubs", STUBS_ADDR, PAGE, user=False, writable=False, executable=True),
        Region("fault_record", FAULT_RECORD_ADDR, PAGE, user=False, writable=True, executable=False),
        Region("exception_stack", EXCEPTION_STACK[0], EXCEPTION_STACK[1] - EXCEPTION_STACK[0],
               user=False, writable=True, executable=False),
        Region("double_fault_stack", DOUBLE_FAULT_STACK[0], DOUBLE_FAULT_STACK[1] - DOUBLE_FAULT_STACK[0],
               user=False, writable=True, executable=False),
    ]
    for i, seg in enumerate(image.segments):
        regions.append(Region(f"image{i}", seg.page_start, seg.page_end - seg.page_start, user=True,
                              writable=seg.writable, executable=seg.executable))
    cursor = _align_up(image.end) + PAGE                       # guard page after the image
    for name in ("input", "output", "exchange"):
        regions.append(Region(name, cursor, io_buffer_size, user=True, writable=True, executable=False))
        cursor += io_buffer_size
    cursor += PAGE                                              # guard below the stack
    regions.append(Region("stack", cursor, stack_size, user=True, writable=True, executable=False))
    cursor += stack_size + PAGE                                 # guard above the stack
    heap_start = cursor

    # Files go above RAM, each starting on a 2 MiB boundary (so whole 2 MiB pages can map it)
    # with at least one unmapped guard page after it.
    file_regions = []
    file_cursor = _align_up(memory_size, LARGE_PAGE)
    for name, file_size in files:
        size = _align_up(file_size)
        file_regions.append(FileRegion(name, file_cursor, size, file_size))
        file_cursor = _align_up(file_cursor + size + PAGE, LARGE_PAGE)
    top = max(memory_size, file_regions[-1].gpa + file_regions[-1].size if file_regions else 0)
    if top > MAX_TOP:
        raise ValueError(f"RAM and the read-only files need {top} bytes of address space; the "
                         f"limit is {MAX_TOP} (512 GiB)")

    # Page tables cover [0, top) and sit at the top of RAM: 2 MiB pages wherever one region
    # covers a whole 2 MiB page (most of the heap, big files), 4 KiB pages elsewhere, so they
    # cost about 4 KiB per GiB instead of 2 MiB. How many 4 KiB tables that takes depends on
    # where the heap ends, which depends on their size: grow the estimate until it holds.
    n_pd = -(-top // (1 << 30))
    n_upper = n_pd + 2                                          # PDs, one PDPT, the PML4
    n_pt = 0
    while True:
        pt_size = (n_pt + n_upper) * PAGE
        pt_base = memory_size - pt_size
        if pt_base - heap_start < PAGE:
            raise ValueError(
                f"memory_size {memory_size:#x} is too small: the image, buffers and stack end at "
                f"{heap_start:#x} and the page tables need {pt_size:#x} bytes; give the sandbox more memory")
        spans = [(r.gpa, r.end) for r in regions] + [(heap_start, pt_base), (pt_base, memory_size)] \
            + [(f.gpa, f.gpa + f.size) for f in file_regions]
        need = len(_split_chunks(spans))
        if need <= n_pt:
            break
        n_pt = need
    regions.append(Region("heap", heap_start, pt_base - heap_start, user=True, writable=True, executable=False))
    regions.append(Region("page_tables", pt_base, pt_size, user=False, writable=True, executable=False))
    return Layout(memory_size=memory_size, regions=regions, files=file_regions,
                  page_tables=(pt_base, pt_size), cr3=pt_base + pt_size - PAGE, top=top)


def _split_chunks(spans):
    """The 2 MiB chunks that (start, end) spans cover only partly: each needs a table of 4 KiB
    entries; a chunk one span covers whole is one 2 MiB entry."""
    partial = set()
    for start, end in spans:
        if start % LARGE_PAGE or end - start < LARGE_PAGE:
            partial.add(start // LARGE_PAGE)
        if end % LARGE_PAGE:
            partial.add((end - 1) // LARGE_PAGE)
    return sorted(partial)


def _page_tables(layout):
    """Returns the page-table pages as one uint64 array, laid out PTs (4 KiB entries for the
    chunks regions cover only partly, then unused ones), PDs, PDPT, PML4 from
    layout.page_tables[0] upward."""
    leaf = [(r.gpa, r.end, r.user, r.writable, r.executable) for r in layout.regions]
    leaf += [(f.gpa, f.gpa + f.size, True, False, False) for f in layout.files]
    chunks = _split_chunks([(start, end) for start, end, *_ in leaf])
    base, size = layout.page_tables
    n_pd = -(-layout.top // (1 << 30))
    n_pt = size // PAGE - n_pd - 2
    assert len(chunks) <= n_pt, (len(chunks), n_pt)
    table_of = {chunk: i for i, chunk in enumerate(chunks)}
    pt = np.zeros(n_pt * 512, dtype=np.uint64)
    pd = np.zeros(n_pd * 512, dtype=np.uint64)            # one entry per 2 MiB chunk
    present = np.uint64(PTE_P | PTE_RW | PTE_US | PTE_A)     # upper levels: the leaves decide
    pd[chunks] = (np.uint64(base) + np.arange(len(chunks), dtype=np.uint64) * np.uint64(PAGE)) | present
    for start, end, user, writable, executable in leaf:
        flags = np.uint64(PTE_P | PTE_A | PTE_D | (PTE_US if user else 0) | (PTE_RW if writable else 0)
                          | (0 if executable else PTE_NX))
        whole = np.arange(-(-start // LARGE_PAGE), end // LARGE_PAGE, dtype=np.uint64)
        pd[whole.astype(np.int64)] = (whole << np.uint64(21)) | flags | np.uint64(PTE_PS)
        for chunk in {start // LARGE_PAGE, (end - 1) // LARGE_PAGE} & table_of.keys():
            lo, hi = max(start, chunk * LARGE_PAGE), min(end, (chunk + 1) * LARGE_PAGE)
            pages = np.arange(lo // PAGE, hi // PAGE, dtype=np.uint64)
            at = table_of[chunk] * 512 + (lo - chunk * LARGE_PAGE) // PAGE
            pt[at:at + pages.size] = (pages << np.uint64(12)) | flags
    pd_gpa = base + pt.size * 8
    pdpt = np.zeros(512, dtype=np.uint64)
    pdpt[:n_pd] = (np.uint64(pd_gpa) + np.arange(n_pd, dtype=np.uint64) * np.uint64(PAGE)) | present
    pml4 = np.zeros(512, dtype=np.uint64)
    pml4[0] = np.uint64(pd_gpa + pd.size * 8) | present
    out = np.concatenate([pt, pd, pdpt, pml4])
    assert out.size * 8 == size, (out.size * 8, size)
    return out


def _segment_descriptor(access, flags):
    """A flat (base 0, limit 0xFFFFF pages) code or data descriptor."""
    return struct.pack("<HHBBBB", 0xFFFF, 0, 0, access, (flags << 4) | 0xF, 0)


def _gdt_and_tss():
    gdt = b"".join([
        bytes(8),
        _segment_descriptor(0x9B, 0xA),   # 0x08 kernel code: P, DPL0, code, accessed; G, L
        _segment_descriptor(0x93, 0xC),   # 0x10 kernel data: P, DPL0, data rw, accessed; G, D/B
        _segment_descriptor(0xF3, 0xC),   # 0x18 user data:   P, DPL3, data rw, accessed; G, D/B
        _segment_descriptor(0xFB, 0xA),   # 0x20 user code:   P, DPL3, code, accessed; G, L
        struct.pack("<HHBBBBIxxxx", TSS_LIMIT & 0xFFFF, TSS_ADDR & 0xFFFF, (TSS_ADDR >> 16) & 0xFF,
                    0x8B, (TSS_LIMIT >> 16) & 0xF, (TSS_ADDR >> 24) & 0xFF, TSS_ADDR >> 32),  # 0x28 busy TSS
    ])
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<Q", tss, 4, EXCEPTION_STACK[1])       # RSP0: the stack for CPL3 -> CPL0
    struct.pack_into("<Q", tss, 36, DOUBLE_FAULT_STACK[1])   # IST1: a known-good stack for #DF
    struct.pack_into("<H", tss, 102, TSS_SIZE)              # I/O map base: right after the TSS
    bitmap = bytearray(b"\xff" * IO_BITMAP_BYTES)
    for port in abi.GUEST_PORTS:
        for p in range(port, port + 4):                      # a 32-bit `out` checks 4 port bits
            bitmap[p // 8] &= ~(1 << (p % 8)) & 0xFF
    return gdt, bytes(tss) + bytes(bitmap) + b"\xff"


def _idt():
    entries = []
    for vector in range(32):
        handler = STUBS_ADDR + vector * STUB_SIZE
        ist = 1 if vector == 8 else 0
        entries.append(struct.pack("<HHBBHII", handler & 0xFFFF, KERNEL_CS, ist, 0x8E,
                                   (handler >> 16) & 0xFFFF, handler >> 32, 0))
    return b"".join(entries)


def _stubs():
    """Machine code for the CPL0 exception entry points. Each vector's stub pushes a zero error
    code if the CPU pushed none, pushes its vector and jumps to the common code, which copies the
    frame and CR2 into the fault record and reports it on WF_PORT_FAULT (the host never resumes)."""
    code = bytearray(b"\xcc" * PAGE)
    common = 32 * STUB_SIZE
    for vector in range(32):
        at = vector * STUB_SIZE
        stub = b"" if vector in VECTORS_WITH_ERROR_CODE else b"\x6a\x00"   # push 0
        stub += bytes([0x6A, vector])                                       # push vector
        rel = common - (at + len(stub) + 5)
        stub += b"\xe9" + struct.pack("<i", rel)                            # jmp common
        code[at:at + len(stub)] = stub
    body = bytearray()
    record = FAULT_RECORD_ADDR
    # frame: vector, error code, rip, cs, rflags, rsp, ss
    for slot in range(7):
        body += b"\x58"                                                     # pop rax
        body += b"\x48\xa3" + struct.pack("<Q", record + 8 * slot)         # mov [record+8*slot], rax
    body += b"\x0f\x20\xd0"                                                 # mov rax, cr2
    body += b"\x48\xa3" + struct.pack("<Q", record + 8 * 7)                # mov [record+56], rax
    body += bytes([0xE6, abi.PORT_FAULT])                                   # out PORT_FAULT, al
    body += b"\xeb\xfe"                                                     # jmp $
    code[common:common + len(body)] = body
    return bytes(code)


FAULT_RECORD = struct.Struct("<8Q")   # vector, error code, rip, cs, rflags, rsp, ss, cr2


def read_fault(mem):
    """(vector, error code, rip, cr2) of the fault the CPL0 stub recorded at FAULT_RECORD_ADDR."""
    vector, error_code, rip, _cs, _rflags, _rsp, _ss, cr2 = FAULT_RECORD.unpack_from(mem, FAULT_RECORD_ADDR)
    return vector, error_code, rip, cr2


def page_fault_access(error_code):
    """What a #PF's error code says: ("write" | "instruction fetch" | "read", whether the page
    was present, i.e. a protection violation rather than a missing mapping)."""
    access = "write" if error_code & 2 else ("instruction fetch" if error_code & 16 else "read")
    return access, bool(error_code & 1)


def write_environment(mem, layout, image):
    """Writes everything the guest needs into fresh (all-zero) guest memory `mem` (a writable
    buffer of layout.memory_size bytes): the image, the info page, descriptor tables, stubs and
    page tables."""
    view = memoryview(mem)
    for seg in image.segments:
        view[seg.vaddr:seg.vaddr + len(seg.data)] = seg.data
    gdt, tss = _gdt_and_tss()
    view[GDT_ADDR:GDT_ADDR + len(gdt)] = gdt
    view[TSS_ADDR:TSS_ADDR + len(tss)] = tss
    idt = _idt()
    view[IDT_ADDR:IDT_ADDR + len(idt)] = idt
    view[STUBS_ADDR:STUBS_ADDR + PAGE] = _stubs()
    info = abi.pack_info(layout)
    view[INFO_ADDR:INFO_ADDR + len(info)] = info
    tables = _page_tables(layout)
    base, size = layout.page_tables
    np.frombuffer(view[base:base + size], dtype=np.uint64)[:] = tables
    view.release()


def sregs_arguments(layout):
    """Keyword arguments for Vcpu.init_long_mode()."""
    return dict(cr0=CR0, cr3=layout.cr3, cr4=CR4, efer=EFER,
                gdt_base=GDT_ADDR, gdt_limit=6 * 8 + 8 - 1, idt_base=IDT_ADDR, idt_limit=32 * 16 - 1,
                tss_base=TSS_ADDR, tss_limit=TSS_LIMIT, tss_selector=TSS_SEL,
                code_selector=USER_CS, data_selector=USER_DS, cpl=3)
