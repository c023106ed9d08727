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

include "_page.pxi"

include "_restore.pxi"

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


cdef inline bint _page_is_zero(const unsigned char *p) noexcept nogil:
    cdef const uint64_t *w = <const uint64_t *>p
    cdef int i
    for i in range(PAGE_SIZE // 8):
        if w[i]:
            return False
    return True


def _check(size_t n_pages, size_t size, bitmap, str what):
    if size < n_pages * PAGE_SIZE:
        raise ValueError(f"{what} holds {size} bytes, fewer than {n_pages} pages")
    if bitmap.shape[0] * 64 < n_pages:
        raise ValueError(f"bitmap of {bitmap.shape[0]} words is too small for {n_pages} pages")


def capture(const unsigned char[::1] src not None, unsigned char[::1] dst, uint64_t[::1] nonzero not None):
    """Sets the bit in nonzero of every non-zero page of src and, unless dst is None, copies the
    page to the same offset in dst (whose pages must be zero). Returns the number of non-zero
    pages."""
    cdef size_t n_pages = src.shape[0] // PAGE_SIZE, page, count = 0
    cdef bint copy = dst is not None
    cdef unsigned char *out = NULL
    if copy:
        _check(n_pages, dst.shape[0], nonzero, "destination")
        out = &dst[0]
    elif nonzero.shape[0] * 64 < n_pages:
        raise ValueError("bitmap too small")
    with nogil:
        for page in range(n_pages):
            if not _page_is_zero(&src[page * PAGE_SIZE]):
                if copy:
                    memcpy(out + page * PAGE_SIZE, &src[page * PAGE_SIZE], PAGE_SIZE)
                nonzero[page >> 6] |= (<uint64_t>1) << (page & 63)
                count += 1
    return count


def restore(unsigned char[::1] dst not None, const unsigned char[::1] image not None,
            const uint64_t[::1] dirty not None, const uint64_t[::1] nonzero not None):
    """For every page set in dirty: copy it back from image if the image's page is non-zero,
    else zero it. In place, with memcpy/memset on dst's own pages: the physical pages the
    hypervisor maps stay the same. Returns (pages copied, pages zeroed)."""
    cdef size_t n_pages = dst.shape[0] // PAGE_SIZE
    cdef size_t copied = 0, zeroed = 0
    _check(n_pages, image.shape[0], dirty, "snapshot image")
    _check(n_pages, image.shape[0], nonzero, "snapshot image")
    with nogil:
        _restore_pages(&dst[0], &image[0], &dirty[0], &nonzero[0], n_pages, &copied, &zeroed)
    return copied, zeroed


# SCORE_DIRTY, SCORE_HOT, LEASE_MIN, LEASE_SPREAD: see _restore.pxi
LEASE = (LEASE_MIN, LEASE_MIN + LEASE_SPREAD - 1)


def plan_hot(uint64_t[::1] dirty not None, uint64_t[::1] hot not None,
             unsigned char[::1] score not None, uint64_t[::1] scored not None,
             uint64_t[::1] reprotect not None, unsigned int[::1] touched not None,
             size_t n_touched, size_t hot_limit, size_t n_hot, size_t cycle):
    """Decides which dirty pages to write-protect again after a restore (the adaptive hot set).
    dirty: the dirty log (hot pages always read as dirty); hot: pages left writable, at most
    hot_limit of them; score: one byte per page (see SCORE_DIRTY; a hot page's remaining lease),
    non-zero exactly where scored has its bit. Pages written in a large share of recent cycles
    join the hot set (they stay writable, so the next call takes no write fault on them, and
    every restore copies them back); the rest go into reprotect, which is non-zero only at the
    words listed in touched[:n_touched].

    Cost: a scan of dirty | scored (skipping clean words four at a time) plus work per set bit,
    not per page: a 1 GiB sandbox's restore stays near a 16 MiB one's. With hot_limit 0 no score
    is kept (the caller empties the hot set first). Returns (dirty pages, pages to re-protect, hot
    pages, new n_touched)."""
    cdef size_t n_words = dirty.shape[0], n_dirty = 0, n_reprotect = 0, n_new
    cdef size_t n_pages = score.shape[0]
    if touched.shape[0] < n_words or scored.shape[0] < n_words or reprotect.shape[0] < n_words \
            or hot.shape[0] < n_words or n_pages > n_words * 64:
        raise ValueError("bitmaps of different sizes")
    with nogil:
        n_new = _plan_hot(&dirty[0], &hot[0], &score[0], &scored[0], &reprotect[0], &touched[0],
                          n_words, n_pages, n_touched, hot_limit, &n_hot, cycle, &n_dirty,
                          &n_reprotect)
    return n_dirty, n_reprotect, n_hot, n_new


def forget_hot(uint64_t[::1] hot not None, unsigned char[::1] score not None,
               uint64_t[::1] scored not None):
    """Empties the hot set and zeroes every score, touching only the scored pages (the score
    array stays unallocated where no page was ever scored)."""
    cdef size_t w, page, n_pages = score.shape[0]
    cdef uint64_t bits
    if hot.shape[0] < scored.shape[0] or n_pages > scored.shape[0] * 64:
        raise ValueError("bitmaps of different sizes")
    with nogil:
        w = _next_word(&scored[0], 0, scored.shape[0])
        while w < <size_t>scored.shape[0]:
            bits = scored[w]
            while bits:
                page = w * 64 + __builtin_ctzll(bits)
                bits &= bits - 1
                if page < n_pages:
                    score[page] = 0
            scored[w] = 0
            w = _next_word(&scored[0], w + 1, scored.shape[0])
        for w in range(<size_t>hot.shape[0]):
            hot[w] = 0


def absorb(uint64_t[::1] dirty not None, uint64_t[::1] host not None, words):
    """dirty |= host at the listed words (those host holds bits in), clearing them in host.
    Returns how many pages were not set in dirty already."""
    cdef size_t added = 0, n = dirty.shape[0]
    cdef Py_ssize_t w
    for w in words:
        if not 0 <= w < <Py_ssize_t>n or w >= host.shape[0]:
            raise IndexError(f"word {w} outside the bitmap")
        added += __builtin_popcountll(host[w] & ~dirty[w])
        dirty[w] |= host[w]
        host[w] = 0
    return added


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
