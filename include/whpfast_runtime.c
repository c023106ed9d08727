/*
 * whpfast guest runtime, linked into every guest: the entry point, message encoding, the host
 * interface, the heap allocator and a tiny libc subset. It uses no libc at all.
 *
 * Every call enters wf_entry afresh (RSP = stack top - 8, as if called) and ends with `out` on
 * WF_PORT_RETURN; the host never resumes after that, so nothing here ever returns to a caller.
 * All messages are checked field by field: a malformed call becomes an error result, never a crash.
 */
#include "whpfast_guest.h"

/* The export table: GNU ld (or the linker script) defines these around the section. */
extern const struct wf_export __start_wf_exports[], __stop_wf_exports[];

typedef int (*wf_fn)(const struct wf_value *args, struct wf_value *ret);

/* ---- Ports ------------------------------------------------------------------------------------
 * `out dx, eax` with the message length; the TSS I/O bitmap allows exactly our ports at CPL3.
 * The "memory" clobber makes the compiler finish writing the buffer before the exit and reread it
 * afterwards, because the host reads and writes it while the guest is stopped. */
static inline void wf_out(uint16_t port, uint32_t length)
{
    __asm__ volatile("outl %%eax, %%dx" : : "a"(length), "d"(port) : "memory");
}

/* After RETURN/ABORT the host never resumes us; if a buggy host did, spin (its timeout ends the
 * call) rather than run into whatever follows. */
static _Noreturn void wf_hang(void)
{
    for (;;)
        __asm__ volatile("pause" : : : "memory");
}

/* ---- Small helpers ------------------------------------------------------------------------- */

static uint64_t pad8(uint64_t n) { return (n + 7) & ~7ull; }

/* Bytes one encoded value takes: 8-byte value header, payload, zero padding to 8. A str always
 * gets at least one zero byte after it. */
static uint64_t value_size(uint32_t tag, uint64_t len)
{
    return 8 + pad8(tag == WF_TAG_STR ? len + 1 : len);
}

static int tag_of(int letter)
{
    switch (letter) {
    case WF_SIG_NONE:  return WF_TAG_NONE;
    case WF_SIG_BOOL:  return WF_TAG_BOOL;
    case WF_SIG_INT:   return WF_TAG_INT;
    case WF_SIG_FLOAT: return WF_TAG_FLOAT;
    case WF_SIG_BYTES: return WF_TAG_BYTES;
    case WF_SIG_STR:   return WF_TAG_STR;
    default:           return -1;
    }
}

static const char *tag_name(uint32_t tag)
{
    static const char *const names[] = { "none", "bool", "int", "float", "bytes", "str" };
    return tag <= WF_TAG_STR ? names[tag] : "unknown tag";
}

/* Payload length of the fixed-size tags; -1 for bytes/str. */
static int64_t fixed_len(uint32_t tag)
{
    switch (tag) {
    case WF_TAG_NONE:  return 0;
    case WF_TAG_BOOL:  return 1;
    case WF_TAG_INT:
    case WF_TAG_FLOAT: return 8;
    default:           return -1;
    }
}

static int overlaps(const void *p, uint64_t n, uint64_t addr, uint64_t size)
{
    uint64_t a = (uintptr_t)p;
    return n && a < addr + size && addr < a + n;
}

/* A bounded string builder for error messages (always zero-terminated, silently truncated). */
struct text {
    char  *buf;
    size_t cap, len;
};

static void put(struct text *t, const char *s)
{
    while (*s && t->len + 1 < t->cap)
        t->buf[t->len++] = *s++;
    t->buf[t->len] = 0;
}

static void put_u64(struct text *t, uint64_t x)
{
    char digits[21];
    int n = sizeof digits - 1;
    digits[n] = 0;
    do
        digits[--n] = (char)('0' + x % 10);
    while (x /= 10);
    put(t, digits + n);
}

static struct wf_value text_value(const struct text *t) { return wf_strn(t->buf, t->len); }

