"""Warm-start benchmarks, each next to its baseline in the same run (python bench/bench_warm.py).

Figures on the development machines come from PVM-based /dev/kvm (software virtualization with
shadow paging: exits and page faults cost far more than on hardware virtualization). Quote the
ratios measured in one run; absolute times drift on these shared machines.
"""

import argparse
import ctypes
import gc
import os
import sys
import tempfile
import time

import numpy as np

import whpfast
from whpfast import _pages
from whpfast.timing import private_bytes
from whpfast.snapshot import Snapshot
from whpfast.timing import stats_us, summary, time_calls
from whpfast import testing

from whpfast.abi import PAGE
MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def row(label, ns, baseline=None, goal=None):
    line = summary(label, ns)
    if baseline is not None:
        ratio = stats_us(ns)[0] / stats_us(baseline)[0]
        line += f"   {ratio:5.2f}x"
        if goal is not None:
            line += f" (goal <= {goal}x: {'OK' if ratio <= goal else 'MISSED'})"
    print(line)


def dirty_then_restore(sb, snap, pages, count):
    """Times only the restore, after a call that dirtied `pages` heap pages."""
    out = np.empty(count, dtype=np.int64)
    for i in range(count):
        if pages:
            sb.call("touch", 0, pages, (i & 0x7F) + 1)
        else:
            sb.call("add", 1, 2)
        t0 = time.perf_counter_ns()
        sb.restore(snap)
        out[i] = time.perf_counter_ns() - t0
    return out


def full_copy_restore(sb, snap):
    """Baseline 1: copy the whole memory image back and reset every register group."""
    dirty = testing.warm(sb)._dirty
    all_pages = np.full_like(dirty, np.uint64(0xFFFFFFFFFFFFFFFF))
    testing.vm(sb).get_dirty_log(0, dirty.view(np.uint8))
    _pages.restore(sb._mem, snap._image_view, all_pages, snap._nonzero)
    testing.load_state_separately(sb, snap._state)


def hyperlight_restore(sb, snap):
    """Baseline 2, Hyperlight's KVM sequence: separate register ioctls, MADV_DONTNEED over all
    writable memory (pages fault back in on next use), then the snapshot's contents put back
    (Hyperlight maps its snapshot region read-only instead; here code and data share RAM)."""
    testing.vm(sb).get_dirty_log(0, testing.warm(sb)._dirty.view(np.uint8))
    if _libc.madvise(sb._memory.address, sb._memory.size, MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), "madvise")
    _pages.restore(sb._mem, snap._image_view, snap._nonzero, snap._nonzero)
    testing.load_state_separately(sb, snap._state)


def hot_set_cycles(sb, snap, pages, count, warmup=10):
    """(restore times, call times) of `count` cycles of restore + a call writing `pages` heap
    pages, after `warmup` cycles that let the hot set settle."""
    restore_t = np.empty(count, dtype=np.int64)
    call_t = np.empty(count, dtype=np.int64)
    for i in range(warmup + count):
        t0 = time.perf_counter_ns()
        sb.call("touch", 0, pages, (i & 0x7F) + 1)
        t1 = time.perf_counter_ns()
        sb.restore(snap)
        t2 = time.perf_counter_ns()
        if i >= warmup:
            call_t[i - warmup], restore_t[i - warmup] = t1 - t0, t2 - t1
    return restore_t, call_t


