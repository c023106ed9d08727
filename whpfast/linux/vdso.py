"""The in-guest vDSO of the Linux personality: time without exits.

`IMAGE` is a small position-independent ELF (built from `vdso/vdso.c` and `vdso/vdso.lds` when
the package is built) exporting `__vdso_clock_gettime`, `__vdso_gettimeofday`, `__vdso_time`,
`__vdso_clock_getres` and `__vdso_getcpu` (and the unprefixed weak aliases), version LINUX_2.6,
the names glibc looks up. It computes time from the guest's TSC (`rdtsc` runs natively at CPL3)
and a data area the host writes, so `clock_gettime` costs tens of nanoseconds instead of a
~25 us exit (half of all exits of `python3 -c 'import pandas'` without it).

What the host does (linux-core):
  1. Map `DATA_PAGES` pages of data area, read-only, immediately followed by `IMAGE`, read +
     execute, in the guest (the image reaches its data PC-relative at -DATA_PAGES pages); announce
     the image's address with `AT_SYSINFO_EHDR` in the auxv.
  2. Call `refresh(memory, data_offset, tsc_offset=guest_tsc - host_tsc)` before the first run of
     every vCPU (a new VM, `from_snapshot`) and after every `restore` (the restored data area is
     the snapshot's, which may describe another VM's TSC, and its base grows stale). It pairs the
     host's TSC with its clocks (`host_clocks`) and writes the data area (`write_data`): ~5 us on
     the development machines. It is a host write into guest memory: route it through the writer
     that records host-dirty pages, so the next restore puts the page back. Between refreshes
     the guest's clocks run on their own at the calibrated rate.
  `tsc_offset` is 0 on the PVM /dev/kvm of the development machines: the guest's rdtsc at CPL3 is
  the host's, with no offsetting hardware (tests/test_linux_vdso.py checks it in a VM). On
  hardware KVM a vCPU's TSC starts near 0: learn the offset once per vCPU (the
  KVM_VCPU_TSC_OFFSET vCPU attribute, or KVM_GET_MSRS of IA32_TSC against the host's rdtsc); not
  tried here, where PVM is all there is.

The host reads back nothing but the seqlock counter (any value of which is fine), so a guest
that scribbled on the data area (it cannot: it is mapped read-only) would only spoil its own
clocks. Clocks the vDSO does not serve from the TSC (PROCESS/THREAD_CPUTIME, CLOCK_TAI, unknown
ids) and every clock while the data area is in syscall mode go to the real `syscall`
instruction, which the host serves; so does clock_getres for them.

Invariant TSC (/proc/cpuinfo `constant_tsc` and `nonstop_tsc`) is required for TSC time: a TSC
that changes rate with the CPU frequency or stops in idle states does not measure time. Without
it `calibrate()` says so (`Calibration.invariant` is False) and `refresh` writes the data area in
syscall mode: every clock call is then a correct, slow exit.

The guest's MONOTONIC, MONOTONIC_RAW and BOOTTIME are the host's less per-sandbox offsets
(`clock_offsets` here, LinuxSandbox._clock_offsets, applied by the syscall path too): they start
near zero when the sandbox boots, so they do not show the host's uptime, and a snapshot records
the guest's values, from which every restore (in this process, or of a saved file after a host
reboot or on another host) continues: they never go backwards. REALTIME is the host's wall
clock. Known limits: the host helper (`host_clock.c`) is
built on Linux only: the personality on the Windows backend would need a QueryPerformanceCounter
pairing instead. There is no `getrandom` in the vDSO (newer glibc looks it up; it falls back to
the system call).
"""

import ctypes
import functools
import os
import shlex
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

try:
    from ..abi import PAGE
    from ..errors import GuestBuildError, WhpfastError
except ImportError:  # loaded on its own by setup.py, before the package exists
    PAGE = 1 << 12    # whpfast.abi.PAGE, which this load cannot import (the build does not use it)

    class WhpfastError(Exception):
        pass

    class GuestBuildError(WhpfastError):
        """The C compiler failed to build the vDSO."""

DATA_PAGES = 1                # WHPFAST_VDSO_DATA_PAGES in vdso/vdso_data.h, vdso.lds
VDSO_DIR = Path(__file__).resolve().parent / "vdso"
IMAGE_NAME = "linux-vdso.so.1"
HOST_HELPER_NAME = "host_clock.so"

