"""Snapshot images that new memory can share copy-on-write.

A whole-memory capture (WarmMemory.capture) goes into a `SharedImage`: a memfd mapped shared,
which guest memory and later images map private over its non-zero extents
(GuestMemory.overlay_file), as sandboxes started from a snapshot file map the file. A sandbox
started from such a snapshot, and an incremental snapshot (WarmMemory.capture_delta), then cost
only the pages that differ from it: those are copied, the rest shared with every other user of
the image. Where the backend cannot map a file over guest memory (WHP) or the host has no
memfd, images are private memory and are copied whole, as before."""

import mmap
import os
import weakref

from .. import _pages, backend
from ..snapshot import PAGE, _extents

MAX_EXTENTS = 1024      # host mappings per clone: gaps between runs of pages are mapped too


def supported():
    return hasattr(os, "memfd_create") and hasattr(backend.impl.GuestMemory, "overlay_file")


class SharedImage:
    """A memory image in a memfd: `view` (a writable memoryview of all of it) until seal(), then
    immutable; clone() maps it private. The fd is closed with the object (and the mapping with
    the last view of it)."""

    def __init__(self, size):
        fd = os.memfd_create("whpfast-image", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.size = fd, size
        weakref.finalize(self, os.close, fd)
        self.extents = None

    @property
    def buffer(self):
        return self._map

    def seal(self, nonzero):
        """Records the image's non-zero pages (after the capture wrote them): clones map those."""
        self.extents = _extents(nonzero, self.size // PAGE, MAX_EXTENTS)

    def clone_into(self, memory):
        """Maps the image private over fresh (all-zero) memory of the same size: reads share this
        image's pages, writes go to private copies."""
        for first, count in self.extents:
            memory.overlay_file(self.fd, first * PAGE, first * PAGE, count * PAGE)


def new_image(size):
    """(buffer to capture into, its SharedImage or None) for a whole-memory capture."""
    if supported():
        shared = SharedImage(size)
        return shared.buffer, shared
    return backend.impl.GuestMemory(size), None


def fill(memory, snapshot):
    """Fills fresh (all-zero) memory with `snapshot`'s image: its shared image mapped private
    and the pages that differ from it (snapshot._delta) copied, or, without one, every non-zero
    page copied. Returns the pages copied."""
    shared, delta = snapshot._shared, snapshot._delta
    if shared is None or not hasattr(memory, "overlay_file"):
        delta = snapshot._nonzero
    else:
        shared.clone_into(memory)
        if delta is None:
            return 0
    with memoryview(memory) as view:
        _pages.restore(view, snapshot._image_view, delta, snapshot._nonzero)
    return _pages.count_bits(delta)
