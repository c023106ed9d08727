"""Where a warm PythonSandbox request's host time goes (python bench/profile_warm.py [-n N]
[--cprofile]; after pip install .).

A request is `sb.run('print("hello world")')`: restore to the warm snapshot, one request, the
answer. This wraps the parts of that path from outside (nothing in the package changes) and
prints, per request, the median and mean wall time of each span, inclusive, nested as they
nest. A warm request's restore and run are one backend call without the GIL (the
`resume_warm` span); a guest run after it (`run_until`, KVM_RUN) and the page copies inside
`_pages.restore` (a restore to another snapshot) release it too; every other span holds it.
Each wrapper costs ~0.2-0.5 us, which the figures include (the unwrapped request's median is
printed first, for comparison).
With --cprofile, cProfile's view of the same requests (its overhead is larger)."""

import argparse
import cProfile
import collections
import pstats
import time

import numpy as np

import whpfast
from whpfast import _pages
from whpfast.linux import process, syscalls
from whpfast.python import sandbox as py_sandbox
from whpfast import testing

HELLO = 'print("hello world")'
# Spans that run (almost) entirely without the GIL in this tree: KVM_RUN, the page copies, the
# restore's ioctls. (Before the warmpath branch only the first two: pass --nogil to say so.)
# Where the backend has restore_warm, a warm restore is one C call that keeps the GIL unless it
# restores 512 pages or more (a hello_world restore: ~150), so it counts as held.
NOGIL = ("run_until (KVM_RUN, no GIL)", "_pages.restore (no GIL)", "get_dirty_log",
         "clear_dirty_log", "load_state", "resume_warm (C: restore + KVM_RUN, no GIL)")


class Spans:
    def __init__(self):
        self.ns = collections.defaultdict(list)
        self.order = []
        self.depth = {}
        self._stack = []

    def wrap(self, name, fn):
        spans = self

        def timed(*args, **kwargs):
            if name not in spans.depth:
                spans.depth[name] = len(spans._stack)
                spans.order.append(name)
            spans._stack.append(name)
            t0 = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                spans.ns[name].append(time.perf_counter_ns() - t0)
                spans._stack.pop()
        return timed


class Proxy:
    """Stands in for a cdef object (whose methods cannot be replaced) and times some methods."""

    def __init__(self, target, spans, names):
        self._target = target
        for n in names:
            setattr(self, n, spans.wrap(n, getattr(target, n)))

    def __getattr__(self, name):
        return getattr(self._target, name)


def install(sb, spans):
    lx = sb.linux
    w = spans.wrap
    undo = []

    def patch(obj, name, label=None):
        real = getattr(obj, name)
        setattr(obj, name, w(label or name, real))
        undo.append(lambda: setattr(obj, name, real))

    patch(sb, "_call", "request (PythonSandbox._call)")
    patch(lx, "restore", "LinuxSandbox.restore")
    patch(lx, "_restore", "_restore")
    patch(testing.warm(lx), "restore", "WarmMemory.restore")
    patch(_pages, "plan_hot", "_pages.plan_hot")
    patch(_pages, "absorb", "_pages.absorb")
    patch(_pages, "restore", "_pages.restore (no GIL)")
    patch(process.impl, "memory_invalidate", "memory_invalidate")
    patch(lx.mm, "reset", "mm.reset")
    patch(lx.fs, "reset", "fs.reset")
    patch(lx, "_refresh_vdso", "_refresh_vdso")
    patch(lx, "_resume_plan", "_resume_plan")
    patch(lx, "_resume", "_resume")
    patch(testing.warm(lx), "resume", "WarmMemory.resume")
    patch(testing.warm(lx), "mark", "WarmMemory.mark")
    patch(testing.warm(lx), "_warm_stats", "WarmMemory._warm_stats")
    patch(lx, "_vvar", "_vvar")
    if getattr(process, "_linux", None) is not None and hasattr(process._linux, "refresh_vdso"):
        patch(process._linux, "refresh_vdso", "_linux.refresh_vdso")
        patch(process._linux, "vdso_data", "_linux.vdso_data")
    patch(process.cpu, "check", "cpu.check")
    patch(sb, "_request", "_request")
    patch(py_sandbox.json, "dumps", "json.dumps")
    patch(lx, "run", "LinuxSandbox.run")
    patch(process, "run_until", "run_until (KVM_RUN, no GIL)")
    patch(syscalls, "dispatch", "dispatch")
    patch(py_sandbox, "_read_answer", "_read_answer")
    patch(py_sandbox, "_decode_json", "_decode_json (json)")
    warm = testing.warm(lx)
    real_vm, real_vcpu = warm.vm, warm.vcpu
    warm.vm = Proxy(real_vm, spans, ["get_dirty_log", "clear_dirty_log"])
    warm.vcpu = Proxy(real_vcpu, spans, ["load_state"])
    if hasattr(real_vcpu, "restore_warm"):
        warm.vcpu.restore_warm = spans.wrap("restore_warm (C, GIL held)",
                                            real_vcpu.restore_warm)
    if hasattr(real_vcpu, "resume_warm"):
        warm.vcpu.resume_warm = spans.wrap("resume_warm (C: restore + KVM_RUN, no GIL)",
                                           real_vcpu.resume_warm)
    undo.append(lambda: setattr(warm, "vm", real_vm))
    undo.append(lambda: setattr(warm, "vcpu", real_vcpu))
    return lambda: [u() for u in reversed(undo)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="requests per pass")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--nogil", default=";".join(NOGIL),
                        help="the spans that run without the GIL (separated by ;, default: this "
                             "tree's)")
    args = parser.parse_args()
    print(f"hypervisor: {whpfast.hypervisor()} (development machines: PVM /dev/kvm)")
    with whpfast.PythonSandbox(warmup=HELLO) as sb:
        for _ in range(200):                     # settle the hot set
            assert sb.run(HELLO).stdout == "hello world\n"
        plain = np.empty(args.n, dtype=np.int64)
        for i in range(args.n):
            t0 = time.perf_counter_ns()
            sb.run(HELLO)
            plain[i] = time.perf_counter_ns() - t0
        spans = Spans()
        uninstall = install(sb, spans)
        try:
            for _ in range(args.n):
                sb.run(HELLO)
        finally:
            uninstall()
        print(f"unwrapped request: median {np.median(plain) / 1e3:.1f} us, "
              f"p99 {np.percentile(plain, 99) / 1e3:.1f} us ({args.n} requests)")
        print(f"{'span (inclusive, per request)':<44} {'calls':>6} {'median us':>10} {'us/request':>10}")
        for name in spans.order:
            a = np.array(spans.ns[name], dtype=np.int64)
            per_request = a.sum() / args.n
            calls = len(a) / args.n
            print(f"{'  ' * spans.depth[name] + name:<44} {calls:6.2f} {np.median(a) / 1e3:10.2f} "
                  f"{per_request / 1e3:10.2f}")
        total = np.array(spans.ns["request (PythonSandbox._call)"], dtype=np.int64)
        released = sum(np.array(spans.ns[n], dtype=np.int64).sum() for n in args.nogil.split(";")
                       if n in spans.ns) / args.n
        held = total.mean() - released
        print(f"GIL held per request (mean, wrapped): {held / 1e3:.1f} us of {total.mean() / 1e3:.1f} us "
              f"({held / total.mean():.0%}); released in: {args.nogil}")
        print("last_restore:", sb.linux.last_restore)
        if args.cprofile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.n):
                sb.run(HELLO)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
