"""Cold boot of Linux programs: what the cheaper construction and per-call paths must keep right.

- the vDSO's TSC calibration is measured once per process (it is per host, not per sandbox) and
  started at import: sandboxes made one after the other all read the host's clocks, and keep
  reading them correctly long after their start;
- the page tables written at construction do not grow with memory_size;
- mm.find_free (its walk in C) places every mapping exactly where the Python walk would;
- reads land straight in guest memory, programs load straight from their files, directory
  listings are shared across sandboxes while unchanged."""

import random
import subprocess
import sys
import time

import pytest

import whpfast
from conftest import build_c
from whpfast.linux import vdso
from whpfast.linux.fs import inside_path, read_mapping
from whpfast import testing

MB = 1 << 20
pytestmark = [pytest.mark.hypervisor,
              pytest.mark.skipif(sys.platform != "linux", reason="Linux host only: the vDSO clock helper")]

CLOCKS_C = r"""
#include <stdio.h>
#include <time.h>
static long long ns(clockid_t c) { struct timespec t; clock_gettime(c, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }
int main(void) {
    char line[8];
    for (;;) {
        printf("%lld %lld\n", ns(CLOCK_MONOTONIC), ns(CLOCK_REALTIME));
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 0;
    }
}
"""


@pytest.fixture(scope="module")
def clocks_program(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("coldboot") / "clocks", CLOCKS_C, "-static")


def _host():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC), time.time_ns()


def _guest(result):
    mono, real = map(int, result.stdout.split())
    return mono, real


TOLERANCE_NS = 200_000      # pairing gap (~100 ns) + rate error (< 1e-4, test_linux_vdso) over ~1 s


def test_sandboxes_share_one_calibration_and_read_the_hosts_clocks(clocks_program):
    """Two sandboxes started one after the other, each reading CLOCK_MONOTONIC and CLOCK_REALTIME
    through the vDSO at its start and again 0.3 s later: every reading lies between the host's
    readings taken before and after it (REALTIME as it is, MONOTONIC less the sandbox's offset:
    the guest's starts near zero at its boot), so the rate (measured once, from the import on)
    keeps them there."""
    cal = vdso.calibrate()
    boxes, readings = [], []
    try:
        for _ in range(2):
            before = _host()
            lx = whpfast.LinuxSandbox([clocks_program], memory_size=64 * MB)
            boxes.append(lx)
            r = lx.run(timeout=10)
            assert r.waiting, r
            readings.append((before, _guest(r), _host(), lx))
        time.sleep(0.3)
        for lx in boxes:
            before = _host()
            r = lx.run(b"\n", timeout=10)
            readings.append((before, _guest(r), _host(), lx))
        calls = [lx.syscall_count for lx in boxes]
    finally:
        for lx in boxes:
            lx.close()
    assert vdso.calibrate() is cal, "measured once per process, not per sandbox"
    for before, guest, after, lx in readings:
        offsets = (lx._clock_offsets[0], 0)
        for clock in (0, 1):
            assert before[clock] - TOLERANCE_NS <= guest[clock] + offsets[clock] <= after[clock] + TOLERANCE_NS, \
                (clock, before, guest, after, offsets)
    # each sandbox's readings go forward, by the 0.3 s slept, from near zero
    for first, second in ((readings[0], readings[2]), (readings[1], readings[3])):
        assert 0 <= first[1][0] < 5e9 and first[1][0] < second[1][0] - 250_000_000
    assert all(c < 40 for c in calls), f"clock reads made system calls: {calls}"


HELLO_C = r"""
#include <stdio.h>
int main(void) { puts("hello"); return 0; }
"""


@pytest.fixture(scope="module")
def hello(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("coldboot-hello") / "hello", HELLO_C, "-static")


