# What both backends share about exits (textually included by _kvm.pyx and _whp.pyx): the exit
# kinds Vcpu.run() returns, and the decoded details of the last exit, which Vcpu inherits.

EXIT_IO = 1
EXIT_MMIO = 2
EXIT_SHUTDOWN = 3
EXIT_INTERNAL_ERROR = 4
EXIT_FAIL_ENTRY = 5
EXIT_TIMEOUT = 6
EXIT_CANCELLED = 7
EXIT_HLT = 8
EXIT_UNKNOWN = 9


cdef class ExitDetails:
    cdef readonly uint32_t exit_reason        # the hypervisor's own code
    cdef readonly uint16_t io_port
    cdef readonly uint8_t io_direction        # 1: out
    cdef readonly uint8_t io_size             # bytes
    cdef readonly uint32_t io_value
    cdef readonly bint io_string              # INS/OUTS or a REP prefix: the ABI never uses them
    cdef readonly uint64_t mmio_address
    cdef readonly bint mmio_is_write
    cdef readonly uint32_t internal_suberror
    cdef readonly tuple internal_data
    cdef readonly uint64_t fail_entry_reason

    def __cinit__(self):
        self.internal_data = ()


cdef int _check_sysret(uint64_t rcx) except -1:
    """The guest chose RCX (any code may jump to the stub with any registers): a return address
    that is not a canonical user address (bits 63..47 set) would be a RIP the hypervisor refuses
    or, at CPL0 on hardware, a kernel address. Linux's sysret path sends such a return through
    IRET, which faults: SIGSEGV; here a GuestFault, and the value never reaches the vCPU (both
    backends check it before queueing the return)."""
    if rcx >> 47:
        raise errors.GuestFault(
            f"the program made a system call whose return address rcx={rcx:#x} is not a canonical "
            f"user address (sysret cannot return there; Linux sends SIGSEGV)",
            kind="SIGSEGV", vector=13, error_code=0, rip=rcx, address=0)
    return 0
