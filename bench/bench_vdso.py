"""The Linux personality's vDSO, against its baselines in the same run (run: python bench/bench_vdso.py
after pip install .).

1. In a guest at CPL3 (tests/vdso_probe.c): one clock_gettime(CLOCK_MONOTONIC) through the vDSO,
   i.e. (a call making N vDSO calls - the same call making none) / N, against the exit it saves:
   one call round trip of that guest (a guest exit and back, the least a syscall exit costs).
2. On the host, in a C loop: the same image's clock_gettime (mapped after its data area) against
   the host kernel's own vDSO clock_gettime (glibc).

Figures on the development machines come from PVM-based /dev/kvm (software virtualization); quote
the ratios, not the absolute times.
"""

import argparse
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import whpfast
from whpfast.linux import vdso
from whpfast.timing import summary, time_calls

ROOT = Path(__file__).resolve().parent.parent
HOST_LOOP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double ns_per_call(int (*fn)(clockid_t, struct timespec *), long n)
{
    struct timespec ts, a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        fn(CLOCK_MONOTONIC, &ts);
    clock_gettime(CLOCK_MONOTONIC, &b);
    return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n;
}

int main(int argc, char **argv)   /* area.bin offset-of-clock_gettime data-size n reps */
{
    static char area[1 << 16];
    FILE *f = fopen(argv[1], "rb");
    size_t size = fread(area, 1, sizeof area, f);
    long data = atol(argv[3]), n = atol(argv[4]), reps = atol(argv[5]);
    char *p = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memcpy(p, area, size);
    mprotect(p + data, size - data, PROT_READ | PROT_EXEC);
    int (*image)(clockid_t, struct timespec *) = (void *)(p + data + atol(argv[2]));
    for (long r = 0; r < reps; r++)
        printf("%f %f\n", ns_per_call(image, n), ns_per_call(clock_gettime, n));
    return 0;
}
"""


def clock_gettime_offset(name=b"__vdso_clock_gettime"):
    """The symbol's value (its offset: the image is linked at 0) from the vDSO's .dynsym, scanned
    through the section headers (tests/test_linux_vdso.py checks the lookup glibc does)."""
    data = vdso.IMAGE
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 11:                                   # SHT_DYNSYM
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, entsize):
            st_name, = struct.unpack_from("<I", data, at)
            if data[strtab + st_name:data.index(b"\0", strtab + st_name)] == name:
                return struct.unpack_from("<Q", data, at + 8)[0]
    raise LookupError(f"{name.decode()} is not in the vDSO's dynamic symbols")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="timed guest calls per variant")
    parser.add_argument("--n", type=int, default=20000, help="vDSO calls per guest call")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    area = bytearray(vdso.DATA_PAGES * vdso.PAGE) + vdso.IMAGE
    vdso.refresh(area, 0)
    (tmp / "area.bin").write_bytes(area)
    offset = clock_gettime_offset()
    data_size = vdso.DATA_PAGES * vdso.PAGE
    guest = whpfast.build_guest([ROOT / "tests" / "vdso_probe.c"], tmp / "probe.elf", extra_flags=[
        f'-DAREA_PATH="{tmp / "area.bin"}"', f"-DDATA_SIZE={data_size}"])

    print("1. in a guest at CPL3")
    with whpfast.Sandbox(guest, memory_size=16 << 20) as sb:
        empty = time_calls(lambda: sb.call("backwards", offset, 1, 0), args.calls)
        loop = time_calls(lambda: sb.call("backwards", offset, 1, args.n), args.calls)
    per_call = (np.median(loop) - np.median(empty)) / args.n
    print(summary("guest call, 0 vDSO calls", empty))
    print(summary(f"guest call, {args.n} vDSO calls", loop))
    print(f"   one vDSO clock_gettime in the guest: {per_call:.1f} ns; one exit round trip "
          f"(the call with none): {np.median(empty) / 1000:.1f} us, {np.median(empty) / per_call:.0f}x more")

    print("2. on the host, C loop of clock_gettime(CLOCK_MONOTONIC)")
    (tmp / "loop.c").write_text(HOST_LOOP)
    subprocess.run(["cc", "-O2", "-o", tmp / "loop", tmp / "loop.c"], check=True)
    out = subprocess.run([tmp / "loop", tmp / "area.bin", str(offset), str(data_size), "2000000", "15"],
                         check=True, capture_output=True, text=True).stdout
    ours, kernel = np.array([[float(x) for x in line.split()] for line in out.splitlines()]).T
    print(f"   whpfast vDSO {np.median(ours):.1f} ns (p90 {np.percentile(ours, 90):.1f}), host kernel's "
          f"vDSO {np.median(kernel):.1f} ns (p90 {np.percentile(kernel, 90):.1f}): "
          f"{np.median(ours) / np.median(kernel):.2f}x")


if __name__ == "__main__":
    main()