/* ---- Value encoding -------------------------------------------------------------------------- */

/* Decodes the value at p (avail bytes up to the end of the message) into *v; *size gets its
 * encoded size. Returns NULL, or why the value is malformed. */
static const char *decode_value(const uint8_t *p, uint64_t avail, struct wf_value *v,
                                uint64_t *size)
{
    if (avail < 8)
        return "value header runs past the end of the message";
    uint32_t tag = ((const uint32_t *)p)[0], len = ((const uint32_t *)p)[1];
    if (tag > WF_TAG_STR)
        return "unknown value tag";
    int64_t fixed = fixed_len(tag);
    if (fixed >= 0 && len != fixed)
        return "wrong payload length for its tag";
    *size = value_size(tag, len);
    if (*size > avail)
        return "value runs past the end of the message";
    const uint8_t *data = p + 8;
    v->tag = tag;
    v->len = len;
    v->i = 0;
    switch (tag) {
    case WF_TAG_BOOL:
        if (data[0] > 1)
            return "bool payload is not 0 or 1";
        v->b = data[0];
        break;
    case WF_TAG_INT:
    case WF_TAG_FLOAT:
        __builtin_memcpy(&v->i, data, 8);   /* the same 8 bytes for both members */
        break;
    case WF_TAG_STR:
        if (data[len] != 0)
            return "str is not zero-terminated";
        /* fall through */
    case WF_TAG_BYTES:
        v->ptr = data;
        break;
    }
    return 0;
}

/* Returns NULL if v can be encoded, or why not. */
static const char *check_value(const struct wf_value *v)
{
    if (v->tag > WF_TAG_STR)
        return "unknown value tag";
    if ((v->tag == WF_TAG_BYTES || v->tag == WF_TAG_STR) && v->len && !v->ptr)
        return "bytes/str value with a NULL pointer";
    return 0;
}

static uint64_t encoded_len(const struct wf_value *v)
{
    int64_t fixed = fixed_len(v->tag);
    return fixed >= 0 ? (uint64_t)fixed : v->len;
}

/* Writes v (already checked) at p, which has room for value_size(). Returns the bytes written.
 * memmove: the payload may come from anywhere, even the buffer being written. */
static uint64_t encode_value(uint8_t *p, const struct wf_value *v)
{
    uint64_t len = encoded_len(v), size = value_size(v->tag, len);
    uint8_t *data = p + 8;
    if (v->tag == WF_TAG_BYTES || v->tag == WF_TAG_STR)
        memmove(data, v->ptr, len);
    else if (v->tag == WF_TAG_BOOL)
        data[0] = v->b != 0;
    else if (len)
        __builtin_memcpy(data, &v->i, 8);
    memset(data + len, 0, size - 8 - len);
    ((uint32_t *)p)[0] = v->tag;
    ((uint32_t *)p)[1] = (uint32_t)len;
    return size;
}

/* ---- The call ---------------------------------------------------------------------------------- */

static char call_error[256];

/* Parses the call message, runs the export. Returns its status; *ret is the result or a str
 * error message. */
