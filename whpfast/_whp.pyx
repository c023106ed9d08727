# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The Windows Hypervisor Platform backend: the same classes and exit kinds as _kvm.pyx, on
WinHvPlatform.dll. One cdef class per object (partition, virtual processor, VirtualAlloc'd memory,
a mapped file view), each released exactly once. Every failed WHv* call goes through _check_hr()
and every failed kernel32 call through _raise_win32(): the conversion points into the package's
exceptions.

What differs from KVM, and how it is handled:
- Registers: all writes (a call's entry registers, a restore's complete register file, RIP
  stepped past an `out`) are queued and reach the processor in ONE WHvSetVirtualProcessorRegisters
  call made right before the next WHvRunVirtualProcessor.
- I/O exits stop AT the `out` instruction: the backend steps RIP by VpContext.InstructionLength.
- Dirty pages: WHvQueryGpaRangeDirtyBitmap reads and clears in one call (like KVM without manual
  protect), so there is no hot set of pages left writable.
- Memory from VirtualAlloc is pinned by WHvMapGpaRange: resets are memset/memcpy in place, never
  decommit/recommit (the stale-input bug of prior art).
- Timeouts and cancel(): WHvCancelRunVirtualProcessor, from a timer-queue timer or another thread.
  A Python signal (Ctrl-C) cannot interrupt WHvRunVirtualProcessor; use a timeout.
