"""The clock and sleep calls. Handlers take the Task (whpfast/linux/task.py) and the raw
argument registers. The realtime clocks are the host's; the others the guest's (Task.clock_ns:
the host's, less the offset that makes the guest's start near zero at its boot)."""

import errno as E
import struct
import time

from .task import fail, s32

# The clock a guest's clock id reads (through Task.clock_ns), for the ids the sandbox serves. The CPU-time
# clocks read the guest's monotonic time: one process, always running.
_GUEST_CLOCKS = {1: time.CLOCK_MONOTONIC, 6: time.CLOCK_MONOTONIC, 2: time.CLOCK_MONOTONIC,
                 3: time.CLOCK_MONOTONIC, 4: time.CLOCK_MONOTONIC_RAW, 7: time.CLOCK_BOOTTIME,
                 9: time.CLOCK_BOOTTIME}


def _clock_ns(t, clock):
    if clock == 0 or clock == 8 or clock == 5 or clock == 11:      # REALTIME(_ALARM, _COARSE), TAI
        return time.time_ns()
    if clock in _GUEST_CLOCKS:                # MONOTONIC(_COARSE, _RAW), BOOTTIME(_ALARM), CPU
        return t.clock_ns(_GUEST_CLOCKS[clock])
    fail(E.EINVAL)


def sys_clock_gettime(t, clock, tp, *_):
    ns = _clock_ns(t, s32(clock))
    t.mm.write(tp, struct.pack("<qq", ns // 10**9, ns % 10**9))
    return 0


def sys_clock_getres(t, clock, res, *_):
    _clock_ns(t, s32(clock))
    if res:
        t.mm.write(res, struct.pack("<qq", 0, 1))
    return 0


def sys_gettimeofday(t, tv, tz, *_):
    ns = time.time_ns()
    if tv:
        t.mm.write(tv, struct.pack("<qq", ns // 10**9, ns % 10**9 // 1000))
    if tz:
        t.mm.write(tz, bytes(8))
    return 0


def sys_time(t, tloc, *_):
    now = time.time_ns() // 10**9
    if tloc:
        t.mm.write(tloc, struct.pack("<q", now))
    return now


def _sleep(t, req):
    sec, nsec = struct.unpack("<qq", t.mm.read(req, 16))
    if sec < 0 or not 0 <= nsec < 10**9:
        fail(E.EINVAL)
    t.sleep(sec + nsec / 1e9)
    return 0


def sys_nanosleep(t, req, rem, *_):
    return _sleep(t, req)


def sys_clock_nanosleep(t, clock, flags, req, rem, *_):
    _clock_ns(t, s32(clock))
    if flags & 1:                              # TIMER_ABSTIME
        sec, nsec = struct.unpack("<qq", t.mm.read(req, 16))
        t.sleep(max(0.0, sec + nsec / 1e9 - _clock_ns(t, s32(clock)) / 1e9))
        return 0
    return _sleep(t, req)

