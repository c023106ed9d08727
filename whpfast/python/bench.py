"""Benchmarks of PythonSandbox against native baselines measured in the same run, and the report
of `whpfast bench` (also `python bench/bench_python.py`) and `whpfast demo --python`.

    hello_world  restore + print("hello world"), stdout returned
    pandas       restore + a fixed job (10,000-row frame from a seeded numpy array, groupby +
                 mean, to_json), result returned
    density      private memory per sandbox when N are made from one snapshot file, each having
                 run hello_world once
    snapshot     apparent and allocated size of the saved warm pandas snapshot
Baselines: the forkserver (the strongest process-based peer, like for like: a warm parent with
the same imports forks a child per request, which answers over a pipe); the job natively in this
process (pandas imported: no isolation); the same request over a pipe to a warm native worker
process (no isolation between requests); subprocess.run([python, "-c", ...]); a cold boot of the
sandbox. Density counts kernel memory too (the memory cgroup's, where it says: timing.kernel_bytes).

Timings are numpy arrays of ns; the report gives median and p99. Results go to a directory as
JSON (summary), .npz (every sample) and a PNG plot when matplotlib is installed. --compare
old.json prints the ratios new/old of every median. Figures on the development machines come
from PVM-based /dev/kvm (software virtualization): compare ratios from one run."""

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from ..timing import kernel_bytes, private_bytes, time_calls, write_results

SETUP = "import numpy as np\nimport pandas as pd"
HELLO = 'print("hello world")'
PANDAS_JOB = ("df = pd.DataFrame(np.random.default_rng(7).standard_normal((10000, 2)), columns=['a', 'b'])\n"
              "df['k'] = (df.a * 10).astype(int) % 7\n"
              "print(df.groupby('k').b.mean().to_json())")
TIMED = "import time as _t\n_t0 = _t.perf_counter_ns()\n{code}\nprint(_t.perf_counter_ns() - _t0)"
# A warm native worker: reads one request (a length line, then the code), runs it with stdout
# captured, answers with a length line and the output. The pipe baseline for both requests.
WORKER = r"""
import contextlib, io, sys
import numpy as np, pandas as pd
inp, out = sys.stdin.buffer, sys.stdout.buffer
ns = {"np": np, "pd": pd}
while True:
    line = inp.readline()
    if not line:
        break
    code = inp.read(int(line)).decode()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, dict(ns))
    data = buf.getvalue().encode()
    out.write(b"%d\n" % len(data) + data)
    out.flush()
"""


# The forkserver: the strongest process-based peer, like for like. A warm parent with the same
# imports as the sandbox's setup (and nothing else: fork's cost grows with the parent's memory),
# its objects frozen out of the collector (gc.freeze, so children do not touch them), forks a
# child per request; the child runs the code with stdout captured and writes the answer itself to
# the client's pipe (length line, output); the parent reaps it and takes the next request.
FORKSERVER = r"""
import contextlib, gc, io, os, sys
ns = {}
exec(sys.argv[1], ns)
inp, out = sys.stdin.buffer, sys.stdout.buffer
gc.freeze()
while True:
    line = inp.readline()
    if not line:
        break
    code = inp.read(int(line)).decode()
    pid = os.fork()
    if pid == 0:
        try:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                exec(code, dict(ns))
            data = buf.getvalue().encode()
            data = b"%d\n" % len(data) + data
            while data:
                data = data[os.write(1, data):]
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
"""


class _Server:
    """A process running `script` (WORKER or FORKSERVER) with args, which answers a request (a
    length line, then the code) with a length line and the output; ask(code) is one request."""

    def __init__(self, script, *args):
        self.proc = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)

    def ask(self, code):
        data = code.encode()
        self.proc.stdin.write(b"%d\n" % len(data) + data)
        self.proc.stdin.flush()
        n = int(self.proc.stdout.readline())
        return self.proc.stdout.read(n).decode()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def _forkserver_samples(setup, code, count, want):
    """Requests to a forkserver with `setup` imported, timed from here as a client would."""
    server = _Server(FORKSERVER, setup)
    try:
        def once():
            got = server.ask(code)
            if got != want:
                raise AssertionError(f"the forkserver answered {got!r}, expected {want!r}")
        return time_calls(once, count, warmup=3)
    finally:
        server.close()


