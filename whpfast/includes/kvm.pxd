# Declarations from <linux/kvm.h> that the KVM backend uses, and only those (one .pxd per header).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "<linux/kvm.h>" nogil:
    int KVM_API_VERSION

    # /dev/kvm ioctls
    unsigned long KVM_GET_API_VERSION
    unsigned long KVM_CREATE_VM
    unsigned long KVM_CHECK_EXTENSION
    unsigned long KVM_GET_VCPU_MMAP_SIZE
    unsigned long KVM_GET_SUPPORTED_CPUID
    # VM ioctls
    unsigned long KVM_CREATE_VCPU
    unsigned long KVM_SET_USER_MEMORY_REGION
    unsigned long KVM_GET_DIRTY_LOG
    unsigned long KVM_CLEAR_DIRTY_LOG        # guarded by KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    unsigned long KVM_ENABLE_CAP
    # vCPU ioctls
    unsigned long KVM_RUN
    unsigned long KVM_GET_REGS
    unsigned long KVM_SET_REGS
    unsigned long KVM_GET_SREGS
    unsigned long KVM_SET_SREGS
    unsigned long KVM_SET_CPUID2
    unsigned long KVM_GET_FPU
    unsigned long KVM_SET_FPU
    unsigned long KVM_GET_XSAVE              # guarded by KVM_CAP_XSAVE
    unsigned long KVM_SET_XSAVE
    unsigned long KVM_GET_XSAVE2             # guarded by KVM_CAP_XSAVE2 (areas over 4 KiB)
    unsigned long KVM_GET_XCRS               # guarded by KVM_CAP_XCRS
    unsigned long KVM_SET_XCRS
    unsigned long KVM_GET_DEBUGREGS          # guarded by KVM_CAP_DEBUGREGS
    unsigned long KVM_SET_DEBUGREGS
    unsigned long KVM_GET_VCPU_EVENTS        # guarded by KVM_CAP_VCPU_EVENTS
    unsigned long KVM_SET_VCPU_EVENTS
    unsigned long KVM_GET_MSRS
    unsigned long KVM_SET_MSRS

    int KVM_CAP_SYNC_REGS
    int KVM_CAP_READONLY_MEM
    int KVM_CAP_IMMEDIATE_EXIT
    int KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    int KVM_CAP_XSAVE
    int KVM_CAP_XSAVE2
    int KVM_CAP_XCRS
    int KVM_CAP_DEBUGREGS
    int KVM_CAP_VCPU_EVENTS
    int KVM_CAP_NR_MEMSLOTS

    int KVM_MEM_LOG_DIRTY_PAGES
    int KVM_MEM_READONLY
    int KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    int KVM_DIRTY_LOG_INITIALLY_SET

    int KVM_SYNC_X86_REGS
    int KVM_SYNC_X86_SREGS
    int KVM_SYNC_X86_EVENTS

    int KVM_EXIT_UNKNOWN
    int KVM_EXIT_EXCEPTION
    int KVM_EXIT_IO
    int KVM_EXIT_HLT
    int KVM_EXIT_MMIO
    int KVM_EXIT_SHUTDOWN
    int KVM_EXIT_FAIL_ENTRY
    int KVM_EXIT_INTR
    int KVM_EXIT_INTERNAL_ERROR
    int KVM_EXIT_IO_OUT
    int KVM_EXIT_IO_IN

    struct kvm_regs:
        uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp
        uint64_t r8, r9, r10, r11, r12, r13, r14, r15
        uint64_t rip, rflags

    struct kvm_segment:
        uint64_t base
        uint32_t limit
        uint16_t selector
        uint8_t type, present, dpl, db, s, l, g, avl, unusable

    struct kvm_dtable:
        uint64_t base
        uint16_t limit

    struct kvm_sregs:
        kvm_segment cs, ds, es, fs, gs, ss, tr, ldt
        kvm_dtable gdt, idt
        uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base

    struct kvm_vcpu_events:
        pass

    # Opaque here: whpfast stores and restores them whole (snapshots), never field by field.
    struct kvm_fpu:
        pass
    struct kvm_debugregs:
        pass
    struct kvm_xcrs:
        pass

    struct kvm_msr_entry:
        uint32_t index
        uint32_t reserved
        uint64_t data

    struct kvm_msrs:
        uint32_t nmsrs
        uint32_t pad

    struct kvm_sync_regs:
        kvm_regs regs
        kvm_sregs sregs
        kvm_vcpu_events events

    struct kvm_run_io:
        uint8_t direction
        uint8_t size
        uint16_t port
        uint32_t count
        uint64_t data_offset

    struct kvm_run_mmio:
        uint64_t phys_addr
        uint8_t data[8]
        uint32_t len
        uint8_t is_write

    struct kvm_run_fail_entry:
        uint64_t hardware_entry_failure_reason
        uint32_t cpu

    struct kvm_run_internal:
        uint32_t suberror
        uint32_t ndata
        uint64_t data[16]

    struct kvm_run_hw:
        uint64_t hardware_exit_reason

    struct kvm_run_s:
        kvm_sync_regs regs

    # The members of kvm_run's anonymous union are declared as if they were direct members: the
    # generated C (run.io.port, ...) is the same.
    struct kvm_run:
        uint8_t immediate_exit
        uint32_t exit_reason
        kvm_run_hw hw
        kvm_run_io io
        kvm_run_mmio mmio
        kvm_run_fail_entry fail_entry
        kvm_run_internal internal
        uint64_t kvm_valid_regs
        uint64_t kvm_dirty_regs
        kvm_run_s s

    struct kvm_userspace_memory_region:
        uint32_t slot
        uint32_t flags
        uint64_t guest_phys_addr
        uint64_t memory_size
        uint64_t userspace_addr

    struct kvm_dirty_log:
        uint32_t slot
        void *dirty_bitmap

    struct kvm_clear_dirty_log:
        uint32_t slot
        uint32_t num_pages
        uint64_t first_page
        void *dirty_bitmap

    struct kvm_enable_cap:
        uint32_t cap
        uint32_t flags
        uint64_t args[4]

    struct kvm_cpuid_entry2:
        uint32_t function

    struct kvm_cpuid2:
        uint32_t nent
