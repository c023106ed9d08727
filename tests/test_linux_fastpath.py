"""The Linux personality's C hot paths (whpfast/_linux.pyx) against their Python reference (the
py_* methods of AddressSpace, syscalls.py_dispatch, process._py_serve): same results, same typed
errors, for hostile pointers and lengths, and for a real program handing the host bad buffers.
"""

import errno
import os
import random
import subprocess
import sys

import pytest

import whpfast
from conftest import build_c
from whpfast.linux import mm as mm_module
from whpfast.linux import process, syscalls
from whpfast.linux.errno import LinuxError
from whpfast.linux.mm import PAGE, USER_MIN, AddressSpace
from whpfast import testing

MB = 1 << 20
pytestmark = [pytest.mark.hypervisor,
              pytest.mark.skipif(sys.platform != "linux", reason="Linux host only: the vDSO clock helper")]

EXPECTED = {      # call -> result, as Linux gives it (the program prints -errno on failure)
    "read ok": 16, "read null": -errno.EFAULT, "read kernel": -errno.EFAULT,
    "read unmapped": -errno.EFAULT, "read guard": -errno.EFAULT, "read readonly": -errno.EFAULT,
    "read into guard": -errno.EFAULT, "read wraps": -errno.EFAULT, "read huge": -errno.EFAULT,
    "write readonly": 5, "write guard": -errno.EFAULT, "write wraps": -errno.EFAULT,
    "write kernel": -errno.EFAULT, "fstat ok": 0, "fstat readonly": -errno.EFAULT,
    "fstat into guard": -errno.EFAULT, "clock_gettime readonly": -errno.EFAULT,
    "getcwd readonly": -errno.EFAULT, "getrandom guard": -errno.EFAULT,
    "uname unmapped": -errno.EFAULT, "stat ok": 0, "stat path null": -errno.EFAULT,
    "stat path kernel": -errno.EFAULT, "stat path into guard": -errno.EFAULT,
    "stat path too long": -errno.ENAMETOOLONG, "open path wraps": -errno.EFAULT,
    "readv array in guard": -errno.EFAULT, "readv entry in guard": -errno.EFAULT,
    "writev entry in guard": -errno.EFAULT, "readv entry readonly": -errno.EFAULT,
    "readv length top bit": -errno.EINVAL, "readv too many": -errno.EINVAL,
    "readv array wraps": -errno.EFAULT, "sigaction act guard": -errno.EFAULT,
    "sigaction oact readonly": -errno.EFAULT, "sigprocmask set unmapped": -errno.EFAULT,
    "close": 0, "close again": -errno.EBADF,
}

RUN_EFAULT = """
import sys, whpfast
with whpfast.LinuxSandbox([sys.argv[1], sys.argv[2]], read=[sys.argv[2]], memory_size=64 << 20) as lx:
    r = lx.run(timeout=20)
    assert r.exit_code == 0, r
    sys.stdout.buffer.write(r.stdout)
"""


@pytest.fixture(scope="module")
def efault(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("efault") / "efault", "efault.c", "-static")


def _results(stdout):
    lines = [line.rsplit(" ", 1) for line in stdout.decode().splitlines()]
    return {name: int(value) for name, value in lines}


def test_bad_buffers_are_efault_and_the_c_and_python_paths_agree(efault):
    """Every bad buffer is EFAULT (bad lengths EINVAL, a path without NUL ENAMETOOLONG), in this
    process (C paths) and in one with WHPFAST_PURE_PYTHON=1 (the Python ones), line for line."""
    assert not mm_module.PURE_PYTHON and AddressSpace.check is not AddressSpace.py_check
    readable = os.path.realpath(sys.executable)
    fast = subprocess.run([sys.executable, "-c", RUN_EFAULT, efault, readable], capture_output=True,
                          env=dict(os.environ), cwd="/", timeout=120)
    pure = subprocess.run([sys.executable, "-c", RUN_EFAULT, efault, readable], capture_output=True,
                          env=dict(os.environ, WHPFAST_PURE_PYTHON="1"), cwd="/", timeout=120)
    assert fast.returncode == 0 and pure.returncode == 0, (fast.stderr, pure.stderr)
    got = _results(fast.stdout)
    assert got == _results(pure.stdout)
    assert got["open"] == 0 and got["read top"] == 1
    for name, value in EXPECTED.items():
        assert got[name] == value, (name, got[name], value)