def _native(code):
    ns = {"np": __import__("numpy"), "pd": __import__("pandas")}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, ns)
    return buf.getvalue()


def _subprocess(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True).stdout


def _from_snapshot_ns(path, count, cold):
    """Times PythonSandbox.from_snapshot(path); cold: the file's image is not loaded yet."""
    import whpfast
    out = np.empty(count, dtype=np.int64)
    for i in range(count):
        if cold:
            gc.collect()                         # the last sandbox's image is gone: a real load
        t0 = time.perf_counter_ns()
        box = whpfast.PythonSandbox.from_snapshot(path)
        out[i] = time.perf_counter_ns() - t0
        box.close()
        del box
    return out


def measure(*, hello=300, pandas=60, forks=100, spawns=5, colds=2, density=50, log=print):
    """Runs every measurement; returns (samples: {name: ns array}, info: {name: value})."""
    import whpfast
    if importlib.util.find_spec("pandas") is None:
        raise SystemExit("the Python benches need pandas in this interpreter: pip install 'whpfast[python]'")
    samples, info = {}, {}
    expected_hello = "hello world\n"
    expected_pandas = _native(PANDAS_JOB)

    def check(name, got, want):
        if got != want:
            raise AssertionError(f"{name} answered {got!r}, expected {want!r}")

    def sandbox_loop(name, sb, code, want, count):
        restore_ns, exits = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
        lx = sb.linux
        for _ in range(3):
            check(name, sb.run(code).stdout, want)
        clock = time.perf_counter_ns
        total = np.empty(count, dtype=np.int64)
        for i in range(count):
            before = lx.syscall_count
            t0 = clock()
            result = sb.run(code)
            total[i] = clock() - t0
            # system calls served; the first (the parked read taking the request) needed no exit
            exits[i] = lx.syscall_count - before - 1
            restore_ns[i] = lx.last_restore["ns"]
            if result.stdout != want:
                check(name, result.stdout, want)
        samples[name], samples[f"{name}.restore"] = total, restore_ns
        last = lx.last_restore
        # The user code alone, timed inside the guest (the vDSO clock: no exit).
        in_guest = np.empty(min(count, 30), dtype=np.int64)
        for i in range(len(in_guest)):
            out = sb.run(TIMED.format(code=code)).stdout
            text, _, ns = out.rstrip("\n").rpartition("\n")
            check(name, text + "\n", want)
            in_guest[i] = int(ns)
        samples[f"{name}.in_guest"] = in_guest
        info[f"{name}.syscall_exits"] = int(np.median(exits))
        info[f"{name}.pages_copied"] = int(last["pages_copied"])
        info[f"{name}.pages_zeroed"] = int(last["pages_zeroed"])
        info[f"{name}.dirty_pages"] = int(last["dirty_pages"])
        log(row(name, total) + f"   (restore {np.median(restore_ns) / 1e3:.1f} us, the code in the "
            f"guest {np.median(in_guest) / 1e3:.1f} us, "
            f"{info[f'{name}.syscall_exits']} syscall exits, {last['dirty_pages']} dirty pages)")

    log("== warm sandboxes (restore + run)")
    with whpfast.PythonSandbox(warmup=HELLO) as sb:
        sandbox_loop("hello_world", sb, HELLO, expected_hello, hello)
    t0 = time.perf_counter()
    with whpfast.PythonSandbox(setup=SETUP, warmup=PANDAS_JOB) as sb:
        info["pandas.boot_s"] = time.perf_counter() - t0
        sandbox_loop("pandas", sb, PANDAS_JOB, expected_pandas, pandas)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "pandas.snap")
            sb.save(path)
            st = os.stat(path)
            info["snapshot.apparent_mib"] = st.st_size / 2**20
            info["snapshot.allocated_mib"] = st.st_blocks * 512 / 2**20
            log(f"snapshot (warm pandas): {info['snapshot.apparent_mib']:.1f} MiB apparent, "
                f"{info['snapshot.allocated_mib']:.1f} MiB allocated")
            samples["from_snapshot"] = _from_snapshot_ns(path, 5, cold=True)
            log(row("from_snapshot(file)", samples["from_snapshot"]))
            with whpfast.PythonSandbox.from_snapshot(path):        # the file's image stays loaded
                samples["from_snapshot.loaded"] = _from_snapshot_ns(path, 5, cold=False)
                log(row("from_snapshot(file), 2nd+", samples["from_snapshot.loaded"]))
            if density:
                gc.collect()
                before, kernel_before = private_bytes() // 1024, kernel_bytes()
                boxes = [whpfast.PythonSandbox.from_snapshot(path) for _ in range(density)]
                for box in boxes:
                    check("density", box.run(HELLO).stdout, expected_hello)
                gc.collect()
                after, kernel_after = private_bytes() // 1024, kernel_bytes()
                for box in boxes:
                    box.close()
                info["density.count"] = density
                info["density.private_mib_per_sandbox"] = (after - before) / density / 1024
                kernel = ""
                if kernel_before is not None and kernel_after is not None:
                    info["density.kernel_mib_per_sandbox"] = (kernel_after - kernel_before) / density / 2**20
                    info["density.total_mib_per_sandbox"] = (info["density.private_mib_per_sandbox"]
                                                             + info["density.kernel_mib_per_sandbox"])
                    kernel = (f" + {info['density.kernel_mib_per_sandbox']:.1f} MiB of kernel memory "
                              f"(the memory cgroup's: KVM's memslot metadata, page tables)")
                else:
                    kernel = " (kernel memory not counted: this host's memory cgroup does not say)"
                log(f"density: {density} sandboxes from one snapshot file, each ran hello_world: "
                    f"{info['density.private_mib_per_sandbox']:.1f} MiB private each{kernel} (the "
                    f"file's loaded image, shared, counted once)")

    log("== baselines in the same run")
    samples["hello_world.native"] = time_calls(lambda: check("native", _native(HELLO), expected_hello), hello)
    samples["pandas.native"] = time_calls(lambda: check("native", _native(PANDAS_JOB), expected_pandas), pandas)
    worker = _Server(WORKER)
    try:
        samples["hello_world.pipe"] = time_calls(lambda: check("pipe", worker.ask(HELLO), expected_hello), hello)
        samples["pandas.pipe"] = time_calls(lambda: check("pipe", worker.ask(PANDAS_JOB), expected_pandas), pandas)
    finally:
        worker.close()
    samples["hello_world.forkserver"] = _forkserver_samples("", HELLO, forks, expected_hello)
    samples["pandas.forkserver"] = _forkserver_samples(SETUP, PANDAS_JOB, forks, expected_pandas)
    samples["hello_world.subprocess"] = time_calls(
        lambda: check("subprocess", _subprocess(HELLO), expected_hello), spawns, warmup=1)
    samples["pandas.subprocess"] = time_calls(
        lambda: check("subprocess", _subprocess(SETUP + "\n" + PANDAS_JOB), expected_pandas), spawns, warmup=1)

    def cold(setup, code, want):
        with whpfast.PythonSandbox(setup=setup) as sb:
            check("cold", sb.run(code, fresh=False).stdout, want)

    samples["hello_world.cold_boot"] = time_calls(lambda: cold("", HELLO, expected_hello), colds, warmup=0)
    samples["pandas.cold_boot"] = time_calls(lambda: cold(SETUP, PANDAS_JOB, expected_pandas), colds, warmup=0)
    for request in ("hello_world", "pandas"):
        for base in ("forkserver", "native", "pipe", "subprocess", "cold_boot"):
            log(row(f"{request}.{base}", samples[f"{request}.{base}"], samples[request]))
    info.update(goals(samples, info))
    return samples, info


