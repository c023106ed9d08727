"""What a hostile Linux program can do to the host's view of it (issue 16, item 8): reach the
system-call port from its own code or return to an address sysret cannot take, learn the host's
uptime from its clocks, and leave host mappings behind across restores."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import whpfast
from whpfast import GuestFault
from whpfast.linux import mm
from whpfast.linux.process import SYSCALL_PORT, SYSCALL_STUB, LinuxSandbox
from whpfast import testing

from conftest import build_c

pytestmark = pytest.mark.hypervisor

# Waits for a command on stdin, then misuses the system-call path as told; "ok" answers normally.
PORT_ABUSE = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(void) {
    char cmd[32];
    long r = 0;
    for (;;) {
        ssize_t n = read(0, cmd, sizeof cmd - 1);
        if (n <= 0)
            return 0;
        cmd[n] = 0;
        if (!strncmp(cmd, "out", 3)) {
            /* the stub's own instruction, in the program's code, with getpid's registers */
            __asm__ volatile ("out %%al, $%c1" : "=a"(r) : "i"(PORT), "a"(39L) : "rcx", "r11", "memory");
        } else if (!strncmp(cmd, "rcx", 3) || !strncmp(cmd, "kernel", 6)) {
            /* the stub itself, entered by a jump with a return address of the program's choice */
            uint64_t ret = cmd[0] == 'r' ? 0x8000000000000000ULL : 0xFFFF800000001000ULL;
            __asm__ volatile ("mov %1, %%rcx; jmp *%2"
                              : "=a"(r) : "r"(ret), "r"((uint64_t)STUB), "a"(39L) : "rcx", "r11", "memory");
        }
        printf("survived %s %ld\n", cmd, r);
        fflush(stdout);
    }
}
"""


@pytest.fixture(scope="module")
def port_abuse(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("trust") / "port_abuse", PORT_ABUSE, "-static",
                   f"-DPORT={SYSCALL_PORT}", f"-DSTUB={SYSCALL_STUB}")


@pytest.mark.parametrize("command, match", [
    (b"out", "from its own code, not from the system-call stub"),
    (b"rcx", r"return address rcx=0x8000000000000000 is not a canonical user address"),
    (b"kernel", r"return address rcx=0xffff800000001000 is not a canonical user address"),
])
def test_only_the_stub_makes_system_calls_and_returns_go_to_user_addresses(port_abuse, command, match):
    with LinuxSandbox([port_abuse]) as sb:
        assert sb.run().waiting
        snap = sb.snapshot()
        calls = sb.syscall_count
        with pytest.raises(GuestFault, match=match) as info:
            sb.run(command)
        assert info.value.kind == "SIGSEGV" and info.value.signal == "SIGSEGV"
        assert sb.syscall_count == calls + 1        # the read; the abuse was not dispatched
        assert sb.poisoned and b"survived" not in info.value.stdout
        with pytest.raises(whpfast.SandboxPoisoned):
            sb.run(b"ok")
        sb.restore(snap)
        out = sb.run(b"ok")
        assert out.stdout == b"survived ok 0\n" and out.waiting
        # and the warm path (restore + the read's answer in one call) refuses it the same way
        with pytest.raises(GuestFault, match=match):
            sb.run(command, restore=snap)
        assert sb.run(b"ok", restore=snap).stdout == b"survived ok 0\n"


# -- the guest's clocks start near zero at its boot and never go backwards -------------------------

