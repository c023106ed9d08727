# A warm restore's host-side work, shared by both backends (textually included by _kvm.pyx and
# _whp.pyx after _restore.pxi): the buffers of a WarmMemory (whpfast/core/warm.py) held and
# checked once in a WarmPages, and one restore's work as a C struct (WarmRestore) that the
# backend's Vcpu.restore_warm and Vcpu.resume_warm fill while they hold the GIL and then carry
# out without it, between their own hypervisor calls:
#   the hypervisor's dirty log  ->  _warm_plan (hot-set plan, host-written pages)
#   ->  _warm_copy (page copies, then the host writes a resume stages)  ->  re-protect, XSAVE.

from libc.stdint cimport uint64_t

# Host writes a resume_warm may stage (the Linux personality: the request into the buffer of the
# read the snapshot is parked in, and the vDSO's clock data).
DEF MAX_WRITES = 4


cdef struct WarmRestore:
    # the WarmPages buffers
    unsigned char *mem
    uint64_t *dirty
    uint64_t *host
    uint64_t *hot
    unsigned char *score
    uint64_t *scored
    uint64_t *reprotect
    unsigned int *touched
    size_t n_pages, n_words
    # the snapshot's
    const unsigned char *image
    const uint64_t *nonzero
    const char *xsave
    size_t xsave_size
    bint fpu
    # the hot set's state (WarmMemory's), n_hot updated by _warm_plan
    size_t n_touched, hot_limit, n_hot, cycle
    # host writes into guest memory after the copies: guest-physical offset, bytes (marked in host)
    int n_writes
    size_t write_at[MAX_WRITES]
    const char *write_data[MAX_WRITES]
    size_t write_len[MAX_WRITES]
    # results
    size_t n_dirty, n_reprotect, n_new, host_pages, copied, zeroed
    int calls, register_calls
    long long start_ns, done_ns  # a resume's start and end of its restore (backend's clock)
    const char *what            # the hypervisor call that failed


cdef class WarmPages:
    """The bookkeeping buffers of one WarmMemory (see whpfast/core/warm.py), checked once here
    so that a restore takes them without a buffer acquisition per array: guest memory, the dirty
    log, the host-written pages, the hot set, the per-page scores, the pages with a score, the
    re-protect plan and the words it touches. close() lets go of the memory."""
    cdef unsigned char[::1] mem
    cdef uint64_t[::1] dirty, host, hot, scored, reprotect
    cdef unsigned char[::1] score
    cdef unsigned int[::1] touched
    cdef readonly size_t n_pages, n_words

    def __init__(self, unsigned char[::1] mem not None, uint64_t[::1] dirty not None,
                 uint64_t[::1] host not None, uint64_t[::1] hot not None,
                 unsigned char[::1] score not None, uint64_t[::1] scored not None,
                 uint64_t[::1] reprotect not None, unsigned int[::1] touched not None):
        _check_warm_sizes(mem.shape[0], mem.shape[0], score.shape[0],
                          (dirty.shape[0], host.shape[0], hot.shape[0], scored.shape[0],
                           reprotect.shape[0], touched.shape[0]), 0)
        self.mem, self.dirty, self.host, self.hot = mem, dirty, host, hot
        self.score, self.scored, self.reprotect, self.touched = score, scored, reprotect, touched
        self.n_pages = mem.shape[0] // RESTORE_PAGE
        self.n_words = (self.n_pages + 63) // 64

    def close(self):
        self.mem = None

    cdef int start(self, WarmRestore *w, const unsigned char[::1] image,
                   const uint64_t[::1] nonzero, size_t n_touched, size_t hot_limit, size_t n_hot,
                   size_t cycle, bint fpu, tuple writes) except -1:
        """Fills w for one restore from image (with its non-zero pages) and checks what the
        restore will touch: the snapshot's sizes, and that every staged write ((guest offset,
        bytes), kept alive by the caller's tuple) lies inside guest memory. The backend sets
        w.xsave (the snapshot's XSAVE area, checked its way)."""
        cdef size_t at, n
        cdef bytes data
        if self.mem is None:
            raise errors.SandboxClosed("the guest memory is closed")
        if <size_t>image.shape[0] < <size_t>self.mem.shape[0] or <size_t>nonzero.shape[0] < self.n_words:
            raise ValueError("restore: the snapshot image or its page bitmap is smaller than the memory")
        if n_touched > self.n_words:
            raise ValueError("restore: n_touched beyond the bitmap")
        memset(w, 0, sizeof(WarmRestore))
        w.mem, w.dirty, w.host, w.hot = &self.mem[0], &self.dirty[0], &self.host[0], &self.hot[0]
        w.score, w.scored, w.reprotect = &self.score[0], &self.scored[0], &self.reprotect[0]
        w.touched = &self.touched[0]
        w.n_pages, w.n_words = self.n_pages, self.n_words
        w.image, w.nonzero = &image[0], &nonzero[0]
        w.fpu = fpu
        w.n_touched, w.hot_limit, w.n_hot, w.cycle = n_touched, hot_limit, n_hot, cycle
        if writes is not None:
            if len(writes) > MAX_WRITES:
                raise ValueError(f"resume: at most {MAX_WRITES} staged writes, got {len(writes)}")
            for at, data in writes:
                n = len(data)
                if at > <size_t>self.mem.shape[0] or n > <size_t>self.mem.shape[0] - at:
                    raise ValueError(f"resume: a staged write of {n} bytes at {at:#x} is outside "
                                     f"guest memory")
                w.write_at[w.n_writes], w.write_data[w.n_writes] = at, <const char *>data
                w.write_len[w.n_writes] = n
                w.n_writes += 1
        return 0


