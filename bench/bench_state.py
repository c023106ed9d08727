"""Live interpreter state (issue 20 item 1): fork(), checkpoint(), save + from_snapshot in a new
process, and the private memory of 50 forks, for a PythonSandbox with pandas imported and a
10 MB DataFrame in it, against os.fork() of a native Python process holding the same DataFrame,
measured in the same run.

    python bench/bench_state.py [--rounds N]

Prints medians and percentiles (numpy) in ms. Goals (issue 20): fork to a first answer <= 1 ms;
checkpoint after a cell writing ~1,500 pages <= 1 ms; save + from_snapshot in a new process
answering a cell <= 100 ms; 50 forks <= 2 MiB private memory each beyond what each wrote."""

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import whpfast
import whpfast.backend

SETUP = "import numpy as np\nimport pandas as pd"
FRAME = "df = pd.DataFrame(np.random.default_rng(1).random((131072, 10)))"      # 10 MiB of floats
CELL = "int(df.shape[0])"
WRITE_1500 = "scratch = np.ones(1500 * 512)"          # ~1,500 pages (6 MB) newly written


def stats(name, ms):
    ms = np.asarray(ms)
    p = np.percentile(ms, [10, 50, 90, 99])
    print(f"{name:<44} median {p[1]:9.3f} ms   p10 {p[0]:8.3f}  p90 {p[2]:8.3f}  p99 {p[3]:8.3f}  (n={len(ms)})")


def private_bytes():
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def native_fork(rounds):
    """os.fork() of this process with pandas and the same DataFrame: fork, the child answers
    the same cell through a pipe, the parent reads it."""
    import pandas as pd                                     # noqa: F401 (the native baseline)
    ns = {}
    exec(SETUP + "\n" + FRAME, ns)
    times = []
    for _ in range(rounds):
        r, w = os.pipe()
        t0 = time.perf_counter_ns()
        pid = os.fork()
        if pid == 0:
            os.write(w, str(eval(CELL, ns)).encode())
            os._exit(0)
        os.read(r, 64)
        times.append((time.perf_counter_ns() - t0) / 1e6)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    print(f"whpfast {whpfast.__version__}, backend {whpfast.backend.NAME}")
    sb = whpfast.PythonSandbox(setup=SETUP)
    sb.run(FRAME, fresh=False)
    sb.checkpoint()         # a first incremental checkpoint (the DataFrame's pages) out of the way

    fork_ms, first_ms = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter_ns()
        child, = sb.fork()
        t1 = time.perf_counter_ns()
        assert child.eval(CELL, fresh=False) == 131072
        t2 = time.perf_counter_ns()
        child.close()
        fork_ms.append((t2 - t0) / 1e6)
        first_ms.append((t1 - t0) / 1e6)
    stats("fork() to its first answer", fork_ms)
    stats("  of which fork() itself", first_ms)
    stats("os.fork() native, same DataFrame, answer", native_fork(args.rounds))

    cp_ms, pages = [], []
    for _ in range(args.rounds):
        sb.run(WRITE_1500, fresh=False)
        t0 = time.perf_counter_ns()
        cp = sb.checkpoint()
        cp_ms.append((time.perf_counter_ns() - t0) / 1e6)
        delta = int(np.unpackbits(cp._delta.view(np.uint8)).sum()) if cp._delta is not None else -1
        chain = getattr(cp, "_chain", None)
        # the pages of its own layer (KVM: written since the previous checkpoint), unless the
        # chain was flattened then (a layer with all of its delta)
        own = int((chain.owner == len(chain.layers)).sum()) if chain is not None else delta
        pages.append((delta, own, chain is not None and len(chain.layers) == 1))
    stats("checkpoint() after a cell writing ~1,500 pages", cp_ms)
    pages = np.array(pages)
    print(f"  its image's delta from the whole capture: median {int(np.median(pages[:, 0]))} pages; "
          f"pages it wrote: median {int(np.median(pages[:, 1]))}; flattened {int(pages[:, 2].sum())} "
          f"of {len(pages)} times")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "live.snap")
        save_ms, load_ms = [], []
        probe = ("import sys, time, whpfast\nt0 = time.perf_counter_ns()\n"
                 "sb = whpfast.PythonSandbox.from_snapshot(sys.argv[1])\n"
                 f"assert sb.eval({CELL!r}, fresh=False) == 131072\n"
                 "print((time.perf_counter_ns() - t0) / 1e6)")
        for _ in range(max(3, args.rounds // 5)):
            t0 = time.perf_counter_ns()
            cp.save(path)
            save_ms.append((time.perf_counter_ns() - t0) / 1e6)
            out = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True,
                                 check=True, cwd=tmp)
            load_ms.append(float(out.stdout.split()[-1]))
        stats("save(path) of the live state", save_ms)
        stats("from_snapshot(path) in a new process + a cell", load_ms)
        stats("  save + from_snapshot + cell", np.array(save_ms) + np.array(load_ms))

    gc.collect()
    before = private_bytes()
    forks = sb.fork(50)
    for f in forks:
        assert f.eval(CELL, fresh=False) == 131072
    per = (private_bytes() - before) / 50
    print(f"50 forks answering a cell: private memory {per / 2**20:.2f} MiB each "
          f"(the image: {cp.nonzero_pages * 4096 / 2**20:.0f} MiB non-zero)")
    for f in forks:
        f.close()
    sb.close()


if __name__ == "__main__":
    main()
