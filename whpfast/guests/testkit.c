/*
 * testkit: the guest whpfast's own tests and benchmarks run. The names, signatures and results
 * of these exports are a contract with tests/ and bench/: change them only together.
 *
 * Heap "pages" below are 4 KiB pages of the info page's heap, numbered from 0.
 */
#include "whpfast_guest.h"

#include "compute.h"

/* ---- Run-time strings (results and error messages must outlive the export: static buffer) --- */

static char text[4096];
static size_t text_len;

static void text_reset(void) { text_len = 0; text[0] = 0; }

static void put_strn(const char *s, size_t n)
{
    for (size_t k = 0; k < n && text_len + 1 < sizeof text; k++)
        text[text_len++] = s[k];
    text[text_len] = 0;
}

static void put_str(const char *s) { put_strn(s, strlen(s)); }

static void put_uint(uint64_t x)
{
    char digits[21];
    int n = sizeof digits;
    do
        digits[--n] = (char)('0' + x % 10);
    while (x /= 10);
    put_strn(digits + n, sizeof digits - n);
}

static void put_int(int64_t x)
{
    if (x < 0)
        put_str("-");
    put_uint(x < 0 ? -(uint64_t)x : (uint64_t)x);
}

/* Like Python's f"{x:.6f}" with trailing zeros removed but one digit kept after the point
 * (2.5 -> "2.5", 3.0 -> "3.0", -0.125 -> "-0.125", 1e-7 -> "0.0"); "nan", "inf", "-inf";
 * finite values with |x| >= 1e18 print as "huge" / "-huge". Rounding is the float's, so the last
 * digit may differ from Python for values exactly halfway between two 6-digit decimals. */
static void put_float(double x)
{
    if (x != x) {
        put_str("nan");
        return;
    }
    if (__builtin_signbit(x)) {
        put_str("-");
        x = -x;
    }
    if (x >= 1e18) {
        put_str(x == __builtin_inf() ? "inf" : "huge");
        return;
    }
    uint64_t whole = (uint64_t)x;
    uint64_t micro = (uint64_t)((x - (double)whole) * 1e6 + 0.5);
    if (micro >= 1000000) {
        whole++;
        micro -= 1000000;
    }
    char frac[7];
    for (int k = 5; k >= 0; k--, micro /= 10)
        frac[k] = (char)('0' + micro % 10);
    int end = 6;
    while (end > 1 && frac[end - 1] == '0')
        end--;
    put_uint(whole);
    put_str(".");
    put_strn(frac, end);
}

static int text_error(struct wf_value *ret) { *ret = wf_strn(text, text_len); return 1; }
static int text_ok(struct wf_value *ret) { return wf_ok(ret, wf_strn(text, text_len)); }

/* ---- Value round trips ------------------------------------------------------------------------ */

WF_EXPORT(echo, "b", 'b') { return wf_ok(ret, args[0]); }   /* points into the input buffer */

WF_EXPORT(echo_str, "s", 's') { return wf_ok(ret, args[0]); }

/* Wraps around on overflow (two's complement), like the host's int64 would. */
WF_EXPORT(add, "ii", 'i')
{
    return wf_ok(ret, wf_int((int64_t)((uint64_t)args[0].i + (uint64_t)args[1].i)));
}

WF_EXPORT(add_float, "ff", 'f') { return wf_ok(ret, wf_float(args[0].f + args[1].f)); }

WF_EXPORT(negate, "?", '?') { return wf_ok(ret, wf_bool(!args[0].b)); }

WF_EXPORT(none, "", 'n') { return wf_ok(ret, wf_none()); }

/* types(i, f, b, s, t) -> "i=<i> f=<f> b=<len(b)> s=<s> t=<0|1>", e.g. "i=5 f=2.5 b=3 s=abc t=1";
 * i in decimal, f as put_float above, s verbatim (the whole reply is capped at 4095 bytes). */
