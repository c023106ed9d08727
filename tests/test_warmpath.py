"""The warm request path's fast parts (bench/profile_warm.py shows what each costs): the vDSO
data area refreshed in C on every restore, the request encoded without json.dumps' set-up, and
the restore ioctls made with the GIL released. Each must do exactly what the slow way did (and
with WHPFAST_PURE_PYTHON=1, where the Python paths run, these tests hold as well)."""

import json
import os
import threading
import time

import pytest

import whpfast
from whpfast import _linux
from whpfast.linux import process, vdso
from whpfast.python import sandbox as py_sandbox
from whpfast import testing

from test_python_sandbox import REPLACE_VVAR  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def sb():
    with whpfast.PythonSandbox(memory_size=64 << 20, setup="import time") as box:
        yield box


def _data_area(lx):
    start, _ = lx._vvar()
    raw = lx.mm.read(start, vdso.DATA_SIZE)
    return raw, (vdso._SEQ.unpack_from(raw, 0)[0],) + vdso._BODY.unpack_from(raw, vdso._SEQ.size)


def test_restore_writes_a_fresh_data_area_laid_out_as_write_data_does(sb):
    lx = sb.linux
    sb.run("pass")
    lx.restore(sb.snapshot)
    time.sleep(0.01)                       # a stale pairing would be >= 10 ms old
    before = vdso.host_clocks()
    lx.restore(sb.snapshot)
    after = vdso.host_clocks()
    raw, (seq, mode, tsc_base, mult, shift, coarse, real, mono, raw_ns, boot) = _data_area(lx)
    # the snapshot's page was put back, then written once: the generation after the snapshot's
    start, _ = lx._vvar()
    (snap_seq,) = vdso._SEQ.unpack_from(sb.snapshot._image_view, start)
    assert seq == ((snap_seq | 1) + 1) & 0xFFFFFFFF
    assert before.tsc <= tsc_base <= after.tsc
    # the guest's monotonic clocks: the host's less the sandbox's offsets (near zero at boot)
    mono_off, raw_off, boot_off = lx._clock_offsets
    assert before.monotonic_ns - mono_off <= mono <= after.monotonic_ns - mono_off
    assert before.realtime_ns <= real <= after.realtime_ns
    assert before.raw_ns - raw_off <= raw_ns <= after.raw_ns - raw_off
    assert before.boottime_ns - boot_off <= boot <= after.boottime_ns - boot_off
    # The same bytes vdso.write_data (the Python path, WHPFAST_PURE_PYTHON=1) writes for this
    # pairing: mode, mult, shift and the coarse resolution from the calibration, same layout.
    cal = vdso.calibrate()
    ref = bytearray(vdso.DATA_SIZE)
    ref[:4] = raw[:4]
    vdso.write_data(ref, 0, tsc_hz=cal.tsc_hz if cal.invariant else None, tsc_base=tsc_base,
                    monotonic_base_ns=mono, realtime_base_ns=real, raw_base_ns=raw_ns,
                    boottime_base_ns=boot)
    assert raw[4:] == bytes(ref[4:])


def test_guest_clocks_after_restores_are_the_hosts_wall_clock_and_the_snapshots_monotonic(sb):
    """REALTIME is the host's; MONOTONIC goes on from the snapshot's value at every restore (see
    tests/test_linux_trust.py), as the system-call path serves it too."""
    at_snapshot = sb.snapshot.meta["clock"][0] / 1e9
    for _ in range(3):
        host = time.time()
        guest = sb.eval("time.time()")
        assert abs(guest - host) < 0.5
        guest = sb.eval("time.monotonic()")
        assert at_snapshot <= guest <= sb.linux.guest_clock_ns(time.CLOCK_MONOTONIC) / 1e9
        assert guest < at_snapshot + 0.5


def test_the_refresh_is_a_host_write_the_next_restore_undoes(sb):
    """The data page is marked host-dirty: a snapshot taken now holds this refresh, and the
    restore after the next one copies the page back before writing it again."""
    lx = sb.linux
    sb.run("pass")
    lx.restore(sb.snapshot)
    assert lx.last_restore["host_pages"] >= 1


def test_refresh_refuses_an_area_outside_guest_memory(sb):
    lx = sb.linux
    fn, mode, mult, shift, coarse = process._vdso_parameters()
    size = lx.memory_size
    for addr in (size - 8, size, 2 ** 64 - 8, 4):
        with pytest.raises(ValueError, match="outside the guest memory or misaligned"):
            _linux.refresh_vdso(lx.mm, addr, fn, mode, mult, shift, coarse, 0)
    with pytest.raises(ValueError):
        _linux.refresh_vdso(lx.mm, 0x10000, 0, mode, mult, shift, coarse, 0)
    assert sb.run("print(1)").stdout == "1\n"             # and the sandbox works on


@pytest.mark.parametrize("code", ['print("hello world")', "", "x = '\\u00e9\\ud800'\n\t\\\\\"",
                                  "\x00\x1f\u2028 \U0001F600 \ud800"])
