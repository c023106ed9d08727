"""Linux personality benchmarks, each next to its baseline in the same run
(run: python bench/bench_linux.py after pip install .).

0. Host cost of serving one system call (no exit: the handler called as the exit loop calls it)
   for the calls a Python import makes most, C paths (whpfast/_linux.pyx: dispatcher, checked
   guest copies) against the Python ones, switched in this process, interleaved.
1. A system call round trip (getppid: `syscall` -> user stub -> `out` exit -> Python dispatch ->
   back through sync regs), timed inside the guest with the vDSO clock, against a bare CPL3 `out`
   exit through the same backend (bench_call.raw_vm), timed from the host.
2. Cold boot of Debian's /usr/bin/python3 -c 'print(1)' / 'import numpy' / 'import pandas' in a
   fresh LinuxSandbox (construct + run to exit + close) against the same command run natively
   (subprocess.run: fork, exec, run, wait); the constructor's share is printed too. Every exit
   costs ~26 us on PVM (case 1's bare exit): the exits alone bound the ratio from below.
3. Warm start: restore a python3 parked in read(0) + answer one line of stdin, against a bare
   Sandbox.call("add", 2, 3) of the SDK personality.
4. Density: N sandboxes made from one saved snapshot of that python3 (pandas imported), each
   answering one line: host memory private to each (Private_Clean + Private_Dirty of
   /proc/self/smaps_rollup, delta over the N), against N made from the same snapshot in memory
   (which copy the image); also the saved file's size, apparent and allocated.

Cases 1-3 also run with the Python versions of the hot paths (WHPFAST_PURE_PYTHON=1: the exit
loop, dispatch and checked guest copies of whpfast/linux in Python instead of whpfast/_linux.pyx),
in a child process interleaved with this one's runs (--no-compare skips it): "C" and "Python"
figures from the same run.

Figures on the development machines come from PVM-based /dev/kvm (software virtualization: an
exit costs ~25 us, a first touch of a page ~10-20 us); quote ratios, not absolute times.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import whpfast
from whpfast.linux import vdso
from whpfast.timing import private_bytes, stats_us, summary, time_calls

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_call import raw_vm  # noqa: E402

READ = ["/usr", "/lib", "/lib64", "/etc"]
DRIVER = (Path(__file__).resolve().parent.parent / "tests" / "linux" / "driver.py").read_text()

SYSCALL_LOOP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
static long ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    long *d = malloc(n * sizeof *d);
    for (int i = 0; i < n; i++) { long t = ns(); syscall(SYS_getppid); d[i] = ns() - t; }
    fwrite(d, sizeof *d, n, stdout);
    return 0;
}
"""


def _loop_program():
    tmp = Path(tempfile.mkdtemp())
    (tmp / "loop.c").write_text(SYSCALL_LOOP)
    subprocess.run(["gcc", "-O2", "-static", "-o", tmp / "loop", tmp / "loop.c"], check=True)
    return str(tmp / "loop")