# On each line of stdin prints its clocks in ns, through the vDSO (clock_gettime) and through the
# system calls (syscall(), sysinfo, times): MONOTONIC, MONOTONIC_RAW, BOOTTIME, COARSE, and the
# syscall path's MONOTONIC, sysinfo's uptime (s) and times() (ticks).
CLOCKS = r"""
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <sys/times.h>

static long long ns(clockid_t c) {
    struct timespec t;
    clock_gettime(c, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(void) {
    char line[64];
    while (read(0, line, sizeof line) > 0) {
        struct timespec t;
        struct sysinfo si;
        struct tms tm;
        syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &t);
        sysinfo(&si);
        printf("%lld %lld %lld %lld %lld %ld %ld\n", ns(CLOCK_MONOTONIC), ns(CLOCK_MONOTONIC_RAW),
               ns(CLOCK_BOOTTIME), ns(CLOCK_MONOTONIC_COARSE),
               t.tv_sec * 1000000000LL + t.tv_nsec, si.uptime, (long)times(&tm));
        fflush(stdout);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def clocks_program(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("trust") / "clocks", CLOCKS, "-static")


def read_clocks(sb, **kwargs):
    out = sb.run(b"x", **kwargs)
    assert out.waiting, out
    mono, raw, boot, coarse, sys_mono, uptime, ticks = map(int, out.stdout.split())
    return {"mono": mono, "raw": raw, "boot": boot, "coarse": coarse, "sys_mono": sys_mono,
            "uptime": uptime, "ticks": ticks}


def test_monotonic_clocks_start_near_zero_at_boot(clocks_program):
    host = time.monotonic()
    with LinuxSandbox([clocks_program]) as sb:
        c = read_clocks(sb)
    for name in ("mono", "raw", "boot", "coarse", "sys_mono"):
        assert 0 <= c[name] < 5e9, (name, c)       # the sandbox's own few seconds at most
    assert c["uptime"] < 5 and c["ticks"] < 500, c
    if host > 60:                                   # (a host booted a minute ago is no test)
        assert c["mono"] < (host - 30) * 1e9, (host, c)


def test_monotonic_clocks_go_on_from_the_snapshot(clocks_program, tmp_path):
    with LinuxSandbox([clocks_program]) as sb:
        read_clocks(sb)
        time.sleep(0.3)
        at_snapshot = read_clocks(sb)      # (the program parks again right after printing)
        snap = sb.snapshot()
        time.sleep(0.2)
        later = read_clocks(sb)
        assert later["mono"] >= at_snapshot["mono"] + 0.2e9
        # a restore: from the snapshot's value on, not the host's, not backwards
        for kwargs in ({}, {"restore": snap}):
            if not kwargs:
                sb.restore(snap)
            c = read_clocks(sb, **kwargs)
            for name in ("mono", "raw", "boot", "sys_mono"):
                assert at_snapshot[name] <= c[name] < at_snapshot[name] + 2e9, (name, at_snapshot, c)
        path = snap.save(tmp_path / "clocks.snap")
    # ...and in another process, from the file, after the host clocks moved on (a reboot moves
    # them back instead: the guest does not see the host's clocks at all, see test above)
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from test_linux_trust import read_clocks\n"
              "from whpfast.linux.process import LinuxSandbox\n"
              f"sb = LinuxSandbox.from_snapshot({str(path)!r})\n"
              "print(read_clocks(sb)['mono'], read_clocks(sb)['sys_mono'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    mono, sys_mono = map(int, done.stdout.split())
    for value in (mono, sys_mono):      # (the vDSO's and the system call's, two runs apart)
        assert at_snapshot["mono"] <= value < at_snapshot["mono"] + 30e9


# -- host mappings: a restore takes back what a run left, a failed mmap leaves nothing -------------

# On "map N": N read-only mappings of the file argv[1], each at another file offset (no two
# merge, on the guest's side or the host's), a page punched out of every other one and every
# third one unmapped again; "punch N": a page out of each of the first N mappings "map" kept;
# "bad N": N mmaps that must fail (a directory, the console, a bad fd), and one MAP_FIXED of a
# directory over a page of "map"'s first mapping, which must stay. Then prints its own mapping
# count (/proc/self/maps lines) and how many calls did not do what they must.
MAPPER = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>

static int maps(void) {
    char buf[1 << 16];
    int fd = open("/proc/self/maps", O_RDONLY), n, lines = 0;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        for (int i = 0; i < n; i++)
            lines += buf[i] == '\n';
    close(fd);
    return lines;
}

static char *made[4096];
static int n_made;

int main(int argc, char **argv) {
    char cmd[64];
    int fd = open(argv[1], O_RDONLY);
    long size = lseek(fd, 0, SEEK_END);
    for (;;) {
        ssize_t n = read(0, cmd, sizeof cmd - 1);
        if (n <= 0) return 0;
        cmd[n] = 0;
        int count = atoi(cmd + 4), failed = 0;
        if (!strncmp(cmd, "map ", 4)) {
            /* read-only file mappings, each at another file offset (no two merge), every other one unmapped again */
            char *prev = 0;
            for (int i = 0; i < count; i++) {
                long off = (long)(i * 7 % ((size >> 12) - 8)) << 12;
                char *p = mmap(0, 8 << 12, PROT_READ, MAP_PRIVATE, fd, off);
                if (p == MAP_FAILED) { failed++; continue; }
                if (n_made < 4096 && i % 3 != 2) made[n_made++] = p;
                if (i % 2) munmap(p + 4096, 4096);      /* a hole punched in a shared mapping */
                if (i % 3 == 0 && prev) munmap(prev, 8 << 12);
                prev = p;
            }
        } else if (!strncmp(cmd, "punch ", 6)) {
            count = atoi(cmd + 6);
            for (int i = 0; i < count && i < n_made; i++)
                if (munmap(made[i] + 2 * 4096, 4096)) failed++;
        } else if (!strncmp(cmd, "bad ", 4)) {
            /* mmaps that must fail and leave nothing: a directory, the console, a bad fd */
            int dir = open("/tmp", O_RDONLY | O_DIRECTORY);
            for (int i = 0; i < count; i++) {
                int fds[] = {dir, 0, 1, 999};
                void *p = mmap(0, 1 << 16, PROT_READ, MAP_PRIVATE, fds[i % 4], 0);
                if (p != MAP_FAILED || errno != (i % 4 == 3 ? EBADF : ENODEV)) failed++;
            }
            if (n_made) {
                char before = made[0][0];
                if (mmap(made[0], 4096, PROT_READ, MAP_PRIVATE | MAP_FIXED, dir, 0) != MAP_FAILED
                        || made[0][0] != before)
                    failed++;
            }
            close(dir);
        }
        printf("%d %d\n", maps(), failed);
        fflush(stdout);
    }
}
"""


