"""Where a LinuxSandbox's time goes (run: python bench/profile_linux.py after pip install .).

For a cold `python3 -c CODE` boot (and the warm request path: restore + one line answered) it
prints, in one run:
- wall time, split into time inside the hypervisor (KVM_RUN: guest code, its page faults, the
  exit itself) and host time serving system calls (dispatch);
- system calls by name: count, host time (total and per call);
- host page faults during the run (getrusage minflt): guest memory faulted in on the host,
  by the guest's first touch of a page or by the host's own writes and populates (the guest's
  shadow-paging faults themselves are not visible from here: KVM's debugfs counters are not
  readable on these hosts);
- with --cprofile, the host Python functions that cost most (cProfile, cumulative time).

It wraps the exit loop's two calls (the run and the dispatch) from outside; nothing in the
package changes. The wrapping costs ~1 us per exit, which the per-call figures include.
"""

import argparse
import collections
import cProfile
import pstats
import resource
import sys
import time
from pathlib import Path

import whpfast
from whpfast.linux import process, syscalls
from whpfast.linux.syscalls import NAMES

READ = ["/usr", "/lib", "/lib64", "/etc"]
DRIVER = (Path(__file__).resolve().parent.parent / "tests" / "linux" / "driver.py").read_text()


class Meter:
    """Times every run and every dispatch of the exit loop while installed."""

    def __init__(self):
        self.run_ns = 0
        self.runs = 0
        self.by_nr = collections.defaultdict(lambda: [0, 0])     # nr -> [count, ns]
        self.fast = None

    def install(self):
        real_run, real_dispatch = process.run_until, syscalls.dispatch

        def run_until(vcpu, deadline):
            t0 = time.perf_counter_ns()
            try:
                return real_run(vcpu, deadline)
            finally:
                self.run_ns += time.perf_counter_ns() - t0
                self.runs += 1

        def dispatch(p, nr, args):
            t0 = time.perf_counter_ns()
            try:
                return real_dispatch(p, nr, args)
            finally:
                entry = self.by_nr[nr]
                entry[0] += 1
                entry[1] += time.perf_counter_ns() - t0

        process.run_until, syscalls.dispatch = run_until, dispatch

        def uninstall():
            process.run_until, syscalls.dispatch = real_run, real_dispatch
        return uninstall


def minflt():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def report(title, wall_ns, meter, counters, syscall_count, setup_ns=None):
    host = sum(ns for _, ns in meter.by_nr.values())
    print(f"\n== {title}: wall {wall_ns / 1e6:.3f} ms, {syscall_count} system calls "
          f"({meter.runs} vCPU runs)")
    print(f"   in the hypervisor (KVM_RUN) {meter.run_ns / 1e6:8.3f} ms  "
          f"({meter.run_ns / max(meter.runs, 1) / 1e3:.1f} us per run)")
    print(f"   host, dispatching calls      {host / 1e6:8.3f} ms")
    if setup_ns is None:
        print(f"   rest (setup, loader, loop)   {(wall_ns - meter.run_ns - host) / 1e6:8.3f} ms")
    else:
        print(f"   setup (constructor: VM, memory, page tables, file system, ELF load, vDSO)"
              f" {setup_ns / 1e6:8.3f} ms")
        print(f"   rest (exit loop, close)      {(wall_ns - meter.run_ns - host - setup_ns) / 1e6:8.3f} ms")
    if counters is not None:
        print(f"   host page faults (minflt)    {counters:8d}")
    rows = sorted(meter.by_nr.items(), key=lambda kv: -kv[1][1])
    print(f"   {'system call':<18} {'count':>7} {'host ms':>9} {'us/call':>8}")
    for nr, (count, ns) in rows[:25]:
        print(f"   {NAMES.get(nr, str(nr)):<18} {count:7d} {ns / 1e6:9.3f} {ns / count / 1e3:8.1f}")


def cold(code, profile):
    meter = Meter()
    uninstall = meter.install()
    prof = cProfile.Profile() if profile else None
    try:
        t0, f0 = time.perf_counter_ns(), minflt()
        if prof:
            prof.enable()
        lx = whpfast.LinuxSandbox(["/usr/bin/python3", "-c", code], read=READ)
        setup = time.perf_counter_ns() - t0
        r = lx.run(timeout=600)
        lx.close()
        counters = minflt() - f0
        if prof:
            prof.disable()
        wall = time.perf_counter_ns() - t0
        assert r.exit_code == 0, r
        report(f"cold python3 -c {code!r} (construct, run, close)", wall, meter, counters,
               lx.syscall_count, setup)
    finally:
        uninstall()
    if prof:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def warm(requests, modules, profile):
    lx = whpfast.LinuxSandbox(["/usr/bin/python3", "-c", DRIVER, *modules], read=READ)
    assert lx.run(timeout=600).waiting
    snap = lx.snapshot()
    lx.restore(snap)
    lx.run(b"print('warm')\n")
    meter = Meter()
    uninstall = meter.install()
    prof = cProfile.Profile() if profile else None
    restore_ns = 0
    try:
        if prof:
            prof.enable()
        t0 = time.perf_counter_ns()
        calls0 = lx.syscall_count
        for _ in range(requests):
            t1 = time.perf_counter_ns()
            lx.restore(snap)
            restore_ns += time.perf_counter_ns() - t1
            assert lx.run(b"print('hello world')\n").stdout == b"hello world\n"
        wall = time.perf_counter_ns() - t0
        if prof:
            prof.disable()
    finally:
        uninstall()
    label = "python3" + (f" +{','.join(modules)}" if modules else "")
    report(f"warm restore + 1 line ({label}), {requests} requests, per request", wall // requests,
           _per(meter, requests), None, (lx.syscall_count - calls0) // requests)
    print(f"   of which restore() {restore_ns / requests / 1e3:.1f} us; last: {lx.last_restore}")
    lx.close()
    if prof:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def _per(meter, n):
    out = Meter()
    out.run_ns, out.runs = meter.run_ns // n, meter.runs // n
    for nr, (count, ns) in meter.by_nr.items():
        out.by_nr[nr] = [max(count // n, 1), ns // n]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", action="append",
                        help="python3 -c CODE to boot cold (repeatable; default print(1), import pandas)")
    parser.add_argument("--requests", type=int, default=200, help="warm requests (0: skip)")
    parser.add_argument("--cprofile", action="store_true", help="also print cProfile's top functions")
    args = parser.parse_args(argv)
    print(f"whpfast {whpfast.__version__} on {whpfast.hypervisor()}")
    # The vDSO's TSC calibration is once per process and overlaps the import (vdso.calibrate):
    # what remains of it is a first boot's, not every boot's.
    for code in args.code or ["print(1)", "import pandas"]:
        cold(code, args.cprofile)
    if args.requests:
        warm(args.requests, [], args.cprofile)


if __name__ == "__main__":
    main()
