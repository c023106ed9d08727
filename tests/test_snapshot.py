"""Snapshots and restores on the real hypervisor: exactness, isolation, cost that follows the dirty
pages, in-place resets, file mappings kept, and the disk format under systematic corruption."""

import ctypes
import os
import struct
import sys
import threading

import numpy as np
import pytest

import whpfast
from whpfast import GuestFault, GuestTimeout, SandboxPoisoned, SnapshotError, backend
from whpfast import testing
from whpfast.core.container import HEADER, SECTION
from whpfast.snapshot import Snapshot

pytestmark = pytest.mark.hypervisor
from whpfast.abi import PAGE
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only: /proc/self/pagemap")

# Hypervisor calls a restore makes, by backend. KVM: the FPU ioctl (general and special registers
# ride on KVM_RUN), plus debug registers, XCRs and MSRs after a fault. WHP: one register batch
# (applied with the next run) plus the XSAVE call, whatever happened.
EXPECTED_CALLS = {
    "kvm": {"register": 1, "steady": 2, "idle_register": 0, "idle": 1, "after_fault": 4},
    "whp": {"register": 2, "steady": 3, "idle_register": 1, "idle": 2, "after_fault": 2},
}[backend.NAME]


def memory_equals_image(sb, snap):
    mem = np.frombuffer(sb._mem, dtype=np.uint64)
    img = np.frombuffer(snap._image_view, dtype=np.uint64)
    return np.array_equal(mem, img)


def heap_address(sb, page):
    return sb._memory.address + sb._layout.region("heap").gpa + page * PAGE


def pfn(address):
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // PAGE * 8)
        entry = struct.unpack("<Q", f.read(8))[0]
    assert entry >> 63, "page not present"
    return entry & ((1 << 55) - 1)


def test_issue_example(testkit, data_file, tmp_path):
    with whpfast.Sandbox(testkit, files={"initrd": data_file}) as sb:
        sb.call("touch", 0, 4, 7)
        snap = sb.snapshot()
        sb.call("touch", 0, 64, 9)
        sb.restore(snap)
        assert sb.call("read_byte", 0) == 7
        assert sb.call("read_byte", 4) == 0
        snap.save(tmp_path / "warm.snap")
    with whpfast.Sandbox.from_snapshot(tmp_path / "warm.snap", files={"initrd": data_file}) as fresh:
        assert fresh.call("read_byte", 3) == 7
        assert fresh.call("file_byte", "initrd", 5) == data_file.read_bytes()[5]


def test_restore_is_exact_and_repeatable(sandbox):
    sandbox.call("touch", 10, 3, 5)
    snap = sandbox.snapshot()
    assert memory_equals_image(sandbox, snap)
    for round_ in range(5):
        sandbox.register("h", lambda x: x + 1)
        sandbox.call("touch", 0, 200, 0xAB)
        sandbox.call("echo", bytes(range(256)) * 100)       # input and output buffers
        sandbox.call("call_host", "h", round_)                # exchange buffer, host-written
        sandbox.call("add_float", 1.5, 2.25)                  # XMM registers
        sandbox.call("alloc_test", 50)                         # allocator state on the heap
        sandbox.restore(snap)
        assert memory_equals_image(sandbox, snap), f"memory differs after restore {round_}"
        assert sandbox.call("checksum") == 3 * 5
        assert sandbox.call("read_byte", 10) == 5


def test_registers_restored(sandbox):
    snap = sandbox.snapshot()
    before = testing.vcpu(sandbox).save_state()
    assert sandbox.call("add_float", 1.5, 2.25) == 3.75
    changed = testing.vcpu(sandbox).save_state()
    assert changed["xsave"] != before["xsave"]          # the call left XMM state behind
    sandbox.restore(snap)
    after = testing.vcpu(sandbox).save_state()
    assert set(after) == set(backend.impl.STATE_PARTS)
    for part in after:
        assert after[part] == snap._state[part], part


def test_restore_cost_follows_dirty_pages(testkit):
    with whpfast.Sandbox(testkit, memory_size=64 << 20) as sb:
        snap = sb.snapshot()
        sb.call("add", 1, 2)
        sb.restore(snap)
        small = sb.last_restore
        assert small.pages_copied + small.pages_zeroed < 16
        assert not small.full
        sb.call("touch", 0, 500, 1)
        sb.restore(snap)
        big = sb.last_restore
        assert 500 <= big.pages_copied + big.pages_zeroed < 520
        assert big.dirty_pages >= 500
        assert big.ns > 0


