/* Tests for libwhv_kvm.so, written against the Windows API only (compat <windows.h> + mingw's
 * <winhvplatform.h>): a tiny 64-bit guest at CPL0 with 2 MiB identity pages, and checks of the
 * WHP behaviours the shim models (see README.md). Prints "N passed, M failed"; exit status 1 on
 * any failure. Built and run by build.sh --test. */
#include <windows.h>
#include <winhvplatform.h>
#include <io.h>

#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* WHP's HRESULTs are not in the headers; real code defines them too. */
#define WHV_E_INSUFFICIENT_BUFFER ((HRESULT)0x80370301L)
#define WHV_E_GPA_RANGE_NOT_FOUND ((HRESULT)0x80370305L)
#define WHV_E_VP_ALREADY_EXISTS ((HRESULT)0x80370306L)
#define WHV_E_INVALID_VP_REGISTER_NAME ((HRESULT)0x80370309L)

/* Shim extension (not a Windows API): KVM ioctls made by this thread so far. */
unsigned long long whv_kvm_thread_ioctl_count(void);

static int passed, failed;
#define CHECK(cond, ...)                                                           \
    do {                                                                           \
        if (cond) passed++;                                                        \
        else {                                                                     \
            failed++;                                                              \
            printf("FAIL line %d: %s: ", __LINE__, #cond);                        \
            printf(__VA_ARGS__);                                                   \
            printf("\n");                                                          \
        }                                                                          \
    } while (0)

#define RAM_SIZE 0x200000u        /* guest RAM: GPA 0 .. 2 MiB, one VirtualAlloc region */
#define RO_GPA 0x200000u          /* a read-only file view */
#define UNMAPPED_GPA 0x400000u    /* inside the page tables' identity map, but no memory */
#define RAM_FLAGS (WHvMapGpaRangeFlagRead | WHvMapGpaRangeFlagWrite | WHvMapGpaRangeFlagExecute | \
                   WHvMapGpaRangeFlagTrackDirtyPages)

static WHV_PARTITION_HANDLE part;
static uint8_t *ram;

/* ---- guest code (addresses are GPAs = GVAs) ---- */
#define A_START 0x10000u          /* port I/O sequence */
static const uint8_t code_a[] = {
    0xB8, 0x11, 0x00, 0x00, 0x00,                         /* 10000 mov eax, 0x11 */
    0xE6, 0x10,                                           /* 10005 out 0x10, al */
    0xB8, 0x22, 0x00, 0x00, 0x00,                         /* 10007 mov eax, 0x22 */
    0x66, 0xBA, 0x34, 0x12,                               /* 1000c mov dx, 0x1234 */
    0xEF,                                                 /* 10010 out dx, eax */
    0x66, 0xB8, 0xEF, 0xBE,                               /* 10011 mov ax, 0xbeef */
    0x66, 0xEF,                                           /* 10015 out dx, ax */
    0x48, 0xB8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, /* 10017 mov rax, 0x1122334455667788 */
    0xED,                                                 /* 10021 in eax, dx */
    0xE7, 0x21,                                           /* 10022 out 0x21, eax */
    0xF4,                                                 /* 10024 hlt */
};
#define B_START 0x10100u          /* dirty pages */
static const uint8_t code_b[] = {
    0xC6, 0x04, 0x25, 0x00, 0x00, 0x02, 0x00, 0x01,       /* mov byte [0x20000], 1 */
    0xC6, 0x04, 0x25, 0x00, 0x20, 0x02, 0x00, 0x02,       /* mov byte [0x22000], 2 */
    0xC6, 0x04, 0x25, 0x00, 0x50, 0x02, 0x00, 0x03,       /* mov byte [0x25000], 3 */
    0xE6, 0x30,                                           /* 10118 out 0x30, al */
    0xF4,
};
#define C_START 0x10200u          /* reads and writes the "input" page 0x30000 */
static const uint8_t code_c[] = {
    0x8B, 0x04, 0x25, 0x00, 0x00, 0x03, 0x00,             /* 10200 mov eax, [0x30000] */
    0xE7, 0x40,                                           /* 10207 out 0x40, eax */
    0xC7, 0x04, 0x25, 0x00, 0x00, 0x03, 0x00, 0xCC, 0xCC, 0x00, 0x00, /* 10209 mov dword [0x30000], 0xcccc */
    0xE6, 0x41,                                           /* 10214 out 0x41, al */
    0xF4,
};
#define D_START 0x10300u          /* jmp $ */
static const uint8_t code_d[] = { 0xEB, 0xFE };
#define E_START 0x10310u          /* read-only and unmapped memory */
static const uint8_t code_e[] = {
    0x8B, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00,             /* 10310 mov eax, [0x200000] */
    0xE7, 0x50,                                           /* 10317 out 0x50, eax */
    0xC7, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0x01, 0x00, 0x00, 0x00, /* 10319 mov dword [0x200000], 1 */
    0x8B, 0x04, 0x25, 0x00, 0x00, 0x40, 0x00,             /* 10324 mov eax, [0x400000] */
    0xF4,                                                 /* 1032b */
};
#define F_START 0x10340u          /* ud2 with no IDT: triple fault */
static const uint8_t code_f[] = { 0x0F, 0x0B };
#define G_START 0x10350u          /* two identical outs: the bytes at "RIP past the first" match too */
static const uint8_t code_g[] = {
    0x66, 0xBA, 0xEE, 0x00,                               /* 10350 mov dx, 0xee */
    0xEE,                                                 /* 10354 out dx, al */
    0xEE,                                                 /* 10355 out dx, al */
    0xE6, 0xEE,                                           /* 10356 out 0xee, al */
    0xF4,
};

