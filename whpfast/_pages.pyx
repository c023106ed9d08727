# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Page-granular memory work for snapshots and restores, in C loops without the GIL. Backend
neutral: it works on any buffer (guest memory, a snapshot image, a mapped snapshot file).

Bitmaps are arrays of uint64 words, bit i of word w standing for page 64*w + i: the layout of KVM's
dirty log (and of WHP's dirty bitmap), so the hypervisor's bitmap is used as it comes."""

from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memset

DEF PAGE = 4096

cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil
    int __builtin_popcountll(unsigned long long) nogil


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
        for w in range(words):
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
    return copied, zeroed


def count_bits(const uint64_t[::1] bitmap not None):
    cdef size_t i, n = 0
    with nogil:
        for i in range(bitmap.shape[0]):
            n += __builtin_popcountll(bitmap[i])
    return n

