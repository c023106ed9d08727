"""What a system call handler works with: the Task it serves (instead of the public
LinuxSandbox), the conversions of raw argument registers, and the ways a call stops the run.

A handler (whpfast/linux/sys_*.py) is `handler(task, a0, ..., a5)` with the six argument registers
as unsigned 64-bit ints; it returns a non-negative result or raises LinuxError (syscalls.dispatch
turns it into -errno). The Task holds the parts of the sandbox a call may touch, and nothing else:

- mm: the address space (whpfast/linux/mm.py); every guest pointer goes through its checked
  accessors (EFAULT).
- fs: the file system (whpfast/linux/fs.py) with the fd table.
- proc: the process's signal state (ProcState: actions, sigmask, altstack), replaced, never
  mutated, so a snapshot can keep the tuple; stack_size and memory_size for the limits it reports.
- I/O: take_input(n) (stdin; Park when there is none yet) and output(stream, data).
- the thread: set_segment_base(which, value) (FS/GS), clock_ns(clock) (the guest's clocks) and
  sleep(seconds).
- unsupported_syscalls and syscall_count: the counts LinuxSandbox reports as its own.

LinuxSandbox makes one Task when it builds its VM and passes it to every dispatch."""

import os
from collections import namedtuple

from .errno import LinuxError

AT_FDCWD = -100
CWD = AT_FDCWD & ((1 << 64) - 1)       # AT_FDCWD as the raw register holds it
MAX_IO = 16 << 20           # bytes moved by one read/write (short counts are legal)
PID = 1000                  # what the program sees as its pid/tid
UID = 1000

ProcState = namedtuple("ProcState", "actions sigmask altstack")


class Task:
    """The context of the system call handlers (see the module's docstring)."""

    __slots__ = ("mm", "fs", "proc", "stack_size", "memory_size", "take_input", "output",
                 "set_segment_base", "clock_ns", "sleep", "unsupported_syscalls", "syscall_count")

    def __init__(self, mm, fs, proc, *, stack_size, memory_size, take_input, output,
                 set_segment_base, clock_ns, sleep):
        self.mm, self.fs, self.proc = mm, fs, proc
        self.stack_size, self.memory_size = stack_size, memory_size
        self.take_input, self.output = take_input, output
        self.set_segment_base, self.clock_ns, self.sleep = set_segment_base, clock_ns, sleep
        self.unsupported_syscalls = {}
        self.syscall_count = 0


class ProgramExit(Exception):
    """exit/exit_group: the program ended with this status."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


class ProgramKilled(Exception):
    """The program sent itself a signal it has no way to receive here (abort(), raise())."""

    def __init__(self, signal):
        super().__init__(signal)
        self.signal = signal


class Park(Exception):
    """A read of stdin with no input left: the run stops, waiting for more input."""


def s32(v):
    """A register's low 32 bits as a signed int (an int argument: fd, flags)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def s64(v):
    """A register as a signed 64-bit int (off_t, a signed long)."""
    return v - (1 << 64) if v & (1 << 63) else v


def read_path(t, addr):
    """The NUL-terminated path at guest address addr (EFAULT, ENAMETOOLONG)."""
    return t.mm.read_cstring(addr)


def fail(err, why=""):
    """Ends the call with -err."""
    raise LinuxError(err, why or os.strerror(err))