static HRESULT set_regs(const WHV_REGISTER_NAME *n, const WHV_REGISTER_VALUE *v, UINT32 count) {
    return WHvSetVirtualProcessorRegisters(part, 0, n, count, v);
}
static UINT64 get_reg(WHV_REGISTER_NAME n) {
    WHV_REGISTER_VALUE v;
    memset(&v, 0xAB, sizeof v);
    HRESULT hr = WHvGetVirtualProcessorRegisters(part, 0, &n, 1, &v);
    CHECK(SUCCEEDED(hr), "get register %#x: hr %#x", (unsigned)n, (unsigned)hr);
    return v.Reg64;
}
static void set_reg(WHV_REGISTER_NAME n, UINT64 value) {
    WHV_REGISTER_VALUE v;
    memset(&v, 0, sizeof v);
    v.Reg64 = value;
    HRESULT hr = set_regs(&n, &v, 1);
    CHECK(SUCCEEDED(hr), "set register %#x: hr %#x", (unsigned)n, (unsigned)hr);
}
static HRESULT run(WHV_RUN_VP_EXIT_CONTEXT *ctx) {
    return WHvRunVirtualProcessor(part, 0, ctx, sizeof *ctx);
}
/* Runs to the next exit and checks it is an OUT/IN at `rip` of `len` bytes. */
static void expect_io(WHV_RUN_VP_EXIT_CONTEXT *c, UINT16 port, int is_write, int size, UINT64 rip, int len) {
    HRESULT hr = run(c);
    CHECK(hr == S_OK, "run: hr %#x", (unsigned)hr);
    CHECK(c->ExitReason == WHvRunVpExitReasonX64IoPortAccess, "exit reason %#x (want I/O, port %#x)",
          (unsigned)c->ExitReason, port);
    if (c->ExitReason != WHvRunVpExitReasonX64IoPortAccess) return;
    CHECK(c->IoPortAccess.PortNumber == port, "port %#x want %#x", c->IoPortAccess.PortNumber, port);
    CHECK(c->IoPortAccess.AccessInfo.IsWrite == (UINT32)is_write, "IsWrite %u", c->IoPortAccess.AccessInfo.IsWrite);
    CHECK(c->IoPortAccess.AccessInfo.AccessSize == (UINT32)size, "AccessSize %u want %d",
          c->IoPortAccess.AccessInfo.AccessSize, size);
    CHECK(c->VpContext.Rip == rip, "VpContext.Rip %#llx want %#llx (AT the instruction)",
          (unsigned long long)c->VpContext.Rip, (unsigned long long)rip);
    CHECK(c->VpContext.InstructionLength == len, "InstructionLength %u want %d", c->VpContext.InstructionLength, len);
    CHECK(get_reg(WHvX64RegisterRip) == rip, "the VP's RIP is not left at the instruction");
}
static void step(const WHV_RUN_VP_EXIT_CONTEXT *c) {   /* what a WHP backend must do after I/O */
    set_reg(WHvX64RegisterRip, c->VpContext.Rip + c->VpContext.InstructionLength);
}
static UINT64 seg_attr(int type, int s, int dpl, int l, int db) {
    return (UINT64)(type | s << 4 | dpl << 5 | 1 << 7 | l << 13 | db << 14 | 1 << 15);
}

static void build_guest(void) {
    uint64_t *pml4 = (uint64_t *)(ram + 0x1000), *pdpt = (uint64_t *)(ram + 0x2000), *pd = (uint64_t *)(ram + 0x3000);
    pml4[0] = 0x2000 | 7;
    pdpt[0] = 0x3000 | 7;
    for (int i = 0; i < 4; i++) pd[i] = ((uint64_t)i << 21) | 0x87;   /* 2 MiB pages, P|RW|US|PS */
    uint64_t *gdt = (uint64_t *)(ram + 0x4000);
    gdt[1] = 0x00AF9B000000FFFFull;   /* 0x08 code64, DPL0 */
    gdt[2] = 0x00CF93000000FFFFull;   /* 0x10 data, DPL0 */
    gdt[3] = 0x00CFF3000000FFFFull;   /* 0x18 data, DPL3 */
    gdt[4] = 0x00AFFB000000FFFFull;   /* 0x20 code64, DPL3 */
    gdt[5] = 0x00008B005000206Aull;   /* 0x28 TSS at 0x5000, limit 0x206a (busy); gdt[6] = 0 */
    /* TSS with an I/O permission bitmap that allows every port to CPL3 (whpfast's setup; IOPL is
     * not honoured under PVM). Bitmap right after the 0x68-byte TSS, ports 0..0xffff, then 0xff. */
    uint16_t iomap = 0x68;
    memcpy(ram + 0x5000 + 0x66, &iomap, 2);
    ram[0x5000 + 0x68 + 0x2000] = 0xFF;
    memcpy(ram + A_START, code_a, sizeof code_a);
    memcpy(ram + B_START, code_b, sizeof code_b);
    memcpy(ram + C_START, code_c, sizeof code_c);
    memcpy(ram + D_START, code_d, sizeof code_d);
    memcpy(ram + E_START, code_e, sizeof code_e);
    memcpy(ram + F_START, code_f, sizeof code_f);
    memcpy(ram + G_START, code_g, sizeof code_g);
}

