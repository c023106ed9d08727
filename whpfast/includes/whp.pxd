# Declarations from <windows.h> and <winhvplatform.h> that the WHP backend uses, and only those.
# Cython emits no prototypes for these: the C compiler checks every call against the real headers
# (mingw's when cross-building, -Werror on the conversions that would hide a wrong signature).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, intptr_t
from libc.stddef cimport wchar_t

cdef extern from "windows.h" nogil:
    ctypedef long HRESULT
    ctypedef void *HANDLE
    ctypedef uint32_t DWORD
    ctypedef int BOOL
    ctypedef unsigned char BOOLEAN
    ctypedef struct LARGE_INTEGER:
        long long QuadPart

    HANDLE INVALID_HANDLE_VALUE
    DWORD MEM_COMMIT, MEM_RESERVE, MEM_RELEASE
    DWORD PAGE_READWRITE, PAGE_READONLY
    DWORD GENERIC_READ, FILE_SHARE_READ, OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, FILE_MAP_READ
    DWORD WT_EXECUTEONLYONCE

    void *VirtualAlloc(void *address, size_t size, DWORD allocation_type, DWORD protect)
    BOOL VirtualFree(void *address, size_t size, DWORD free_type)
    HANDLE CreateFileW(const wchar_t *name, DWORD access, DWORD share, void *security,
                       DWORD disposition, DWORD flags, HANDLE template_file)
    BOOL GetFileSizeEx(HANDLE file, LARGE_INTEGER *size)
    HANDLE CreateFileMappingW(HANDLE file, void *security, DWORD protect, DWORD size_high,
                              DWORD size_low, const wchar_t *name)
    void *MapViewOfFile(HANDLE mapping, DWORD access, DWORD offset_high, DWORD offset_low, size_t size)
    BOOL UnmapViewOfFile(const void *address)
    BOOL CloseHandle(HANDLE handle)
    DWORD GetLastError()
    ctypedef void (*WAITORTIMERCALLBACK)(void *parameter, BOOLEAN timer_fired)
    BOOL CreateTimerQueueTimer(HANDLE *timer, HANDLE queue, WAITORTIMERCALLBACK callback,
                               void *parameter, DWORD due_ms, DWORD period_ms, unsigned long flags)
    BOOL DeleteTimerQueueTimer(HANDLE queue, HANDLE timer, HANDLE completion_event)
    BOOL QueryPerformanceCounter(LARGE_INTEGER *count)
    BOOL QueryPerformanceFrequency(LARGE_INTEGER *frequency)

cdef extern from "io.h" nogil:
    intptr_t _get_osfhandle(int fd)

