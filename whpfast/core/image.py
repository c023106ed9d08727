"""Snapshot images that new memory can share copy-on-write.

A whole-memory capture (WarmMemory.capture) goes into a `SharedImage`: a memfd mapped shared,
which guest memory and later images map private over its non-zero extents
(GuestMemory.overlay_file), as sandboxes started from a snapshot file map the file. A sandbox
started from such a snapshot, and an incremental snapshot (WarmMemory.capture_delta), then cost
only the pages that differ from it: those are copied, the rest shared with every other user of
the image. Where the backend cannot map a file over guest memory (WHP) or the host has no
memfd, images are private memory and are copied whole, as before.

Incremental snapshots over a SharedImage form a `Chain`: each one writes only the pages
written since the snapshot it derives from into a `Layer` of its own (a sparse memfd holding
them at their own offsets), and its image is the whole capture with its chain's layers mapped
over it, the newest layer owning a page winning. A snapshot costs the pages written since the
previous one. Host mappings are few per process (vm.max_map_count, 65530 for every sandbox and
image), and a clone maps each run of one layer's pages: past MAX_RUNS runs a clone maps the
chain's flat layer (one layer with every page of older layers, merged into FLAT_RUNS runs) and
copies the pages of the layers after it. A chain is flattened (a new flat layer written from
memory as it is now) when it grows past MAX_LAYERS layers, or for a snapshot that sandboxes
start from (fork) when its clones would copy: they then share every page."""

import mmap
import os
import weakref

import numpy as np

from .. import _pages, backend
from .container import PAGE, extents as _extents

MAX_EXTENTS = 1024      # host mappings per clone: gaps between runs of pages are mapped too
MAX_LAYERS = 16         # layers of a chain after its flat one before the next snapshot flattens it
MAX_RUNS = 256          # mappings of layer pages a clone of a chain makes at most (see clone_into)
FLAT_RUNS = 64          # runs a flat layer is merged down to (gap pages written too)


def supported():
    return hasattr(os, "memfd_create") and backend.capabilities.file_overlay


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


