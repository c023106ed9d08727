# cython: language_level=3
"""Cross-compile probe for the WHP toolchain: declares a slice of WinHvPlatform the way the real
backend will, and calls each declaration so the C compiler checks it against mingw's header."""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset

cdef extern from "<windows.h>" nogil:
    ctypedef long HRESULT
    ctypedef void *HANDLE
    ctypedef unsigned char UINT8
    ctypedef unsigned short UINT16
    ctypedef unsigned int UINT32
    ctypedef unsigned long long UINT64
    ctypedef int WINBOOL
    void *VirtualAlloc(void *addr, size_t size, UINT32 alloc_type, UINT32 protect)
    int VirtualFree(void *addr, size_t size, UINT32 free_type)
    UINT32 MEM_COMMIT, MEM_RESERVE, MEM_RELEASE, PAGE_READWRITE

cdef extern from "<winhvplatform.h>" nogil:
    ctypedef void *WHV_PARTITION_HANDLE
    ctypedef UINT64 WHV_GUEST_PHYSICAL_ADDRESS

    ctypedef enum WHV_MAP_GPA_RANGE_FLAGS:
        WHvMapGpaRangeFlagNone
        WHvMapGpaRangeFlagRead
        WHvMapGpaRangeFlagWrite
        WHvMapGpaRangeFlagExecute
        WHvMapGpaRangeFlagTrackDirtyPages

    ctypedef enum WHV_PARTITION_PROPERTY_CODE:
        WHvPartitionPropertyCodeExtendedVmExits
        WHvPartitionPropertyCodeProcessorCount

    ctypedef enum WHV_RUN_VP_EXIT_REASON:
        WHvRunVpExitReasonNone
        WHvRunVpExitReasonMemoryAccess
        WHvRunVpExitReasonX64IoPortAccess
        WHvRunVpExitReasonX64Halt
        WHvRunVpExitReasonUnrecoverableException
        WHvRunVpExitReasonCanceled

    ctypedef enum WHV_REGISTER_NAME:
        WHvX64RegisterRax
        WHvX64RegisterRip
        WHvX64RegisterRflags
        WHvX64RegisterCs
        WHvX64RegisterCr0
        WHvX64RegisterEfer

    ctypedef struct WHV_X64_SEGMENT_REGISTER:
        UINT64 Base
        UINT32 Limit
        UINT16 Selector
        UINT16 Attributes

    ctypedef union WHV_REGISTER_VALUE:
        UINT64 Reg64
        UINT32 Reg32
        WHV_X64_SEGMENT_REGISTER Segment

    ctypedef struct WHV_VP_EXIT_CONTEXT:
        UINT8 InstructionLength      # a 4-bit bitfield in C: readable, not addressable
        UINT64 Rip
        UINT64 Rflags

    ctypedef struct WHV_X64_IO_PORT_ACCESS_INFO:
        UINT32 IsWrite
        UINT32 AccessSize
        UINT32 AsUINT32

    ctypedef struct WHV_X64_IO_PORT_ACCESS_CONTEXT:
        UINT8 InstructionByteCount
        WHV_X64_IO_PORT_ACCESS_INFO AccessInfo
        UINT16 PortNumber
        UINT64 Rax

    ctypedef struct WHV_MEMORY_ACCESS_CONTEXT:
        WHV_GUEST_PHYSICAL_ADDRESS Gpa
        UINT64 Gva

    # The C struct holds these in an anonymous union; Cython just sees members.
    ctypedef struct WHV_RUN_VP_EXIT_CONTEXT:
        WHV_RUN_VP_EXIT_REASON ExitReason
        WHV_VP_EXIT_CONTEXT VpContext
        WHV_X64_IO_PORT_ACCESS_CONTEXT IoPortAccess
        WHV_MEMORY_ACCESS_CONTEXT MemoryAccess

    ctypedef union WHV_PARTITION_PROPERTY:
        UINT32 ProcessorCount

    HRESULT WHvCreatePartition(WHV_PARTITION_HANDLE *Partition)
    HRESULT WHvSetupPartition(WHV_PARTITION_HANDLE Partition)
    HRESULT WHvDeletePartition(WHV_PARTITION_HANDLE Partition)
    HRESULT WHvSetPartitionProperty(WHV_PARTITION_HANDLE Partition, WHV_PARTITION_PROPERTY_CODE PropertyCode,
                                    const void *PropertyBuffer, UINT32 PropertyBufferSizeInBytes)
    HRESULT WHvCreateVirtualProcessor(WHV_PARTITION_HANDLE Partition, UINT32 VpIndex, UINT32 Flags)
    HRESULT WHvMapGpaRange(WHV_PARTITION_HANDLE Partition, void *SourceAddress,
                           WHV_GUEST_PHYSICAL_ADDRESS GuestAddress, UINT64 SizeInBytes,
                           WHV_MAP_GPA_RANGE_FLAGS Flags)
    HRESULT WHvRunVirtualProcessor(WHV_PARTITION_HANDLE Partition, UINT32 VpIndex, void *ExitContext,
                                   UINT32 ExitContextSizeInBytes)
    HRESULT WHvCancelRunVirtualProcessor(WHV_PARTITION_HANDLE Partition, UINT32 VpIndex, UINT32 Flags)
    HRESULT WHvGetVirtualProcessorRegisters(WHV_PARTITION_HANDLE Partition, UINT32 VpIndex,
                                            const WHV_REGISTER_NAME *RegisterNames, UINT32 RegisterCount,
                                            WHV_REGISTER_VALUE *RegisterValues)
    HRESULT WHvSetVirtualProcessorRegisters(WHV_PARTITION_HANDLE Partition, UINT32 VpIndex,
                                            const WHV_REGISTER_NAME *RegisterNames, UINT32 RegisterCount,
                                            const WHV_REGISTER_VALUE *RegisterValues)
    HRESULT WHvQueryGpaRangeDirtyBitmap(WHV_PARTITION_HANDLE Partition, WHV_GUEST_PHYSICAL_ADDRESS GuestAddress,
                                        UINT64 RangeSizeInBytes, UINT64 *Bitmap, UINT32 BitmapSizeInBytes)
    HRESULT WHvGetVirtualProcessorXsaveState(WHV_PARTITION_HANDLE Partition, UINT32 VpIndex, void *Buffer,
                                             UINT32 BufferSizeInBytes, UINT32 *BytesWritten)
    HRESULT WHvSetVirtualProcessorXsaveState(WHV_PARTITION_HANDLE Partition, UINT32 VpIndex, const void *Buffer,
                                             UINT32 BufferSizeInBytes)


