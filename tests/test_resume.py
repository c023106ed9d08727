"""A warm request in one C call: LinuxSandbox.run(input, restore=snapshot) with the snapshot
parked in a read of stdin restores, answers that read and runs the guest in one backend call
(Vcpu.resume_warm through WarmMemory.resume), releasing the GIL once. It must be exactly the
restore() + run() it replaces: the same output, memory, registers and restore bookkeeping,
request after request; and it must fail as they do: a timeout, a cancel (also one landing during
the restore), a fault or a refused restore each give their typed error and leave the sandbox
healable. Runs on KVM and on the WHP backend over tests/whv."""

import threading
import time

import numpy as np
import pytest

import whpfast
from whpfast import backend
from whpfast.errors import GuestCancelled, GuestFault, GuestTimeout, SandboxPoisoned
from whpfast.linux.process import LinuxSandbox

from conftest import build_c
from whpfast import testing

pytestmark = pytest.mark.hypervisor

# Reads stdin 7 bytes at a time (so one request's input spans several reads) and handles each
# line: "N" adds the line's first byte to a byte in each of N pages and answers with the sum of
# all of them (deterministic: every request starts from the snapshot), "spin" loops, "fault"
# writes to address 8, "exit" exits with 3. At end of input: "eof", exit 0.
SOURCE = r"""
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static unsigned char pages[64 * 4096];
static void say(const char *s, size_t n) { if (write(1, s, n) < 0) _exit(9); }
static void line(const char *l) {
    char out[64];
    if (!strcmp(l, "spin")) for (;;) {}
    if (!strcmp(l, "fault")) *(volatile int *)8 = 1;
    if (!strcmp(l, "exit")) _exit(3);
    int n = atoi(l) % 64;
    for (int i = 0; i < n; i++) pages[i * 4096 + i % 7] += (unsigned char)l[0];
    unsigned long sum = 0;
    for (size_t i = 0; i < sizeof pages; i++) sum += pages[i] * (i % 13 + 1);
    char *p = out + sizeof out;
    *--p = '\n';
    do { *--p = '0' + sum % 10; sum /= 10; } while (sum);
    say("ok ", 3);
    say(p, out + sizeof out - p);
}
int main(void) {
    char buf[7], l[256];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf);
        if (n <= 0) { say("eof\n", 4); _exit(0); }
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] == '\n') { l[len] = 0; line(l); len = 0; }
            else if (len < sizeof l - 1) l[len++] = buf[i];
        }
    }
}
"""
INPUTS = [b"3\n", b"10\n", b"0\n", b"40\n5\n", b"1234567890123\n", b"63\n", b"7", b"\n2\n"]


def Spy(sandbox):
    return testing.spy(sandbox, ("resume_warm", "restore_warm"))


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("resume") / "resume", SOURCE, "-static")


@pytest.fixture
def boxes(program):
    """The snapshot of the program parked in its first read, and two sandboxes started from it:
    one served by run(restore=...), one by restore() then run(); their vCPUs spied on."""
    with LinuxSandbox([program]) as boot:
        assert boot.run().waiting
        snap = boot.snapshot()
    a, b = LinuxSandbox.from_snapshot(snap), LinuxSandbox.from_snapshot(snap)
    Spy(a), Spy(b)
    try:
        yield snap, a, b
    finally:
        a.close()
        b.close()