WF_EXPORT(types, "ifbs?", 's')
{
    text_reset();
    put_str("i=");
    put_int(args[0].i);
    put_str(" f=");
    put_float(args[1].f);
    put_str(" b=");
    put_uint(args[2].len);
    put_str(" s=");
    put_strn(args[3].ptr, args[3].len);
    put_str(" t=");
    put_uint(args[4].b);
    return text_ok(ret);
}

WF_EXPORT(hello, "", 's')
{
    wf_print("hello world\n");
    return wf_ok(ret, wf_str("hello world"));
}

/* Prints n bytes of 'x' with one wf_write, so the SDK must split them into exchange-sized pieces;
 * returns n. The bytes come from the heap. */
WF_EXPORT(print_big, "i", 'i')
{
    int64_t n = args[0].i;
    if (n < 0)
        return wf_error(ret, "print_big: n must be >= 0");
    char *p = wf_malloc((size_t)n);
    if (!p)
        return wf_error(ret, "print_big: n is larger than the free heap");
    memset(p, 'x', (size_t)n);
    wf_write(p, (size_t)n);
    wf_free(p);
    return wf_ok(ret, wf_int(n));
}

/* ---- Memory ----------------------------------------------------------------------------------- */

static int64_t heap_page_count(void) { return (int64_t)(wf_info()->heap_size / WF_PAGE_SIZE); }

static volatile uint8_t *heap_page(int64_t page)
{
    return (volatile uint8_t *)(uintptr_t)(wf_info()->heap_addr + (uint64_t)page * WF_PAGE_SIZE);
}

/* Says which pages were asked for and how many there are. */
static int page_range_error(struct wf_value *ret, const char *who, int64_t first, int64_t count)
{
    text_reset();
    put_str(who);
    put_str(": heap pages ");
    put_int(first);
    put_str("..");
    put_int(first + count - 1);
    put_str(" are out of range: the heap has pages 0..");
    put_int(heap_page_count() - 1);
    return text_error(ret);
}

/* Writes `value` (its low byte) into the first byte of heap pages first .. first+count-1. */
WF_EXPORT(touch, "iii", 'i')
{
    int64_t first = args[0].i, count = args[1].i, pages = heap_page_count();
    if (first < 0 || count < 0 || first > pages || count > pages - first)
        return page_range_error(ret, "touch", first, count);
    for (int64_t k = 0; k < count; k++)
        *heap_page(first + k) = (uint8_t)args[2].i;
    return wf_ok(ret, wf_int(count));
}

WF_EXPORT(read_byte, "i", 'i')
{
    int64_t page = args[0].i;
    if (page < 0 || page >= heap_page_count())
        return page_range_error(ret, "read_byte", page, 1);
    return wf_ok(ret, wf_int(*heap_page(page)));
}

WF_EXPORT(heap_pages, "", 'i') { return wf_ok(ret, wf_int(heap_page_count())); }

/* The sum of all heap bytes as unsigned values (0 for an untouched heap). */
WF_EXPORT(checksum, "", 'i')
{
    const struct wf_info *info = wf_info();
    const uint8_t *p = (const uint8_t *)(uintptr_t)info->heap_addr;
    uint64_t sum = 0;
    for (uint64_t k = 0; k < info->heap_size; k++)
        sum += p[k];
    return wf_ok(ret, wf_int((int64_t)sum));
}

/* Block k is 1 + (k * 131) % 1024 bytes; byte j of it holds (k * 31 + j) & 0xff. */
static size_t block_size(int64_t k) { return 1 + (size_t)(k * 131 % 1024); }
static uint8_t block_byte(int64_t k, size_t j) { return (uint8_t)(k * 31 + (int64_t)j); }

static void fill_block(uint8_t *p, int64_t k)
{
    for (size_t j = 0; j < block_size(k); j++)
        p[j] = block_byte(k, j);
}

