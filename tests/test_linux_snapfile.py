"""LinuxSandbox snapshot files mapped copy-on-write: sandboxes made from one file share its pages
(and pay only for what they write), restores stay exact, discarded pages read as zero whatever
the file holds, and the file's image is sparse and checked like every other section."""

import gc
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import whpfast
from conftest import build_c
from whpfast.core import container
from whpfast.linux import snapfile
from whpfast.timing import private_bytes

HERE = Path(__file__).parent / "linux"
MB = 1 << 20
from whpfast.abi import PAGE
DRIVER = (HERE / "driver.py").read_text()
SYSTEM_READ = ["/usr", "/lib", "/lib64", "/etc"]

MAPS_FILES = whpfast.backend.capabilities.file_overlay

pytestmark = [pytest.mark.hypervisor,
              pytest.mark.skipif(sys.platform != "linux", reason="Linux host only: the vDSO clock helper")]


@pytest.fixture(scope="module")
def discard(tmp_path_factory):
    """The discard program parked in read() with its mapping full of 0xAB, saved to a file."""
    out = tmp_path_factory.mktemp("snapfile")
    build_c(out / "discard", "discard.c", "-static")
    with whpfast.LinuxSandbox([str(out / "discard")], memory_size=64 * MB) as lx:
        assert lx.run(b"s\n").stdout == b"nonzero 1048576\n"
        path = lx.snapshot().save(out / "discard.snap")
    return path


def _pages(buffer):
    return np.frombuffer(buffer, dtype=np.uint8).reshape(-1, PAGE)


