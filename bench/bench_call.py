"""Call benchmarks, each next to its baseline in the same run (run: python bench/bench_call.py).

1. The whpfast call round trip (Sandbox.call("add", 2, 3): encode, registers through sync regs,
   KVM_RUN, decode) against the raw KVM_RUN round trip at the same privilege level: a CPL3 guest
   that does nothing but `out` and jump back, run through the same backend with no whpfast
   protocol around it. Goal: within 1.5x.
2. compute(n) in the guest against the same C loop (whpfast/guests/compute.h) compiled for the
   host with the same compiler and -O2 and called through ctypes. Goal: within 1.5x.

Figures on the development machines come from PVM-based /dev/kvm (software virtualization); quote
the ratios, not the absolute times.
"""

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import whpfast
from whpfast import abi, backend, elf, machine
from whpfast.timing import stats_us, summary, time_calls

OUT_LOOP = b"\xe7\xe0\xeb\xfc"     # out 0xE0, eax ; jmp back to the out


def raw_vm():
    """A VM with the whpfast long-mode environment whose only code is OUT_LOOP, at CPL3.
    Returns (vcpu, entry, stack top, closer)."""
    impl = backend.impl
    image = elf.GuestImage(path="<raw>", entry=abi.IMAGE_BASE,
                           segments=(elf.Segment(abi.IMAGE_BASE, OUT_LOOP, len(OUT_LOOP), False, True),),
                           exports={}, end=abi.IMAGE_BASE + len(OUT_LOOP), digest="raw")
    layout = machine.make_layout(image, 16 << 20)
    memory = impl.GuestMemory(16 << 20)
    machine.write_environment(memory, layout, image)
    vm = backend.system().create_vm()
    vm.set_memory(0, 0, memory.size, memory.address)
    vcpu = vm.create_vcpu(0)
    vcpu.init_long_mode(**machine.sregs_arguments(layout))

    def close():
        vcpu.close()
        vm.close()
        memory.close()
    return vcpu, image.entry, layout.region("stack").end - 8, close


def host_compute():
    source = Path(whpfast.guests.testkit).with_name("compute.h")
    tmp = Path(tempfile.mkdtemp())
    (tmp / "c.c").write_text(f'#include "{source}"\nuint64_t host_compute(uint64_t n) {{ return wf_compute_loop(n); }}\n')
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", tmp / "c.so", tmp / "c.c"], check=True)
    lib = ctypes.CDLL(str(tmp / "c.so"))
    lib.host_compute.argtypes = [ctypes.c_uint64]
    lib.host_compute.restype = ctypes.c_uint64
    return lib.host_compute


def timed(fn, repeats):
    out = np.empty(repeats, dtype=np.int64)
    for i in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        out[i] = time.perf_counter_ns() - t0
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--n", type=int, default=200_000_000, help="compute() iterations")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"hypervisor: {whpfast.hypervisor()} (on the development machines: PVM software virtualization)")
    if whpfast.backend.NAME == "whp" and sys.platform != "win32":
        print("NOTE: the WHP backend over the KVM-backed WHv* layer of tests/whv: these figures "
              "measure that layer, not Windows.")

    vcpu, entry, stack, close_raw = raw_vm()
    vcpu.enter(entry, stack)
    with whpfast.Sandbox(whpfast.guests.testkit) as sb:
        # Interleave the two measurements in blocks so machine noise hits both alike.
        raw, call = [], []
        for _ in range(10):
            raw.append(time_calls(vcpu.run, args.calls // 10))
            call.append(time_calls(lambda: sb.call("add", 2, 3), args.calls // 10))
        raw, call = np.concatenate(raw), np.concatenate(call)
        close_raw()
        print(summary("raw KVM_RUN (CPL3 out)", raw))
        print(summary("Sandbox.call add(2,3)", call))
        ratio = stats_us(call)[0] / stats_us(raw)[0]
        print(f"  ratio call / raw (median): {ratio:.2f}x   goal <= 1.5x  {'OK' if ratio <= 1.5 else 'MISSED'}")

        host = host_compute()
        n = args.n
        assert host(1000) == sb.call("compute", 1000), "host and guest loops disagree"
        guest_t = timed(lambda: sb.call("compute", n), args.repeats)
        host_t = timed(lambda: host(n), args.repeats)
        g, h = np.median(guest_t) / 1e6, np.median(host_t) / 1e6
        print(f"{'compute(%d) guest' % n:<30} median {g:9.1f} ms")
        print(f"{'compute(%d) host' % n:<30} median {h:9.1f} ms")
        ratio = g / h
        print(f"  ratio guest / host (median): {ratio:.2f}x   goal <= 1.5x  {'OK' if ratio <= 1.5 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