static int block_ok(const uint8_t *p, int64_t k)
{
    for (size_t j = 0; j < block_size(k); j++)
        if (p[j] != block_byte(k, j))
            return 0;
    return 1;
}

/* Allocates n blocks (sizes above) and fills them; frees the odd ones; grows the even ones with
 * wf_realloc; refills the odd ones with wf_calloc (checking the zeros); checks every block; frees
 * everything; then checks that the free blocks coalesced into one by allocating the whole heap.
 * Returns the sum of the n block sizes (the host can compute it); an error names the failed step.
 * It leaves the heap dirty. */
WF_EXPORT(alloc_test, "i", 'i')
{
    int64_t n = args[0].i, sum = 0;
    const char *failed = 0;
    if (n < 0 || n > 1000000)
        return wf_error(ret, "alloc_test: n must be in 0..1000000");
    uint8_t **blocks = wf_calloc((size_t)n + 1, sizeof *blocks);
    if (!blocks)
        return wf_error(ret, "alloc_test: out of memory for the block table");

    for (int64_t k = 0; k < n && !failed; k++) {
        if (!(blocks[k] = wf_malloc(block_size(k))))
            failed = "alloc_test: out of memory (wf_malloc)";
        else if ((uintptr_t)blocks[k] & 15)
            failed = "alloc_test: wf_malloc returned a pointer not aligned to 16";
        else
            fill_block(blocks[k], k), sum += (int64_t)block_size(k);
    }
    for (int64_t k = 1; k < n && !failed; k += 2) {
        wf_free(blocks[k]);
        blocks[k] = 0;
    }
    for (int64_t k = 0; k < n && !failed; k += 2) {
        uint8_t *p = wf_realloc(blocks[k], 2 * block_size(k));
        if (!p)
            failed = "alloc_test: out of memory (wf_realloc)";
        else if (!block_ok((blocks[k] = p), k))
            failed = "alloc_test: wf_realloc lost the contents";
    }
    for (int64_t k = 1; k < n && !failed; k += 2) {
        uint8_t *p = blocks[k] = wf_calloc(block_size(k), 1);
        if (!p) {
            failed = "alloc_test: out of memory (wf_calloc)";
            break;
        }
        for (size_t j = 0; j < block_size(k); j++)
            if (p[j])
                failed = "alloc_test: wf_calloc memory is not zero";
        fill_block(p, k);
    }
    for (int64_t k = 0; k < n && !failed; k++)
        if (!block_ok(blocks[k], k))
            failed = "alloc_test: a block was overwritten";

    for (int64_t k = 0; k < n; k++)
        wf_free(blocks[k]);
    wf_free(blocks);
    if (failed)
        return wf_error(ret, failed);

    /* All free again: only a fully coalesced heap has room for one block spanning all of it. */
    const struct wf_info *info = wf_info();
    if (info->heap_size >= 64 && info->heap_addr % 16 == 0) {
        size_t all = (info->heap_size & ~(uint64_t)15) - 16;
        void *p = wf_malloc(all);
        if (!p)
            return wf_error(ret, "alloc_test: the free blocks did not coalesce");
        if (wf_malloc(1))
            return wf_error(ret, "alloc_test: wf_malloc handed out more than the heap");
        wf_free(p);
    }
    return wf_ok(ret, wf_int(sum));
}

/* ---- Compute ---------------------------------------------------------------------------------- */

/* wf_compute_loop(n); its uint64 result is returned as the int64 with the same bits. */
WF_EXPORT(compute, "i", 'i')
{
    if (args[0].i < 0)
        return wf_error(ret, "compute: n must be >= 0");
    return wf_ok(ret, wf_int((int64_t)wf_compute_loop((uint64_t)args[0].i)));
}

/* Never returns: for timeout and cancel tests. The empty asm with a memory clobber is a side
 * effect the compiler must keep, so the loop stays (an empty infinite loop may be removed). */
WF_EXPORT(spin, "", 'n')
{
    for (;;)
        __asm__ volatile("" : : : "memory");
    return 0;
}

