# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The KVM backend: one cdef class per kernel object (the /dev/kvm system fd, a VM fd, a vCPU fd
with its mmap'd kvm_run page) and per host mapping (guest memory, a read-only file). Each owns its
object, frees it exactly once in close(), and close() is idempotent; __dealloc__ is the last
resort. Every failed system call goes through _raise_errno(), the one conversion point into the
package's exceptions."""

from libc.errno cimport errno, EINTR, EAGAIN, E2BIG
from libc.string cimport memset, memcpy
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from posix.types cimport pid_t
from posix.unistd cimport close as c_close
from posix.fcntl cimport open as c_open, O_RDWR, O_RDONLY, O_CLOEXEC
from posix.mman cimport (mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_PRIVATE,
                         MAP_ANONYMOUS, MAP_NORESERVE, MAP_FAILED, MAP_FIXED)
from posix.stat cimport struct_stat, fstat
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.exc cimport PyErr_CheckSignals

from .includes.kvm cimport *

from . import errors


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<time.h>" nogil:
    ctypedef struct timer_t:
        pass
    int timer_delete(timer_t timer)

cdef extern from "includes/compat.h" nogil:
    int whpfast_install_kick_handler()
    void whpfast_set_current_run(kvm_run *run)
    pid_t whpfast_gettid()
    int whpfast_kick_thread(pid_t tid)
    int whpfast_timer_create(timer_t *timer)
    int whpfast_timer_arm(timer_t timer, long long ns)
    long long whpfast_monotonic_ns()
    void __sync_synchronize()


include "_exits.pxi"
include "_cancel.pxi"
include "_restore.pxi"
include "_warm.pxi"

include "_page.pxi"


cdef int _raise_errno(int err, str what, path=None, bint device=False) except -1:
    raise errors.from_errno(err, what, path, device)


cdef inline int _check(int rc, str what) except -1:
    if rc < 0:
        _raise_errno(errno, what)
    return rc


cdef inline int _ioctl_released(int fd, unsigned long request, void *arg) noexcept:
    """ioctl(fd, request, arg) with the GIL released: the restore path's ioctls touch only C
    data (a bitmap, a state struct the caller holds), and each costs ~4-5 us on PVM that other
    threads' sandboxes can use. Returns the result, or -errno (read before the GIL is taken
    back); the caller raises through _raise_errno, so only on failure is a message formatted."""
    cdef int rc
    with nogil:
        rc = ioctl(fd, request, arg)
        if rc < 0:
            rc = -errno
    return rc


if whpfast_install_kick_handler() != 0:
    _raise_errno(errno, "installing the vCPU kick signal handler")