def _vvar_pages(lx):
    return {p for v in lx.mm.vmas if v.name == b"[vvar]" for p in range(v.start // PAGE, v.end // PAGE)}


def test_a_sandbox_from_a_file_dirtied_and_restored_holds_the_snapshots_bytes(discard):
    snap = whpfast.LinuxSnapshot.load(discard)
    with whpfast.LinuxSandbox.from_snapshot(snap) as lx:
        # mapped from the file, not copied (where the backend can: KVM; WHP copies)
        assert getattr(lx._memory, "overlaid", False) == MAPS_FILES
        assert lx.run(b"w\x01\n").stdout == b"nonzero 1048576\n"
        assert lx.run(b"u\n").stdout == b"nonzero 0\n"
        lx.restore(snap)
        differ = set(np.flatnonzero((_pages(lx._mem) != _pages(snap._image_view)).any(axis=1)).tolist())
        assert differ <= _vvar_pages(lx)                 # only the clock pairing, refreshed by restore
        assert lx.run(b"s\n").stdout == b"nonzero 1048576\n"


@pytest.mark.parametrize("command", [b"u\n", b"f\n", b"d\n"])
def test_discarded_pages_of_a_file_sandbox_read_zero_not_the_files_bytes(discard, command):
    """munmap + mmap, mmap MAP_FIXED over, MADV_DONTNEED: on a copy-on-write file overlay a plain
    MADV_DONTNEED would bring the snapshot's 0xAB bytes back."""
    snap = whpfast.LinuxSnapshot.load(discard)
    with whpfast.LinuxSandbox.from_snapshot(snap) as lx:
        for _ in range(2):
            assert lx.run(command).stdout == b"nonzero 0\n"
            assert lx.run(b"wZ\n").stdout == b"nonzero 1048576\n"
            lx.restore(snap)
            assert lx.run(b"s\n").stdout == b"nonzero 1048576\n"


def test_a_guest_cannot_split_the_hosts_mappings_without_bound(discard):
    """128 single-page munmaps inside the file's overlay, each page mapped again: all zeroed in
    place (a fresh mapping over the snapshot file's image would split a host mapping, and no
    restore could put the file back under it), so a guest cannot exhaust the process's
    vm.max_map_count that every sandbox shares; all of them read zero. (Overlays of host files
    the guest mapped itself may take fresh pages: tests/test_linux_trust.py.)"""
    def host_mappings():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    snap = whpfast.LinuxSnapshot.load(discard)
    with whpfast.LinuxSandbox.from_snapshot(snap) as lx:
        before = host_mappings()
        for _ in range(3):
            assert lx.run(b"p\n").stdout == b"nonzero 524288\n"          # the fresh half is zero
            assert host_mappings() - before <= 8
            assert lx.run(b"wQ\n").stdout == b"nonzero 1048576\n"
            lx.restore(snap)
            assert lx.run(b"s\n").stdout == b"nonzero 1048576\n"
            assert host_mappings() - before <= 8
        assert getattr(lx._memory, "remaps", 0) == 0       # (WHP: no remaps at all)


def test_the_image_is_sparse_and_its_holes_never_reach_a_guest(discard, tmp_path):
    snap = whpfast.LinuxSnapshot.load(discard)
    st = os.stat(discard)
    image_offset = snap._image_offset
    assert image_offset % container.IMAGE_ALIGN == 0 and st.st_size == image_offset + 64 * MB
    assert st.st_blocks * 512 < snap.nonzero_pages * PAGE + 1 * MB           # holes take no space
    # Junk written into a hole (no checksum covers holes): the guest still sees zeros there.
    covered = np.zeros(64 * MB // PAGE, dtype=bool)
    for first, count in snap._extents:
        covered[first:first + count] = True
    hole = int(np.flatnonzero(~covered)[len(np.flatnonzero(~covered)) // 2])
    junk = tmp_path / "junk.snap"
    junk.write_bytes(Path(discard).read_bytes())
    with open(junk, "r+b") as f:
        f.seek(image_offset + hole * PAGE)
        f.write(b"\xee" * PAGE)
    with whpfast.LinuxSandbox.from_snapshot(junk) as lx:
        assert not any(lx._mem[hole * PAGE:(hole + 1) * PAGE])
        assert lx.run(b"s\n").stdout == b"nonzero 1048576\n"


def _refit_image(path, edit):
    """Edits the image bytes of a saved snapshot through edit(bytearray, image offset) and puts
    every checksum right again: a crafted file, not a corrupt one."""
    data = bytearray(path.read_bytes())
    offset = container.SECTION.unpack_from(data, container.HEADER.size + container.SECTION.size
                                           * (len(container.sections_of(data)) - 1))[1]
    edit(data, offset)
    path.write_bytes(container.rebuild(bytes(data), {}))


def test_crafted_data_in_a_zero_page_inside_an_extent_is_refused(discard, tmp_path, monkeypatch):
    """With one extent for the whole image every zero page between the non-zero ones is mapped
    from the file: a file whose bitmap calls such a page zero while it holds data is refused."""
    original = whpfast.LinuxSnapshot.load(discard)
    monkeypatch.setattr(snapfile, "MAX_EXTENTS", 1)       # saves and loads with one extent
    one = tmp_path / "one.snap"
    original.save(one)
    snap = whpfast.LinuxSnapshot.load(one)
    assert len(snap._extents) == 1
    first, count = snap._extents[0]
    bits = np.unpackbits(snap._nonzero.view(np.uint8), bitorder="little")
    gap = first + int(np.flatnonzero(bits[first:first + count] == 0)[0])
    with whpfast.LinuxSandbox.from_snapshot(snap) as lx:             # the honest file works
        assert lx.run(b"s\n").stdout == b"nonzero 1048576\n"
    del snap

    def plant(data, offset):
        data[offset + gap * PAGE + 17] = 0x5A
    _refit_image(one, plant)
    with pytest.raises(whpfast.SnapshotError, match=f"page {gap} is marked zero but holds data"):
        whpfast.LinuxSnapshot.load(one)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.snap"
    os.mkfifo(fifo)
    with pytest.raises(whpfast.SnapshotError, match="not a regular file"):
        whpfast.LinuxSandbox.from_snapshot(fifo)


def test_sandboxes_from_one_file_share_its_pages(tmp_path):
    """python3 with numpy imported, parked: sandboxes made from its file each answer a line and
    hold privately only what they wrote, far below the image, and so do sandboxes made from the
    snapshot in memory (its image is a memfd mapped the same way, core/image.py). On WHP both
    copy: there the measure is seen to count copies."""
    with whpfast.LinuxSandbox(["/usr/bin/python3", "-c", DRIVER, "numpy"], read=SYSTEM_READ) as lx:
        assert lx.run(timeout=120).waiting
        memory_snap = lx.snapshot()
    image = memory_snap.nonzero_pages * PAGE
    loaded = whpfast.LinuxSnapshot.load(memory_snap.save(tmp_path / "numpy.snap"), read=SYSTEM_READ)
    per_sandbox = {}
    for name, snap in (("file", loaded), ("memory", memory_snap)):
        whpfast.LinuxSandbox.from_snapshot(snap).close()           # first-time costs out of the way
        boxes = []
        gc.collect()            # earlier tests' sandboxes freed now, not while this measures
        before = private_bytes()
        try:
            for _ in range(6):
                boxes.append(whpfast.LinuxSandbox.from_snapshot(snap))
                assert boxes[-1].run(b"print(numpy.arange(5).sum())\n").stdout == b"10\n"
            per_sandbox[name] = (private_bytes() - before) / len(boxes)
        finally:
            for box in boxes:
                box.close()
    assert image > 30 * MB, image
    # Copied is about the image (0.77-0.80 of nonzero_pages on the WHP layer of one machine
    # here; what a copy leaves out there is not known yet), shared far below image/6.
    if MAPS_FILES:
        assert per_sandbox["file"] < image / 6, (per_sandbox, image)
        assert per_sandbox["memory"] < image / 6, (per_sandbox, image)
    else:       # WHP: copied (a copy-on-write view would charge the whole view to the commit limit)
        assert per_sandbox["file"] > 0.6 * image, (per_sandbox, image)
        assert per_sandbox["memory"] > 0.6 * image, (per_sandbox, image)
