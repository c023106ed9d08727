"""WHP-specific behaviour of the WHP backend, on the KVM-backed WHv* layer (collected only when
the suite runs with WHPFAST_BACKEND=whp; tests/conftest.py). The layer models WHP where it differs
from KVM, so these show that a backend getting those differences wrong would fail."""

import ctypes
import os

import pytest

import whpfast
from whpfast import backend
from whpfast import testing

pytestmark = pytest.mark.hypervisor
from whpfast.abi import PAGE


def shim():
    path = os.path.join(os.path.dirname(os.environ["WHPFAST_WHP_MODULE"]), "libwhv_kvm.so")
    lib = ctypes.CDLL(path)
    lib.VirtualAlloc.restype = ctypes.c_void_p
    lib.VirtualAlloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_uint32]
    lib.VirtualFree.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32]
    return lib


def test_backend_is_whp():
    assert backend.NAME == "whp" and whpfast.hypervisor() == "whp"


def test_not_stepping_rip_fails(testkit):
    """WHP stops AT an `out`: a backend that does not step RIP past it re-runs the `out`."""
    printed = []
    with whpfast.Sandbox(testkit, on_print=printed.append) as sb:
        assert sb.call("hello") == "hello world"
        testing.vcpu(sb).step_rip = False
        with pytest.raises(whpfast.GuestTimeout):
            sb.call("hello", timeout=0.5)
    assert printed[0] == "hello world\n"
    assert len(printed) > 3 and set(printed) == {"hello world\n"}


def test_swapping_pages_behind_a_mapping_is_seen_stale(testkit):
    """WHvMapGpaRange pins pages: decommit + recommit gives the host new pages that the guest
    never sees (the stale-input bug). Resets must be memset/memcpy in place, as restore does."""
    lib = shim()
    with whpfast.Sandbox(testkit) as sb:
        snap = sb.snapshot()
        sb.call("touch", 0, 1, 7)
        address = sb._memory.address + sb._layout.region("heap").gpa
        assert lib.VirtualFree(address, PAGE, 0x4000)                    # MEM_DECOMMIT
        assert lib.VirtualAlloc(address, PAGE, 0x1000, 0x04) == address   # MEM_COMMIT, RW
        sb._mem[address - sb._memory.address] = 0x42
        assert sb.call("read_byte", 0) == 7          # the guest still reads the old page
        sb.restore(snap)                             # restore writes the host's (new) page...
        assert sb._mem[address - sb._memory.address] == 0
        assert sb.call("read_byte", 0) == 7          # ...which the guest never sees


def test_one_register_call_per_run(testkit):
    """A restore's whole register file and the call's entry registers go out in one
    WHvSetVirtualProcessorRegisters, with the XSAVE call the only other one."""
    with whpfast.Sandbox(testkit) as sb:
        snap = sb.snapshot()
        sb.call("none")
        before = testing.api_calls(sb)
        sb.restore(snap)
        sb.call("none")
        # XSAVE (restore) + one register batch + one run
        assert testing.api_calls(sb) - before == 3
        before = testing.api_calls(sb)
        sb.call("hello")
        # batch + run, then (RIP stepped past the print's `out`) batch + run
        assert testing.api_calls(sb) - before == 4


SYSCALLS = r'''
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
    return 0;
}
'''


def test_a_linux_system_call_is_one_get_one_set_one_run(tmp_path):
    """LinuxSandbox on WHP: a system call's registers are read with one
    WHvGetVirtualProcessorRegisters and its answer (RAX, RIP, RFLAGS) joins the one register
    batch of the next run: three WHv* calls per call, whatever the program does around them."""
    import subprocess
    (tmp_path / "calls.c").write_text(SYSCALLS)
    subprocess.run(["gcc", "-O1", "-static", "-o", str(tmp_path / "calls"), str(tmp_path / "calls.c")],
                   check=True)
    used = {}
    for n in (100, 300):
        with whpfast.LinuxSandbox([str(tmp_path / "calls"), str(n)], memory_size=64 << 20) as lx:
            before = testing.api_calls(lx)
            assert lx.run().exit_code == 0
            used[n] = (testing.api_calls(lx) - before, lx.syscall_count)
    (calls_100, syscalls_100), (calls_300, syscalls_300) = used[100], used[300]
    assert syscalls_300 - syscalls_100 == 200
    assert calls_300 - calls_100 == 3 * 200


def test_a_system_call_that_entered_cpl0_returns_to_the_user_selectors():
    """On real WHP `syscall` enters CPL0 at LSTAR (the stub then runs with the kernel's CS/SS);
    the answer must put the user selectors back, as `sysret` would. Over PVM `syscall` stays at
    CPL3, so here the kernel selectors are put in by hand at a parked system call."""
    import struct
    from whpfast import machine
    impl = backend.impl
    with whpfast.LinuxSandbox(["/bin/busybox", "cat"], read=["/bin"], memory_size=64 << 20) as lx:
        assert lx.run().waiting                       # parked in read(0), at the stub's `out`
        vcpu = testing.vcpu(lx)
        state = vcpu.save_state()
        regs = bytearray(state["registers"])
        for name, selector, attributes in ((0x13, machine.KERNEL_CS, 0xA09B), (0x14, machine.KERNEL_DS, 0xC093)):
            struct.pack_into("<QIHH", regs, 16 * impl.STATE_REGISTERS.index(name), 0, 0xFFFFFFFF,
                             selector, attributes)    # flat, DPL 0
        vcpu.load_state(dict(state, registers=bytes(regs)), fpu=False, full=False)
        rcx = impl.syscall_regs(vcpu)[7]
        assert testing.registers(vcpu)["cs"] == machine.KERNEL_CS
        impl.syscall_return(vcpu, 0, machine.USER_CS, machine.USER_DS)
        after = testing.registers(vcpu)
        assert (after["cs"], after["ss"], after["rip"], after["rax"]) == (machine.USER_CS, machine.USER_DS, rcx, 0)
        # and the program goes on at CPL3: its parked read is served again, with end of input
        assert lx.run(b"", eof=True).exit_code == 0
