/* libwhv_kvm.so: the Windows Hypervisor Platform API (WHv*) and the few kernel32/CRT calls the
 * whpfast WHP backend uses, implemented on Linux KVM, so that backend can be built on Linux and
 * run real guests on /dev/kvm. A TEST LAYER, not a product: where WHP and KVM behave
 * differently it models WHP, because a backend that relies on a KVM behaviour must fail here.
 * The modelled differences are marked "WHP:" below; tests/whv/README.md lists them all.
 *
 * Build: tests/whv/build.sh OUTDIR (headers: include/compat, then mingw's winhvplatform*.h).
 *
 * Locking: one global mutex (g_lock) guards partitions, GPA mappings, VirtualAlloc regions and
 * handles. WHvRunVirtualProcessor holds it only while it decodes an exit, never in KVM_RUN;
 * WHvCancelRunVirtualProcessor holds it only to find the VP. */
#define _GNU_SOURCE
#include <windows.h>
#include <winhvplatform.h>
#include <io.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define API __attribute__((visibility("default")))

/* WHP's own HRESULTs (winhvplatformdefs.h lacks them). */
#define WHV_E_UNKNOWN_CAPABILITY ((HRESULT)0x80370300L)
#define WHV_E_INSUFFICIENT_BUFFER ((HRESULT)0x80370301L)
#define WHV_E_UNKNOWN_PROPERTY ((HRESULT)0x80370302L)
#define WHV_E_INVALID_PARTITION_CONFIG ((HRESULT)0x80370304L)
#define WHV_E_GPA_RANGE_NOT_FOUND ((HRESULT)0x80370305L)
#define WHV_E_VP_ALREADY_EXISTS ((HRESULT)0x80370306L)
#define WHV_E_VP_DOES_NOT_EXIST ((HRESULT)0x80370307L)
#define WHV_E_INVALID_VP_STATE ((HRESULT)0x80370308L)
#define WHV_E_INVALID_VP_REGISTER_NAME ((HRESULT)0x80370309L)

#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39 /* Linux 6.8+; the installed headers may be older */
#endif

#define PAGE 4096ull
#define ALLOC_GRANULARITY 65536ull   /* Windows: allocation bases and view offsets */
#define NO_PAGE UINT64_MAX
#define PART_MAGIC 0x57485650u      /* "WHVP" */
#define HANDLE_MAGIC 0x57484e44u    /* "WHND" */
#define MAX_VPS 64
#define CR0_PE 1ull
#define CR0_PG (1ull << 31)
#define CR4_PSE (1ull << 4)
#define CR4_PAE (1ull << 5)
#define CR4_LA57 (1ull << 12)
#define EFER_LMA (1ull << 10)
#define PTE_ADDR 0x000FFFFFFFFFF000ull

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_debug;   /* WHV_KVM_DEBUG=1: one line per exit on stderr */
static __thread DWORD t_last_error;
static atomic_ullong g_ioctls;
static __thread unsigned long long t_ioctls;

/* ======================================================================================
 * Errors and the ioctl counter
 * ====================================================================================== */

API DWORD WINAPI GetLastError(VOID) { return t_last_error; }
API VOID WINAPI SetLastError(DWORD e) { t_last_error = e; }

static DWORD win32_from_errno(int e) {
    switch (e) {
    case 0: return ERROR_SUCCESS;
    case ENOENT: case ENOTDIR: return ERROR_FILE_NOT_FOUND;
    case EACCES: case EPERM: case EISDIR: case EROFS: return ERROR_ACCESS_DENIED;
    case EEXIST: return ERROR_FILE_EXISTS;
    case ENOMEM: return ERROR_NOT_ENOUGH_MEMORY;
    case EMFILE: case ENFILE: return ERROR_TOO_MANY_OPEN_FILES;
    case ENAMETOOLONG: return ERROR_FILENAME_EXCED_RANGE;
    case EBADF: return ERROR_INVALID_HANDLE;
    case EINVAL: return ERROR_INVALID_PARAMETER;
    case ENOSPC: case EFBIG: return ERROR_DISK_FULL;
    case ENOSYS: case EOPNOTSUPP: return ERROR_NOT_SUPPORTED;
    default: return ERROR_GEN_FAILURE;
    }
}
static BOOL fail_win32(DWORD e) { t_last_error = e; return FALSE; }
static HRESULT hr_errno(int e) { return e == EINVAL ? E_INVALIDARG : e == ENOMEM ? E_OUTOFMEMORY
                                      : HRESULT_FROM_WIN32(win32_from_errno(e)); }

/* Every ioctl on /dev/kvm, a VM or a vCPU goes through here and is counted, so tests and
 * benchmarks can see what one WHv call costs in KVM round trips. */
static int kvm_ioctl(int fd, unsigned long req, void *arg) {
    atomic_fetch_add_explicit(&g_ioctls, 1, memory_order_relaxed);
    t_ioctls++;
    return ioctl(fd, req, arg);
}
API unsigned long long whv_kvm_ioctl_count(void) { return atomic_load(&g_ioctls); }
API unsigned long long whv_kvm_thread_ioctl_count(void) { return t_ioctls; }

/* ======================================================================================
 * /dev/kvm, once per process
 * ====================================================================================== */

static pthread_once_t g_kvm_once = PTHREAD_ONCE_INIT;
static int g_kvm_fd = -1, g_kvm_errno, g_run_size, g_xsave_size = 4096;
static struct kvm_cpuid2 *g_cpuid;
/* XSAVE components the guest has (bit i), and the standard-format offset/size/alignment of
 * each extended one, from the CPUID given to every vCPU (leaf 0xD): the components KVM keeps in
 * the vCPU's XSAVE area. Even where that CPUID lacks the XSAVE bit (PVM), the guest's CPL3 code
 * runs with the host's XCR0 and can use them all (AVX-512 included), so all are its state. */
static uint64_t g_xmask = 3;
static uint32_t g_xoff[64], g_xsize[64], g_xalign[64];
static int g_kick_signal;

static void kick_handler(int sig) { (void)sig; /* only interrupts KVM_RUN (EINTR) */ }

static struct kvm_cpuid_entry2 *cpuid_find(uint32_t fn, uint32_t idx) {
    for (uint32_t i = 0; g_cpuid && i < g_cpuid->nent; i++)
        if (g_cpuid->entries[i].function == fn && g_cpuid->entries[i].index == idx)
            return &g_cpuid->entries[i];
    return NULL;
}