def fork_hello():
    """Baseline 3: os.fork() of this process (already warm: whpfast and numpy imported, no
    sandbox yet), the child sends "hello world" back over a pipe and exits; the parent reads it
    and reaps it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, b"hello world")
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    assert data == b"hello world"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args(argv)
    n = args.count
    print(f"hypervisor: {whpfast.hypervisor()} (development machines: PVM software virtualization)")
    if whpfast.backend.NAME == "whp" and sys.platform != "win32":
        print("NOTE: the WHP backend over the KVM-backed WHv* layer of tests/whv: these figures "
              "measure that layer, not Windows.")
    print()
    testkit = whpfast.guests.testkit
    quiet = dict(on_print=lambda text: None)

    print("== restore + hello call (the hello_world figure)")
    # Forked before any sandbox exists: fork's cost grows with the parent's mapped memory.
    fork = time_calls(fork_hello, max(20, n // 20), warmup=5)
    with whpfast.Sandbox(testkit, **quiet) as sb:
        snap = sb.snapshot()
        ours = time_calls(lambda: (sb.restore(snap), sb.call("hello")), n)
        copy = time_calls(lambda: (full_copy_restore(sb, snap), sb.call("hello")), n // 4)
        hl = time_calls(lambda: (hyperlight_restore(sb, snap), sb.call("hello")), n // 4)
        call_only = time_calls(lambda: sb.call("hello"), n)
        row("hello call alone", call_only)
        row("restore + hello (whpfast)", ours)
        row("full-copy restore + hello", copy, ours)
        row("Hyperlight-style + hello", hl, ours)
        row("os.fork() + pipe (no VM)", fork, ours)
        print("  (ratios: baseline / whpfast)")

    print("\n== hot set: pages left writable across restores, capped at 64 (the old policy) vs adaptive")
    for pages in (140, 1000):
        results = {}
        for label, limit in (("capped at 64", 64), ("adaptive", None)):
            with whpfast.Sandbox(testkit, memory_size=64 << 20, **quiet) as sb:
                if limit is not None:
                    testing.set_hot_limit(sb, limit)   # the same policy with the old fixed cap
                snap = sb.snapshot()
                results[label] = hot_set_cycles(sb, snap, pages, max(50, n // 4))
                hot = testing.warm(sb).hot_count
            restore_t, call_t = results[label]
            print(f"-- {pages} pages written per call, {label} ({hot} hot pages)")
            base = results.get("capped at 64")
            row("   restore", restore_t, None if label == "capped at 64" else base[0])
            row("   call", call_t, None if label == "capped at 64" else base[1])
            row("   restore + call", restore_t + call_t,
                None if label == "capped at 64" else base[0] + base[1])
    print("  (ratios: adaptive / capped at 64)")

    print("\n== restore time against dirty pages (64 MiB sandbox)")
    with whpfast.Sandbox(testkit, memory_size=64 << 20, **quiet) as sb:
        snap = sb.snapshot()
        base = None
        for pages in (0, 1, 16, 256, 4096):
            t = dirty_then_restore(sb, snap, pages, max(50, n // (1 + pages // 64)))
            base = t if base is None else base
            row(f"restore, {pages:4d} dirty heap pages", t, base)
            print(f"{'':32}last_restore: {sb.last_restore}")

    print("\n== restore time against sandbox memory, 16 dirty pages")
    base = None
    for size in (16 << 20, 256 << 20, 1 << 30):
        with whpfast.Sandbox(testkit, memory_size=size, **quiet) as sb:
            snap = sb.snapshot()
            t = dirty_then_restore(sb, snap, 16, n)
        if base is None:
            base = t
            row(f"restore, {size >> 20:5d} MiB", t)
        else:
            row(f"restore, {size >> 20:5d} MiB", t, base, goal=1.2 if size == 1 << 30 else None)

    print("\n== register reset: batched vs one call per register group, each + the next call")
    with whpfast.Sandbox(testkit, **quiet) as sb:
        snap = sb.snapshot()
        state = snap._state
        vcpu = testing.vcpu(sb)
        batched = time_calls(lambda: (vcpu.load_state(state, fpu=True, full=False), sb.call("none")), n)
        separate = time_calls(lambda: (testing.load_state_separately(sb, state), sb.call("none")), n)
        alone = time_calls(lambda: sb.call("none"), n)
        row("call alone", alone)
        row("batched reset + call", batched)
        row("separate ioctls + call", separate, batched)
        b, s, a = (stats_us(x)[0] for x in (batched, separate, alone))
        n_b = vcpu.load_state(state, fpu=True, full=False)
        n_s = testing.load_state_separately(sb, state)
        print(f"  reset cost: batched {b - a:.1f} us ({n_b} hypervisor calls), "
              f"separate {s - a:.1f} us ({n_s} calls)")

    print("\n== cold start from a disk snapshot")
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "warm.snap")
    with whpfast.Sandbox(testkit, **quiet) as sb:
        sb.call("hello")
        sb.snapshot().save(path)
    st = os.stat(path)
    print(f"snapshot file: {st.st_size / 2**20:.1f} MiB apparent, {st.st_blocks * 512 / 1024:.0f} KiB allocated")
    snap = Snapshot.load(path)

    def cold():
        whpfast.Sandbox.from_snapshot(snap, **quiet).close()

    def cold_call():
        with whpfast.Sandbox.from_snapshot(snap, **quiet) as sb:
            sb.call("hello")

    def fresh():
        whpfast.Sandbox(testkit, **quiet).close()

    fresh_t = time_calls(fresh, n // 4)
    cold_t = time_calls(cold, n // 4)
    row("new Sandbox(testkit)", fresh_t)
    median = stats_us(cold_t)[0]
    row("Sandbox.from_snapshot(file)", cold_t, fresh_t)
    print(f"  goal: median under 2 ms: {'OK' if median < 2000 else 'MISSED'} ({median / 1000:.2f} ms)")
    row("from_snapshot + hello + close", time_calls(cold_call, n // 4))
    load_t = time_calls(lambda: Snapshot._load(open(path, "rb"), path), 50, warmup=5)
    row("Snapshot load + validation", load_t)

    print("\n== private memory, 100 sandboxes from one snapshot file")
    gc.collect()
    before = private_bytes() // 1024
    boxes = [whpfast.Sandbox.from_snapshot(snap, **quiet) for _ in range(100)]
    for box in boxes:
        box.call("hello")
    gc.collect()
    after = private_bytes() // 1024
    for box in boxes:
        box.restore(snap)
    dirty = np.mean([box.last_restore.dirty_pages + box.last_restore.host_pages for box in boxes])
    for box in boxes:
        box.close()
    per = (after - before) / 100
    print(f"private memory per sandbox: {per:.0f} KiB, of which {dirty:.0f} pages ({dirty * 4:.0f} KiB) "
          f"the call dirtied; without them {per - dirty * 4:.0f} KiB "
          f"(goal under 300 KiB: {'OK' if per - dirty * 4 < 300 else 'MISSED'}). "
          f"Kernel memory (KVM's shadow page tables, vCPU) is not in these figures.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
