"""File pages shared, not copied: each figure with sharing on against sharing off, in one run
(python bench/bench_filemap.py [--repeats N] [--density N], after pip install .).

1. Live mappings: cold boot of Debian's /usr/bin/python3 -c 'print(1)' and -c 'import pandas'
   in a fresh LinuxSandbox, read-only file mappings mapped from the host file (mm.MAX_SHARED as
   shipped) against copied (mm.MAX_SHARED = 0), interleaved; and the host memory private to a
   booted python3 parked with pandas imported (Private_Clean + Private_Dirty delta).
2. Snapshot files: a warm PythonSandbox (pandas imported) saved with file pages as references
   (snapfile.MAX_REF_RUNS as shipped) against all pages stored (MAX_REF_RUNS = 0): size apparent
   and allocated, from_snapshot time (first: load + sandbox; again: the file already loaded),
   and density: private memory per sandbox, N made from the file, each having run hello_world.

Figures on the development machines come from PVM-based /dev/kvm (software virtualization);
quote ratios from one run, not absolute times.
"""

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np

import whpfast
from whpfast.linux import mm, snapfile
from whpfast.timing import private_bytes

READ = ["/usr", "/lib", "/lib64", "/etc"]
DRIVER = (Path(__file__).resolve().parent.parent / "tests" / "linux" / "driver.py").read_text()
HELLO = 'print("hello world")'


class knob:
    """Sets module.name to value for a with-block (the "off" side of an A/B)."""

    def __init__(self, module, name, value):
        self.module, self.name, self.value = module, name, value

    def __enter__(self):
        self.old = getattr(self.module, self.name)
        setattr(self.module, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.old)


def ms(ns):
    return np.median(np.asarray(ns, dtype=np.int64)) / 1e6


def live(repeats):
    print("== live mappings: read-only file mmaps mapped from the host file vs copied")
    for code in ("print(1)", "import pandas"):
        times = {"shared": [], "copied": []}
        for _ in range(repeats):
            for side in ("shared", "copied"):
                with knob(mm, "MAX_SHARED", mm.MAX_SHARED if side == "shared" else 0):
                    t0 = time.perf_counter_ns()
                    with whpfast.LinuxSandbox(["/usr/bin/python3", "-c", code], read=READ) as lx:
                        assert lx.run(timeout=600).exit_code == 0
                    times[side].append(time.perf_counter_ns() - t0)
        s, c = ms(times["shared"]), ms(times["copied"])
        print(f"cold {code!r:<18} shared {s:8.1f} ms   copied {c:8.1f} ms   ratio {s / c:5.2f}x   (n={repeats})")
    for side in ("shared", "copied"):
        with knob(mm, "MAX_SHARED", mm.MAX_SHARED if side == "shared" else 0):
            gc.collect()
            before = private_bytes()
            lx = whpfast.LinuxSandbox(["/usr/bin/python3", "-c", DRIVER, "pandas"], read=READ)
            assert lx.run(timeout=600).waiting
            private = private_bytes() - before
            shared = lx.mm.shared
            lx.close()
        print(f"booted python3 + pandas, {side:<6}: {private / 2**20:6.1f} MiB private "
              f"({shared} host file mappings)")


def snapshots(repeats, count):
    print("== snapshot files: file pages as references vs stored")
    tmp = Path(tempfile.mkdtemp())
    with whpfast.PythonSandbox(setup="import pandas as pd") as sb:
        sb.save(tmp / "refs.snap")
        with knob(snapfile, "MAX_REF_RUNS", 0):
            sb.save(tmp / "stored.snap")
    for side in ("refs", "stored"):
        path = tmp / f"{side}.snap"
        st = path.stat()
        first, again = [], []
        for _ in range(repeats):
            gc.collect()                    # the file's loaded image is dropped: a first load
            t0 = time.perf_counter_ns()
            box = whpfast.PythonSandbox.from_snapshot(path)
            first.append(time.perf_counter_ns() - t0)
            t0 = time.perf_counter_ns()
            whpfast.PythonSandbox.from_snapshot(path).close()
            again.append(time.perf_counter_ns() - t0)
            box.close()
            del box
        line = (f"{side:<6}: {st.st_size / 2**20:6.1f} MiB apparent, {st.st_blocks * 512 / 2**20:6.1f} MiB "
                f"allocated; from_snapshot first {ms(first):7.1f} ms, again {ms(again):6.1f} ms")
        if count:
            keep = whpfast.PythonSandbox.from_snapshot(path)        # the file's image stays loaded
            gc.collect()
            before = private_bytes()
            boxes = [whpfast.PythonSandbox.from_snapshot(path) for _ in range(count)]
            for box in boxes:
                assert box.run(HELLO).stdout == "hello world\n"
            per = (private_bytes() - before) / count
            for box in boxes:
                box.close()
            keep.close()
            line += f"; density {per / 2**20:.2f} MiB private each (n={count})"
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--density", type=int, default=50)
    args = parser.parse_args()
    live(args.repeats)
    snapshots(args.repeats, args.density)


if __name__ == "__main__":
    main()