static void kvm_init_once(void) {
    const char *dbg = getenv("WHV_KVM_DEBUG");
    g_debug = dbg && *dbg && *dbg != '0';
    g_kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (g_kvm_fd < 0) { g_kvm_errno = errno; return; }
    if (kvm_ioctl(g_kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION ||
        kvm_ioctl(g_kvm_fd, KVM_CHECK_EXTENSION, (void *)(long)KVM_CAP_SYNC_REGS) <= 0 ||
        kvm_ioctl(g_kvm_fd, KVM_CHECK_EXTENSION, (void *)(long)KVM_CAP_IMMEDIATE_EXIT) <= 0 ||
        kvm_ioctl(g_kvm_fd, KVM_CHECK_EXTENSION, (void *)(long)KVM_CAP_READONLY_MEM) <= 0) {
        close(g_kvm_fd); g_kvm_fd = -1; g_kvm_errno = ENOSYS; return;
    }
    g_run_size = kvm_ioctl(g_kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    int xs = kvm_ioctl(g_kvm_fd, KVM_CHECK_EXTENSION, (void *)(long)KVM_CAP_XSAVE2);
    if (xs > 4096) g_xsave_size = xs;
    for (int n = 64; n <= 4096; n *= 2) {   /* KVM's supported CPUID: KVM refuses EFER.LME/NXE without it */
        g_cpuid = calloc(1, sizeof(*g_cpuid) + n * sizeof(struct kvm_cpuid_entry2));
        if (!g_cpuid) break;
        g_cpuid->nent = n;
        if (kvm_ioctl(g_kvm_fd, KVM_GET_SUPPORTED_CPUID, g_cpuid) == 0) break;
        free(g_cpuid); g_cpuid = NULL;
        if (errno != E2BIG) break;
    }
    if (!g_cpuid || g_run_size <= 0) { close(g_kvm_fd); g_kvm_fd = -1; g_kvm_errno = ENOSYS; return; }
    struct kvm_cpuid_entry2 *l1 = cpuid_find(1, 0), *d0 = cpuid_find(0xD, 0);
    (void)l1;
    if (d0) {
        uint64_t m = d0->eax | ((uint64_t)d0->edx << 32);
        for (int i = 2; i < 63; i++) {
            struct kvm_cpuid_entry2 *d = cpuid_find(0xD, i);
            if (!(m & (1ull << i)) || !d || !d->eax || d->ebx + d->eax > (uint32_t)g_xsave_size)
                continue;
            g_xmask |= 1ull << i;
            g_xsize[i] = d->eax; g_xoff[i] = d->ebx; g_xalign[i] = (d->ecx >> 1) & 1;
        }
    }
    /* The cancel kick: a no-op handler WITHOUT SA_RESTART, so KVM_RUN returns EINTR.
     * SIGRTMIN+7 (the KVM backend uses SIGRTMIN+6). */
    g_kick_signal = SIGRTMIN + 7;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    sigaction(g_kick_signal, &sa, NULL);
}

static int kvm_ready(void) {
    pthread_once(&g_kvm_once, kvm_init_once);
    return g_kvm_fd >= 0;
}

/* ======================================================================================
 * VirtualAlloc memory: memfd-backed, so the guest's view can be a separate mapping
 * ====================================================================================== */

/* WHP: WHvMapGpaRange pins the physical pages behind the host range *at map time*. If the host
 * later decommits and recommits that range, it gets new pages while the guest keeps the old
 * ones (the "stale input" bug). To reproduce that, every VirtualAlloc region lives in a memfd,
 * each committed page at its own file offset (page_off). WHvMapGpaRange gives KVM an alias
 * mapping of those file offsets, not the host address; a recommit maps *fresh* offsets into the
 * host range, and the alias keeps showing the old ones, exactly as on WHP. */
struct valloc {
    uint8_t *base;
    size_t npages;
    int memfd;
    uint64_t file_pages;    /* bump allocator for fresh file pages */
    uint64_t *page_off;     /* per page: file page number, or NO_PAGE when not committed */
    struct valloc *next;
};
static struct valloc *g_vallocs;

struct gpa_map {            /* one WHvMapGpaRange = one KVM memslot */
    uint64_t gpa, size;
    uint32_t slot, flags;
    uint8_t *host;          /* the source address the caller passed */
    uint8_t *guest;         /* what KVM maps: the alias, or host for non-VirtualAlloc memory */
    struct valloc *va;      /* region the alias was made from (NULL: direct, or region released) */
    uint64_t first_page;    /* index of host in va */
    uint64_t *offs;         /* file pages the alias maps (owned) */
    uint64_t *dirty;        /* accumulated dirty bits, one per page (TrackDirtyPages only) */
    uint64_t *dirty_tmp;    /* KVM_GET_DIRTY_LOG buffer */
    uint64_t *stale;        /* pages whose translations the next CR3 write drops (see flush_translations) */
    int any_stale;
    struct gpa_map *next;
};

struct whv_vp {
    int fd;                 /* -1: never created */
    int deleted;
    struct kvm_run *run;
    atomic_int running;
    atomic_int cancel_pending;
    atomic_int tid;
};

struct whv_partition {
    uint32_t magic;
    int vm_fd;
    int setup;
    uint32_t nvp;
    uint64_t ext_exits, exc_bitmap;
    int exception_payload;  /* KVM_CAP_EXCEPTION_PAYLOAD on: WHvRegisterPendingEvent is modelled */
    struct whv_vp vps[MAX_VPS];
    struct gpa_map *maps;
    struct whv_partition *next;
};
static struct whv_partition *g_parts;

static struct valloc *valloc_find(const void *addr) {     /* region containing addr */
    for (struct valloc *v = g_vallocs; v; v = v->next)
        if ((const uint8_t *)addr >= v->base && (const uint8_t *)addr < v->base + v->npages * PAGE)
            return v;
    return NULL;
}

/* Is file page `off` of region v still shown to some guest through an alias? */
static int offset_in_use(struct valloc *v, uint64_t idx, uint64_t off) {
    for (struct whv_partition *p = g_parts; p; p = p->next)
        for (struct gpa_map *m = p->maps; m; m = m->next)
            if (m->va == v && idx >= m->first_page && idx < m->first_page + m->size / PAGE &&
                m->offs[idx - m->first_page] == off)
                return 1;
    return 0;
}

static void release_file_page(struct valloc *v, uint64_t off) {
    fallocate(v->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off * PAGE, PAGE);
}

static int win_prot(DWORD protect, int *prot) {
    switch (protect) {
    case PAGE_NOACCESS: *prot = PROT_NONE; return 1;
    case PAGE_READONLY: *prot = PROT_READ; return 1;
    case PAGE_READWRITE: *prot = PROT_READ | PROT_WRITE; return 1;
    case PAGE_EXECUTE: case PAGE_EXECUTE_READ: *prot = PROT_READ | PROT_EXEC; return 1;
    case PAGE_EXECUTE_READWRITE: *prot = PROT_READ | PROT_WRITE | PROT_EXEC; return 1;
    default: return 0;
    }
}

/* Commits pages [i0, i1): pages already committed keep their contents (new protection);
 * uncommitted ones get fresh zero file pages. */
static int valloc_commit(struct valloc *v, uint64_t i0, uint64_t i1, int prot) {
    for (uint64_t i = i0; i < i1;) {
        uint64_t j = i;
        int committed = v->page_off[i] != NO_PAGE;
        while (j < i1 && (v->page_off[j] != NO_PAGE) == committed) j++;
        if (committed) {
            if (mprotect(v->base + i * PAGE, (j - i) * PAGE, prot)) return -1;
        } else {
            uint64_t off = v->file_pages;
            if (ftruncate(v->memfd, (off_t)((off + (j - i)) * PAGE))) return -1;
            if (mmap(v->base + i * PAGE, (j - i) * PAGE, prot, MAP_SHARED | MAP_FIXED, v->memfd,
                     (off_t)(off * PAGE)) == MAP_FAILED)
                return -1;
            v->file_pages += j - i;
            for (uint64_t k = i; k < j; k++) v->page_off[k] = off + (k - i);
        }
        i = j;
    }
    return 0;
}

static void valloc_decommit(struct valloc *v, uint64_t i0, uint64_t i1) {
    mmap(v->base + i0 * PAGE, (i1 - i0) * PAGE, PROT_NONE,
         MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    for (uint64_t i = i0; i < i1; i++) {
        if (v->page_off[i] == NO_PAGE) continue;
        /* Free the page unless a guest still sees it (then it lives on, as on WHP). */
        if (!offset_in_use(v, i, v->page_off[i])) release_file_page(v, v->page_off[i]);
        v->page_off[i] = NO_PAGE;
    }
}

API LPVOID WINAPI VirtualAlloc(LPVOID addr, SIZE_T size, DWORD type, DWORD protect) {
    int prot;
    if (!size || !win_prot(protect, &prot) || !(type & (MEM_COMMIT | MEM_RESERVE)) ||
        (type & ~(MEM_COMMIT | MEM_RESERVE))) {
        t_last_error = ERROR_INVALID_PARAMETER;
        return NULL;
    }
    pthread_mutex_lock(&g_lock);
    void *ret = NULL;
    if (addr) {
        /* Commit inside an existing reservation (reserving at a chosen address: unsupported). */
        uint8_t *a = (uint8_t *)((uintptr_t)addr & ~(PAGE - 1));
        uint8_t *end = (uint8_t *)(((uintptr_t)addr + size + PAGE - 1) & ~(PAGE - 1));
        struct valloc *v = valloc_find(a);
        if ((type & MEM_RESERVE) || !v || end > v->base + v->npages * PAGE) {
            t_last_error = ERROR_INVALID_ADDRESS;
        } else if (valloc_commit(v, (a - v->base) / PAGE, (end - v->base) / PAGE, prot)) {
            t_last_error = win32_from_errno(errno);
        } else {
            ret = a;
        }
        pthread_mutex_unlock(&g_lock);
        return ret;
    }
    size_t npages = (size + PAGE - 1) / PAGE;
    struct valloc *v = calloc(1, sizeof *v);
    uint64_t *offs = malloc(npages * sizeof(uint64_t));
    int fd = memfd_create("whv-virtualalloc", MFD_CLOEXEC);
    /* Windows aligns allocation bases to 64 KiB: reserve extra and trim. */
    size_t span = npages * PAGE + ALLOC_GRANULARITY;
    uint8_t *raw = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (!v || !offs || fd < 0 || raw == MAP_FAILED) {
        t_last_error = ERROR_NOT_ENOUGH_MEMORY;
        goto fail;
    }
    uint8_t *base = (uint8_t *)(((uintptr_t)raw + ALLOC_GRANULARITY - 1) & ~(ALLOC_GRANULARITY - 1));
    if (base > raw) munmap(raw, base - raw);
    if (raw + span > base + npages * PAGE) munmap(base + npages * PAGE, raw + span - (base + npages * PAGE));
    raw = MAP_FAILED;
    for (size_t i = 0; i < npages; i++) offs[i] = NO_PAGE;
    *v = (struct valloc){ .base = base, .npages = npages, .memfd = fd, .page_off = offs };
    if ((type & MEM_COMMIT) && valloc_commit(v, 0, npages, prot)) {
        t_last_error = win32_from_errno(errno);
        munmap(base, npages * PAGE);
        goto fail;
    }
    v->next = g_vallocs;
    g_vallocs = v;
    pthread_mutex_unlock(&g_lock);
    return base;
fail:
    if (raw != MAP_FAILED) munmap(raw, span);
    if (fd >= 0) close(fd);
    free(offs);
    free(v);
    pthread_mutex_unlock(&g_lock);
    return NULL;
}

API WINBOOL WINAPI VirtualFree(LPVOID addr, SIZE_T size, DWORD type) {
    pthread_mutex_lock(&g_lock);
    struct valloc *v = addr ? valloc_find(addr) : NULL;
    BOOL ok = FALSE;
    if (type == MEM_RELEASE) {
        if (size != 0) t_last_error = ERROR_INVALID_PARAMETER;
        else if (!v || v->base != addr) t_last_error = ERROR_INVALID_ADDRESS;
        else {
            struct valloc **pp = &g_vallocs;
            while (*pp != v) pp = &(*pp)->next;
            *pp = v->next;
            /* Aliases keep the memfd's pages alive: a guest still mapping them keeps them. */
            for (struct whv_partition *p = g_parts; p; p = p->next)
                for (struct gpa_map *m = p->maps; m; m = m->next)
                    if (m->va == v) m->va = NULL;
            munmap(v->base, v->npages * PAGE);
            close(v->memfd);
            free(v->page_off);
            free(v);
            ok = TRUE;
        }
    } else if (type == MEM_DECOMMIT) {
        uint8_t *a = (uint8_t *)((uintptr_t)addr & ~(PAGE - 1));
        uint8_t *end = size ? (uint8_t *)(((uintptr_t)addr + size + PAGE - 1) & ~(PAGE - 1))
                            : (v && v->base == addr ? v->base + v->npages * PAGE : NULL);
        if (!v || !end || end > v->base + v->npages * PAGE) t_last_error = ERROR_INVALID_ADDRESS;
        else {
            valloc_decommit(v, (a - v->base) / PAGE, (end - v->base) / PAGE);
            ok = TRUE;
        }
    } else {
        t_last_error = ERROR_INVALID_PARAMETER;
    }
    pthread_mutex_unlock(&g_lock);
    return ok;
}

/* ======================================================================================
 * Handles: files, file mappings, views; CRT descriptors
 * ====================================================================================== */

enum { H_FILE = 1, H_MAPPING = 2 };
struct whandle {
    uint32_t magic;
    int kind;
    int fd;                 /* owned */
    uint64_t size;          /* H_MAPPING: section size */
    DWORD protect;          /* H_MAPPING */
    struct whandle *next;
};
static struct whandle *g_handles;

struct view { uint8_t *addr; size_t size; int writable; struct view *next; };
static struct view *g_views;

/* _get_osfhandle: the descriptor itself. Real handles are heap pointers (>= 64 KiB), so a
 * value below 65536 is a CRT descriptor. */
API intptr_t _get_osfhandle(int fd) {
    if (fd < 0 || fcntl(fd, F_GETFD) < 0) { errno = EBADF; return -1; }
    return fd;
}
static int is_fd_handle(HANDLE h) { return (uintptr_t)h < 65536; }

static struct whandle *handle_get(HANDLE h, int kind) {   /* g_lock held */
    for (struct whandle *w = g_handles; w; w = w->next)
        if (w == h && w->magic == HANDLE_MAGIC && (!kind || w->kind == kind)) return w;
    return NULL;
}
static HANDLE handle_new(int kind, int fd, uint64_t size, DWORD protect) {
    struct whandle *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    *w = (struct whandle){ HANDLE_MAGIC, kind, fd, size, protect, NULL };
    pthread_mutex_lock(&g_lock);
    w->next = g_handles;
    g_handles = w;
    pthread_mutex_unlock(&g_lock);
    return w;
}
/* The descriptor behind a file handle or a CRT descriptor handle, or -1. */
static int file_fd(HANDLE h) {
    if (h == INVALID_HANDLE_VALUE || !h) return -1;
    if (is_fd_handle(h)) return fcntl((int)(intptr_t)h, F_GETFD) < 0 ? -1 : (int)(intptr_t)h;
    pthread_mutex_lock(&g_lock);
    struct whandle *w = handle_get(h, H_FILE);
    int fd = w ? w->fd : -1;
    pthread_mutex_unlock(&g_lock);
    return fd;
}

/* wchar_t is UTF-32 on Linux: encode as UTF-8 for open(). */
static char *utf8_from_wide(LPCWSTR s) {
    size_t n = 0;
    while (s[n]) n++;
    char *out = malloc(n * 4 + 1), *o = out;
    if (!out) return NULL;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = (uint32_t)s[i];
        if (c >= 0xD800 && c < 0xE000) c = 0xFFFD;
        if (c < 0x80) *o++ = (char)c;
        else if (c < 0x800) { *o++ = (char)(0xC0 | c >> 6); *o++ = (char)(0x80 | (c & 63)); }
        else if (c < 0x10000) { *o++ = (char)(0xE0 | c >> 12); *o++ = (char)(0x80 | (c >> 6 & 63)); *o++ = (char)(0x80 | (c & 63)); }
        else if (c < 0x110000) { *o++ = (char)(0xF0 | c >> 18); *o++ = (char)(0x80 | (c >> 12 & 63)); *o++ = (char)(0x80 | (c >> 6 & 63)); *o++ = (char)(0x80 | (c & 63)); }
        else { free(out); return NULL; }
    }
    *o = 0;
    return out;
}

/* Share modes are not enforced (Linux has no mandatory sharing). */
API HANDLE WINAPI CreateFileW(LPCWSTR name, DWORD access, DWORD share, LPSECURITY_ATTRIBUTES sa,
                              DWORD disposition, DWORD flags, HANDLE tmpl) {
    (void)share; (void)sa; (void)flags; (void)tmpl;
    int oflags = O_CLOEXEC;
    int rd = (access & GENERIC_READ) != 0, wr = (access & GENERIC_WRITE) != 0;
    oflags |= rd && wr ? O_RDWR : wr ? O_WRONLY : O_RDONLY;
    switch (disposition) {
    case CREATE_NEW: oflags |= O_CREAT | O_EXCL; break;
    case CREATE_ALWAYS: oflags |= O_CREAT | O_TRUNC; break;
    case OPEN_EXISTING: break;
    case OPEN_ALWAYS: oflags |= O_CREAT; break;
    case TRUNCATE_EXISTING: oflags |= O_TRUNC; break;
    default: t_last_error = ERROR_INVALID_PARAMETER; return INVALID_HANDLE_VALUE;
    }
    if (!name) { t_last_error = ERROR_INVALID_PARAMETER; return INVALID_HANDLE_VALUE; }
    char *path = utf8_from_wide(name);
    if (!path) { t_last_error = ERROR_INVALID_NAME; return INVALID_HANDLE_VALUE; }
    int fd = open(path, oflags, 0666);
    int err = errno;
    free(path);
    if (fd < 0) { t_last_error = win32_from_errno(err); return INVALID_HANDLE_VALUE; }
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {   /* Windows: directories need a flag */
        close(fd);
        t_last_error = ERROR_ACCESS_DENIED;
        return INVALID_HANDLE_VALUE;
    }
    HANDLE h = handle_new(H_FILE, fd, 0, 0);
    if (!h) { close(fd); t_last_error = ERROR_NOT_ENOUGH_MEMORY; return INVALID_HANDLE_VALUE; }
    t_last_error = 0;
    return h;
}

API WINBOOL WINAPI GetFileSizeEx(HANDLE h, PLARGE_INTEGER size) {
    int fd = file_fd(h);
    struct stat st;
    if (fd < 0) return fail_win32(ERROR_INVALID_HANDLE);
    if (!size) return fail_win32(ERROR_INVALID_PARAMETER);
    if (fstat(fd, &st)) return fail_win32(win32_from_errno(errno));
    size->QuadPart = st.st_size;
    return TRUE;
}

/* Sections: a file (handle or CRT descriptor) or, with INVALID_HANDLE_VALUE, pagefile-backed
 * memory (a memfd). The section holds its own descriptor, so the file may be closed first, as
 * on Windows. Named sections are not supported. */
API HANDLE WINAPI CreateFileMappingW(HANDLE file, LPSECURITY_ATTRIBUTES sa, DWORD protect, DWORD size_hi,
                                     DWORD size_lo, LPCWSTR name) {
    (void)sa;
    uint64_t max = ((uint64_t)size_hi << 32) | size_lo;
    DWORD prot = protect & 0xFF;   /* SEC_* flags ignored */
    if (name || (prot != PAGE_READONLY && prot != PAGE_READWRITE && prot != PAGE_WRITECOPY &&
                 prot != PAGE_EXECUTE_READ && prot != PAGE_EXECUTE_READWRITE)) {
        t_last_error = ERROR_INVALID_PARAMETER;
        return NULL;
    }
    int writable = prot == PAGE_READWRITE || prot == PAGE_EXECUTE_READWRITE;
    int fd;
    if (file == INVALID_HANDLE_VALUE) {
        if (!max) { t_last_error = ERROR_INVALID_PARAMETER; return NULL; }
        fd = memfd_create("whv-section", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, (off_t)max)) {
            t_last_error = win32_from_errno(errno);
            if (fd >= 0) close(fd);
            return NULL;
        }
    } else {
        int src = file_fd(file);
        struct stat st;
        if (src < 0) { t_last_error = ERROR_INVALID_HANDLE; return NULL; }
        int acc = fcntl(src, F_GETFL) & O_ACCMODE;
        if (acc == O_WRONLY || (writable && acc != O_RDWR)) { t_last_error = ERROR_ACCESS_DENIED; return NULL; }
        if (fstat(src, &st)) { t_last_error = win32_from_errno(errno); return NULL; }
        if (!max) max = (uint64_t)st.st_size;
        if (!max) { t_last_error = ERROR_FILE_INVALID; return NULL; }   /* empty file */
        if (max > (uint64_t)st.st_size) {
            /* Windows grows the file for writable sections, refuses read-only ones. */
            if (!writable) { t_last_error = ERROR_NOT_ENOUGH_MEMORY; return NULL; }
            if (ftruncate(src, (off_t)max)) { t_last_error = ERROR_DISK_FULL; return NULL; }
        }
        fd = fcntl(src, F_DUPFD_CLOEXEC, 3);
        if (fd < 0) { t_last_error = win32_from_errno(errno); return NULL; }
    }
    HANDLE h = handle_new(H_MAPPING, fd, max, prot);
    if (!h) { close(fd); t_last_error = ERROR_NOT_ENOUGH_MEMORY; return NULL; }
    t_last_error = 0;
    return h;
}

API LPVOID WINAPI MapViewOfFile(HANDLE mapping, DWORD access, DWORD off_hi, DWORD off_lo, SIZE_T bytes) {
    uint64_t off = ((uint64_t)off_hi << 32) | off_lo;
    pthread_mutex_lock(&g_lock);
    struct whandle *w = handle_get(mapping, H_MAPPING);
    int fd = w ? w->fd : -1;
    uint64_t secsize = w ? w->size : 0;
    DWORD sprot = w ? w->protect : 0;
    pthread_mutex_unlock(&g_lock);
    if (!w) { t_last_error = ERROR_INVALID_HANDLE; return NULL; }
    if (off % ALLOC_GRANULARITY) { t_last_error = ERROR_MAPPED_ALIGNMENT; return NULL; }
    if (off >= secsize || (bytes && bytes > secsize - off)) { t_last_error = ERROR_ACCESS_DENIED; return NULL; }
    if (!bytes) bytes = secsize - off;
    int prot, flags;
    int sec_writable = sprot == PAGE_READWRITE || sprot == PAGE_EXECUTE_READWRITE;
    if (access & FILE_MAP_COPY && !(access & FILE_MAP_WRITE)) {
        prot = PROT_READ | PROT_WRITE; flags = MAP_PRIVATE;          /* copy-on-write view */
    } else if (access & FILE_MAP_WRITE) {
        if (!sec_writable) { t_last_error = ERROR_ACCESS_DENIED; return NULL; }
        prot = PROT_READ | PROT_WRITE; flags = MAP_SHARED;
    } else if (access & FILE_MAP_READ) {
        prot = PROT_READ; flags = MAP_SHARED;
    } else {
        t_last_error = ERROR_INVALID_PARAMETER;
        return NULL;
    }
    struct view *vw = malloc(sizeof *vw);
    void *p = vw ? mmap(NULL, bytes, prot, flags, fd, (off_t)off) : MAP_FAILED;
    if (p == MAP_FAILED) { free(vw); t_last_error = vw ? win32_from_errno(errno) : ERROR_NOT_ENOUGH_MEMORY; return NULL; }
    pthread_mutex_lock(&g_lock);
    *vw = (struct view){ p, bytes, (prot & PROT_WRITE) != 0, g_views };
    g_views = vw;
    pthread_mutex_unlock(&g_lock);
    return p;
}

API WINBOOL WINAPI UnmapViewOfFile(LPCVOID addr) {
    pthread_mutex_lock(&g_lock);
    struct view **pp = &g_views, *vw;
    while ((vw = *pp) && vw->addr != addr) pp = &vw->next;
    if (vw) *pp = vw->next;
    pthread_mutex_unlock(&g_lock);
    if (!vw) return fail_win32(ERROR_INVALID_ADDRESS);
    munmap(vw->addr, vw->size);
    free(vw);
    return TRUE;
}

API WINBOOL WINAPI CloseHandle(HANDLE h) {
    if (h && h != INVALID_HANDLE_VALUE && is_fd_handle(h)) {
        /* A handle from _get_osfhandle belongs to the CRT descriptor: on Windows closing it
         * here is a bug (the later _close fails or closes someone else's handle). Refuse loudly
         * rather than close Python's descriptor. */
        fprintf(stderr, "whv_kvm: CloseHandle() on a CRT descriptor handle (%d): close the fd instead\n",
                (int)(intptr_t)h);
        return fail_win32(ERROR_INVALID_HANDLE);
    }
    pthread_mutex_lock(&g_lock);
    struct whandle **pp = &g_handles, *w;
    while ((w = *pp) && w != h) pp = &w->next;
    if (w) *pp = w->next;
    pthread_mutex_unlock(&g_lock);
    if (!w) return fail_win32(ERROR_INVALID_HANDLE);
    close(w->fd);
    w->magic = 0;
    free(w);
    return TRUE;
}

API HANDLE WINAPI GetCurrentProcess(VOID) { return (HANDLE)(LONG_PTR)-1; }

/* ======================================================================================
 * Timer queue (default queue only) and performance counter
 * ====================================================================================== */

/* One helper thread serves the default timer queue; callbacks run on it (never on the thread
 * that armed the timer), like a Windows timer-queue worker. */
struct wtimer {
    uint32_t magic;
    WAITORTIMERCALLBACK cb;
    PVOID param;
    uint64_t due_ns, period_ns;
    int armed, running, orphan;  /* orphan: deleted while its callback ran (freed afterwards) */
    struct wtimer *next;
};
static pthread_mutex_t tq_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t tq_wake, tq_done;
static struct wtimer *tq_list;
static int tq_started;
static pthread_t tq_thread;

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void tq_unlink(struct wtimer *t) {
    struct wtimer **pp = &tq_list;
    while (*pp && *pp != t) pp = &(*pp)->next;
    if (*pp) *pp = t->next;
}

static void *tq_main(void *arg) {
    (void)arg;
    pthread_mutex_lock(&tq_lock);
    for (;;) {
        struct wtimer *next = NULL;
        for (struct wtimer *t = tq_list; t; t = t->next)
            if (t->armed && (!next || t->due_ns < next->due_ns)) next = t;
        uint64_t now = mono_ns();
        if (!next) {
            pthread_cond_wait(&tq_wake, &tq_lock);
        } else if (next->due_ns > now) {
            struct timespec ts = { (time_t)(next->due_ns / 1000000000ull), (long)(next->due_ns % 1000000000ull) };
            pthread_cond_timedwait(&tq_wake, &tq_lock, &ts);
        } else {
            if (next->period_ns) next->due_ns = now + next->period_ns;
            else next->armed = 0;
            next->running = 1;
            pthread_mutex_unlock(&tq_lock);
            next->cb(next->param, TRUE);
            pthread_mutex_lock(&tq_lock);
            next->running = 0;
            if (next->orphan) { tq_unlink(next); next->magic = 0; free(next); }
            pthread_cond_broadcast(&tq_done);
        }
    }
    return NULL;
}

API WINBOOL WINAPI CreateTimerQueueTimer(PHANDLE out, HANDLE queue, WAITORTIMERCALLBACK cb, PVOID param,
                                         DWORD due_ms, DWORD period_ms, ULONG flags) {
    if (!out || !cb || queue) return fail_win32(ERROR_INVALID_PARAMETER);   /* default queue only */
    struct wtimer *t = calloc(1, sizeof *t);
    if (!t) return fail_win32(ERROR_NOT_ENOUGH_MEMORY);
    t->magic = HANDLE_MAGIC;
    t->cb = cb;
    t->param = param;
    t->period_ns = (flags & WT_EXECUTEONLYONCE) ? 0 : (uint64_t)period_ms * 1000000ull;
    pthread_mutex_lock(&tq_lock);
    if (!tq_started) {
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&tq_wake, &ca);
        pthread_cond_init(&tq_done, NULL);
        sigset_t all, old;   /* the helper thread takes no process signals */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        int rc = pthread_create(&tq_thread, NULL, tq_main, NULL);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (rc) { pthread_mutex_unlock(&tq_lock); free(t); return fail_win32(ERROR_NOT_ENOUGH_MEMORY); }
        pthread_detach(tq_thread);
        tq_started = 1;
    }
    t->due_ns = mono_ns() + (uint64_t)due_ms * 1000000ull;
    t->armed = 1;
    t->next = tq_list;
    tq_list = t;
    pthread_cond_signal(&tq_wake);
    pthread_mutex_unlock(&tq_lock);
    *out = t;
    return TRUE;
}