# Why each flag (the kernel builds its x86 vDSO much the same way):
#   -fPIC -shared              position independent: mapped wherever the guest's loader likes
#   -nostdlib -ffreestanding   no libc, no crt files: nothing but vdso.c
#   -fno-stack-protector       no canary read through %fs: the vDSO must not depend on the
#                              caller's TLS
#   -fcf-protection=none       no endbr64 / .note.gnu.property (Linux enables no user IBT)
#   -fno-asynchronous-unwind-tables  no .eh_frame: it only costs space, nothing unwinds here
#   --hash-style=both          DT_HASH and DT_GNU_HASH: old and new loaders both find symbols
#   -soname=linux-vdso.so.1    the name the kernel's vDSO has (glibc adds it to the link map)
#   -T vdso.lds                one R+X PT_LOAD holding the headers, a PT_DYNAMIC, the data area
#                              before the image, the LINUX_2.6 version node, no writable data
#   --no-undefined             a libgcc helper or libc call would otherwise link "fine"
#   --build-id=none -s         reproducible and small: no build id, no static symbol table
CFLAGS = ("-O2", "-fPIC", "-shared", "-nostdlib", "-ffreestanding", "-fno-stack-protector",
          "-fcf-protection=none", "-fno-asynchronous-unwind-tables", "-Wall", "-Wextra", "-Werror")
LDFLAGS = ("-Wl,--hash-style=both", "-Wl,-soname=linux-vdso.so.1", "-Wl,--no-undefined",
           "-Wl,-z,max-page-size=4096", "-Wl,--build-id=none", "-s")