def test_register_reset_is_batched(sandbox):
    snap = sandbox.snapshot()
    for _ in range(4):
        sandbox.call("add", 1, 2)
        sandbox.restore(snap)
        assert sandbox.last_restore.register_calls == EXPECTED_CALLS["register"]
    # steady state on KVM: the pages every call writes stay writable, so the dirty log is read
    # but nothing needs re-protecting
    assert sandbox.last_restore.hypervisor_calls == EXPECTED_CALLS["steady"]
    sandbox.restore(snap)
    # nothing ran: the FPU cannot have changed
    assert sandbox.last_restore.register_calls == EXPECTED_CALLS["idle_register"]
    assert sandbox.last_restore.hypervisor_calls == EXPECTED_CALLS["idle"]
    assert sandbox.call("add", 2, 2) == 4


@linux_only
def test_scratch_reset_keeps_physical_pages(sandbox):
    """The reset writes into the very pages the hypervisor maps; it never swaps them."""
    snap = sandbox.snapshot()
    sandbox.call("touch", 0, 8, 3)
    addresses = [heap_address(sandbox, p) for p in range(8)]
    before = [pfn(a) for a in addresses]
    sandbox.restore(snap)
    assert [pfn(a) for a in addresses] == before
    assert sandbox.call("read_byte", 0) == 0
    sandbox.call("touch", 0, 8, 4)
    assert [pfn(a) for a in addresses] == before
    assert sandbox.call("read_byte", 7) == 4


@pytest.mark.skipif(backend.NAME != "kvm", reason="KVM only: on WHP, tests/whv checks the pinned-pages model")
def test_pfn_check_detects_swapped_pages(sandbox):
    """The check above can fail: dropping pages (what MADV_DONTNEED resets do) changes PFNs."""
    sandbox.call("touch", 0, 4, 3)
    address = heap_address(sandbox, 0)
    before = pfn(address)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.madvise(address, 4 * PAGE, 4) == 0       # MADV_DONTNEED
    # Take up the freed pages (the allocator would hand the same one straight back), so the
    # guest's next write faults in a page that is certainly another.
    import mmap
    hog = mmap.mmap(-1, 64 << 20)
    for off in range(0, len(hog), PAGE):
        hog[off] = 1
    sandbox.call("touch", 0, 4, 5)
    assert pfn(address) != before
    hog.close()


def test_file_mapping_stays_mapped(testkit, data_file):
    data = data_file.read_bytes()
    with whpfast.Sandbox(testkit, files={"initrd": data_file}) as sb:
        mapping = sb._file_mappings[0]
        address = mapping.address
        snap = sb.snapshot()
        with pytest.raises(GuestFault):
            sb.call("fault", "write_readonly_file")
        sb.restore(snap)
        assert sb._file_mappings[0] is mapping and mapping.address == address
        assert sb.call("file_byte", "initrd", 100) == data[100]
    assert data_file.read_bytes() == data


@pytest.mark.parametrize("kind", ["pagefault", "divide", "invalid_opcode"])
def test_restore_after_fault(sandbox, kind):
    sandbox.call("touch", 0, 1, 6)
    snap = sandbox.snapshot()
    with pytest.raises(GuestFault):
        sandbox.call("fault", kind)
    with pytest.raises(SandboxPoisoned):
        sandbox.call("add", 1, 1)
    sandbox.restore(snap)
    assert sandbox.last_restore.register_calls == EXPECTED_CALLS["after_fault"]
    assert sandbox.poisoned is None
    assert sandbox.call("read_byte", 0) == 6
    assert memory_equals_image(sandbox, snap) or sandbox.call("add", 1, 1) == 2


def test_restore_after_timeout_and_cancel(sandbox):
    snap = sandbox.snapshot()
    with pytest.raises(GuestTimeout):
        sandbox.call("spin", timeout=0.1)
    sandbox.restore(snap)
    assert sandbox.call("add", 1, 2) == 3
    threading.Timer(0.1, sandbox.cancel).start()
    with pytest.raises(whpfast.GuestCancelled):
        sandbox.call("spin")
    sandbox.restore(snap)
    assert sandbox.call("add", 1, 2) == 3


def test_restore_other_snapshot_is_full_and_exact(sandbox):
    sandbox.call("touch", 0, 2, 1)
    a = sandbox.snapshot()
    sandbox.call("touch", 5, 2, 2)
    b = sandbox.snapshot()
    sandbox.restore(a)
    assert sandbox.last_restore.full
    assert memory_equals_image(sandbox, a)
    assert [sandbox.call("read_byte", p) for p in (0, 5)] == [1, 0]
    sandbox.restore(b)
    assert memory_equals_image(sandbox, b)
    assert [sandbox.call("read_byte", p) for p in (0, 5)] == [1, 2]