/* CompletionEvent INVALID_HANDLE_VALUE: wait for a running callback, then delete (calling that
 * from the callback itself deadlocks, as on Windows). NULL: delete now; if the callback is
 * running, return FALSE with ERROR_IO_PENDING and free it when the callback returns. Event
 * handles are not supported. */
API WINBOOL WINAPI DeleteTimerQueueTimer(HANDLE queue, HANDLE timer, HANDLE event) {
    if (queue || (event && event != INVALID_HANDLE_VALUE)) return fail_win32(ERROR_INVALID_PARAMETER);
    pthread_mutex_lock(&tq_lock);
    struct wtimer *t = tq_list;
    while (t && (HANDLE)t != timer) t = t->next;
    if (!t || t->orphan) { pthread_mutex_unlock(&tq_lock); return fail_win32(ERROR_INVALID_PARAMETER); }
    t->armed = 0;
    if (t->running && event == NULL) {
        t->orphan = 1;
        pthread_mutex_unlock(&tq_lock);
        return fail_win32(ERROR_IO_PENDING);
    }
    while (t->running) pthread_cond_wait(&tq_done, &tq_lock);
    tq_unlink(t);
    t->magic = 0;
    free(t);
    pthread_mutex_unlock(&tq_lock);
    return TRUE;
}

API WINBOOL WINAPI QueryPerformanceCounter(LARGE_INTEGER *c) {
    if (!c) return fail_win32(ERROR_INVALID_PARAMETER);
    c->QuadPart = (LONGLONG)mono_ns();
    return TRUE;
}
/* 1 GHz (nanoseconds), deliberately not Windows' usual 10 MHz: code must use the frequency. */
API WINBOOL WINAPI QueryPerformanceFrequency(LARGE_INTEGER *f) {
    if (!f) return fail_win32(ERROR_INVALID_PARAMETER);
    f->QuadPart = 1000000000;
    return TRUE;
}

/* ======================================================================================
 * Partitions
 * ====================================================================================== */

static struct whv_partition *part_get(WHV_PARTITION_HANDLE h) {   /* g_lock held */
    for (struct whv_partition *p = g_parts; p; p = p->next)
        if (p == h && p->magic == PART_MAGIC) return p;
    return NULL;
}

/* Looks up partition + VP with g_lock held; on success the caller must unlock. */
static HRESULT vp_get(WHV_PARTITION_HANDLE h, UINT32 idx, struct whv_partition **pp, struct whv_vp **vpp) {
    pthread_mutex_lock(&g_lock);
    struct whv_partition *p = part_get(h);
    if (!p) { pthread_mutex_unlock(&g_lock); return E_HANDLE; }
    if (idx >= MAX_VPS || idx >= p->nvp || p->vps[idx].fd < 0 || p->vps[idx].deleted) {
        pthread_mutex_unlock(&g_lock);
        return WHV_E_VP_DOES_NOT_EXIST;
    }
    *pp = p;
    *vpp = &p->vps[idx];
    return S_OK;
}

API HRESULT WINAPI WHvGetCapability(WHV_CAPABILITY_CODE code, VOID *buf, UINT32 size, UINT32 *written) {
    WHV_CAPABILITY cap;
    UINT32 n;
    memset(&cap, 0, sizeof cap);
    int present = kvm_ready();
    switch (code) {
    case WHvCapabilityCodeHypervisorPresent:
        cap.HypervisorPresent = present;
        n = sizeof(WINBOOL);
        break;
    case WHvCapabilityCodeFeatures:
        cap.Features.Xsave = 1;
        cap.Features.DirtyPageTracking = 1;   /* PartialUnmap, LocalApicEmulation: 0 */
        n = sizeof(UINT64);
        break;
    case WHvCapabilityCodeExtendedVmExits:   /* none are delivered (see README) */
    case WHvCapabilityCodeExceptionExitBitmap:
        n = sizeof(UINT64);
        break;
    case WHvCapabilityCodeProcessorVendor: {
        struct kvm_cpuid_entry2 *e = present ? cpuid_find(0, 0) : NULL;
        if (!e) return WHV_E_UNKNOWN_CAPABILITY;
        cap.ProcessorVendor = e->ebx == 0x68747541 ? WHvProcessorVendorAmd      /* "Auth" */
                            : e->ebx == 0x6f677948 ? WHvProcessorVendorHygon    /* "Hygo" */
                                                   : WHvProcessorVendorIntel;
        n = sizeof(WHV_PROCESSOR_VENDOR);
        break;
    }
    case WHvCapabilityCodeProcessorXsaveFeatures:
        cap.ProcessorXsaveFeatures.XsaveSupport = (g_xmask & ~3ull) != 0;
        cap.ProcessorXsaveFeatures.AvxSupport = (g_xmask >> 2) & 1;
        cap.ProcessorXsaveFeatures.XsaveCompSupport = 1;
        n = sizeof(UINT64);
        break;
    case WHvCapabilityCodeProcessorClFlushSize: {
        struct kvm_cpuid_entry2 *e = present ? cpuid_find(1, 0) : NULL;
        if (!e) return WHV_E_UNKNOWN_CAPABILITY;
        cap.ProcessorClFlushSize = (UINT8)(e->ebx >> 8);
        n = sizeof(UINT8);
        break;
    }
    default:
        return WHV_E_UNKNOWN_CAPABILITY;
    }
    if (written) *written = n;
    if (!buf || size < n) return WHV_E_INSUFFICIENT_BUFFER;
    memcpy(buf, &cap, n);
    return S_OK;
}

API HRESULT WINAPI WHvCreatePartition(WHV_PARTITION_HANDLE *out) {
    if (!out) return E_POINTER;
    if (!kvm_ready()) return HRESULT_FROM_WIN32(win32_from_errno(g_kvm_errno));
    struct whv_partition *p = calloc(1, sizeof *p);
    if (!p) return E_OUTOFMEMORY;
    p->vm_fd = kvm_ioctl(g_kvm_fd, KVM_CREATE_VM, 0);
    if (p->vm_fd < 0) { int e = errno; free(p); return hr_errno(e); }
    fcntl(p->vm_fd, F_SETFD, FD_CLOEXEC);
    /* WHP keeps two event slots: PendingInterruption (the event the next entry injects: KVM's
     * exception/nmi/interrupt.injected) and PendingEvent (an exception raised but not yet
     * injected, with its parameter: KVM's exception.pending + payload, which KVM reports apart
     * from .injected only with this capability). */
    struct kvm_enable_cap payload_cap = { .cap = KVM_CAP_EXCEPTION_PAYLOAD, .args = { 1 } };
    p->exception_payload = kvm_ioctl(p->vm_fd, KVM_ENABLE_CAP, &payload_cap) == 0;
    for (int i = 0; i < MAX_VPS; i++) p->vps[i].fd = -1;
    p->magic = PART_MAGIC;
    pthread_mutex_lock(&g_lock);
    p->next = g_parts;
    g_parts = p;
    pthread_mutex_unlock(&g_lock);
    *out = p;
    return S_OK;
}

