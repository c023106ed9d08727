"""What a hostile Linux program can do to the host's view of it (issue 16, item 8): reach the
system-call port from its own code or return to an address sysret cannot take, learn the host's
uptime from its clocks, and leave host mappings behind across restores."""

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
