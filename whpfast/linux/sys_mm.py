"""The memory calls: mappings, protection, the break. Handlers take the Task
(whpfast/linux/task.py) and the raw argument registers."""

import errno as E
import os

from .mm import PAGE, PROT_EXEC, PROT_READ, PROT_WRITE
from .task import fail, s32

MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x1, 0x2, 0x10, 0x20
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2


def _prot(prot):
    if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC | 0x01000000 | 0x02000000):   # GROWSDOWN/UP
        fail(E.EINVAL)
    return prot & (PROT_READ | PROT_WRITE | PROT_EXEC)


def sys_mmap(t, addr, length, prot, flags, fd, offset, *_):
    prot, flags, fd = _prot(prot), s32(flags), s32(fd)
    if length == 0 or offset % PAGE or not flags & (MAP_SHARED | MAP_PRIVATE):
        fail(E.EINVAL)
    if length > t.mm.top:
        fail(E.ENOMEM)
    if offset + length >= 1 << 63:
        fail(E.EOVERFLOW)
    fixed = bool(flags & (MAP_FIXED | MAP_FIXED_NOREPLACE))
    anonymous = bool(flags & MAP_ANONYMOUS)
    host = name = None
    if not anonymous:
        if flags & MAP_SHARED and prot & PROT_WRITE:
            fail(E.ENODEV, "writable shared file mappings are not supported")
        host = t.fs.host_file(fd)             # EBADF for a bad fd
        name = t.fs.mapping_name(fd)
    noreplace = bool(flags & MAP_FIXED_NOREPLACE)
    if anonymous:
        return t.mm.map(addr, length, prot, fixed=fixed, noreplace=noreplace)
    # Whether the file can be mapped at all (ENODEV: a directory, the console) is known before
    # anything is: a failed mmap leaves the address space as it was.
    if host is None:
        t.fs.contents(fd, 0, 0)                 # ENODEV for what is not a regular file
    start, kept = t.mm.map_file(addr, length, prot, fixed=fixed, noreplace=noreplace,
                                name=name or b"", offset=offset, pristine=host is not None and bool(name),
                                host=host)
    length = (length + PAGE - 1) & ~(PAGE - 1)
    try:
        for lo, hi in _gaps(start, start + length, kept):
            at = offset + (lo - start)
            if host is not None:
                host_fd, size = host
                n = max(0, min(hi - lo, size - at))
                t.mm.fill(lo, n, lambda view: os.preadv(host_fd, [view], at))
            else:
                t.mm.store(lo, t.fs.contents(fd, at, hi - lo))
    except BaseException:
        t.mm.unmap(start, length)       # (a read of the host file failed: nothing stays mapped)
        raise
    return start


def _gaps(start, end, ranges):
    """The parts of [start, end) outside ranges."""
    for lo, hi in sorted(ranges):
        if lo > start:
            yield start, lo
        start = max(start, hi)
    if start < end:
        yield start, end


def sys_munmap(t, addr, length, *_):
    t.mm.unmap(addr, length)
    return 0


def sys_mprotect(t, addr, length, prot, *_):
    t.mm.protect(addr, length, _prot(prot))
    return 0


def sys_brk(t, addr, *_):
    return t.mm.brk(addr)


def sys_mremap(t, old, old_len, new_len, flags, new, *_):
    if flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED) or (flags & MREMAP_FIXED and not flags & MREMAP_MAYMOVE):
        fail(E.EINVAL)
    return t.mm.remap(old, old_len, new_len, bool(flags & MREMAP_MAYMOVE),
                      new if flags & MREMAP_FIXED else None)


def sys_madvise(t, addr, length, advice, *_):
    if addr % PAGE:
        fail(E.EINVAL)
    if s32(advice) == 4:                      # MADV_DONTNEED: anonymous pages read as zero again
        t.mm.drop(addr, length)
    return 0


def sys_mem_nothing(t, *_):
    return 0

