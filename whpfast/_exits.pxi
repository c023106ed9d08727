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
