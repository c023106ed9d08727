# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The Linux personality's hot paths in C (policy stays in Python, whpfast/linux/):

- uaccess: the checked copies between guest and host memory that every system call with a
  pointer makes (`check`, `read`, `write`, `view`, `read_cstring`, `read_u64s`), bound as the
  methods of whpfast.linux.mm.AddressSpace. They walk the same VMA list the Python code keeps
  (AddressSpace.vmas/.starts: one source of truth), copy with memcpy/memchr, and mark the pages
  they write for the next restore in the warm-start core's host-dirty bitmap.
- `Dispatcher`: the system call table's dispatch (one place an error becomes -errno, an unknown
  number ENOSYS counted), with the calls whose answer is a constant served without a Python call.
- `serve`: the exit loop (run, check the exit is exactly the syscall stub's `out`, dispatch,
  write the return), leaving on the first exit that is not a system call.
- `top_gap`: the walk of AddressSpace.find_free over the mappings (every anonymous mmap).

Backend-neutral: it reaches the vCPU only through the backend's Python-level functions
(syscall_regs/syscall_return), so the KVM and the WHP backend share it. WHPFAST_PURE_PYTHON=1
makes whpfast.linux use the Python versions instead (for comparisons, see bench/bench_linux.py)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memchr, memcpy, memset

from .linux import errno as _errno
from .linux.errno import LinuxError

cdef int EFAULT = _errno.EFAULT, ENAMETOOLONG = _errno.ENAMETOOLONG, ENOSYS = _errno.ENOSYS

cdef extern from "Python.h":
    unsigned long long PyLong_AsUnsignedLongLong(object) except? -1

include "_page.pxi"
DEF USER_MIN = 0x10000          # mm.USER_MIN: the kernel area lies below
DEF PROT_READ = 1
DEF PROT_WRITE = 2
DEF PROT_EXEC = 4
DEF MASK64 = 0xFFFFFFFFFFFFFFFF


cdef inline object _efault():
    return LinuxError(EFAULT, "bad address")


cdef inline bint _u64(object v, uint64_t *out):
    """v (a Python int) as a uint64; False when it is negative or does not fit."""
    if v < 0 or v > MASK64:
        return False
    out[0] = PyLong_AsUnsignedLongLong(v)
    return True


cdef inline uint64_t _field(object vma, Py_ssize_t i):
    # A Vma is a namedtuple (start, end, prot, ...) of Python ints that fit in 64 bits.
    return PyLong_AsUnsignedLongLong(<object>PyTuple_GET_ITEM(vma, i))


cdef int _check(object mm, uint64_t addr, uint64_t n, bint write) except -1:
    """Raises EFAULT unless [addr, addr+n) lies in mappings (writable ones if write): the binary
    search of mm.starts, then a walk over adjacent VMAs. n > 0."""
    cdef uint64_t top = PyLong_AsUnsignedLongLong(mm.top)
    cdef list vmas = mm.vmas
    cdef list starts = mm.starts
    cdef Py_ssize_t lo = 0, hi = PyList_GET_SIZE(starts), mid, i
    cdef uint64_t end, need, v_start, v_end
    cdef object v
    if addr < USER_MIN or n > top or addr > top - n:      # (addr + n > top, without wrapping)
        raise _efault()
    end = addr + n
    while lo < hi:                                          # bisect_right(starts, addr)
        mid = (lo + hi) >> 1
        if addr < PyLong_AsUnsignedLongLong(<object>PyList_GET_ITEM(starts, mid)):
            hi = mid
        else:
            lo = mid + 1
    i = lo - 1
    need = PROT_WRITE if write else (PROT_READ | PROT_WRITE | PROT_EXEC)
    while True:
        if i < 0 or i >= PyList_GET_SIZE(vmas):
            raise _efault()
        v = <object>PyList_GET_ITEM(vmas, i)
        v_start, v_end = _field(v, 0), _field(v, 1)
        if not (v_start <= addr < v_end) or not (_field(v, 2) & need):
            raise _efault()
        if v_end >= end:
            return 0
        addr = v_end
        i += 1


