"""Soak: restore + call cycles with faults, timeouts and cancels mixed in, checking that the
process does not grow (python bench/soak.py [--cycles N]).

Every cycle restores one snapshot and makes one call, checking its result. One cycle in 50 each:
a guest fault (page fault, divide error, invalid opcode in turn), a spinning guest stopped by a
2 ms timeout, a spinning guest stopped by cancel() storms from another thread, and a host-function
call. RSS, open file descriptors and mappings come from /proc/self at the start (after a warm-up)
and at the end; the run fails when fds or mappings grew at all, or RSS grew by more than 4 MiB
(allocator noise), or when any cancel of a call sent more than one signal to the vCPU thread.
"""

import argparse
import gc
import os
import sys
import threading
import time

import whpfast
from whpfast import testing

RSS_SLACK_KIB = 4096
FAULTS = ("pagefault", "divide", "invalid_opcode")


def usage():
    """(RSS KiB, open fds, mappings) of this process, from /proc/self."""
    gc.collect()
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return rss, fds, maps


class Canceller:
    """A thread that, when asked, cancels the sandbox's call in a loop until that call ended:
    cancel() storms, with the first cancel landing at a random point of the call's start."""

    def __init__(self, sb):
        self.sb = sb
        self.go = threading.Event()
        self.done = threading.Event()
        self.stop = False
        self.cancels = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            self.go.wait()
            self.go.clear()
            if self.stop:
                return
            while not self.done.is_set():
                for _ in range(20):
                    self.sb.cancel()
                self.cancels += 20
                time.sleep(0.0002)
            self.done.clear()

    def cancel_call(self, call):
        self.go.set()
        try:
            return call()
        finally:
            self.done.set()
            while self.done.is_set() and self.thread.is_alive():   # wait for the storm to end
                time.sleep(0.0001)

    def close(self):
        self.stop = True
        self.go.set()
        self.thread.join()


def cycle(sb, snap, canceller, i, counts):
    sb.restore(snap)
    kind = i % 50
    try:
        if kind == 10:
            sb.call("fault", FAULTS[(i // 50) % 3])
            raise AssertionError("the fault did not end the call")
        if kind == 20:
            sb.call("spin", timeout=0.002)
            raise AssertionError("the timeout did not end the call")
        if kind == 30:
            canceller.cancel_call(lambda: sb.call("spin"))
            raise AssertionError("cancel() did not end the call")
        if kind == 40:
            assert sb.call("call_host", "twice", i) == 2 * i
        else:
            assert sb.call("add", i, 1) == i + 1
        counts["ok"] += 1
    except whpfast.GuestFault:
        counts["fault"] += 1
    except whpfast.GuestTimeout:
        counts["timeout"] += 1
    except whpfast.GuestCancelled:
        counts["cancel"] += 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=500)
    args = parser.parse_args(argv)
    counts = dict.fromkeys(("ok", "fault", "timeout", "cancel"), 0)
    with whpfast.Sandbox(whpfast.guests.testkit, memory_size=16 << 20) as sb:
        sb.register("twice", lambda x: 2 * x)
        snap = sb.snapshot()
        canceller = Canceller(sb)
        try:
            for i in range(args.warmup):
                cycle(sb, snap, canceller, i, counts)
            start = usage()
            kicks0 = testing.vcpu(sb).kicks
            counts = dict.fromkeys(counts, 0)
            t0 = time.monotonic()
            for i in range(args.cycles):
                cycle(sb, snap, canceller, i, counts)
            elapsed = time.monotonic() - t0
            end = usage()
            kicks = testing.vcpu(sb).kicks - kicks0
        finally:
            canceller.close()
    print(f"backend {whpfast.hypervisor()}: cycles {args.cycles} in {elapsed:.1f} s "
          f"({elapsed / args.cycles * 1e6:.0f} us each): {counts['ok']} calls ok, "
          f"{counts['fault']} faults, {counts['timeout']} timeouts, {counts['cancel']} cancelled "
          f"by {canceller.cancels} cancel() calls sending {kicks} kicks")
    print(f"{'':12} {'RSS KiB':>10} {'fds':>6} {'mappings':>9}")
    print(f"{'start':12} {start[0]:>10} {start[1]:>6} {start[2]:>9}")
    print(f"{'end':12} {end[0]:>10} {end[1]:>6} {end[2]:>9}")
    problems = []
    if end[0] - start[0] > RSS_SLACK_KIB:
        problems.append(f"RSS grew by {end[0] - start[0]} KiB (slack {RSS_SLACK_KIB})")
    if end[1] > start[1]:
        problems.append(f"open fds grew by {end[1] - start[1]}")
    if end[2] > start[2]:
        problems.append(f"mappings grew by {end[2] - start[2]}")
    expected = {"fault": 0, "timeout": 0, "cancel": 0}
    for i in range(args.cycles):
        key = {10: "fault", 20: "timeout", 30: "cancel"}.get(i % 50)
        if key:
            expected[key] += 1
    for key, n in expected.items():
        if counts[key] != n:
            problems.append(f"{counts[key]} {key}s, expected {n}")
    if kicks > counts["cancel"]:
        problems.append(f"{kicks} kicks for {counts['cancel']} cancelled calls")
    if problems:
        print("FAILED: " + "; ".join(problems))
        return 1
    print("flat: no growth in RSS (within slack), fds or mappings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