def measure(kind, arg):
    """One sample set of a case, in this process's mode (C, or Python under WHPFAST_PURE_PYTHON=1),
    as ns: 'syscall' (getppid round trips timed in the guest; arg: the loop program and count),
    'cold' (construct + run to exit; arg: the python3 -c code), 'warm' (restore + one line)."""
    vdso.calibrate()          # once per process (20 ms): not part of any sample
    if kind == "syscall":
        program, calls = arg
        with whpfast.LinuxSandbox([program, str(calls)], memory_size=64 << 20) as lx:
            out = lx.run(timeout=600)
        return np.frombuffer(out.stdout, dtype=np.int64)[calls // 10:]     # drop the warm-up tenth
    if kind == "cold":
        t0 = time.perf_counter_ns()
        with whpfast.LinuxSandbox(["/usr/bin/python3", "-c", arg], read=READ) as lx:
            setup = time.perf_counter_ns() - t0
            r = lx.run(timeout=600)
            exits = lx.syscall_count
        elapsed = time.perf_counter_ns() - t0
        assert r.exit_code == 0, r
        return np.array([elapsed, exits, setup], dtype=np.int64)
    calls, modules = arg
    lx = whpfast.LinuxSandbox(["/usr/bin/python3", "-c", DRIVER, *modules], read=READ)
    assert lx.run(timeout=600).waiting
    snap = lx.snapshot()
    lx.restore(snap)
    lx.run(b"print('warm')\n")                 # first restore after the snapshot: not timed

    def request():
        lx.restore(snap)
        assert lx.run(b"print('hello world')\n").stdout == b"hello world\n"
    out = time_calls(request, calls, warmup=5)
    lx.close()
    return out


def in_python(kind, arg):
    """measure(kind, arg) with the Python hot paths, in a child process."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([kind, arg])],
                          env=dict(os.environ, WHPFAST_PURE_PYTHON="1"), check=True,
                          capture_output=True)
    return np.array(json.loads(proc.stdout), dtype=np.int64)


def host_cost(rounds):
    from whpfast import _linux
    from whpfast.linux import syscalls
    from whpfast.linux.task import CWD
    from whpfast.linux.mm import AddressSpace
    names = ("check", "read", "write", "view", "read_cstring", "read_u64s")
    lx = whpfast.LinuxSandbox(["/usr/bin/python3", "-c", "import sys; sys.stdin.readline()"], read=READ)
    assert lx.run(timeout=600).waiting
    mm = lx.mm
    scratch = mm.map(0, 16 * 4096, 3)
    here, missing, buf = scratch, scratch + 4096, scratch + 8192
    mm.write(here, b"/usr/lib/python3.11/os.py\0")
    mm.write(missing, b"/usr/lib/python3.11/no_such_module.py\0")
    nr = syscalls.NUMBERS
    fd = syscalls.dispatch(lx.task, nr["openat"], (CWD, here, 0, 0, 0, 0))
    cases = {"getppid": (nr["getppid"], (0,) * 6),
             "newfstatat (found)": (nr["newfstatat"], (CWD, here, buf, 0, 0, 0)),
             "newfstatat (ENOENT)": (nr["newfstatat"], (CWD, missing, buf, 0, 0, 0)),
             "openat + close": None,
             "fstat": (nr["fstat"], (fd, buf, 0, 0, 0, 0)),
             "ioctl TCGETS (ENOTTY)": (nr["ioctl"], (fd, 0x5401, buf, 0, 0, 0)),
             "lseek": (nr["lseek"], (fd, 0, 0, 0, 0, 0)),
             "pread64 16 KiB": (nr["pread64"], (fd, buf, 16384, 0, 0, 0))}
    results = {name: ([], []) for name in cases}
    for _ in range(rounds):
        for fast in (True, False):
            dispatch = syscalls.dispatch if fast else syscalls.py_dispatch
            for n in names:
                setattr(AddressSpace, n, getattr(_linux, n) if fast else getattr(AddressSpace, "py_" + n))
            try:
                for name, case in cases.items():
                    if case is None:
                        def call():
                            f = dispatch(lx.task, nr["openat"], (CWD, here, 0, 0, 0, 0))
                            dispatch(lx.task, nr["close"], (f, 0, 0, 0, 0, 0))
                    else:
                        def call(n=case[0], args=case[1]):
                            dispatch(lx.task, n, args)
                    results[name][0 if fast else 1].append(np.median(time_calls(call, 200, warmup=20)))
            finally:
                for n in names:
                    setattr(AddressSpace, n, getattr(_linux, n))
    lx.close()
    print("host cost of one system call (handler only, no exit), medians:")
    for name, (c, py) in results.items():
        c, py = np.median(c) / 1e3, np.median(py) / 1e3
        print(f"  {name:<24} C {c:6.2f} us   Python {py:6.2f} us   C / Python {c / py:.2f}x")


def syscall_round_trip(calls, compare):
    program = _loop_program()
    c, py = [], []
    for _ in range(2 if compare else 1):       # interleaved with the Python runs
        c.append(measure("syscall", (program, calls)))
        if compare:
            py.append(in_python("syscall", (program, calls)))
    guest = np.concatenate(c)
    vcpu, entry, stack, close = raw_vm()
    vcpu.enter(entry, stack)
    raw = time_calls(vcpu.run, len(guest))
    close()
    print(summary("bare CPL3 exit (KVM_RUN)", raw))
    print(summary("getppid round trip (C)", guest))
    print(f"  ratio syscall / bare exit (median): {stats_us(guest)[0] / stats_us(raw)[0]:.2f}x")
    if compare:
        py = np.concatenate(py)
        print(summary("getppid round trip (Python)", py))
        print(f"  ratio syscall / bare exit (median): {stats_us(py)[0] / stats_us(raw)[0]:.2f}x   "
              f"C / Python: {stats_us(guest)[0] / stats_us(py)[0]:.2f}x")


def cold_boot(repeats, compare):
    vdso.calibrate()
    for code in ("print(1)", "import numpy", "import pandas"):
        argv = ["/usr/bin/python3", "-c", code]
        native, guest, py, setups, exits = [], [], [], [], 0
        for _ in range(repeats):               # interleaved: native, C, Python
            t0 = time.perf_counter_ns()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            native.append(time.perf_counter_ns() - t0)
            elapsed, exits, setup = measure("cold", code)
            guest.append(elapsed)
            setups.append(setup)
            if compare:
                py.append(in_python("cold", code)[0])
        g, n = np.median(guest) / 1e6, np.median(native) / 1e6
        line = (f"{'cold ' + repr(code):<30} C {g:8.1f} ms   native {n:7.1f} ms   ratio {g / n:5.2f}x")
        if compare:
            p = np.median(py) / 1e6
            line += f"   Python {p:8.1f} ms ({p / n:5.2f}x; C / Python {g / p:.2f}x)"
        print(line + f"   ({exits} system calls; of C: constructor {np.median(setups) / 1e6:.1f} ms)")


def warm_start(calls, modules, compare):
    label = "python3" + (f" +{','.join(modules)}" if modules else "")
    with whpfast.Sandbox(whpfast.guests.testkit) as sb:
        call = np.concatenate([time_calls(lambda: sb.call("add", 2, 3), calls // 4, warmup=5)
                               for _ in range(4)])
    warm = measure("warm", (calls, modules))
    print(summary("Sandbox.call add(2,3)", call))
    print(summary(f"restore + 1 line ({label}, C)", warm))
    print(f"  ratio / Sandbox.call (median): {stats_us(warm)[0] / stats_us(call)[0]:.2f}x")
    if compare:
        py = in_python("warm", (calls, modules))
        print(summary(f"restore + 1 line ({label}, Python)", py))
        print(f"  ratio / Sandbox.call (median): {stats_us(py)[0] / stats_us(call)[0]:.2f}x   "
              f"C / Python: {stats_us(warm)[0] / stats_us(py)[0]:.2f}x")


def density(count, modules):
    lx = whpfast.LinuxSandbox(["/usr/bin/python3", "-c", DRIVER, *modules], read=READ)
    assert lx.run(timeout=600).waiting
    snap = lx.snapshot()
    lx.close()
    path = Path(tempfile.mkdtemp()) / "python.snap"
    snap.save(path)
    st = path.stat()
    label = "python3" + (f" +{','.join(modules)}" if modules else "")
    print(f"snapshot file ({label}): {st.st_size / 2**20:.1f} MiB apparent, "
          f"{st.st_blocks * 512 / 2**20:.1f} MiB allocated, image {snap.nonzero_pages * 4096 / 2**20:.1f} MiB")
    loaded = whpfast.LinuxSnapshot.load(path, read=READ)             # a file grants nothing itself
    for name, source in (("from the file (mapped)", loaded), ("from memory (copied)", snap)):
        whpfast.LinuxSandbox.from_snapshot(source).close()         # first-time costs out of the way
        boxes, times = [], []
        before = private_bytes()
        for _ in range(count):
            t0 = time.perf_counter_ns()
            box = whpfast.LinuxSandbox.from_snapshot(source)
            assert box.run(b"print('hello world')\n").stdout == b"hello world\n"
            times.append(time.perf_counter_ns() - t0)
            boxes.append(box)
        private = (private_bytes() - before) / count
        for box in boxes:
            box.close()
        print(summary(f"from_snapshot + 1 line, {name}", np.array(times, dtype=np.int64)))
        print(f"  {count} sandboxes {name}: {private / 2**20:.2f} MiB private each")
    path.unlink()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--sandboxes", type=int, default=50, help="for the density case")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the runs with the Python hot paths (WHPFAST_PURE_PYTHON=1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, arg = json.loads(args.child)
        print(json.dumps(measure(kind, arg).tolist()))
        return 0
    compare = not args.no_compare
    print(f"hypervisor: {whpfast.hypervisor()} (on the development machines: PVM software virtualization)")
    if compare:
        host_cost(10)
    syscall_round_trip(args.calls, compare)
    if not args.skip_cold:
        cold_boot(args.repeats, compare)
    warm_start(args.calls, [], compare)
    warm_start(max(100, args.calls // 10), ["pandas"], False)
    density(args.sandboxes, ["pandas"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