cdef extern from "winhvplatform.h" nogil:
    ctypedef void *WHV_PARTITION_HANDLE
    ctypedef uint64_t WHV_GUEST_PHYSICAL_ADDRESS

    ctypedef enum WHV_CAPABILITY_CODE:
        WHvCapabilityCodeHypervisorPresent
    ctypedef union WHV_CAPABILITY:
        BOOL HypervisorPresent

    ctypedef enum WHV_PARTITION_PROPERTY_CODE:
        WHvPartitionPropertyCodeProcessorCount
    ctypedef union WHV_PARTITION_PROPERTY:
        uint32_t ProcessorCount

    ctypedef enum WHV_MAP_GPA_RANGE_FLAGS:
        WHvMapGpaRangeFlagNone
        WHvMapGpaRangeFlagRead
        WHvMapGpaRangeFlagWrite
        WHvMapGpaRangeFlagExecute
        WHvMapGpaRangeFlagTrackDirtyPages

    ctypedef enum WHV_REGISTER_NAME:
        WHvX64RegisterRax
        WHvX64RegisterRcx
        WHvX64RegisterRdx
        WHvX64RegisterRbx
        WHvX64RegisterRsp
        WHvX64RegisterRbp
        WHvX64RegisterRsi
        WHvX64RegisterRdi
        WHvX64RegisterR8
        WHvX64RegisterR9
        WHvX64RegisterR10
        WHvX64RegisterR11
        WHvX64RegisterR12
        WHvX64RegisterR13
        WHvX64RegisterR14
        WHvX64RegisterR15
        WHvX64RegisterRip
        WHvX64RegisterRflags
        WHvX64RegisterEs
        WHvX64RegisterCs
        WHvX64RegisterSs
        WHvX64RegisterDs
        WHvX64RegisterFs
        WHvX64RegisterGs
        WHvX64RegisterLdtr
        WHvX64RegisterTr
        WHvX64RegisterIdtr
        WHvX64RegisterGdtr
        WHvX64RegisterCr0
        WHvX64RegisterCr2
        WHvX64RegisterCr3
        WHvX64RegisterCr4
        WHvX64RegisterCr8
        WHvX64RegisterDr0
        WHvX64RegisterDr1
        WHvX64RegisterDr2
        WHvX64RegisterDr3
        WHvX64RegisterDr6
        WHvX64RegisterDr7
        WHvX64RegisterXCr0
        WHvX64RegisterEfer
        WHvX64RegisterKernelGsBase
        WHvX64RegisterApicBase
        WHvX64RegisterPat
        WHvX64RegisterSysenterCs
        WHvX64RegisterSysenterEip
        WHvX64RegisterSysenterEsp
        WHvX64RegisterStar
        WHvX64RegisterLstar
        WHvX64RegisterCstar
        WHvX64RegisterSfmask
        WHvX64RegisterTscAux
        WHvRegisterPendingInterruption
        WHvRegisterInterruptState
        WHvRegisterPendingEvent

    ctypedef struct WHV_X64_SEGMENT_REGISTER:
        uint64_t Base
        uint32_t Limit
        uint16_t Selector
        uint16_t Attributes

    ctypedef struct WHV_X64_TABLE_REGISTER:
        uint16_t Limit
        uint64_t Base

    ctypedef union WHV_REGISTER_VALUE:
        uint64_t Reg64
        WHV_X64_SEGMENT_REGISTER Segment
        WHV_X64_TABLE_REGISTER Table

    ctypedef enum WHV_RUN_VP_EXIT_REASON:
        WHvRunVpExitReasonNone
        WHvRunVpExitReasonMemoryAccess
        WHvRunVpExitReasonX64IoPortAccess
        WHvRunVpExitReasonUnrecoverableException
        WHvRunVpExitReasonInvalidVpRegisterValue
        WHvRunVpExitReasonUnsupportedFeature
        WHvRunVpExitReasonX64Halt
        WHvRunVpExitReasonCanceled

    ctypedef union WHV_X64_IO_PORT_ACCESS_INFO:
        uint32_t AsUINT32          # bit 0 IsWrite, bits 1-3 AccessSize
    ctypedef struct WHV_X64_IO_PORT_ACCESS_CONTEXT:
        WHV_X64_IO_PORT_ACCESS_INFO AccessInfo
        uint16_t PortNumber
        uint64_t Rax

    ctypedef union WHV_MEMORY_ACCESS_INFO:
        uint32_t AsUINT32          # bits 0-1 AccessType (1: write), bit 2 GpaUnmapped
    ctypedef struct WHV_MEMORY_ACCESS_CONTEXT:
        WHV_MEMORY_ACCESS_INFO AccessInfo
        WHV_GUEST_PHYSICAL_ADDRESS Gpa

    ctypedef union WHV_X64_UNSUPPORTED_FEATURE_CONTEXT:
        pass

    ctypedef struct WHV_VP_EXIT_CONTEXT:
        uint8_t InstructionLength  # a 4-bit field: readable, not addressable
        uint64_t Rip
        uint64_t Rflags

    # The per-reason contexts are an unnamed union in C; declared as plain members here, the
    # generated C (exit.IoPortAccess.PortNumber) is the same.
    ctypedef struct WHV_RUN_VP_EXIT_CONTEXT:
        WHV_RUN_VP_EXIT_REASON ExitReason
        WHV_VP_EXIT_CONTEXT VpContext
        WHV_MEMORY_ACCESS_CONTEXT MemoryAccess
        WHV_X64_IO_PORT_ACCESS_CONTEXT IoPortAccess

    HRESULT WHvGetCapability(WHV_CAPABILITY_CODE code, void *buffer, uint32_t size, uint32_t *written)
    HRESULT WHvCreatePartition(WHV_PARTITION_HANDLE *partition)
    HRESULT WHvSetupPartition(WHV_PARTITION_HANDLE partition)
    HRESULT WHvDeletePartition(WHV_PARTITION_HANDLE partition)
    HRESULT WHvSetPartitionProperty(WHV_PARTITION_HANDLE partition, WHV_PARTITION_PROPERTY_CODE code,
                                    const void *buffer, uint32_t size)
    HRESULT WHvMapGpaRange(WHV_PARTITION_HANDLE partition, void *source, WHV_GUEST_PHYSICAL_ADDRESS gpa,
                           uint64_t size, WHV_MAP_GPA_RANGE_FLAGS flags)
    HRESULT WHvUnmapGpaRange(WHV_PARTITION_HANDLE partition, WHV_GUEST_PHYSICAL_ADDRESS gpa, uint64_t size)
    HRESULT WHvQueryGpaRangeDirtyBitmap(WHV_PARTITION_HANDLE partition, WHV_GUEST_PHYSICAL_ADDRESS gpa,
                                        uint64_t size, uint64_t *bitmap, uint32_t bitmap_size)
    HRESULT WHvCreateVirtualProcessor(WHV_PARTITION_HANDLE partition, uint32_t index, uint32_t flags)
    HRESULT WHvDeleteVirtualProcessor(WHV_PARTITION_HANDLE partition, uint32_t index)
    HRESULT WHvRunVirtualProcessor(WHV_PARTITION_HANDLE partition, uint32_t index, void *exit_context,
                                   uint32_t size)
    HRESULT WHvCancelRunVirtualProcessor(WHV_PARTITION_HANDLE partition, uint32_t index, uint32_t flags)
    HRESULT WHvGetVirtualProcessorRegisters(WHV_PARTITION_HANDLE partition, uint32_t index,
                                            const WHV_REGISTER_NAME *names, uint32_t count,
                                            WHV_REGISTER_VALUE *values)
    HRESULT WHvSetVirtualProcessorRegisters(WHV_PARTITION_HANDLE partition, uint32_t index,
                                            const WHV_REGISTER_NAME *names, uint32_t count,
                                            const WHV_REGISTER_VALUE *values)
    HRESULT WHvGetVirtualProcessorXsaveState(WHV_PARTITION_HANDLE partition, uint32_t index,
                                             void *buffer, uint32_t size, uint32_t *written)
    HRESULT WHvSetVirtualProcessorXsaveState(WHV_PARTITION_HANDLE partition, uint32_t index,
                                             const void *buffer, uint32_t size)
