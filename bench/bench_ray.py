"""Per-request overhead of whpfast.ray against the local whpfast.Pool, in the same run:
python bench/bench_ray.py [--requests N] [--rounds R] [--out DIR] [--quick].

hello_world (`print("hello world")`, restore + run) sent one at a time (the next request after
the previous answer) to: a local Pool of 1 sandbox; a RayPool of 1 actor with 1 sandbox
(`ray.get(pool.submit(code))`, a local Ray cluster, ray.init(num_cpus=2)); and, as Ray's own
floor, a Ray actor method that returns a constant. The three alternate in every round, so drift
of the shared machine hits them alike. Overhead = RayPool median - local Pool median.
Also: throughput on a RayPool of 2 actors (every request submitted, then all waited for; and
the same list through map(), which sends batches) against a local Pool of 2 driven by 2
threads; the cost of starting things (ray.init, a
RayPool's actors with the snapshot shipped to a cold node cache); the resident memory of the
driver and Ray's processes.

Writes bench_ray.json (figures) and bench_ray.npz (every request's latency) to --out. Run it
from anywhere: it starts Ray from a temporary directory (Ray puts the driver's working
directory on its workers' path, where a source checkout's whpfast/ would shadow the installed
one). Figures from the development machines come from a PVM
/dev/kvm (software virtualization, ~25 us per exit), on 2 cores shared with other work."""

import os
import shutil
import sys
import tempfile
import time

import numpy as np
import ray

import whpfast
from whpfast.timing import rounds_cli
import whpfast.ray
from bench_pool import drive     # bench/ is on the path of a script run from it

HELLO = 'print("hello world")'
WANT = whpfast.PythonResult("hello world\n", "", None)


@ray.remote
class _Floor:
    """Ray's own round trip: an actor method that does nothing."""

    def run(self, code, timeout):
        return WANT


def _latencies(request, count):
    out = np.empty(count)
    for i in range(count):
        t0 = time.perf_counter()
        got = request()
        out[i] = time.perf_counter() - t0
        if got != WANT:
            raise AssertionError(f"answered {got!r}")
    return out


def _tree_rss(pid):
    """Resident bytes of a process and all its descendants (Ray's gcs, raylet, workers)."""
    children, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def measure(requests, rounds, log=print):
    work = tempfile.mkdtemp(prefix="bench-ray-")
    with whpfast.PythonSandbox() as sb:
        path = sb.save(os.path.join(work, "hello.snap"))
    here, t0 = os.getcwd(), time.perf_counter()
    os.chdir(work)          # Ray puts this directory on its workers' path: not a source checkout
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    finally:
        os.chdir(here)
    info = {"ray_init_s": time.perf_counter() - t0, "ray_version": ray.__version__,
            "backend": whpfast.backend.NAME}
    try:
        t0 = time.perf_counter()
        rpool = whpfast.ray.RayPool(path, actors=1, num_cpus=1, size=1, cache_dir=os.path.join(work, "cache"))
        info["raypool_start_s"] = time.perf_counter() - t0      # actor start + snapshot shipped
        info["shipped_bytes"] = rpool.shipped_bytes
        floor = _Floor.options(num_cpus=0).remote()
        ray.get(floor.run.remote(HELLO, None))
        samples = {"local": [], "ray": [], "ray_floor": []}
        with whpfast.Pool(path, size=1) as local:
            kinds = {"local": lambda: local.run(HELLO),
                     "ray": lambda: ray.get(rpool.submit(HELLO)),
                     "ray_floor": lambda: ray.get(floor.run.remote(HELLO, None))}
            for k in kinds.values():                    # warm every path once
                _latencies(k, 20)
            for r in range(rounds):
                for name, request in kinds.items():
                    samples[name].append(_latencies(request, requests))
                log(f"round {r + 1}/{rounds}: " + ", ".join(
                    f"{n} {np.median(s[-1]) * 1e6:.0f} us" for n, s in samples.items()))
        info["rss_driver_and_ray_bytes"] = _tree_rss(os.getpid())
        rpool.close()
        ray.kill(floor)
        # pipelined throughput: a RayPool of 2 actors vs a local Pool of 2 with 2 threads
        count = requests * rounds
        with whpfast.ray.RayPool(path, actors=2, num_cpus=1, size=1, cache_dir=os.path.join(work, "cache")) as r2:
            r2.map([HELLO] * 20)
            t0 = time.perf_counter()
            assert ray.get([r2.submit(HELLO) for _ in range(count)]) == [WANT] * count
            info["ray_2actors_submit_rps"] = count / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert r2.map([HELLO] * count) == [WANT] * count
            info["ray_2actors_map_rps"] = count / (time.perf_counter() - t0)
        with whpfast.Pool(path, size=2) as local2:
            info["local_pool2_threads2_rps"] = count / drive(lambda: local2.run(HELLO), 2, count, WANT)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return {k: np.concatenate(v) for k, v in samples.items()}, info


def summary(samples, info):
    stat = {k: {"median_us": float(np.median(v) * 1e6), "p99_us": float(np.percentile(v, 99) * 1e6),
                "n": int(len(v))} for k, v in samples.items()}
    return {"latency": stat, "info": info,
            "overhead_median_us": stat["ray"]["median_us"] - stat["local"]["median_us"],
            "ratio_median": stat["ray"]["median_us"] / stat["local"]["median_us"]}


def report(result):
    lat, info = result["latency"], result["info"]
    print(f"{'hello_world, one at a time':<34} {'median':>10} {'p99':>10}")
    for name, label in (("local", "local Pool (1 sandbox)"), ("ray", "RayPool (1 actor x 1 sandbox)"),
                        ("ray_floor", "Ray no-op actor call (floor)")):
        print(f"{label:<34} {lat[name]['median_us']:8.0f} us {lat[name]['p99_us']:8.0f} us")
    print(f"overhead through Ray: +{result['overhead_median_us']:.0f} us median "
          f"({result['ratio_median']:.2f}x the local Pool); Ray's floor is "
          f"{lat['ray_floor']['median_us']:.0f} us of it")
    print(f"throughput, RayPool of 2 actors x 1 sandbox: all submitted, then waited for "
          f"{info['ray_2actors_submit_rps']:.0f} req/s; map (batched) {info['ray_2actors_map_rps']:.0f} req/s; "
          f"a local Pool of 2 with 2 threads {info['local_pool2_threads2_rps']:.0f} req/s")
    print(f"ray.init {info['ray_init_s']:.2f} s; RayPool start (1 actor, {info['shipped_bytes'] >> 20} MiB "
          f"shipped) {info['raypool_start_s']:.2f} s; driver + Ray processes "
          f"{info['rss_driver_and_ray_bytes'] / 2**30:.2f} GiB resident; backend {info['backend']}")


def run(requests, rounds):
    samples, info = measure(requests, rounds)
    result = summary(samples, info)
    report(result)
    return result, samples


def main(argv=None):
    return rounds_cli(argv, __doc__.splitlines()[0], "bench_ray", requests=300, quick=50,
                      what="path", run=run)


if __name__ == "__main__":
    sys.exit(main())
