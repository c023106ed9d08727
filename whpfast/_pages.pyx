# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Page-granular memory work for snapshots and restores, in C loops without the GIL. Backend
neutral: it works on any buffer (guest memory, a snapshot image, a mapped snapshot file).

Bitmaps are arrays of uint64 words, bit i of word w standing for page 64*w + i: the layout of KVM's
dirty log (and of WHP's dirty bitmap), so the hypervisor's bitmap is used as it comes.

Also the one other backend-neutral C helper: host_cpuid(), the host's own cpuid instruction
(whpfast/cpu.py records what it returns in snapshots)."""

from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

DEF PAGE = 4096

cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil
    int __builtin_popcountll(unsigned long long) nogil

cdef extern from *:
    """
    #if defined(_MSC_VER)
    #include <intrin.h>
    static void whpfast_host_cpuid(unsigned int leaf, unsigned int sub, unsigned int *r) {
        int v[4];
        __cpuidex(v, (int)leaf, (int)sub);
        r[0] = (unsigned int)v[0]; r[1] = (unsigned int)v[1];
        r[2] = (unsigned int)v[2]; r[3] = (unsigned int)v[3];
    }
    #else
    #include <cpuid.h>
    static void whpfast_host_cpuid(unsigned int leaf, unsigned int sub, unsigned int *r) {
        __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    }
    #endif
    """
    void whpfast_host_cpuid(unsigned int leaf, unsigned int sub, unsigned int *r) nogil


cdef inline size_t _next_word(const uint64_t *bitmap, size_t w, size_t n) noexcept nogil:
    """The first index >= w whose word is non-zero, or n. Skips four clean words at a time:
    bitmaps are mostly zero, and a 1 GiB sandbox's has 4096 words."""
    while w + 4 <= n and not (bitmap[w] | bitmap[w + 1] | bitmap[w + 2] | bitmap[w + 3]):
        w += 4
    while w < n and not bitmap[w]:
        w += 1
    return w


cdef inline bint _page_is_zero(const unsigned char *p) noexcept nogil:
    cdef const uint64_t *w = <const uint64_t *>p
    cdef int i
    for i in range(PAGE // 8):
        if w[i]:
            return False
    return True


def _check(size_t n_pages, size_t size, bitmap, str what):
    if size < n_pages * PAGE:
        raise ValueError(f"{what} holds {size} bytes, fewer than {n_pages} pages")
    if bitmap.shape[0] * 64 < n_pages:
        raise ValueError(f"bitmap of {bitmap.shape[0]} words is too small for {n_pages} pages")


def capture(const unsigned char[::1] src not None, unsigned char[::1] dst, uint64_t[::1] nonzero not None):
    """Sets the bit in nonzero of every non-zero page of src and, unless dst is None, copies the
    page to the same offset in dst (whose pages must be zero). Returns the number of non-zero
    pages."""
    cdef size_t n_pages = src.shape[0] // PAGE, page, count = 0
    cdef bint copy = dst is not None
    cdef unsigned char *out = NULL
    if copy:
        _check(n_pages, dst.shape[0], nonzero, "destination")
        out = &dst[0]
    elif nonzero.shape[0] * 64 < n_pages:
        raise ValueError("bitmap too small")
    with nogil:
        for page in range(n_pages):
            if not _page_is_zero(&src[page * PAGE]):
                if copy:
                    memcpy(out + page * PAGE, &src[page * PAGE], PAGE)
                nonzero[page >> 6] |= (<uint64_t>1) << (page & 63)
                count += 1
    return count


def restore(unsigned char[::1] dst not None, const unsigned char[::1] image not None,
            const uint64_t[::1] dirty not None, const uint64_t[::1] nonzero not None):
    """For every page set in dirty: copy it back from image if the image's page is non-zero,
    else zero it. In place, with memcpy/memset on dst's own pages: the physical pages the
    hypervisor maps stay the same. Returns (pages copied, pages zeroed)."""
    cdef size_t n_pages = dst.shape[0] // PAGE, words, w, page
    cdef size_t copied = 0, zeroed = 0
    cdef uint64_t bits
    cdef int bit
    _check(n_pages, image.shape[0], dirty, "snapshot image")
    _check(n_pages, image.shape[0], nonzero, "snapshot image")
    words = (n_pages + 63) // 64
    with nogil:
        w = _next_word(&dirty[0], 0, words)
        while w < words:
            bits = dirty[w]
            while bits:
                bit = __builtin_ctzll(bits)
                bits &= bits - 1
                page = w * 64 + bit
                if page >= n_pages:
                    break
                if (nonzero[w] >> bit) & 1:
                    memcpy(&dst[page * PAGE], &image[page * PAGE], PAGE)
                    copied += 1
                else:
                    memset(&dst[page * PAGE], 0, PAGE)
                    zeroed += 1
            w = _next_word(&dirty[0], w + 1, words)
    return copied, zeroed


def plan_reprotect(const uint64_t[::1] dirty not None, uint64_t[::1] hot not None,
                   uint64_t[::1] previous not None, uint64_t[::1] reprotect not None,
                   unsigned int[::1] touched not None, size_t n_touched,
                   size_t hot_limit, size_t n_hot):
    """Decides which dirty pages to write-protect again after a restore. A page the guest wrote
    in two restore cycles running joins the hot set (up to hot_limit pages): it stays writable,
    so the next call writes it without a write fault, and every restore copies it back. The
    rest go into reprotect.

    previous and reprotect are non-zero only at the words listed in touched[:n_touched] (the
    last cycle's dirty words), so a cycle costs a scan of dirty plus work for its dirty words,
    not three full passes: that keeps a 1 GiB sandbox's restore near a 16 MiB one's.
    Returns (dirty pages, pages to re-protect, hot pages, new n_touched)."""
    cdef size_t w, i, n_words = dirty.shape[0], n_dirty = 0, n_reprotect = 0, n_new = 0
    cdef uint64_t d, promote
    cdef unsigned int *new_words
    if touched.shape[0] < n_words or previous.shape[0] < n_words or reprotect.shape[0] < n_words \
            or hot.shape[0] < n_words:
        raise ValueError("bitmaps of different sizes")
    new_words = <unsigned int *>malloc(n_words * sizeof(unsigned int))
    if new_words == NULL:
        raise MemoryError()
    with nogil:
        # Promote the pages dirty now and last cycle (previous still holds the last cycle), and
        # list this cycle's dirty words.
        w = _next_word(&dirty[0], 0, n_words)
        while w < n_words:
            d = dirty[w]
            n_dirty += __builtin_popcountll(d)
            promote = d & previous[w] & ~hot[w]
            if promote and n_hot + <size_t>__builtin_popcountll(promote) <= hot_limit:
                hot[w] |= promote
                n_hot += __builtin_popcountll(promote)
            new_words[n_new] = <unsigned int>w
            n_new += 1
            w = _next_word(&dirty[0], w + 1, n_words)
        # Forget the last cycle, then record this one, only at the words involved.
        for i in range(n_touched):
            previous[touched[i]] = 0
            reprotect[touched[i]] = 0
        for i in range(n_new):
            w = new_words[i]
            touched[i] = <unsigned int>w
            previous[w] = dirty[w]
            reprotect[w] = dirty[w] & ~hot[w]
            n_reprotect += __builtin_popcountll(reprotect[w])
    free(new_words)
    return n_dirty, n_reprotect, n_hot, n_new


def count_bits(const uint64_t[::1] bitmap not None):
    cdef size_t i, n = 0
    with nogil:
        for i in range(bitmap.shape[0]):
            n += __builtin_popcountll(bitmap[i])
    return n



def host_cpuid(unsigned int leaf, unsigned int subleaf=0):
    """(eax, ebx, ecx, edx) of this host's cpuid instruction for leaf/subleaf. On the PVM hosts a
    guest's cpuid returns exactly these (it is not intercepted), see whpfast/cpu.py."""
    cdef unsigned int r[4]
    whpfast_host_cpuid(leaf, subleaf, r)
    return r[0], r[1], r[2], r[3]