static int run_call(struct wf_value *ret)
{
    const struct wf_info *info = wf_info();
    const uint8_t *in = (const uint8_t *)(uintptr_t)info->input_addr;
    const struct wf_msg_header *h = (const struct wf_msg_header *)in;
    struct text t = { call_error, sizeof call_error, 0 };
    struct wf_value args[WF_MAX_ARGS];

    put(&t, "malformed call message: ");
    if (info->input_size < sizeof *h || h->magic != WF_MAGIC_CALL) {
        put(&t, "bad magic");
        goto bad;
    }
    if (h->length < sizeof *h || h->length > info->input_size) {
        put(&t, "length ");
        put_u64(&t, h->length);
        put(&t, " is outside [16, input buffer size ");
        put_u64(&t, info->input_size);
        put(&t, "]");
        goto bad;
    }
    uint64_t count = (uint64_t)(__stop_wf_exports - __start_wf_exports);
    if (h->a >= count) {
        put(&t, "export index ");
        put_u64(&t, h->a);
        put(&t, " out of range (the guest has ");
        put_u64(&t, count);
        put(&t, " exports)");
        goto bad;
    }
    const struct wf_export *e = &__start_wf_exports[h->a];
    size_t nparams = e->params ? strlen(e->params) : WF_MAX_ARGS + 1;
    if (nparams > WF_MAX_ARGS || h->b != nparams) {
        put(&t, "export '");
        put(&t, e->name);
        put(&t, "' takes ");
        put_u64(&t, nparams);
        put(&t, " arguments, the call has ");
        put_u64(&t, h->b);
        goto bad;
    }
    uint64_t off = sizeof *h;
    for (uint32_t k = 0; k < h->b; k++) {
        uint64_t size;
        const char *why = decode_value(in + off, h->length - off, &args[k], &size);
        int want = tag_of(e->params[k]);
        if (why || (int)args[k].tag != want) {
            put(&t, "argument ");
            put_u64(&t, k);
            put(&t, " of '");
            put(&t, e->name);
            put(&t, "': ");
            if (why) {
                put(&t, why);
            } else {
                put(&t, "expected ");
                put(&t, want < 0 ? "an unknown signature letter" : tag_name((uint32_t)want));
                put(&t, ", got ");
                put(&t, tag_name(args[k].tag));
            }
            goto bad;
        }
        off += size;
    }

    *ret = wf_none();   /* so a function returning none can just `return 0` */
    int status = (__extension__ (wf_fn)e->fn)(args, ret);   /* fn is void * in the ABI */

    t.len = 0;
    put(&t, "export '");
    put(&t, e->name);
    if (status != 0) {
        if (ret->tag == WF_TAG_STR && !check_value(ret))
            return WF_STATUS_ERROR;
        put(&t, "' failed without an error message");
        goto bad;
    }
    const char *why = check_value(ret);
    if (why) {
        put(&t, "' returned a malformed value: ");
        put(&t, why);
        goto bad;
    }
    if ((int)ret->tag != tag_of((int)e->result)) {
        put(&t, "' returned ");
        put(&t, tag_name(ret->tag));
        put(&t, " but declares result '");
        char letter[2] = { (char)e->result, 0 };
        put(&t, letter);
        put(&t, "'");
        goto bad;
    }
    return WF_STATUS_OK;

bad:
    *ret = text_value(&t);
    return WF_STATUS_ERROR;
}

/* Writes the result message into the output buffer; returns its length, 0 if it does not fit. */
static uint64_t encode_result(int status, const struct wf_value *v)
{
    const struct wf_info *info = wf_info();
    uint8_t *out = (uint8_t *)(uintptr_t)info->output_addr;
    uint64_t length = sizeof(struct wf_msg_header) + value_size(v->tag, encoded_len(v));
    if (length > info->output_size)
        return 0;
    encode_value(out + sizeof(struct wf_msg_header), v);
    struct wf_msg_header *h = (struct wf_msg_header *)out;
    h->magic = WF_MAGIC_RESULT;
    h->length = (uint32_t)length;
    h->a = (uint32_t)status;
    h->b = 0;
    return length;
}

static _Noreturn void finish(int status, struct wf_value *v)
{
    static char why[160];
    uint64_t length = encode_result(status, v);
    if (!length && status == WF_STATUS_OK) {
        struct text t = { why, sizeof why, 0 };
        put(&t, "the result (");
        put_u64(&t, sizeof(struct wf_msg_header) + value_size(v->tag, encoded_len(v)));
        put(&t, " bytes encoded) does not fit the output buffer (");
        put_u64(&t, wf_info()->output_size);
        put(&t, " bytes)");
        *v = text_value(&t);
        status = WF_STATUS_ERROR;
        length = encode_result(status, v);
    }
    /* An error message that does not fit is cut to what does: 16 header + 8 value header +
     * pad8(len + 1) <= size; and not inside a UTF-8 sequence. */
    uint64_t size = wf_info()->output_size;
    if (!length && size >= 32) {
        const uint8_t *s = v->ptr;
        uint32_t len = (uint32_t)(((size - 24) & ~7ull) - 1);
        while (len > 0 && (s[len] & 0xC0) == 0x80)
            len--;
        v->len = len;
        length = encode_result(status, v);
    }
    if (!length)
        wf_abort("the output buffer is too small for a result message");
    wf_out(WF_PORT_RETURN, (uint32_t)length);
    wf_hang();
}

