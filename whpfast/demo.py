"""`python -m whpfast demo`: start a sandbox, call into it, and print the latencies measured."""

import time

import numpy as np

from . import guests
from .backend import hypervisor
from .sandbox import Sandbox


def _summary(label, ns):
    us = np.asarray(ns, dtype=np.float64) / 1000.0
    return (f"{label:<28} median {np.median(us):8.1f} us   p99 {np.percentile(us, 99):8.1f} us"
            f"   (n={us.size})")


def time_calls(fn, count):
    """Runs fn count times and returns the wall time of each run in ns, as a numpy array."""
    out = np.empty(count, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(count):
        t0 = clock()
        fn()
        out[i] = clock() - t0
    return out


def main(calls=3000):
    print(f"hypervisor: {hypervisor()}")
    t0 = time.perf_counter_ns()
    with Sandbox(guests.testkit, memory_size=16 << 20) as sb:
        created = time.perf_counter_ns() - t0
        print(f"sandbox created in {created / 1e6:.2f} ms; guest says: ", end="", flush=True)
        greeting = sb.call("hello")
        assert greeting == "hello world", greeting
        for _ in range(100):                      # warm up caches and the shadow page tables
            sb.call("add", 2, 3)
        print(_summary("call add(2, 3)", time_calls(lambda: sb.call("add", 2, 3), calls)))
        payload = bytes(range(256)) * 16
        print(_summary("call echo(4 KiB)", time_calls(lambda: sb.call("echo", payload), calls)))
    return 0