def outside_vvar(lx):
    """Guest memory as uint64 words, the vDSO's data page(s) zeroed (its clock pairing differs
    by design between two sandboxes)."""
    words = np.frombuffer(lx._mem, np.uint64).copy()
    start, end = lx._vvar()
    words[start // 8:end // 8] = 0
    return words


def same_state(a, b, history=True):
    """a and b hold the same guest memory (but the vDSO's clock data) and registers; with the
    same history of requests also the same restore bookkeeping and system call count."""
    assert np.array_equal(outside_vvar(a), outside_vvar(b))
    assert testing.registers(a) == testing.registers(b)
    if not history:
        return
    wa, wb = testing.warm(a), testing.warm(b)
    for name in ("_hot", "_score", "_scored", "_reprotect", "_host"):
        assert np.array_equal(getattr(wa, name), getattr(wb, name)), name
    assert (wa.hot_count, wa._n_touched, wa._host_words) == (wb.hot_count, wb._n_touched, wb._host_words)
    assert a.syscall_count == b.syscall_count


def restore_then_run(b, snap, data, **kw):
    b.restore(snap)
    return b.run(data, **kw)


def test_a_warm_request_is_one_call_and_equals_restore_then_run(boxes):
    snap, a, b = boxes
    assert snap._parked and snap._parked[1] == 7
    for i in range(3):
        for data in INPUTS:
            ra = a.run(data, restore=snap)
            rb = restore_then_run(b, snap, data)
            assert ra == rb and ra.waiting
            assert ra.stdout.startswith(b"ok ") or data == b"7"
            la, lb = dict(a.last_restore), dict(b.last_restore)
            assert la.pop("ns") > 0 and lb.pop("ns") > 0
            assert la == lb, data
            same_state(a, b)
    assert testing.warm(a).vcpu.calls == {"resume_warm": 3 * len(INPUTS), "restore_warm": 0}
    assert testing.warm(b).vcpu.calls == {"resume_warm": 0, "restore_warm": 3 * len(INPUTS)}
    # the answers are those of a fresh start, every time
    assert a.run(b"3\n", restore=snap).stdout == a.run(b"3\n", restore=snap).stdout
    # a request after another one's exit resumes too
    ra = a.run(b"2\n", eof=True, restore=snap)
    assert ra.exit_code == 0 and ra.stdout.endswith(b"eof\n")
    assert a.run(b"2\n", restore=snap).stdout == ra.stdout[:-4]


def test_what_is_not_a_warm_request_takes_the_plain_path(boxes):
    """No input (the read would park again), fresh=False-style runs without restore=, and
    another snapshot: restore() + run(), the same results."""
    snap, a, b = boxes
    spy = testing.warm(a).vcpu
    r = a.run(b"", restore=snap)
    assert r.waiting and r.stdout == b"" and spy.calls["resume_warm"] == 0
    assert a.run(b"4\n").stdout == restore_then_run(b, snap, b"4\n").stdout
    assert spy.calls["resume_warm"] == 0
    a.run(b"9\n", restore=snap)
    other = a.snapshot()                     # parked too, after a request
    r = a.run(b"1\n", restore=snap)         # the baseline is `other` now: a full restore
    assert spy.calls["resume_warm"] == 1 and a.last_restore["full"]
    assert r == restore_then_run(b, snap, b"1\n")
    assert a.run(b"1\n", restore=snap) == r and spy.calls["resume_warm"] == 2
    assert a.run(b"1\n", restore=other).stdout != r.stdout


def test_a_parked_read_that_does_not_check_out_takes_the_plain_path(boxes):
    """The staged answer is written only where sys_read would write: with the snapshot's record
    of its parked read pointed at memory the guest cannot write (its [vvar] page, its page
    tables, nothing), run(restore=) serves the request by restore() + run() instead, and the
    answer is the same."""
    snap, a, b = boxes
    want = restore_then_run(b, snap, b"12\n")
    parked = snap._parked
    try:
        for where in (a._vvar()[0], a.mm.pt_base, 0, 2 ** 47):
            snap._parked = (where, 7)
            assert a.run(b"12\n", restore=snap) == want
            same_state(a, b, history=False)
    finally:
        snap._parked = parked
    assert testing.warm(a).vcpu.calls["resume_warm"] == 0
    assert a.run(b"12\n", restore=snap) == want and testing.warm(a).vcpu.calls["resume_warm"] == 1


@pytest.mark.parametrize("bad", ["spin", "fault", "exit"])
def test_a_bad_request_fails_typed_and_the_next_one_heals(boxes, bad):
    snap, a, b = boxes
    a.run(b"5\n", restore=snap)
    if bad == "spin":
        with pytest.raises(GuestTimeout):
            a.run(b"spin\n", restore=snap, timeout=0.2)
    elif bad == "fault":
        with pytest.raises(GuestFault) as fault:
            a.run(b"fault\n", restore=snap)
        assert fault.value.address == 8
    else:
        assert a.run(b"exit\n", restore=snap).exit_code == 3
    if bad != "exit":
        assert a.poisoned
        with pytest.raises(SandboxPoisoned):
            a.run(b"1\n")
    for data in (b"6\n", b"6\n"):       # (after a timeout or fault: a full restore, then a resume)
        assert a.run(data, restore=snap) == restore_then_run(b, snap, data)
        same_state(a, b, history=False)
    assert not a.poisoned


def test_cancels_landing_anywhere_in_a_warm_request(boxes):
    """cancel() from another thread at spread-out moments of warm requests, during the
    restore's copies as much as during the run: each request answers as usual or ends in
    GuestCancelled, never anything else, and the sandbox then heals exactly."""
    snap, a, b = boxes
    want = restore_then_run(b, snap, b"40\n")
    outcomes = {"answered": 0, "cancelled": 0}
    for i in range(60):
        timer = threading.Timer(i * 2e-5, a.cancel)
        timer.start()
        try:
            r = a.run(b"40\n", restore=snap)
            assert r == want
            outcomes["answered"] += 1
        except GuestCancelled:
            outcomes["cancelled"] += 1
        timer.join()
    assert sum(outcomes.values()) == 60
    with pytest.raises(GuestCancelled):     # a cancel during a long run always lands
        timer = threading.Timer(0.1, a.cancel)
        timer.start()
        try:
            a.run(b"spin\n", restore=snap, timeout=30)
        finally:
            timer.join()
    for _ in range(2):                      # a full restore, then a resume
        assert a.run(b"40\n", restore=snap) == want == restore_then_run(b, snap, b"40\n")
        same_state(a, b, history=False)


def test_a_refused_restore_inside_the_call_poisons_and_a_full_restore_heals(boxes):
    """An XSAVE area the hypervisor refuses (XSTATE_BV naming components the CPU lacks) fails
    the restore after its page work, inside resume_warm: the guest is not run, a typed error,
    the sandbox poisoned, and the next request (a full restore) exact."""
    snap, a, b = boxes
    a.run(b"5\n", restore=snap)
    good = snap._state["xsave"]
    bad = bytearray(good)
    bad[512:520] = b"\xff" * 8
    snap._state["xsave"] = bytes(bad)
    try:
        with pytest.raises(whpfast.WhpfastError, match="XSAVE|Xsave"):
            a.run(b"5\n", restore=snap)
    finally:
        snap._state["xsave"] = good
    assert testing.warm(a).vcpu.calls["resume_warm"] == 2
    assert a.poisoned and testing.warm(a).needs_full_reset
    assert not testing.warm(a)._reprotect.any()
    for _ in range(2):
        assert a.run(b"8\n", restore=snap) == restore_then_run(b, snap, b"8\n")
        same_state(a, b, history=False)


def test_staged_writes_are_checked_before_anything_is_touched(boxes):
    snap, a, b = boxes
    assert a.run(b"3\n", restore=snap) == restore_then_run(b, snap, b"3\n")
    w = testing.warm(a)
    size = w.size
    base = (w._pages, snap._image_view, snap._nonzero, w._n_touched, w.hot_limit, w.hot_count,
            w._cycle + 1, snap._state, True)
    for writes in (((size - 2, b"abcd"),), ((size, b"x"),), ((2 ** 64 - 1, b"x"),),
                   tuple((0x1000 * i, b"x") for i in range(5))):
        with pytest.raises((ValueError, OverflowError)):
            w.vcpu.resume_warm(*base, writes, 0, 0, 0)
    with pytest.raises(ValueError):
        w.vcpu.resume_warm(w._pages, snap._image_view[:4096], *base[2:], (), 0, 0, 0)
    assert a.run(b"3\n", restore=snap) == restore_then_run(b, snap, b"3\n")
    same_state(a, b)


def test_python_requests_resume_and_see_the_time_move(py_box):
    """PythonSandbox.run (fresh) takes the one-call path after its first restore; the vDSO's
    clock data, a staged write of that call, is fresh in every request."""
    lx = py_box.linux
    spy = Spy(lx)
    try:
        py_box.run("pass")
        before = spy.calls["resume_warm"]
        t0 = py_box.eval("__import__('time').time()")
        time.sleep(0.3)
        t1 = py_box.eval("__import__('time').time()")
        host = time.time()
        assert 0.3 <= t1 - t0 < 5 and abs(host - t1) < 1
        assert py_box.eval("6 * 7") == 42
        assert py_box.run("x = 1", fresh=False).error is None
        assert spy.calls["resume_warm"] == before + 3
    finally:
        testing.unspy(lx)