cdef class KvmSystem:
    """/dev/kvm: checks the API version and the capabilities the backend relies on."""
    cdef int fd
    cdef readonly int vcpu_mmap_size
    cdef readonly bint manual_dirty_log
    cdef readonly int xsave_size   # bytes of KVM's (standard-format) XSAVE area of a vCPU
    cdef bytes _cpuid   # struct kvm_cpuid2 as returned by KVM_GET_SUPPORTED_CPUID

    def __cinit__(self):
        self.fd = -1

    def __init__(self, path="/dev/kvm"):
        cdef bytes p = str(path).encode()
        self.fd = c_open(p, O_RDWR | O_CLOEXEC)
        if self.fd < 0:
            _raise_errno(errno, "open", path, True)
        version = ioctl(self.fd, KVM_GET_API_VERSION, 0)
        if version != 12:
            self.close()
            raise errors.HypervisorUnavailable(
                f"{path} speaks KVM API version {version}, whpfast needs 12")
        # Without these the backend cannot work as designed; say which one is missing.
        for cap, name in ((KVM_CAP_SYNC_REGS, "SYNC_REGS"), (KVM_CAP_READONLY_MEM, "READONLY_MEM"),
                          (KVM_CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT"), (KVM_CAP_XSAVE, "XSAVE"),
                          (KVM_CAP_XCRS, "XCRS")):
            if ioctl(self.fd, KVM_CHECK_EXTENSION, <unsigned long>cap) <= 0:
                self.close()
                raise errors.HypervisorUnavailable(f"{path} lacks KVM_CAP_{name}")
        self.manual_dirty_log = ioctl(self.fd, KVM_CHECK_EXTENSION,
                                      <unsigned long>KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) > 0
        self.vcpu_mmap_size = _check(ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE")
        # struct kvm_xsave is 4 KiB; with larger components (AMX) KVM_CAP_XSAVE2 gives the size.
        self.xsave_size = max(4096, ioctl(self.fd, KVM_CHECK_EXTENSION, <unsigned long>KVM_CAP_XSAVE2))
        self._cpuid = self._supported_cpuid()

    cdef bytes _supported_cpuid(self):
        cdef int nent = 64
        cdef size_t size
        cdef kvm_cpuid2 *buf
        while True:
            size = 8 + nent * 40     # header + entries of struct kvm_cpuid_entry2
            buf = <kvm_cpuid2 *>malloc(size)
            if buf == NULL:
                raise MemoryError()
            memset(buf, 0, size)
            buf.nent = nent
            try:
                if ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf) == 0:
                    return (<char *>buf)[:8 + buf.nent * 40]
                if errno != E2BIG or nent > 4096:
                    _raise_errno(errno, "KVM_GET_SUPPORTED_CPUID")
            finally:
                free(buf)
            nent *= 2

    def check_extension(self, int cap):
        return ioctl(self.fd, KVM_CHECK_EXTENSION, <unsigned long>cap)

    def create_vm(self):
        return Vm(self)

    def close(self):
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def __dealloc__(self):
        self.close()


cdef class Vm:
    """A VM fd: memslots, dirty logs, and the vCPU factory."""
    cdef int fd
    cdef readonly KvmSystem system
    cdef readonly bint manual_protect

    def __cinit__(self):
        self.fd = -1

    def __init__(self, KvmSystem system not None):
        cdef kvm_enable_cap cap
        self.system = system
        self.fd = _check(ioctl(system.fd, KVM_CREATE_VM, 0), "KVM_CREATE_VM")
        if system.manual_dirty_log:
            # Manual protect: reading the dirty log no longer write-protects the pages; the
            # restore path re-protects (KVM_CLEAR_DIRTY_LOG) only the pages it chooses, so pages
            # every call writes stay writable and cost no write fault per call.
            memset(&cap, 0, sizeof(cap))
            cap.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
            cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            _check(ioctl(self.fd, KVM_ENABLE_CAP, &cap), "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)")
            self.manual_protect = True

    cdef int _fd(self) except -1:
        if self.fd < 0:
            raise errors.SandboxClosed("the VM is closed")
        return self.fd

    def set_memory(self, uint32_t slot, uint64_t gpa, uint64_t size, uint64_t host_address,
                   bint readonly=False, bint log_dirty=False):
        """Maps host memory at gpa (size 0 removes the slot)."""
        cdef kvm_userspace_memory_region region
        memset(&region, 0, sizeof(region))
        region.slot = slot
        region.flags = (KVM_MEM_READONLY if readonly else 0) | (KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        region.guest_phys_addr = gpa
        region.memory_size = size
        region.userspace_addr = host_address
        _check(ioctl(self._fd(), KVM_SET_USER_MEMORY_REGION, &region),
               f"KVM_SET_USER_MEMORY_REGION slot {slot} at {gpa:#x}+{size:#x}")

    def get_dirty_log(self, uint32_t slot, unsigned char[::1] bitmap not None):
        """Fills bitmap (one bit per page of the slot) with the pages the guest wrote. With
        manual protect (see __init__) the bits stay set until clear_dirty_log(); without it this
        one ioctl also clears them and write-protects the pages again."""
        cdef kvm_dirty_log log
        cdef int rc
        memset(&log, 0, sizeof(log))
        log.slot = slot
        log.dirty_bitmap = &bitmap[0]
        rc = _ioctl_released(self._fd(), KVM_GET_DIRTY_LOG, &log)
        if rc < 0:
            _raise_errno(-rc, f"KVM_GET_DIRTY_LOG slot {slot}")

    def clear_dirty_log(self, uint32_t slot, uint64_t first_page, uint32_t num_pages,
                        unsigned char[::1] bitmap not None):
        """Clears the bits set in bitmap (bit 0 = first_page, a multiple of 64) and write-protects
        those pages again, so the guest's next write to them is logged (manual protect only)."""
        cdef kvm_clear_dirty_log log
        cdef int rc
        if not self.manual_protect:
            return
        if first_page % 64 or <size_t>bitmap.shape[0] * 8 < num_pages:
            raise ValueError("clear_dirty_log: misaligned first page or short bitmap")
        memset(&log, 0, sizeof(log))
        log.slot = slot
        log.first_page = first_page
        log.num_pages = num_pages
        log.dirty_bitmap = &bitmap[0]
        rc = _ioctl_released(self._fd(), KVM_CLEAR_DIRTY_LOG, &log)
        if rc < 0:
            _raise_errno(-rc, f"KVM_CLEAR_DIRTY_LOG slot {slot}")

    def create_vcpu(self, int index=0):
        return Vcpu(self, index)

    def close(self):
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def __dealloc__(self):
        self.close()


cdef inline void _queue_sync_regs(kvm_run *r, dict state) except *:
    """Queues a snapshot's general and special registers and events in the sync-regs area: they
    reach the vCPU with the next KVM_RUN, no ioctl of their own. The callers check each part's
    size first (_check_size)."""
    cdef bytes b = state["regs"]
    memcpy(&r.s.regs.regs, <char *>b, sizeof(kvm_regs))
    b = state["sregs"]
    memcpy(&r.s.regs.sregs, <char *>b, sizeof(kvm_sregs))
    b = state["events"]
    memcpy(&r.s.regs.events, <char *>b, sizeof(kvm_vcpu_events))
    r.kvm_dirty_regs |= KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS


cdef class Vcpu(CancelState):
    """A vCPU fd and its kvm_run page. Registers reach the guest through the sync-regs area of
    kvm_run, folded into the next KVM_RUN instead of separate ioctls (each ioctl costs as much as
    an exit on the PVM hosts)."""
    cdef int fd
    cdef kvm_run *run_page
    cdef size_t run_size
    cdef readonly Vm vm
    # cancellation and timeouts (see run(), cancel() and _cancel.pxi)
    cdef volatile pid_t running_tid
    cdef timer_t timer
    cdef pid_t timer_tid
    # The last run left KVM an exit to complete at the next KVM_RUN (see _retire_pending):
    # anything but an OUT, which leaves nothing that could resume.
    cdef bint completion_pending
    cdef readonly int xsave_size

    def __cinit__(self):
        self.fd = -1
        self.run_page = NULL
        self.timer_tid = 0
        self.completion_pending = False

    def __init__(self, Vm vm not None, int index=0):
        self.vm = vm
        self.fd = _check(ioctl(vm._fd(), KVM_CREATE_VCPU, <unsigned long>index), "KVM_CREATE_VCPU")
        cdef void *p
        cdef bytes cpuid = vm.system._cpuid
        self.run_size = vm.system.vcpu_mmap_size
        self.xsave_size = vm.system.xsave_size
        p = mmap(NULL, self.run_size, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        if p == MAP_FAILED:
            err = errno
            self.close()
            _raise_errno(err, "mmap of kvm_run")
        self.run_page = <kvm_run *>p
        # KVM stores the general registers into kvm_run at every exit (a copy, no ioctl): the exit
        # decoding checks an OUT's value against RAX (see _decode).
        self.run_page.kvm_valid_regs = KVM_SYNC_X86_REGS
        # KVM checks EFER.LME/NXE against the guest CPUID, so it must be set before the sregs.
        _check(ioctl(self.fd, KVM_SET_CPUID2, <char *>cpuid), "KVM_SET_CPUID2")

    cdef int _fd(self) except -1:
        if self.fd < 0:
            raise errors.SandboxClosed("the vCPU is closed")
        return self.fd

    def init_long_mode(self, *, uint64_t cr0, uint64_t cr3, uint64_t cr4, uint64_t efer,
                       uint64_t gdt_base, uint16_t gdt_limit, uint64_t idt_base, uint16_t idt_limit,
                       uint64_t tss_base, uint32_t tss_limit, uint16_t tss_selector,
                       uint16_t code_selector, uint16_t data_selector, int cpl):
        """Puts the vCPU straight into 64-bit mode at the given privilege level with flat segments
        that match the GDT the host wrote (one KVM_SET_SREGS, once per vCPU)."""
        cdef kvm_sregs s
        _check(ioctl(self._fd(), KVM_GET_SREGS, &s), "KVM_GET_SREGS")
        _flat_segment(&s.cs, code_selector, 0xB, cpl, 1)
        _flat_segment(&s.ds, data_selector, 0x3, cpl, 0)
        _flat_segment(&s.es, data_selector, 0x3, cpl, 0)
        _flat_segment(&s.fs, data_selector, 0x3, cpl, 0)
        _flat_segment(&s.gs, data_selector, 0x3, cpl, 0)
        _flat_segment(&s.ss, data_selector, 0x3, cpl, 0)
        memset(&s.tr, 0, sizeof(s.tr))
        s.tr.base = tss_base
        s.tr.limit = tss_limit
        s.tr.selector = tss_selector
        s.tr.type = 0xB          # busy 64-bit TSS
        s.tr.present = 1
        memset(&s.ldt, 0, sizeof(s.ldt))
        s.ldt.type = 2
        s.ldt.unusable = 1
        s.gdt.base = gdt_base
        s.gdt.limit = gdt_limit
        s.idt.base = idt_base
        s.idt.limit = idt_limit
        s.cr0 = cr0
        s.cr3 = cr3
        s.cr4 = cr4
        s.efer = efer
        _check(ioctl(self.fd, KVM_SET_SREGS, &s), "KVM_SET_SREGS")

    def enter(self, uint64_t rip, uint64_t rsp, uint64_t rflags=0x2, uint64_t rdi=0):
        """Queues a fresh register file for the next run(): every GPR zero (nothing of an earlier
        call survives in registers) except the entry point, stack and first argument."""
        cdef kvm_run *r = self._run()
        self._retire_pending()
        memset(&r.s.regs.regs, 0, sizeof(kvm_regs))
        r.s.regs.regs.rip = rip
        r.s.regs.regs.rsp = rsp
        r.s.regs.regs.rflags = rflags
        r.s.regs.regs.rdi = rdi
        r.kvm_dirty_regs |= KVM_SYNC_X86_REGS

    cdef kvm_run *_run(self) except NULL:
        if self.run_page == NULL:
            raise errors.SandboxClosed("the vCPU is closed")
        return self.run_page

    def run(self, long long timeout_ns=-1):
        """Runs the guest until it exits; returns one of the EXIT_* kinds and leaves the details in
        the exit attributes. timeout_ns > 0 arms a one-shot timer that kicks this thread."""
        return self._enter(timeout_ns, NULL)

    cdef int _enter(self, long long timeout_ns, WarmRestore *warm) except -1:
        """run(), and resume_warm's run: with warm, its restore (_warm_hv) is done first, in the
        same release of the GIL as the first KVM_RUN; if it fails, the guest is not entered and
        the failure is raised.

        Cancellation protocol: cancel() sets cancel_requested, then immediate_exit, then signals
        the thread in run() if there is one. Here running_tid is set first, and immediate_exit is
        cleared *before* cancel_requested is checked, so a cancel can never be lost between the
        check and KVM_RUN: either the check sees it, or KVM_RUN starts with immediate_exit set, or
        the signal interrupts it (the handler sets immediate_exit again, for a signal that lands
        just before KVM_RUN enters the guest). The timer follows the same order, with the
        deadline in place of cancel_requested. The checks read only C fields (volatile, after a
        full barrier), so they are made without the GIL, after a folded-in restore: a cancel or
        a deadline that comes during the restore still stops the run."""
        cdef kvm_run *r = self._run()
        cdef int fd = self._fd()
        cdef int rc = 0, err = 0, warm_err = 0
        cdef bint entered
        cdef pid_t tid = whpfast_gettid()
        cdef long long deadline = 0
        if timeout_ns > 0:
            deadline = whpfast_monotonic_ns() + timeout_ns
            self._arm_timer(tid, timeout_ns)
        self.running_tid = tid
        whpfast_set_current_run(r)
        try:
            while True:
                r.immediate_exit = 0
                __sync_synchronize()
                with nogil:
                    if warm != NULL:
                        warm_err = self._warm_hv(warm)
                        warm.done_ns = whpfast_monotonic_ns()
                    # The timer's signal may have landed before immediate_exit was cleared just
                    # above (the thread was preempted after arming it): it is lost, so look at
                    # the clock too. It fires only at the deadline, so this check sees any such
                    # signal.
                    entered = (not warm_err and not self.cancel_requested and
                               not (deadline and whpfast_monotonic_ns() >= deadline))
                    if entered:
                        self.completion_pending = True
                        rc = ioctl(fd, KVM_RUN, 0)
                        err = errno
                if warm != NULL:
                    if warm_err:
                        _raise_errno(warm_err, warm.what.decode())
                    warm = NULL          # restored once, whatever the run does next
                if not entered:
                    return EXIT_CANCELLED if self.cancel_requested else EXIT_TIMEOUT
                if rc == 0:
                    kind = self._decode(r)
                    if self.completion_pending:
                        # Retired here, at the exit: what the completion writes to guest memory
                        # (an INS) is then in the dirty log the next restore reads. Should it
                        # fail, it stays pending and enter()/load_state() try again (and fail).
                        try:
                            self._retire_pending()
                        except errors.HypervisorError:
                            pass
                    return kind
                self.completion_pending = False    # no exit to userspace: nothing to complete
                if err != EINTR and err != EAGAIN:
                    _raise_errno(err, "KVM_RUN")
                if self.cancel_requested:
                    return EXIT_CANCELLED
                if deadline and whpfast_monotonic_ns() >= deadline:
                    return EXIT_TIMEOUT
                # Some other signal (Ctrl-C): let Python handlers run; if they raise, the call
                # ends with their exception, otherwise the guest simply continues.
                PyErr_CheckSignals()
        finally:
            whpfast_set_current_run(NULL)
            self.running_tid = 0
            r.immediate_exit = 0
            if deadline:
                whpfast_timer_arm(self.timer, 0)

    cdef int _arm_timer(self, pid_t tid, long long ns) except -1:
        # POSIX timers deliver to one thread; keep one per vCPU and remake it when another thread
        # runs this vCPU.
        if self.timer_tid != tid:
            if self.timer_tid:
                timer_delete(self.timer)
                self.timer_tid = 0
            _check(whpfast_timer_create(&self.timer), "timer_create")
            self.timer_tid = tid
        _check(whpfast_timer_arm(self.timer, ns), "timer_settime")
        return 0

    cdef int _decode(self, kvm_run *r) except -1:
        cdef uint32_t reason = r.exit_reason
        cdef uint8_t *data
        cdef int i
        self.exit_reason = reason
        if reason == KVM_EXIT_IO:
            self.io_port = r.io.port
            self.io_direction = r.io.direction
            self.io_size = r.io.size
            self.io_value = 0
            if r.io.data_offset + 4 <= self.run_size and r.io.size <= 4:
                data = <uint8_t *>r + r.io.data_offset
                for i in range(r.io.size):
                    self.io_value |= (<uint32_t>data[i]) << (8 * i)
            # kvm_run has no flag for INS/OUTS. A count other than 1 is a REP string instruction;
            # an OUT writes RAX's low bytes while an OUTS writes memory, so an OUT whose value is
            # not RAX's is an OUTS. (One that writes exactly RAX's value is indistinguishable,
            # and has the same effect as the OUT.)
            self.io_string = r.io.count != 1 or (
                r.io.direction == KVM_EXIT_IO_OUT and r.io.size <= 4 and
                self.io_value != (r.s.regs.regs.rax & ((<uint64_t>1 << (8 * r.io.size)) - 1)))
            if r.io.direction == KVM_EXIT_IO_OUT and r.io.count == 1:
                self.completion_pending = False    # KVM has stepped past it; nothing to finish
            return EXIT_IO
        if reason == KVM_EXIT_MMIO:
            self.mmio_address = r.mmio.phys_addr
            self.mmio_is_write = r.mmio.is_write
            return EXIT_MMIO
        if reason == KVM_EXIT_SHUTDOWN:
            return EXIT_SHUTDOWN
        if reason == KVM_EXIT_HLT:
            return EXIT_HLT
        if reason == KVM_EXIT_INTERNAL_ERROR:
            self.internal_suberror = r.internal.suberror
            self.internal_data = tuple(r.internal.data[i] for i in range(min(r.internal.ndata, 16)))
            return EXIT_INTERNAL_ERROR
        if reason == KVM_EXIT_FAIL_ENTRY:
            self.fail_entry_reason = r.fail_entry.hardware_entry_failure_reason
            return EXIT_FAIL_ENTRY
        if reason == KVM_EXIT_INTR:
            return EXIT_CANCELLED if self.cancel_requested else EXIT_TIMEOUT
        return EXIT_UNKNOWN

    def cancel(self):
        """Stops the call this vCPU runs (from any thread): safe when it is idle or closed.

        Only the first cancel of a call does anything, and it sends at most one signal, only when
        a thread is inside run(): real-time signals queue, so a signal per cancel lets a loop of
        cancels fill the queue and bury the vCPU thread in handler invocations. Idle cancels
        (no call open) do nothing."""
        cdef kvm_run *r = self.run_page
        cdef pid_t tid
        if r == NULL or not self._first_cancel():
            return
        __sync_synchronize()
        r.immediate_exit = 1
        tid = self.running_tid
        if tid:
            whpfast_kick_thread(tid)
            self.kicks += 1

    cdef int _retire_pending(self) except -1:
        """Finishes what KVM left of the last exit, without entering the guest. KVM completes an
        IN (data into RAX), an emulated MMIO access or the next batch of a REP INS/OUTS only at
        the next KVM_RUN, and does so *after* applying that run's sync registers: it writes back
        the emulator's saved RIP, so the guest would resume its old instruction stream with the
        new call's registers, even after a restore. So before any new state is queued, a
        KVM_RUN with immediate_exit set (KVM's documented way to complete an exit without
        running the guest) and no queued registers retires it; a REP string instruction that
        KVM would go on with batch after batch is ended with RCX = 0. Whatever state that leaves
        is replaced by the state loaded next."""
        cdef kvm_run *r
        cdef int fd, rc, err, rounds
        cdef uint64_t queued
        cdef kvm_regs saved, regs
        if not self.completion_pending:
            return 0
        r = self._run()
        fd = self._fd()
        queued = r.kvm_dirty_regs
        memcpy(&saved, &r.s.regs.regs, sizeof(saved))
        r.kvm_dirty_regs = 0
        try:
            for rounds in range(8):
                r.immediate_exit = 1
                rc = ioctl(fd, KVM_RUN, 0)
                err = errno
                if rc < 0 and (err == EINTR or err == EAGAIN):
                    self.completion_pending = False
                    return 0
                if rc < 0:
                    _raise_errno(err, "KVM_RUN (completing the last exit)")
                # The completion made another exit: the instruction goes on (a REP string).
                _check(ioctl(fd, KVM_GET_REGS, &regs), "KVM_GET_REGS")
                regs.rcx = 0
                memcpy(&r.s.regs.regs, &regs, sizeof(regs))
                r.kvm_dirty_regs = KVM_SYNC_X86_REGS
            raise errors.HypervisorError(
                "KVM keeps continuing an I/O instruction of the guest; this vCPU cannot be reset: "
                "close the sandbox")
        finally:
            r.immediate_exit = 0
            memcpy(&r.s.regs.regs, &saved, sizeof(saved))
            r.kvm_dirty_regs = queued

    def get_xsave(self):
        """The complete XSAVE area (standard format, xsave_size bytes): x87, MXCSR, XMM and every
        further component KVM keeps for the guest (YMM, opmask, ZMM, PKRU, ...)."""
        cdef int fd = self._fd()
        cdef bytes area = bytes(self.xsave_size)
        _check(ioctl(fd, KVM_GET_XSAVE2 if self.xsave_size > 4096 else KVM_GET_XSAVE, <char *>area),
               "KVM_GET_XSAVE")
        return area

    def set_xsave(self, bytes area not None):
        """Loads a get_xsave() result: one ioctl."""
        cdef int fd = self._fd(), rc
        if len(area) != self.xsave_size:
            raise ValueError(f"an XSAVE area of this vCPU has {self.xsave_size} bytes, got {len(area)}")
        self._retire_pending()
        rc = _ioctl_released(fd, KVM_SET_XSAVE, <char *>area)
        if rc < 0:
            _raise_errno(-rc, "KVM_SET_XSAVE")

    def save_state(self):
        """The complete vCPU state as raw KVM structs: {part: bytes}. Several ioctls; snapshots
        are rare, restores are not (see load_state)."""
        cdef int fd = self._fd()
        cdef kvm_run *r = self._run()
        cdef kvm_regs regs
        cdef kvm_sregs sregs
        cdef kvm_debugregs dregs
        cdef kvm_vcpu_events events
        cdef kvm_xcrs xcrs
        cdef size_t msrs_size = 8 + len(SAVED_MSRS) * sizeof(kvm_msr_entry)
        cdef kvm_msrs *msrs = <kvm_msrs *>malloc(msrs_size)
        cdef kvm_msr_entry *entries = <kvm_msr_entry *>(<char *>msrs + 8)
        cdef int i, n
        if msrs == NULL:
            raise MemoryError()
        try:
            self._retire_pending()
            # State queued in the sync-regs area has not reached the vCPU yet (that happens at
            # the next KVM_RUN): it, not what the ioctls would report, is the current state.
            if r.kvm_dirty_regs & KVM_SYNC_X86_REGS:
                memcpy(&regs, &r.s.regs.regs, sizeof(regs))
            else:
                _check(ioctl(fd, KVM_GET_REGS, &regs), "KVM_GET_REGS")
            if r.kvm_dirty_regs & KVM_SYNC_X86_SREGS:
                memcpy(&sregs, &r.s.regs.sregs, sizeof(sregs))
            else:
                _check(ioctl(fd, KVM_GET_SREGS, &sregs), "KVM_GET_SREGS")
            if r.kvm_dirty_regs & KVM_SYNC_X86_EVENTS:
                memcpy(&events, &r.s.regs.events, sizeof(events))
            else:
                _check(ioctl(fd, KVM_GET_VCPU_EVENTS, &events), "KVM_GET_VCPU_EVENTS")
            _check(ioctl(fd, KVM_GET_DEBUGREGS, &dregs), "KVM_GET_DEBUGREGS")
            _check(ioctl(fd, KVM_GET_XCRS, &xcrs), "KVM_GET_XCRS")
            memset(msrs, 0, msrs_size)
            msrs.nmsrs = len(SAVED_MSRS)
            for i in range(msrs.nmsrs):
                entries[i].index = SAVED_MSRS[i]
            # KVM_GET_MSRS stops at the first MSR it does not know and returns how many it read.
            n = _check(ioctl(fd, KVM_GET_MSRS, msrs), "KVM_GET_MSRS")
            return {
                "regs": (<char *>&regs)[:sizeof(regs)],
                "sregs": (<char *>&sregs)[:sizeof(sregs)],
                "xsave": self.get_xsave(),
                "debugregs": (<char *>&dregs)[:sizeof(dregs)],
                "events": (<char *>&events)[:sizeof(events)],
                "xcrs": (<char *>&xcrs)[:sizeof(xcrs)],
                "msrs": (<char *>entries)[:n * sizeof(kvm_msr_entry)],
            }
        finally:
            free(msrs)

    def load_state(self, dict state not None, bint fpu=True, bint full=True):
        """Puts a save_state() result back. General and special registers and pending events go
        through the sync-regs area and take effect with the next KVM_RUN (no ioctl). The XSAVE
        area (x87, MXCSR, XMM, YMM, opmask, ZMM, ...) costs one ioctl and is only written when
        fpu is true (the guest ran since it was last set); debug registers, XCRs and MSRs, which
        CPL3 code cannot change, only when full is true (first load, or after a fault, timeout
        or cancel). Returns the ioctls made."""
        cdef int fd = self._fd()
        cdef kvm_run *r = self._run()
        cdef int ioctls = 0, rc
        cdef bytes b
        cdef size_t msrs_size
        cdef kvm_msrs *msrs
        _check_size(state, "regs", sizeof(kvm_regs))
        _check_size(state, "sregs", sizeof(kvm_sregs))
        _check_size(state, "events", sizeof(kvm_vcpu_events))
        _check_size(state, "xsave", self.xsave_size)
        _check_size(state, "debugregs", sizeof(kvm_debugregs))
        _check_size(state, "xcrs", sizeof(kvm_xcrs))
        b = state["msrs"]
        if len(b) % sizeof(kvm_msr_entry) or len(b) > len(SAVED_MSRS) * sizeof(kvm_msr_entry):
            raise errors.SnapshotError(f"vCPU state part 'msrs' has {len(b)} bytes")
        self._retire_pending()      # nothing of the last exit may complete after this state
        # The ioctls run with the GIL released (_ioctl_released): each reads only the bytes
        # object `b` this frame holds.
        if full:
            # Ordering: KVM applies the sync-regs area at the next KVM_RUN, after these.
            b = state["debugregs"]
            rc = _ioctl_released(fd, KVM_SET_DEBUGREGS, <char *>b)
            if rc < 0:
                _raise_errno(-rc, "KVM_SET_DEBUGREGS")
            b = state["xcrs"]
            rc = _ioctl_released(fd, KVM_SET_XCRS, <char *>b)
            if rc < 0:
                _raise_errno(-rc, "KVM_SET_XCRS")
            b = state["msrs"]
            msrs_size = 8 + len(b)
            msrs = <kvm_msrs *>malloc(msrs_size)
            if msrs == NULL:
                raise MemoryError()
            msrs.nmsrs = len(b) // sizeof(kvm_msr_entry)
            msrs.pad = 0
            memcpy(<char *>msrs + 8, <char *>b, len(b))
            rc = _ioctl_released(fd, KVM_SET_MSRS, msrs)
            free(msrs)
            if rc < 0:
                _raise_errno(-rc, "KVM_SET_MSRS")
            ioctls += 3
        if fpu or full:
            b = state["xsave"]
            rc = _ioctl_released(fd, KVM_SET_XSAVE, <char *>b)
            if rc < 0:
                _raise_errno(-rc, "KVM_SET_XSAVE")
            ioctls += 1
        _queue_sync_regs(r, state)
        return ioctls

    cdef bytes _warm_begin(self, WarmRestore *w, WarmPages pages, const unsigned char[::1] image,
                           const uint64_t[::1] nonzero, size_t n_touched, size_t hot_limit,
                           size_t n_hot, size_t cycle, dict state, bint fpu, tuple writes):
        """restore_warm's and resume_warm's part that holds the GIL: the checks, w filled, the
        last exit retired (nothing of it may complete after this state), and the snapshot's
        registers and events queued in the sync-regs area (they go in with the next KVM_RUN).
        Returns the XSAVE area w points into: the caller holds it until w is done (the state
        dict is the snapshot's, shared with other threads' restores)."""
        _check_size(state, "regs", sizeof(kvm_regs))
        _check_size(state, "sregs", sizeof(kvm_sregs))
        _check_size(state, "events", sizeof(kvm_vcpu_events))
        _check_size(state, "xsave", self.xsave_size)
        cdef kvm_run *r = self._run()
        cdef bytes xsave = state["xsave"]
        pages.start(w, image, nonzero, n_touched, hot_limit, n_hot, cycle, fpu, writes)
        w.xsave, w.xsave_size = xsave, len(xsave)
        self._retire_pending()
        _queue_sync_regs(r, state)
        return xsave

    cdef int _warm_log(self, WarmRestore *w) noexcept nogil:
        """KVM_GET_DIRTY_LOG of slot 0 into w.dirty, then the plan; 0 or an errno (w.what)."""
        cdef kvm_dirty_log log
        memset(&log, 0, sizeof(log))
        log.slot = 0
        log.dirty_bitmap = w.dirty
        w.calls = 1
        if ioctl(self.vm.fd, KVM_GET_DIRTY_LOG, &log) < 0:
            w.what = "KVM_GET_DIRTY_LOG slot 0"
            return errno
        _warm_plan(w)
        return 0

    cdef int _warm_finish(self, WarmRestore *w) noexcept nogil:
        """The copies and staged writes, KVM_CLEAR_DIRTY_LOG over the re-protected span and
        KVM_SET_XSAVE (if w.fpu); 0 or an errno (w.what), the plan then undone."""
        cdef kvm_clear_dirty_log clear
        cdef size_t lo, hi
        cdef int err = 0
        _warm_copy(w)
        if w.n_reprotect and self.vm.manual_protect:
            # only the span of words that have bits: KVM walks what it is given
            lo, hi = w.touched[0], w.touched[w.n_new - 1] + 1
            memset(&clear, 0, sizeof(clear))
            clear.slot = 0
            clear.first_page = lo * 64
            clear.num_pages = <uint32_t>(min(hi * 64, w.n_pages) - lo * 64)
            clear.dirty_bitmap = &w.reprotect[lo]
            w.calls += 1
            if ioctl(self.vm.fd, KVM_CLEAR_DIRTY_LOG, &clear) < 0:
                err, w.what = errno, "KVM_CLEAR_DIRTY_LOG slot 0"
        if not err and w.fpu:
            w.calls += 1
            w.register_calls += 1
            if ioctl(self.fd, KVM_SET_XSAVE, w.xsave) < 0:
                err, w.what = errno, "KVM_SET_XSAVE"
        if err:
            _warm_failed(w)
        return err

    cdef int _warm_hv(self, WarmRestore *w) noexcept nogil:
        cdef int err = self._warm_log(w)
        return err if err else self._warm_finish(w)

    def restore_warm(self, WarmPages pages not None, const unsigned char[::1] image not None,
                     const uint64_t[::1] nonzero not None, size_t n_touched, size_t hot_limit,
                     size_t n_hot, size_t cycle, dict state not None, bint fpu):
        """A warm restore to the baseline (memslot 0 = pages' memory, see whpfast/core/warm.py)
        in one C sequence: KVM_GET_DIRTY_LOG, the hot-set plan, the host-written pages, the page
        copies from image, KVM_CLEAR_DIRTY_LOG over the re-protected span and KVM_SET_XSAVE (if
        fpu), then registers and events into the sync-regs area. The GIL is released once, for
        the copies and the calls after them, and only for a restore of RELEASE_PAGES pages or
        more (see _restore.pxi: a GIL hand-off costs more than a short stretch frees). Debug
        registers, XCRs and MSRs are not loaded (a full restore does that, see load_state).
        Returns (dirty pages, host pages, copied, zeroed, hot pages, n_touched, hypervisor
        calls, register calls); on failure nothing of the plan is left in reprotect and the
        caller restores in full next."""
        cdef WarmRestore w
        cdef int err
        cdef PyThreadState *released
        xsave = self._warm_begin(&w, pages, image, nonzero, n_touched, hot_limit, n_hot, cycle,
                                 state, fpu, None)     # (w points into xsave: kept to the end)
        err = self._warm_log(&w)
        if not err:
            released = PyEval_SaveThread() if _warm_release(&w) else NULL
            err = self._warm_finish(&w)
            if released != NULL:
                PyEval_RestoreThread(released)
        if err:
            _raise_errno(err, w.what.decode())
        return _warm_result(&w)

    def resume_warm(self, WarmPages pages not None, const unsigned char[::1] image not None,
                    const uint64_t[::1] nonzero not None, size_t n_touched, size_t hot_limit,
                    size_t n_hot, size_t cycle, dict state not None, bint fpu, tuple writes,
                    uint64_t result, uint16_t user_cs, uint16_t user_ds,
                    long long timeout_ns=-1):
        """restore_warm, then the return from the system call the snapshot stopped at with
        `result` (syscall_return), then run(timeout_ns): one C call that releases the GIL once,
        for the restore's copies and hypervisor calls and the guest's run together. writes:
        (guest-physical offset, bytes) pairs written into memory after the copies (the caller
        marks them for the next restore). Returns restore_warm's tuple followed by the exit
        kind and the restore's time in ns. On a failed restore the guest is not entered, and
        the failure is raised as from restore_warm."""
        cdef WarmRestore w
        cdef long long start_ns = whpfast_monotonic_ns()
        xsave = self._warm_begin(&w, pages, image, nonzero, n_touched, hot_limit, n_hot, cycle,
                                 state, fpu, writes)   # (w points into xsave: kept to the end)
        w.start_ns = start_ns
        _check_sysret(self._run().s.regs.regs.rcx)     # (the snapshot's: it may come from a file)
        _sysret(self._run(), result, user_cs, user_ds)
        kind = self._enter(timeout_ns, &w)
        return _warm_result(&w) + (kind, w.done_ns - w.start_ns)

    def load_state_separately(self, dict state not None):
        """The same state through one KVM_SET_* ioctl per part, as other VMMs do (Hyperlight:
        SET_REGS, SET_SREGS, SET_FPU/XSAVE, SET_DEBUGREGS, ...). Only for the benchmark that
        compares it with load_state(). Returns the ioctls made."""
        cdef int fd = self._fd()
        cdef bytes b
        self._retire_pending()
        for part, request in (("regs", KVM_SET_REGS), ("sregs", KVM_SET_SREGS), ("xsave", KVM_SET_XSAVE),
                              ("debugregs", KVM_SET_DEBUGREGS), ("events", KVM_SET_VCPU_EVENTS)):
            b = state[part]
            _check(ioctl(fd, <unsigned long>request, <char *>b), f"KVM_SET_{part.upper()}")
        return 5

    def close(self):
        if self.timer_tid:
            timer_delete(self.timer)
            self.timer_tid = 0
        if self.run_page != NULL:
            munmap(self.run_page, self.run_size)
            self.run_page = NULL
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def __dealloc__(self):
        self.close()


# The parts of save_state(), in the order snapshots store them.
STATE_PARTS = ("regs", "sregs", "xsave", "debugregs", "events", "xcrs", "msrs")

# The backend interface (whpfast/core/hypervisor.py, checked at import by whpfast.backend).
PAGE = PAGE_SIZE
CAPABILITIES = {"file_overlay": True, "xsave_area": True, "api_calls": False}

# MSRs kept in snapshots: the syscall/sysenter entry points, the segment bases, TSC_AUX and PAT.
# CPL3 code can write none of them, so restores after a clean call skip them.
SAVED_MSRS = (0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102,
              0xC0000103, 0x174, 0x175, 0x176, 0x277)


cdef int _check_size(dict state, str part, size_t size) except -1:
    value = state.get(part)
    if not isinstance(value, bytes) or len(value) != size:
        got = len(value) if isinstance(value, bytes) else type(value).__name__
        raise errors.SnapshotError(
            f"vCPU state part {part!r} must be {size} bytes on this host, got {got}"
            + (" (the snapshot was taken on a host with other XSAVE components; take it again "
               "here)" if part == "xsave" else ""))
    return 0


cdef void _flat_segment(kvm_segment *seg, uint16_t selector, uint8_t type, int dpl, bint code):
    memset(seg, 0, sizeof(kvm_segment))
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = type
    seg.present = 1
    seg.dpl = dpl
    seg.s = 1
    seg.g = 1
    seg.l = 1 if code else 0
    seg.db = 0 if code else 1


cdef void _release(uint8_t *ptr, size_t size, bint is_file) noexcept:
    munmap(ptr, size)


include "_mapping.pxi"


DEF OVERLAY_REMAPS = 64


cdef class GuestMemory(Mapping):
    """Anonymous private memory for a guest's RAM. MAP_NORESERVE: a large sandbox costs only the
    pages it touches."""
    cdef readonly bint overlaid       # parts are copy-on-write file mappings (overlay_file)
    cdef readonly unsigned int remaps  # discards done by mapping fresh pages (memory_invalidate)

    def __init__(self, size_t size):
        cdef void *p
        if size == 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size must be a positive multiple of {PAGE_SIZE}, got {size}")
        p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if p == MAP_FAILED:
            _raise_errno(errno, f"mmap of {size} bytes of guest memory")
        self.ptr = <uint8_t *>p
        self.size = size
        self.readonly = False

    def overlay_file(self, int fd, uint64_t file_offset, size_t offset, size_t length):
        """Replaces [offset, offset+length) of this memory with a copy-on-write private mapping
        of the file at file_offset, before any hypervisor maps it: reads share the file's page
        cache, writes go to private copies and never reach the file."""
        cdef void *p
        if self.ptr == NULL:
            raise errors.SandboxClosed("the mapping is closed")
        if offset % PAGE_SIZE or length % PAGE_SIZE or file_offset % PAGE_SIZE or offset + length > self.size:
            raise ValueError(f"overlay {offset:#x}+{length:#x} is unaligned or outside the memory")
        p = mmap(self.ptr + offset, length, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fd, file_offset)
        if p == MAP_FAILED:
            _raise_errno(errno, f"mmap of a snapshot file at offset {file_offset:#x}")
        self.overlaid = True

    def anonymize(self, size_t offset, size_t length):
        """Replaces [offset, offset+length) with fresh anonymous memory (zero), undoing what
        overlay_file mapped there: the new mapping merges with the anonymous memory around it,
        so the process's host mappings (vm.max_map_count, shared by every sandbox) go back to
        what they were before the overlay. The hypervisor's MMU notifier sees the change."""
        if self.ptr == NULL:
            raise errors.SandboxClosed("the mapping is closed")
        if offset % PAGE_SIZE or length % PAGE_SIZE or offset + length > self.size:
            raise ValueError(f"anonymize {offset:#x}+{length:#x} is unaligned or outside the memory")
        if length and mmap(self.ptr + offset, length, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) == MAP_FAILED:
            _raise_errno(errno, "mmap of fresh guest memory over a file overlay")


cdef class FileMapping(Mapping):
    """A host file (or a page-aligned part of it) mapped private, rounded up to whole pages (the
    tail reads as zeros). Read-only by default; copy_on_write=True makes it writable with every
    write going to a private copy of the page, never to the file (guest memory cold-started from
    a snapshot file: sandboxes share the file's page cache and pay only for pages they write).
    The file descriptor is closed right after mapping; the mapping keeps the file alive."""
    cdef readonly uint64_t file_size

    def __init__(self, path, uint64_t offset=0, length=None, bint copy_on_write=False):
        """path: a file name, or an open file descriptor (int) that stays open."""
        cdef bytes p = str(path).encode()
        cdef struct_stat st
        cdef void *p_map
        cdef uint64_t n
        cdef bint own_fd = not isinstance(path, int)
        cdef int fd = c_open(p, O_RDONLY | O_CLOEXEC) if own_fd else path
        if fd < 0:
            _raise_errno(errno, "cannot open a file to map into the guest", path)
        try:
            if fstat(fd, &st) != 0:
                _raise_errno(errno, "cannot stat a file to map into the guest", path)
            if offset % PAGE_SIZE:
                raise ValueError(f"mapping offset {offset} is not page aligned")
            n = _mapped_length(path, st.st_size, offset, length)
            self.file_size = n
            self.size = (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
            p_map = mmap(NULL, self.size, PROT_READ | (PROT_WRITE if copy_on_write else 0),
                         MAP_PRIVATE | (MAP_NORESERVE if copy_on_write else 0), fd, offset)
            if p_map == MAP_FAILED:
                _raise_errno(errno, "cannot map a file into the guest", path)
            self.ptr = <uint8_t *>p_map
            self.is_file = True
            self.readonly = not copy_on_write
        finally:
            if own_fd:
                c_close(fd)


# ------------------------------------------------------------------------------------------------
# For the Linux personality (whpfast.linux). A Linux program's `syscall` lands in a user-page
# stub that exits with `out`; the host reads the call's registers from the sync-regs area of
# kvm_run and answers by queueing RAX, RIP and RFLAGS there, all without an extra ioctl. These are
# module-level functions over the classes above so that the SDK's paths stay as they are.

from posix.mman cimport mprotect, madvise, MADV_DONTNEED

# RFLAGS bits a program may carry through a system call (CF PF AF ZF SF TF DF OF, AC, ID); never
# IOPL (PVM then emulates every instruction), IF (no interrupts are delivered) or VM/RF.
DEF USER_RFLAGS = 0x0DD5 | 0x40000 | 0x200000


def linux_setup(Vcpu vcpu not None, uint64_t xcr0, dict msrs not None):
    """Once per vCPU, after init_long_mode(): sets XCR0 and the given MSRs (STAR/LSTAR/SFMASK),
    and makes every exit fill the sync-regs area with the general and special registers, so a
    system call's arguments are read without an ioctl."""
    cdef int fd = vcpu._fd()
    cdef kvm_run *r = vcpu._run()
    cdef size_t n = len(msrs), i = 0
    cdef size_t size = 8 + n * sizeof(kvm_msr_entry)
    cdef kvm_msrs *m
    cdef kvm_msr_entry *e
    # struct kvm_xcrs: u32 nr_xcrs, u32 flags, {u32 xcr, u32 reserved, u64 value}[16], u64 pad[16]
    cdef bytearray xcrs = bytearray(sizeof(kvm_xcrs))
    if len(xcrs) < 24:
        raise errors.HypervisorError("struct kvm_xcrs is smaller than expected")
    xcrs[0:4] = (1).to_bytes(4, "little")
    xcrs[16:24] = xcr0.to_bytes(8, "little")
    _check(ioctl(fd, KVM_SET_XCRS, <char *>xcrs), f"KVM_SET_XCRS (XCR0={xcr0:#x})")
    m = <kvm_msrs *>malloc(size)
    if m == NULL:
        raise MemoryError()
    try:
        memset(m, 0, size)
        m.nmsrs = n
        e = <kvm_msr_entry *>(<char *>m + 8)
        for index, value in msrs.items():
            e[i].index = index
            e[i].data = value
            i += 1
        if _check(ioctl(fd, KVM_SET_MSRS, m), "KVM_SET_MSRS") != <int>n:
            raise errors.HypervisorError(f"KVM_SET_MSRS set only some of {sorted(msrs)}")
    finally:
        free(m)
    _check(ioctl(fd, KVM_GET_SREGS, &r.s.regs.sregs), "KVM_GET_SREGS")
    r.kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS


def syscall_regs(Vcpu vcpu not None):
    """(rax, rdi, rsi, rdx, r10, r8, r9, rcx, r11, rip) of the last exit: the system call number,
    its six arguments, where `syscall` left the return address and RFLAGS, and RIP as the exit
    left it (on an OUT exit KVM reports either the OUT's address or the next instruction's:
    PVM has stepped past it, VMX steps on the next KVM_RUN)."""
    cdef kvm_regs *g = &vcpu._run().s.regs.regs
    return (g.rax, g.rdi, g.rsi, g.rdx, g.r10, g.r8, g.r9, g.rcx, g.r11, g.rip)


def registers(Vcpu vcpu not None):
    """Every general register, RIP, RFLAGS and the CS/SS selectors as of the last exit (or as
    queued), by name."""
    cdef kvm_run *r = vcpu._run()
    cdef kvm_regs *g = &r.s.regs.regs
    return {"cs": r.s.regs.sregs.cs.selector, "ss": r.s.regs.sregs.ss.selector,"rax": g.rax, "rbx": g.rbx, "rcx": g.rcx, "rdx": g.rdx, "rsi": g.rsi, "rdi": g.rdi,
            "rsp": g.rsp, "rbp": g.rbp, "r8": g.r8, "r9": g.r9, "r10": g.r10, "r11": g.r11,
            "r12": g.r12, "r13": g.r13, "r14": g.r14, "r15": g.r15, "rip": g.rip, "rflags": g.rflags}


def syscall_return(Vcpu vcpu not None, uint64_t result, uint16_t user_cs, uint16_t user_ds):
    """Returns from the system call of the last exit as `sysret` would: RAX = result, RIP = RCX,
    RFLAGS = R11 (user bits only). Where `syscall` entered CPL0 (hardware VMX/SVM; PVM keeps CPL3)
    the stub ran at CPL0, so CS and SS go back to the user selectors too. GuestFault, with
    nothing queued, when RCX is not a user address (see _check_sysret)."""
    cdef kvm_run *r = vcpu._run()
    _check_sysret(r.s.regs.regs.rcx)
    _sysret(r, result, user_cs, user_ds)


cdef void _sysret(kvm_run *r, uint64_t result, uint16_t user_cs, uint16_t user_ds) noexcept:
    cdef kvm_regs *g = &r.s.regs.regs
    g.rax = result
    g.rip = g.rcx
    g.rflags = (g.r11 & USER_RFLAGS) | 0x2
    r.kvm_dirty_regs |= KVM_SYNC_X86_REGS
    if r.s.regs.sregs.cs.selector != user_cs or r.s.regs.sregs.ss.selector != user_ds:
        _flat_segment(&r.s.regs.sregs.cs, user_cs, 0xB, 3, 1)
        _flat_segment(&r.s.regs.sregs.ss, user_ds, 0x3, 3, 0)
        r.kvm_dirty_regs |= KVM_SYNC_X86_SREGS


def enter_user(Vcpu vcpu not None, uint64_t rip, uint64_t rsp, uint16_t user_cs, uint16_t user_ds):
    """Queues a process's first instruction: every GPR zero (RDX = 0: no exit handler from the
    loader), the stack pointer, RFLAGS with only the fixed bit, user CS/SS and FS/GS base 0."""
    cdef kvm_run *r = vcpu._run()
    vcpu.enter(rip, rsp, 0x2, 0)
    _flat_segment(&r.s.regs.sregs.cs, user_cs, 0xB, 3, 1)
    _flat_segment(&r.s.regs.sregs.ss, user_ds, 0x3, 3, 0)
    r.s.regs.sregs.fs.base = 0
    r.s.regs.sregs.gs.base = 0
    r.kvm_dirty_regs |= KVM_SYNC_X86_SREGS


def segment_base(Vcpu vcpu not None, str which, value=None):
    """Reads (value None) or queues the FS or GS base (arch_prctl): it is a field of the special
    registers in the sync-regs area, so setting it costs no ioctl."""
    cdef kvm_run *r = vcpu._run()
    cdef kvm_segment *seg
    if which == "fs":
        seg = &r.s.regs.sregs.fs
    elif which == "gs":
        seg = &r.s.regs.sregs.gs
    else:
        raise ValueError(f"segment_base: {which!r} is not 'fs' or 'gs'")
    if value is None:
        return seg.base
    seg.base = <uint64_t>value
    r.kvm_dirty_regs |= KVM_SYNC_X86_SREGS
    return seg.base


def memory_invalidate(Vcpu vcpu not None, Mapping memory not None, size_t offset, size_t length,
                      bint discard, bint anonymous=False, bint remap=True):
    """Makes the hypervisor forget its translations of these guest pages, so page-table entries
    the host rewrote (munmap, mprotect) take effect. (The vCPU is for backends that flush the
    guest's TLB through it, as WHP does; KVM's MMU notifier flushes it for the whole VM.) KVM only notices a host write to guest page
    tables through its MMU notifier, which fires when the host mapping of the pages changes: a
    shadow-paging host (PVM) would otherwise keep using stale translations. discard=True also
    drops the pages' contents (MADV_DONTNEED: they read as zero again and stop costing memory);
    otherwise the protection is lowered and raised again, which keeps them. anonymous=True: the
    caller knows no file is mapped over these pages (overlay_file), so MADV_DONTNEED is right
    (it frees them) even where other parts of the memory are file mappings. remap=False: never
    a fresh mapping over file-mapped pages (it would split a host mapping for good: the caller
    cannot undo it, e.g. over a snapshot file's image), always zeroing in place."""
    if memory.ptr == NULL:
        raise errors.SandboxClosed("the mapping is closed")
    if offset % PAGE_SIZE or length % PAGE_SIZE or offset + length > memory.size or memory.readonly:
        raise ValueError(f"invalidate {offset:#x}+{length:#x} is unaligned or outside the memory")
    if length == 0:
        return
    if discard and not anonymous and isinstance(memory, GuestMemory) and (<GuestMemory>memory).overlaid:
        # MADV_DONTNEED on a copy-on-write file overlay would bring the file's bytes back, not
        # zeros: a fresh anonymous mapping over the range zeroes and frees it (and fires the MMU
        # notifier all the same). Each one may split a host mapping in three, and the process's
        # mappings are few (vm.max_map_count, 65530, for all sandboxes): past OVERLAY_REMAPS the
        # pages are zeroed in place instead (private pages, within the guest's own memory).
        if remap and (<GuestMemory>memory).remaps < OVERLAY_REMAPS:
            if mmap(memory.ptr + offset, length, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) == MAP_FAILED:
                _raise_errno(errno, "mmap of fresh guest memory over discarded pages")
            (<GuestMemory>memory).remaps += 1
        else:
            memset(memory.ptr + offset, 0, length)
            _check(mprotect(memory.ptr + offset, length, PROT_READ), "mprotect of guest memory")
            _check(mprotect(memory.ptr + offset, length, PROT_READ | PROT_WRITE), "mprotect of guest memory")
    elif discard:
        _check(madvise(memory.ptr + offset, length, MADV_DONTNEED), "madvise(MADV_DONTNEED) of guest memory")
    else:
        _check(mprotect(memory.ptr + offset, length, PROT_READ), "mprotect of guest memory")
        _check(mprotect(memory.ptr + offset, length, PROT_READ | PROT_WRITE), "mprotect of guest memory")


def memory_populate(Mapping memory not None, size_t offset, size_t length):
    """Faults the host pages of a new guest mapping in at once (MADV_POPULATE_WRITE, Linux 5.14+;
    a no-op where unsupported). The guest's first touch of a page then finds it present, and the
    hypervisor maps its neighbours along with it instead of taking one fault per page (measured
    on PVM: `import pandas` 3.2 s -> 2.6 s)."""
    if memory.ptr == NULL:
        raise errors.SandboxClosed("the mapping is closed")
    if offset % PAGE_SIZE or length % PAGE_SIZE or offset + length > memory.size or memory.readonly:
        raise ValueError(f"populate {offset:#x}+{length:#x} is unaligned or outside the memory")
    if length:
        madvise(memory.ptr + offset, length, 23)      # MADV_POPULATE_WRITE; errors ignored