class Layer:
    """The pages one incremental snapshot wrote, in a sparse memfd at their own offsets (the
    rest of the file is a hole: it costs nothing). Immutable once written; the fd is closed with
    the object."""

    def __init__(self, size):
        fd = os.memfd_create("whpfast-layer", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        weakref.finalize(self, os.close, fd)

    def write(self, mem, runs):
        """Copies the pages of runs ((first page, count) pairs) of mem into the file."""
        fd = self.fd
        for first, count in runs:
            offset, end = first * PAGE, (first + count) * PAGE
            while offset < end:
                offset += os.pwrite(fd, mem[offset:end], offset)


def _runs(bits):
    """(first page, count) of each run of set entries of a bool array of pages."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], bits.view(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), (edges[1::2] - edges[::2]).tolist()))


class Chain:
    """The image of an incremental snapshot: `shared` (a SharedImage) with `layers` over it.
    layers[0] is the flat layer (None: none yet), whose pages are mapped as `flat_runs` (few
    runs, merged across gaps); layers[1:] are the snapshots' own layers since, oldest first.
    owner: one byte per page, 0 where the page is the shared image's, k where it is
    layers[k-1]'s. Immutable."""

    def __init__(self, shared, layers, owner, flat_runs):
        self.shared, self.layers, self.owner = shared, tuple(layers), owner
        self.flat_runs = flat_runs
        self._runs = None

    @classmethod
    def of(cls, snapshot, pages):
        """The chain of a snapshot with a SharedImage (an empty one for the whole capture
        itself), or None when it has none (its image is not layered: copy it)."""
        chain = getattr(snapshot, "_chain", None)
        if chain is not None:
            return chain
        if snapshot._shared is not None and snapshot._delta is None:
            return cls(snapshot._shared, (None,), np.zeros(pages, dtype=np.uint8), [])
        return None

    def runs(self):
        """(first page, count, layer number) of each run of pages owned by one layer."""
        if self._runs is None:
            owner = self.owner
            change = np.flatnonzero(owner[1:] != owner[:-1]) + 1
            starts = np.concatenate(([0], change))
            counts = np.diff(np.concatenate((starts, [len(owner)])))
            keep = owner[starts] != 0
            self._runs = list(zip(starts[keep].tolist(), counts[keep].tolist(),
                                  owner[starts[keep]].tolist()))
        return self._runs

    def extend(self, mem, changed, compact=False):
        """The chain of a snapshot of mem (memory now: this chain's image but for the pages set
        in the bitmap `changed`): one more layer with those pages; or, past MAX_LAYERS layers or,
        with compact, past MAX_RUNS mappings (a snapshot to start sandboxes from), one flat layer
        with every page of the chain's layers. Copies from mem."""
        pages = len(self.owner)
        bits = np.unpackbits(changed.view(np.uint8), bitorder="little")[:pages].view(bool)
        owner = self.owner.copy()
        owner[bits] = len(self.layers) + 1
        chain = Chain(self.shared, self.layers + (None,), owner, self.flat_runs)
        if len(chain.layers) - 1 > MAX_LAYERS or (compact and len(chain.runs()) > MAX_RUNS):
            return self.flatten(mem, owner != 0)
        layer = Layer(pages * PAGE)
        layer.write(mem, _runs(bits))
        chain.layers = self.layers + (layer,)
        return chain

    def flatten(self, mem, bits):
        """A chain with one flat layer holding the pages of bits, copied from mem (runs merged
        across the smallest gaps down to FLAT_RUNS: memory there is the image too)."""
        pages = len(bits)
        if not bits.any():
            return Chain(self.shared, (None,), np.zeros(pages, dtype=np.uint8), [])
        nonzero = np.packbits(np.concatenate((bits, np.zeros(-pages % 64, dtype=bool))),
                              bitorder="little").view(np.uint64)
        runs = _extents(nonzero, pages, FLAT_RUNS)
        layer = Layer(pages * PAGE)
        layer.write(mem, runs)
        owner = np.zeros(pages, dtype=np.uint8)
        for first, count in runs:
            owner[first:first + count] = 1
        return Chain(self.shared, (layer,), owner, runs)

    def clone_into(self, memory):
        """Fills fresh (all-zero) memory of the same size with the chain's image: the shared
        image and the layers mapped private, or, where the layers' runs are more than MAX_RUNS
        mappings, the flat layer mapped and the pages of the others copied."""
        self.shared.clone_into(memory)
        layers, runs = self.layers, self.runs()
        if len(runs) <= MAX_RUNS:
            for first, count, k in runs:
                memory.overlay_file(layers[k - 1].fd, first * PAGE, first * PAGE, count * PAGE)
            return
        if layers[0] is not None:
            for first, count in self.flat_runs:
                memory.overlay_file(layers[0].fd, first * PAGE, first * PAGE, count * PAGE)
        with memoryview(memory) as view:
            for first, count, k in runs:
                if k > 1:
                    offset, end = first * PAGE, (first + count) * PAGE
                    while offset < end:
                        got = os.preadv(layers[k - 1].fd, [view[offset:end]], offset)
                        if got <= 0:
                            raise OSError(f"short read of a snapshot layer at {offset:#x}")
                        offset += got

    def image(self, size):
        """A private mapping of the chain's image (a GuestMemory), to read from."""
        memory = backend.impl.GuestMemory(size)
        try:
            self.clone_into(memory)
        except BaseException:
            memory.close()
            raise
        return memory


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
    chain = getattr(snapshot, "_chain", None)
    if chain is not None and backend.capabilities.file_overlay:
        chain.clone_into(memory)
        return 0
    shared, delta = snapshot._shared, snapshot._delta
    if shared is None or not backend.capabilities.file_overlay:
        delta = snapshot._nonzero
    else:
        shared.clone_into(memory)
        if delta is None:
            return 0
    with memoryview(memory) as view:
        _pages.restore(view, snapshot._image_view, delta, snapshot._nonzero)
    return _pages.count_bits(delta)
