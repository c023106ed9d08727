"""A Linux program's address space: its mappings (VMAs), brk, the 4 KiB page tables the host keeps
for them in guest memory, and the checked copies between guest and host memory (uaccess).

User addresses are identity-mapped: the page at virtual address v, when mapped, is the guest
physical page v. The physical "allocator" is therefore the address space itself: a mapping takes
the pages under it and munmap gives them back. That is deliberate. On a shadow-paging host (PVM)
the hypervisor caches translations it built from the guest page tables and does not see the
host rewrite them; with identity mapping a stale translation can only be more permissive than the
current page table, never point at the wrong page, and the cases that matter (munmap, a
permission taken away, a restore that undoes mappings) are invalidated explicitly through
`_kvm.memory_invalidate` (the MMU notifier). Consequence: virtual addresses are limited to the
guest memory size, which Linux programs do not mind (mmap and the stack are placed by us).

Invariant kept by every operation: a page that is not mapped holds zeros (munmap discards the
pages), so a fresh mapping needs no zeroing and a snapshot need not look at unmapped memory.

All host writes into guest memory go through `fill()`/`store()`, that is through the warm-start
core's one host write (whpfast/core/warm.py), which marks the pages host-dirty for the next
restore (KVM's dirty log sees only the guest's own writes)."""

import os
from bisect import bisect_left, bisect_right
from collections import namedtuple

import numpy as np

from ..abi import PAGE
from ..core.files import shareable
from .errno import LinuxError
import errno as E

# The uaccess methods below run in C (whpfast/_linux.pyx) unless WHPFAST_PURE_PYTHON=1 asks for
# the Python ones (which stay as the reference: tests compare the two, benches time both).
PURE_PYTHON = os.environ.get("WHPFAST_PURE_PYTHON") == "1"
if not PURE_PYTHON:
    from .. import _linux

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D = 0x1, 0x2, 0x4, 0x20, 0x40
PTE_NX = 1 << 63
USER_MIN = 0x10000          # Linux's default vm.mmap_min_addr: the kernel area lies below
MASK64 = (1 << 64) - 1
MAX_MAPPINGS = 65530        # Linux's default vm.max_map_count: also bounds the host's work per call
MAX_CHANGED = 4096          # ranges remembered for the next restore before "all of it" is simpler
SHARE_MIN = 4 * PAGE        # file mappings smaller than this are copied: an mmap costs more
MAPS_TEXT_MAX = 16 << 20    # the longest /proc/self/maps served (65530 mappings of a library: ~10 MB)
MAX_DEAD_NAMES = 1024      # names of mappings gone that _intern may still hold (<= PATH_MAX each)
MAX_SHARED = 256            # host file mappings an address space makes over its memory (each may
                            # split a host mapping, and vm.max_map_count is shared by every
                            # sandbox of the process: core/mapbudget.py); past that, file pages
                            # are copied. A restore takes a run's back, so this bounds one run's
                            # (`import pandas, numpy` makes 99)

# pristine: the pages hold the named file's bytes from offset, untouched (mapped from the file and
# never writable since), so mapping the same file range again over them needs no copy.
Vma = namedtuple("Vma", "start end prot name offset pristine", defaults=(False,))
# One captured state (immutable): what capture() returns and reset() takes.
MmState = namedtuple("MmState", "vmas starts brk_start brk")