def _outcome(fn, *args):
    try:
        result = fn(*args)
    except LinuxError as e:
        return ("LinuxError", e.errno)
    if isinstance(result, memoryview):
        result = bytes(result)
    return ("ok", result)


@pytest.fixture(scope="module")
def space(efault):
    """A parked program's address space with a patchwork of mappings: writable, a PROT_NONE
    guard, read-only, executable, gaps."""
    lx = whpfast.LinuxSandbox([efault, "/nonexistent"], memory_size=64 * MB)
    mm = lx.mm
    base = mm.map(0, 16 * PAGE, 3)
    mm.protect(base + 4 * PAGE, PAGE, 0)                 # guard
    mm.protect(base + 8 * PAGE, 2 * PAGE, 1)             # read-only
    mm.protect(base + 10 * PAGE, PAGE, 4)                # execute-only
    mm.unmap(base + 12 * PAGE, PAGE)                     # a hole
    data = bytes(random.Random(7).randrange(1, 256) for _ in range(16 * PAGE))
    mm.store(base, data[:4 * PAGE])
    mm.store(base + 5 * PAGE, data[5 * PAGE:8 * PAGE])
    mm.store(base + 13 * PAGE, data[13 * PAGE:])
    mm.store(base + 2 * PAGE - 1, b"\0")                 # a NUL right before a page boundary
    mm.store(base + 7 * PAGE + 100, b"\0")
    yield lx, base
    lx.close()


def _probes(mm, base, rng):
    edges = [0, 1, USER_MIN - 1, USER_MIN, mm.top - 1, mm.top, mm.top + 1, (1 << 64) - 1, 1 << 64,
             -1, (1 << 63)]
    for v in mm.vmas:
        edges += [v.start - 1, v.start, v.start + 1, v.end - 1, v.end, v.end + 1]
    edges += [base + k * PAGE + d for k in range(17) for d in (-9, -1, 0, 1, 100)]
    lengths = [0, 1, 8, 100, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE, 16 * PAGE, 1 << 32, (1 << 64) - 1,
               (1 << 64) - USER_MIN, 1 << 64, -1, -PAGE]
    for _ in range(3000):
        yield rng.choice(edges), rng.choice(lengths)


