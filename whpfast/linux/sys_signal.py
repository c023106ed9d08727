"""The signal calls: actions, mask and alternate stack are recorded (and snapshotted with the
process) but no signal is ever delivered; a signal the program sends itself that it does not
ignore ends the run (ProgramKilled). Handlers take the Task (whpfast/linux/task.py) and the raw
argument registers."""

import errno as E
import struct

from .task import PID, ProgramKilled, fail, s32

SIGKILL, SIGSTOP = 9, 19
SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT",
                7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2",
                13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM"}

def sys_rt_sigaction(t, sig, act, oact, sigsetsize, *_):
    if sigsetsize != 8 or not 1 <= sig <= 64:
        fail(E.EINVAL)
    actions = t.proc.actions
    new = t.mm.read(act, 32) if act else None          # read before oact is written: may alias
    if new is not None and sig in (SIGKILL, SIGSTOP):
        fail(E.EINVAL)
    if oact:
        t.mm.write(oact, actions[sig])
    if new is not None:
        t.proc = t.proc._replace(actions=actions[:sig] + (new,) + actions[sig + 1:])
    return 0


def sys_rt_sigprocmask(t, how, set_, oset, sigsetsize, *_):
    if sigsetsize != 8:
        fail(E.EINVAL)
    mask = t.proc.sigmask
    value = struct.unpack("<Q", t.mm.read(set_, 8))[0] if set_ else None
    if value is not None and how not in (0, 1, 2):
        fail(E.EINVAL)
    if oset:
        t.mm.write(oset, struct.pack("<Q", mask))
    if value is not None:
        mask = (mask | value, mask & ~value, value)[how]
        mask &= ~((1 << (SIGKILL - 1)) | (1 << (SIGSTOP - 1)))
        t.proc = t.proc._replace(sigmask=mask)
    return 0


def sys_sigaltstack(t, ss, old, *_):
    new = t.mm.read(ss, 24) if ss else None
    if old:
        t.mm.write(old, t.proc.altstack)
    if new is not None:
        t.proc = t.proc._replace(altstack=new)
    return 0


def sys_kill(t, pid, sig, *_):
    return _kill(t, s32(pid), s32(sig))


def sys_tgkill(t, tgid, tid, sig, *_):
    return _kill(t, s32(tid), s32(sig))


def _kill(t, pid, sig):
    if pid not in (0, -1, PID):
        fail(E.ESRCH)
    if not 0 <= sig <= 64:
        fail(E.EINVAL)
    if sig == 0 or t.proc.actions[sig][:8] == struct.pack("<Q", 1):     # SIG_IGN
        return 0
    raise ProgramKilled(sig)