def test_snapshot_of_poisoned_sandbox_refused(sandbox):
    with pytest.raises(GuestFault):
        sandbox.call("fault", "divide")
    with pytest.raises(SandboxPoisoned):
        sandbox.snapshot()


def test_wrong_guest_or_layout_refused(testkit, tmp_path):
    src = tmp_path / "other.c"
    src.write_text('#include "whpfast_guest.h"\nWF_EXPORT(one, "", \'i\') { return wf_ok(ret, wf_int(1)); }\n')
    other = whpfast.build_guest([src], tmp_path / "other.elf")
    with whpfast.Sandbox(testkit) as a, whpfast.Sandbox(other) as b, \
            whpfast.Sandbox(testkit, memory_size=32 << 20) as c:
        snap = a.snapshot()
        with pytest.raises(SnapshotError, match="guest"):
            b.restore(snap)
        with pytest.raises(SnapshotError, match="layout"):
            c.restore(snap)
        assert b.call("one") == 1 and c.call("add", 1, 1) == 2
    with pytest.raises(TypeError):
        a.restore("not a snapshot")


def test_sandboxes_from_one_file_are_isolated(testkit, tmp_path):
    with whpfast.Sandbox(testkit) as sb:
        sb.call("touch", 0, 2, 8)
        sb.snapshot().save(tmp_path / "s.snap")
    snap = Snapshot.load(tmp_path / "s.snap")
    assert Snapshot.load(tmp_path / "s.snap") is snap          # validated and mapped once
    boxes = [whpfast.Sandbox.from_snapshot(snap) for _ in range(10)]
    try:
        for i, box in enumerate(boxes):
            box.call("touch", 0, 1, i)
        for i, box in enumerate(boxes):
            assert box.call("read_byte", 0) == i
            assert box.call("read_byte", 1) == 8
            box.call("touch", 1, 1, 99)
            box.restore(snap)
            assert not box.last_restore.full
            assert memory_equals_image(box, snap)
            assert box.call("read_byte", 1) == 8
    finally:
        for box in boxes:
            box.close()


def test_save_is_atomic_and_never_writes_a_mapped_file(testkit, tmp_path):
    path = tmp_path / "s.snap"
    with whpfast.Sandbox(testkit) as sb:
        sb.call("touch", 0, 1, 1)
        sb.snapshot().save(path)
        live = whpfast.Sandbox.from_snapshot(path)
        inode = os.stat(path).st_ino
        sb.call("touch", 0, 1, 2)
        sb.snapshot().save(path)                      # replaces the file the live sandbox maps
    assert os.stat(path).st_ino != inode
    assert sorted(os.listdir(tmp_path)) == ["s.snap"]
    with live:
        assert live.call("read_byte", 0) == 1         # still the old content
    with whpfast.Sandbox.from_snapshot(path) as new:
        assert new.call("read_byte", 0) == 2


def test_snapshot_file_is_sparse(testkit, tmp_path):
    with whpfast.Sandbox(testkit, memory_size=256 << 20) as sb:
        sb.snapshot().save(tmp_path / "s.snap")
    st = os.stat(tmp_path / "s.snap")
    assert st.st_size > 256 << 20
    assert st.st_blocks * 512 < 2 << 20


# -- corruption ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshot_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "good.snap"
    with whpfast.Sandbox(whpfast.guests.testkit) as sb:
        sb.call("touch", 0, 3, 0x5A)
        sb.snapshot().save(path)
    return path.read_bytes()