def test_checked_copies_match_the_python_reference_on_hostile_pointers(space):
    """check/read/view/read_cstring/read_u64s in C give exactly what the Python reference gives:
    the same bytes, or the same LinuxError, for edges of every mapping, kernel-area and wrapped
    addresses, zero, negative, huge and 2**64-crossing lengths."""
    lx, base = space
    mm, rng = lx.mm, random.Random(1)
    seen = set()
    for addr, n in _probes(mm, base, rng):
        for write in (False, True):
            a = _outcome(AddressSpace.check, mm, addr, n, write)
            assert a == _outcome(AddressSpace.py_check, mm, addr, n, write), (hex(addr), n, write)
            seen.add(a[0] + str(a[1]))
        if n <= 64 * PAGE:
            assert _outcome(AddressSpace.read, mm, addr, n) == _outcome(AddressSpace.py_read, mm, addr, n)
            assert _outcome(AddressSpace.view, mm, addr, n) == _outcome(AddressSpace.py_view, mm, addr, n)
            assert _outcome(AddressSpace.read_u64s, mm, addr, n // 8) == \
                _outcome(AddressSpace.py_read_u64s, mm, addr, n // 8), (hex(addr), n)
        for limit in (1, 5, 4096, 3 * PAGE):
            assert _outcome(AddressSpace.read_cstring, mm, addr, limit) == \
                _outcome(AddressSpace.py_read_cstring, mm, addr, limit), (hex(addr), limit)
    assert {"okNone", "LinuxError14"} <= seen, seen                    # both outcomes were probed
    assert mm.read_cstring(base + PAGE) == mm.py_read_cstring(base + PAGE) and \
        len(mm.read_cstring(base + PAGE)) == PAGE - 1                     # the NUL at the page's end
    with pytest.raises(LinuxError) as e:
        mm.read_cstring(base + 5 * PAGE, 10)
    assert e.value.errno == errno.ENAMETOOLONG


def test_checked_writes_match_and_mark_pages_for_the_restore(space):
    """write in C refuses what the Python reference refuses (same errno, nothing written), writes
    what it writes, and marks the pages it wrote in the warm-start core's host-dirty bitmap (a
    restore then copies them back)."""
    lx, base = space
    mm, rng = lx.mm, random.Random(2)
    for addr, n in _probes(mm, base, rng):
        if not 0 <= n <= 4 * PAGE:
            continue
        data = bytes(rng.randrange(256) for _ in range(n))
        before = bytes(mm.mem[base:base + 16 * PAGE])
        a = _outcome(AddressSpace.py_write, mm, addr, data)
        after_py = bytes(mm.mem[base:base + 16 * PAGE])
        mm.mem[base:base + 16 * PAGE] = before
        b = _outcome(AddressSpace.write, mm, addr, data)
        assert a == b, (hex(addr), n)
        assert bytes(mm.mem[base:base + 16 * PAGE]) == after_py, (hex(addr), n)
        if b[0] == "LinuxError":
            assert after_py == before
    snap = lx.snapshot()
    host = testing.warm(lx)._host
    assert not host.any()
    mm.write(base + 6 * PAGE - 3, b"abcdef")                  # two pages
    for page in (base // PAGE + 5, base // PAGE + 6):
        assert int(host[page >> 6]) >> (page & 63) & 1, page
    lx.restore(snap)
    assert bytes(mm.mem[base + 6 * PAGE - 3:base + 6 * PAGE + 3]) != b"abcdef"
    assert bytes(mm.mem[base + 6 * PAGE - 3:base + 6 * PAGE + 3]) == \
        bytes(snap._image_view[base + 6 * PAGE - 3:base + 6 * PAGE + 3])
    with pytest.raises(LinuxError) as e:
        mm.write(base + 8 * PAGE, memoryview(b"xy"))          # read-only: also for a memoryview
    assert e.value.errno == errno.EFAULT


def test_dispatch_and_loop_are_the_c_ones_and_answer_like_the_python_ones(space):
    """The exit loop and dispatcher in use are the C ones; the dispatcher answers known, unknown
    (ENOSYS, counted) and failing calls as the Python reference does."""
    lx, base = space
    assert process._serve is not process._py_serve
    assert type(syscalls.dispatch).__module__ == "whpfast._linux"
    calls = [(syscalls.NUMBERS["getppid"], (0,) * 6), (syscalls.NUMBERS["getuid"], (0,) * 6),
             (syscalls.NUMBERS["close"], (999, 0, 0, 0, 0, 0)), (syscalls.NUMBERS["lseek"], (0, 0, 0, 0, 0, 0)),
             (syscalls.NUMBERS["uname"], (base + 4 * PAGE, 0, 0, 0, 0, 0)),
             (syscalls.NUMBERS["uname"], (base, 0, 0, 0, 0, 0)), (1000, (0,) * 6), (1 << 40, (0,) * 6)]
    task = lx.task
    for nr, args in calls:
        before = dict(lx.unsupported_syscalls)
        fast = syscalls.dispatch(task, nr, args)
        counted = dict(lx.unsupported_syscalls)
        lx.unsupported_syscalls.clear()
        lx.unsupported_syscalls.update(before)
        assert fast == syscalls.py_dispatch(task, nr, args), nr
        assert counted == lx.unsupported_syscalls, nr
    assert lx.unsupported_syscalls.get("syscall_1000") == 1
    with pytest.raises(ValueError, match="six arguments"):
        syscalls.dispatch(task, syscalls.NUMBERS["getppid"], (1, 2))       # a typed error, not a crash