"""

from libc.string cimport memset, memcpy
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, intptr_t, uintptr_t
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.mem cimport PyMem_Free
from cpython.unicode cimport PyUnicode_AsWideCharString
from libc.stddef cimport wchar_t

from .includes.whp cimport *

from . import errors

include "_exits.pxi"
include "_cancel.pxi"
include "_restore.pxi"
include "_warm.pxi"

include "_page.pxi"
DEF ALLOCATION_GRANULARITY = 65536   # MapViewOfFile offsets must be multiples of this
DEF MAX_PENDING = 64
DEF N_GPRS = 18
DEF N_STATE = 55

# The vCPU state a snapshot keeps: general (18), segment and table (10), control (5), debug (6)
# registers, XCR0, EFER, APIC base, the MSRs and the pending-event registers (an interruption the
# next entry injects, the interrupt shadow / NMI mask, an exception raised but not yet injected),
# set back in one WHvSetVirtualProcessorRegisters. A restore thus also clears an event left
# pending by whatever ran before it (a run cancelled between exception and delivery).
cdef WHV_REGISTER_NAME STATE_NAMES[N_STATE]
_names = [
    WHvX64RegisterRax, WHvX64RegisterRcx, WHvX64RegisterRdx, WHvX64RegisterRbx, WHvX64RegisterRsp,
    WHvX64RegisterRbp, WHvX64RegisterRsi, WHvX64RegisterRdi, WHvX64RegisterR8, WHvX64RegisterR9,
    WHvX64RegisterR10, WHvX64RegisterR11, WHvX64RegisterR12, WHvX64RegisterR13, WHvX64RegisterR14,
    WHvX64RegisterR15, WHvX64RegisterRip, WHvX64RegisterRflags,
    WHvX64RegisterEs, WHvX64RegisterCs, WHvX64RegisterSs, WHvX64RegisterDs, WHvX64RegisterFs,
    WHvX64RegisterGs, WHvX64RegisterLdtr, WHvX64RegisterTr, WHvX64RegisterIdtr, WHvX64RegisterGdtr,
    WHvX64RegisterCr0, WHvX64RegisterCr2, WHvX64RegisterCr3, WHvX64RegisterCr4, WHvX64RegisterCr8,
    WHvX64RegisterDr0, WHvX64RegisterDr1, WHvX64RegisterDr2, WHvX64RegisterDr3, WHvX64RegisterDr6,
    WHvX64RegisterDr7, WHvX64RegisterXCr0, WHvX64RegisterEfer, WHvX64RegisterApicBase,
    WHvX64RegisterPat, WHvX64RegisterKernelGsBase, WHvX64RegisterStar, WHvX64RegisterLstar,
    WHvX64RegisterCstar, WHvX64RegisterSfmask, WHvX64RegisterSysenterCs, WHvX64RegisterSysenterEip,
    WHvX64RegisterSysenterEsp, WHvX64RegisterTscAux,
    WHvRegisterPendingInterruption, WHvRegisterInterruptState, WHvRegisterPendingEvent,
]
assert len(_names) == N_STATE
# Every register the backend queues is one of these, so the queue (MAX_PENDING) never overflows.
assert N_STATE <= MAX_PENDING
for _i, _n in enumerate(_names):
    STATE_NAMES[_i] = _n
# Groups for the benchmark that sets them with separate calls, as other VMMs do.
GROUPS = ((0, 18), (18, 33), (33, 39), (39, N_STATE))   # general, special, debug, XCR0/MSRs/events
# The same names as numbers (WHV_REGISTER_NAME), in the order of a snapshot's "registers" part.
STATE_REGISTERS = tuple(_names)

STATE_PARTS = ("registers", "xsave")

# The backend interface (whpfast/core/hypervisor.py, checked at import by whpfast.backend).
PAGE = PAGE_SIZE
CAPABILITIES = {"file_overlay": False, "xsave_area": False, "api_calls": True}
REGISTERS_SIZE = N_STATE * sizeof(WHV_REGISTER_VALUE)
XSAVE_MAX = 16384


cdef int _check_hr(HRESULT hr, str what) except -1:
    if hr < 0:
        raise errors.from_hresult(<uint32_t>hr, what)
    return 0


cdef int _raise_win32(str what, path=None) except -1:
    raise errors.from_winerror(GetLastError(), what, path)


cdef class WhpSystem:
    """The Windows Hypervisor Platform: checks that the hypervisor is present."""
    cdef readonly bint manual_dirty_log

    def __init__(self):
        cdef WHV_CAPABILITY cap
        cdef uint32_t written = 0
        memset(&cap, 0, sizeof(cap))
        hr = WHvGetCapability(WHvCapabilityCodeHypervisorPresent, &cap, sizeof(cap), &written)
        if hr < 0 or not cap.HypervisorPresent:
            raise errors.HypervisorUnavailable(
                "the Windows Hypervisor Platform is not available: enable the optional feature "
                "'Windows Hypervisor Platform' (and virtualization in the firmware), then reboot"
                + (f" (WHvGetCapability: {<uint32_t>hr:#010x})" if hr < 0 else ""))
        self.manual_dirty_log = False

    def create_vm(self):
        return Vm(self)

    def close(self):
        pass


cdef class Vm:
    """A partition: one virtual processor, guest memory mapped with WHvMapGpaRange."""
    cdef WHV_PARTITION_HANDLE partition
    cdef bint alive
    cdef readonly WhpSystem system
    cdef readonly bint manual_protect
    cdef dict slots            # slot -> (gpa, size)

    def __cinit__(self):
        self.alive = False

    def __init__(self, WhpSystem system not None):
        cdef WHV_PARTITION_PROPERTY prop
        self.system = system
        self.slots = {}
        _check_hr(WHvCreatePartition(&self.partition), "WHvCreatePartition")
        self.alive = True
        memset(&prop, 0, sizeof(prop))
        prop.ProcessorCount = 1
        _check_hr(WHvSetPartitionProperty(self.partition, WHvPartitionPropertyCodeProcessorCount,
                                          &prop, sizeof(prop)), "WHvSetPartitionProperty(ProcessorCount)")
        _check_hr(WHvSetupPartition(self.partition), "WHvSetupPartition")
        self.manual_protect = False

    cdef WHV_PARTITION_HANDLE _handle(self) except? NULL:
        if not self.alive:
            raise errors.SandboxClosed("the partition is closed")
        return self.partition

    def set_memory(self, uint32_t slot, uint64_t gpa, uint64_t size, uint64_t host_address,
                   bint readonly=False, bint log_dirty=False):
        """Maps host memory at gpa, read+execute and, unless readonly, write; size 0 unmaps."""
        cdef WHV_PARTITION_HANDLE p = self._handle()
        cdef uint32_t flags = WHvMapGpaRangeFlagRead | WHvMapGpaRangeFlagExecute
        if size == 0:
            old = self.slots.pop(slot, None)
            if old is not None:
                _check_hr(WHvUnmapGpaRange(p, old[0], old[1]), f"WHvUnmapGpaRange slot {slot}")
            return
        if not readonly:
            flags |= WHvMapGpaRangeFlagWrite
        if log_dirty:
            flags |= WHvMapGpaRangeFlagTrackDirtyPages
        old = self.slots.pop(slot, None)
        if old is not None:
            # Setting a slot again replaces it, as on KVM (the Linux personality turns dirty
            # tracking on this way); WHP maps a range only once, so unmap it first. The pages
            # behind it stay the same ones (the memory is not decommitted).
            _check_hr(WHvUnmapGpaRange(p, old[0], old[1]), f"WHvUnmapGpaRange slot {slot}")
        _check_hr(WHvMapGpaRange(p, <void *><uintptr_t>host_address, gpa, size,
                                 <WHV_MAP_GPA_RANGE_FLAGS>flags),
                  f"WHvMapGpaRange slot {slot} at {gpa:#x}+{size:#x}")
        self.slots[slot] = (gpa, size)

    def get_dirty_log(self, uint32_t slot, unsigned char[::1] bitmap not None):
        """Fills bitmap with the pages the guest wrote, and clears and re-arms them (one call)."""
        cdef WHV_PARTITION_HANDLE p = self._handle()
        cdef uint64_t gpa, size
        cdef HRESULT hr
        gpa, size = self.slots[slot]
        with nogil:         # only C data: other threads' sandboxes run meanwhile
            hr = WHvQueryGpaRangeDirtyBitmap(p, gpa, size, <uint64_t *>&bitmap[0], <uint32_t>bitmap.shape[0])
        if hr < 0:
            _check_hr(hr, f"WHvQueryGpaRangeDirtyBitmap slot {slot}")

    def clear_dirty_log(self, uint32_t slot, uint64_t first_page, uint32_t num_pages, bitmap):
        """Nothing to do: reading the dirty bitmap already cleared it."""

    def create_vcpu(self, int index=0):
        return Vcpu(self, index)

    def close(self):
        if self.alive:
            WHvDeletePartition(self.partition)
            self.alive = False

    def __dealloc__(self):
        self.close()


cdef struct TimerContext:
    WHV_PARTITION_HANDLE partition
    uint32_t index
    volatile int fired


cdef void _on_timer(void *parameter, BOOLEAN timer_fired) noexcept nogil:
    # Runs on a timer-queue thread: mark the timeout, then stop the processor.
    cdef TimerContext *ctx = <TimerContext *>parameter
    ctx.fired = 1
    WHvCancelRunVirtualProcessor(ctx.partition, ctx.index, 0)


cdef long long _clock_ns() noexcept nogil:
    """A monotonic clock in ns (QueryPerformanceCounter), for resume_warm's restore time."""
    cdef LARGE_INTEGER count, frequency
    QueryPerformanceCounter(&count)
    QueryPerformanceFrequency(&frequency)
    return <long long>(<double>count.QuadPart * 1e9 / <double>frequency.QuadPart)


cdef inline uint16_t _attributes(uint8_t type, bint s, int dpl, bint present, bint l, bint db, bint g):
    # WHV_X64_SEGMENT_REGISTER.Attributes: type 0-3, S 4, DPL 5-6, P 7, L 13, D/B 14, G 15
    return type | (s << 4) | (dpl << 5) | (present << 7) | (l << 13) | (db << 14) | (g << 15)


