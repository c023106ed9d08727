"""The warm restore as one C call (the backend's Vcpu.restore_warm, see whpfast/core/warm.py;
it releases the GIL only for large restores): taken for every restore to the baseline and for
no other, equal step by step to the stepwise path it replaces (the same pages copied and
zeroed, the same hot set and re-protect plan, the same hypervisor calls), exact, and refusing
buffers of other sizes without harming the sandbox. Runs on KVM and on the WHP backend over tests/whv."""

import numpy as np
import pytest

import whpfast
from whpfast import backend
from whpfast.errors import GuestTimeout, SandboxPoisoned, SnapshotError

from whpfast import testing

pytestmark = pytest.mark.hypervisor


def exact(sb, snap):
    return np.array_equal(np.frombuffer(sb._mem, np.uint64), np.frombuffer(snap._image_view, np.uint64))


def Spy(sb, stepwise=False):
    """Counts sb's restore_warm and load_state calls; stepwise=True turns the one-call restore
    off, so WarmMemory takes the stepwise path it had before restore_warm existed."""
    testing.stepwise(sb, stepwise)
    return testing.spy(sb, ("restore_warm", "load_state"))


@pytest.fixture
def pair(testkit):
    with whpfast.Sandbox(testkit, memory_size=16 << 20) as a, \
            whpfast.Sandbox(testkit, memory_size=16 << 20) as b:
        yield a, b


def test_only_restores_to_the_baseline_take_the_c_call(pair):
    sb, _ = pair
    spy = Spy(sb)
    snap = sb.snapshot()
    sb.call("touch", 0, 20, 7)
    sb.restore(snap)
    assert spy.calls == {"restore_warm": 1, "load_state": 0}
    assert exact(sb, snap) and sb.call("checksum") == 0
    other = sb.snapshot()                   # another snapshot: a full restore, stepwise
    sb.restore(snap)
    assert spy.calls == {"restore_warm": 1, "load_state": 1} and sb.last_restore.full
    sb.restore(other)
    sb.restore(snap)
    assert spy.calls["load_state"] == 3
    with pytest.raises(GuestTimeout):       # after a timeout every register group is reset
        sb.call("spin", timeout=0.05)
    with pytest.raises(SandboxPoisoned):
        sb.call("checksum")
    sb.restore(snap)
    assert spy.calls == {"restore_warm": 1, "load_state": 4}
    assert exact(sb, snap) and sb.call("checksum") == 0
    sb.restore(snap)
    assert spy.calls == {"restore_warm": 2, "load_state": 4}
    assert exact(sb, snap)


def test_the_c_call_equals_the_stepwise_restore(pair):
    """Two sandboxes, the same calls: one restores through restore_warm, the other stepwise.
    Every restore's figures, the hot set, the scores and the re-protect plan stay equal, through
    promotions (pages written every cycle), demotions and host writes (call arguments), in
    restores small enough to hold the GIL and large enough to release it."""
    warm, step = pair
    Spy(warm)
    Spy(step, stepwise=True)
    snaps = [warm.snapshot(), step.snapshot()]
    for i in range(40):
        # 150 pages: restored holding the GIL; 700: the GIL released for the copies
        first, count = (0, 150) if i < 20 else (0, 700) if i < 25 else (200 + i, 3)
        for sb, snap in zip(pair, snaps):
            assert sb.call("touch", first, count, i + 1) == count
            sb.restore(snap)
            assert exact(sb, snap)
        a, b = warm.last_restore, step.last_restore
        if i < 25:      # RELEASE_PAGES is 512 (later, hot pages read as dirty for a while)
            assert (a.dirty_pages + a.host_pages >= 512) == (i >= 20), i
        assert (a.pages_copied, a.pages_zeroed, a.dirty_pages, a.host_pages, a.hypervisor_calls,
                a.register_calls, a.full) == \
            (b.pages_copied, b.pages_zeroed, b.dirty_pages, b.host_pages, b.hypervisor_calls,
             b.register_calls, b.full), f"cycle {i}"
        wa, wb = testing.warm(warm), testing.warm(step)
        assert wa.hot_count == wb.hot_count and wa._n_touched == wb._n_touched
        for name in ("_hot", "_score", "_scored", "_reprotect", "_host"):
            assert np.array_equal(getattr(wa, name), getattr(wb, name)), (name, i)
    assert testing.warm(warm).vcpu.calls["restore_warm"] == 40 and testing.warm(step).vcpu.calls["restore_warm"] == 0
    if testing.vm(warm).manual_protect:
        assert 0 < testing.warm(warm).hot_count      # the hot set was exercised, not only re-protection
    assert warm.call("checksum") == 0 and step.call("checksum") == 0


