"""What a hostile Linux program can do to the host's view of it (issue 16, item 8): reach the
system-call port from its own code or return to an address sysret cannot take, learn the host's
uptime from its clocks, and leave host mappings behind across restores."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

import whpfast
from whpfast import GuestFault
from whpfast.linux.process import SYSCALL_PORT, SYSCALL_STUB, LinuxSandbox

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
    assert at_snapshot["mono"] <= mono <= sys_mono < at_snapshot["mono"] + 30e9