@pytest.mark.parametrize("op", ["exec", "eval", "warm"])
@pytest.mark.parametrize("stream", [False, True])
def test_request_encoding_is_json_dumps(op, code, stream):
    seed = os.urandom(32).hex()
    assert py_sandbox._encode_request(op, code, seed, stream) == json.dumps(
        {"op": op, "code": code, "seed": seed, "cap": py_sandbox.OUTPUT_LIMIT, "stream": stream}).encode()


def test_requests_with_any_characters_reach_the_guest(sb):
    assert sb.eval("'\\u00e9\\u2028' + \"\\U0001F600\" + '\\\\' + '\"'") == "\u00e9\u2028\U0001F600\\\""
    r = sb.run("print('caf\u00e9 \U0001F600', end='')")
    assert (r.stdout, r.error) == ("caf\u00e9 \U0001F600", None)


def test_restores_in_two_threads_at_once_stay_exact():
    """Two sandboxes restored and run from two threads (the restore ioctls release the GIL):
    every answer is right and nothing one run did survives its restore."""
    boxes = [whpfast.PythonSandbox(memory_size=64 << 20, setup="state = []") for _ in range(2)]
    errors = []

    def work(box, tag):
        try:
            for i in range(150):
                r = box.run(f"state.append({i}); import sys; print(len(state), {tag!r})")
                assert (r.stdout, r.error) == (f"1 {tag}\n", None), r
        except BaseException as e:
            errors.append(e)

    try:
        threads = [threading.Thread(target=work, args=(b, t)) for b, t in zip(boxes, "ab")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
    finally:
        for b in boxes:
            b.close()


def test_answers_on_both_sides_of_the_first_read(sb):
    """_read_answer takes a small answer with its header in one read, a larger one in two: the
    lengths around that boundary all come back whole."""
    overhead = len(json.dumps({"stdout": "", "stderr": "", "error": None, "value": "", "display": []}))
    first = py_sandbox.FIRST_READ - py_sandbox.HEADER.size - overhead
    for n in list(range(first - 3, first + 4)) + [0, 100_000]:
        assert sb.eval(f"'x' * {n}") == "x" * n


# the guest replaces [vvar] with its own memory (test_python_sandbox.REPLACE_VVAR), then says so
UNMAP_VVAR = "import time\n" + REPLACE_VVAR + "print(ctypes.string_at(ADDR, 4) == b'ZZZZ')\n"


def test_a_vvar_replaced_during_a_run_is_back_and_fresh_after_the_restore(sb):
    """The data area's place is remembered per captured mapping state: a run that unmaps it and
    maps its own memory there changes the mappings, the restore puts the snapshot's back, and
    the refresh after it finds the data area and writes it (not the run's memory)."""
    lx = sb.linux
    for _ in range(2):
        r = sb.run(UNMAP_VVAR)
        assert (r.stdout, r.error) == ("True\n", None)
        assert lx._vvar() is None                       # the run's mappings: no [vvar]
        before = vdso.host_clocks()
        lx.restore(sb.snapshot)
        after = vdso.host_clocks()
        assert lx._vvar() is not None
        _, (seq, mode, tsc_base, mult, shift, coarse, real, mono, raw_ns, boot) = _data_area(lx)
        off = lx._clock_offsets[0]
        assert seq % 2 == 0 and before.monotonic_ns - off <= mono <= after.monotonic_ns - off
        assert before.tsc <= tsc_base <= after.tsc
        assert abs(sb.eval("time.time()", fresh=False) - time.time()) < 0.5


def test_host_writes_are_marked_and_undone_by_the_next_restore(sb):
    """A host write into guest memory (what a system call's answer does) marks its pages in C:
    the bit, and its word in the list the restore reads; the restore then puts the snapshot's
    bytes back. Once within one page, once across two pages of one bitmap word, once across
    two words."""
    lx = sb.linux
    warm = testing.warm(lx)
    stack = next(v for v in lx.mm.vmas if v.name == b"[stack]")
    image = sb.snapshot._image_view
    word_start = -(-stack.start // (64 * 4096)) * 64 * 4096     # a bitmap word's first page
    spots = [(stack.start + 100, 16), (stack.start + 4096 - 8, 16)]
    if stack.start < word_start - 4096 and word_start + 4096 <= stack.end:
        spots.append((word_start - 8, 16))
    for addr, n in spots:
        lx.restore(sb.snapshot)
        pages = range(addr // 4096, (addr + n - 1) // 4096 + 1)
        assert not any(int(warm._host[p >> 6]) >> (p & 63) & 1 for p in pages)
        lx.mm.write(addr, b"\xab" * n)
        for page in pages:
            assert int(warm._host[page >> 6]) >> (page & 63) & 1
            assert page >> 6 in warm._host_words
        assert lx.mm.read(addr, n) == b"\xab" * n
        lx.restore(sb.snapshot)
        assert lx.mm.read(addr, n) == bytes(image[addr:addr + n]) != b"\xab" * n
        assert lx.last_restore["host_pages"] >= 1
