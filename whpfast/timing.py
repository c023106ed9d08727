"""Timing helpers shared by the demo and bench/: wall times in ns collected into numpy arrays,
summarised as median and percentiles."""

import json
import os
import time
from typing import Callable, Tuple

import numpy as np
import numpy.typing as npt


def time_calls(fn: Callable[[], object], count: int, warmup: int = 50) -> "npt.NDArray[np.int64]":
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


def stats_us(ns: "npt.ArrayLike") -> Tuple[float, float, float]:
    """(median, p90, p99) in microseconds."""
    us = np.asarray(ns, dtype=np.float64) / 1000.0
    return float(np.median(us)), float(np.percentile(us, 90)), float(np.percentile(us, 99))


def summary(label: str, ns: "npt.ArrayLike") -> str:
    median, _, p99 = stats_us(ns)
    return f"{label:<30} median {median:9.1f} us   p99 {p99:9.1f} us   (n={len(ns)})"


def private_bytes() -> int:
    """Host memory private to this process (Linux): Private_Clean + Private_Dirty of
    /proc/self/smaps_rollup. A page-cache page that several mappings share (sandboxes made from
    one snapshot file) does not count; a page mapped once does, whoever else caches it."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Private_Clean", "Private_Dirty"):
                total += int(value.split()[0]) * 1024
    return total


def write_results(out: str, name: str, result: dict, samples: "dict[str, npt.ArrayLike]") -> str:
    """Writes a bench's summary as out/name.json and its raw timing arrays as out/name.npz (the
    files `whpfast bench --compare` and plots read); returns the JSON path."""
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    np.savez(os.path.join(out, f"{name}.npz"), **samples)
    return json_path