/* The whole long-mode register file in ONE WHvSetVirtualProcessorRegisters call. */
static void init_vcpu(UINT64 rip, int cpl) {
    WHV_REGISTER_NAME n[40];
    WHV_REGISTER_VALUE v[40];
    UINT32 k = 0;
    memset(v, 0, sizeof v);
    for (int r = WHvX64RegisterRax; r <= WHvX64RegisterR15; r++) {
        n[k] = (WHV_REGISTER_NAME)r;
        v[k++].Reg64 = r == WHvX64RegisterRsp ? 0x80000 : 0;
    }
    n[k] = WHvX64RegisterRip; v[k++].Reg64 = rip;
    n[k] = WHvX64RegisterRflags; v[k++].Reg64 = 0x2;
    WHV_X64_SEGMENT_REGISTER cs = { .Base = 0, .Limit = 0xFFFFFFFF, .Selector = (UINT16)(cpl ? 0x23 : 0x08) };
    cs.Attributes = (UINT16)seg_attr(0xB, 1, cpl, 1, 0);
    WHV_X64_SEGMENT_REGISTER ds = { .Base = 0, .Limit = 0xFFFFFFFF, .Selector = (UINT16)(cpl ? 0x1B : 0x10) };
    ds.Attributes = (UINT16)seg_attr(0x3, 1, cpl, 0, 1);
    WHV_X64_SEGMENT_REGISTER tr = { .Base = 0x5000, .Limit = 0x206A, .Selector = 0x28 };
    tr.Attributes = (UINT16)(0xB | 1 << 7);
    WHV_X64_SEGMENT_REGISTER ldtr = { 0 };
    n[k] = WHvX64RegisterCs; v[k++].Segment = cs;
    WHV_REGISTER_NAME data_segs[] = { WHvX64RegisterDs, WHvX64RegisterEs, WHvX64RegisterSs, WHvX64RegisterFs,
                                      WHvX64RegisterGs };
    for (int i = 0; i < 5; i++) { n[k] = data_segs[i]; v[k++].Segment = ds; }
    n[k] = WHvX64RegisterTr; v[k++].Segment = tr;
    n[k] = WHvX64RegisterLdtr; v[k++].Segment = ldtr;
    n[k] = WHvX64RegisterGdtr; v[k].Table.Base = 0x4000; v[k++].Table.Limit = 0x37;
    n[k] = WHvX64RegisterIdtr; v[k].Table.Base = 0; v[k++].Table.Limit = 0;   /* no IDT: faults triple-fault */
    n[k] = WHvX64RegisterCr0; v[k++].Reg64 = 0x80050033;
    n[k] = WHvX64RegisterCr3; v[k++].Reg64 = 0x1000;
    n[k] = WHvX64RegisterCr4; v[k++].Reg64 = 0x620;
    n[k] = WHvX64RegisterEfer; v[k++].Reg64 = 0xD01;
    n[k] = WHvX64RegisterCr8; v[k++].Reg64 = 0;
    unsigned long long before = whv_kvm_thread_ioctl_count();
    HRESULT hr = set_regs(n, v, k);
    CHECK(hr == S_OK, "one-call register setup (%u registers): hr %#x", k, (unsigned)hr);
    printf("  one WHvSetVirtualProcessorRegisters call, %u registers: %llu KVM ioctls\n", k,
           whv_kvm_thread_ioctl_count() - before);
}

/* ---- cancellation ---- */
struct canceller { int delay_ms; HRESULT hr; };
static void *cancel_thread(void *arg) {
    struct canceller *c = arg;
    usleep((useconds_t)c->delay_ms * 1000);
    c->hr = WHvCancelRunVirtualProcessor(part, 0, 0);
    return NULL;
}
static volatile int timer_fired;
static VOID NTAPI cancel_timer_cb(PVOID param, BOOLEAN fired) {
    (void)param; (void)fired;
    timer_fired = 1;
    WHvCancelRunVirtualProcessor(part, 0, 0);
}