API HRESULT WINAPI WHvSetPartitionProperty(WHV_PARTITION_HANDLE h, WHV_PARTITION_PROPERTY_CODE code,
                                           const VOID *buf, UINT32 size) {
    HRESULT hr = S_OK;
    pthread_mutex_lock(&g_lock);
    struct whv_partition *p = part_get(h);
    if (!p) hr = E_HANDLE;
    else if (!buf) hr = E_POINTER;
    else switch (code) {
    case WHvPartitionPropertyCodeProcessorCount: {
        UINT32 n;
        if (size < sizeof n) { hr = E_INVALIDARG; break; }
        memcpy(&n, buf, sizeof n);
        /* WHP: fixed once the partition is set up. */
        if (p->setup) hr = WHV_E_INVALID_PARTITION_CONFIG;
        else if (n == 0 || n > MAX_VPS) hr = E_INVALIDARG;
        else p->nvp = n;
        break;
    }
    case WHvPartitionPropertyCodeExtendedVmExits:
        /* Accepted and stored; no extended exit is ever delivered (capability reports 0). */
        if (size < sizeof(UINT64)) hr = E_INVALIDARG;
        else memcpy(&p->ext_exits, buf, sizeof(UINT64));
        break;
    case WHvPartitionPropertyCodeExceptionExitBitmap:
        if (size < sizeof(UINT64)) hr = E_INVALIDARG;
        else memcpy(&p->exc_bitmap, buf, sizeof(UINT64));
        break;
    case WHvPartitionPropertyCodeSeparateSecurityDomain:
    case WHvPartitionPropertyCodeNestedVirtualization:
    case WHvPartitionPropertyCodeX64MsrExitBitmap:
    case WHvPartitionPropertyCodeLocalApicEmulationMode:
    case WHvPartitionPropertyCodeCpuidExitList:
    case WHvPartitionPropertyCodeProcessorFeatures:
    case WHvPartitionPropertyCodeProcessorFeaturesBanks:
    case WHvPartitionPropertyCodeProcessorXsaveFeatures:
        break;   /* accepted, ignored */
    default:
        hr = WHV_E_UNKNOWN_PROPERTY;
    }
    pthread_mutex_unlock(&g_lock);
    return hr;
}

API HRESULT WINAPI WHvGetPartitionProperty(WHV_PARTITION_HANDLE h, WHV_PARTITION_PROPERTY_CODE code,
                                           VOID *buf, UINT32 size, UINT32 *written) {
    HRESULT hr = S_OK;
    UINT64 v = 0;
    UINT32 n = 0;
    pthread_mutex_lock(&g_lock);
    struct whv_partition *p = part_get(h);
    if (!p) hr = E_HANDLE;
    else if (code == WHvPartitionPropertyCodeProcessorCount) { v = p->nvp; n = sizeof(UINT32); }
    else if (code == WHvPartitionPropertyCodeExtendedVmExits) { v = p->ext_exits; n = sizeof(UINT64); }
    else if (code == WHvPartitionPropertyCodeExceptionExitBitmap) { v = p->exc_bitmap; n = sizeof(UINT64); }
    else hr = WHV_E_UNKNOWN_PROPERTY;
    pthread_mutex_unlock(&g_lock);
    if (FAILED(hr)) return hr;
    if (written) *written = n;
    if (!buf || size < n) return WHV_E_INSUFFICIENT_BUFFER;
    memcpy(buf, &v, n);   /* little endian: the low n bytes */
    return S_OK;
}

API HRESULT WINAPI WHvSetupPartition(WHV_PARTITION_HANDLE h) {
    HRESULT hr = S_OK;
    pthread_mutex_lock(&g_lock);
    struct whv_partition *p = part_get(h);
    if (!p) hr = E_HANDLE;
    else if (p->setup || !p->nvp) hr = WHV_E_INVALID_PARTITION_CONFIG;   /* WHP: ProcessorCount required */
    else p->setup = 1;
    pthread_mutex_unlock(&g_lock);
    return hr;
}

static void map_destroy(struct whv_partition *p, struct gpa_map *m, int remove_slot) {
    if (remove_slot) {
        struct kvm_userspace_memory_region r = { .slot = m->slot, .guest_phys_addr = m->gpa };
        kvm_ioctl(p->vm_fd, KVM_SET_USER_MEMORY_REGION, &r);
    }
    if (m->guest != m->host) {
        munmap(m->guest, m->size);
        /* File pages only this alias still showed (the host decommitted them) are freed now. */
        struct valloc *v = m->va;
        m->va = NULL;   /* so offset_in_use ignores this alias */
        for (uint64_t i = 0; v && i < m->size / PAGE; i++) {
            uint64_t idx = m->first_page + i;
            if (v->page_off[idx] != m->offs[i] && !offset_in_use(v, idx, m->offs[i]))
                release_file_page(v, m->offs[i]);
        }
    }
    free(m->offs);
    free(m->dirty);
    free(m->dirty_tmp);
    free(m->stale);
    free(m);
}

API HRESULT WINAPI WHvDeletePartition(WHV_PARTITION_HANDLE h) {
    pthread_mutex_lock(&g_lock);
    struct whv_partition *p = part_get(h);
    if (!p) { pthread_mutex_unlock(&g_lock); return E_HANDLE; }
    struct whv_partition **pp = &g_parts;
    while (*pp != p) pp = &(*pp)->next;
    *pp = p->next;
    for (int i = 0; i < MAX_VPS; i++)
        if (p->vps[i].fd >= 0) { munmap(p->vps[i].run, (size_t)g_run_size); close(p->vps[i].fd); }
    while (p->maps) {
        struct gpa_map *m = p->maps;
        p->maps = m->next;
        map_destroy(p, m, 0);
    }
    close(p->vm_fd);
    p->magic = 0;
    pthread_mutex_unlock(&g_lock);
    free(p);
    return S_OK;
}

/* ======================================================================================
 * Guest physical memory
 * ====================================================================================== */

static struct gpa_map *map_find(struct whv_partition *p, uint64_t gpa) {
    for (struct gpa_map *m = p->maps; m; m = m->next)
        if (gpa >= m->gpa && gpa - m->gpa < m->size) return m;
    return NULL;
}

static HRESULT map_range(WHV_PARTITION_HANDLE h, VOID *src, WHV_GUEST_PHYSICAL_ADDRESS gpa, UINT64 size,
                         WHV_MAP_GPA_RANGE_FLAGS flags) {
    uint8_t *host = src;
    if (!size || (gpa | size | (uintptr_t)host) & (PAGE - 1) || gpa + size < gpa ||
        (flags & ~0xFu) || !(flags & (WHvMapGpaRangeFlagRead | WHvMapGpaRangeFlagWrite | WHvMapGpaRangeFlagExecute)))
        return E_INVALIDARG;
    pthread_mutex_lock(&g_lock);
    HRESULT hr = S_OK;
    struct whv_partition *p = part_get(h);
    struct gpa_map *m = NULL;
    if (!p) { hr = E_HANDLE; goto out; }
    if (!p->setup) { hr = WHV_E_INVALID_PARTITION_CONFIG; goto out; }
    for (struct gpa_map *o = p->maps; o; o = o->next)
        if (gpa < o->gpa + o->size && o->gpa < gpa + size) { hr = E_INVALIDARG; goto out; }   /* overlap */
    m = calloc(1, sizeof *m);
    if (!m) { hr = E_OUTOFMEMORY; goto out; }
    m->gpa = gpa; m->size = size; m->flags = flags; m->host = host; m->guest = host;
    /* lowest free slot */
    for (uint32_t s = 0;; s++) {
        struct gpa_map *o = p->maps;
        while (o && o->slot != s) o = o->next;
        if (!o) { m->slot = s; break; }
    }
    int prot = PROT_READ | ((flags & WHvMapGpaRangeFlagWrite) ? PROT_WRITE : 0);
    /* A read-only view (FILE_MAP_READ) cannot be given to the guest writable. */
    for (struct view *vw = g_views; vw && (flags & WHvMapGpaRangeFlagWrite); vw = vw->next)
        if (host < vw->addr + vw->size && vw->addr < host + size && !vw->writable) { hr = E_ACCESSDENIED; goto out; }
    struct valloc *v = valloc_find(host);
    if (v) {
        /* VirtualAlloc memory: KVM gets an alias of the pages committed right now. */
        uint64_t first = (uint64_t)(host - v->base) / PAGE, n = size / PAGE;
        if (first + n > v->npages) { hr = E_INVALIDARG; goto out; }
        m->offs = malloc(n * sizeof(uint64_t));
        if (!m->offs) { hr = E_OUTOFMEMORY; goto out; }
        for (uint64_t i = 0; i < n; i++)
            if ((m->offs[i] = v->page_off[first + i]) == NO_PAGE) { hr = E_INVALIDARG; goto out; }   /* not committed */
        uint8_t *alias = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (alias == MAP_FAILED) { hr = E_OUTOFMEMORY; goto out; }
        m->guest = alias;
        for (uint64_t i = 0, j; i < n; i = j) {   /* one mmap per run of consecutive file pages */
            for (j = i + 1; j < n && m->offs[j] == m->offs[j - 1] + 1; j++) {}
            if (mmap(alias + i * PAGE, (j - i) * PAGE, prot, MAP_SHARED | MAP_FIXED, v->memfd,
                     (off_t)(m->offs[i] * PAGE)) == MAP_FAILED) { hr = hr_errno(errno); goto out; }
        }
        m->va = v;
        m->first_page = first;
    }
    if (flags & WHvMapGpaRangeFlagTrackDirtyPages) {
        size_t words = (size / PAGE + 63) / 64;
        m->dirty = calloc(words, 8);
        m->dirty_tmp = calloc(words, 8);
        if (!m->dirty || !m->dirty_tmp) { hr = E_OUTOFMEMORY; goto out; }
    }
    /* Write absent -> KVM_MEM_READONLY: guest writes exit (MemoryAccess). Execute cannot be
     * withheld on KVM. */
    struct kvm_userspace_memory_region r = {
        .slot = m->slot, .guest_phys_addr = gpa, .memory_size = size, .userspace_addr = (uintptr_t)m->guest,
        .flags = ((flags & WHvMapGpaRangeFlagWrite) ? 0 : KVM_MEM_READONLY) |
                 ((flags & WHvMapGpaRangeFlagTrackDirtyPages) ? KVM_MEM_LOG_DIRTY_PAGES : 0),
    };
    if (kvm_ioctl(p->vm_fd, KVM_SET_USER_MEMORY_REGION, &r)) { hr = hr_errno(errno); goto out; }
    m->next = p->maps;
    p->maps = m;
    m = NULL;
out:
    if (m) map_destroy(p, m, 0);
    pthread_mutex_unlock(&g_lock);
    return hr;
}

API HRESULT WINAPI WHvMapGpaRange(WHV_PARTITION_HANDLE h, VOID *src, WHV_GUEST_PHYSICAL_ADDRESS gpa, UINT64 size,
                                  WHV_MAP_GPA_RANGE_FLAGS flags) {
    return map_range(h, src, gpa, size, flags);
}

/* Only the current process (GetCurrentProcess()) can be the source here. */
API HRESULT WINAPI WHvMapGpaRange2(WHV_PARTITION_HANDLE h, HANDLE process, VOID *src, WHV_GUEST_PHYSICAL_ADDRESS gpa,
                                   UINT64 size, WHV_MAP_GPA_RANGE_FLAGS flags) {
    if (process != GetCurrentProcess()) return E_INVALIDARG;
    return map_range(h, src, gpa, size, flags);
}

/* The range must be exactly a union of whole mappings (no partial unmap: the Features
 * capability reports PartialUnmap = 0). */
API HRESULT WINAPI WHvUnmapGpaRange(WHV_PARTITION_HANDLE h, WHV_GUEST_PHYSICAL_ADDRESS gpa, UINT64 size) {
    pthread_mutex_lock(&g_lock);
    struct whv_partition *p = part_get(h);
    HRESULT hr = S_OK;
    uint64_t covered = 0;
    if (!p) { hr = E_HANDLE; goto out; }
    for (struct gpa_map *m = p->maps; m; m = m->next) {
        if (m->gpa >= gpa + size || gpa >= m->gpa + m->size) continue;
        if (m->gpa < gpa || m->gpa + m->size > gpa + size) { hr = WHV_E_GPA_RANGE_NOT_FOUND; goto out; }
        covered += m->size;
    }
    if (!size || covered != size) { hr = WHV_E_GPA_RANGE_NOT_FOUND; goto out; }
    for (struct gpa_map **pp = &p->maps; *pp;) {
        struct gpa_map *m = *pp;
        if (m->gpa >= gpa && m->gpa + m->size <= gpa + size) { *pp = m->next; map_destroy(p, m, 1); }
        else pp = &m->next;
    }
out:
    pthread_mutex_unlock(&g_lock);
    return hr;
}

/* WHP: reading the dirty bitmap of a range also clears it, for that range only. KVM's legacy
 * KVM_GET_DIRTY_LOG (manual protect NOT enabled) reads and clears the whole slot, so the bits
 * are accumulated per slot here and a query takes out just its sub-range; the bits of the rest
 * of the slot stay for later queries. */
API HRESULT WINAPI WHvQueryGpaRangeDirtyBitmap(WHV_PARTITION_HANDLE h, WHV_GUEST_PHYSICAL_ADDRESS gpa, UINT64 size,
                                               UINT64 *bitmap, UINT32 bitmap_bytes) {
    if ((gpa | size) & (PAGE - 1) || ((uintptr_t)bitmap & 7) || (bitmap_bytes && !bitmap)) return E_INVALIDARG;
    uint64_t n = size / PAGE, out_words = (n + 63) / 64;
    if (bitmap_bytes && bitmap_bytes < out_words * 8) return E_INVALIDARG;   /* "at least one bit per page, in UINT64s" */
    pthread_mutex_lock(&g_lock);
    HRESULT hr = S_OK;
    struct whv_partition *p = part_get(h);
    struct gpa_map *m = p ? map_find(p, gpa) : NULL;
    if (!p) hr = E_HANDLE;
    else if (!m || !m->dirty || gpa + size > m->gpa + m->size) hr = WHV_E_GPA_RANGE_NOT_FOUND;
    if (FAILED(hr) || !n) goto out;
    uint64_t slot_pages = m->size / PAGE, words = (slot_pages + 63) / 64;
    struct kvm_dirty_log log = { .slot = m->slot, .dirty_bitmap = m->dirty_tmp };
    if (kvm_ioctl(p->vm_fd, KVM_GET_DIRTY_LOG, &log)) { hr = hr_errno(errno); goto out; }
    for (uint64_t w = 0; w < words; w++) m->dirty[w] |= m->dirty_tmp[w];
    uint64_t first = (gpa - m->gpa) / PAGE;
    if (bitmap_bytes) {          /* bitmap_bytes == 0: clear only */
        memset(bitmap, 0, bitmap_bytes);
        for (uint64_t w = 0; w < out_words; w++) {
            uint64_t bit = first + w * 64, sw = bit / 64, sh = bit % 64;
            uint64_t v = m->dirty[sw] >> sh;
            if (sh && sw + 1 < words) v |= m->dirty[sw + 1] << (64 - sh);
            uint64_t left = n - w * 64;
            bitmap[w] = left >= 64 ? v : v & ((1ull << left) - 1);
        }
    }
    for (uint64_t i = first; i < first + n;) {
        if (i % 64 == 0 && first + n - i >= 64) { m->dirty[i / 64] = 0; i += 64; }
        else { m->dirty[i / 64] &= ~(1ull << (i % 64)); i++; }
    }
out:
    pthread_mutex_unlock(&g_lock);
    return hr;
}

