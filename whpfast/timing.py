"""Timing helpers shared by the demo and bench/: wall times in ns collected into numpy arrays,
summarised as median and percentiles."""

import time

import numpy as np


def time_calls(fn, count, warmup=50):
    """Runs fn `warmup` times untimed, then `count` times; returns each run's wall time in ns."""
    for _ in range(warmup):
        fn()
    out = np.empty(count, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(count):
        t0 = clock()
        fn()
        out[i] = clock() - t0
    return out


def stats_us(ns):
    """(median, p90, p99) in microseconds."""
    us = np.asarray(ns, dtype=np.float64) / 1000.0
    return float(np.median(us)), float(np.percentile(us, 90)), float(np.percentile(us, 99))


def summary(label, ns):
    median, _, p99 = stats_us(ns)
    return f"{label:<30} median {median:9.1f} us   p99 {p99:9.1f} us   (n={len(ns)})"