def median_us(ns):
    return float(np.median(ns)) / 1e3


def row(label, ns, sandbox=None):
    us = np.asarray(ns, dtype=np.float64) / 1e3
    line = f"{label:<26} median {np.median(us):10.1f} us   p99 {np.percentile(us, 99):10.1f} us   (n={len(us)})"
    if sandbox is not None:
        line += f"   {np.median(us) / median_us(sandbox):8.2f}x the sandbox"
    return line


def goals(samples, info):
    """Issue 21's goals, checked against this run's figures (the forkserver: like for like)."""
    hello, pandas = median_us(samples["hello_world"]), median_us(samples["pandas"])
    out = {
        "goal.hello_world <= 120 us": hello <= 120,
        "goal.hello_world >= 6x faster than the forkserver": median_us(samples["hello_world.forkserver"]) / hello >= 6,
        "goal.pandas <= 1.3 ms": pandas <= 1300,
        "goal.pandas >= 6x faster than the forkserver": median_us(samples["pandas.forkserver"]) / pandas >= 6,
        "goal.pandas <= 1.2x pipe to warm process": pandas / median_us(samples["pandas.pipe"]) <= 1.2,
        "goal.snapshot <= 100 MiB allocated": info["snapshot.allocated_mib"] <= 100,
    }
    if "density.total_mib_per_sandbox" in info:
        out["goal.density <= 2 MiB per sandbox, kernel memory included"] = info["density.total_mib_per_sandbox"] <= 2
    return out