def _host_written_pages(lx, start, end):
    """Pages of [start, end) the host wrote into guest memory since construction (the warm-start
    core's host-dirty bitmap)."""
    host = testing.warm(lx)._host
    return sum(bin(int(host[p >> 6]) >> (p & 63) & 1).count("1") for p in range(start // 4096, end // 4096))


def test_construction_writes_page_tables_independent_of_memory_size(hello):
    """The page tables a new sandbox writes are the few non-zero pages (the kernel area's and
    the program's entries and the upper levels), not the whole leaf level: a 4 GiB sandbox
    writes as many leaf pages as a 64 MiB one. The program runs in both (the tables are right)."""
    written = {}
    for size in (64 * MB, 4096 * MB):
        with whpfast.LinuxSandbox([hello], memory_size=size) as lx:
            pt_base = lx.mm.pt_base
            written[size] = (_host_written_pages(lx, pt_base, size),
                             (size - pt_base) // 4096)
            assert lx.run(timeout=10).stdout == b"hello\n"
    (small, small_total), (large, large_total) = written[64 * MB], written[4096 * MB]
    assert large_total > 2000 and small < 16 < small_total
    # the 4 GiB tables' upper levels take 4 more pages of PD; the leaves written stay the same
    assert large <= small + 8, written


def _reference_find_free(mm, length, hint=0):
    """AddressSpace.find_free as it was: a Python walk over every mapping from the top."""
    from whpfast.linux.errno import LinuxError
    from whpfast.linux.mm import USER_MIN
    if hint and hint % 4096 == 0 and USER_MIN <= hint and hint + length <= mm.mmap_top \
            and not mm.mapped(hint, hint + length):
        return hint
    ceiling = mm.mmap_top
    for v in reversed(mm.vmas):
        if v.start >= ceiling:
            continue
        if v.end <= ceiling - length:
            return ceiling - length
        ceiling = min(ceiling, v.start)
    if ceiling - length >= max(USER_MIN, mm._brk_floor()):
        return ceiling - length
    raise LinuxError(12, "no room")


def test_find_free_matches_the_full_walk(hello):
    """find_free (its walk in C, _linux.top_gap) returns exactly what the Python walk over every
    mapping from the top returns, through random anonymous maps (placed by it), fixed maps,
    unmaps, protects, brk moves, a moved mmap top, resets to captured states, and lengths
    larger than the address space; top_gap refuses arguments outside its contract."""
    from whpfast import _linux
    from whpfast.linux import mm as mm_mod
    rng = random.Random(8)
    with whpfast.LinuxSandbox([hello], memory_size=64 * MB) as lx:
        mm = lx.mm
        lo, hi = 0x400000, mm.mmap_top
        states = [mm.capture()]
        for step in range(1500):
            length = rng.choice([1, 2, 3, 16, 64, 300, 1 << 20, 1 << 40,      # pages
                                 hi // 4096 - rng.randrange(1, 4000)]) * 4096   # the walk ends below it
            want = rng.choice([0, 0, 0, rng.randrange(lo, hi) & ~4095])
            try:
                expected = _reference_find_free(mm, length, want)
            except whpfast.WhpfastError as e:
                expected = ("error", e.errno)
            try:
                got = mm.find_free(length, want)
            except whpfast.WhpfastError as e:
                got = ("error", e.errno)
            assert got == expected, (step, length, want)
            if length <= mm.mmap_top:
                assert _linux.top_gap(mm.vmas, mm.mmap_top, length) == \
                    mm_mod.py_top_gap(mm.vmas, mm.mmap_top, length)
            op = rng.random()
            if op < 0.45 and isinstance(got, int) and got + length <= hi:
                mm.map(want, length, rng.choice([1, 3]))
            elif op < 0.6:
                start = rng.randrange(lo, hi) & ~4095
                mm.map(start, min(4096 * 64, hi - start), 3, fixed=True)
            elif op < 0.8 and mm.vmas:
                v = rng.choice(mm.vmas)
                start = rng.randrange(v.start, v.end) & ~4095
                mm.unmap(start, rng.choice([1, 2, 8, 64]) * 4096)
            elif op < 0.85 and mm.vmas:
                v = rng.choice(mm.vmas)
                mm.protect(v.start, v.end - v.start, rng.choice([0, 1, 3]))
            elif op < 0.9:
                mm.brk(mm.brk_start + rng.randrange(0, 64) * 4096)
            elif op < 0.93:
                mm.mmap_top = rng.choice([hi, hi - 64 * 4096])
            elif op < 0.97:
                states.append(mm.capture())
            else:
                mm.reset(rng.choice(states))
        for ceiling, length in ((4096, 0), (4096, 8192), (-1, 4096), (1 << 64, 4096), (4096, -4096)):
            with pytest.raises(ValueError):
                _linux.top_gap(mm.vmas, ceiling, length)


READER_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static char buf[65536];
static const char ro[4096] = "read-only";
int main(void) {
    char line[512];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        printf("before %d %d|", buf[0], buf[32768]);
        int fd = open(line, O_RDONLY);
        long n = read(fd, buf, sizeof buf);
        long m = pread(fd, buf + 32768, 100, 1);
        printf("%ld %ld %.5s %.3s|", n, m, buf, buf + 32768);
        long bad = read(fd, (void *)0x1000, 10);
        int e1 = errno;
        lseek(fd, 0, SEEK_SET);
        long rof = read(fd, (void *)ro, 10);
        int e2 = errno;
        long rest = read(fd, buf, 4);          /* the refused reads moved no offset */
        long more = read(fd, buf + 8, sizeof buf - 8);
        printf("%ld %d %ld %d %ld %.4s %ld\n", bad, e1, rof, e2, rest, buf, more);
        close(fd);
        fflush(stdout);
    }
    return 0;
}
"""


def test_reads_land_in_guest_memory_checked_and_undone_by_restore(tmp_path):
    """read/pread of a host file go straight into the guest's buffer: the bytes arrive, a bad or
    read-only buffer is EFAULT without moving the file offset, and a restore puts the buffer
    back (the host's write into guest memory is marked for it: the hypervisor's dirty log does
    not see host writes)."""
    src = tmp_path / "reader.c"
    src.write_text(READER_C)
    exe = tmp_path / "reader"
    subprocess.run(["gcc", "-O1", "-static", "-o", str(exe), str(src)], check=True, capture_output=True)
    data = tmp_path / "data"
    data.write_bytes(b"HELLO world" + bytes(range(256)) * 300)       # 76811 bytes
    inside = inside_path(data)                  # (its own path: mounted in the sandbox's /tmp)
    with whpfast.LinuxSandbox([inside_path(exe)], read=read_mapping([tmp_path]), memory_size=64 * MB) as lx:
        assert lx.run(timeout=10).waiting
        snap = lx.snapshot()
        expected = b"before 0 0|65536 100 HELLO ELL|-1 14 -1 14 4 HELL 65528\n"
        assert lx.run(f"{inside}\n".encode(), timeout=10).stdout == expected
        lx.restore(snap)
        assert lx.run(f"{inside}\n".encode(), timeout=10).stdout == expected
        second = lx.run(f"{inside}\n".encode(), timeout=10).stdout
        # without a restore the buffer holds the last run's bytes: 'H', then file[32764] (241)
        assert second == expected.replace(b"before 0 0|", b"before 72 -15|")


def _outcome(argv, **kw):
    try:
        with whpfast.LinuxSandbox(argv, memory_size=64 * MB, **kw) as lx:
            r = lx.run(timeout=5)
            return "ran", r.stdout
    except whpfast.GuestLoadError as e:
        return "load error", str(e).replace(argv[0], "PROGRAM")
    except (whpfast.GuestFault, whpfast.GuestTimeout) as e:
        return "fault", type(e).__name__


def test_programs_read_through_the_file_system_load_as_from_bytes(hello, tmp_path):
    """The loader reads a program inside `read` through the sandbox's file system, headers
    first and each segment straight into guest memory (loader.Image); one outside `read` comes
    as bytes. Seeded byte flips in the headers give the same outcome, and the same message, both
    ways; a file shorter than its headers say is a load error, never a short copy."""
    import random
    from whpfast.linux import loader
    original = open(hello, "rb").read()
    rng = random.Random(88)
    outcomes = set()
    for i in range(40):
        data = bytearray(original)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(0, 64 + 56 * 10)] = rng.randrange(256)
        path = tmp_path / f"mutant{i}"
        path.write_bytes(bytes(data))
        through_fs = _outcome([inside_path(path)], read=read_mapping([tmp_path]))
        from_bytes = _outcome([str(path)])
        assert through_fs == from_bytes, (i, through_fs, from_bytes)
        outcomes.add(through_fs[0])
    assert "load error" in outcomes and "ran" in outcomes, outcomes

    # a file that shrinks between its size and its reads (another process truncating it)
    short = original[:len(original) // 2]
    image = loader.Image(len(original), loader.Image.of(short).read_into)
    elf = loader.parse(image, "shrinking")
    with whpfast.LinuxSandbox([hello], memory_size=64 * MB) as lx:
        with pytest.raises(whpfast.GuestLoadError, match="shorter than its size"):
            loader.load(lx.mm, elf, image, 0x1000000, b"shrinking")


def _listed(fs_obj, path):
    import struct
    from whpfast.linux.fs import AT_FDCWD, O_DIRECTORY
    fd = fs_obj.openat(AT_FDCWD, path, O_DIRECTORY, 0)
    names, buf = [], fs_obj.getdents64(fd, 1 << 16)
    pos = 0
    while pos < len(buf):
        ino, _, reclen, dtype = struct.unpack_from("<QqHB", buf, pos)
        names.append((buf[pos + 19:pos + reclen].split(b"\0")[0], ino, dtype))
        pos += reclen
    fs_obj.close(fd)
    return names


def test_directory_listings_shared_across_sandboxes_follow_changes(tmp_path):
    """A host directory's listing is shared by the file systems of later sandboxes while the
    directory's mtime, inode and device are unchanged; an entry created, removed or renamed
    since shows at once; a directory changed within the last _RACY_NS is never shared (its
    mtime could stay the same through another change)."""
    import os
    from whpfast.linux import fs as fs_mod
    root = tmp_path / "lib"
    root.mkdir()
    for name in ("a", "b"):
        (root / name).write_bytes(b"x")
    (root / "sub").mkdir()
    os.symlink("a", root / "link")
    host = os.fsencode(root)
    old = time.time_ns() - 10 * 10**9
    os.utime(root, ns=(old, old))

    def fresh():
        return fs_mod.FileSystem({"/lib": str(root)})

    def expected():
        out = [(b".", None, 4), (b"..", None, 4)]
        for e in sorted(os.scandir(root), key=lambda e: e.name):
            dtype = 10 if e.is_symlink() else 4 if e.is_dir(follow_symlinks=False) else 8
            out.append((os.fsencode(e.name), e.inode(), dtype))
        return out

    def check(listing):
        assert [(n, d) for n, _, d in listing] == [(n, d) for n, _, d in expected()]
        assert [i for _, i, _ in listing[2:]] == [i for _, i, _ in expected()[2:]]

    check(_listed(fresh(), b"/lib"))
    assert fs_mod._SHARED_LISTINGS[host][0][0] == old, "an old directory's listing is shared"
    shared = fs_mod._SHARED_LISTINGS[host]
    check(_listed(fresh(), b"/lib"))
    assert fs_mod._SHARED_LISTINGS[host] is shared, "reused, not listed again"

    (root / "c").write_bytes(b"new")                  # mtime now: seen, and not shared (racy)
    check(_listed(fresh(), b"/lib"))
    assert fs_mod._SHARED_LISTINGS[host] is shared
    os.rename(root / "c", root / "d")
    (root / "a").unlink()
    check(_listed(fresh(), b"/lib"))
    assert b"d" in [n for n, _, _ in _listed(fresh(), b"/lib")]
    os.utime(root, ns=(old + 1, old + 1))             # old again, another mtime: shared again
    check(_listed(fresh(), b"/lib"))
    assert fs_mod._SHARED_LISTINGS[host][0][0] == old + 1