def page_table_bytes(memory_size):
    """Size of the complete 4-level tables for memory_size bytes (they sit at the top of it)."""
    n_pt = -(-(memory_size // PAGE) // 512)
    n_pd = -(-n_pt // 512)
    n_pdpt = -(-n_pd // 512)
    return (n_pt + n_pd + n_pdpt + 1) * PAGE


def identity_page_tables(layout):
    """The non-zero page-table pages for [0, layout.top), as [(gpa, bytes)] in ascending order,
    laid out PT, PD, PDPT, PML4 from layout.page_tables[0] upward, with 4 KiB leaves only: entry
    i of the PT maps virtual page i (to physical page i), which _set_ptes rewrites in place. (The
    SDK's tables, machine._page_tables, map whole 2 MiB chunks with 2 MiB pages instead.)

    Only the leaf pages holding the regions' entries are built and returned: the rest of the
    leaf level is zero, which fresh guest memory already is, so constructing a sandbox writes a
    few pages whatever its memory_size (the complete leaf level of 1 GiB is 2 MiB: copying it
    and faulting it in cost ~3 ms of a cold boot). The upper levels are built whole (1/512 of
    the leaves each)."""
    base, size = layout.page_tables
    n_pages = layout.top // PAGE
    n_pt = -(-n_pages // 512)
    pages = {}                              # leaf page-table page index -> its 512 entries
    for r in layout.regions:
        first, count = r.gpa // PAGE, r.size // PAGE
        flags = PTE_P | PTE_A | PTE_D | (PTE_US if r.user else 0) | (PTE_RW if r.writable else 0) \
            | (0 if r.executable else PTE_NX)
        for t in range(first // 512, (first + count - 1) // 512 + 1):
            entries = pages.setdefault(t, np.zeros(512, dtype=np.uint64))
            lo, hi = max(first, t * 512), min(first + count, (t + 1) * 512)
            entries[lo - t * 512:hi - t * 512] = \
                (np.arange(lo, hi, dtype=np.uint64) << np.uint64(12)) | np.uint64(flags)
    out = [(base + t * PAGE, pages[t].tobytes()) for t in sorted(pages)]
    next_gpa = base + n_pt * PAGE
    lower_gpa, lower_count = base, n_pt
    # Upper levels: every entry points to the next lower table page, fully permissive (the leaf
    # entries decide); only entries for existing lower pages are present.
    for _ in range(3):
        n = -(-lower_count // 512) * 512
        level = np.zeros(n, dtype=np.uint64)
        level[:lower_count] = (np.uint64(lower_gpa) + np.arange(lower_count, dtype=np.uint64) * np.uint64(PAGE)) \
            | np.uint64(PTE_P | PTE_RW | PTE_US | PTE_A)
        out.append((next_gpa, level.tobytes()))
        lower_gpa, lower_count = next_gpa, n // 512
        next_gpa += n * 8
    assert next_gpa == base + size, (next_gpa - base, size)
    return out


def py_top_gap(vmas, ceiling, length):
    """The top-down search of find_free over the sorted mappings: (c, True) when the gap below
    ceiling c fits length (the first such from the top), else (c, False) with c where the walk
    stopped: the lowest mapping's start, or the first below length (nothing fits below it). In
    C: _linux.top_gap (the Python walk cost ~25 us of each mmap once `import pandas` had ~500
    mappings; 0 < length <= ceiling)."""
    for v in reversed(vmas):
        if v.start >= ceiling:
            continue
        if ceiling < length:
            break
        if v.end <= ceiling - length:
            return ceiling, True
        ceiling = v.start
    return ceiling, False


top_gap = py_top_gap if PURE_PYTHON else _linux.top_gap


def page_up(n):
    return (n + PAGE - 1) & ~(PAGE - 1)


def _efault(what="bad address"):
    return LinuxError(E.EFAULT, what)


class AddressSpace:
    """warm: the sandbox's WarmMemory (whpfast/core/warm.py), whose memory this is; pt_base: where
    the leaf page-table entries start (entry i maps virtual page i); top: the first address user
    mappings may not reach (the page tables live above it); invalidate(offset, length, discard): the hypervisor hook
    (see the module docstring); populate(offset, length): faults host pages in ahead of use;
    overlay(fd, file offset, offset, length): maps a host file copy-on-write over guest memory
    (GuestMemory.overlay_file), None where the backend cannot (WHP: file pages are copied);
    overlaid: the memory already holds file mappings at places not known here (a snapshot
    file's image), so no discard may assume a range is anonymous; anonymize(offset, length):
    fresh anonymous memory over a range (GuestMemory.anonymize), which undoes overlays
    (revert_overlays); None with overlay.

    Host mappings: each overlay is a host mapping of its own in this process (and splits the
    guest memory's), and vm.max_map_count (65530) is shared by every sandbox of the process.
    They are host state, not the program's, but a restore must not keep what the program made:
    revert_overlays() puts anonymous memory back over every overlay made (or split by a
    discard) since the snapshot, so the host mappings are the snapshot's again."""

    POPULATE_MAX = 4 << 20      # mappings up to this size are faulted in on the host at once

    def __init__(self, warm, pt_base, top, invalidate, populate=lambda offset, length: None,
                 overlay=None, overlaid=False, anonymize=None):
        self.warm = warm
        self.mem = warm.mem
        self.pt_base = pt_base
        self.top = top
        self.invalidate = invalidate
        self.populate = populate
        self.overlay = overlay
        self.anonymize = anonymize
        self.shared = 0                   # host file mappings made (bounded by MAX_SHARED)
        # The ranges _share mapped from host files (sorted, disjoint), and those of them a
        # discard may have split since (a fresh anonymous mapping over part of one): what
        # revert_overlays() can undo. The image of a snapshot file is not among them.
        self.overlays, self.split = [], []
        # Where host files are mapped over the memory (sorted, disjoint (start, end)), or None:
        # unknown. Host state, not the program's: restores leave it as it is. A discard outside
        # them frees the pages (MADV_DONTNEED); inside, that would bring the file's bytes back.
        self.files = None if overlaid else []
        self.changed = []                 # (start, end) whose entries changed since the baseline
        # The mappings, sorted, as lists changed in place (a call costs one memmove, not a copy
        # of every mapping), and the brk. capture() freezes them into an MmState.
        self.vmas, self.starts = [], []
        self.brk_start = self.brk_now = 0
        self._frozen = None               # the MmState they equal, if unchanged since
        self.mmap_top = top
        self._names, self._names_max = {}, MAX_DEAD_NAMES     # see _intern

    # -- capture / reset -----------------------------------------------------------------------

    def capture(self):
        if self._frozen is None:
            self._frozen = MmState(tuple(self.vmas), tuple(self.starts), self.brk_start, self.brk_now)
        return self._frozen

    def reset(self, state):
        """Back to a captured state; free when nothing changed since it was captured or reset."""
        if state is not self._frozen:
            self.vmas, self.starts = list(state.vmas), list(state.starts)
            self.brk_start, self.brk_now = state.brk_start, state.brk
            self._frozen = state

    # -- host writes ---------------------------------------------------------------------------

    def fill(self, addr, n, writer):
        """A host write into guest memory (physical == virtual for user pages): writer(view)
        writes into a view of [addr, addr+n) and returns how many bytes it wrote, and those pages
        are marked for the next restore (WarmMemory.write). No permission check (the loader
        writes read-only segments through it); bounds checked."""
        if n <= 0:
            return 0

        def write(mem, base, size):
            view = mem[base:base + size]
            try:
                return writer(view)
            finally:
                view.release()
        return self.warm.write(addr, n, write)

    def store(self, addr, data):
        """Copies data into guest memory at addr (through fill())."""
        def copy(view):
            view[:] = data
            return len(data)
        self.fill(addr, len(data), copy)

    # -- uaccess ----------------------------------------------------------------------------------

    def check(self, addr, n, write=False):
        """Raises EFAULT unless [addr, addr+n) is mapped (and writable if write)."""
        if n <= 0:
            if n < 0:
                raise _efault()
            return
        end = addr + n
        if addr < USER_MIN or end > self.top:
            raise _efault()
        vmas = self.vmas
        i = bisect_right(self.starts, addr) - 1
        need = PROT_WRITE if write else (PROT_READ | PROT_WRITE | PROT_EXEC)
        while True:
            if i < 0 or i >= len(vmas):
                raise _efault()
            v = vmas[i]
            if not v.start <= addr < v.end or not v.prot & need:
                raise _efault()
            if v.end >= end:
                return
            addr = v.end
            i += 1

    def read(self, addr, n):
        self.check(addr, n)
        return bytes(self.mem[addr:addr + n])

    def write(self, addr, data):
        self.check(addr, len(data), write=True)
        self.store(addr, data)

    def view(self, addr, n, write=False):
        """A memoryview of checked guest memory, for reads straight into it (mark() it after)."""
        self.check(addr, n, write)
        return self.mem[addr:addr + n]

    def read_cstring(self, addr, limit=4096):
        """A NUL-terminated string (without the NUL); ENAMETOOLONG past limit bytes."""
        out = bytearray()
        while True:
            chunk_end = min((addr // PAGE + 1) * PAGE, addr + limit - len(out))
            self.check(addr, max(chunk_end - addr, 1))
            chunk = bytes(self.mem[addr:chunk_end])
            nul = chunk.find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                return bytes(out)
            out += chunk
            addr = chunk_end
            if len(out) >= limit:
                raise LinuxError(E.ENAMETOOLONG, "string too long")

    def read_u64s(self, addr, count):
        return np.frombuffer(self.read(addr, 8 * count), dtype="<u8").tolist()

    # The same six in C (same checks, same errors), and the Python ones kept as py_* (tests).
    py_check, py_read, py_write, py_view, py_read_cstring, py_read_u64s = \
        check, read, write, view, read_cstring, read_u64s
    if not PURE_PYTHON:
        check, read, write, view, read_cstring, read_u64s = (
            _linux.check, _linux.read, _linux.write, _linux.view, _linux.read_cstring, _linux.read_u64s)

    # -- page tables --------------------------------------------------------------------------

    def _set_ptes(self, start, end, prot):
        first, last = start // PAGE, end // PAGE
        if prot & (PROT_READ | PROT_WRITE | PROT_EXEC):
            flags = PTE_P | PTE_US | PTE_A | PTE_D | (PTE_RW if prot & PROT_WRITE else 0) \
                | (0 if prot & PROT_EXEC else PTE_NX)
            entries = ((np.arange(first, last, dtype=np.uint64) << np.uint64(12)) | np.uint64(flags)).tobytes()
        else:
            entries = bytes(8 * (last - first))
        self.store(self.pt_base + first * 8, entries)       # leaf entry i maps virtual page i
        if len(self.changed) < MAX_CHANGED:
            self.changed.append((start, end))
        else:
            self.changed = [(USER_MIN, self.top)]

    # -- mappings -----------------------------------------------------------------------------

    def _span(self, start, end):
        """Indexes [i, j) of the VMAs that overlap [start, end) (binary search: a call's work
        does not grow with the number of mappings, save for one tuple copy)."""
        vmas, starts = self.vmas, self.starts
        i = bisect_right(starts, start) - 1
        if i < 0 or vmas[i].end <= start:
            i += 1
        return i, bisect_left(starts, end, lo=i)

    def _pieces(self, start, end):
        """The parts of the VMAs inside [start, end)."""
        i, j = self._span(start, end)
        out = []
        for v in self.vmas[i:j]:
            lo, hi = max(v.start, start), min(v.end, end)
            out.append(v._replace(start=lo, end=hi, offset=v.offset + (lo - v.start)))
        return out

    def _replace(self, start, end, new):
        """How to cut [start, end) out of the VMA list (partly covered VMAs split) and put `new`
        VMAs in, neighbours merged: returns ((lo, hi, the VMAs for vmas[lo:hi]), removed pieces)."""
        vmas = self.vmas
        i, j = self._span(start, end)
        middle, removed = [], self._pieces(start, end)
        for v in vmas[i:j]:
            if v.start < start:
                middle.append(v._replace(end=start))
            if v.end > end:
                middle.append(v._replace(start=end, offset=v.offset + (end - v.start)))
        middle.extend(new)
        lo, hi = max(i - 1, 0), min(j + 1, len(vmas))
        window = sorted(vmas[lo:i] + middle + vmas[j:hi])
        merged = []
        for v in window:
            p = merged[-1] if merged else None
            if p and p.end == v.start and p.prot == v.prot and p.name == v.name and p.pristine == v.pristine \
                    and (not v.name.startswith(b"/") or p.offset + (p.end - p.start) == v.offset):
                merged[-1] = p._replace(end=v.end)
            else:
                merged.append(v)
        return (lo, hi, merged), removed

    def _commit(self, plan):
        lo, hi, merged = plan
        if len(self.vmas) - (hi - lo) + len(merged) > MAX_MAPPINGS:
            raise LinuxError(E.ENOMEM, f"more than {MAX_MAPPINGS} mappings (Linux's vm.max_map_count)")
        self.vmas[lo:hi] = merged
        self.starts[lo:hi] = [v.start for v in merged]
        self._frozen = None

    def _discard(self, pieces):
        """Unmapped pages: zero them (keeping the invariant), make the hypervisor forget them,
        and have the next restore copy back the ones the baseline holds non-zero."""
        for v in pieces:
            if self.overlays and _overlapping(self.overlays, v.start, v.end):
                self.split = _union(self.split, _overlapping(self.overlays, v.start, v.end))
            # A fresh mapping over file pages (which frees them) splits a host mapping: only
            # where revert_overlays() undoes it, never over a snapshot file's image.
            self.invalidate(v.start, v.end - v.start, True, self._anonymous(v.start, v.end),
                            self.files is not None)
            if self.warm.baseline is not None:
                self.warm.mark(v.start, v.end, only=self.warm.baseline._nonzero)

    def _anonymous(self, start, end):
        """Whether no host file is mapped over any page of [start, end)."""
        files = self.files
        if files is None:
            return False
        i = bisect_left(files, (end,)) - 1          # the last range starting before end
        return i < 0 or files[i][1] <= start

    def _add_file_range(self, lo, hi):
        files = self.files
        if files is None:
            return
        i = bisect_left(files, (lo,))
        if i and files[i - 1][1] >= lo:             # merge with the neighbours it touches
            i -= 1
            lo = files[i][0]
        j = i
        while j < len(files) and files[j][0] <= hi:
            hi = max(hi, files[j][1])
            j += 1
        files[i:j] = [(lo, hi)]

    # -- host mappings --------------------------------------------------------------------

    def overlay_state(self):
        """What revert_overlays() needs of now (a snapshot's moment): the overlays that are
        whole host mappings, and the count of them MAX_SHARED bounds."""
        return tuple(_subtract(self.overlays, self.split)), self.shared

    def revert_overlays(self, state, nonzero):
        """Before a restore to a snapshot whose overlay_state() was `state` (None: not known,
        another sandbox's snapshot): anonymous memory over every overlay made or split since,
        its pages marked for the restore to put back (those non-zero in the snapshot's image,
        `nonzero`; the rest are zero now, as they must be). Leaves the overlays the snapshot had
        whole, and the host mappings no more than the snapshot's."""
        if not self.overlays:
            return
        keep, shared = state if state is not None else ((), 0)
        if tuple(self.overlays) == tuple(keep):    # the warm path: nothing made or split since
            self.split = []
            self.shared = min(self.shared, shared)
            return
        for lo, hi in _subtract(self.overlays, keep):
            self.anonymize(lo, hi - lo)
            self.warm.mark(lo, hi, only=nonzero)
            if self.files is not None:
                self.files = _subtract(self.files, [(lo, hi)])
        self.overlays = _intersect(self.overlays, keep)
        self.split = []
        self.shared = min(self.shared, shared)

    def drop(self, addr, length):
        """MADV_DONTNEED: anonymous private pages in the range read as zero again (file-backed
        ones keep their copied contents)."""
        end = addr + page_up(length)
        pieces = self._pieces(addr, end)
        if sum(v.end - v.start for v in pieces) != end - addr:
            raise LinuxError(E.ENOMEM, "madvise over unmapped pages")
        self._discard([v for v in pieces if not v.name.startswith(b"/")])

    def mapped(self, start, end):
        """Whether any page of [start, end) is mapped."""
        i, j = self._span(start, end)
        return j > i

    def find_free(self, length, hint=0):
        """A free range of length bytes: at hint if it is free, else the highest gap below the
        mmap top (top-down, as Linux places mmaps). ENOMEM when none is left."""
        if hint and hint % PAGE == 0 and USER_MIN <= hint and hint + length <= self.mmap_top \
                and not self.mapped(hint, hint + length):
            return hint
        if 0 < length <= self.mmap_top:
            ceiling, found = top_gap(self.vmas, self.mmap_top, length)
            if found or ceiling - length >= max(USER_MIN, self._brk_floor()):
                return ceiling - length
        raise LinuxError(E.ENOMEM, f"no free range of {length:#x} bytes left in the address space")

    def _brk_floor(self):
        # keep a gap above the heap so brk can grow a little
        return page_up(self.brk_now) + (1 << 20) if self.brk_now else USER_MIN

    def map(self, addr, length, prot, *, fixed=False, noreplace=False, name=b"", offset=0):
        """Maps fresh (zero) pages; returns the address. Contents come later through store()."""
        return self.map_file(addr, length, prot, fixed=fixed, noreplace=noreplace, name=name,
                             offset=offset, pristine=False)[0]

    def map_file(self, addr, length, prot, *, fixed=False, noreplace=False, name=b"", offset=0,
                 pristine=True, host=None):
        """map() for a file's bytes: returns (address, ranges that already hold exactly those
        bytes). Those are the pages of a pristine mapping of the same file range that this one
        replaces (ld.so maps a library whole, then each segment over it): they are kept instead
        of being dropped and copied again; and, for a read-only mapping of a host file (host:
        (fd, size)), the pages mapped from the file itself (_share)."""
        if length <= 0:
            raise LinuxError(E.EINVAL, "zero-length mapping")
        length = page_up(length)
        if fixed:
            if addr % PAGE:
                raise LinuxError(E.EINVAL, "unaligned fixed address")
            if addr < USER_MIN or addr + length > self.top:
                raise LinuxError(E.ENOMEM, f"{addr:#x}+{length:#x} is outside the address space "
                                           f"(user addresses end at {self.top:#x}: memory_size)")
            if noreplace and self.mapped(addr, addr + length):
                raise LinuxError(E.EEXIST, "range already mapped")
        else:
            addr = self.find_free(length, addr & ~(PAGE - 1))
        end = addr + length
        pristine = pristine and not prot & PROT_WRITE
        name = self._intern(name)
        plan, removed = self._replace(addr, end, [Vma(addr, end, prot, name, offset, pristine)])
        reuse = [v for v in removed if pristine and v.pristine and v.name == name
                 and v.offset - v.start == offset - addr]
        self._commit(plan)                        # first: it may refuse (too many mappings)
        self._discard([v for v in removed if v not in reuse])
        self._set_ptes(addr, end, prot)
        kept = [(v.start, v.end) for v in reuse]
        shared = self._share(addr, end, offset, kept, host) if pristine and host is not None else []
        if prot and length <= self.POPULATE_MAX and not shared:
            self.populate(addr, length)
        for v in reuse:
            if v.prot & ~prot:          # a right taken away: see protect()
                self.invalidate(v.start, v.end - v.start, False)
        return addr, kept + shared

    def _share(self, addr, end, offset, kept, host):
        """Maps the host file copy-on-write over the fresh pages of a new read-only mapping of it
        [addr, end) at file offset `offset` (outside the `kept` ranges), instead of copying it
        in: the guest reads the host's page cache, shared with every process, and a write
        (after mprotect) makes a private copy on the host. Not for small or unaligned parts,
        files others may write (shareable), past MAX_SHARED, or where the backend cannot (WHP).
        Pages past the end of the file stay anonymous (zero); the last partial page reads zero
        past the end (the kernel fills it). The hypervisor's dirty log does not see this change
        of contents: the pages are marked host-written, so a restore puts the snapshot's back.
        Returns the ranges mapped."""
        if self.overlay is None or offset % PAGE or self.shared >= MAX_SHARED:
            return []
        fd = host[0]
        st = os.fstat(fd)                 # the size now, not as the file was looked up
        if not shareable(st):
            return []
        file_end = min(end, addr + page_up(max(st.st_size - offset, 0)))
        out, lo = [], addr
        for k_lo, k_hi in sorted(kept) + [(file_end, file_end)]:
            hi = min(k_lo, file_end)
            if hi - lo >= SHARE_MIN and self.shared < MAX_SHARED:
                self.overlay(fd, offset + (lo - addr), lo, hi - lo)
                self.shared += 1
                self._add_file_range(lo, hi)
                self.overlays = _union(self.overlays, [(lo, hi)])
                self.warm.mark(lo, hi)
                out.append((lo, hi))
            lo = max(lo, k_hi)
        return out

    def _intern(self, name):
        """One bytes object per distinct mapping name: the many mappings of one file (and the
        pieces mprotect splits off, which keep their VMA's name) share it, where each mmap
        used to keep a fresh copy of the path. The table is rebuilt from the live mappings
        once MAX_DEAD_NAMES more names were added, so names of mappings gone do not pile up:
        names cost the host at most (mappings + MAX_DEAD_NAMES) x PATH_MAX bytes."""
        hit = self._names.get(name)
        if hit is None:
            if len(self._names) >= self._names_max:
                self._names = {v.name: v.name for v in self.vmas}
                self._names_max = len(self._names) + MAX_DEAD_NAMES
            hit = self._names[name] = name
        return hit

    def unmap(self, addr, length):
        if addr % PAGE or length <= 0:
            raise LinuxError(E.EINVAL, "bad munmap range")
        end = min(addr + page_up(length), self.top)
        if addr >= end:
            return
        plan, removed = self._replace(addr, end, [])
        if removed:
            self._commit(plan)
            for v in removed:
                self._set_ptes(v.start, v.end, 0)
            self._discard(removed)

    def protect(self, addr, length, prot):
        if addr % PAGE:
            raise LinuxError(E.EINVAL, "unaligned mprotect")
        end = addr + page_up(length)
        if end == addr:
            return
        if addr < USER_MIN or end > self.top:
            raise LinuxError(E.ENOMEM, "mprotect outside the address space")
        pieces = self._pieces(addr, end)
        covered = sum(v.end - v.start for v in pieces)
        if covered != end - addr:
            raise LinuxError(E.ENOMEM, "mprotect over unmapped pages")
        plan, _ = self._replace(addr, end, [v._replace(prot=prot, pristine=v.pristine and not prot & PROT_WRITE)
                                             for v in pieces])
        self._commit(plan)
        for v in pieces:
            self._set_ptes(v.start, v.end, prot)
            if v.prot & ~prot:
                # a permission taken away: drop translations the hypervisor may still hold
                self.invalidate(v.start, v.end - v.start, False)

    def remap(self, old, old_len, new_len, may_move, fixed_to=None):
        """mremap: shrink in place, grow in place when the pages after are free, else move (copy,
        then unmap the old range) if allowed."""
        if old % PAGE or new_len <= 0:
            raise LinuxError(E.EINVAL, "bad mremap arguments")
        old_len, new_len = page_up(old_len), page_up(new_len)
        pieces = self._pieces(old, old + old_len)
        if len(pieces) != 1 or pieces[0].end - pieces[0].start != old_len:
            raise LinuxError(E.EFAULT, "mremap of a range that is not one mapping")
        v = pieces[0]
        if fixed_to is None:
            if new_len <= old_len:
                if new_len < old_len:
                    self.unmap(old + new_len, old_len - new_len)
                return old
            if old + new_len <= self.top and not self.mapped(old + old_len, old + new_len):
                self.map(old + old_len, new_len - old_len, v.prot, fixed=True, name=v.name,
                         offset=v.offset + old_len)
                return old
            if not may_move:
                raise LinuxError(E.ENOMEM, "cannot grow the mapping in place")
            new = self.find_free(new_len)
        else:
            new = fixed_to
            if new % PAGE or max(old, new) < min(old, new) + max(old_len, new_len):
                raise LinuxError(E.EINVAL, "bad mremap target")
        self.map(new, new_len, v.prot, fixed=True, name=v.name, offset=v.offset)
        keep = min(old_len, new_len)
        self.store(new, self.mem[old:old + keep])
        self.unmap(old, old_len)
        return new

    # -- brk ----------------------------------------------------------------------------------

    def set_brk_start(self, addr):
        self.brk_start = self.brk_now = addr
        self._frozen = None

    def brk(self, want):
        current = self.brk_now
        if want < self.brk_start or want > self.top:
            return current
        old_end, new_end = page_up(current), page_up(want)
        try:
            if new_end > old_end:
                if self.mapped(old_end, new_end):
                    return current
                self.map(old_end, new_end - old_end, PROT_READ | PROT_WRITE, fixed=True, name=b"[heap]")
            elif new_end < old_end:
                self.unmap(new_end, old_end - new_end)
        except LinuxError:
            return current
        self.brk_now = want
        self._frozen = None
        return want

    # -- /proc/self/maps ----------------------------------------------------------------------

    def maps_text(self):
        """/proc/self/maps: names as the bytes they are (Linux shows them so, a newline as
        \\012). ENOMEM past MAPS_TEXT_MAX bytes (65530 mappings named by 4 KiB paths would
        make 270 MB), before more is built."""
        lines, size = [], 0
        for v in self.vmas:
            perms = ("r" if v.prot & (PROT_READ | PROT_WRITE | PROT_EXEC) else "-") + \
                ("w" if v.prot & PROT_WRITE else "-") + ("x" if v.prot & PROT_EXEC else "-") + "p"
            line = f"{v.start:08x}-{v.end:08x} {perms} {v.offset:08x} 00:00 0".encode()
            if v.name:
                line += b" " * 10 + v.name.replace(b"\n", b"\\012")
            size += len(line) + 1
            if size > MAPS_TEXT_MAX:
                raise LinuxError(E.ENOMEM, f"/proc/self/maps would be over {MAPS_TEXT_MAX >> 20} MiB")
            lines.append(line)
        return b"\n".join(lines) + b"\n" if lines else b""


# -- sets of ranges: sorted lists of disjoint (start, end), few (overlays) -------------------------

def _union(a, b):
    """Overlapping ranges merged; adjacent ones stay apart (each overlay is its own host
    mapping, kept or undone on its own)."""
    out = []
    for lo, hi in sorted(a + b):
        if out and lo < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _subtract(a, b):
    """The parts of the ranges a outside the ranges b."""
    out = []
    for lo, hi in a:
        for b_lo, b_hi in b:
            if b_hi <= lo or b_lo >= hi:
                continue
            if b_lo > lo:
                out.append((lo, b_lo))
            lo = max(lo, b_hi)
            if lo >= hi:
                break
        if lo < hi:
            out.append((lo, hi))
    return out


def _intersect(a, b):
    return _subtract(a, _subtract(a, b))


def _overlapping(ranges, start, end):
    """The ranges that share a page with [start, end)."""
    i = bisect_left(ranges, (start,))
    if i and ranges[i - 1][1] > start:
        i -= 1
    j = i
    while j < len(ranges) and ranges[j][0] < end:
        j += 1
    return ranges[i:j]
