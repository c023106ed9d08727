"""The process's budget of host mappings, which every sandbox in it shares.

Linux limits the mappings (VMAs) of one process to vm.max_map_count (65530 by default); past it
every mmap of the process fails, the sandboxes' and the interpreter's own alike. A sandbox's
guest memory is host mappings: one for the memory itself and a few for its vCPU and
bookkeeping, one per extent of a snapshot file's image and per run of a host file it refers to
(each splits the memory's mapping: two), and, while a Linux program runs, up to mm.MAX_SHARED
host files it maps copy-on-write plus OVERLAY_REMAPS pages freed under them (two each again).
A restore takes the run's back (mm.AddressSpace.revert_overlays), so `sandbox_peak` bounds what
one sandbox holds at any moment.

`reserve` is called wherever a Pool makes a sandbox: it refuses one whose peak does not fit in
what is left of vm.max_map_count after the process's mappings now and every live reservation,
less HEADROOM for the rest of the process, with MappingBudgetError saying how many fit. The
count is conservative: the mappings a reserved sandbox holds now are counted twice (in the
process's count and in its reservation), never none."""

import contextlib
import os
import threading
import weakref
from typing import Any, Iterator, Optional

from ..errors import MappingBudgetError

DEFAULT_MAX_MAP_COUNT = 65530   # Linux's default vm.max_map_count
HEADROOM = 1024                 # mappings left to the rest of the process (threads, allocators)
FIXED = 16                      # a sandbox's own: its memory, the vCPU's run page, bitmaps
OVERLAY_REMAPS = 64             # _kvm.pyx: fresh mappings a discard may put inside overlays

_lock = threading.Lock()
_reserved = 0                   # the peaks of the live reservations


def max_map_count() -> Optional[int]:
    """vm.max_map_count, or None where there is no such limit to read (not Linux)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return DEFAULT_MAX_MAP_COUNT if os.path.exists("/proc/self/maps") else None


def process_mappings() -> int:
    """The mappings of this process now (/proc/self/maps lines: ~1 ms for 10,000)."""
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


def sandbox_peak(snapshot: Any) -> int:
    """The most host mappings one sandbox made from `snapshot` holds at any moment: its own, the
    snapshot file's extents and host-file runs it maps (a snapshot loaded from a file: two
    each), and for a Linux program the overlays one run may make (mm.MAX_SHARED files and
    OVERLAY_REMAPS freed parts of them, two each)."""
    from ..linux import mm
    from ..linux.process import LinuxSnapshot
    peak = FIXED
    if snapshot.file is not None:
        runs = sum(len(r.runs) for r in getattr(snapshot, "refs", ()))
        peak += 2 * (len(snapshot.extents or ()) + runs)
    if isinstance(snapshot, LinuxSnapshot):
        peak += 2 * (mm.MAX_SHARED + OVERLAY_REMAPS)
    return peak


def reserve(peak: int) -> "Reservation":
    """Reserves `peak` mappings for a sandbox about to be made; MappingBudgetError when they do
    not fit. Attach the Reservation to the sandbox (it is released when the sandbox is
    collected) or release() it when making the sandbox failed."""
    global _reserved
    limit = max_map_count()
    with _lock:
        if limit is not None:
            used = process_mappings() + _reserved
            left = limit - HEADROOM - used
            if peak > left:
                raise MappingBudgetError(
                    f"another sandbox may need up to {peak} host mappings, and only {max(left, 0)} "
                    f"of this process's vm.max_map_count={limit} are left ({used} in use or "
                    f"reserved by its live sandboxes, {HEADROOM} kept for the rest of the process): "
                    f"at most {max(left, 0) // peak} more sandboxes like it fit in this process. "
                    f"Use fewer sandboxes per process (pools in several processes), or raise "
                    f"vm.max_map_count (sysctl)", peak=peak, left=max(left, 0), limit=limit)
        _reserved += peak
    return Reservation(peak)


@contextlib.contextmanager
def reserving(snapshot: Any) -> Iterator["Reservation"]:
    """reserve(sandbox_peak(snapshot)) for a sandbox made in the with block (attach it there);
    released again if the block raises."""
    reservation = reserve(sandbox_peak(snapshot))
    try:
        yield reservation
    except BaseException:
        reservation.release()
        raise


class Reservation:
    """Mappings reserved for one sandbox until release() (idempotent) or until the object it is
    attached to is collected."""

    def __init__(self, peak: int) -> None:
        self.peak = peak
        self._released = False

    def attach(self, owner: Any) -> Any:
        weakref.finalize(owner, self.release)
        return owner

    def release(self) -> None:
        global _reserved
        with _lock:
            if not self._released:
                self._released = True
                _reserved -= self.peak


def reserved() -> int:
    """The mappings the live reservations hold (for tests and stats)."""
    return _reserved