cdef uint8_t *_base(object mm) except NULL:
    # The guest memory's address (the backend Mapping raises SandboxClosed once it is closed).
    return <uint8_t *><uintptr_t>PyLong_AsUnsignedLongLong(mm.warm.memory.address)


cdef int _mark(object warm, uint64_t start, uint64_t end) except -1:
    """The pages of [start, end) were written by the host: set in the warm-start core's
    host-dirty bitmap. Pages of one bitmap word (every system call's write, the vDSO refresh)
    here, as WarmMemory.mark does it: the bits, and the word in its list of words with bits;
    the general case there."""
    cdef uint64_t p0 = start // PAGE_SIZE, p1 = (end + PAGE_SIZE - 1) // PAGE_SIZE, mask
    cdef uint64_t[::1] host
    if end <= start:
        return 0
    if p1 - 1 >> 6 == p0 >> 6:
        host = warm._host
        if p0 >> 6 >= <uint64_t>host.shape[0]:
            raise ValueError(f"host write at {start:#x} is outside the guest memory's bitmap")
        mask = ((<uint64_t>1 << (p1 - p0)) - 1 if p1 - p0 < 64 else MASK64) << (p0 & 63)
        if host[p0 >> 6] & mask != mask:
            host[p0 >> 6] |= mask
            warm._host_words.add(<Py_ssize_t>(p0 >> 6))
        return 0
    warm.mark(start, end)
    return 0


def check(mm, addr, n, write=False):
    """AddressSpace.check: raises EFAULT unless [addr, addr+n) is mapped (and writable if
    write)."""
    cdef uint64_t a, count
    if n <= 0:
        if n < 0:
            raise _efault()
        return
    if not _u64(addr, &a) or not _u64(n, &count):
        raise _efault()
    _check(mm, a, count, write)


def read(mm, addr, n):
    """AddressSpace.read: n bytes of checked guest memory."""
    cdef uint64_t a, count
    if n <= 0:
        if n < 0:
            raise _efault()
        return b""
    if not _u64(addr, &a) or not _u64(n, &count):
        raise _efault()
    _check(mm, a, count, False)
    return PyBytes_FromStringAndSize(<char *>_base(mm) + a, <Py_ssize_t>count)


def write(mm, addr, data):
    """AddressSpace.write: copies data (bytes-like) to checked, writable guest memory, and marks
    the pages for the next restore."""
    cdef const uint8_t[::1] src
    cdef uint64_t a, n
    cdef uint8_t *base
    if isinstance(data, bytes):
        n = len(<bytes>data)
    else:
        src = memoryview(data).cast("B")
        n = src.shape[0]
    if n == 0:
        return
    if not _u64(addr, &a):
        raise _efault()
    _check(mm, a, n, True)
    base = _base(mm)
    if isinstance(data, bytes):
        memcpy(base + a, PyBytes_AS_STRING(data), n)
    else:
        memcpy(base + a, &src[0], n)
    _mark(mm.warm, a, a + n)


def view(mm, addr, n, write=False):
    """AddressSpace.view: a memoryview of checked guest memory, for reads straight into it (mark()
    it after)."""
    check(mm, addr, n, write)
    return mm.mem[addr:addr + n]