__attribute__((used)) _Noreturn void wf_entry(void)
{
    const struct wf_info *info = wf_info();
    /* With a wrong info page no buffer address can be trusted: abort with an empty message. */
    if (info->magic != WF_INFO_MAGIC || info->abi_version != WF_ABI_VERSION) {
        wf_out(WF_PORT_ABORT, 0);
        wf_hang();
    }
    struct wf_value ret;
    int status = run_call(&ret);
    finish(status, &ret);
}

/* ---- Host interface ---------------------------------------------------------------------------- */

static char host_error[160];

static int host_call_failed(struct wf_value *result, const char *why)
{
    struct text t = { host_error, sizeof host_error, 0 };
    put(&t, "wf_host_call: ");
    put(&t, why);
    *result = text_value(&t);
    return WF_STATUS_ERROR;
}

int wf_host_call(const char *name, const char *sig, const struct wf_value *args,
                 struct wf_value *result)
{
    const struct wf_info *info = wf_info();
    uint8_t *ex = (uint8_t *)(uintptr_t)info->exchange_addr;
    uint64_t cap = info->exchange_size;
    uint64_t name_len = strlen(name), argc = strlen(sig);

    /* Check and measure everything before writing: arguments are read from wherever they live. */
    if (argc > WF_MAX_ARGS)
        return host_call_failed(result, "more than WF_MAX_ARGS arguments");
    if (overlaps(name, name_len, info->exchange_addr, cap))
        return host_call_failed(result, "the name points into the exchange buffer");
    uint64_t length = sizeof(struct wf_msg_header) + pad8(name_len);
    for (uint64_t k = 0; k < argc; k++) {
        if (tag_of(sig[k]) < 0)
            return host_call_failed(result, "unknown letter in the signature");
        if ((int)args[k].tag != tag_of(sig[k]))
            return host_call_failed(result, "an argument's tag does not match the signature");
        const char *why = check_value(&args[k]);
        if (why)
            return host_call_failed(result, why);
        uint64_t len = encoded_len(&args[k]);
        if (args[k].tag >= WF_TAG_BYTES && overlaps(args[k].ptr, len, info->exchange_addr, cap))
            return host_call_failed(result,
                                    "an argument points into the exchange buffer (copy it first)");
        length += value_size(args[k].tag, len);
    }
    if (length > cap)
        return host_call_failed(result, "the arguments do not fit the exchange buffer");

    struct wf_msg_header *h = (struct wf_msg_header *)ex;
    h->magic = WF_MAGIC_HOSTCALL;
    h->length = (uint32_t)length;
    h->a = (uint32_t)argc;
    h->b = (uint32_t)name_len;
    uint64_t off = sizeof *h;
    memcpy(ex + off, name, name_len);
    memset(ex + off + name_len, 0, pad8(name_len) - name_len);
    off += pad8(name_len);
    for (uint64_t k = 0; k < argc; k++)
        off += encode_value(ex + off, &args[k]);

    wf_out(WF_PORT_HOSTCALL, (uint32_t)length);

    /* The host wrote the reply over the request. */
    if (h->magic != WF_MAGIC_REPLY)
        return host_call_failed(result, "the reply has a bad magic");
    if (h->length < sizeof *h || h->length > cap)
        return host_call_failed(result, "the reply length is out of range");
    if (h->a != WF_STATUS_OK && h->a != WF_STATUS_ERROR)
        return host_call_failed(result, "the reply status is neither ok nor error");
    uint64_t size;
    const char *why = decode_value(ex + sizeof *h, h->length - sizeof *h, result, &size);
    if (why)
        return host_call_failed(result, why);
    if (h->a == WF_STATUS_ERROR && result->tag != WF_TAG_STR)
        return host_call_failed(result, "an error reply without a str message");
    return (int)h->a;
}

