"""The warm-start core (whpfast/core/warm.py) through a real Sandbox: the adaptive hot set (pages
written in a large share of restore cycles stay writable, however many; pages no longer written
leave it), its bound, restores exact through every promotion and lease expiry, and the one host
write function (bounds, and pages it wrote come back on restore even when the writer fails)."""

import numpy as np
import pytest

from whpfast import _pages
from whpfast import testing

pytestmark = pytest.mark.hypervisor
from whpfast.abi import PAGE
LEASE_MAX = _pages.LEASE[1]


def exact(sb, snap):
    return np.array_equal(np.frombuffer(sb._mem, np.uint64), np.frombuffer(snap._image_view, np.uint64))


def heap_pages_hot(sb, first, count):
    """How many of heap pages first..first+count-1 are in the hot set."""
    base = sb._layout.region("heap").gpa // PAGE + first
    hot = testing.warm(sb)._hot
    return sum(int(hot[p >> 6] >> np.uint64(p & 63)) & 1 for p in range(base, base + count))


@pytest.fixture
def sb(testkit):
    import whpfast
    with whpfast.Sandbox(testkit, memory_size=16 << 20) as box:
        yield box


def manual_protect(sb):
    return testing.vm(sb).manual_protect


def test_every_page_a_call_writes_gets_hot(sb):
    """300 pages per call (the old policy kept 64): after two cycles all are hot, and a restore
    re-protects nothing (dirty log read + FPU: 2 ioctls)."""
    snap = sb.snapshot()
    for i in range(4):
        assert sb.call("touch", 0, 300, i + 1) == 300
        sb.restore(snap)
        assert exact(sb, snap)
    if manual_protect(sb):
        assert heap_pages_hot(sb, 0, 300) == 300
        assert sb.last_restore.hypervisor_calls == 2
        assert sb.last_restore.pages_copied + sb.last_restore.pages_zeroed >= 300
    else:       # WHP re-protects every page as it reads the log: no hot set
        assert testing.warm(sb).hot_count == 0
    assert sb.call("checksum") == 0


def test_alternating_workloads_both_get_hot(sb):
    """A mixed workload: two request types, each writing its own pages every other cycle."""
    snap = sb.snapshot()
    for i in range(8):
        sb.call("touch", 0 if i % 2 else 200, 100, 5)
        sb.restore(snap)
        assert exact(sb, snap)
    if manual_protect(sb):
        assert heap_pages_hot(sb, 0, 100) == 100 and heap_pages_hot(sb, 200, 100) == 100
    # pages written once are not
    sb.call("touch", 500, 10, 5)
    sb.restore(snap)
    assert heap_pages_hot(sb, 500, 10) == 0


def test_pages_no_longer_written_leave_the_hot_set(sb):
    snap = sb.snapshot()
    for i in range(3):
        sb.call("touch", 0, 80, 1)
        sb.restore(snap)
    assert heap_pages_hot(sb, 0, 80) == (80 if manual_protect(sb) else 0)
    # another workload from now on: within one lease the old pages are re-protected and stay so
    for i in range(LEASE_MAX + 1):
        sb.call("touch", 300, 20, 2)
        sb.restore(snap)
    assert heap_pages_hot(sb, 0, 80) == 0
    assert heap_pages_hot(sb, 300, 20) == (20 if manual_protect(sb) else 0)
    assert exact(sb, snap)
    # and the old pages, written again, are restored exactly (their dirty bits were cleared)
    sb.call("touch", 0, 80, 3)
    sb.restore(snap)
    assert exact(sb, snap)


def test_restores_stay_exact_through_leases_and_rejoins(sb):
    """Random workloads across several leases: every restore exact, whatever is hot."""
    rng = np.random.default_rng(7)
    sb.call("touch", 0, 50, 4)
    snap = sb.snapshot()
    for i in range(2 * LEASE_MAX):
        first = int(rng.choice([0, 0, 0, 40, 120, 600]))
        sb.call("touch", first, int(rng.integers(1, 90)), int(rng.integers(1, 255)))
        if i % 5 == 0:
            sb.call("add", 1, 2)
        sb.restore(snap)
        if i % 16 == 0 or i > 2 * LEASE_MAX - 4:
            assert exact(sb, snap), f"cycle {i}"
    assert sb.call("read_byte", 10) == 4 and sb.call("read_byte", 60) == 0


def test_hot_set_is_bounded(sb):
    """A guest writing more pages than the bound gets at most hot_limit hot pages; restores stay
    exact for the rest (re-protected as usual)."""
    testing.set_hot_limit(sb, 64)
    snap = sb.snapshot()
    for i in range(4):
        sb.call("touch", 0, 500, i + 1)
        sb.restore(snap)
        assert exact(sb, snap)
        assert testing.warm(sb).hot_count <= 64
    assert testing.warm(sb).hot_count == (64 if manual_protect(sb) else 0)


def test_another_snapshot_empties_the_hot_set(sb):
    snap = sb.snapshot()
    for i in range(3):
        sb.call("touch", 0, 30, 1)
        sb.restore(snap)
    sb.call("touch", 0, 30, 9)
    other = sb.snapshot()
    assert testing.warm(sb).hot_count == 0 and not testing.warm(sb)._scored.any()
    sb.call("touch", 0, 30, 2)
    sb.restore(snap)                          # a full restore: starts over
    assert sb.last_restore.full and testing.warm(sb).hot_count == 0
    assert exact(sb, snap) and sb.call("read_byte", 0) == 0
    sb.restore(other)
    assert sb.call("read_byte", 29) == 9


def test_host_writes_go_through_one_checked_function(sb):
    warm = testing.warm(sb)
    snap = sb.snapshot()
    heap = sb._layout.region("heap").gpa
    with pytest.raises(ValueError, match="outside"):
        warm.store(warm.size - 8, bytes(16))
    with pytest.raises(ValueError, match="outside"):
        warm.write(-PAGE, PAGE, lambda mem, base, size: size)
    assert warm.store(warm.size + PAGE, b"") == 0                 # nothing written: no-op
    assert exact(sb, snap)
    warm.store(heap + 3 * PAGE + 100, b"\x55" * (2 * PAGE))     # three pages, none logged

    def fails_half_way(mem, base, size):
        mem[base:base + PAGE] = b"\x66" * PAGE
        raise RuntimeError("writer failed")
    start = (heap // PAGE + 74) // 64 * 64 - 4       # 8 pages across a bitmap word boundary
    with pytest.raises(RuntimeError):
        warm.write(start * PAGE, 8 * PAGE, fails_half_way)
    sb.restore(snap)
    assert sb.last_restore.host_pages == 3 + 8
    assert exact(sb, snap)