@pytest.fixture(scope="module")
def mapper(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("trust") / "mapper", MAPPER, "-static")


def host_mappings():
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


SLACK = 8       # mappings this process may make meanwhile on its own (allocator arenas, threads)


def mapping_count(out):
    maps, failed = map(int, out.stdout.split())
    assert out.waiting and failed == 0, out
    return maps


@pytest.fixture
def mapped_file():
    """A host file the guest may map (shareable: root's, not writable by others), >= 1 MiB."""
    for path in ("/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6",
                 sys.executable):
        path = os.path.realpath(path)
        if os.path.isfile(path) and os.path.getsize(path) >= 1 << 20:
            return path
    pytest.fail("no host file of 1 MiB or more to map")


def test_a_restore_takes_back_the_host_mappings_a_run_made(mapper, mapped_file, tmp_path):
    base = host_mappings()
    with LinuxSandbox([mapper, mapped_file], read=[mapped_file]) as sb:
        # KVM maps the file's pages copy-on-write (host mappings); WHP copies them (none)
        shares = hasattr(sb._memory, "overlay_file")
        assert sb.run().waiting
        mapping_count(sb.run(b"map 40"))        # the snapshot holds file mappings of its own
        snap = sb.snapshot()
        at_snapshot = host_mappings()
        guest_at_snapshot = len(sb.mm.vmas)
        assert at_snapshot - base > 20 or not shares
        for command in (b"map 400", b"punch 20", b"map 400"):
            mapping_count(sb.run(command))
            assert host_mappings() > at_snapshot + 100 or command.startswith(b"punch") or not shares
            sb.restore(snap)
            assert host_mappings() <= at_snapshot + SLACK, command
        # the warm path (restore and the read's answer in one call) takes them back too
        for _ in range(3):
            mapping_count(sb.run(b"map 400", restore=snap))
        sb.restore(snap)
        assert host_mappings() <= at_snapshot + SLACK
        # ...and the memory is the snapshot's all the same: the mappings read the file's bytes
        assert mapping_count(sb.run(b"map 0")) == guest_at_snapshot
        name = os.fsencode(mapped_file)
        with open(mapped_file, "rb") as f:
            file_vmas = [v for v in sb.mm.vmas if v.name == name and not v.prot & 2]
            assert len(file_vmas) > 20
            for v in file_vmas:
                f.seek(v.offset)
                assert sb.mm.read(v.start, v.end - v.start) == f.read(v.end - v.start), v
        path = snap.save(tmp_path / "mapper.snap")
    # sandboxes from the file: the image is mapped from it (its extents are host mappings), and
    # what runs map or punch there comes back the same way
    with LinuxSandbox.from_snapshot(path, read=[mapped_file]) as sb:        # the caller's grant
        started = host_mappings()
        for command in (b"punch 30", b"map 400", b"punch 30"):
            mapping_count(sb.run(command, restore=testing.warm(sb).baseline))
        sb.restore(testing.warm(sb).baseline)
        assert host_mappings() <= started + SLACK


