"""The warm-start engine: guest memory under the hypervisor's dirty log, the host's own writes
into it, the hot set, and snapshot/restore of memory and vCPU state. Personality-neutral: the SDK
`Sandbox` and `LinuxSandbox` each own one WarmMemory next to their VM and vCPU and add their own
host-side state on top.

What a restore copies back: the pages the guest wrote since the baseline (the snapshot last
taken, restored or started from) as the dirty log reports them, plus the pages the host wrote,
which the hypervisor does not log: every host write into guest memory goes through write() (or
store()/mark()), which keeps a page-granular host-dirty bitmap. KVM's manual-protect dirty log
lets pages written in a large share of restore cycles stay writable (the hot set, see
_pages.plan_hot): they cost a copy per restore instead of a write fault per call."""

import time
from dataclasses import dataclass

import numpy as np

from .. import _pages, backend
from ..abi import PAGE
from ..errors import SnapshotError, WhpfastError

BLOCK = 64 * PAGE               # the memory one bitmap word covers
MASK64 = (1 << 64) - 1
# At most this many hot pages (64 MiB): a restore copies every one (~0.2 us each, ~3 ms for all
# of them), so a workload that writes more than this per call pays write faults for the rest.
# Host memory for the policy: one score byte per page (allocated zeroed: resident only where
# pages were ever written between restores) and one bitmap of 1 bit per page.
HOT_LIMIT = 16384


@dataclass(frozen=True)
class RestoreStats:
    """What one restore did, so embedders can see its cost."""
    pages_copied: int        # copied back from the snapshot image
    pages_zeroed: int        # zeroed in place (zero in the snapshot)
    dirty_pages: int         # pages the guest wrote since the baseline (hypervisor's dirty log)
    host_pages: int          # pages the host wrote since the baseline (call buffers)
    hypervisor_calls: int    # ioctls (KVM) / API calls (WHP) the restore made, all told
    register_calls: int      #   of which for registers (the rest: dirty log read / re-protect)
    full: bool               # every page and register group was reset (another snapshot, or
                             # after a fault, timeout or cancel)
    ns: int                  # wall time


def restore_failed(sandbox, error, what="a restore"):
    """After `error` from a restore (what: or from a warm request's restore and run): poisons
    the personality's sandbox, whose state is now half-way, and returns what to raise: the
    error itself when it is typed (a WhpfastError) or an interruption (KeyboardInterrupt),
    otherwise a SnapshotError caused by it."""
    sandbox._poisoned = f"{what} failed half-way ({type(error).__name__}: {error})"
    if isinstance(error, Exception) and not isinstance(error, WhpfastError):
        wrapped = SnapshotError(f"restore failed; the sandbox is poisoned: {error}")
        wrapped.__cause__ = error
        return wrapped
    return error


