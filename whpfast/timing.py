"""Timing helpers shared by the demo and bench/: wall times in ns collected into numpy arrays,
summarised as median and percentiles."""

import json
import os
import time
from typing import Callable, List, Optional, Tuple

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


def kernel_bytes() -> "int | None":
    """Kernel memory charged to this process's memory cgroup (page tables, slab, and KVM's
    per-page memslot metadata, which smaps does not show), or None where the cgroup does not say
    (then density figures leave it out, and say so). It counts every process of the cgroup."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):           # cgroup v1
            try:
                with open(f"/sys/fs/cgroup/memory{path}/memory.kmem.usage_in_bytes") as f:
                    return int(f.read())
            except (OSError, ValueError):
                return None
        if controllers == "":                            # cgroup v2: memory.stat's "kernel"
            try:
                with open(f"/sys/fs/cgroup{path}/memory.stat") as f:
                    for stat in f:
                        key, _, value = stat.partition(" ")
                        if key == "kernel":
                            return int(value)
            except (OSError, ValueError):
                pass
    return None


def write_results(out: str, name: str, result: dict, samples: "dict[str, npt.ArrayLike]") -> str:
    """Writes a bench's summary as out/name.json and its raw timing arrays as out/name.npz (the
    files `whpfast bench --compare` and plots read); returns the JSON path."""
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    np.savez(os.path.join(out, f"{name}.npz"), **samples)
    return json_path


def rounds_cli(argv: Optional[List[str]], description: str, name: str, *, requests: int, quick: int,
               what: str, run: Callable[[int, int], Tuple[dict, "dict[str, npt.ArrayLike]"]]) -> int:
    """The command line of a bench measured in interleaved rounds (bench_pool, bench_ray):
    --requests per `what` and round, --rounds, --out, --quick (`quick` requests, 1 round).
    run(requests, rounds) measures, prints its report and returns (summary, timing arrays),
    which are written with write_results."""
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--requests", type=int, default=requests, help=f"requests per {what} and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=".", help=f"directory for {name}.json and {name}.npz")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run ({quick} requests, 1 round)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds = quick, 1
    result, samples = run(args.requests, args.rounds)
    print(f"results: {write_results(args.out, name, result, samples)} and {name}.npz")
    return 0