cdef class Probe:
    """One partition, one vCPU, one page of guest memory; every method returns the raw HRESULT."""
    cdef WHV_PARTITION_HANDLE part
    cdef void *mem
    cdef WHV_RUN_VP_EXIT_CONTEXT exit_ctx
    cdef UINT64 bitmap[4]

    def __cinit__(self):
        self.part = NULL
        self.mem = NULL

    def create(self, UINT32 cpus=1):
        cdef HRESULT hr
        cdef WHV_PARTITION_PROPERTY prop
        memset(&prop, 0, sizeof(prop))
        prop.ProcessorCount = cpus
        hr = WHvCreatePartition(&self.part)
        if hr < 0:
            return hr
        hr = WHvSetPartitionProperty(self.part, WHvPartitionPropertyCodeProcessorCount, &prop, sizeof(prop))
        if hr < 0:
            return hr
        hr = WHvSetupPartition(self.part)
        if hr < 0:
            return hr
        return WHvCreateVirtualProcessor(self.part, 0, 0)

    def map(self, UINT64 gpa, UINT64 size):
        self.mem = VirtualAlloc(NULL, size, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
        return WHvMapGpaRange(self.part, self.mem, gpa, size,
                              <WHV_MAP_GPA_RANGE_FLAGS>(WHvMapGpaRangeFlagRead | WHvMapGpaRangeFlagWrite |
                                                        WHvMapGpaRangeFlagExecute |
                                                        WHvMapGpaRangeFlagTrackDirtyPages))

    def set_rip(self, UINT64 rip):
        cdef WHV_REGISTER_NAME names[2]
        cdef WHV_REGISTER_VALUE values[2]
        names[0] = WHvX64RegisterRip
        names[1] = WHvX64RegisterRflags
        values[0].Reg64 = rip
        values[1].Reg64 = 2
        return WHvSetVirtualProcessorRegisters(self.part, 0, names, 2, values)

    def rip(self):
        cdef WHV_REGISTER_NAME name = WHvX64RegisterRip
        cdef WHV_REGISTER_VALUE value
        cdef HRESULT hr = WHvGetVirtualProcessorRegisters(self.part, 0, &name, 1, &value)
        return hr, value.Reg64

    def run(self):
        """Run once; on an `out` return (reason, port, value, rip after stepping past it)."""
        cdef HRESULT hr
        with nogil:
            hr = WHvRunVirtualProcessor(self.part, 0, &self.exit_ctx, sizeof(WHV_RUN_VP_EXIT_CONTEXT))
        if hr < 0:
            return hr, None
        if self.exit_ctx.ExitReason == WHvRunVpExitReasonX64IoPortAccess:
            return hr, (self.exit_ctx.IoPortAccess.PortNumber, self.exit_ctx.IoPortAccess.Rax,
                        self.exit_ctx.IoPortAccess.AccessInfo.IsWrite,
                        self.exit_ctx.VpContext.Rip + self.exit_ctx.VpContext.InstructionLength)
        if self.exit_ctx.ExitReason == WHvRunVpExitReasonMemoryAccess:
            return hr, (self.exit_ctx.MemoryAccess.Gpa, self.exit_ctx.MemoryAccess.Gva)
        return hr, int(self.exit_ctx.ExitReason)

    def cancel(self):
        return WHvCancelRunVirtualProcessor(self.part, 0, 0)

    def dirty(self, UINT64 gpa, UINT64 size):
        return WHvQueryGpaRangeDirtyBitmap(self.part, gpa, size, self.bitmap, sizeof(self.bitmap))

    def xsave_roundtrip(self):
        cdef unsigned char buf[4096]
        cdef UINT32 written = 0
        cdef HRESULT hr = WHvGetVirtualProcessorXsaveState(self.part, 0, buf, sizeof(buf), &written)
        if hr < 0:
            return hr
        return WHvSetVirtualProcessorXsaveState(self.part, 0, buf, written)

    def close(self):
        if self.part != NULL:
            WHvDeletePartition(self.part)
            self.part = NULL
        if self.mem != NULL:
            VirtualFree(self.mem, 0, MEM_RELEASE)
            self.mem = NULL

    def __dealloc__(self):
        self.close()