class WarmMemory:
    """Guest memory (a backend GuestMemory) as memslot 0 of vm, with the restore bookkeeping for
    it and vcpu. It does not own vm, vcpu or memory (the personality closes them); close()
    releases its view of the memory. Snapshots are any object with _image_view (the memory
    image), _nonzero (its non-zero pages) and _state (vCPU state).

    log_dirty=False leaves dirty logging off until the first capture() or restore(): on PVM hosts
    it doubles the cost of a first write to a page, which is most of a cold boot."""

    def __init__(self, vm, vcpu, memory, *, log_dirty=True):
        self.vm, self.vcpu, self.memory = vm, vcpu, memory
        self.size = memory.size
        vm.set_memory(0, 0, self.size, memory.address, log_dirty=log_dirty)
        self._logging = log_dirty
        self.mem = memoryview(memory)
        self.pages = self.size // PAGE
        words = (self.pages + 63) // 64
        self._dirty = np.zeros(words, dtype=np.uint64)      # dirty log, then pages to restore
        self._dirty_bytes = self._dirty.view(np.uint8)      # ...as the hypervisor's calls take it
        self._host = np.zeros(words, dtype=np.uint64)       # pages the host wrote since the baseline
        self._host_words = set()                             # ...the words of _host with bits
        self._hot = np.zeros(words, dtype=np.uint64)        # pages left writable (see plan_hot)
        self._score = np.zeros(self.pages, dtype=np.uint8)  # per page, how often it was written
        self._scored = np.zeros(words, dtype=np.uint64)     # pages whose score is not zero
        self._reprotect = np.zeros(words, dtype=np.uint64)
        self._touched = np.zeros(words, dtype=np.uint32)    # words where _reprotect has bits
        self._n_touched = 0
        self._cycle = 0
        self.hot_count = 0
        # The hot set's bound; 0 where the hypervisor re-protects every page as it reads the log
        # (WHP). (whpfast.testing.set_hot_limit lowers it, for the old fixed policy's figures.)
        self.hot_limit = min(HOT_LIMIT, self.pages) if vm.manual_protect else 0
        # The same buffers for the backend's one-call restores (restore_warm, resume_warm)
        self._pages = backend.impl.WarmPages(self.mem, self._dirty, self._host, self._hot,
                                             self._score, self._scored, self._reprotect,
                                             self._touched)
        self.baseline = None        # memory == baseline's image except dirty and host pages
        self.ran = False            # the guest ran since the baseline (FPU state may differ)
        self.needs_full_reset = False   # a fault/timeout/cancel: reset every register group
        # Restores to the baseline go through the backend's one-call restore_warm/resume_warm
        # (every backend has them); whpfast.testing.stepwise turns this off to compare.
        self.one_call = True

    def close(self):
        self._pages.close()
        self.mem.release()
        self.baseline = None        # (a snapshot whose host-side state may lead back here)

    # -- host writes -----------------------------------------------------------------------

    def write(self, addr, size, writer):
        """THE host write into guest memory: writer(mem, addr, size) writes into mem[addr:addr+size]
        (mem: a view of the whole memory) and returns how many bytes from addr it wrote; those
        pages are marked for the next restore (all of [addr, addr+size) if writer raises: it may
        have written any part). Bounds checked; no other check (permissions are the caller's).
        Writing nothing is a no-op wherever addr points."""
        if size == 0:
            return 0
        if addr < 0 or size < 0 or addr + size > self.size:
            raise ValueError(f"host write of {size:#x} bytes at {addr:#x} is outside the "
                             f"{self.size:#x} bytes of guest memory")
        written = size
        try:
            written = writer(self.mem, addr, size)
            return written
        finally:
            self.mark(addr, addr + min(max(written, 0), size))

    def store(self, addr, data):
        """Copies data into guest memory at addr (through write())."""
        def copy(mem, base, size):
            mem[base:base + size] = data
            return size
        return self.write(addr, len(data), copy)

    def mark(self, start, end, only=None):
        """Marks the pages of [start, end) as written by the host (only those set in the bitmap
        `only`, if given), for a writer that cannot go through write() (a page dropped behind
        the hypervisor's back, say)."""
        if end <= start:
            return
        p0, p1 = start // PAGE, (end + PAGE - 1) // PAGE
        w0, w1 = p0 >> 6, ((p1 - 1) >> 6) + 1
        if w1 - w0 == 1:                       # the common case: pages of one bitmap word
            mask = ((1 << (p1 - p0)) - 1) << (p0 & 63)
            if only is not None:
                mask &= int(only[w0])
            if mask:
                self._host[w0] |= np.uint64(mask)
                self._host_words.add(w0)
            return
        masks = np.full(w1 - w0, MASK64, dtype=np.uint64)
        masks[0] &= np.uint64((MASK64 << (p0 & 63)) & MASK64)
        masks[-1] &= np.uint64(MASK64 >> (63 - ((p1 - 1) & 63)))
        if only is not None:
            masks &= only[w0:w1]
        self._host[w0:w1] |= masks
        self._host_words.update(range(w0, w1))

    # -- snapshot and restore ------------------------------------------------------------------

    def _scan(self, ranges, dst, nonzero):
        """_pages.capture over ranges() (whole bitmap words; ranges None: all memory)."""
        if ranges is None:
            _pages.capture(self.mem, dst, nonzero)
            return
        for start, end in ranges():
            bits = np.zeros((end - start) // BLOCK, dtype=np.uint64)
            _pages.capture(self.mem[start:end], None if dst is None else dst[start:end], bits)
            nonzero[start // BLOCK:end // BLOCK] |= bits

    def capture(self, image, ranges=None):
        """Copies memory into image (a zeroed buffer of the same size: a fresh GuestMemory) and
        returns (its non-zero pages, the vCPU state). ranges: a function returning the (start, end)
        spans, whole bitmap words, outside which memory is known to be zero (None: scan all of
        it; called only when a scan is needed). Starts a new
        dirty epoch; the caller makes its snapshot the baseline with set_baseline()."""
        nonzero = np.zeros_like(self._dirty)
        dst = memoryview(image)
        try:
            self._scan(ranges, dst, nonzero)
        finally:
            dst.release()
        state = self.vcpu.save_state()
        self._start_logging()
        # The current memory is the reference now: clear every dirty bit (re-protecting every
        # page, hot ones included).
        dirty = self._dirty
        self.vm.get_dirty_log(0, dirty.view(np.uint8))
        self.vm.clear_dirty_log(0, 0, self.pages, dirty.view(np.uint8))
        self._forget_hot()
        return nonzero, state

    def changed(self):
        """A bitmap of the pages that may differ from the baseline's image now: those the guest
        wrote (the dirty log, and the hot set, left writable and so not logged) and those the
        host wrote. Reading the log consumes it where the hypervisor resets bits as it reads
        (WHP): call it only on the way to a new baseline (capture_delta)."""
        if self.baseline is None or self.needs_full_reset:
            raise SnapshotError("no baseline to compare with: capture the whole memory")
        self._start_logging()
        changed = np.zeros_like(self._dirty)
        self.vm.get_dirty_log(0, changed.view(np.uint8))
        changed |= self._hot
        for w in self._host_words:
            changed[w] |= self._host[w]
        return changed

    def capture_delta(self, image, write=None):
        """capture() for memory that still derives from the baseline (can_capture_delta()): image
        already holds the baseline's image (a copy-on-write clone of it), and only the pages
        written since are copied into it; or, with image None, write(memory view, bitmap of those
        pages) keeps them. Returns (the pages written since, the vCPU state) and starts a new
        dirty epoch as capture() does; the new snapshot's non-zero pages are the baseline's plus
        those (one may be zero: an over-estimate only costs a copy)."""
        changed = self.changed()
        if image is None:
            write(self.mem, changed)
        else:
            dst = memoryview(image)
            try:
                _pages.restore(dst, self.mem, changed, changed)
            finally:
                dst.release()
        state = self.vcpu.save_state()
        dirty = self._dirty
        dirty[:] = changed
        # Re-protect what the log held (the hot pages too: they are forgotten below), as capture().
        self.vm.clear_dirty_log(0, 0, self.pages, dirty.view(np.uint8))
        self._forget_hot()
        return changed, state

    def can_capture_delta(self):
        """Whether memory is the baseline's image but for the pages changed() reports."""
        return self.baseline is not None and not self.needs_full_reset

    def set_baseline(self, snapshot):
        self.baseline = snapshot
        for w in self._host_words:
            self._host[w] = 0
        self._host_words.clear()
        self.ran = False
        self.needs_full_reset = False

    def restore(self, snapshot, ranges=None):
        """Puts memory and vCPU state back to the snapshot's and makes it the baseline. From the
        baseline only the pages written since are copied (or zeroed); from another snapshot
        (or none known) every page that may differ. ranges: as for capture(). On failure the
        state is unknown: the next restore is a full one, and the caller poisons its sandbox."""
        t0 = time.perf_counter_ns()
        try:
            stats = self._restore(snapshot, ranges, t0)
        except BaseException:
            self.forget_baseline()
            raise
        self.set_baseline(snapshot)
        return stats

    def forget_baseline(self):
        """After a failed restore (here or in the personality's own state): the next restore
        resets every page that may differ and every register group."""
        self.baseline = None
        self.needs_full_reset = True

    def _restore(self, snapshot, ranges, t0):
        vm, dirty = self.vm, self._dirty
        self._start_logging()
        if snapshot is self.baseline and not self.needs_full_reset and self.one_call:
            return self._restore_warm(snapshot, t0)
        vm.get_dirty_log(0, self._dirty_bytes)
        calls = 1
        full = snapshot is not self.baseline
        if full:
            self._forget_hot()              # start over: re-protect every page
        else:
            self._cycle += 1
        guest_pages, reprotect, self.hot_count, self._n_touched = _pages.plan_hot(
            dirty, self._hot, self._score, self._scored, self._reprotect, self._touched,
            self._n_touched, 0 if full else self.hot_limit, self.hot_count, self._cycle)
        host_pages = _pages.absorb(dirty, self._host, self._host_words)
        self._host_words.clear()
        if full:
            # Memory may differ from this snapshot anywhere it or the old baseline is non-zero,
            # or where it was written; unknown baseline: anywhere non-zero now.
            base = self.baseline
            shared = getattr(snapshot, "_shared", None)
            if base is not None and shared is not None and getattr(base, "_shared", None) is shared:
                # Both derive from one whole capture and differ from it only at their deltas
                # (LinuxSandbox.snapshot's incremental images): those pages, not all non-zero ones.
                for d in (snapshot._delta, base._delta):
                    if d is not None:
                        dirty |= d
            else:
                dirty |= snapshot._nonzero
                if base is not None:
                    dirty |= base._nonzero
                else:
                    self._scan(ranges, None, dirty)
        copied, zeroed = _pages.restore(self.mem, snapshot._image_view, dirty, snapshot._nonzero)
        if reprotect and vm.manual_protect:
            # only the span of words that have bits: KVM walks what it is given
            lo, hi = int(self._touched[0]), int(self._touched[self._n_touched - 1]) + 1
            vm.clear_dirty_log(0, lo * 64, min(hi * 64, self.pages) - lo * 64,
                               self._reprotect[lo:hi].view(np.uint8))
            calls += 1
        register_calls = self.vcpu.load_state(snapshot._state, fpu=self.ran or full,
                                              full=self.needs_full_reset or full)
        calls += register_calls
        return RestoreStats(copied, zeroed, guest_pages, host_pages, calls, register_calls, full,
                            time.perf_counter_ns() - t0)

    def _restore_warm(self, snapshot, t0):
        """The common case, back to the baseline: the backend's restore_warm does the whole
        sequence of _restore's non-full branch (dirty log, hot-set plan, host pages, page
        copies, re-protect, XSAVE and registers) in one C call, which releases the GIL once
        and only for a large restore (see whpfast/_restore.pxi)."""
        self._cycle += 1
        answer = self.vcpu.restore_warm(
            self._pages, snapshot._image_view, snapshot._nonzero, self._n_touched,
            self.hot_limit, self.hot_count, self._cycle, snapshot._state, self.ran)
        return self._warm_stats(answer, time.perf_counter_ns() - t0)

    def _warm_stats(self, answer, ns):
        self._warm_done(answer)
        guest_pages, host_pages, copied, zeroed, _, _, calls, register_calls = answer[:8]
        return RestoreStats(copied, zeroed, guest_pages, host_pages, calls, register_calls, False,
                            ns)

    def _warm_done(self, answer):
        """The bookkeeping after a backend's one-call restore (answer: its figures)."""
        self.hot_count, self._n_touched = answer[4], answer[5]
        self._host_words.clear()

    def can_resume(self, snapshot):
        """Whether resume() can take snapshot: it is the baseline, the last run ended cleanly,
        and the backend restores and runs in one call."""
        return snapshot is self.baseline and not self.needs_full_reset and self.one_call

    def resume(self, snapshot, writes, result, user_cs, user_ds, timeout_ns):
        """A warm restore to snapshot (can_resume() must be true), then the host writes
        ((address, bytes) pairs, marked for the next restore), the return from the system call
        the snapshot stopped at with `result`, and the guest's run up to its next exit, in one
        C call that releases the GIL once (the backend's resume_warm): a warm request's restore
        and run without a second GIL hand-off between them. Returns resume_warm's answer, as
        light as it comes (this is every warm request's path): (dirty pages, host pages, pages
        copied, zeroed, hot pages, n_touched, hypervisor calls, register calls, the exit kind,
        the restore's ns; see RestoreStats). On failure the next restore is a full one, as after
        a failed restore()."""
        fpu, self.ran = self.ran, True
        self._cycle += 1
        try:
            answer = self.vcpu.resume_warm(
                self._pages, snapshot._image_view, snapshot._nonzero, self._n_touched,
                self.hot_limit, self.hot_count, self._cycle, snapshot._state, fpu, writes,
                result, user_cs, user_ds, timeout_ns)
        except BaseException:
            self.forget_baseline()      # (a full restore scans what the writes may have left)
            raise
        self._warm_done(answer)
        words = self._host_words        # the writes' pages, marked by resume_warm
        for addr, data in writes:
            if data:
                words.update(range(addr // BLOCK, (addr + len(data) - 1) // BLOCK + 1))
        return answer

    def _start_logging(self):
        if not self._logging:
            self.vm.set_memory(0, 0, self.size, self.memory.address, log_dirty=True)
            self._logging = True

    def _forget_hot(self):
        _pages.forget_hot(self._hot, self._score, self._scored)
        for i in range(self._n_touched):
            self._reprotect[self._touched[i]] = 0
        self._n_touched = 0
        self.hot_count = 0