def test_restore_warm_refuses_buffers_of_other_sizes(pair):
    """The bookkeeping buffers are checked once, when their WarmPages is made: a short bitmap or
    score array is refused there. A short snapshot image or page bitmap, a plan beyond the
    bitmap or a truncated state part makes restore_warm raise before it touches anything, and
    the sandbox restores and runs as before."""
    sb, _ = pair
    snap = sb.snapshot()
    sb.call("touch", 0, 10, 3)
    w = testing.warm(sb)
    buffers = [w.mem, w._dirty, w._host, w._hot, w._score, w._scored, w._reprotect, w._touched]
    for i, bad in ((1, w._dirty[:1]), (4, w._score[:10]), (7, w._touched[:2])):
        wrong = list(buffers)
        wrong[i] = bad
        with pytest.raises(ValueError, match="restore_warm"):
            backend.impl.WarmPages(*wrong)
    args = [w._pages, snap._image_view, snap._nonzero, w._n_touched, w.hot_limit, w.hot_count, 1,
            snap._state, True]
    for i, bad in ((1, snap._image_view[:4096]), (2, snap._nonzero[:1]),
                   (3, len(w._touched) + 1)):
        wrong = list(args)
        wrong[i] = bad
        with pytest.raises(ValueError, match="restore"):
            w.vcpu.restore_warm(*wrong)
    state = dict(snap._state)
    state["xsave"] = state["xsave"][:100]
    with pytest.raises(SnapshotError, match="xsave"):
        w.vcpu.restore_warm(*args[:7], state, True)
    sb.restore(snap)
    assert exact(sb, snap) and sb.call("checksum") == 0
    assert sb.call("touch", 0, 10, 3) == 10
    sb.restore(snap)
    assert exact(sb, snap) and sb.call("checksum") == 0


def test_a_hypervisor_call_failing_inside_the_c_call_poisons_and_a_full_restore_heals(pair):
    """An XSAVE area of the right size that the hypervisor refuses (XSTATE_BV naming every
    state component, most of which this processor lacks) makes the last call of the C
    sequence fail after the page work: a typed error, the sandbox poisoned, nothing of the
    failed plan left behind, and the next restore (a full one) exact. The other sandbox is untouched."""
    sb, other = pair
    snap, other_snap = sb.snapshot(), other.snapshot()
    for _ in range(3):                       # a hot set and a re-protect plan exist
        sb.call("touch", 0, 40, 9)
        sb.restore(snap)
    good = snap._state["xsave"]
    bad = bytearray(good)
    bad[512:520] = b"\xff" * 8             # XSTATE_BV, in the XSAVE header
    spy = Spy(sb)
    sb.call("touch", 100, 10, 5)            # pages not hot: the failed plan re-protects them
    snap._state["xsave"] = bytes(bad)
    try:
        with pytest.raises(whpfast.WhpfastError, match="XSAVE|Xsave") as failed:
            sb.restore(snap)
    finally:
        snap._state["xsave"] = good
    assert spy.calls["restore_warm"] == 1
    with pytest.raises(SandboxPoisoned):
        sb.call("checksum")
    assert testing.warm(sb).needs_full_reset and testing.warm(sb).baseline is None
    assert not testing.warm(sb)._reprotect.any(), failed.value
    sb.restore(snap)
    assert sb.last_restore.full and exact(sb, snap)
    assert sb.call("checksum") == 0
    sb.restore(snap)
    assert spy.calls["restore_warm"] == 2 and exact(sb, snap)
    assert other.call("touch", 0, 5, 1) == 5
    other.restore(other_snap)
    assert exact(other, other_snap) and other.call("checksum") == 0
