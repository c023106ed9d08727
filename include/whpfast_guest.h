/*
 * whpfast guest SDK: include this in guest C code, build it with `python -m whpfast build-guest`
 * (or whpfast.guestbuild.build_guest). The runtime (whpfast_runtime.c) is linked in and provides
 * the entry point, the host interface, a heap allocator and the few libc functions the compiler
 * may call. There is no other libc: no stdio, no threads, no constructors, no TLS.
 *
 *     #include "whpfast_guest.h"
 *
 *     WF_EXPORT(add, "ii", 'i') {                        // add(int, int) -> int
 *         return wf_ok(ret, wf_int(args[0].i + args[1].i));
 *     }
 *
 * Signature letters (whpfast_abi.h): 'n' none, '?' bool, 'i' int64, 'f' double, 'b' bytes,
 * 's' str. The runtime checks every argument against the declared letters before the function
 * runs, and the returned value against the result letter after it returns.
 */
#ifndef WHPFAST_GUEST_H
#define WHPFAST_GUEST_H

#include <stddef.h>
#include <stdint.h>

#include "whpfast_abi.h"

/* One argument or result. bytes and str use ptr + len; a str received from the host (an argument
 * or a host call result) is zero-terminated, a str given to the SDK need not be (len counts). */
struct wf_value {
    uint32_t tag;   /* WF_TAG_* */
    uint32_t len;   /* payload bytes (str: without the terminating zero) */
    union {
        int64_t     i;    /* WF_TAG_INT */
        double      f;    /* WF_TAG_FLOAT */
        int         b;    /* WF_TAG_BOOL: 0 or 1 */
        const void *ptr;  /* WF_TAG_BYTES, WF_TAG_STR */
    };
};

static inline struct wf_value wf_none(void)
{
    struct wf_value v = { .tag = WF_TAG_NONE, .len = 0 };
    v.i = 0;
    return v;
}

static inline struct wf_value wf_int(int64_t x)
{
    struct wf_value v = { .tag = WF_TAG_INT, .len = 8 };
    v.i = x;
    return v;
}

static inline struct wf_value wf_float(double x)
{
    struct wf_value v = { .tag = WF_TAG_FLOAT, .len = 8 };
    v.f = x;
    return v;
}

static inline struct wf_value wf_bool(int x)
{
    struct wf_value v = { .tag = WF_TAG_BOOL, .len = 1 };
    v.i = 0;
    v.b = x != 0;
    return v;
}

static inline struct wf_value wf_bytes(const void *p, size_t n)
{
    struct wf_value v = { .tag = WF_TAG_BYTES, .len = (uint32_t)n };
    v.ptr = p;
    return v;
}

static inline struct wf_value wf_strn(const char *s, size_t n)
{
    struct wf_value v = { .tag = WF_TAG_STR, .len = (uint32_t)n };
    v.ptr = s;
    return v;
}

static inline struct wf_value wf_str(const char *s)
{
    return wf_strn(s, __builtin_strlen(s));
}

/* ---- Exports --------------------------------------------------------------------------------
 * WF_EXPORT(name, params, result) starts the definition of an exported function; write its body
 * right after the macro. Inside, `args` holds one value per letter of `params` (already checked)
 * and `ret` points to the result, preset to wf_none(). Return wf_ok(ret, value) on success or
 * wf_error(ret, "message") on failure (the host raises it as an exception).
 *
 * A returned bytes/str must stay valid after the function returns, because the runtime copies it
 * into the output buffer afterwards: point it at static data, the heap, or into `args` (the input
 * buffer) -- never at a local array.
 *
 * The export table is the ELF section "wf_exports", an array of struct wf_export; the host reads
 * it to learn names and signatures, and a call names its function by index into it. More than
 * WF_MAX_ARGS parameter letters fail the build here (the host would refuse the guest at load). */
#define WF_STRINGIFY_(x) #x
#define WF_STRINGIFY(x) WF_STRINGIFY_(x)
#define WF_EXPORT(name, params, result)                                                           \
    _Static_assert(sizeof("" params "") - 1 <= WF_MAX_ARGS, "WF_EXPORT(" #name "): "              \
                   "at most " WF_STRINGIFY(WF_MAX_ARGS) " parameters");                           \
    static int wf_impl_##name(const struct wf_value *args __attribute__((unused)),                \
                              struct wf_value *ret __attribute__((unused)));                      \
    static const struct wf_export wf_export_##name                                                \
        __attribute__((used, section("wf_exports"), aligned(8))) = {                              \
            #name, "" params "", (uint64_t)(result),                                              \
            __extension__ (void *)wf_impl_##name };   /* the ABI stores fn as void * */           \
    static int wf_impl_##name(const struct wf_value *args __attribute__((unused)),                \
                              struct wf_value *ret __attribute__((unused)))

static inline int wf_ok(struct wf_value *ret, struct wf_value value)
{
    *ret = value;
    return 0;
}

/* msg must stay valid after the function returns (a string literal or a static buffer). */
static inline int wf_error(struct wf_value *ret, const char *msg)
{
    *ret = wf_str(msg);
    return 1;
}

/* ---- Host interface ------------------------------------------------------------------------- */

/* Calls the host function `name` with one argument per letter of `sig` (parameters only, e.g.
 * "is"; each args[k] must have the matching tag). Returns 0 with the host's result in *result, or
 * nonzero with a str error message in *result (the host function raised, or the call could not be
 * encoded or the reply was malformed). bytes/str results and error messages point into the
 * exchange buffer and stay valid until the next wf_host_call, wf_print, wf_write or wf_abort:
 * copy them if you need them longer. Arguments must not point into the exchange buffer. */
int wf_host_call(const char *name, const char *sig, const struct wf_value *args,
                 struct wf_value *result);

/* wf_host_call(name, "i", {x}) expecting an int result: 0 with *out set, nonzero on any error. */
int wf_host_call_int(const char *name, int64_t x, int64_t *out);

/* Text to the host (UTF-8), sent in pieces of at most the exchange buffer's size; a piece never
 * ends inside a UTF-8 sequence. wf_print adds no newline. */
void wf_print(const char *s);
void wf_write(const void *p, size_t n);

/* Ends the call with an error carrying msg (truncated to the exchange buffer). Never returns. */
_Noreturn void wf_abort(const char *msg);

/* The info page the host wrote (buffers, heap, file mappings). Read-only. */
static inline const struct wf_info *wf_info(void)
{
    return (const struct wf_info *)(uintptr_t)WF_INFO_ADDR;
}

/* The read-only mapping of the host file named `name`, or NULL; *size (if size is not NULL) gets
 * its length in bytes. Writing to it faults. */
const void *wf_file(const char *name, size_t *size);

/* ---- Heap -----------------------------------------------------------------------------------
 * First-fit allocator over the info page's heap; 16-byte aligned; NULL when out of memory.
 * It touches no heap memory before the first allocation. wf_free and wf_realloc abort the call
 * on a pointer that wf_malloc did not return (or that was already freed). */
void *wf_malloc(size_t n);
void *wf_calloc(size_t count, size_t size);
void *wf_realloc(void *p, size_t n);
void  wf_free(void *p);

/* ---- The libc subset the runtime provides (the compiler may also emit calls to these) ------- */
void  *memcpy(void *dst, const void *src, size_t n);
void  *memmove(void *dst, const void *src, size_t n);
void  *memset(void *dst, int c, size_t n);
int    memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int    strcmp(const char *a, const char *b);

#endif
