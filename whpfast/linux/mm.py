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

All host writes into guest memory go through `store()`, which marks the pages host-dirty for the
next restore (KVM's dirty log sees only the guest's own writes)."""

from bisect import bisect_right
from collections import namedtuple

import numpy as np

from .errno import LinuxError
import errno as E

PAGE = 4096
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D = 0x1, 0x2, 0x4, 0x20, 0x40
PTE_NX = 1 << 63
USER_MIN = 0x10000          # Linux's default vm.mmap_min_addr: the kernel area lies below
MASK64 = (1 << 64) - 1

# pristine: the pages hold the named file's bytes from offset, untouched (mapped from the file and
# never writable since), so mapping the same file range again over them needs no copy.
Vma = namedtuple("Vma", "start end prot name offset pristine", defaults=(False,))
# One captured state: immutable, so capture is a reference and reset a reassignment.
MmState = namedtuple("MmState", "vmas starts brk_start brk")


def page_table_bytes(memory_size):
    """Size of the complete 4-level tables for memory_size bytes (they sit at the top of it)."""
    n_pt = -(-(memory_size // PAGE) // 512)
    n_pd = -(-n_pt // 512)
    n_pdpt = -(-n_pd // 512)
    return (n_pt + n_pd + n_pdpt + 1) * PAGE


def page_up(n):
    return (n + PAGE - 1) & ~(PAGE - 1)


def _efault(what="bad address"):
    return LinuxError(E.EFAULT, what)


class AddressSpace:
    """mem: a writable memoryview of the whole guest memory; pte: a uint64 numpy view of the leaf
    page-table entries (entry i maps virtual page i); top: the first address user mappings may not
    reach (the page tables live there); invalidate(offset, length, discard): the hypervisor hook
    (see the module docstring); populate(offset, length): faults host pages in ahead of use."""

    POPULATE_MAX = 4 << 20      # mappings up to this size are faulted in on the host at once

    def __init__(self, mem, pte, pt_base, top, invalidate, populate=lambda offset, length: None):
        self.mem = mem
        self.pte = pte
        self.pt_base = pt_base
        self.top = top
        self.invalidate = invalidate
        self.populate = populate
        pages = len(mem) // PAGE
        self.host_dirty = np.zeros((pages + 63) // 64, dtype=np.uint64)
        self.baseline_nonzero = None      # the baseline snapshot's non-zero pages, if any
        self.changed = []                 # (start, end) whose entries changed since the baseline
        self.state = MmState((), (), 0, 0)
        self.mmap_top = top

    # -- capture / reset -----------------------------------------------------------------------

    def capture(self):
        return self.state

    def reset(self, state):
        self.state = state

    @property
    def vmas(self):
        return self.state.vmas

    # -- host-dirty bookkeeping ----------------------------------------------------------------

    @staticmethod
    def _words(start, end):
        """(first word, end word, per-word masks) of the page bits of [start, end)."""
        p0, p1 = start // PAGE, (end + PAGE - 1) // PAGE
        w0, w1 = p0 >> 6, ((p1 - 1) >> 6) + 1
        masks = np.full(w1 - w0, MASK64, dtype=np.uint64)
        masks[0] &= np.uint64((MASK64 << (p0 & 63)) & MASK64)
        masks[-1] &= np.uint64(MASK64 >> (63 - ((p1 - 1) & 63)))
        return w0, w1, masks

    def mark(self, start, end, only=None):
        """Marks the pages of [start, end) as written by the host (only those set in the bitmap
        `only`, if given)."""
        if end <= start:
            return
        p0, p1 = start // PAGE, (end + PAGE - 1) // PAGE
        if p0 >> 6 == (p1 - 1) >> 6:              # the common case: pages of one bitmap word
            mask = ((1 << (p1 - p0)) - 1) << (p0 & 63)
            if only is not None:
                mask &= int(only[p0 >> 6])
            self.host_dirty[p0 >> 6] |= np.uint64(mask)
            return
        w0, w1, masks = self._words(start, end)
        if only is not None:
            masks &= only[w0:w1]
        self.host_dirty[w0:w1] |= masks

    def store(self, addr, data):
        """THE host write into guest memory (physical == virtual for user pages): no permission
        check (the loader writes read-only segments through it), bounds checked by the slice."""
        n = len(data)
        if n:
            if addr < 0 or addr + n > len(self.mem):
                raise ValueError(f"host store {addr:#x}+{n:#x} outside guest memory")
            self.mem[addr:addr + n] = data
            self.mark(addr, addr + n)

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
        vmas = self.state.vmas
        i = bisect_right(self.state.starts, addr) - 1
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

    # -- page tables --------------------------------------------------------------------------

    def _set_ptes(self, start, end, prot):
        first, last = start // PAGE, end // PAGE
        if prot & (PROT_READ | PROT_WRITE | PROT_EXEC):
            flags = PTE_P | PTE_US | PTE_A | PTE_D | (PTE_RW if prot & PROT_WRITE else 0) \
                | (0 if prot & PROT_EXEC else PTE_NX)
            self.pte[first:last] = (np.arange(first, last, dtype=np.uint64) << np.uint64(12)) \
                | np.uint64(flags)
        else:
            self.pte[first:last] = 0
        self.mark(self.pt_base + first * 8, self.pt_base + last * 8)
        self.changed.append((start, end))

    # -- mappings -----------------------------------------------------------------------------

    def _replace(self, start, end, new):
        """The VMA list with [start, end) cut out (partly covered VMAs split) and `new` VMAs put
        in; returns (state vmas, the removed pieces)."""
        kept, removed = [], []
        for v in self.state.vmas:
            if v.end <= start or v.start >= end:
                kept.append(v)
                continue
            if v.start < start:
                kept.append(v._replace(end=start))
            if v.end > end:
                kept.append(v._replace(start=end, offset=v.offset + (end - v.start)))
            lo, hi = max(v.start, start), min(v.end, end)
            removed.append(v._replace(start=lo, end=hi, offset=v.offset + (lo - v.start)))
        kept.extend(new)
        kept.sort()
        merged = []
        for v in kept:
            p = merged[-1] if merged else None
            if p and p.end == v.start and p.prot == v.prot and p.name == v.name and p.pristine == v.pristine \
                    and (not v.name.startswith(b"/") or p.offset + (p.end - p.start) == v.offset):
                merged[-1] = p._replace(end=v.end)
            else:
                merged.append(v)
        return merged, removed

    def _commit(self, vmas, brk_start=None, brk=None):
        s = self.state
        self.state = MmState(tuple(vmas), tuple(v.start for v in vmas),
                             s.brk_start if brk_start is None else brk_start, s.brk if brk is None else brk)

    def _discard(self, pieces):
        """Unmapped pages: zero them (keeping the invariant), make the hypervisor forget them,
        and have the next restore copy back the ones the baseline holds non-zero."""
        for v in pieces:
            self.invalidate(v.start, v.end - v.start, True)
            if self.baseline_nonzero is not None:
                self.mark(v.start, v.end, only=self.baseline_nonzero)

    def drop(self, addr, length):
        """MADV_DONTNEED: anonymous private pages in the range read as zero again (file-backed
        ones keep their copied contents)."""
        end = addr + page_up(length)
        _, pieces = self._replace(addr, end, [])
        if sum(v.end - v.start for v in pieces) != end - addr:
            raise LinuxError(E.ENOMEM, "madvise over unmapped pages")
        self._discard([v for v in pieces if not v.name.startswith(b"/")])

    def mapped(self, start, end):
        """Whether any page of [start, end) is mapped."""
        i = bisect_right(self.state.starts, start) - 1
        i = max(i, 0)
        for v in self.state.vmas[i:]:
            if v.start >= end:
                return False
            if v.end > start:
                return True
        return False

    def find_free(self, length, hint=0):
        """A free range of length bytes: at hint if it is free, else the highest gap below the
        mmap top (top-down, as Linux places mmaps). ENOMEM when none is left."""
        if hint and hint % PAGE == 0 and USER_MIN <= hint and hint + length <= self.mmap_top \
                and not self.mapped(hint, hint + length):
            return hint
        ceiling = self.mmap_top
        for v in reversed(self.state.vmas):
            if v.start >= ceiling:
                continue
            if v.end <= ceiling - length:
                return ceiling - length
            ceiling = min(ceiling, v.start)
        if ceiling - length >= max(USER_MIN, self._brk_floor()):
            return ceiling - length
        raise LinuxError(E.ENOMEM, f"no free range of {length:#x} bytes left in the address space")

    def _brk_floor(self):
        # keep a gap above the heap so brk can grow a little
        return page_up(self.state.brk) + (1 << 20) if self.state.brk else USER_MIN

    def map(self, addr, length, prot, *, fixed=False, noreplace=False, name=b"", offset=0):
        """Maps fresh (zero) pages; returns the address. Contents come later through store()."""
        return self.map_file(addr, length, prot, fixed=fixed, noreplace=noreplace, name=name,
                             offset=offset, pristine=False)[0]

    def map_file(self, addr, length, prot, *, fixed=False, noreplace=False, name=b"", offset=0,
                 pristine=True):
        """map() for a file's bytes: returns (address, ranges that already hold exactly those
        bytes). Those are the pages of a pristine mapping of the same file range that this one
        replaces (ld.so maps a library whole, then each segment over it): they are kept instead
        of being dropped and copied again."""
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
        vmas, removed = self._replace(addr, end, [Vma(addr, end, prot, name, offset, pristine)])
        reuse = [v for v in removed if pristine and v.pristine and v.name == name
                 and v.offset - v.start == offset - addr]
        self._discard([v for v in removed if v not in reuse])
        self._commit(vmas)
        self._set_ptes(addr, end, prot)
        if prot and length <= self.POPULATE_MAX:
            self.populate(addr, length)
        for v in reuse:
            if v.prot & ~prot:          # a right taken away: see protect()
                self.invalidate(v.start, v.end - v.start, False)
        return addr, [(v.start, v.end) for v in reuse]

    def unmap(self, addr, length):
        if addr % PAGE or length <= 0:
            raise LinuxError(E.EINVAL, "bad munmap range")
        end = min(addr + page_up(length), self.top)
        if addr >= end:
            return
        vmas, removed = self._replace(addr, end, [])
        if removed:
            self._commit(vmas)
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
        _, pieces = self._replace(addr, end, [])
        covered = sum(v.end - v.start for v in pieces)
        if covered != end - addr:
            raise LinuxError(E.ENOMEM, "mprotect over unmapped pages")
        vmas, _ = self._replace(addr, end, [v._replace(prot=prot, pristine=v.pristine and not prot & PROT_WRITE)
                                             for v in pieces])
        self._commit(vmas)
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
        _, pieces = self._replace(old, old + old_len, [])
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
        self._commit(list(self.state.vmas), brk_start=addr, brk=addr)

    def brk(self, want):
        s = self.state
        if want < s.brk_start or want > self.top:
            return s.brk
        old_end, new_end = page_up(s.brk), page_up(want)
        try:
            if new_end > old_end:
                if self.mapped(old_end, new_end):
                    return s.brk
                self.map(old_end, new_end - old_end, PROT_READ | PROT_WRITE, fixed=True, name=b"[heap]")
            elif new_end < old_end:
                self.unmap(new_end, old_end - new_end)
        except LinuxError:
            return s.brk
        self._commit(list(self.state.vmas), brk=want)
        return want

    # -- /proc/self/maps ----------------------------------------------------------------------

    def maps_text(self):
        lines = []
        for v in self.state.vmas:
            perms = ("r" if v.prot & (PROT_READ | PROT_WRITE | PROT_EXEC) else "-") + \
                ("w" if v.prot & PROT_WRITE else "-") + ("x" if v.prot & PROT_EXEC else "-") + "p"
            name = v.name.decode("utf-8", "replace")
            lines.append(f"{v.start:08x}-{v.end:08x} {perms} {v.offset:08x} 00:00 0"
                         + (f"{'':<10}{name}" if name else ""))
        return ("\n".join(lines) + "\n").encode() if lines else b""