def test_failed_mmaps_leave_nothing(mapper, mapped_file):
    with LinuxSandbox([mapper, mapped_file], read=[mapped_file]) as sb:
        assert sb.run().waiting
        before = mapping_count(sb.run(b"map 10"))
        vmas = list(sb.mm.vmas)
        host = host_mappings()
        assert mapping_count(sb.run(b"bad 200")) == before
        assert sb.mm.vmas == vmas and host_mappings() <= host + SLACK


def test_a_pool_keeps_to_the_processs_mapping_budget(py_box, monkeypatch):
    """A pool reserves each sandbox's peak of host mappings (mapbudget.sandbox_peak) and refuses
    one that would not fit in vm.max_map_count, saying how many fit; a failed pool and a closed
    one give their reservations back."""
    import gc
    from whpfast.core import mapbudget
    peak = mapbudget.sandbox_peak(py_box.snapshot)
    assert peak == mapbudget.FIXED + 2 * (mm.MAX_SHARED + mapbudget.OVERLAY_REMAPS)
    gc.collect()
    before = mapbudget.reserved()
    # room for two and a half such sandboxes
    limit = mapbudget.process_mappings() + before + mapbudget.HEADROOM + 2 * peak + peak // 2
    monkeypatch.setattr(mapbudget, "max_map_count", lambda: limit)
    with pytest.raises(whpfast.MappingBudgetError, match="at most 0 more sandboxes") as info:
        whpfast.Pool(py_box, size=3)
    assert info.value.peak == peak and info.value.limit == limit and info.value.left < peak
    del info                        # (its traceback holds the pool's frame, and so its sandboxes)
    gc.collect()
    assert mapbudget.reserved() == before
    with whpfast.Pool(py_box, size=2) as pool:
        assert mapbudget.reserved() == before + 2 * peak
        assert pool.run("print(6 * 7)").stdout == "42\n"
    gc.collect()
    assert mapbudget.reserved() == before


def test_a_snapshot_file_from_a_host_up_for_longer_goes_on_from_its_clock(clocks_program, tmp_path):
    """After a host reboot the host's clocks are behind the snapshot's: a file whose recorded
    clocks are an hour ahead of this host's stands for one, and its sandboxes go on from them."""
    hour = 3600 * 10**9
    with LinuxSandbox([clocks_program]) as sb:
        read_clocks(sb)
        snap = sb.snapshot()
        recorded = snap.meta["clock"]
        snap.meta["clock"] = [v + hour for v in recorded]
        path = snap.save(tmp_path / "ahead.snap")
    with LinuxSandbox.from_snapshot(path) as sb:
        c = read_clocks(sb)
    for name, i in (("mono", 0), ("raw", 1), ("boot", 2), ("sys_mono", 0)):
        assert recorded[i] + hour <= c[name] < recorded[i] + hour + 5 * 10**9, (name, recorded, c)
    assert c["uptime"] >= 3600
