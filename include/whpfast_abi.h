/*
 * whpfast guest ABI: the contract between the host (whpfast/abi.py mirrors every constant here;
 * tests/test_abi.py checks that they agree) and guest code built with the SDK.
 *
 * Guest code runs at CPL3 in 64-bit long mode with identity-mapped 4 KiB pages (GVA == GPA).
 * It talks to the host only through `out dx, eax` on the ports below (the TSS I/O permission
 * bitmap allows exactly these ports from CPL3) and through the buffers the info page describes.
 * Every message starts with a 16-byte header; every length in it is checked by the reader.
 */
#ifndef WHPFAST_ABI_H
#define WHPFAST_ABI_H

#include <stdint.h>

#define WF_ABI_VERSION 1

/* Fixed guest addresses. */
#define WF_INFO_ADDR      0x1000ULL     /* struct wf_info, user read-only */
#define WF_IMAGE_BASE     0x100000ULL   /* guest ELF images are linked here */
#define WF_PAGE_SIZE      4096ULL

/* I/O ports. The 32-bit value written is the length of the message in the named buffer. They are
 * 4 apart because a 32-bit `out` from CPL3 must be allowed by the TSS bitmap for all 4 byte ports
 * it touches; the bitmap allows 0xE0-0xEF and nothing else, so CPL3 can never reach WF_PORT_FAULT. */
#define WF_PORT_RETURN    0xE0   /* call finished; result message in the output buffer */
#define WF_PORT_HOSTCALL  0xE4   /* host call request in exchange; the host replies in exchange */
#define WF_PORT_PRINT     0xE8   /* UTF-8 text in exchange */
#define WF_PORT_ABORT     0xEC   /* UTF-8 message in exchange; the call ends */
#define WF_PORT_FAULT     0xF0   /* CPL0 exception stub: record in the fault page (CPL0 only) */

/* Magic numbers of the message headers (little-endian ASCII). */
#define WF_MAGIC_CALL     0x4C434657u  /* "WFCL" host -> guest, input buffer   */
#define WF_MAGIC_RESULT   0x53524657u  /* "WFRS" guest -> host, output buffer  */
#define WF_MAGIC_HOSTCALL 0x43484657u  /* "WFHC" guest -> host, exchange       */
#define WF_MAGIC_REPLY    0x50524657u  /* "WFRP" host -> guest, exchange       */

/* Value tags. Each encoded value is: uint32 tag, uint32 length, payload, zero padding up to a
 * multiple of 8 bytes. A str payload is UTF-8 and is always followed by at least one zero byte
 * (the padding includes it), so guest code can use it as a C string. */
#define WF_TAG_NONE   0   /* length 0 */
#define WF_TAG_BOOL   1   /* length 1: 0 or 1 */
#define WF_TAG_INT    2   /* length 8: int64 */
#define WF_TAG_FLOAT  3   /* length 8: IEEE double */
#define WF_TAG_BYTES  4   /* length n */
#define WF_TAG_STR    5   /* length n, UTF-8 */

/* Signature letters used in export tables and host calls, one per parameter / for the result. */
#define WF_SIG_NONE  'n'
#define WF_SIG_BOOL  '?'
#define WF_SIG_INT   'i'
#define WF_SIG_FLOAT 'f'
#define WF_SIG_BYTES 'b'
#define WF_SIG_STR   's'

#define WF_MAX_ARGS   16
#define WF_MAX_FILES  32
#define WF_FILE_NAME_MAX 48   /* including the terminating zero */

/* Header of every message: call (input), result (output), host call and reply (exchange). */
struct wf_msg_header {
    uint32_t magic;
    uint32_t length;  /* total bytes including this header */
    uint32_t a;       /* call: export index   result/reply: status (0 ok, 1 error)  hostcall: argc */
    uint32_t b;       /* call: argc           result/reply: 0                      hostcall: name length */
};
/* call:     header, then argc values.
 * result:   header, then one value (status 0: the result; status 1: a str error message).
 * hostcall: header, then the function name (b bytes, zero padded to 8), then argc values.
 * reply:    header, then one value (status 0: the result; status 1: a str error message). */

#define WF_STATUS_OK    0
#define WF_STATUS_ERROR 1

struct wf_file_entry {
    char     name[WF_FILE_NAME_MAX];
    uint64_t addr;      /* guest address of a read-only mapping */
    uint64_t size;      /* bytes of the file (the mapping is rounded up to whole pages) */
};

/* The info page, written by the host at WF_INFO_ADDR before the first call. */
struct wf_info {
    uint64_t magic;              /* WF_INFO_MAGIC */
    uint32_t abi_version;        /* WF_ABI_VERSION */
    uint32_t file_count;
    uint64_t input_addr,    input_size;
    uint64_t output_addr,   output_size;
    uint64_t exchange_addr, exchange_size;
    uint64_t stack_addr,    stack_size;
    uint64_t heap_addr,     heap_size;
    struct wf_file_entry files[WF_MAX_FILES];
};
#define WF_INFO_MAGIC 0x3154534146504857ULL  /* "WHPFAST1" */

/* Export table: the section "wf_exports" of a guest ELF is an array of these (32 bytes each). The
 * host reads it to check argument types before the guest runs; the call names an entry by index. */
struct wf_export {
    const char *name;
    const char *params;   /* one signature letter per parameter */
    uint64_t    result;   /* one signature letter */
    void       *fn;       /* int fn(const struct wf_value *args, struct wf_value *ret) */
};

#endif