cdef class Vcpu(CancelState):
    """A virtual processor. Register writes are queued and applied in one call before each run."""
    cdef readonly Vm vm
    cdef WHV_PARTITION_HANDLE partition
    cdef uint32_t index
    cdef bint alive
    cdef WHV_REGISTER_NAME pending_names[MAX_PENDING]
    cdef WHV_REGISTER_VALUE pending_values[MAX_PENDING]
    cdef uint32_t n_pending
    cdef WHV_RUN_VP_EXIT_CONTEXT exit
    cdef TimerContext timer
    cdef volatile int running             # inside WHvRunVirtualProcessor (or about to be)
    # Tests turn this off to show that a backend which does not step RIP past `out` fails.
    cdef public bint step_rip
    cdef readonly uint64_t api_calls       # WHv* calls made, for measurements
    # The Linux personality (functions at the end of this file): the registers of the system
    # call at the last exit, read once by syscall_regs() for syscall_return() (valid until the
    # next run), and whether host-rewritten page tables need the guest's TLB flushed.
    cdef uint64_t sys_rcx, sys_r11
    cdef uint16_t sys_cs, sys_ss
    cdef bint sys_valid
    cdef bint tlb_stale

    def __cinit__(self):
        self.alive = False
        self.n_pending = 0
        self.step_rip = True

    def __init__(self, Vm vm not None, int index=0):
        self.vm = vm
        self.partition = vm._handle()
        self.index = index
        _check_hr(WHvCreateVirtualProcessor(self.partition, index, 0), "WHvCreateVirtualProcessor")
        self.alive = True
        self.timer.partition = self.partition
        self.timer.index = index

    cdef int _check_alive(self) except -1:
        if not self.alive or not self.vm.alive:
            raise errors.SandboxClosed("the virtual processor is closed")
        return 0

    cdef void _queue(self, WHV_REGISTER_NAME name, WHV_REGISTER_VALUE *value) noexcept nogil:
        """Adds a register write to the batch; a later write of the same register replaces it."""
        cdef uint32_t i
        for i in range(self.n_pending):
            if self.pending_names[i] == name:
                self.pending_values[i] = value[0]
                return
        self.pending_names[self.n_pending] = name
        self.pending_values[self.n_pending] = value[0]
        self.n_pending += 1

    cdef void _queue64(self, WHV_REGISTER_NAME name, uint64_t value) noexcept:
        cdef WHV_REGISTER_VALUE v
        memset(&v, 0, sizeof(v))
        v.Reg64 = value
        self._queue(name, &v)

    cdef void _queue_segment(self, WHV_REGISTER_NAME name, uint16_t selector, uint64_t base,
                             uint32_t limit, uint16_t attributes) noexcept:
        cdef WHV_REGISTER_VALUE v
        memset(&v, 0, sizeof(v))
        v.Segment.Base = base
        v.Segment.Limit = limit
        v.Segment.Selector = selector
        v.Segment.Attributes = attributes
        self._queue(name, &v)

    cdef void _queue_table(self, WHV_REGISTER_NAME name, uint64_t base, uint16_t limit) noexcept:
        cdef WHV_REGISTER_VALUE v
        memset(&v, 0, sizeof(v))
        v.Table.Base = base
        v.Table.Limit = limit
        self._queue(name, &v)

    cdef int _get(self, const WHV_REGISTER_NAME *names, uint32_t count,
                  WHV_REGISTER_VALUE *values) except -1:
        """Reads registers in one call; writes still queued count as current (they are what the
        next run will see)."""
        cdef uint32_t i, j
        self._check_alive()
        _check_hr(WHvGetVirtualProcessorRegisters(self.partition, self.index, names, count, values),
                  "WHvGetVirtualProcessorRegisters")
        self.api_calls += 1
        for i in range(self.n_pending):
            for j in range(count):
                if names[j] == self.pending_names[i]:
                    values[j] = self.pending_values[i]
        return 0

    cdef HRESULT _flush_hr(self) noexcept nogil:
        """Sends the queued register writes in one WHvSetVirtualProcessorRegisters; returns its
        HRESULT (or WHvGetVirtualProcessorRegisters', see below). Without the GIL: resume_warm
        makes it between a restore and the run."""
        cdef WHV_REGISTER_NAME cr3 = WHvX64RegisterCr3
        cdef WHV_REGISTER_VALUE value
        cdef HRESULT hr
        cdef uint32_t i
        if self.tlb_stale:
            # The host rewrote guest page tables (Linux personality: munmap, mprotect). Nothing
            # tells WHP so (no shadow paging: the processor walks the tables itself), but the
            # guest's TLB may still hold the old translations: setting CR3, even to its current
            # value (a queued one counts), flushes them as a MOV to CR3 does (no global pages,
            # no PCIDs here).
            hr = WHvGetVirtualProcessorRegisters(self.partition, self.index, &cr3, 1, &value)
            self.api_calls += 1
            if hr < 0:
                return hr
            for i in range(self.n_pending):
                if self.pending_names[i] == cr3:
                    value = self.pending_values[i]
            self._queue(cr3, &value)
            self.tlb_stale = False
        if self.n_pending:
            hr = WHvSetVirtualProcessorRegisters(self.partition, self.index, self.pending_names,
                                                 self.n_pending, self.pending_values)
            self.api_calls += 1
            if hr < 0:
                return hr
            self.n_pending = 0
        return 0

    cdef int _flush(self) except -1:
        self._check_alive()
        _check_hr(self._flush_hr(), "WHvSetVirtualProcessorRegisters")
        return 0

    def init_long_mode(self, *, uint64_t cr0, uint64_t cr3, uint64_t cr4, uint64_t efer,
                       uint64_t gdt_base, uint16_t gdt_limit, uint64_t idt_base, uint16_t idt_limit,
                       uint64_t tss_base, uint32_t tss_limit, uint16_t tss_selector,
                       uint16_t code_selector, uint16_t data_selector, int cpl):
        """64-bit mode at the given privilege level with flat segments matching the host's GDT
        (queued: applied with the first run)."""
        cdef uint16_t data = _attributes(0x3, 1, cpl, 1, 0, 1, 1)
        self._check_alive()
        self._queue_segment(WHvX64RegisterCs, code_selector, 0, 0xFFFFFFFF, _attributes(0xB, 1, cpl, 1, 1, 0, 1))
        self._queue_segment(WHvX64RegisterDs, data_selector, 0, 0xFFFFFFFF, data)
        self._queue_segment(WHvX64RegisterEs, data_selector, 0, 0xFFFFFFFF, data)
        self._queue_segment(WHvX64RegisterFs, data_selector, 0, 0xFFFFFFFF, data)
        self._queue_segment(WHvX64RegisterGs, data_selector, 0, 0xFFFFFFFF, data)
        self._queue_segment(WHvX64RegisterSs, data_selector, 0, 0xFFFFFFFF, data)
        self._queue_segment(WHvX64RegisterTr, tss_selector, tss_base, tss_limit, _attributes(0xB, 0, 0, 1, 0, 0, 0))
        self._queue_segment(WHvX64RegisterLdtr, 0, 0, 0, _attributes(0x2, 0, 0, 0, 0, 0, 0))
        self._queue_table(WHvX64RegisterGdtr, gdt_base, gdt_limit)
        self._queue_table(WHvX64RegisterIdtr, idt_base, idt_limit)
        self._queue64(WHvX64RegisterCr0, cr0)
        self._queue64(WHvX64RegisterCr3, cr3)
        self._queue64(WHvX64RegisterCr4, cr4)
        self._queue64(WHvX64RegisterEfer, efer)

    def enter(self, uint64_t rip, uint64_t rsp, uint64_t rflags=0x2, uint64_t rdi=0):
        """Queues a fresh register file for the next run: every GPR zero except the entry point,
        stack and first argument."""
        cdef int i
        self.sys_valid = False
        for i in range(16):
            self._queue64(STATE_NAMES[i], 0)
        self._queue64(WHvX64RegisterRip, rip)
        self._queue64(WHvX64RegisterRsp, rsp)
        self._queue64(WHvX64RegisterRflags, rflags)
        self._queue64(WHvX64RegisterRdi, rdi)

    def run(self, long long timeout_ns=-1):
        """Runs until an exit; returns an EXIT_* kind, details in the exit attributes."""
        return self._enter(timeout_ns, NULL)

    cdef int _enter(self, long long timeout_ns, WarmRestore *warm) except -1:
        """run(), and resume_warm's run: with warm, its restore (_warm_hv) and the register batch
        are done first, in the same release of the GIL as the first WHvRunVirtualProcessor; if
        either fails, the processor is not run and the failure is raised. `running` is set
        before, so a cancel() during the restore cancels the run that follows (WHP keeps a
        cancel of an idle processor for its next run)."""
        cdef HRESULT hr = 0, warm_hr = 0
        cdef HANDLE timer = NULL
        cdef DWORD ms
        cdef uint32_t reason
        cdef bint entered
        self._check_alive()
        self.timer.fired = 0
        self.sys_valid = False
        if timeout_ns > 0:
            ms = <DWORD>((timeout_ns + 999999) // 1000000)
            if not CreateTimerQueueTimer(&timer, NULL, _on_timer, &self.timer, ms, 0, WT_EXECUTEONLYONCE):
                _raise_win32("CreateTimerQueueTimer")
        try:
            while True:
                if warm == NULL:
                    self._flush()
                    if self.cancel_requested:
                        return EXIT_CANCELLED
                # From here cancel() must stop the processor (see cancel()).
                self.running = 1
                with nogil:
                    if warm != NULL:
                        warm_hr = self._warm_hv(warm)
                        if warm_hr >= 0:
                            warm_hr = self._flush_hr()
                            if warm_hr < 0:
                                warm.what = "WHvSetVirtualProcessorRegisters"
                        warm.done_ns = _clock_ns()
                    entered = warm_hr >= 0 and not self.cancel_requested
                    if entered:
                        hr = WHvRunVirtualProcessor(self.partition, self.index, &self.exit,
                                                    sizeof(self.exit))
                self.running = 0
                if warm != NULL:
                    if warm_hr < 0:
                        _check_hr(warm_hr, warm.what.decode())
                    warm = NULL          # restored once, whatever the run does next
                if not entered:
                    return EXIT_CANCELLED
                self.api_calls += 1
                _check_hr(hr, "WHvRunVirtualProcessor")
                reason = self.exit.ExitReason
                if reason == WHvRunVpExitReasonCanceled:
                    if self.cancel_requested:
                        return EXIT_CANCELLED
                    if self.timer.fired:
                        return EXIT_TIMEOUT
                    continue     # a cancel left over from a timer that fired as a run ended
                return self._decode(reason)
        finally:
            self.running = 0
            if timer != NULL:
                with nogil:
                    # waits for a callback in progress, so the timer context outlives it
                    DeleteTimerQueueTimer(NULL, timer, INVALID_HANDLE_VALUE)

    cdef int _decode(self, uint32_t reason) except -1:
        cdef uint32_t info
        self.exit_reason = reason
        if reason == WHvRunVpExitReasonX64IoPortAccess:
            info = self.exit.IoPortAccess.AccessInfo.AsUINT32
            self.io_port = self.exit.IoPortAccess.PortNumber
            self.io_direction = info & 1
            self.io_size = (info >> 1) & 7
            self.io_string = (info >> 4) & 3 != 0       # StringOp, RepPrefix
            # AccessSize is 1, 2 or 4 bytes: the value is that many low bytes of RAX
            self.io_value = <uint32_t>(self.exit.IoPortAccess.Rax
                                       & (((<uint64_t>1) << (8 * (self.io_size & 4 or self.io_size))) - 1))
            if self.step_rip and self.io_direction and not self.io_string:
                # WHP stops AT the instruction and leaves its emulation to the host: an OUT is
                # done by stepping past it, in the next run's register batch. An IN or string
                # I/O is never emulated (the sandbox refuses it): nothing of it can complete.
                self._queue64(WHvX64RegisterRip,
                              self.exit.VpContext.Rip + self.exit.VpContext.InstructionLength)
            return EXIT_IO
        if reason == WHvRunVpExitReasonMemoryAccess:
            info = self.exit.MemoryAccess.AccessInfo.AsUINT32
            self.mmio_address = self.exit.MemoryAccess.Gpa
            self.mmio_is_write = (info & 3) == 1
            return EXIT_MMIO
        if reason == WHvRunVpExitReasonUnrecoverableException:
            return EXIT_SHUTDOWN
        if reason == WHvRunVpExitReasonX64Halt:
            return EXIT_HLT
        if reason == WHvRunVpExitReasonUnsupportedFeature:
            self.internal_suberror = reason
            self.internal_data = (self.exit.VpContext.Rip,)
            return EXIT_INTERNAL_ERROR
        if reason == WHvRunVpExitReasonInvalidVpRegisterValue:
            self.fail_entry_reason = reason
            return EXIT_FAIL_ENTRY
        return EXIT_UNKNOWN

    def cancel(self):
        """Stops the call this processor runs (from any thread): safe when it is idle or closed.

        Only the first cancel of a call does anything, and it calls WHvCancelRunVirtualProcessor
        only while run() is in (or about to enter) WHvRunVirtualProcessor; otherwise run() sees
        cancel_requested before its next run. So a loop of cancels costs one WHv* call at most,
        and an idle cancel leaves nothing pending in WHP (one landing just as a run returns stays
        pending and makes a later run return Canceled at once, which run() skips). `running`,
        like the rest of _cancel.pxi, changes only with the GIL held."""
        if not self.alive or not self._first_cancel():
            return
        if self.running:
            WHvCancelRunVirtualProcessor(self.partition, self.index, 0)
            self.kicks += 1

    def save_state(self):
        """The complete vCPU state: {"registers": N_STATE WHV_REGISTER_VALUEs, "xsave": the
        compacted XSAVE area}. Queued writes not yet applied count as current."""
        cdef WHV_REGISTER_VALUE values[N_STATE]
        cdef uint32_t i, j, written = 0
        cdef bytes xsave = bytes(XSAVE_MAX)
        self._check_alive()
        _check_hr(WHvGetVirtualProcessorRegisters(self.partition, self.index, STATE_NAMES, N_STATE,
                                                  values), "WHvGetVirtualProcessorRegisters")
        for i in range(self.n_pending):
            for j in range(N_STATE):
                if STATE_NAMES[j] == self.pending_names[i]:
                    values[j] = self.pending_values[i]
        _check_hr(WHvGetVirtualProcessorXsaveState(self.partition, self.index, <char *>xsave,
                                                   XSAVE_MAX, &written), "WHvGetVirtualProcessorXsaveState")
        return {"registers": (<char *>values)[:REGISTERS_SIZE], "xsave": xsave[:written]}

    def load_state(self, dict state not None, bint fpu=True, bint full=True):
        """Puts a save_state() result back: every register (general, special, debug, XCR0, MSRs)
        joins the register batch of the next run (one WHvSetVirtualProcessorRegisters, shared
        with the call's own entry registers); the XSAVE area costs one more call, made only when
        fpu or full. Returns the WHv* calls this costs."""
        cdef bytes xsave = self._queue_state(state)
        cdef uint32_t n
        cdef char *area
        cdef HRESULT hr
        if fpu or full:
            area, n = <char *>xsave, len(xsave)     # `xsave` is held by this frame
            with nogil:
                hr = WHvSetVirtualProcessorXsaveState(self.partition, self.index, area, n)
            _check_hr(hr, "WHvSetVirtualProcessorXsaveState")
            self.api_calls += 1
            return 2
        return 1

    cdef bytes _queue_state(self, dict state):
        """Checks a save_state() result, queues its registers for the next run and returns its
        XSAVE area (load_state, restore_warm)."""
        cdef bytes regs = state.get("registers")
        cdef bytes xsave = state.get("xsave")
        cdef const WHV_REGISTER_VALUE *values
        cdef uint32_t i
        if not isinstance(regs, bytes) or len(regs) != REGISTERS_SIZE:
            got = len(regs) if isinstance(regs, bytes) else type(regs).__name__
            raise errors.SnapshotError(f"vCPU state part 'registers' must be {REGISTERS_SIZE} bytes on "
                                       f"this host, got {got}")
        if not isinstance(xsave, bytes) or not 576 <= len(xsave) <= XSAVE_MAX:
            raise errors.SnapshotError("vCPU state part 'xsave' has an impossible size")
        self._check_alive()
        self.sys_valid = False
        values = <const WHV_REGISTER_VALUE *><char *>regs
        for i in range(N_STATE):
            self._queue(STATE_NAMES[i], <WHV_REGISTER_VALUE *>&values[i])
        return xsave

    cdef bytes _warm_begin(self, WarmRestore *w, WarmPages pages, const unsigned char[::1] image,
                           const uint64_t[::1] nonzero, size_t n_touched, size_t hot_limit,
                           size_t n_hot, size_t cycle, dict state, bint fpu, tuple writes):
        """restore_warm's and resume_warm's part that holds the GIL: the checks, w filled and
        the snapshot's registers queued for the next run's batch. Returns the XSAVE area w
        points into: the caller holds it until w is done (the state dict is the snapshot's,
        shared with other threads' restores)."""
        cdef uint64_t gpa, size
        cdef bytes xsave
        self._check_alive()
        gpa, size = self.vm.slots[0]
        if size != pages.n_pages * PAGE_SIZE or gpa != 0:
            raise ValueError("restore_warm: slot 0 is not this memory")
        pages.start(w, image, nonzero, n_touched, hot_limit, n_hot, cycle, fpu, writes)
        xsave = self._queue_state(state)     # checked
        w.xsave, w.xsave_size = xsave, len(xsave)
        w.start_ns = _clock_ns()
        return xsave

    cdef HRESULT _warm_log(self, WarmRestore *w) noexcept nogil:
        """WHvQueryGpaRangeDirtyBitmap of slot 0 (gpa 0) into w.dirty (it also re-arms the
        pages: no hot set here, hot_limit is 0), then the plan."""
        cdef HRESULT hr = WHvQueryGpaRangeDirtyBitmap(self.partition, 0, w.n_pages * PAGE_SIZE,
                                                      w.dirty, <uint32_t>(w.n_words * 8))
        w.calls = 2
        w.register_calls = 1          # the register batch of the next run
        if hr < 0:
            w.what = "WHvQueryGpaRangeDirtyBitmap slot 0"
            return hr
        _warm_plan(w)
        return 0

    cdef HRESULT _warm_finish(self, WarmRestore *w) noexcept nogil:
        """The copies and staged writes, then WHvSetVirtualProcessorXsaveState (if w.fpu)."""
        cdef HRESULT hr = 0
        _warm_copy(w)
        if w.fpu:
            w.calls += 1
            w.register_calls += 1
            hr = WHvSetVirtualProcessorXsaveState(self.partition, self.index, w.xsave,
                                                  <uint32_t>w.xsave_size)
            if hr < 0:
                w.what = "WHvSetVirtualProcessorXsaveState"
                _warm_failed(w)
        return hr

    cdef HRESULT _warm_hv(self, WarmRestore *w) noexcept nogil:
        cdef HRESULT hr = self._warm_log(w)
        return hr if hr < 0 else self._warm_finish(w)

    def restore_warm(self, WarmPages pages not None, const unsigned char[::1] image not None,
                     const uint64_t[::1] nonzero not None, size_t n_touched, size_t hot_limit,
                     size_t n_hot, size_t cycle, dict state not None, bint fpu):
        """A warm restore to the baseline (slot 0 = pages' memory, see whpfast/core/warm.py) in
        one C sequence, as _kvm's: WHvQueryGpaRangeDirtyBitmap, the host-written pages, the page
        copies from image and WHvSetVirtualProcessorXsaveState (if fpu); the registers join the
        next run's batch. The GIL is released once, for the copies and the XSAVE call, and only
        for a restore of RELEASE_PAGES pages or more (see _restore.pxi). Returns (dirty pages,
        host pages, copied, zeroed, hot pages, n_touched, WHv* calls, register calls); on
        failure the caller restores in full next."""
        cdef WarmRestore w
        cdef HRESULT hr
        cdef PyThreadState *released
        xsave = self._warm_begin(&w, pages, image, nonzero, n_touched, hot_limit, n_hot, cycle,
                                 state, fpu, None)     # (w points into xsave: kept to the end)
        hr = self._warm_log(&w)
        if hr >= 0:
            released = PyEval_SaveThread() if _warm_release(&w) else NULL
            hr = self._warm_finish(&w)
            if released != NULL:
                PyEval_RestoreThread(released)
        self.api_calls += w.calls - 2       # the XSAVE call (the batch counts when it is sent)
        if hr < 0:
            _check_hr(hr, w.what.decode())
        return _warm_result(&w)

    def resume_warm(self, WarmPages pages not None, const unsigned char[::1] image not None,
                    const uint64_t[::1] nonzero not None, size_t n_touched, size_t hot_limit,
                    size_t n_hot, size_t cycle, dict state not None, bint fpu, tuple writes,
                    uint64_t result, uint16_t user_cs, uint16_t user_ds,
                    long long timeout_ns=-1):
        """restore_warm, then the return from the system call the snapshot stopped at with
        `result` (syscall_return, queued in the same register batch), then run(timeout_ns): one
        C call that releases the GIL once, for the restore, the register batch and the run.
        writes: (guest-physical offset, bytes) pairs written into memory after the copies (the
        caller marks them for the next restore). Returns restore_warm's tuple followed by the
        exit kind and the restore's time in ns. On a failed restore the processor is not run,
        and the failure is raised as from restore_warm."""
        cdef WarmRestore w
        cdef const WHV_REGISTER_VALUE *values
        xsave = self._warm_begin(&w, pages, image, nonzero, n_touched, hot_limit, n_hot, cycle,
                                 state, fpu, writes)   # (w points into xsave: kept to the end)
        # the system call's registers are the snapshot's (STATE_NAMES order)
        values = <const WHV_REGISTER_VALUE *><char *>state["registers"]
        self.sys_rcx, self.sys_r11 = values[1].Reg64, values[11].Reg64
        self.sys_cs, self.sys_ss = values[19].Segment.Selector, values[20].Segment.Selector
        _check_sysret(self.sys_rcx)     # (the snapshot's: it may come from a file)
        _sysret(self, result, user_cs, user_ds)
        try:
            kind = self._enter(timeout_ns, &w)
        finally:
            self.api_calls += w.calls - 2
        return _warm_result(&w) + (kind, w.done_ns - w.start_ns)

    def load_state_separately(self, dict state not None):
        """The same state with one WHvSetVirtualProcessorRegisters per register group plus the
        XSAVE call, as VMMs without batching do. Only for the benchmark. Returns the calls."""
        cdef bytes regs = state["registers"]
        cdef bytes xsave = state["xsave"]
        cdef const WHV_REGISTER_VALUE *values = <const WHV_REGISTER_VALUE *><char *>regs
        self._check_alive()
        for first, end in GROUPS:
            _check_hr(WHvSetVirtualProcessorRegisters(self.partition, self.index, &STATE_NAMES[first],
                                                      end - first, &values[first]),
                      "WHvSetVirtualProcessorRegisters")
        _check_hr(WHvSetVirtualProcessorXsaveState(self.partition, self.index, <char *>xsave, len(xsave)),
                  "WHvSetVirtualProcessorXsaveState")
        self.api_calls += len(GROUPS) + 1
        return len(GROUPS) + 1

    def close(self):
        if self.alive:
            if self.vm.alive:
                WHvDeleteVirtualProcessor(self.partition, self.index)
            self.alive = False

    def __dealloc__(self):
        if self.alive and self.vm is not None and self.vm.alive:
            WHvDeleteVirtualProcessor(self.partition, self.index)
        self.alive = False


cdef void _release(uint8_t *ptr, size_t size, bint is_file) noexcept:
    if is_file:
        UnmapViewOfFile(ptr)
    else:
        VirtualFree(ptr, 0, MEM_RELEASE)


include "_mapping.pxi"


cdef class GuestMemory(Mapping):
    """Guest RAM from VirtualAlloc, mapped straight into the partition (no surrogate process).
    Windows commits it all up front (there is no MAP_NORESERVE)."""

    def __init__(self, size_t size):
        cdef void *p
        if size == 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size must be a positive multiple of {PAGE_SIZE}, got {size}")
        p = VirtualAlloc(NULL, size, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
        if p == NULL:
            _raise_win32(f"VirtualAlloc of {size} bytes of guest memory")
        self.ptr = <uint8_t *>p
        self.size = size
        self.readonly = False


cdef class FileMapping(Mapping):
    """A host file (or a part of it at an offset that is a multiple of 64 KiB) mapped read-only:
    CreateFileMapping(PAGE_READONLY) + MapViewOfFile(FILE_MAP_READ). path may be an open file
    descriptor, which stays open."""
    cdef readonly uint64_t file_size

    def __init__(self, path, uint64_t offset=0, length=None, bint copy_on_write=False):
        cdef HANDLE file
        cdef HANDLE mapping
        cdef LARGE_INTEGER st
        cdef wchar_t *wide
        cdef void *view
        cdef uint64_t n
        cdef bint own = not isinstance(path, int)
        if copy_on_write:
            raise NotImplementedError(
                "copy-on-write file mappings are not used on WHP (PAGE_WRITECOPY charges the whole "
                "view to the commit limit); guest memory is VirtualAlloc'd and filled by copying")
        if offset % ALLOCATION_GRANULARITY:
            raise ValueError(f"mapping offset {offset} is not a multiple of {ALLOCATION_GRANULARITY}")
        if own:
            wide = PyUnicode_AsWideCharString(str(path), NULL)
            with nogil:
                file = CreateFileW(wide, GENERIC_READ, FILE_SHARE_READ, NULL, OPEN_EXISTING,
                                   FILE_ATTRIBUTE_NORMAL, NULL)
            PyMem_Free(wide)
            if file == INVALID_HANDLE_VALUE:
                _raise_win32("cannot open a file to map into the guest", path)
        else:
            file = <HANDLE>_get_osfhandle(path)
            if file == INVALID_HANDLE_VALUE:
                raise ValueError(f"file descriptor {path} is not open")
        try:
            if not GetFileSizeEx(file, &st):
                _raise_win32("cannot get the size of a file to map into the guest", path)
            n = _mapped_length(path, st.QuadPart, offset, length)
            mapping = CreateFileMappingW(file, NULL, PAGE_READONLY, 0, 0, NULL)
            if mapping == NULL:
                _raise_win32("CreateFileMapping of a file to map into the guest", path)
            # The view keeps the mapping object alive; its handle is not needed after this.
            view = MapViewOfFile(mapping, FILE_MAP_READ, <DWORD>(offset >> 32), <DWORD>(offset & 0xFFFFFFFF), n)
            CloseHandle(mapping)
            if view == NULL:
                _raise_win32("MapViewOfFile of a file to map into the guest", path)
            self.ptr = <uint8_t *>view
            self.is_file = True
            self.file_size = n
            self.size = (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
            self.readonly = True
        finally:
            if own:
                CloseHandle(file)


# ------------------------------------------------------------------------------------------------
# For the Linux personality (whpfast.linux): the module-level functions _kvm.pyx has for it, with
# WHP's semantics. A program's `syscall` lands in a user-page stub that exits with `out`; the call
# is read with one WHvGetVirtualProcessorRegisters and answered by queueing RAX, RIP and RFLAGS
# into the register batch the next run sends anyway (no extra call). On real WHP `syscall` from
# CPL3 enters CPL0 at LSTAR (hardware virtualization), so the stub runs at CPL0 and the answer
# puts CS/SS back to the user selectors, as `sysret` would; on the WHv* layer over PVM `syscall`
# stays at CPL3 and they are left alone.

# RFLAGS bits a program may carry through a system call (CF PF AF ZF SF TF DF OF, AC, ID); never
# IOPL, IF or VM/RF (as _kvm.pyx).
DEF USER_RFLAGS = 0x0DD5 | 0x40000 | 0x200000
DEF N_SYSCALL = 11

# What syscall_regs() reads: the number, the six arguments, RCX/R11 (return address and RFLAGS
# as `syscall` left them), and CS/SS (which privilege level the stub runs at).
cdef WHV_REGISTER_NAME SYSCALL_NAMES[N_SYSCALL]
for _i, _n in enumerate((WHvX64RegisterRax, WHvX64RegisterRdi, WHvX64RegisterRsi, WHvX64RegisterRdx,
                         WHvX64RegisterR10, WHvX64RegisterR8, WHvX64RegisterR9, WHvX64RegisterRcx,
                         WHvX64RegisterR11, WHvX64RegisterCs, WHvX64RegisterSs)):
    SYSCALL_NAMES[_i] = _n

# WHP has no generic MSR access: each MSR the backend may set is a named register.
_MSR_REGISTERS = {
    0xC0000081: WHvX64RegisterStar, 0xC0000082: WHvX64RegisterLstar,
    0xC0000083: WHvX64RegisterCstar, 0xC0000084: WHvX64RegisterSfmask,
    0xC0000102: WHvX64RegisterKernelGsBase, 0xC0000103: WHvX64RegisterTscAux,
    0x174: WHvX64RegisterSysenterCs, 0x175: WHvX64RegisterSysenterEsp,
    0x176: WHvX64RegisterSysenterEip, 0x277: WHvX64RegisterPat,
}

# The GPRs registers() reports, in STATE_NAMES order (the first 18), then CS and SS.
_GPR_KEYS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rip", "rflags")


cdef inline void _queue_user_segments(Vcpu vcpu, uint16_t user_cs, uint16_t user_ds) noexcept:
    vcpu._queue_segment(WHvX64RegisterCs, user_cs, 0, 0xFFFFFFFF, _attributes(0xB, 1, 3, 1, 1, 0, 1))
    vcpu._queue_segment(WHvX64RegisterSs, user_ds, 0, 0xFFFFFFFF, _attributes(0x3, 1, 3, 1, 0, 1, 1))


def linux_setup(Vcpu vcpu not None, uint64_t xcr0, dict msrs not None):
    """Once per vCPU, after init_long_mode(): XCR0 and the given MSRs (STAR/LSTAR/SFMASK) as
    registers, sent right away with everything queued so far, so a value WHP refuses (an XCR0
    with components this processor lacks) is a HypervisorError here, where the caller tries its
    next choice. (The batch stays queued after a failure and goes out again with that choice.)"""
    vcpu._check_alive()
    for index in msrs:
        if index not in _MSR_REGISTERS:
            raise ValueError(f"linux_setup: MSR {index:#x} is not one the WHP backend sets")
    vcpu._queue64(WHvX64RegisterXCr0, xcr0)
    for index, value in msrs.items():
        vcpu._queue64(_MSR_REGISTERS[index], value)
    vcpu._flush()


def syscall_regs(Vcpu vcpu not None):
    """(rax, rdi, rsi, rdx, r10, r8, r9, rcx, r11, rip) of the last exit: the system call number,
    its six arguments, where `syscall` left the return address and RFLAGS, and the exit
    context's RIP (WHP stops AT the OUT). One WHvGetVirtualProcessorRegisters (the exit context
    carries only some of them)."""
    cdef WHV_REGISTER_VALUE v[N_SYSCALL]
    vcpu._get(SYSCALL_NAMES, N_SYSCALL, v)
    vcpu.sys_rcx, vcpu.sys_r11 = v[7].Reg64, v[8].Reg64
    vcpu.sys_cs, vcpu.sys_ss = v[9].Segment.Selector, v[10].Segment.Selector
    vcpu.sys_valid = True
    return (v[0].Reg64, v[1].Reg64, v[2].Reg64, v[3].Reg64, v[4].Reg64, v[5].Reg64, v[6].Reg64,
            v[7].Reg64, v[8].Reg64, vcpu.exit.VpContext.Rip)


def registers(Vcpu vcpu not None):
    """Every general register, RIP, RFLAGS and the CS/SS selectors as of the last exit (or as
    queued), by name: one WHvGetVirtualProcessorRegisters."""
    cdef WHV_REGISTER_NAME names[N_GPRS + 2]
    cdef WHV_REGISTER_VALUE v[N_GPRS + 2]
    cdef int i
    for i in range(N_GPRS):
        names[i] = STATE_NAMES[i]
    names[N_GPRS], names[N_GPRS + 1] = WHvX64RegisterCs, WHvX64RegisterSs
    vcpu._get(names, N_GPRS + 2, v)
    out = {key: v[i].Reg64 for i, key in enumerate(_GPR_KEYS)}
    out["cs"], out["ss"] = v[N_GPRS].Segment.Selector, v[N_GPRS + 1].Segment.Selector
    return out


def syscall_return(Vcpu vcpu not None, uint64_t result, uint16_t user_cs, uint16_t user_ds):
    """Returns from the system call of the last exit as `sysret` would: RAX = result, RIP = RCX,
    RFLAGS = R11 (user bits only), and CS/SS back to the user selectors where the stub ran at
    CPL0. All queued: they go out with the next run's register batch (replacing the RIP step
    past the stub's `out`)."""
    if not vcpu.sys_valid:
        syscall_regs(vcpu)
    _check_sysret(vcpu.sys_rcx)
    _sysret(vcpu, result, user_cs, user_ds)


cdef void _sysret(Vcpu vcpu, uint64_t result, uint16_t user_cs, uint16_t user_ds) noexcept:
    """syscall_return on the registers in vcpu.sys_* (valid)."""
    vcpu._queue64(WHvX64RegisterRax, result)
    vcpu._queue64(WHvX64RegisterRip, vcpu.sys_rcx)
    vcpu._queue64(WHvX64RegisterRflags, (vcpu.sys_r11 & USER_RFLAGS) | 0x2)
    if vcpu.sys_cs != user_cs or vcpu.sys_ss != user_ds:
        _queue_user_segments(vcpu, user_cs, user_ds)


def enter_user(Vcpu vcpu not None, uint64_t rip, uint64_t rsp, uint16_t user_cs, uint16_t user_ds):
    """Queues a process's first instruction: every GPR zero (RDX = 0: no exit handler from the
    loader), the stack pointer, RFLAGS with only the fixed bit, user CS/SS and FS/GS base 0."""
    cdef uint16_t data = _attributes(0x3, 1, 3, 1, 0, 1, 1)
    vcpu.enter(rip, rsp, 0x2, 0)
    _queue_user_segments(vcpu, user_cs, user_ds)
    vcpu._queue_segment(WHvX64RegisterFs, user_ds, 0, 0xFFFFFFFF, data)
    vcpu._queue_segment(WHvX64RegisterGs, user_ds, 0, 0xFFFFFFFF, data)


def segment_base(Vcpu vcpu not None, str which, value=None):
    """Reads (value None) or queues the FS or GS base (arch_prctl). WHP has no FS_BASE/GS_BASE
    MSR registers: the base is a field of the segment register, read back whole (one call) and
    queued with the new base."""
    cdef WHV_REGISTER_NAME name
    cdef WHV_REGISTER_VALUE v
    if which == "fs":
        name = WHvX64RegisterFs
    elif which == "gs":
        name = WHvX64RegisterGs
    else:
        raise ValueError(f"segment_base: {which!r} is not 'fs' or 'gs'")
    vcpu._get(&name, 1, &v)
    if value is None:
        return v.Segment.Base
    v.Segment.Base = <uint64_t>value
    vcpu._queue(name, &v)
    return v.Segment.Base


cdef extern from *:
    """
    /* Built against the WHv* layer over KVM (tests/whv, -DWHPFAST_WHV_LAYER): that layer cannot
     * see host writes to guest page tables (PVM's shadow paging; see flush_translations in
     * tests/whv/whv_kvm.c) and is told of them here. Nothing at all on Windows. */
    #ifdef WHPFAST_WHV_LAYER
    void whv_kvm_host_wrote(const void *address, unsigned long long size);
    #define whpfast_layer_host_wrote(address, size) whv_kvm_host_wrote((address), (size))
    #else
    #define whpfast_layer_host_wrote(address, size) ((void)(address), (void)(size))
    #endif
    """
    void whpfast_layer_host_wrote(const void *address, unsigned long long size)


cdef int _check_range(Mapping memory, size_t offset, size_t length, str what) except -1:
    if memory.ptr == NULL:
        raise errors.SandboxClosed("the mapping is closed")
    if offset % PAGE_SIZE or length % PAGE_SIZE or offset + length > memory.size or memory.readonly:
        raise ValueError(f"{what} {offset:#x}+{length:#x} is unaligned or outside the memory")
    return 0


def memory_invalidate(Vcpu vcpu not None, Mapping memory not None, size_t offset, size_t length,
                      bint discard, bint anonymous=False, bint remap=True):
    """Makes page-table entries the host rewrote (munmap, mprotect, a restore) take effect. WHP
    virtualizes paging in hardware: there are no shadow translations built from the guest's
    tables to forget (the PVM problem _kvm.pyx solves with the MMU notifier), only the guest's
    own TLB, which the next run flushes by setting CR3 (see Vcpu._flush). discard=True also
    zeroes the pages, in place: guest memory is pinned by WHvMapGpaRange, and decommitting it
    behind the mapping would leave the guest the old pages (so, unlike MADV_DONTNEED on KVM, the
    memory stays committed). anonymous, remap: as on KVM; nothing is ever mapped over guest
    memory here, so they change nothing."""
    _check_range(memory, offset, length, "invalidate")
    if length == 0:
        return
    if discard:
        memset(memory.ptr + offset, 0, length)
    whpfast_layer_host_wrote(memory.ptr + offset, length)
    vcpu.tlb_stale = True


def memory_populate(Mapping memory not None, size_t offset, size_t length):
    """Nothing, on WHP: the guest's first touch of a page is a second-level (EPT/NPT) fault the
    hypervisor resolves itself, not an exit per page through a shadow-paging layer as on PVM,
    where faulting a mapping in at once paid off. (WHvAdviseGpaRange(Populate) could do it;
    without a Windows machine to measure it on, it is not used.) Checks the range like the KVM
    version."""
    _check_range(memory, offset, length, "populate")
