# The C cores of a warm restore's page work, shared by _pages.pyx (its Python entry points) and
# by each backend's Vcpu.restore_warm, which runs them between the hypervisor calls of a restore
# in one C sequence (see whpfast/core/warm.py). Pointers and sizes only: callers check buffer
# sizes while they hold the GIL.

from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memset
from cpython.pystate cimport PyThreadState

cdef extern from "Python.h":
    PyThreadState *PyEval_SaveThread() nogil
    void PyEval_RestoreThread(PyThreadState *) nogil

# A warm restore releases the GIL for its page copies and remaining hypervisor calls only when
# it restores at least this many pages. Each release makes the thread take the GIL back after,
# and when another thread holds it that hand-off (futex wake, context switch: IPIs on a PVM
# host) costs more than a short stretch frees: measured on PVM with 2 threads (bench_pool.py,
# interleaved), a ~150-page restore (~45 us) held throughout gave 3-5% more requests/s than the
# same restore released. 512 pages are ~100 us of copies (~0.2 us a page): released.
DEF RELEASE_PAGES = 512

cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil
    int __builtin_popcountll(unsigned long long) nogil

DEF RESTORE_PAGE = 4096

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


cdef int _check_warm_sizes(size_t mem_size, size_t image_size, size_t score_size, tuple words,
                           size_t n_touched) except -1:
    """The buffer checks of a WarmPages (memory, snapshot image, one score byte per page, and
    the words of each bitmap), made once, before any restore drops the GIL with them."""
    cdef size_t n_pages = mem_size // RESTORE_PAGE, n_words = (n_pages + 63) // 64
    if (n_pages == 0 or mem_size % RESTORE_PAGE or image_size < mem_size or score_size < n_pages):
        raise ValueError("restore_warm: memory, snapshot image and scores of different sizes")
    for w in words:
        if <size_t>w < n_words:
            raise ValueError(f"restore_warm: a bitmap of {w} words for {n_pages} pages")
    if n_touched > n_words:
        raise ValueError("restore_warm: n_touched beyond the bitmap")
    return 0


cdef inline size_t _next_word(const uint64_t *bitmap, size_t w, size_t n) noexcept nogil:
    """The first index >= w whose word is non-zero, or n. Skips four clean words at a time:
    bitmaps are mostly zero, and a 1 GiB sandbox's has 4096 words."""
    while w + 4 <= n and not (bitmap[w] | bitmap[w + 1] | bitmap[w + 2] | bitmap[w + 3]):
        w += 4
    while w < n and not bitmap[w]:
        w += 1
    return w


cdef void _restore_pages(unsigned char *dst, const unsigned char *image, const uint64_t *dirty,
                         const uint64_t *nonzero, size_t n_pages, size_t *copied,
                         size_t *zeroed) noexcept nogil:
    """For every page set in dirty: copy it back from image if nonzero has its bit, else zero
    it (see _pages.restore). Adds to *copied and *zeroed."""
    cdef size_t words = (n_pages + 63) // 64, w, page
    cdef uint64_t bits
    cdef int bit
    w = _next_word(dirty, 0, words)
    while w < words:
        bits = dirty[w]
        while bits:
            bit = __builtin_ctzll(bits)
            bits &= bits - 1
            page = w * 64 + bit
            if page >= n_pages:
                break
            if (nonzero[w] >> bit) & 1:
                memcpy(&dst[page * RESTORE_PAGE], &image[page * RESTORE_PAGE], RESTORE_PAGE)
                copied[0] += 1
            else:
                memset(&dst[page * RESTORE_PAGE], 0, RESTORE_PAGE)
                zeroed[0] += 1
        w = _next_word(dirty, w + 1, words)


cdef size_t _absorb_all(uint64_t *dirty, uint64_t *host, size_t n_words) noexcept nogil:
    """dirty |= host over the whole bitmap, clearing host (mostly zero: skipped four words at a
    time). Returns how many pages were not set in dirty already."""
    cdef size_t added = 0, w = _next_word(host, 0, n_words)
    while w < n_words:
        added += __builtin_popcountll(host[w] & ~dirty[w])
        dirty[w] |= host[w]
        host[w] = 0
        w = _next_word(host, w + 1, n_words)
    return added


cdef size_t _plan_hot(uint64_t *dirty, uint64_t *hot, unsigned char *score, uint64_t *scored,
                      uint64_t *reprotect, unsigned int *touched, size_t n_words, size_t n_pages,
                      size_t n_touched, size_t hot_limit, size_t *n_hot, size_t cycle,
                      size_t *n_dirty_out, size_t *n_reprotect_out) noexcept nogil:
    """The core of _pages.plan_hot (see there); returns the new n_touched, *n_hot updated."""
    cdef size_t w, i, n_dirty = 0, n_reprotect = 0, n_new = 0, page
    cdef size_t hot_count = n_hot[0]
    cdef uint64_t d, h, fresh, bits, bit, expired, promoted
    cdef unsigned int s
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
                    if s >= SCORE_HOT and hot_count < hot_limit:
                        promoted |= bit
                        hot_count += 1
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
            hot_count -= __builtin_popcountll(expired)
            hot[w] = (h & ~expired) | promoted
        if d:
            reprotect[w] = d & ~hot[w]
            if reprotect[w]:
                n_reprotect += __builtin_popcountll(reprotect[w])
                touched[n_new] = <unsigned int>w
                n_new += 1
        w += 1
    n_hot[0] = hot_count
    n_dirty_out[0] = n_dirty
    n_reprotect_out[0] = n_reprotect
    return n_new