int main(void) {
    WHV_RUN_VP_EXIT_CONTEXT c;
    HRESULT hr;
    setvbuf(stdout, NULL, _IOLBF, 0);
    alarm(120);   /* a lost cancel would hang the guest's jmp $ loop forever */

    /* ---- capability, partition, memory ---- */
    WHV_CAPABILITY cap;
    UINT32 written = 0;
    hr = WHvGetCapability(WHvCapabilityCodeHypervisorPresent, &cap, sizeof cap, &written);
    CHECK(hr == S_OK && cap.HypervisorPresent && written == sizeof(WINBOOL), "HypervisorPresent: hr %#x", (unsigned)hr);
    if (!cap.HypervisorPresent) { printf("no usable /dev/kvm\n"); return 1; }
    CHECK(WHvCreatePartition(&part) == S_OK, "create partition");
    WHV_PARTITION_PROPERTY prop;
    memset(&prop, 0, sizeof prop);
    prop.ProcessorCount = 1;
    CHECK(WHvSetPartitionProperty(part, WHvPartitionPropertyCodeProcessorCount, &prop, sizeof prop) == S_OK, "ProcessorCount");
    memset(&prop, 0, sizeof prop);
    prop.ExtendedVmExits.X64CpuidExit = 1;
    CHECK(WHvSetPartitionProperty(part, WHvPartitionPropertyCodeExtendedVmExits, &prop, sizeof prop) == S_OK,
          "ExtendedVmExits accepted");
    CHECK(WHvSetupPartition(part) == S_OK, "setup");
    CHECK(WHvCreateVirtualProcessor(part, 0, 0) == S_OK, "create VP");
    CHECK(WHvCreateVirtualProcessor(part, 0, 0) == WHV_E_VP_ALREADY_EXISTS, "VP 0 twice");

    ram = VirtualAlloc(NULL, RAM_SIZE, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE);
    CHECK(ram != NULL && ((uintptr_t)ram & 0xFFFF) == 0, "VirtualAlloc (64 KiB aligned): %p", (void *)ram);
    if (!ram) return 1;
    build_guest();
    hr = WHvMapGpaRange(part, ram, 0, RAM_SIZE, RAM_FLAGS);
    CHECK(hr == S_OK, "map RAM: hr %#x", (unsigned)hr);

    /* A read-only file view at RO_GPA, through CreateFileW -> CreateFileMappingW -> MapViewOfFile. */
    char path[] = "/tmp/whv_shim_test_XXXXXX";
    int tfd = mkstemp(path);
    char content[4096] = "WHVK read-only file";
    CHECK(tfd >= 0 && write(tfd, content, sizeof content) == (ssize_t)sizeof content, "temp file");
    wchar_t wpath[64];
    for (size_t i = 0; i <= strlen(path); i++) wpath[i] = (wchar_t)path[i];
    HANDLE missing = CreateFileW(L"/nonexistent/whv", GENERIC_READ, FILE_SHARE_READ, NULL, OPEN_EXISTING,
                                 FILE_ATTRIBUTE_NORMAL, NULL);
    CHECK(missing == INVALID_HANDLE_VALUE && GetLastError() == ERROR_FILE_NOT_FOUND, "missing file: error %u", GetLastError());
    HANDLE file = CreateFileW(wpath, GENERIC_READ, FILE_SHARE_READ, NULL, OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, NULL);
    LARGE_INTEGER fsize;
    CHECK(file != INVALID_HANDLE_VALUE && GetFileSizeEx(file, &fsize) && fsize.QuadPart == 4096, "CreateFileW/GetFileSizeEx");
    HANDLE section = CreateFileMappingW(file, NULL, PAGE_READONLY, 0, 0, NULL);
    CHECK(section != NULL, "CreateFileMappingW: %u", GetLastError());
    CHECK(CreateFileMappingW(file, NULL, PAGE_READWRITE, 0, 0, NULL) == NULL && GetLastError() == ERROR_ACCESS_DENIED,
          "writable section of a read-only file refused");
    CHECK(CloseHandle(file), "close file (the section keeps it)");
    uint8_t *view = MapViewOfFile(section, FILE_MAP_READ, 0, 0, 0);
    CHECK(view != NULL && memcmp(view, "WHVK", 4) == 0, "MapViewOfFile");
    /* the same through a CRT descriptor */
    int crt_fd = open(path, O_RDONLY);
    HANDLE section2 = CreateFileMappingW((HANDLE)_get_osfhandle(crt_fd), NULL, PAGE_READONLY, 0, 0, NULL);
    uint8_t *view2 = section2 ? MapViewOfFile(section2, FILE_MAP_READ, 0, 0, 4096) : NULL;
    CHECK(view2 && view2[0] == 'W', "section from _get_osfhandle(fd)");
    CHECK(!CloseHandle((HANDLE)_get_osfhandle(crt_fd)), "CloseHandle on a CRT descriptor handle is refused");
    if (view2) UnmapViewOfFile(view2);
    if (section2) CloseHandle(section2);
    close(crt_fd);
    CHECK(WHvMapGpaRange(part, view, RO_GPA, 4096, WHvMapGpaRangeFlagRead | WHvMapGpaRangeFlagWrite) == E_ACCESSDENIED,
          "a read-only view cannot be mapped writable");
    hr = WHvMapGpaRange(part, view, RO_GPA, 4096, WHvMapGpaRangeFlagRead);
    CHECK(hr == S_OK, "map read-only view: hr %#x", (unsigned)hr);
    CHECK(WHvMapGpaRange(part, ram, 0x1000, 4096, WHvMapGpaRangeFlagRead) == E_INVALIDARG, "overlapping map refused");

    /* ---- registers ---- */
    init_vcpu(A_START, 0);
    CHECK(get_reg(WHvX64RegisterRsp) == 0x80000 && get_reg(WHvX64RegisterCr3) == 0x1000 &&
          get_reg(WHvX64RegisterEfer) == 0xD01, "registers read back");
    {
        WHV_REGISTER_NAME n[2] = { WHvX64RegisterRax, (WHV_REGISTER_NAME)0x7777 };
        WHV_REGISTER_VALUE v[2];
        memset(v, 0, sizeof v);
        v[0].Reg64 = 0xDEAD;
        hr = set_regs(n, v, 2);
        CHECK(hr == WHV_E_INVALID_VP_REGISTER_NAME, "unknown register name: hr %#x", (unsigned)hr);
        CHECK(get_reg(WHvX64RegisterRax) == 0, "a failed Set changed nothing");
    }
    {
        WHV_REGISTER_NAME n[] = { WHvX64RegisterStar, WHvX64RegisterLstar, WHvX64RegisterSfmask,
                                  WHvX64RegisterKernelGsBase, WHvX64RegisterPat, WHvX64RegisterDr0, WHvX64RegisterDr7 };
        UINT64 want[] = { 0x0023001000000000ull, 0xFFFF800000001000ull, 0x47700, 0x1234000, 0x0007040600070406ull,
                          0x1000, 0x400 };
        WHV_REGISTER_VALUE v[7], got[7];
        memset(v, 0, sizeof v);
        for (int i = 0; i < 7; i++) v[i].Reg64 = want[i];
        CHECK(set_regs(n, v, 7) == S_OK, "MSRs + debug registers");
        CHECK(WHvGetVirtualProcessorRegisters(part, 0, n, 7, got) == S_OK, "get MSRs");
        for (int i = 0; i < 7; i++) CHECK(got[i].Reg64 == want[i], "register %#x: %#llx", (unsigned)n[i],
                                          (unsigned long long)got[i].Reg64);
        WHV_REGISTER_NAME segn = WHvX64RegisterCs;
        WHV_REGISTER_VALUE seg;
        CHECK(WHvGetVirtualProcessorRegisters(part, 0, &segn, 1, &seg) == S_OK && seg.Segment.Selector == 0x08 &&
              seg.Segment.Long == 1 && seg.Segment.SegmentType == 0xB && seg.Segment.Present == 1, "CS read back");
    }

    /* ---- a pending cancel is consumed by the next run ---- */
    CHECK(WHvCancelRunVirtualProcessor(part, 0, 0) == S_OK, "cancel while idle");
    hr = run(&c);
    CHECK(hr == S_OK && c.ExitReason == WHvRunVpExitReasonCanceled &&
          c.CancelReason.CancelReason == WhvRunVpCancelReasonUser, "pending cancel: exit %#x", (unsigned)c.ExitReason);
    CHECK(c.VpContext.Rip == A_START && get_reg(WHvX64RegisterRip) == A_START, "canceled before any instruction");

    /* ---- port I/O: the VP stops AT the instruction; the host steps RIP ---- */
    expect_io(&c, 0x10, 1, 1, A_START + 5, 2);
    CHECK(c.IoPortAccess.Rax == 0x11 && c.IoPortAccess.InstructionByteCount == 2 &&
          c.IoPortAccess.InstructionBytes[0] == 0xE6, "out 0x10, al: Rax %#llx", (unsigned long long)c.IoPortAccess.Rax);
    CHECK(c.VpContext.ExecutionState.Cpl == 0 && c.VpContext.ExecutionState.EferLma == 1 &&
          c.VpContext.Cs.Selector == 0x08 && (c.VpContext.Rflags & 2), "VpContext");
    expect_io(&c, 0x10, 1, 1, A_START + 5, 2);   /* not stepped: the out runs again */
    step(&c);
    expect_io(&c, 0x1234, 1, 4, A_START + 0x10, 1);
    CHECK(c.IoPortAccess.Rax == 0x22, "out dx, eax: Rax");
    step(&c);
    expect_io(&c, 0x1234, 1, 2, A_START + 0x15, 2);
    CHECK((c.IoPortAccess.Rax & 0xFFFF) == 0xBEEF, "out dx, ax: Rax %#llx", (unsigned long long)c.IoPortAccess.Rax);
    step(&c);
    expect_io(&c, 0x1234, 0, 4, A_START + 0x21, 1);   /* in eax, dx */
    CHECK(c.IoPortAccess.Rax == 0x1122334455667788ull && get_reg(WHvX64RegisterRax) == 0x1122334455667788ull,
          "IN: RAX untouched until the host writes it");
    set_reg(WHvX64RegisterRax, 0xCAFEF00D);   /* the host completes the IN itself */
    step(&c);
    expect_io(&c, 0x21, 1, 4, A_START + 0x22, 2);
    CHECK(c.IoPortAccess.Rax == 0xCAFEF00D, "IN result reached the guest: %#llx", (unsigned long long)c.IoPortAccess.Rax);
    step(&c);
    hr = run(&c);
    CHECK(hr == S_OK && c.ExitReason == WHvRunVpExitReasonX64Halt, "hlt: exit %#x", (unsigned)c.ExitReason);
    set_reg(WHvX64RegisterRip, G_START);
    expect_io(&c, 0xEE, 1, 1, G_START + 4, 1);
    step(&c);
    expect_io(&c, 0xEE, 1, 1, G_START + 5, 1);
    step(&c);
    /* "E6 EE" with DX = 0xee: "EE" alone also matches; either decoding steps to the same RIP */
    hr = run(&c);
    CHECK(hr == S_OK && c.ExitReason == WHvRunVpExitReasonX64IoPortAccess && c.IoPortAccess.PortNumber == 0xEE &&
          c.VpContext.Rip + c.VpContext.InstructionLength == G_START + 8, "ambiguous out: Rip %#llx + %u",
          (unsigned long long)c.VpContext.Rip, c.VpContext.InstructionLength);
    step(&c);
    hr = run(&c);
    CHECK(hr == S_OK && c.ExitReason == WHvRunVpExitReasonX64Halt, "hlt after the outs: exit %#x", (unsigned)c.ExitReason);

    /* ---- dirty bitmap: read-and-clear per range ---- */
    UINT64 bm[4];
    CHECK(WHvQueryGpaRangeDirtyBitmap(part, 0, RAM_SIZE, NULL, 0) == S_OK, "clear all");
    set_reg(WHvX64RegisterRip, B_START);
    expect_io(&c, 0x30, 1, 1, B_START + 0x18, 2);
    CHECK(WHvQueryGpaRangeDirtyBitmap(part, 0x20000, 4 * 4096, bm, 8) == S_OK && bm[0] == 0x5,
          "pages 0x20000,0x22000 dirty: %#llx", (unsigned long long)bm[0]);
    CHECK(WHvQueryGpaRangeDirtyBitmap(part, 0x24000, 4 * 4096, bm, 8) == S_OK && bm[0] == 0x2,
          "0x25000 still dirty after a query of another sub-range: %#llx", (unsigned long long)bm[0]);
    CHECK(WHvQueryGpaRangeDirtyBitmap(part, 0x20000, 8 * 4096, bm, 8) == S_OK && bm[0] == 0,
          "queried bits were cleared: %#llx", (unsigned long long)bm[0]);
    set_reg(WHvX64RegisterRip, B_START);
    expect_io(&c, 0x30, 1, 1, B_START + 0x18, 2);
    CHECK(WHvQueryGpaRangeDirtyBitmap(part, 0x20000, 8 * 4096, NULL, 0) == S_OK, "clear-only query");
    CHECK(WHvQueryGpaRangeDirtyBitmap(part, 0x20000, 8 * 4096, bm, 8) == S_OK && bm[0] == 0, "cleared: %#llx",
          (unsigned long long)bm[0]);
    CHECK(WHvQueryGpaRangeDirtyBitmap(part, 0, RAM_SIZE, bm, 8) == E_INVALIDARG, "bitmap too small");
    CHECK(WHvQueryGpaRangeDirtyBitmap(part, RO_GPA, 4096, bm, 8) == WHV_E_GPA_RANGE_NOT_FOUND, "untracked range");
    CHECK(WHvQueryGpaRangeDirtyBitmap(part, RAM_SIZE - 4096, 8192, bm, 8) == WHV_E_GPA_RANGE_NOT_FOUND,
          "range beyond the mapping");

    /* ---- stale pages after decommit/recommit (WHP pins pages at map time) ---- */
    *(volatile uint32_t *)(ram + 0x30000) = 0xAAAA;
    set_reg(WHvX64RegisterRip, C_START);
    expect_io(&c, 0x40, 1, 4, C_START + 7, 2);
    CHECK(c.IoPortAccess.Rax == 0xAAAA, "guest sees the host's write");
    step(&c);
    expect_io(&c, 0x41, 1, 1, C_START + 0x14, 2);
    CHECK(*(volatile uint32_t *)(ram + 0x30000) == 0xCCCC, "host sees the guest's write");
    CHECK(VirtualFree(ram + 0x30000, 4096, MEM_DECOMMIT), "decommit");
    CHECK(VirtualAlloc(ram + 0x30000, 4096, MEM_COMMIT, PAGE_READWRITE) == ram + 0x30000, "recommit");
    CHECK(*(volatile uint32_t *)(ram + 0x30000) == 0, "recommitted page is a new zero page");
    *(volatile uint32_t *)(ram + 0x30000) = 0xBBBB;
    set_reg(WHvX64RegisterRip, C_START);
    expect_io(&c, 0x40, 1, 4, C_START + 7, 2);
    CHECK(c.IoPortAccess.Rax == 0xCCCC, "STALE: the guest still reads the old page (%#llx), not the host's 0xbbbb",
          (unsigned long long)c.IoPortAccess.Rax);
    step(&c);
    expect_io(&c, 0x41, 1, 1, C_START + 0x14, 2);
    CHECK(*(volatile uint32_t *)(ram + 0x30000) == 0xBBBB, "guest writes go to the old page too");
    CHECK(WHvUnmapGpaRange(part, 0, RAM_SIZE / 2) == WHV_E_GPA_RANGE_NOT_FOUND, "partial unmap refused");
    CHECK(WHvUnmapGpaRange(part, 0, RAM_SIZE) == S_OK && WHvMapGpaRange(part, ram, 0, RAM_SIZE, RAM_FLAGS) == S_OK,
          "remap after recommit");
    set_reg(WHvX64RegisterRip, C_START);
    expect_io(&c, 0x40, 1, 4, C_START + 7, 2);
    CHECK(c.IoPortAccess.Rax == 0xBBBB, "after the remap the guest sees the new page: %#llx",
          (unsigned long long)c.IoPortAccess.Rax);

    /* ---- cancellation while running ---- */
    pthread_t th;
    struct canceller cn = { 50, E_FAIL };
    set_reg(WHvX64RegisterRip, D_START);
    pthread_create(&th, NULL, cancel_thread, &cn);
    hr = run(&c);
    pthread_join(th, NULL);
    CHECK(hr == S_OK && cn.hr == S_OK && c.ExitReason == WHvRunVpExitReasonCanceled, "cancel from a thread: exit %#x",
          (unsigned)c.ExitReason);
    CHECK(c.VpContext.Rip == D_START, "canceled in the loop");
    for (int i = 0; i < 50; i++) {   /* races: cancel right around KVM_RUN entry */
        cn.delay_ms = i % 3;
        pthread_create(&th, NULL, cancel_thread, &cn);
        hr = run(&c);
        pthread_join(th, NULL);
        if (c.ExitReason != WHvRunVpExitReasonCanceled) break;
    }
    CHECK(c.ExitReason == WHvRunVpExitReasonCanceled, "50 racing cancels all land");
    HANDLE timer = NULL;
    CHECK(CreateTimerQueueTimer(&timer, NULL, cancel_timer_cb, NULL, 30, 0, WT_EXECUTEONLYONCE), "timer");
    LARGE_INTEGER t0, t1, freq;
    QueryPerformanceCounter(&t0);
    hr = run(&c);
    QueryPerformanceCounter(&t1);
    QueryPerformanceFrequency(&freq);
    CHECK(hr == S_OK && c.ExitReason == WHvRunVpExitReasonCanceled && timer_fired, "timer callback cancels the run");
    double ms = (double)(t1.QuadPart - t0.QuadPart) * 1000.0 / (double)freq.QuadPart;
    CHECK(ms > 20 && ms < 5000, "timer fired after %.1f ms", ms);
    CHECK(DeleteTimerQueueTimer(NULL, timer, INVALID_HANDLE_VALUE), "delete timer");

    /* ---- XSAVE: compacted format only ---- */
    uint8_t xs[8192], small[64];
    memset(xs, 0, sizeof xs);
    hr = WHvGetVirtualProcessorXsaveState(part, 0, small, sizeof small, &written);
    CHECK(hr == WHV_E_INSUFFICIENT_BUFFER && written >= 576, "small buffer: hr %#x, needs %u", (unsigned)hr, written);
    UINT32 need = written;
    hr = WHvGetVirtualProcessorXsaveState(part, 0, xs, sizeof xs, &written);
    UINT64 xcomp, xstate;
    memcpy(&xcomp, xs + 520, 8);
    memcpy(&xstate, xs + 512, 8);
    CHECK(hr == S_OK && written == need && (xcomp >> 63) && (xcomp & 3) == 3, "get xsave: %u bytes, XCOMP_BV %#llx",
          written, (unsigned long long)xcomp);
    printf("  xsave: %u bytes, XCOMP_BV %#llx\n", written, (unsigned long long)xcomp);
    uint8_t pattern[16];
    for (int i = 0; i < 16; i++) pattern[i] = (uint8_t)(0xA0 + i);
    uint32_t mxcsr = 0x9F80;   /* FZ set */
    memcpy(xs + 24, &mxcsr, 4);
    memcpy(xs + 160, pattern, 16);   /* XMM0 */
    xstate |= 3;
    memcpy(xs + 512, &xstate, 8);
    uint8_t standard[8192];
    memcpy(standard, xs, sizeof standard);
    memset(standard + 520, 0, 8);   /* XCOMP_BV = 0: standard format */
    CHECK(WHvSetVirtualProcessorXsaveState(part, 0, standard, written) == E_INVALIDARG, "standard format refused");
    CHECK(WHvSetVirtualProcessorXsaveState(part, 0, xs, written) == S_OK, "set compacted xsave");
    uint8_t back[8192];
    CHECK(WHvGetVirtualProcessorXsaveState(part, 0, back, sizeof back, &written) == S_OK &&
          memcmp(back + 160, pattern, 16) == 0 && memcmp(back + 24, &mxcsr, 4) == 0, "xsave round trip");
    WHV_REGISTER_NAME xn = WHvX64RegisterXmm0;
    WHV_REGISTER_VALUE xv;
    CHECK(WHvGetVirtualProcessorRegisters(part, 0, &xn, 1, &xv) == S_OK && memcmp(&xv.Reg128, pattern, 16) == 0,
          "XMM0 via the register API matches");

    /* ---- read-only and unmapped memory ---- */
    set_reg(WHvX64RegisterRip, E_START);
    expect_io(&c, 0x50, 1, 4, E_START + 7, 2);
    CHECK((UINT32)c.IoPortAccess.Rax == 0x4B564857, "guest reads the file view: %#llx", (unsigned long long)c.IoPortAccess.Rax);
    step(&c);
    UINT64 rax_before = get_reg(WHvX64RegisterRax);
    hr = run(&c);
    CHECK(hr == S_OK && c.ExitReason == WHvRunVpExitReasonMemoryAccess && c.MemoryAccess.Gpa == RO_GPA &&
          c.MemoryAccess.AccessInfo.AccessType == WHvMemoryAccessWrite && !c.MemoryAccess.AccessInfo.GpaUnmapped,
          "write to read-only: exit %#x gpa %#llx", (unsigned)c.ExitReason, (unsigned long long)c.MemoryAccess.Gpa);
    CHECK(memcmp(view, "WHVK", 4) == 0, "the file view is unchanged");
    /* Documented difference: RIP is past the write here (KVM), at it on WHP. */
    CHECK(c.VpContext.Rip == E_START + 0x14, "write exit RIP %#llx (documented: past the instruction)",
          (unsigned long long)c.VpContext.Rip);
    hr = run(&c);
    CHECK(hr == S_OK && c.ExitReason == WHvRunVpExitReasonMemoryAccess && c.MemoryAccess.Gpa == UNMAPPED_GPA &&
          c.MemoryAccess.AccessInfo.AccessType == WHvMemoryAccessRead && c.MemoryAccess.AccessInfo.GpaUnmapped,
          "read of an unmapped GPA: exit %#x gpa %#llx", (unsigned)c.ExitReason, (unsigned long long)c.MemoryAccess.Gpa);
    CHECK(c.VpContext.Rip == E_START + 0x14 && get_reg(WHvX64RegisterRip) == E_START + 0x14 &&
          get_reg(WHvX64RegisterRax) == rax_before, "read exit leaves RIP at the instruction, RAX untouched");
    hr = run(&c);
    CHECK(hr == S_OK && c.ExitReason == WHvRunVpExitReasonMemoryAccess && c.VpContext.Rip == E_START + 0x14,
          "not stepping re-executes the read");

    /* ---- the same port I/O from CPL3 (how whpfast runs guest code) ---- */
    init_vcpu(A_START, 3);
    expect_io(&c, 0x10, 1, 1, A_START + 5, 2);
    CHECK(c.VpContext.ExecutionState.Cpl == 3 && c.VpContext.Cs.Selector == 0x23, "CPL3: Cpl %u",
          c.VpContext.ExecutionState.Cpl);
    expect_io(&c, 0x10, 1, 1, A_START + 5, 2);
    step(&c);
    expect_io(&c, 0x1234, 1, 4, A_START + 0x10, 1);
    step(&c);
    expect_io(&c, 0x1234, 1, 2, A_START + 0x15, 2);
    step(&c);
    expect_io(&c, 0x1234, 0, 4, A_START + 0x21, 1);
    CHECK(get_reg(WHvX64RegisterRax) == 0x1122334455667788ull, "CPL3 IN: RAX untouched");
    set_reg(WHvX64RegisterRax, 0x600DF00D);
    step(&c);
    expect_io(&c, 0x21, 1, 4, A_START + 0x22, 2);
    CHECK(c.IoPortAccess.Rax == 0x600DF00D, "CPL3 IN result: %#llx", (unsigned long long)c.IoPortAccess.Rax);
    init_vcpu(A_START, 0);

    /* ---- registers KVM refuses: an exit at run time, the values stay ---- */
    set_reg(WHvX64RegisterRip, A_START);
    set_reg(WHvX64RegisterCr0, 0x80000000);   /* PG without PE */
    hr = run(&c);
    CHECK(hr == S_OK && c.ExitReason == WHvRunVpExitReasonInvalidVpRegisterValue, "invalid CR0: hr %#x exit %#x",
          (unsigned)hr, (unsigned)c.ExitReason);
    CHECK(get_reg(WHvX64RegisterCr0) == 0x80000000, "invalid value still reads back");
    hr = run(&c);
    CHECK(hr == S_OK && c.ExitReason == WHvRunVpExitReasonInvalidVpRegisterValue, "still refused on the next run");
    set_reg(WHvX64RegisterCr0, 0x80050033);
    expect_io(&c, 0x10, 1, 1, A_START + 5, 2);

    /* ---- an injected exception is delivered (no IDT here: triple fault) ---- */
    {
        WHV_REGISTER_NAME n = WHvRegisterPendingInterruption;
        WHV_REGISTER_VALUE v, got;
        memset(&v, 0, sizeof v);
        v.PendingInterruption.InterruptionPending = 1;
        v.PendingInterruption.InterruptionType = WHvX64PendingException;
        v.PendingInterruption.InterruptionVector = 6;
        CHECK(set_regs(&n, &v, 1) == S_OK, "set PendingInterruption");
        CHECK(WHvGetVirtualProcessorRegisters(part, 0, &n, 1, &got) == S_OK && got.PendingInterruption.InterruptionPending &&
              got.PendingInterruption.InterruptionVector == 6, "PendingInterruption reads back");
        hr = run(&c);
        CHECK(hr == S_OK && c.ExitReason == WHvRunVpExitReasonUnrecoverableException, "injected #UD: exit %#x",
              (unsigned)c.ExitReason);
        init_vcpu(A_START, 0);
    }

    /* ---- triple fault ---- */
    set_reg(WHvX64RegisterRip, F_START);
    hr = run(&c);
    CHECK(hr == S_OK && c.ExitReason == WHvRunVpExitReasonUnrecoverableException, "ud2 without IDT: exit %#x",
          (unsigned)c.ExitReason);

    /* ---- memory API errors and teardown ---- */
    CHECK(!VirtualFree(ram, 123, MEM_RELEASE) && GetLastError() == ERROR_INVALID_PARAMETER, "MEM_RELEASE needs size 0");
    CHECK(WHvDeletePartition(part) == S_OK, "delete partition");
    CHECK(VirtualFree(ram, 0, MEM_RELEASE), "release RAM");
    CHECK(UnmapViewOfFile(view) && CloseHandle(section), "unmap view, close section");
    unlink(path);

    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
