"""Linux personality benchmarks, each next to its baseline in the same run
(run: python bench/bench_linux.py after pip install .).

1. A system call round trip (getppid: `syscall` -> user stub -> `out` exit -> Python dispatch ->
   back through sync regs), timed inside the guest with the vDSO clock, against a bare CPL3 `out`
   exit through the same backend (bench_call.raw_vm), timed from the host.
2. Cold boot of Debian's /usr/bin/python3 -c 'print(1)' / 'import numpy' / 'import pandas' in a
   fresh LinuxSandbox (construct + run to exit) against the same command run natively.
3. Warm start: restore a python3 parked in read(0) + answer one line of stdin, against a bare
   Sandbox.call("add", 2, 3) of the SDK personality.

Figures on the development machines come from PVM-based /dev/kvm (software virtualization: an
exit costs ~25 us, a first touch of a page ~10-20 us); quote ratios, not absolute times.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import whpfast
from whpfast.timing import stats_us, summary, time_calls

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


def syscall_round_trip(calls):
    tmp = Path(tempfile.mkdtemp())
    (tmp / "loop.c").write_text(SYSCALL_LOOP)
    subprocess.run(["gcc", "-O2", "-static", "-o", tmp / "loop", tmp / "loop.c"], check=True)
    with whpfast.LinuxSandbox([str(tmp / "loop"), str(calls)], memory_size=64 << 20) as lx:
        out = lx.run(timeout=600)
    guest = np.frombuffer(out.stdout, dtype=np.int64)[calls // 10:]     # drop the warm-up tenth
    vcpu, entry, stack, close = raw_vm()
    vcpu.enter(entry, stack)
    raw = time_calls(vcpu.run, len(guest))
    close()
    print(summary("bare CPL3 exit (KVM_RUN)", raw))
    print(summary("getppid round trip", guest))
    print(f"  ratio syscall / bare exit (median): {stats_us(guest)[0] / stats_us(raw)[0]:.2f}x")


def cold_boot(repeats):
    for code in ("print(1)", "import numpy", "import pandas"):
        argv = ["/usr/bin/python3", "-c", code]
        native, guest, exits = [], [], 0
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            native.append(time.perf_counter_ns() - t0)
            t0 = time.perf_counter_ns()
            with whpfast.LinuxSandbox(argv, read=READ) as lx:
                r = lx.run(timeout=600)
                exits = lx.syscall_count
            guest.append(time.perf_counter_ns() - t0)
            assert r.exit_code == 0, r
        g, n = np.median(guest) / 1e6, np.median(native) / 1e6
        print(f"{'cold ' + repr(code):<30} median {g:9.1f} ms   native {n:7.1f} ms   "
              f"ratio {g / n:5.2f}x   ({exits} system calls)")


def warm_start(calls, modules):
    lx = whpfast.LinuxSandbox(["/usr/bin/python3", "-c", DRIVER, *modules], read=READ)
    assert lx.run(timeout=600).waiting
    snap = lx.snapshot()
    lx.restore(snap)
    lx.run(b"print('warm')\n")                 # first restore after the snapshot: not timed

    def request():
        lx.restore(snap)
        assert lx.run(b"print('hello world')\n").stdout == b"hello world\n"

    with whpfast.Sandbox(whpfast.guests.testkit) as sb:
        warm, call = [], []
        for _ in range(10):
            warm.append(time_calls(request, calls // 10, warmup=5))
            call.append(time_calls(lambda: sb.call("add", 2, 3), calls // 10, warmup=5))
    warm, call = np.concatenate(warm), np.concatenate(call)
    label = "python3" + (f" +{','.join(modules)}" if modules else "")
    print(summary("Sandbox.call add(2,3)", call))
    print(summary(f"restore + 1 line ({label})", warm))
    print(f"  ratio / Sandbox.call (median): {stats_us(warm)[0] / stats_us(call)[0]:.2f}x   "
          f"last restore: {lx.last_restore}")
    lx.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-cold", action="store_true")
    args = parser.parse_args(argv)
    print(f"hypervisor: {whpfast.hypervisor()} (on the development machines: PVM software virtualization)")
    syscall_round_trip(args.calls)
    if not args.skip_cold:
        cold_boot(args.repeats)
    warm_start(args.calls, [])
    warm_start(max(100, args.calls // 10), ["pandas"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
