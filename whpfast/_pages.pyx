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


# The hot set's score (see plan_hot): each restore cycle a page's score decays by 1/8 and gains
# SCORE_DIRTY if the guest wrote the page, so a page written every cycle approaches 256 (kept at
# 255), one written every k-th cycle about 32 / (1 - (7/8)**k) right after a write. A page written
# now whose score reaches SCORE_HOT joins the hot set: two cycles running (32 -> 60), or every
# 5th cycle or more often in the long run (k = 5: 64; k = 6: 55, never). Leaving a page writable
# pays when it is written in more than ~10-20% of cycles (a write fault ~2.5 us against a ~0.2 us
# copy per restore, measured on PVM: /work/shared/spikes/python-warm-floor).
DEF SCORE_DIRTY = 32
DEF SCORE_HOT = 56
# A hot page is never re-protected, so the dirty log reports it every cycle whether the guest
# wrote it or not. To see whether it still is, a hot page holds a lease of LEASE_MIN to
# LEASE_MIN + LEASE_SPREAD - 1 cycles (spread by page and cycle, so a set promoted at once does
# not expire at once) counted down in its score byte; at the end it is re-protected with score
# SCORE_HOT. Written again soon, it rejoins at once; if not, its score decays as any other's. So a
# page still written costs one write fault per lease (~0.03 us a cycle), and one no longer written
# leaves within a lease, having cost at most LEASE_MIN + LEASE_SPREAD page copies (~25 us).
DEF LEASE_MIN = 64
DEF LEASE_SPREAD = 64
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
    cdef size_t w, i, n_words = dirty.shape[0], n_dirty = 0, n_reprotect = 0, n_new = 0
    cdef size_t page, n_pages = score.shape[0]
    cdef uint64_t d, h, fresh, bits, bit, expired, promoted
    cdef unsigned int s
    if touched.shape[0] < n_words or scored.shape[0] < n_words or reprotect.shape[0] < n_words \
            or hot.shape[0] < n_words or n_pages > n_words * 64:
        raise ValueError("bitmaps of different sizes")
    with nogil:
        for i in range(n_touched):           # forget the last cycle's plan
            reprotect[touched[i]] = 0
        w = 0
        while w < n_words:
            # the next word with dirty or scored pages
            while w + 4 <= n_words and not (dirty[w] | dirty[w + 1] | dirty[w + 2] | dirty[w + 3] |
                                            scored[w] | scored[w + 1] | scored[w + 2] | scored[w + 3]):
                w += 4
            if w >= n_words:
                break
            d = dirty[w]
            if not (d | scored[w]):
                w += 1
                continue
            n_dirty += __builtin_popcountll(d)
            if hot_limit:
                h = hot[w]
                fresh = d & ~h                   # written since they were last re-protected
                promoted = expired = 0
                bits = (fresh | scored[w]) & ~h
                while bits:                      # the scores of pages not hot
                    bit = bits & (~bits + 1)
                    bits &= bits - 1
                    page = w * 64 + __builtin_ctzll(bit)
                    if page >= n_pages:
                        break
                    s = score[page]
                    s -= (s + 7) >> 3
                    if fresh & bit:
                        s += SCORE_DIRTY
                        if s > 255:
                            s = 255
                        if s >= SCORE_HOT and n_hot < hot_limit:
                            promoted |= bit
                            n_hot += 1
                            s = LEASE_MIN + (page * 7 + cycle) % LEASE_SPREAD
                    score[page] = <unsigned char>s
                    if s:
                        scored[w] |= bit
                    else:
                        scored[w] &= ~bit
                bits = h
                while bits:                      # the leases of hot pages
                    page = w * 64 + __builtin_ctzll(bits)
                    bit = bits & (~bits + 1)
                    bits &= bits - 1
                    score[page] -= 1
                    if not score[page]:
                        expired |= bit
                        score[page] = SCORE_HOT
                n_hot -= __builtin_popcountll(expired)
                hot[w] = (h & ~expired) | promoted
            if d:
                reprotect[w] = d & ~hot[w]
                if reprotect[w]:
                    n_reprotect += __builtin_popcountll(reprotect[w])
                    touched[n_new] = <unsigned int>w
                    n_new += 1
            w += 1
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