def build(out_dir, *, cc=None):
    """Compiles the vDSO image (`IMAGE_NAME`) and, on Linux, the host helper (`HOST_HELPER_NAME`)
    into `out_dir` with the system C compiler ($CC, else cc). Called by setup.py; raises
    GuestBuildError with the command and the compiler's output when it fails."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cc = shlex.split(cc or os.environ.get("CC") or "cc")
    commands = [[*cc, *CFLAGS, *LDFLAGS, f"-Wl,-T,{VDSO_DIR / 'vdso.lds'}",
                 "-o", str(out_dir / IMAGE_NAME), str(VDSO_DIR / "vdso.c")]]
    if os.name == "posix":
        commands.append([*cc, "-O2", "-fPIC", "-shared", "-Wall", "-Werror",
                         "-o", str(out_dir / HOST_HELPER_NAME), str(VDSO_DIR / "host_clock.c")])
    for cmd in commands:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise GuestBuildError(f"vDSO build failed (exit status {proc.returncode})\n"
                               f"command: {shlex.join(cmd)}\n{proc.stdout.rstrip()}")
    head = (out_dir / IMAGE_NAME).read_bytes()[:20]
    # e_ident: 64-bit little-endian ELF; e_type 3 (ET_DYN), e_machine 62 (x86-64). A compiler
    # for another target (e.g. mingw, producing a PE DLL) links without complaint.
    if head[:6] != b"\x7fELF\x02\x01" or head[16:20] != b"\x03\x00\x3e\x00":
        raise GuestBuildError(f"the C compiler did not produce an x86-64 ELF shared object: "
                              f"{out_dir / IMAGE_NAME}\ncommand: {shlex.join(commands[0])}")
    return out_dir / IMAGE_NAME


@functools.lru_cache(maxsize=None)
def _load_image():
    path = VDSO_DIR / IMAGE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImportError(f"the vDSO image {path} is missing: whpfast was not built "
                          "(pip install . builds it)") from None
    return data + bytes(-len(data) % PAGE)   # page-aligned size: mapped as whole pages


def __getattr__(name):
    # IMAGE is read on first use, so setup.py can load this module (for build()) before the
    # image exists.
    if name == "IMAGE":
        return _load_image()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# The data area (struct whpfast_vdso_data in vdso/vdso_data.h): seq, mode, tsc_base, mult,
# shift, coarse_res_ns, base_ns[REALTIME, MONOTONIC, MONOTONIC_RAW, BOOTTIME].
_SEQ = struct.Struct("<I")
_BODY = struct.Struct("<IQQII4Q")     # everything after seq
DATA_SIZE = _SEQ.size + _BODY.size   # 64 bytes used of DATA_PAGES * PAGE
MODE_SYSCALL = 0
MODE_TSC = 1
CLOCK_MONOTONIC_COARSE = 6     # Linux's id; the time module has no name for it
SHIFT = 32   # mult = ns per tick * 2^32: ~1e-9 relative rounding at GHz rates, far below calibration
_U64 = 1 << 64


def write_data(buf, offset, *, tsc_hz, tsc_base, monotonic_base_ns, realtime_base_ns,
               raw_base_ns=None, boottime_base_ns=None, coarse_res_ns=None):
    """(Re)writes the data area at `buf[offset:]` (guest memory, or any writable buffer) so that
    at guest TSC `tsc_base` the guest's clocks read the given ns values and then advance at
    `tsc_hz` ticks per second. `tsc_hz` None or 0 writes syscall mode (every clock call exits).
    MONOTONIC_RAW and BOOTTIME default to the host's current offsets from MONOTONIC; the coarse
    clocks' resolution to the host's. Seqlock protected: seq is odd while the body is written
    (x86 stores become visible in program order, so a reader never sees a torn body as valid)."""
    mem = memoryview(buf).cast("B")
    if offset < 0 or offset + DATA_SIZE > len(mem):
        raise ValueError(f"the vDSO data area ({DATA_SIZE} bytes at offset {offset}) does not fit "
                         f"in a buffer of {len(mem)} bytes")
    if tsc_hz:
        if not 1e6 <= tsc_hz <= 1e11:
            raise ValueError(f"tsc_hz={tsc_hz!r} is not a TSC frequency (1 MHz .. 100 GHz)")
        mode, mult = MODE_TSC, round(1e9 * (1 << SHIFT) / tsc_hz)
    else:
        mode, mult = MODE_SYSCALL, 0
    if raw_base_ns is None or boottime_base_ns is None:
        mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if raw_base_ns is None:
            raw_base_ns = monotonic_base_ns + time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW) - mono
        if boottime_base_ns is None:
            boottime_base_ns = monotonic_base_ns + time.clock_gettime_ns(time.CLOCK_BOOTTIME) - mono
    if coarse_res_ns is None:
        coarse_res_ns = round(time.clock_getres(CLOCK_MONOTONIC_COARSE) * 1e9)
    values = {"tsc_base": tsc_base, "monotonic_base_ns": monotonic_base_ns,
              "realtime_base_ns": realtime_base_ns, "raw_base_ns": raw_base_ns,
              "boottime_base_ns": boottime_base_ns}
    for name, value in values.items():
        if not 0 <= value < _U64:
            raise ValueError(f"{name}={value!r} is not an unsigned 64-bit value")
    if not 0 < coarse_res_ns < 1 << 32:
        raise ValueError(f"coarse_res_ns={coarse_res_ns!r} is not a resolution in ns")
    body = _BODY.pack(mode, tsc_base, mult, SHIFT, coarse_res_ns,
                      realtime_base_ns, monotonic_base_ns, raw_base_ns, boottime_base_ns)
    (seq,) = _SEQ.unpack_from(mem, offset)
    writing = seq | 1                         # odd: readers retry
    _SEQ.pack_into(mem, offset, writing)
    mem[offset + _SEQ.size:offset + DATA_SIZE] = body
    _SEQ.pack_into(mem, offset, (writing + 1) & 0xFFFFFFFF)   # even again, a new generation


@dataclass(frozen=True)
class ClockSample:
    """The host's TSC and clocks read together (see host_clock.c)."""
    tsc: int            # TSC in the middle of the clock reads
    gap: int            # ticks the reads took: the pairing's uncertainty
    realtime_ns: int
    monotonic_ns: int
    raw_ns: int
    boottime_ns: int


class _CSample(ctypes.Structure):
    _fields_ = [("tsc", ctypes.c_uint64), ("gap", ctypes.c_uint64),
                ("realtime_ns", ctypes.c_int64), ("monotonic_ns", ctypes.c_int64),
                ("raw_ns", ctypes.c_int64), ("boottime_ns", ctypes.c_int64)]


@functools.lru_cache(maxsize=None)
def _helper():
    path = VDSO_DIR / HOST_HELPER_NAME
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise WhpfastError(f"cannot load the vDSO host helper {path} ({e}): reinstall whpfast "
                           "(pip install . builds it)") from e
    fn = lib.whpfast_clock_sample
    fn.argtypes = (ctypes.POINTER(_CSample), ctypes.c_int)
    fn.restype = None
    return fn


def host_clocks(tries=4):
    """The host's TSC and its REALTIME, MONOTONIC, MONOTONIC_RAW and BOOTTIME clocks, read within
    ~100 ns of each other (the tightest of `tries` pairings)."""
    s = _CSample()
    _helper()(ctypes.byref(s), tries)
    return ClockSample(s.tsc, s.gap, s.realtime_ns, s.monotonic_ns, s.raw_ns, s.boottime_ns)