cdef inline void _warm_plan(WarmRestore *w) noexcept nogil:
    """After the dirty log is in w.dirty: the hot-set plan and the host-written pages."""
    w.n_new = _plan_hot(w.dirty, w.hot, w.score, w.scored, w.reprotect, w.touched, w.n_words,
                        w.n_pages, w.n_touched, w.hot_limit, &w.n_hot, w.cycle, &w.n_dirty,
                        &w.n_reprotect)
    w.host_pages = _absorb_all(w.dirty, w.host, w.n_words)


cdef inline bint _warm_release(WarmRestore *w) noexcept nogil:
    """Whether restore_warm releases the GIL for the copies and the calls after them (a
    restore of RELEASE_PAGES pages or more, see _restore.pxi)."""
    return w.n_dirty + w.host_pages >= RELEASE_PAGES


cdef inline void _warm_copy(WarmRestore *w) noexcept nogil:
    """The page copies back from the image, then the staged host writes (after the copies, so
    none is undone by them), their pages marked host-written for the next restore (the caller
    adds their bitmap words to WarmMemory._host_words)."""
    cdef int i
    cdef size_t page
    _restore_pages(w.mem, w.image, w.dirty, w.nonzero, w.n_pages, &w.copied, &w.zeroed)
    for i in range(w.n_writes):
        if not w.write_len[i]:
            continue
        memcpy(w.mem + w.write_at[i], w.write_data[i], w.write_len[i])
        for page in range(w.write_at[i] // RESTORE_PAGE,
                          (w.write_at[i] + w.write_len[i] - 1) // RESTORE_PAGE + 1):
            w.host[page >> 6] |= (<uint64_t>1) << (page & 63)


cdef inline void _warm_failed(WarmRestore *w) noexcept nogil:
    """After a failed hypervisor call: nothing of the plan is left in reprotect (the caller
    restores in full next)."""
    cdef size_t i
    for i in range(w.n_new):
        w.reprotect[w.touched[i]] = 0


cdef tuple _warm_result(WarmRestore *w):
    """restore_warm's answer: (dirty pages, host pages, copied, zeroed, hot pages, n_touched,
    hypervisor calls, register calls)."""
    return (w.n_dirty, w.host_pages, w.copied, w.zeroed, w.n_hot, w.n_new, w.calls,
            w.register_calls)