int wf_host_call_int(const char *name, int64_t x, int64_t *out)
{
    struct wf_value arg = wf_int(x), result;
    if (wf_host_call(name, "i", &arg, &result) != 0 || result.tag != WF_TAG_INT)
        return 1;
    *out = result.i;
    return 0;
}

void wf_write(const void *p, size_t n)
{
    const struct wf_info *info = wf_info();
    uint8_t *ex = (uint8_t *)(uintptr_t)info->exchange_addr;
    const uint8_t *s = p;
    size_t cap = info->exchange_size;
    while (n && cap) {
        size_t k = n < cap ? n : cap;
        /* The host decodes each piece on its own, so end it before a UTF-8 sequence that would
         * not fit (s[k] a continuation byte): back up to that sequence's lead byte. */
        if (k < n) {
            size_t j = k;
            while (j > 0 && k - j < 3 && (s[j] & 0xC0) == 0x80)
                j--;
            if (j > 0 && (s[j] & 0xC0) != 0x80)
                k = j;
        }
        memmove(ex, s, k);   /* s may itself lie in the exchange buffer (a host call result) */
        wf_out(WF_PORT_PRINT, (uint32_t)k);
        s += k;
        n -= k;
    }
}

void wf_print(const char *s) { wf_write(s, strlen(s)); }

_Noreturn void wf_abort(const char *msg)
{
    const struct wf_info *info = wf_info();
    size_t n = strlen(msg);
    if (n > info->exchange_size)
        n = info->exchange_size;
    memmove((void *)(uintptr_t)info->exchange_addr, msg, n);
    wf_out(WF_PORT_ABORT, (uint32_t)n);
    wf_hang();
}

const void *wf_file(const char *name, size_t *size)
{
    const struct wf_info *info = wf_info();
    uint32_t count = info->file_count < WF_MAX_FILES ? info->file_count : WF_MAX_FILES;
    for (uint32_t k = 0; k < count; k++) {
        const struct wf_file_entry *f = &info->files[k];
        /* Bounded compare: the host's name field is not trusted to be zero-terminated. */
        for (size_t c = 0; c < WF_FILE_NAME_MAX && f->name[c] == name[c]; c++) {
            if (!name[c]) {
                if (size)
                    *size = f->size;
                return (const void *)(uintptr_t)f->addr;
            }
        }
    }
    return 0;
}

/* ---- Heap -------------------------------------------------------------------------------------
 * Blocks tile the heap; each starts with this 16-byte header, so payloads stay 16-byte aligned.
 * Free blocks form a list sorted by address, which makes coalescing with both neighbours a
 * single walk. State lives in .bss and the heap is only written from the first allocation on, so
 * an unused heap stays all zero pages (cheap to snapshot and restore). */
struct block {
    uint64_t size;                 /* whole block in bytes, header included, multiple of 16 */
    union {
        struct block *next;        /* free: the next free block (higher address) or NULL */
        uint64_t      used;        /* allocated: USED_MARK ^ own address */
    };
};
/* High bits set: never equal to a heap address or NULL, so a freed block fails the check. */
#define USED_MARK 0xA110CA7ED0000000ull
#define MIN_BLOCK 32ull

static struct block *free_list;
static uint8_t *heap_lo, *heap_hi;
static int heap_ready;

static void heap_init(void)
{
    const struct wf_info *info = wf_info();
    heap_lo = (uint8_t *)(uintptr_t)((info->heap_addr + 15) & ~15ull);
    heap_hi = (uint8_t *)(uintptr_t)((info->heap_addr + info->heap_size) & ~15ull);
    heap_ready = 1;
    if (heap_hi > heap_lo && (uint64_t)(heap_hi - heap_lo) >= MIN_BLOCK) {
        free_list = (struct block *)heap_lo;
        free_list->size = (uint64_t)(heap_hi - heap_lo);
        free_list->next = 0;
    }
}