@dataclass(frozen=True)
class Calibration:
    """What the host needs to fill the data area."""
    tsc_hz: float         # TSC ticks per second of CLOCK_MONOTONIC
    invariant: bool       # constant_tsc and nonstop_tsc: TSC time is usable at all
    window_ns: int        # the measurement's length
    uncertainty: float    # relative, worst case: each pairing is off by at most half its gap


def _cpu_flags(path="/proc/cpuinfo"):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


# The first pairing of the calibration, taken when the package imports this module (not when
# setup.py loads it on its own, before the helper is built). The rate is the TSC's advance
# between it and a pairing taken when the first sandbox needs the rate, which is usually more
# than the window later: calibrate() then sleeps nothing. None where the helper cannot be loaded
# (calibrate() says why).
_first = None


def _first_pairing():
    global _first
    try:
        _first = host_clocks(tries=16)
    except WhpfastError:
        _first = None


@functools.lru_cache(maxsize=None)
def calibrate(window_ns=20_000_000):
    """Measures the host's TSC rate against CLOCK_MONOTONIC over at least `window_ns`, once per
    process: from the pairing taken at import (`_first`) to one taken now, sleeping (not
    spinning) only what is left of the window. The 20 ms slept here were a fifth of a cold
    `python3 -c 'print(1)'` boot of the first sandbox of a process; a host suspended in
    between (BOOTTIME moved away from MONOTONIC, and the TSC may have stopped or reset) makes
    it measure a fresh window instead.

    Why measure rather than ask KVM: KVM_GET_TSC_KHZ needs a vCPU (or the VM-level ioctl of newer
    kernels) and has kHz resolution; a measurement against the very clock the guest's MONOTONIC
    must track gives its effective rate, NTP slew included, and needs nothing but rdtsc. Two
    pairings ~100 ns wide over 20 ms bound the error to a few ppm (`uncertainty`; measured on the
    development machines: within 0.5 ppm of a 200 ms measurement and of the kernel's own
    "2596.144 MHz"), i.e. at worst a few us of drift per second between refreshes. The guest's
    TSC runs at the host's rate: PVM does not scale it, and KVM gives a vCPU the host's tsc_khz
    unless told otherwise (KVM_SET_TSC_KHZ, which whpfast never calls).

    Raises WhpfastError when the host helper is missing (not built: it is built on Linux only)
    or the TSC does not advance."""
    flags = _cpu_flags()
    first = _first
    if first is None:
        first = host_clocks(tries=16)
    left = window_ns - (time.monotonic_ns() - first.monotonic_ns)
    if left > 0:
        time.sleep(left / 1e9)
    last = host_clocks(tries=16)
    if abs((last.boottime_ns - last.monotonic_ns) - (first.boottime_ns - first.monotonic_ns)) > 1_000_000:
        first = host_clocks(tries=16)               # suspended since the import: measure afresh
        time.sleep(window_ns / 1e9)
        last = host_clocks(tries=16)
    ticks = last.tsc - first.tsc
    ns = last.monotonic_ns - first.monotonic_ns
    if ticks <= 0 or ns <= 0:
        raise WhpfastError(f"the TSC did not advance with CLOCK_MONOTONIC ({ticks} ticks in {ns} ns)")
    return Calibration(tsc_hz=ticks * 1e9 / ns,
                       invariant={"constant_tsc", "nonstop_tsc"} <= flags,
                       window_ns=ns, uncertainty=(first.gap + last.gap) / 2 / ticks)


def refresh(buf, offset, *, tsc_offset=0, calibration=None, clock_offsets=(0, 0, 0)):
    """Writes the data area at `buf[offset:]` for a guest whose TSC is the host's plus
    `tsc_offset`: the host's clocks now, paired with the guest's TSC now. Syscall mode when the
    TSC is not invariant. clock_offsets: (MONOTONIC, MONOTONIC_RAW, BOOTTIME) ns subtracted
    from the host's clocks (the guest's start near zero at its boot: LinuxSandbox); REALTIME
    is the host's. Returns the ClockSample used."""
    cal = calibration or calibrate()
    now = host_clocks()
    mono_off, raw_off, boot_off = clock_offsets
    write_data(buf, offset, tsc_hz=cal.tsc_hz if cal.invariant else None,
               tsc_base=(now.tsc + tsc_offset) % _U64,
               monotonic_base_ns=now.monotonic_ns - mono_off, realtime_base_ns=now.realtime_ns,
               raw_base_ns=now.raw_ns - raw_off, boottime_base_ns=now.boottime_ns - boot_off)
    return now


if __package__:
    _first_pairing()