/* ---- CPU identity ----------------------------------------------------------------------------- */

/* cpuid(leaf, subleaf) -> 16 bytes: EAX, EBX, ECX, EDX (little-endian) as this guest's own cpuid
 * instruction answers them. whpfast/cpu.py records a snapshot's CPU from it: what a guest sees
 * can differ from the host's instruction (the hypervisor may hide features). */
WF_EXPORT(cpuid, "ii", 'b')
{
    static uint32_t regs[4];
    __asm__ volatile("cpuid" : "=a"(regs[0]), "=b"(regs[1]), "=c"(regs[2]), "=d"(regs[3])
                     : "a"((uint32_t)args[0].i), "c"((uint32_t)args[1].i));
    return wf_ok(ret, wf_bytes(regs, sizeof regs));
}

/* ---- Faults ----------------------------------------------------------------------------------- */

/* fault(kind) raises a CPU exception; the host ends the call with a fault. If execution ever gets
 * past the faulting instruction, the call fails with an error saying so. */
WF_EXPORT(fault, "s", 'n')
{
    const char *kind = args[0].ptr;
    if (!strcmp(kind, "pagefault")) {
        /* Guest address 0x10 is not mapped. The empty asm hides the constant from GCC, which
         * would otherwise warn about (or reason about) a near-NULL access. */
        uintptr_t addr = 0x10;
        __asm__("" : "+r"(addr));
        *(volatile uint8_t *)addr = 1;
    } else if (!strcmp(kind, "divide")) {
        volatile uint64_t num = 1, den = 0;   /* volatile: a real `div`, not a folded constant */
        volatile uint64_t q = num / den;
        (void)q;
    } else if (!strcmp(kind, "invalid_opcode")) {
        __asm__ volatile("ud2");
    } else if (!strcmp(kind, "write_readonly_file")) {
        if (wf_info()->file_count == 0)
            return wf_error(ret, "fault: write_readonly_file needs a file mapping, and there is none");
        volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)wf_info()->files[0].addr;
        *p = (uint8_t)~*p;   /* a different value, so a write that went through is visible */
    } else {
        text_reset();
        put_str("fault: unknown kind '");
        put_str(kind);
        put_str("' (pagefault, divide, invalid_opcode, write_readonly_file)");
        return text_error(ret);
    }
    text_reset();
    put_str("fault: '");
    put_str(kind);
    put_str("' did not stop the call");
    return text_error(ret);
}

/* ---- Files and host calls --------------------------------------------------------------------- */

WF_EXPORT(file_byte, "si", 'i')
{
    const char *name = args[0].ptr;
    int64_t offset = args[1].i;
    size_t size;
    const uint8_t *data = wf_file(name, &size);
    text_reset();
    if (!data) {
        put_str("file_byte: no file named '");
        put_str(name);
        put_str("'");
        return text_error(ret);
    }
    if (offset < 0 || (uint64_t)offset >= size) {
        put_str("file_byte: offset ");
        put_int(offset);
        put_str(" is out of range for '");
        put_str(name);
        put_str("' (");
        put_uint(size);
        put_str(" bytes)");
        return text_error(ret);
    }
    return wf_ok(ret, wf_int(data[offset]));
}

/* Calls host function `name` with the int x and returns its int result. */
WF_EXPORT(call_host, "si", 'i')
{
    const char *name = args[0].ptr;
    struct wf_value arg = wf_int(args[1].i), result;
    int failed = wf_host_call(name, "i", &arg, &result);
    if (!failed && result.tag == WF_TAG_INT)
        return wf_ok(ret, result);
    text_reset();
    put_str("call_host: host function '");
    put_str(name);
    if (failed) {
        put_str("' failed: ");
        put_strn(result.ptr, result.len);
    } else {
        put_str("' returned a value that is not an int (tag ");
        put_uint(result.tag);
        put_str(")");
    }
    return text_error(ret);
}