def summary(samples, info):
    return {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "hypervisor": __import__("whpfast").hypervisor(),
                    "note": "PVM /dev/kvm on the development machines: compare ratios from one run"},
        "medians_us": {k: median_us(v) for k, v in samples.items()},
        "p99_us": {k: float(np.percentile(v, 99)) / 1e3 for k, v in samples.items()},
        "info": info,
    }


def plot(samples, path):
    """A PNG of every timing, log scale; returns None, or why there is no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'whpfast[plot]'): no PNG written"
    names = [k for k in samples if not k.endswith((".restore", ".in_guest"))]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    ax.boxplot([np.asarray(samples[k]) / 1e3 for k in names], vert=False, showfliers=False)
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.set_xscale("log")
    ax.set_xlabel("us per request (log scale)")
    ax.set_title("whpfast PythonSandbox vs baselines (one run)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def compare(new, old, log=print):
    """Ratios new/old of every median both results have."""
    log(f"{'median':<28} {'old us':>12} {'new us':>12} {'new/old':>8}")
    for k, v in new["medians_us"].items():
        if k in old.get("medians_us", {}) and old["medians_us"][k]:
            log(f"{k:<28} {old['medians_us'][k]:12.1f} {v:12.1f} {v / old['medians_us'][k]:8.2f}")


OTHER_BENCHES = ("bench_call.py", "bench_warm.py", "bench_linux.py", "bench_vdso.py", "bench_pool.py",
                 "bench_ray.py")
QUICK = {"bench_pool.py": ["--quick"], "bench_ray.py": ["--quick"],     # (their own smoke sizes)
         "bench_call.py": ["--calls", "500", "--repeats", "2", "--n", "2000000"],
         "bench_warm.py": ["--count", "200"],
         "bench_linux.py": ["--calls", "200", "--repeats", "1", "--sandboxes", "4"],
         "bench_vdso.py": ["--calls", "30"]}


def _other_benches(bench_dir, out_dir, log, quick=False):
    """The SDK, Linux, Pool and Ray benches of a source checkout (bench/: not installed with the
    package), their text output kept in the report (bench_pool.py and bench_ray.py also write
    their .json and .npz there: they run in out_dir). Returns the ones that failed or are
    missing, each with why."""
    failed = []
    for name in OTHER_BENCHES:
        script = os.path.join(bench_dir, name)
        if not os.path.exists(script):
            failed.append(f"{name}: not found in {bench_dir}")
            continue
        log(f"== {name}")
        r = subprocess.run([sys.executable, script, *(QUICK.get(name, []) if quick else [])],
                           capture_output=True, text=True, cwd=out_dir)
        text = r.stdout + (f"\n[exit status {r.returncode}]\n{r.stderr}" if r.returncode else "")
        with open(os.path.join(out_dir, name.replace(".py", ".txt")), "w") as f:
            f.write(text)
        log(text)
        if r.returncode:
            failed.append(f"{name}: exit status {r.returncode} ({(r.stderr.strip().splitlines() or ['?'])[-1]})")
    return failed


def main(argv=None):
    parser = argparse.ArgumentParser(prog="whpfast bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-results", help="directory for JSON, .npz and PNG")
    parser.add_argument("--compare", metavar="OLD_JSON", help="print ratios against an earlier result file")
    parser.add_argument("--python-only", action="store_true", help="only the Python sandbox benches")
    parser.add_argument("--bench-dir", default="bench", help="the source tree's bench/ (other benches)")
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--density", type=int, default=50, help="sandboxes for the density figure (0: skip)")
    args = parser.parse_args(argv)
    if not args.python_only and not os.path.isdir(args.bench_dir):     # before minutes of measuring
        print(f"whpfast bench: the SDK, Linux, Pool and Ray benches are in the source tree's bench/ "
              f"(not installed with the package); {args.bench_dir!r} is not there: run from a "
              f"checkout, pass --bench-dir, or --python-only for the Python benches alone",
              file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    counts = dict(hello=30, pandas=10, forks=5, spawns=2, colds=1) if args.quick else {}
    samples, info = measure(density=args.density, **counts)
    result = summary(samples, info)
    json_path = write_results(args.out, "bench_python", result, samples)
    why = plot(samples, os.path.join(args.out, "bench_python.png"))
    print(why or f"plot: {os.path.join(args.out, 'bench_python.png')}")
    for goal, ok in info.items():
        if goal.startswith("goal."):
            print(f"{goal[5:]:<45} {'OK' if ok else 'MISSED'}")
    print(f"results: {json_path} and bench_python.npz")
    if args.compare:
        with open(args.compare) as f:
            compare(result, json.load(f))
    if args.python_only:
        return 0
    failed = _other_benches(os.path.abspath(args.bench_dir), os.path.abspath(args.out), print, args.quick)
    for why in failed:
        print(f"whpfast bench: FAILED {why}", file=sys.stderr)
    return 1 if failed else 0


def demo():
    """`whpfast demo --python`: hello_world and pandas medians beside a forkserver with the same
    imports and subprocess, measured in this run (pandas only where this interpreter has it)."""
    import importlib.util
    import whpfast
    print(f"hypervisor: {whpfast.hypervisor()}")
    has_pandas = importlib.util.find_spec("pandas") is not None
    requests = [("hello_world", "", HELLO, "hello world\n", 200)]
    if has_pandas:
        requests.append(("pandas job", SETUP, PANDAS_JOB, _native(PANDAS_JOB), 40))
    print("warm start = restore the snapshot + run the code, every time; baselines in this run:")
    for label, setup, code, want, count in requests:
        t0 = time.perf_counter()
        with whpfast.PythonSandbox(setup=setup, warmup=code) as sb:
            booted = time.perf_counter() - t0
            result = sb.run(code)
            if result.stdout != want:
                raise AssertionError(f"the sandbox answered {result!r}, expected {want!r}")
            ours = time_calls(lambda: sb.run(code), count)
        fork = _forkserver_samples(setup, code, 50, want)
        spawn = time_calls(lambda: _subprocess(setup + "\n" + code), 3, warmup=1)
        print(f"{label}: {code.splitlines()[-1]!r} -> {result.stdout.strip()!r} "
              f"(sandbox booted and snapshotted in {booted:.1f} s)")
        print(row("  sandbox", ours))
        print(row("  forkserver, same imports", fork, ours))
        print(row("  subprocess python -c", spawn, ours))
    if not has_pandas:
        print("(pandas is not installed in this interpreter: pip install 'whpfast[python]' for the "
              "pandas figure)")
    print("(PVM /dev/kvm here: every guest exit costs ~25 us; compare ratios, not absolute times)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