def write(tmp_path, data, name="bad.snap"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def header_fields(data):
    return list(HEADER.unpack_from(data, 0))


def sections(data):
    """{name: (offset, length)} of the container's section table."""
    out = {}
    for i in range(header_fields(data)[6]):
        name, offset, length, *_ = SECTION.unpack_from(data, HEADER.size + i * SECTION.size)
        out[name.rstrip(b"\0").decode()] = (offset, length)
    return out


def with_field(data, index, value, fix_crc=True):
    fields = header_fields(data)
    header_size = fields[4]
    fields[index] = value
    raw = bytearray(HEADER.pack(*fields) + data[HEADER.size:header_size])
    if fix_crc:
        import zlib
        struct.pack_into("<I", raw, header_size - 4, zlib.crc32(raw[:header_size - 4]))
    return bytes(raw) + data[header_size:]


def test_good_file_loads(tmp_path, snapshot_bytes):
    snap = Snapshot.load(write(tmp_path, snapshot_bytes))
    with whpfast.Sandbox.from_snapshot(snap) as sb:
        assert sb.call("read_byte", 2) == 0x5A


@pytest.mark.parametrize("index", range(len(HEADER.unpack(bytes(HEADER.size)))))
@pytest.mark.parametrize("fix_crc", [False, True])
def test_every_header_field(tmp_path, snapshot_bytes, index, fix_crc):
    """Each header field changed (with and without a recomputed header checksum) is refused."""
    fields = header_fields(snapshot_bytes)
    original = fields[index]
    if isinstance(original, bytes):
        bad_values = [b"WHPFSNAQ", b"\0" * 8]
    else:
        bits = {1: 16, 2: 16, 5: 64}.get(index, 32)        # the field's width (HEADER)
        bad_values = [original + 1, original ^ ((1 << 40) if bits == 64 else 1 << (bits - 1)), 0]
    for value in bad_values:
        if value == original:
            continue
        path = write(tmp_path, with_field(snapshot_bytes, index, value, fix_crc), f"f{index}-{value!r}.snap")
        with pytest.raises(SnapshotError):
            Snapshot.load(path)


def test_truncation_everywhere(tmp_path, snapshot_bytes):
    size = len(snapshot_bytes)
    cuts = sorted(set([0, 1, 7, 8, 100, HEADER.size - 1, HEADER.size, HEADER.size + 1, 500, 1000,
                       PAGE - 1, PAGE, PAGE + 1, 3 * PAGE, size // 2, size - PAGE, size - 1]
                      + list(range(0, 8 * PAGE, 613))))
    for cut in cuts:
        path = write(tmp_path, snapshot_bytes[:cut], f"cut{cut}.snap")
        with pytest.raises(SnapshotError):
            Snapshot.load(path)
    path = write(tmp_path, snapshot_bytes + b"\0" * PAGE, "long.snap")
    with pytest.raises(SnapshotError, match="padded|truncated"):
        Snapshot.load(path)


def test_flipped_bytes_in_every_section(tmp_path, snapshot_bytes):
    table = sections(snapshot_bytes)
    snap = Snapshot.load(write(tmp_path, snapshot_bytes, "ref.snap"))
    first_extent = snap._extents[0][0]
    offsets = []
    for name in ("sdk", "vcpu", "pages"):
        off, length = table[name]
        offsets += [off, off + length // 2, off + length - 1]
    offsets += [table["image"][0] + first_extent * PAGE + 10]           # inside stored memory
    for n, offset in enumerate(offsets):
        data = bytearray(snapshot_bytes)
        data[offset] ^= 0x04
        with pytest.raises(SnapshotError, match="checksum"):
            Snapshot.load(write(tmp_path, bytes(data), f"flip{n}.snap"))


def test_bytes_outside_extents_never_reach_the_guest(tmp_path, snapshot_bytes):
    """A hole page that became non-zero on disk is not read: the guest sees zero there."""
    image_off, pages = sections(snapshot_bytes)["image"][0], header_fields(snapshot_bytes)[5] // PAGE
    snap = Snapshot.load(write(tmp_path, snapshot_bytes, "ref2.snap"))
    covered = set()
    for first, count in snap._extents:
        covered.update(range(first, first + count))
    heap = snap.meta["layout"]["regions"]
    heap_gpa = [r for r in heap if r[0] == "heap"][0][1]
    page = next(p for p in range(heap_gpa // PAGE + 100, pages) if p not in covered)
    data = bytearray(snapshot_bytes)
    data[image_off + page * PAGE] = 0x77
    with whpfast.Sandbox.from_snapshot(write(tmp_path, bytes(data), "hole.snap")) as sb:
        assert sb.call("read_byte", page - heap_gpa // PAGE) == 0


def test_other_files_refused(tmp_path):
    for name, data in [("empty", b""), ("text", b"hello world" * 100),
                       ("elf", open(whpfast.guests.testkit, "rb").read())]:
        with pytest.raises(SnapshotError):
            Snapshot.load(write(tmp_path, data, name))
    with pytest.raises(SnapshotError, match="cannot open"):
        Snapshot.load(tmp_path / "missing.snap")
    with pytest.raises(SnapshotError):
        whpfast.Sandbox.from_snapshot(tmp_path / "missing.snap")


def test_hot_pages_stay_exact(sandbox):
    """Pages written every cycle stay writable (not re-protected); restores stay exact both for
    them and for pages written for the first time later."""
    snap = sandbox.snapshot()
    for i in range(6):
        sandbox.call("touch", 0, 4, i + 1)
        sandbox.restore(snap)
        assert memory_equals_image(sandbox, snap)
    assert testing.warm(sandbox).hot_count > 0 or not testing.vm(sandbox).manual_protect
    sandbox.call("touch", 100, 3, 9)          # new pages: logged as usual
    sandbox.call("touch", 0, 1, 9)            # a hot page: restored without being logged again
    sandbox.restore(snap)
    assert memory_equals_image(sandbox, snap)
    assert sandbox.call("checksum") == 0