void *wf_malloc(size_t n)
{
    if (!heap_ready)
        heap_init();
    if (n > (uint64_t)(heap_hi - heap_lo))   /* also keeps the rounding below from overflowing */
        return 0;
    uint64_t need = sizeof(struct block) + (n ? (n + 15) & ~15ull : 16);
    for (struct block **link = &free_list, *b; (b = *link); link = &b->next) {
        if (b->size < need)
            continue;
        if (b->size - need >= MIN_BLOCK) {   /* split; the tail stays free in b's place */
            struct block *rest = (struct block *)((uint8_t *)b + need);
            rest->size = b->size - need;
            rest->next = b->next;
            *link = rest;
            b->size = need;
        } else {
            *link = b->next;
        }
        b->used = USED_MARK ^ (uintptr_t)b;
        return b + 1;
    }
    return 0;
}

/* The header of an allocated block, or abort: freeing a bad pointer would corrupt the heap. */
static struct block *block_of(void *p, const char *who)
{
    struct block *b = (struct block *)p - 1;
    if (!heap_ready || ((uintptr_t)p & 15) || (uint8_t *)b < heap_lo ||
        (uint8_t *)p > heap_hi || b->used != (USED_MARK ^ (uintptr_t)b) ||
        b->size < MIN_BLOCK || b->size > (uint64_t)(heap_hi - (uint8_t *)b))
        wf_abort(who);
    return b;
}

void wf_free(void *p)
{
    if (!p)
        return;
    struct block *b = block_of(p, "wf_free: not a pointer from wf_malloc, or freed twice");
    struct block *prev = 0, *next = free_list;
    while (next && next < b) {
        prev = next;
        next = next->next;
    }
    b->next = next;
    if (next && (uint8_t *)b + b->size == (uint8_t *)next) {
        b->size += next->size;
        b->next = next->next;
    }
    if (!prev) {
        free_list = b;
    } else if ((uint8_t *)prev + prev->size == (uint8_t *)b) {
        prev->size += b->size;
        prev->next = b->next;
    } else {
        prev->next = b;
    }
}

void *wf_calloc(size_t count, size_t size)
{
    if (size && count > (size_t)-1 / size)
        return 0;
    void *p = wf_malloc(count * size);
    if (p)
        memset(p, 0, count * size);   /* reused blocks are dirty */
    return p;
}

void *wf_realloc(void *p, size_t n)
{
    if (!p)
        return wf_malloc(n);
    if (!n) {
        wf_free(p);
        return 0;
    }
    size_t have = block_of(p, "wf_realloc: not a pointer from wf_malloc, or already freed")->size
                  - sizeof(struct block);
    if (n <= have)
        return p;
    void *q = wf_malloc(n);
    if (q) {
        memcpy(q, p, have);
        wf_free(p);
    }
    return q;
}

/* ---- libc subset -------------------------------------------------------------------------------
 * memcpy/memset/memmove are `rep movsb/stosb` (fast on current CPUs) rather than C loops, which
 * GCC may turn back into calls to memcpy/memset, i.e. into themselves. */
void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    /* dst below src, or no overlap: a forward copy never overwrites unread source bytes. */
    if ((uintptr_t)dst - (uintptr_t)src >= n)
        return memcpy(dst, src, n);
    const uint8_t *s = (const uint8_t *)src + n - 1;
    uint8_t *d = (uint8_t *)dst + n - 1;
    __asm__ volatile("std\n\trep movsb\n\tcld" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const uint8_t *x = a, *y = b;
    for (size_t k = 0; k < n; k++)
        if (x[k] != y[k])
            return x[k] - y[k];
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return (uint8_t)*a - (uint8_t)*b;
}
