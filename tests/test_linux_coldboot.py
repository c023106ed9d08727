"""Cold boot of Linux programs: what the cheaper construction and per-call paths must keep right.

- the vDSO's TSC calibration is measured once per process (it is per host, not per sandbox) and
  started at import: sandboxes made one after the other all read the host's clocks, and keep
  reading them correctly long after their start."""

import subprocess
import sys
import time

import pytest

import whpfast
from whpfast.linux import vdso

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
    out = tmp_path_factory.mktemp("coldboot")
    (out / "clocks.c").write_text(CLOCKS_C)
    subprocess.run(["gcc", "-O1", "-static", "-o", str(out / "clocks"), str(out / "clocks.c")],
                   check=True, capture_output=True)
    return str(out / "clocks")


def _host():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC), time.time_ns()


def _guest(result):
    mono, real = map(int, result.stdout.split())
    return mono, real


TOLERANCE_NS = 200_000      # pairing gap (~100 ns) + rate error (< 1e-4, test_linux_vdso) over ~1 s


def test_sandboxes_share_one_calibration_and_read_the_hosts_clocks(clocks_program):
    """Two sandboxes started one after the other, each reading CLOCK_MONOTONIC and CLOCK_REALTIME
    through the vDSO at its start and again 0.3 s later: every reading lies between the host's
    readings taken before and after it (both clocks), so the two agree with each other and with
    the host, and the rate (measured once, from the import on) keeps them there."""
    cal = vdso.calibrate()
    boxes, readings = [], []
    try:
        for _ in range(2):
            before = _host()
            lx = whpfast.LinuxSandbox([clocks_program], memory_size=64 * MB)
            boxes.append(lx)
            r = lx.run(timeout=10)
            assert r.waiting, r
            readings.append((before, _guest(r), _host()))
        time.sleep(0.3)
        for lx in boxes:
            before = _host()
            r = lx.run(b"\n", timeout=10)
            readings.append((before, _guest(r), _host()))
        calls = [lx.syscall_count for lx in boxes]
    finally:
        for lx in boxes:
            lx.close()
    assert vdso.calibrate() is cal, "measured once per process, not per sandbox"
    for before, guest, after in readings:
        for clock in (0, 1):
            assert before[clock] - TOLERANCE_NS <= guest[clock] <= after[clock] + TOLERANCE_NS, \
                (clock, before, guest, after)
    # readings in the order they were taken, across both sandboxes, never go backwards
    monos = [guest[0] for _, guest, _ in readings]
    assert monos[0] < monos[1] and monos[2] < monos[3] and monos[1] < monos[2] - 250_000_000
    assert all(c < 40 for c in calls), f"clock reads made system calls: {calls}"