/* Reads guest-physical memory through the guest's own view (the alias). g_lock held. */
static size_t read_gpa(struct whv_partition *p, uint64_t gpa, void *dst, size_t n) {
    size_t done = 0;
    while (done < n) {
        struct gpa_map *m = map_find(p, gpa + done);
        if (!m) break;
        uint64_t off = gpa + done - m->gpa, k = m->size - off;
        if (k > n - done) k = n - done;
        memcpy((uint8_t *)dst + done, m->guest + off, k);
        done += k;
    }
    return done;
}

/* Guest-virtual to guest-physical through the guest's page tables (4- or 5-level long mode,
 * PAE, 32-bit, or paging off). Returns 0 on success. g_lock held. */
static int gva_to_gpa(struct whv_partition *p, const struct kvm_sregs *s, uint64_t va, uint64_t *gpa) {
    uint64_t e = 0, table;
    if (!(s->cr0 & CR0_PG)) { *gpa = va & 0xFFFFFFFFull; return 0; }
    if (s->efer & EFER_LMA || s->cr4 & CR4_PAE) {
        int level;
        if (s->efer & EFER_LMA) {
            level = (s->cr4 & CR4_LA57) ? 5 : 4;
            table = s->cr3 & PTE_ADDR;
        } else {   /* PAE: 4 PDPTEs at CR3, then like long mode from the page directory */
            if (read_gpa(p, (s->cr3 & 0xFFFFFFE0ull) + ((va >> 30) & 3) * 8, &e, 8) != 8 || !(e & 1)) return -1;
            level = 2;
            table = e & PTE_ADDR;
        }
        for (; level >= 1; level--) {
            int shift = 12 + 9 * (level - 1);
            if (read_gpa(p, table + ((va >> shift) & 511) * 8, &e, 8) != 8 || !(e & 1)) return -1;
            if (level == 1 || ((level == 2 || level == 3) && (e & 0x80))) {
                uint64_t mask = (1ull << shift) - 1;
                *gpa = (e & PTE_ADDR & ~mask) | (va & mask);
                return 0;
            }
            table = e & PTE_ADDR;
        }
        return -1;
    }
    uint32_t e32;
    if (read_gpa(p, (s->cr3 & 0xFFFFF000ull) + ((va >> 22) & 1023) * 4, &e32, 4) != 4 || !(e32 & 1)) return -1;
    if ((e32 & 0x80) && (s->cr4 & CR4_PSE)) { *gpa = (e32 & 0xFFC00000u) | (va & 0x3FFFFF); return 0; }
    if (read_gpa(p, (e32 & 0xFFFFF000u) + ((va >> 12) & 1023) * 4, &e32, 4) != 4 || !(e32 & 1)) return -1;
    *gpa = (e32 & 0xFFFFF000u) | (va & 0xFFF);
    return 0;
}

static int long_code(const struct kvm_sregs *s) { return (s->efer & EFER_LMA) && s->cs.l; }

/* Reads up to n bytes of instructions at rip (CS-relative); returns the count read. */
static size_t read_code(struct whv_partition *p, const struct kvm_sregs *s, uint64_t rip, uint8_t *dst, size_t n) {
    uint64_t lin = long_code(s) ? rip : ((s->cs.base + rip) & 0xFFFFFFFFull);
    size_t done = 0;
    while (done < n) {
        uint64_t gpa, k = PAGE - ((lin + done) & (PAGE - 1));
        if (k > n - done) k = n - done;
        if (gva_to_gpa(p, s, lin + done, &gpa) || read_gpa(p, gpa, dst + done, k) != k) break;
        done += k;
    }
    return done;
}

/* ======================================================================================
 * Virtual processors
 * ====================================================================================== */