def read_cstring(mm, addr, limit=4096):
    """AddressSpace.read_cstring: a NUL-terminated string (without the NUL), checked a page at a
    time; ENAMETOOLONG past limit bytes."""
    cdef uint64_t a, lim, got = 0, chunk_end, n
    cdef uint8_t *base
    cdef const void *nul
    cdef bytearray out = None
    cdef bytes chunk
    if not _u64(addr, &a) or a < USER_MIN:
        raise _efault()
    if not _u64(limit, &lim) or lim == 0:
        raise LinuxError(ENAMETOOLONG, "string too long")
    base = _base(mm)
    while True:
        chunk_end = (a // PAGE_SIZE + 1) * PAGE_SIZE
        if chunk_end - a > lim - got:
            chunk_end = a + (lim - got)
        n = chunk_end - a if chunk_end > a else 1
        _check(mm, a, n, False)
        nul = memchr(base + a, 0, n)
        if nul != NULL:
            n = <uint64_t>(<const uint8_t *>nul - (base + a))
            chunk = PyBytes_FromStringAndSize(<char *>base + a, <Py_ssize_t>n)
            if out is None:
                return chunk
            out += chunk
            return bytes(out)
        if out is None:
            out = bytearray()
        out += PyBytes_FromStringAndSize(<char *>base + a, <Py_ssize_t>n)
        got += n
        a += n
        if got >= lim:
            raise LinuxError(ENAMETOOLONG, "string too long")


def read_u64s(mm, addr, count):
    """AddressSpace.read_u64s: count little-endian 64-bit words of checked guest memory."""
    cdef uint64_t a, n, i
    cdef const uint64_t *words
    if count <= 0:
        if count < 0:
            raise _efault()
        return []
    if not _u64(addr, &a) or not _u64(count, &n) or n > (MASK64 >> 3):
        raise _efault()
    _check(mm, a, 8 * n, False)
    words = <const uint64_t *>(_base(mm) + a)     # x86-64: little-endian, unaligned loads fine
    return [words[i] for i in range(n)]


def top_gap(list vmas not None, ceiling, length):
    """mm.py_top_gap in C (AddressSpace.find_free's walk): the mappings from the highest down,
    (c, True) for the first gap below ceiling c that fits length, else (c, False) with c where
    the walk stopped. 0 < length <= ceiling < 2**64."""
    cdef uint64_t c, n, v_start, v_end
    cdef Py_ssize_t i
    cdef object v
    if not _u64(ceiling, &c) or not _u64(length, &n) or n == 0 or n > c:
        raise ValueError(f"top_gap needs 0 < length <= ceiling < 2**64, got {length!r}, {ceiling!r}")
    for i in range(PyList_GET_SIZE(vmas) - 1, -1, -1):
        v = <object>PyList_GET_ITEM(vmas, i)
        v_start = _field(v, 0)
        if v_start >= c:
            continue
        if c < n:                   # (unsigned: c - n would wrap) no gap below fits any more
            break
        v_end = _field(v, 1)
        if v_end <= c - n:
            return c, True
        c = v_start
    return c, False


cdef class Dispatcher:
    """syscalls.dispatch: runs system call nr with the six argument registers; returns the value
    for RAX (negative errno on failure). table: {nr: handler(p, a0..a5)} (raising LinuxError);
    constants: {nr: value} answered here without a Python call; names(nr): the key of the
    ENOSYS count (p.unsupported_syscalls), from a bounded set whatever nr the guest picks."""

    cdef dict table
    cdef dict constants
    cdef object names

    def __init__(self, dict table not None, dict constants not None, names not None):
        self.table, self.constants, self.names = table, constants, names

    cdef object serve(self, object p, tuple regs):
        # regs: (nr, a0, ..., a5, ...) as impl.syscall_regs returns them
        if PyTuple_GET_SIZE(regs) < 7:
            raise ValueError(f"a system call needs its number and six arguments, got {regs!r}")
        cdef object nr = <object>PyTuple_GET_ITEM(regs, 0)
        cdef PyObject *hit = PyDict_GetItem(self.constants, nr)
        if hit != NULL:
            return <object>hit
        hit = PyDict_GetItem(self.table, nr)
        if hit == NULL:
            name = self.names(nr)
            p.unsupported_syscalls[name] = p.unsupported_syscalls.get(name, 0) + 1
            return -ENOSYS
        try:
            return (<object>hit)(p, <object>PyTuple_GET_ITEM(regs, 1), <object>PyTuple_GET_ITEM(regs, 2),
                                 <object>PyTuple_GET_ITEM(regs, 3), <object>PyTuple_GET_ITEM(regs, 4),
                                 <object>PyTuple_GET_ITEM(regs, 5), <object>PyTuple_GET_ITEM(regs, 6))
        except LinuxError as e:
            return -e.errno

    def __call__(self, p, nr, args):
        return self.serve(p, (nr, *args))


def serve(p, vcpu, bint pending, run_until, deadline, dispatch, syscall_regs, syscall_return,
          int exit_io, int port, uint64_t stub, int user_cs, int user_ds, int first=-1):
    """The exit loop of LinuxSandbox.run: runs the vCPU (run_until(vcpu, deadline)) and serves
    every system call the program makes (dispatch(p, nr, args); a Dispatcher is called directly)
    until an exit that is not one: returns that exit's kind. pending: the vCPU sits at a system
    call not answered yet; first >= 0: the kind of an exit the vCPU has made already (a
    resumed run's, see WarmMemory.resume), taken as the first run's. What dispatch raises (the
    program exits, parks on stdin, kills itself, a host failure) propagates, with the vCPU
    still at that system call.

    Only the stub's own exit is a system call: `out SYSCALL_PORT, al` at `stub` (its 2 bytes;
    the exit's RIP is the OUT's address or the next instruction's, depending on the hypervisor:
    on the stub's read-only page either means the stub's OUT), with a return address (RCX) that
    is a canonical user address. Any other use of the port (the same OUT in the program's own
    code, an IN, which KVM completes and WHP leaves undone, a wider OUT, string I/O) or a
    return address sysret cannot take is an exit the ABI does not define: the loop ends with
    that exit's kind, nothing dispatched (LinuxSandbox turns it into a GuestFault)."""
    cdef Dispatcher fast = dispatch if type(dispatch) is Dispatcher else None
    cdef tuple regs
    cdef object result
    cdef uint64_t rip
    while True:
        regs = None
        if not pending:
            if first >= 0:
                kind, first = first, -1
            else:
                kind = run_until(vcpu, deadline)
            if kind != exit_io or vcpu.io_port != port or vcpu.io_direction != 1 \
                    or vcpu.io_size != 1 or vcpu.io_string:
                return kind
            regs = syscall_regs(vcpu)
            if PyTuple_GET_SIZE(regs) < 10:
                raise ValueError(f"syscall_regs must give the number, six arguments, RCX, R11 "
                                 f"and RIP, got {regs!r}")
            rip = PyLong_AsUnsignedLongLong(<object>PyTuple_GET_ITEM(regs, 9))
            if (rip != stub and rip != stub + 2) \
                    or PyLong_AsUnsignedLongLong(<object>PyTuple_GET_ITEM(regs, 7)) >> 47:
                return kind
        pending = False
        if regs is None:        # (a call answered late: checked when it was made)
            regs = syscall_regs(vcpu)
        p.syscall_count += 1
        if fast is not None:
            result = fast.serve(p, regs)
        else:
            result = dispatch(p, regs[0], regs[1:7])
        syscall_return(vcpu, result & MASK64, user_cs, user_ds)


# -- the vDSO data area, refreshed on every restore ------------------------------------------------

cdef extern from "linux/vdso/vdso_data.h":
    cdef struct whpfast_vdso_data:
        uint32_t seq
        uint32_t mode
        uint64_t tsc_base
        uint64_t mult
        uint32_t shift
        uint32_t coarse_res_ns
        uint64_t base_ns[4]

cdef struct clock_sample:          # struct whpfast_clock_sample of linux/vdso/host_clock.c
    uint64_t tsc
    uint64_t gap
    int64_t realtime_ns, monotonic_ns, raw_ns, boottime_ns

ctypedef void (*clock_sample_fn)(clock_sample *out, int tries) noexcept nogil


cdef void _vdso_body(volatile whpfast_vdso_data *d, uintptr_t sample_fn, uint32_t mode,
                     uint64_t mult, uint32_t shift, uint32_t coarse_res_ns,
                     uint64_t tsc_offset, int64_t mono_off, int64_t raw_off,
                     int64_t boot_off) noexcept:
    """Pairs the host's TSC with its clocks now through sample_fn (host_clock.c's
    whpfast_clock_sample, the address of the very function vdso.host_clocks calls) and writes
    every field of d but seq, with mode, mult, shift and coarse_res_ns as vdso.write_data
    computes them. The guest's MONOTONIC, MONOTONIC_RAW and BOOTTIME are the host's less
    mono_off, raw_off and boot_off (LinuxSandbox._clock_offsets: they start near zero at the
    guest's boot); REALTIME is the host's."""
    cdef clock_sample s
    (<clock_sample_fn>sample_fn)(&s, 4)
    d.mode = mode
    d.tsc_base = s.tsc + tsc_offset
    d.mult = mult
    d.shift = shift
    d.coarse_res_ns = coarse_res_ns
    d.base_ns[0] = <uint64_t>s.realtime_ns
    d.base_ns[1] = <uint64_t>(s.monotonic_ns - mono_off)
    d.base_ns[2] = <uint64_t>(s.raw_ns - raw_off)
    d.base_ns[3] = <uint64_t>(s.boottime_ns - boot_off)


def refresh_vdso(mm, uint64_t addr, uintptr_t sample_fn, uint32_t mode, uint64_t mult,
                 uint32_t shift, uint32_t coarse_res_ns, uint64_t tsc_offset,
                 int64_t mono_off=0, int64_t raw_off=0, int64_t boot_off=0):
    """vdso.refresh of the data area at guest address addr, in C (it runs on every restore;
    through Python it cost ~7-25 us of GIL-held time per request): struct whpfast_vdso_data
    written there under its seqlock (_vdso_body). A host write: the page is marked for the
    next restore."""
    cdef uint64_t size = PyLong_AsUnsignedLongLong(mm.warm.size)
    cdef volatile whpfast_vdso_data *d
    cdef uint32_t seq
    if sample_fn == 0 or addr % 8 or addr > size or size - addr < sizeof(whpfast_vdso_data):
        raise ValueError(f"the vDSO data area at {addr:#x} is outside the guest memory or misaligned")
    d = <volatile whpfast_vdso_data *>(_base(mm) + addr)
    seq = d.seq | 1                            # odd: readers retry
    d.seq = seq
    # Every store goes through `d` (volatile: the compiler keeps their order) and x86 makes
    # stores visible in program order, so a reader never takes a torn body for a valid one.
    _vdso_body(d, sample_fn, mode, mult, shift, coarse_res_ns, tsc_offset, mono_off, raw_off,
               boot_off)
    d.seq = seq + 1                            # even again, a new generation
    _mark(mm.warm, addr, addr + sizeof(whpfast_vdso_data))


def vdso_data(uint32_t seq, uintptr_t sample_fn, uint32_t mode, uint64_t mult, uint32_t shift,
              uint32_t coarse_res_ns, uint64_t tsc_offset, int64_t mono_off=0, int64_t raw_off=0,
              int64_t boot_off=0):
    """The bytes refresh_vdso leaves over a data area whose seq is `seq`, for a writer that
    puts them in place while the guest is stopped (a resumed run's staged write, see
    LinuxSandbox._resume_plan): the same body, the next even generation."""
    cdef bytes out
    if sample_fn == 0:
        raise ValueError("no clock sample function")
    out = PyBytes_FromStringAndSize(NULL, sizeof(whpfast_vdso_data))
    memset(<char *>out, 0, sizeof(whpfast_vdso_data))      # no host bytes in any padding
    _vdso_body(<volatile whpfast_vdso_data *><char *>out, sample_fn, mode, mult, shift,
               coarse_res_ns, tsc_offset, mono_off, raw_off, boot_off)
    (<whpfast_vdso_data *><char *>out).seq = (seq | 1) + 1
    return out
