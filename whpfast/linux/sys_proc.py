"""The process calls: exit, identity, limits, scheduling, the thread's FS/GS, futexes (one
thread: nobody else to wake), system information. Handlers take the Task
(whpfast/linux/task.py) and the raw argument registers; the ids the program sees are task.PID and
task.UID, answered by the table's constant entries."""

import errno as E
import os
import struct
import time

from .task import PID, UID, ProgramExit, fail

def sys_exit(t, status, *_):
    raise ProgramExit(status & 0xFF)


def sys_getresuid(t, a, b, c, *_):
    for addr in (a, b, c):
        t.mm.write(addr, struct.pack("<I", UID))
    return 0


def sys_getgroups(t, *_):
    return 0


def sys_uname(t, buf, *_):
    fields = (b"Linux", b"whpfast", b"6.1.0", b"#1 SMP whpfast", b"x86_64", b"(none)")
    t.mm.write(buf, b"".join(f.ljust(65, b"\0") for f in fields))
    return 0


def sys_arch_prctl(t, code, addr, *_):
    which = {0x1002: "fs", 0x1001: "gs", 0x1003: "fs", 0x1004: "gs"}.get(code)
    if which is None:
        fail(E.EINVAL)
    if code in (0x1002, 0x1001):               # ARCH_SET_FS / ARCH_SET_GS
        if addr >= 1 << 47:
            fail(E.EPERM)
        t.set_segment_base(which, addr)
        return 0
    t.mm.write(addr, struct.pack("<Q", t.set_segment_base(which, None)))
    return 0


def sys_set_tid_address(t, *_):
    return PID


def sys_set_robust_list(t, *_):
    return 0


def sys_futex(t, uaddr, op, val, timeout, *_):
    cmd = op & 0x7F
    if cmd in (1, 10):                          # FUTEX_WAKE(_BITSET): nobody else to wake
        return 0
    if cmd in (0, 9):                           # FUTEX_WAIT(_BITSET)
        current = struct.unpack("<I", t.mm.read(uaddr, 4))[0]
        if current != val & 0xFFFFFFFF:
            fail(E.EAGAIN)
        # One thread: no one can ever wake this wait. Report a timeout instead of hanging.
        fail(E.ETIMEDOUT)
    fail(E.ENOSYS)


def sys_sched_getaffinity(t, pid, size, mask, *_):
    if size < 8 or size % 8:
        fail(E.EINVAL)
    t.mm.write(mask, struct.pack("<Q", 1))     # one CPU
    return 8


def sys_sched_nothing(t, *_):
    return 0


def sys_getcpu(t, cpu, node, *_):
    for addr in (cpu, node):
        if addr:
            t.mm.write(addr, struct.pack("<I", 0))
    return 0


RLIM_INFINITY = (1 << 64) - 1


def sys_prlimit64(t, pid, resource, new, old, *_):
    if pid not in (0, PID):
        fail(E.ESRCH)
    return _rlimit(t, resource, old)


def sys_getrlimit(t, resource, old, *_):
    return _rlimit(t, resource, old)


def sys_setrlimit(t, *_):
    return 0


def _rlimit(t, resource, old):
    if resource > 15:
        fail(E.EINVAL)
    limit = {3: t.stack_size, 7: 1024, 9: t.memory_size}.get(resource, RLIM_INFINITY)
    if old:
        t.mm.write(old, struct.pack("<QQ", limit, limit))
    return 0


def sys_getrusage(t, who, buf, *_):
    t.mm.write(buf, bytes(144))
    return 0


def sys_times(t, buf, *_):
    if buf:
        t.mm.write(buf, bytes(32))
    return t.clock_ns(time.CLOCK_MONOTONIC) // 10**7 & ((1 << 63) - 1)   # 100 Hz ticks


def sys_sysinfo(t, buf, *_):
    uptime = t.clock_ns(time.CLOCK_BOOTTIME) // 10**9      # the guest's, not the host's
    info = struct.pack("<q3Q6QHH4xQQI", uptime, 0, 0, 0, t.memory_size,
                       t.memory_size // 2, 0, 0, 0, 0, 1, 0, 0, 0, 1)
    t.mm.write(buf, info.ljust(112, b"\0"))
    return 0


def sys_getrandom(t, buf, length, flags, *_):
    length = min(length, 1 << 20)
    t.mm.check(buf, length, write=True)
    t.mm.write(buf, os.urandom(length))
    return length


def sys_umask(t, mask, *_):
    return t.fs.umask(mask & 0o777)


def sys_personality(t, *_):
    return 0