API HRESULT WINAPI WHvCreateVirtualProcessor(WHV_PARTITION_HANDLE h, UINT32 idx, UINT32 flags) {
    pthread_mutex_lock(&g_lock);
    HRESULT hr = S_OK;
    struct whv_partition *p = part_get(h);
    struct whv_vp *vp;
    if (!p) { hr = E_HANDLE; goto out; }
    if (!p->setup) { hr = WHV_E_INVALID_PARTITION_CONFIG; goto out; }
    if (flags || idx >= p->nvp) { hr = E_INVALIDARG; goto out; }
    vp = &p->vps[idx];
    if (vp->fd >= 0 && !vp->deleted) { hr = WHV_E_VP_ALREADY_EXISTS; goto out; }
    /* KVM cannot destroy a vCPU short of the VM, so a deleted VP index cannot come back. */
    if (vp->deleted) { hr = HRESULT_FROM_WIN32(ERROR_NOT_SUPPORTED); goto out; }
    int fd = kvm_ioctl(p->vm_fd, KVM_CREATE_VCPU, (void *)(uintptr_t)idx);
    if (fd < 0) { hr = hr_errno(errno); goto out; }
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    struct kvm_run *run = mmap(NULL, (size_t)g_run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (run == MAP_FAILED) { hr = hr_errno(errno); close(fd); goto out; }
    /* KVM's supported CPUID (KVM refuses EFER.LME/NXE otherwise). Then the register file goes
     * into kvm_run's sync-regs area once: from now on KVM refreshes it at every exit, so the
     * general, segment and control registers and pending events are read and written there
     * without an ioctl, and writes reach the vCPU with the next KVM_RUN. */
    if (kvm_ioctl(fd, KVM_SET_CPUID2, g_cpuid) || kvm_ioctl(fd, KVM_GET_REGS, &run->s.regs.regs) ||
        kvm_ioctl(fd, KVM_GET_SREGS, &run->s.regs.sregs) || kvm_ioctl(fd, KVM_GET_VCPU_EVENTS, &run->s.regs.events)) {
        hr = hr_errno(errno);
        munmap(run, (size_t)g_run_size);
        close(fd);
        goto out;
    }
    run->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
    run->kvm_dirty_regs = 0;
    vp->fd = fd;
    vp->run = run;
out:
    pthread_mutex_unlock(&g_lock);
    return hr;
}

API HRESULT WINAPI WHvDeleteVirtualProcessor(WHV_PARTITION_HANDLE h, UINT32 idx) {
    struct whv_partition *p;
    struct whv_vp *vp;
    HRESULT hr = vp_get(h, idx, &p, &vp);
    if (FAILED(hr)) return hr;
    if (atomic_load(&vp->running)) hr = WHV_E_INVALID_VP_STATE;
    else vp->deleted = 1;   /* the KVM vCPU stays until the partition goes */
    pthread_mutex_unlock(&g_lock);
    return hr;
}

/* WHP: a cancel from any thread makes a running WHvRunVirtualProcessor return Canceled; a
 * cancel while the VP is not running is remembered and consumed by the next run, which then
 * returns Canceled at once. Protocol: set cancel_pending, then kvm_run->immediate_exit, then
 * signal the thread in KVM_RUN. The run loop clears immediate_exit *before* it checks
 * cancel_pending, so a cancel landing between that check and KVM_RUN still has
 * immediate_exit set and KVM_RUN returns EINTR at once: no cancel is ever lost. */
API HRESULT WINAPI WHvCancelRunVirtualProcessor(WHV_PARTITION_HANDLE h, UINT32 idx, UINT32 flags) {
    struct whv_partition *p;
    struct whv_vp *vp;
    if (flags) return E_INVALIDARG;
    HRESULT hr = vp_get(h, idx, &p, &vp);
    if (FAILED(hr)) return hr;
    atomic_store(&vp->cancel_pending, 1);
    __atomic_store_n(&vp->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    int tid = atomic_load(&vp->tid);
    if (tid) syscall(SYS_tgkill, getpid(), tid, g_kick_signal);
    pthread_mutex_unlock(&g_lock);
    return S_OK;
}

/* KVM finishes an I/O or MMIO exit (writes an IN's data to RAX, steps RIP past the
 * instruction, completes an emulated access) only at the *next* KVM_RUN. WHP has no such
 * hidden step: after an exit the VP state is final and the host itself emulates and advances
 * RIP. So the pending work is retired right away with a KVM_RUN that has immediate_exit set
 * (KVM's documented way to complete an operation without running the guest); the caller then
 * puts the registers back to WHP's state. Costs one extra KVM_RUN per MMIO exit, per IN, and per
 * OUT unless it is certain that nothing is pending (see exit_io). */
static int complete_pending_io(struct whv_vp *vp) {
    for (int i = 0; i < 16; i++) {
        __atomic_store_n(&vp->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
        int rc = kvm_ioctl(vp->fd, KVM_RUN, 0);
        if (rc < 0 && (errno == EINTR || errno == EAGAIN)) return 0;
        if (rc < 0) return -1;
        /* rc == 0: a further MMIO fragment of the same instruction, or the next batch of a
         * REP INS/OUTS, which KVM would go on with page after page: RCX = 0 ends it at the next
         * completion (the caller puts the registers back afterwards). */
        if (vp->run->exit_reason == KVM_EXIT_IO) {
            vp->run->s.regs.regs.rcx = 0;
            vp->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        }
    }
    errno = EIO;
    return -1;
}

struct io_insn { int len, is_in, size, port, string, rep; };

/* Decodes IN/OUT (E4-E7 imm8, EC-EF dx; 6C-6F string forms) with legacy prefixes and, in
 * 64-bit code, a REX prefix. port: the imm8, or -1 for the dx forms. Returns 0 if it is one. */
static int decode_io(const uint8_t *b, size_t n, int long_mode, struct io_insn *d) {
    size_t i = 0;
    int op16 = 0, rep = 0;
    for (; i < n && i < 14; i++) {
        uint8_t c = b[i];
        if (c == 0x66) op16 = 1;
        else if (c == 0xF3 || c == 0xF2) rep = 1;
        else if (c != 0x67 && c != 0x2E && c != 0x36 && c != 0x3E && c != 0x26 && c != 0x64 && c != 0x65 && c != 0xF0) break;
    }
    if (long_mode && i < n && (b[i] & 0xF0) == 0x40) i++;   /* REX: no effect on port I/O */
    if (i >= n) return -1;
    uint8_t op = b[i++];
    memset(d, 0, sizeof *d);
    d->port = -1;
    if (op >= 0xE4 && op <= 0xE7) {
        if (i >= n) return -1;
        d->port = b[i++];
    } else if (!(op >= 0xEC && op <= 0xEF) && !(op >= 0x6C && op <= 0x6F)) {
        return -1;
    }
    d->string = op <= 0x6F;
    d->rep = rep;
    d->is_in = op == 0xE4 || op == 0xE5 || op == 0xEC || op == 0xED || op == 0x6C || op == 0x6D;
    d->size = (op & 1) ? (op16 ? 2 : 4) : 1;
    d->len = (int)i;
    return 0;
}

static void fill_segment(WHV_X64_SEGMENT_REGISTER *w, const struct kvm_segment *k);

/* The parts of the exit context every exit shares (VpContext). */
static void fill_vp_context(WHV_RUN_VP_EXIT_CONTEXT *ctx, const struct kvm_sync_regs *r, uint64_t rip) {
    WHV_VP_EXIT_CONTEXT *c = &ctx->VpContext;
    c->ExecutionState.Cpl = r->sregs.cs.dpl & 3;
    c->ExecutionState.Cr0Pe = r->sregs.cr0 & 1;
    c->ExecutionState.Cr0Am = (r->sregs.cr0 >> 18) & 1;
    c->ExecutionState.EferLma = (r->sregs.efer >> 10) & 1;
    c->ExecutionState.InterruptShadow = r->events.interrupt.shadow != 0;
    c->ExecutionState.InterruptionPending = r->events.exception.injected || r->events.interrupt.injected ||
                                            r->events.nmi.injected;
    c->Cr8 = r->sregs.cr8 & 0xF;
    fill_segment(&c->Cs, &r->sregs.cs);
    c->Rip = rip;
    c->Rflags = r->regs.rflags;
}

/* KVM_EXIT_IO -> WHvRunVpExitReasonX64IoPortAccess.
 * WHP: the VP stops AT the in/out: VpContext.Rip is the instruction's address,
 * InstructionLength its length, and the VP's RIP still points at it; the host must set
 * RIP = Rip + InstructionLength itself (and, for IN, write the result into RAX). KVM
 * instead steps past it (at once on its emulator path, at the next KVM_RUN on its fast path)
 * and writes an IN's data into RAX. Here KVM's step is retired, then RIP and all general
 * registers are put back to the state at the instruction. */
static HRESULT exit_io(struct whv_partition *p, struct whv_vp *vp, WHV_RUN_VP_EXIT_CONTEXT *ctx) {
    struct kvm_run *run = vp->run;
    struct kvm_sync_regs snap = run->s.regs;   /* state KVM reported at the exit */
    __typeof__(run->io) io = run->io;
    int lm = long_code(&snap.sregs);
    struct io_insn d;
    uint8_t bytes[16];
    uint64_t ins = snap.regs.rip;
    size_t nb = 0;
    int len = 0, completed = 0;
    /* An OUT whose RIP is already past it (KVM's emulator path: always so under PVM) leaves
     * nothing pending in KVM. That is certain when the bytes at RIP are readable and are not a
     * matching I/O instruction; only then is the completion run skipped (it costs as much as an
     * exit). Otherwise (IN, KVM's fast path, unreadable code) it runs. */
    nb = read_code(p, &snap.sregs, snap.regs.rip, bytes, sizeof bytes);
    int at_match = !decode_io(bytes, nb, lm, &d) && d.is_in == (io.direction == KVM_EXIT_IO_IN) && d.size == io.size &&
                   (d.port >= 0 ? d.port : (int)(snap.regs.rdx & 0xFFFF)) == io.port;
    if (io.direction == KVM_EXIT_IO_IN || io.count != 1 || at_match || nb < sizeof bytes) {
        if (complete_pending_io(vp)) return hr_errno(errno);
        completed = 1;
    }
    uint64_t rip_after = run->s.regs.regs.rip;  /* now definitely past the instruction */
    nb = 0;
    if (rip_after != snap.regs.rip) {
        /* RIP was at the instruction when KVM exited: KVM's own step tells the length. */
        len = (int)(rip_after - snap.regs.rip);
        if (len < 1 || len > 15)
            fprintf(stderr, "whv_kvm: KVM stepped an I/O instruction by %d bytes\n", len);
        nb = read_code(p, &snap.sregs, ins, bytes, (size_t)len < sizeof bytes ? (size_t)len : sizeof bytes);
    } else {
        /* KVM had already stepped past it (emulated OUT): find the instruction that ends at
         * RIP and matches the exit (direction, size, port). Prefer the shortest such encoding
         * (no redundant prefixes); any choice gives the same Rip + InstructionLength. */
        uint8_t back[15];
        size_t got = 0;
        for (int l = 1; l <= 15 && l <= (int)snap.regs.rip; l++) {
            got = read_code(p, &snap.sregs, snap.regs.rip - (uint64_t)l, back, (size_t)l);
            if (got != (size_t)l || decode_io(back, (size_t)l, lm, &d) || d.len != l) continue;
            if (d.is_in != (io.direction == KVM_EXIT_IO_IN) || d.size != io.size) continue;
            if ((d.port >= 0 ? d.port : (int)(snap.regs.rdx & 0xFFFF)) != io.port) continue;
            len = l;
            ins = snap.regs.rip - (uint64_t)l;
            memcpy(bytes, back, (size_t)l);
            nb = (size_t)l;
            break;
        }
        /* Not found: KVM did not step at all, as for a REP INS/OUTS it has not finished (it
         * goes on at the next run): the instruction is at RIP. */
        if (!len && (nb = read_code(p, &snap.sregs, snap.regs.rip, bytes, sizeof bytes)) &&
            !decode_io(bytes, nb, lm, &d) && d.string && d.is_in == (io.direction == KVM_EXIT_IO_IN) &&
            d.size == io.size && (int)(snap.regs.rdx & 0xFFFF) == io.port) {
            len = d.len;
            nb = (size_t)d.len;
        }
        if (!len)
            fprintf(stderr, "whv_kvm: cannot find the I/O instruction before rip %#llx (port %#x)\n",
                    (unsigned long long)snap.regs.rip, io.port);
    }
    if (g_debug)
        fprintf(stderr, "whv_kvm: io port %#x %s size %d: KVM rip %#llx -> %#llx %s; instruction at %#llx, length %d\n",
                io.port, io.direction == KVM_EXIT_IO_OUT ? "out" : "in", io.size, (unsigned long long)snap.regs.rip,
                (unsigned long long)rip_after, completed ? "after completion" : "(nothing pending)",
                (unsigned long long)ins, len);
    /* Back to the state at the instruction: all GPRs as they were (an IN's RAX included), RIP
     * at the instruction. Goes to KVM with the next KVM_RUN through the sync-regs area. */
    run->s.regs.regs = snap.regs;
    run->s.regs.regs.rip = ins;
    run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;

    int decoded = nb && !decode_io(bytes, nb, lm, &d);
    int string = io.count != 1 || (decoded && d.string);
    if (string && !decoded) {   /* a string access whose instruction cannot be read back */
        ctx->ExitReason = WHvRunVpExitReasonUnsupportedFeature;
        ctx->UnsupportedFeature.FeatureCode = WHvUnsupportedFeatureIntercept;
        ctx->UnsupportedFeature.FeatureParameter = 0x10000u | io.port;
        fill_vp_context(ctx, &run->s.regs, ins);
        return S_OK;
    }
    /* INS/OUTS are reported as WHP reports them (StringOp, RepPrefix), with the VP at the
     * instruction and nothing done, for the host to emulate or refuse. KVM has already moved
     * (part of) the data: not modelled, the registers are put back as for any I/O exit. */
    ctx->ExitReason = WHvRunVpExitReasonX64IoPortAccess;
    fill_vp_context(ctx, &run->s.regs, ins);
    ctx->VpContext.InstructionLength = (UINT8)(len & 0xF);
    WHV_X64_IO_PORT_ACCESS_CONTEXT *a = &ctx->IoPortAccess;
    a->InstructionByteCount = (UINT8)nb;
    memcpy(a->InstructionBytes, bytes, nb);
    a->AccessInfo.IsWrite = io.direction == KVM_EXIT_IO_OUT;
    a->AccessInfo.AccessSize = io.size;
    a->AccessInfo.StringOp = string;
    a->AccessInfo.RepPrefix = string && d.rep;
    a->PortNumber = io.port;
    a->Rax = snap.regs.rax;
    a->Rcx = snap.regs.rcx;
    a->Rsi = snap.regs.rsi;
    a->Rdi = snap.regs.rdi;
    fill_segment(&a->Ds, &snap.sregs.ds);
    fill_segment(&a->Es, &snap.sregs.es);
    return S_OK;
}

/* KVM_EXIT_MMIO (a write to a mapping without Write, or any access to an unmapped GPA) ->
 * WHvRunVpExitReasonMemoryAccess. WHP stops before the instruction executes. For a READ KVM
 * also exits before (the emulator has not written back), so after retiring KVM's pending
 * completion all GPRs and RIP are restored: faithful. For a WRITE KVM's emulator has already
 * stepped RIP past the instruction (and the write is dropped); its start cannot be recovered
 * in general, so RIP stays past it and VpContext.InstructionLength is 0 (see README). */
static HRESULT exit_mmio(struct whv_partition *p, struct whv_vp *vp, WHV_RUN_VP_EXIT_CONTEXT *ctx) {
    struct kvm_run *run = vp->run;
    struct kvm_sync_regs snap = run->s.regs;
    uint64_t gpa = run->mmio.phys_addr;
    int is_write = run->mmio.is_write;
    if (complete_pending_io(vp)) return hr_errno(errno);
    if (g_debug)
        fprintf(stderr, "whv_kvm: mmio %s gpa %#llx: KVM rip %#llx -> %#llx after completion\n", is_write ? "write" : "read",
                (unsigned long long)gpa, (unsigned long long)snap.regs.rip, (unsigned long long)run->s.regs.regs.rip);
    if (!is_write) {
        run->s.regs.regs = snap.regs;
        run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
    }
    ctx->ExitReason = WHvRunVpExitReasonMemoryAccess;
    fill_vp_context(ctx, &run->s.regs, run->s.regs.regs.rip);
    WHV_MEMORY_ACCESS_CONTEXT *a = &ctx->MemoryAccess;
    a->AccessInfo.AccessType = is_write ? WHvMemoryAccessWrite : WHvMemoryAccessRead;
    a->AccessInfo.GpaUnmapped = map_find(p, gpa) == NULL;
    a->Gpa = gpa;
    if (!is_write) a->InstructionByteCount = (UINT8)read_code(p, &snap.sregs, snap.regs.rip, a->InstructionBytes, 16);
    return S_OK;
}

API HRESULT WINAPI WHvRunVirtualProcessor(WHV_PARTITION_HANDLE h, UINT32 idx, VOID *exit_ctx, UINT32 size) {
    struct whv_partition *p;
    struct whv_vp *vp;
    WHV_RUN_VP_EXIT_CONTEXT *ctx = exit_ctx;
    if (!ctx) return E_POINTER;
    if (size < sizeof *ctx) return WHV_E_INSUFFICIENT_BUFFER;
    HRESULT hr = vp_get(h, idx, &p, &vp);
    if (FAILED(hr)) return hr;
    if (atomic_exchange(&vp->running, 1)) { pthread_mutex_unlock(&g_lock); return WHV_E_INVALID_VP_STATE; }
    pthread_mutex_unlock(&g_lock);

    struct kvm_run *run = vp->run;
    memset(ctx, 0, sizeof *ctx);
    atomic_store(&vp->tid, (int)syscall(SYS_gettid));
    struct kvm_sync_regs queued;   /* register writes not yet given to KVM */
    uint64_t queued_mask = 0;
    int rc, err = 0;
    for (;;) {
        __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
        if (atomic_exchange(&vp->cancel_pending, 0)) {
            ctx->ExitReason = WHvRunVpExitReasonCanceled;
            ctx->CancelReason.CancelReason = WhvRunVpCancelReasonUser;
            fill_vp_context(ctx, &run->s.regs, run->s.regs.regs.rip);
            goto done;
        }
        if (run->kvm_dirty_regs && !queued_mask) { queued = run->s.regs; queued_mask = run->kvm_dirty_regs; }
        rc = kvm_ioctl(vp->fd, KVM_RUN, 0);
        err = errno;
        if (rc == 0) break;
        if (err == EINTR || err == EAGAIN) continue;   /* a cancel, or some other signal: re-check */
        break;
    }
    pthread_mutex_lock(&g_lock);
    if (rc < 0 && err == EINVAL && queued_mask) {
        /* KVM refused the registers written since the last run. WHP reports that as an exit;
         * the values stay in the VP (and are refused again), as on WHP. */
        run->s.regs = queued;
        run->kvm_dirty_regs = queued_mask;
        ctx->ExitReason = WHvRunVpExitReasonInvalidVpRegisterValue;
        fill_vp_context(ctx, &run->s.regs, run->s.regs.regs.rip);
    } else if (rc < 0 && err == EFAULT && run->exit_reason == KVM_EXIT_MEMORY_FAULT) {
        /* The host memory behind a mapped GPA is gone (e.g. an unmapped view). */
        uint64_t mf_gpa;
        memcpy(&mf_gpa, (uint8_t *)&run->mmio + 8, 8);   /* memory_fault {flags, gpa, size} */
        ctx->ExitReason = WHvRunVpExitReasonMemoryAccess;
        ctx->MemoryAccess.Gpa = mf_gpa;
        fill_vp_context(ctx, &run->s.regs, run->s.regs.regs.rip);
    } else if (rc < 0) {
        hr = hr_errno(err);
    } else switch (run->exit_reason) {
    case KVM_EXIT_IO:
        hr = exit_io(p, vp, ctx);
        break;
    case KVM_EXIT_MMIO:
        hr = exit_mmio(p, vp, ctx);
        break;
    case KVM_EXIT_HLT:
        ctx->ExitReason = WHvRunVpExitReasonX64Halt;
        fill_vp_context(ctx, &run->s.regs, run->s.regs.regs.rip);
        break;
    case KVM_EXIT_SHUTDOWN:   /* triple fault */
        ctx->ExitReason = WHvRunVpExitReasonUnrecoverableException;
        fill_vp_context(ctx, &run->s.regs, run->s.regs.regs.rip);
        break;
    case KVM_EXIT_FAIL_ENTRY:
        ctx->ExitReason = WHvRunVpExitReasonInvalidVpRegisterValue;
        fill_vp_context(ctx, &run->s.regs, run->s.regs.regs.rip);
        break;
    case KVM_EXIT_INTERNAL_ERROR: {
        /* An instruction fetch from an unmapped GPA ends up here (KVM cannot emulate it); on
         * WHP that is a MemoryAccess exit with AccessType Execute. */
        uint64_t lin = long_code(&run->s.regs.sregs) ? run->s.regs.regs.rip
                                                     : ((run->s.regs.sregs.cs.base + run->s.regs.regs.rip) & 0xFFFFFFFFull);
        uint64_t gpa;
        fill_vp_context(ctx, &run->s.regs, run->s.regs.regs.rip);
        if (!gva_to_gpa(p, &run->s.regs.sregs, lin, &gpa) && !map_find(p, gpa)) {
            ctx->ExitReason = WHvRunVpExitReasonMemoryAccess;
            ctx->MemoryAccess.AccessInfo.AccessType = WHvMemoryAccessExecute;
            ctx->MemoryAccess.AccessInfo.GpaUnmapped = 1;
            ctx->MemoryAccess.Gpa = gpa;
            ctx->MemoryAccess.Gva = lin;
            ctx->MemoryAccess.AccessInfo.GvaValid = 1;
        } else {
            /* Anything else KVM could not do (e.g. SSE at CPL0 under PVM): FeatureParameter =
             * KVM exit reason << 32 | suberror. */
            ctx->ExitReason = WHvRunVpExitReasonUnsupportedFeature;
            ctx->UnsupportedFeature.FeatureCode = WHvUnsupportedFeatureIntercept;
            ctx->UnsupportedFeature.FeatureParameter = ((UINT64)KVM_EXIT_INTERNAL_ERROR << 32) | run->internal.suberror;
        }
        break;
    }
    default:
        ctx->ExitReason = WHvRunVpExitReasonUnsupportedFeature;
        ctx->UnsupportedFeature.FeatureCode = WHvUnsupportedFeatureIntercept;
        ctx->UnsupportedFeature.FeatureParameter = (UINT64)run->exit_reason << 32;
        fill_vp_context(ctx, &run->s.regs, run->s.regs.regs.rip);
    }
    pthread_mutex_unlock(&g_lock);
done:
    atomic_store(&vp->tid, 0);
    __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    atomic_store(&vp->running, 0);
    return hr;
}

/* ======================================================================================
 * Registers
 * ====================================================================================== */

static void fill_segment(WHV_X64_SEGMENT_REGISTER *w, const struct kvm_segment *k) {
    memset(w, 0, sizeof *w);
    w->Base = k->base;
    w->Limit = k->limit;
    w->Selector = k->selector;
    w->SegmentType = k->type & 0xF;
    w->NonSystemSegment = k->s & 1;
    w->DescriptorPrivilegeLevel = k->dpl & 3;
    w->Present = k->present && !k->unusable;
    w->Available = k->avl & 1;
    w->Long = k->l & 1;
    w->Default = k->db & 1;
    w->Granularity = k->g & 1;
}
static void set_segment(struct kvm_segment *k, const WHV_X64_SEGMENT_REGISTER *w) {
    memset(k, 0, sizeof *k);
    k->base = w->Base;
    k->limit = w->Limit;
    k->selector = w->Selector;
    k->type = w->SegmentType;
    k->s = w->NonSystemSegment;
    k->dpl = w->DescriptorPrivilegeLevel;
    k->present = w->Present;
    k->avl = w->Available;
    k->l = w->Long;
    k->db = w->Default;
    k->g = w->Granularity;
    k->unusable = !w->Present;   /* WHP has no "unusable": a non-present segment is one */
}

enum { G_REGS = 1, G_SREGS = 2, G_EVENTS = 4, G_DEBUG = 8, G_XCRS = 16, G_MSRS = 32, G_FPU = 64 };

static uint32_t msr_index(WHV_REGISTER_NAME n) {
    switch (n) {
    case WHvX64RegisterTsc: return 0x10;
    case WHvX64RegisterPat: return 0x277;
    case WHvX64RegisterSysenterCs: return 0x174;
    case WHvX64RegisterSysenterEsp: return 0x175;
    case WHvX64RegisterSysenterEip: return 0x176;
    case WHvX64RegisterStar: return 0xC0000081;
    case WHvX64RegisterLstar: return 0xC0000082;
    case WHvX64RegisterCstar: return 0xC0000083;
    case WHvX64RegisterSfmask: return 0xC0000084;
    case WHvX64RegisterKernelGsBase: return 0xC0000102;
    case WHvX64RegisterTscAux: return 0xC0000103;
    default: return 0;
    }
}

/* Which KVM state groups a register lives in; 0 = not supported. */
static int reg_groups(WHV_REGISTER_NAME n) {
    if (n <= WHvX64RegisterRflags) return G_REGS;
    if (n >= WHvX64RegisterEs && n <= WHvX64RegisterCr8) return G_SREGS;
    if (n == WHvX64RegisterEfer || n == WHvX64RegisterApicBase) return G_SREGS;
    if (n >= WHvX64RegisterDr0 && n <= WHvX64RegisterDr7) return G_DEBUG;
    if (n == WHvX64RegisterXCr0) return G_XCRS;
    if (msr_index(n)) return G_MSRS;
    if ((n >= WHvX64RegisterXmm0 && n <= WHvX64RegisterXmm15) || (n >= WHvX64RegisterFpMmx0 && n <= WHvX64RegisterFpMmx7) ||
        n == WHvX64RegisterFpControlStatus || n == WHvX64RegisterXmmControlStatus)
        return G_FPU;
    if (n == WHvRegisterPendingInterruption || n == WHvRegisterInterruptState) return G_EVENTS;
    if (n == WHvRegisterPendingEvent) return G_EVENTS | G_SREGS;   /* #PF parameter -> CR2 */
    return 0;
}

static __u64 *gpr(struct kvm_regs *r, WHV_REGISTER_NAME n) {
    switch (n) {
    case WHvX64RegisterRax: return &r->rax;
    case WHvX64RegisterRcx: return &r->rcx;
    case WHvX64RegisterRdx: return &r->rdx;
    case WHvX64RegisterRbx: return &r->rbx;
    case WHvX64RegisterRsp: return &r->rsp;
    case WHvX64RegisterRbp: return &r->rbp;
    case WHvX64RegisterRsi: return &r->rsi;
    case WHvX64RegisterRdi: return &r->rdi;
    case WHvX64RegisterR8: return &r->r8;
    case WHvX64RegisterR9: return &r->r9;
    case WHvX64RegisterR10: return &r->r10;
    case WHvX64RegisterR11: return &r->r11;
    case WHvX64RegisterR12: return &r->r12;
    case WHvX64RegisterR13: return &r->r13;
    case WHvX64RegisterR14: return &r->r14;
    case WHvX64RegisterR15: return &r->r15;
    case WHvX64RegisterRip: return &r->rip;
    default: return &r->rflags;
    }
}
static struct kvm_segment *sreg_seg(struct kvm_sregs *s, WHV_REGISTER_NAME n) {
    switch (n) {
    case WHvX64RegisterEs: return &s->es;
    case WHvX64RegisterCs: return &s->cs;
    case WHvX64RegisterSs: return &s->ss;
    case WHvX64RegisterDs: return &s->ds;
    case WHvX64RegisterFs: return &s->fs;
    case WHvX64RegisterGs: return &s->gs;
    case WHvX64RegisterLdtr: return &s->ldt;
    case WHvX64RegisterTr: return &s->tr;
    default: return NULL;
    }
}
static __u64 *sreg_u64(struct kvm_sregs *s, WHV_REGISTER_NAME n) {
    switch (n) {
    case WHvX64RegisterCr0: return &s->cr0;
    case WHvX64RegisterCr2: return &s->cr2;
    case WHvX64RegisterCr3: return &s->cr3;
    case WHvX64RegisterCr4: return &s->cr4;
    case WHvX64RegisterCr8: return &s->cr8;
    case WHvX64RegisterEfer: return &s->efer;
    case WHvX64RegisterApicBase: return &s->apic_base;
    default: return NULL;
    }
}

/* The KVM state a Get/Set works on. REGS/SREGS/EVENTS are the sync-regs area itself (no
 * ioctl); the rest is fetched with one ioctl per group. */
struct state {
    struct kvm_sync_regs s;
    struct kvm_debugregs dbg;
    struct kvm_xcrs xcrs;
    struct kvm_fpu fpu;
    struct { struct kvm_msrs hdr; struct kvm_msr_entry e[64]; } msrs;
};

static int load_groups(struct whv_vp *vp, int groups, struct state *st, const WHV_REGISTER_NAME *names, UINT32 count,
                       int want_msr_values) {
    st->s = vp->run->s.regs;
    if ((groups & G_DEBUG) && kvm_ioctl(vp->fd, KVM_GET_DEBUGREGS, &st->dbg)) return -1;
    if ((groups & G_XCRS) && kvm_ioctl(vp->fd, KVM_GET_XCRS, &st->xcrs)) return -1;
    if ((groups & G_FPU) && kvm_ioctl(vp->fd, KVM_GET_FPU, &st->fpu)) return -1;
    if (groups & G_MSRS) {
        uint32_t k = 0;
        for (UINT32 i = 0; i < count; i++) {
            uint32_t idx = msr_index(names[i]), j;
            if (!idx) continue;
            for (j = 0; j < k && st->msrs.e[j].index != idx; j++) {}
            if (j == k && k < 64) { memset(&st->msrs.e[k], 0, sizeof st->msrs.e[k]); st->msrs.e[k++].index = idx; }
        }
        st->msrs.hdr.nmsrs = k;
        st->msrs.hdr.pad = 0;
        if (want_msr_values) {
            int got = kvm_ioctl(vp->fd, KVM_GET_MSRS, &st->msrs);
            if (got != (int)k) { errno = got < 0 ? errno : EINVAL; return -1; }
        }
    }
    return 0;
}

static struct kvm_msr_entry *msr_entry(struct state *st, WHV_REGISTER_NAME n) {
    uint32_t idx = msr_index(n);
    for (uint32_t j = 0; j < st->msrs.hdr.nmsrs; j++)
        if (st->msrs.e[j].index == idx) return &st->msrs.e[j];
    return NULL;
}

static int groups_of(const WHV_REGISTER_NAME *names, UINT32 count, int *groups) {
    *groups = 0;
    for (UINT32 i = 0; i < count; i++) {
        int g = reg_groups(names[i]);
        if (!g) return -1;
        *groups |= g;
    }
    return 0;
}

/* Setting CR3 flushes the VP's TLB, as a MOV to CR3 does: on WHP (hardware paging) that is all
 * it takes for page-table entries the host rewrote in guest memory to take effect, and without
 * it the old translations may stay in use. Under PVM's shadow paging KVM keeps translations built
 * from the old entries and does not see host writes to guest memory at all, so the layer has to
 * be told which pages' entries the host changed: whv_kvm_host_wrote() (layer only; the WHP
 * backend calls it only when built against this layer, WHPFAST_WHV_LAYER) records them, and the
 * next CR3 write drops their translations (changing the protection of the guest's view fires
 * KVM's MMU notifier). A backend that rewrites page tables and forgets the CR3 write keeps the
 * stale translations here, as it could on WHP. */
static void flush_translations(struct whv_partition *p) {   /* g_lock held */
    for (struct gpa_map *m = p->maps; m; m = m->next) {
        if (!m->any_stale) continue;
        uint64_t pages = m->size / PAGE;
        for (uint64_t i = 0, j; i < pages; i = j) {
            if (!m->stale[i / 64]) { j = (i / 64 + 1) * 64; continue; }      /* a clean word */
            if (!(m->stale[i / 64] >> (i % 64) & 1)) { j = i + 1; continue; }
            for (j = i + 1; j < pages && (m->stale[j / 64] >> (j % 64) & 1); j++) {}
            int prot = PROT_READ | ((m->flags & WHvMapGpaRangeFlagWrite) ? PROT_WRITE : 0);
            mprotect(m->guest + i * PAGE, (j - i) * PAGE, prot == PROT_READ ? PROT_NONE : PROT_READ);
            mprotect(m->guest + i * PAGE, (j - i) * PAGE, prot);
        }
        memset(m->stale, 0, (pages + 63) / 64 * 8);
        m->any_stale = 0;
    }
}

/* Layer only: the host changed the guest's page-table entries for the guest pages at
 * [address, address + size) of a mapped host range (see flush_translations). */
API void whv_kvm_host_wrote(const void *address, unsigned long long size) {
    const uint8_t *a = address;
    pthread_mutex_lock(&g_lock);
    for (struct whv_partition *p = g_parts; p; p = p->next)
        for (struct gpa_map *m = p->maps; m; m = m->next) {
            if (a + size <= m->host || a >= m->host + m->size) continue;
            if (!m->stale && !(m->stale = calloc((m->size / PAGE + 63) / 64, 8))) continue;
            uint64_t lo = a > m->host ? (uint64_t)(a - m->host) / PAGE : 0;
            uint64_t hi = (uint64_t)((a + size < m->host + m->size ? a + size : m->host + m->size) - m->host + PAGE - 1) / PAGE;
            for (uint64_t i = lo; i < hi; i++) m->stale[i / 64] |= 1ull << (i % 64);
            m->any_stale = 1;
        }
    pthread_mutex_unlock(&g_lock);
}

API HRESULT WINAPI WHvGetVirtualProcessorRegisters(WHV_PARTITION_HANDLE h, UINT32 idx, const WHV_REGISTER_NAME *names,
                                                   UINT32 count, WHV_REGISTER_VALUE *values) {
    struct whv_partition *p;
    struct whv_vp *vp;
    struct state st;
    int groups;
    if (count && (!names || !values)) return E_POINTER;
    if (groups_of(names, count, &groups)) return WHV_E_INVALID_VP_REGISTER_NAME;
    HRESULT hr = vp_get(h, idx, &p, &vp);
    if (FAILED(hr)) return hr;
    if (atomic_load(&vp->running)) { pthread_mutex_unlock(&g_lock); return WHV_E_INVALID_VP_STATE; }
    if (load_groups(vp, groups, &st, names, count, 1)) { hr = hr_errno(errno); pthread_mutex_unlock(&g_lock); return hr; }
    pthread_mutex_unlock(&g_lock);
    int payload = p->exception_payload;
    for (UINT32 i = 0; i < count; i++) {
        WHV_REGISTER_NAME n = names[i];
        WHV_REGISTER_VALUE *v = &values[i];
        struct kvm_vcpu_events *ev = &st.s.events;
        memset(v, 0, sizeof *v);
        if (n <= WHvX64RegisterRflags) v->Reg64 = *gpr(&st.s.regs, n);
        else if (sreg_seg(&st.s.sregs, n)) fill_segment(&v->Segment, sreg_seg(&st.s.sregs, n));
        else if (n == WHvX64RegisterIdtr || n == WHvX64RegisterGdtr) {
            struct kvm_dtable *t = n == WHvX64RegisterIdtr ? &st.s.sregs.idt : &st.s.sregs.gdt;
            v->Table.Base = t->base;
            v->Table.Limit = t->limit;
        } else if (sreg_u64(&st.s.sregs, n)) v->Reg64 = *sreg_u64(&st.s.sregs, n);
        else if (n >= WHvX64RegisterDr0 && n <= WHvX64RegisterDr3) v->Reg64 = st.dbg.db[n - WHvX64RegisterDr0];
        else if (n == WHvX64RegisterDr6) v->Reg64 = st.dbg.dr6;
        else if (n == WHvX64RegisterDr7) v->Reg64 = st.dbg.dr7;
        else if (n == WHvX64RegisterXCr0) {
            for (uint32_t j = 0; j < st.xcrs.nr_xcrs; j++)
                if (st.xcrs.xcrs[j].xcr == 0) v->Reg64 = st.xcrs.xcrs[j].value;
        } else if (msr_index(n)) v->Reg64 = msr_entry(&st, n)->data;
        else if (n >= WHvX64RegisterXmm0 && n <= WHvX64RegisterXmm15) memcpy(&v->Reg128, st.fpu.xmm[n - WHvX64RegisterXmm0], 16);
        else if (n >= WHvX64RegisterFpMmx0 && n <= WHvX64RegisterFpMmx7) memcpy(&v->Fp, st.fpu.fpr[n - WHvX64RegisterFpMmx0], 10);
        else if (n == WHvX64RegisterFpControlStatus) {
            v->FpControlStatus.FpControl = st.fpu.fcw;
            v->FpControlStatus.FpStatus = st.fpu.fsw;
            v->FpControlStatus.FpTag = st.fpu.ftwx;
            v->FpControlStatus.LastFpOp = st.fpu.last_opcode;
            v->FpControlStatus.LastFpRip = st.fpu.last_ip;
        } else if (n == WHvX64RegisterXmmControlStatus) {
            v->XmmControlStatus.LastFpRdp = st.fpu.last_dp;
            v->XmmControlStatus.XmmStatusControl = st.fpu.mxcsr;
            v->XmmControlStatus.XmmStatusControlMask = 0xFFFF;   /* not in kvm_fpu */
        } else if (n == WHvRegisterPendingInterruption) {
            WHV_X64_PENDING_INTERRUPTION_REGISTER *r = &v->PendingInterruption;
            if (ev->exception.injected) {
                r->InterruptionPending = 1;
                r->InterruptionType = WHvX64PendingException;
                r->DeliverErrorCode = ev->exception.has_error_code & 1;
                r->InterruptionVector = ev->exception.nr;
                r->ErrorCode = ev->exception.error_code;
            } else if (ev->nmi.injected) {
                r->InterruptionPending = 1;
                r->InterruptionType = WHvX64PendingNmi;
                r->InterruptionVector = 2;
            } else if (ev->interrupt.injected) {
                r->InterruptionPending = 1;
                r->InterruptionType = WHvX64PendingInterrupt;
                r->InterruptionVector = ev->interrupt.nr;
            }
        } else if (n == WHvRegisterInterruptState) {
            v->InterruptState.InterruptShadow = ev->interrupt.shadow != 0;
            v->InterruptState.NmiMasked = ev->nmi.masked & 1;
        } else if (n == WHvRegisterPendingEvent) {
            /* Only a raised, not yet injected exception (see WHvCreatePartition); an injected
             * one is PendingInterruption's. */
            if (payload && ev->exception.pending) {
                v->ExceptionEvent.EventPending = 1;
                v->ExceptionEvent.EventType = WHvX64PendingEventException;
                v->ExceptionEvent.DeliverErrorCode = ev->exception.has_error_code & 1;
                v->ExceptionEvent.Vector = ev->exception.nr;
                v->ExceptionEvent.ErrorCode = ev->exception.error_code;
                if (ev->exception_has_payload) v->ExceptionEvent.ExceptionParameter = ev->exception_payload;
            }
        }
    }
    return S_OK;
}

/* Set: every name is checked first (an unsupported one fails the call, nothing changed); the
 * KVM groups the names touch are read, modified and written back. REGS/SREGS/EVENTS are
 * written into kvm_run's sync-regs area (no ioctl; KVM applies them at the next KVM_RUN and, if
 * it refuses them, the run reports InvalidVpRegisterValue); debug registers, XCR0, MSRs and
 * the FPU cost one ioctl each (debug and FPU: a read too). */
API HRESULT WINAPI WHvSetVirtualProcessorRegisters(WHV_PARTITION_HANDLE h, UINT32 idx, const WHV_REGISTER_NAME *names,
                                                   UINT32 count, const WHV_REGISTER_VALUE *values) {
    struct whv_partition *p;
    struct whv_vp *vp;
    struct state st;
    int groups, dirty = 0, cr3 = 0;
    if (count && (!names || !values)) return E_POINTER;
    if (groups_of(names, count, &groups)) return WHV_E_INVALID_VP_REGISTER_NAME;
    HRESULT hr = vp_get(h, idx, &p, &vp);
    if (FAILED(hr)) return hr;
    if (atomic_load(&vp->running)) { hr = WHV_E_INVALID_VP_STATE; goto out; }
    /* MSRs are written by name, so their current values need not be read. */
    if (load_groups(vp, groups, &st, names, count, 0)) { hr = hr_errno(errno); goto out; }
    for (UINT32 i = 0; i < count; i++) {
        WHV_REGISTER_NAME n = names[i];
        const WHV_REGISTER_VALUE *v = &values[i];
        struct kvm_vcpu_events *ev = &st.s.events;
        if (n <= WHvX64RegisterRflags) { *gpr(&st.s.regs, n) = v->Reg64; dirty |= G_REGS; }
        else if (sreg_seg(&st.s.sregs, n)) { set_segment(sreg_seg(&st.s.sregs, n), &v->Segment); dirty |= G_SREGS; }
        else if (n == WHvX64RegisterIdtr || n == WHvX64RegisterGdtr) {
            struct kvm_dtable *t = n == WHvX64RegisterIdtr ? &st.s.sregs.idt : &st.s.sregs.gdt;
            t->base = v->Table.Base;
            t->limit = v->Table.Limit;
            dirty |= G_SREGS;
        } else if (sreg_u64(&st.s.sregs, n)) {
            *sreg_u64(&st.s.sregs, n) = v->Reg64;
            dirty |= G_SREGS;
            cr3 |= n == WHvX64RegisterCr3;
        }
        else if (n >= WHvX64RegisterDr0 && n <= WHvX64RegisterDr3) { st.dbg.db[n - WHvX64RegisterDr0] = v->Reg64; dirty |= G_DEBUG; }
        else if (n == WHvX64RegisterDr6) { st.dbg.dr6 = v->Reg64; dirty |= G_DEBUG; }
        else if (n == WHvX64RegisterDr7) { st.dbg.dr7 = v->Reg64; dirty |= G_DEBUG; }
        else if (n == WHvX64RegisterXCr0) {
            memset(&st.xcrs, 0, sizeof st.xcrs);
            st.xcrs.nr_xcrs = 1;
            st.xcrs.xcrs[0].xcr = 0;
            st.xcrs.xcrs[0].value = v->Reg64;
            dirty |= G_XCRS;
        } else if (msr_index(n)) { msr_entry(&st, n)->data = v->Reg64; dirty |= G_MSRS; }
        else if (n >= WHvX64RegisterXmm0 && n <= WHvX64RegisterXmm15) { memcpy(st.fpu.xmm[n - WHvX64RegisterXmm0], &v->Reg128, 16); dirty |= G_FPU; }
        else if (n >= WHvX64RegisterFpMmx0 && n <= WHvX64RegisterFpMmx7) { memcpy(st.fpu.fpr[n - WHvX64RegisterFpMmx0], &v->Fp, 10); dirty |= G_FPU; }
        else if (n == WHvX64RegisterFpControlStatus) {
            st.fpu.fcw = v->FpControlStatus.FpControl;
            st.fpu.fsw = v->FpControlStatus.FpStatus;
            st.fpu.ftwx = v->FpControlStatus.FpTag;
            st.fpu.last_opcode = v->FpControlStatus.LastFpOp;
            st.fpu.last_ip = v->FpControlStatus.LastFpRip;
            dirty |= G_FPU;
        } else if (n == WHvX64RegisterXmmControlStatus) {
            st.fpu.last_dp = v->XmmControlStatus.LastFpRdp;
            st.fpu.mxcsr = v->XmmControlStatus.XmmStatusControl;
            dirty |= G_FPU;
        } else if (n == WHvRegisterPendingInterruption) {
            const WHV_X64_PENDING_INTERRUPTION_REGISTER *r = &v->PendingInterruption;
            ev->exception.injected = ev->nmi.injected = ev->interrupt.injected = 0;
            if (r->InterruptionPending) {
                if (r->InterruptionType == WHvX64PendingException) {
                    ev->exception.injected = 1;
                    ev->exception.nr = (uint8_t)r->InterruptionVector;
                    ev->exception.has_error_code = r->DeliverErrorCode;
                    ev->exception.error_code = r->ErrorCode;
                } else if (r->InterruptionType == WHvX64PendingNmi) {
                    ev->nmi.injected = 1;
                } else if (r->InterruptionType == WHvX64PendingInterrupt) {
                    ev->interrupt.injected = 1;
                    ev->interrupt.nr = (uint8_t)r->InterruptionVector;
                    ev->interrupt.soft = 0;
                } else { hr = E_INVALIDARG; goto out; }
            }
            dirty |= G_EVENTS;
        } else if (n == WHvRegisterInterruptState) {
            ev->interrupt.shadow = v->InterruptState.InterruptShadow ? KVM_X86_SHADOW_INT_MOV_SS : 0;
            ev->nmi.masked = v->InterruptState.NmiMasked;
            ev->flags |= KVM_VCPUEVENT_VALID_SHADOW;
            dirty |= G_EVENTS;
        } else if (n == WHvRegisterPendingEvent) {
            /* Its own slot (KVM's exception.pending, see WHvCreatePartition): an event absent
             * here clears only that slot, never what PendingInterruption injects. */
            int exception = v->ExceptionEvent.EventPending && v->ExceptionEvent.EventType == WHvX64PendingEventException;
            if (v->ExceptionEvent.EventPending && !exception && v->ExceptionEvent.EventType != WHvX64PendingEventExtInt) {
                hr = E_INVALIDARG;
                goto out;
            }
            if (p->exception_payload) {
                ev->exception.pending = exception;
                ev->exception_has_payload = 0;
                ev->exception_payload = 0;
            }
            if (exception) {
                ev->exception.nr = (uint8_t)v->ExceptionEvent.Vector;
                ev->exception.has_error_code = v->ExceptionEvent.DeliverErrorCode;
                ev->exception.error_code = v->ExceptionEvent.ErrorCode;
                if (p->exception_payload) {
                    /* The parameter (CR2 of a #PF, DR6 bits of a #DB) is KVM's payload: it
                     * reaches the register when the exception is delivered, as on WHP. */
                    ev->exception.injected = 0;
                    ev->exception_has_payload = v->ExceptionEvent.Vector == 14 || v->ExceptionEvent.Vector == 1;
                    ev->exception_payload = ev->exception_has_payload ? v->ExceptionEvent.ExceptionParameter : 0;
                } else {
                    /* No separate slot in this KVM: injected now, CR2 set now for a #PF. */
                    ev->exception.injected = 1;
                    if (v->ExceptionEvent.Vector == 14) { st.s.sregs.cr2 = v->ExceptionEvent.ExceptionParameter; dirty |= G_SREGS; }
                }
            } else if (v->ExceptionEvent.EventPending) {
                /* An ExtInt is injected at once (reads back through PendingInterruption). */
                ev->interrupt.injected = 1;
                ev->interrupt.nr = (uint8_t)v->ExtIntEvent.Vector;
            }
            dirty |= G_EVENTS;
        }
    }
    /* The ioctl groups first (they can fail), the sync-regs area last (it cannot). */
    if (((dirty & G_DEBUG) && kvm_ioctl(vp->fd, KVM_SET_DEBUGREGS, &st.dbg)) ||
        ((dirty & G_XCRS) && kvm_ioctl(vp->fd, KVM_SET_XCRS, &st.xcrs)) ||
        ((dirty & G_FPU) && kvm_ioctl(vp->fd, KVM_SET_FPU, &st.fpu))) {
        hr = hr_errno(errno);
        goto out;
    }
    if (dirty & G_MSRS) {
        int set = kvm_ioctl(vp->fd, KVM_SET_MSRS, &st.msrs);
        if (set != (int)st.msrs.hdr.nmsrs) { hr = set < 0 ? hr_errno(errno) : E_INVALIDARG; goto out; }
    }
    struct kvm_run *run = vp->run;
    if (dirty & G_REGS) { run->s.regs.regs = st.s.regs; run->kvm_dirty_regs |= KVM_SYNC_X86_REGS; }
    if (dirty & G_SREGS) {
        run->s.regs.sregs = st.s.sregs;
        run->kvm_dirty_regs |= KVM_SYNC_X86_SREGS;
        /* Without an in-kernel APIC, KVM_RUN reloads CR8 from kvm_run->cr8 every time. */
        run->cr8 = st.s.sregs.cr8;
    }
    if (cr3) flush_translations(p);
    if (dirty & G_EVENTS) {
        /* Without VALID_PAYLOAD, KVM would drop exception.pending. */
        if (p->exception_payload) st.s.events.flags |= KVM_VCPUEVENT_VALID_PAYLOAD;
        run->s.regs.events = st.s.events;
        run->kvm_dirty_regs |= KVM_SYNC_X86_EVENTS;
    }
out:
    pthread_mutex_unlock(&g_lock);
    return hr;
}

/* ======================================================================================
 * XSAVE state: WHP's buffer is in the COMPACTED format, KVM's in the standard one
 * ====================================================================================== */

/* Compacted layout: 512-byte legacy region, 64-byte header (XSTATE_BV, XCOMP_BV with bit 63
 * set), then the components of XCOMP_BV in order, each 64-byte aligned if CPUID says so. */
static uint32_t compacted_size(uint64_t comp, uint32_t *offs) {
    uint32_t off = 576;
    for (int i = 2; i < 63; i++) {
        if (!(comp & (1ull << i))) continue;
        if (g_xalign[i]) off = (off + 63) & ~63u;
        if (offs) offs[i] = off;
        off += g_xsize[i];
    }
    return off;
}

API HRESULT WINAPI WHvGetVirtualProcessorXsaveState(WHV_PARTITION_HANDLE h, UINT32 idx, VOID *buf, UINT32 size,
                                                    UINT32 *written) {
    struct whv_partition *p;
    struct whv_vp *vp;
    uint32_t offs[64];
    uint32_t need = compacted_size(g_xmask, offs);
    if (written) *written = need;
    if (size < need || !buf) return WHV_E_INSUFFICIENT_BUFFER;
    uint8_t *std = calloc(1, (size_t)g_xsave_size);
    if (!std) return E_OUTOFMEMORY;
    HRESULT hr = vp_get(h, idx, &p, &vp);
    if (FAILED(hr)) { free(std); return hr; }
    int rc = atomic_load(&vp->running) ? -2
           : kvm_ioctl(vp->fd, g_xsave_size > 4096 ? KVM_GET_XSAVE2 : KVM_GET_XSAVE, std);
    int err = errno;
    pthread_mutex_unlock(&g_lock);
    if (rc) { free(std); return rc == -2 ? WHV_E_INVALID_VP_STATE : hr_errno(err); }
    uint8_t *out = buf;
    uint64_t xstate_bv, xcomp_bv = (1ull << 63) | g_xmask;
    memcpy(&xstate_bv, std + 512, 8);
    xstate_bv &= g_xmask;
    memset(out, 0, need);
    memcpy(out, std, 512);
    memcpy(out + 512, &xstate_bv, 8);
    memcpy(out + 520, &xcomp_bv, 8);
    for (int i = 2; i < 63; i++)
        if (xstate_bv & (1ull << i)) memcpy(out + offs[i], std + g_xoff[i], g_xsize[i]);
    free(std);
    return S_OK;
}

/* WHP takes only the compacted format: a standard-format buffer (XCOMP_BV bit 63 clear) is
 * refused, as real WHP refuses it. */
API HRESULT WINAPI WHvSetVirtualProcessorXsaveState(WHV_PARTITION_HANDLE h, UINT32 idx, const VOID *buf, UINT32 size) {
    struct whv_partition *p;
    struct whv_vp *vp;
    const uint8_t *in = buf;
    uint64_t xstate_bv, xcomp_bv;
    uint32_t offs[64];
    if (!buf || size < 576) return E_INVALIDARG;
    memcpy(&xstate_bv, in + 512, 8);
    memcpy(&xcomp_bv, in + 520, 8);
    uint64_t comp = xcomp_bv & ~(1ull << 63);
    if (!(xcomp_bv >> 63) || (comp & ~g_xmask) || (xstate_bv & ~(comp | 3)) || size < compacted_size(comp, offs))
        return E_INVALIDARG;
    uint8_t *std = calloc(1, (size_t)g_xsave_size);
    if (!std) return E_OUTOFMEMORY;
    memcpy(std, in, 512);
    memcpy(std + 512, &xstate_bv, 8);   /* XCOMP_BV and the reserved header stay 0 */
    for (int i = 2; i < 63; i++)
        if (xstate_bv & (1ull << i)) memcpy(std + g_xoff[i], in + offs[i], g_xsize[i]);
    HRESULT hr = vp_get(h, idx, &p, &vp);
    if (SUCCEEDED(hr)) {
        if (atomic_load(&vp->running)) hr = WHV_E_INVALID_VP_STATE;
        else if (kvm_ioctl(vp->fd, KVM_SET_XSAVE, std)) hr = hr_errno(errno);
        pthread_mutex_unlock(&g_lock);
    }
    free(std);
    return hr;
}
