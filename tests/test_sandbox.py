"""The Sandbox on the real hypervisor with the shipped testkit guest: every testkit function, every
exception, faults, timeouts, cancellation, threads, and resource hygiene."""

import gc
import os
import sys
import threading
import time
import warnings

import pytest

import whpfast
from whpfast import (GuestAbort, GuestCallError, GuestCancelled, GuestFault, GuestTimeout,
                     HostFunctionError, SandboxClosed, SandboxPoisoned, WhpfastError)

pytestmark = pytest.mark.hypervisor
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only: /proc, POSIX signals")


def test_issue_example(testkit, capsys):
    with whpfast.Sandbox(testkit, memory_size=16 << 20) as sb:
        sb.register("host_double", lambda x: 2 * x)
        assert sb.call("add", 2, 3) == 5
        assert sb.call("echo", b"\x00abc") == b"\x00abc"
        assert sb.call("hello") == "hello world"
        assert sb.call("call_host", "host_double", 21) == 42
    assert capsys.readouterr().out == "hello world\n"


def test_hypervisor_name():
    # "whp" when the suite runs on the WHP backend over the KVM-backed WHv* layer (tests/whv)
    assert whpfast.hypervisor() == os.environ.get("WHPFAST_BACKEND", "kvm")


def test_add_and_int_range(sandbox):
    assert sandbox.call("add", -7, 3) == -4
    assert sandbox.call("add", 2**62, 2**62 - 1) == 2**63 - 1
    assert sandbox.call("add", -(2**63), 0) == -(2**63)
    # int64 wraps in the guest, like C
    assert sandbox.call("add", 2**63 - 1, 1) == -(2**63)


@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x00abc", bytes(range(256)) * 17, b"x" * 60000])
def test_echo(sandbox, payload):
    assert sandbox.call("echo", payload) == payload


def test_echo_accepts_buffers(sandbox):
    assert sandbox.call("echo", bytearray(b"ab")) == b"ab"
    assert sandbox.call("echo", memoryview(b"xyz")) == b"xyz"


def test_all_value_types(sandbox):
    assert sandbox.call("echo_str", "héllo wörld ✓") == "héllo wörld ✓"
    assert sandbox.call("echo_str", "") == ""
    assert sandbox.call("add_float", 1.5, 2.25) == 3.75
    assert sandbox.call("add_float", 1, 2) == 3.0          # ints are accepted for floats
    assert sandbox.call("negate", True) is False
    assert sandbox.call("negate", False) is True
    assert sandbox.call("none") is None
    described = sandbox.call("types", 5, 2.5, b"abc", "abc", True)
    assert described == "i=5 f=2.5 b=3 s=abc t=1", described


def test_hello_prints_through_host(testkit):
    printed = []
    with whpfast.Sandbox(testkit, on_print=printed.append) as sb:
        assert sb.call("hello") == "hello world"
    assert "".join(printed) == "hello world\n"


def test_print_is_chunked(testkit):
    printed = []
    with whpfast.Sandbox(testkit, on_print=printed.append) as sb:
        assert sb.call("print_big", 200000) == 200000
    assert "".join(printed) == "x" * 200000
    assert len(printed) > 1


def test_heap_functions(sandbox):
    pages = sandbox.call("heap_pages")
    assert pages > 1000                      # 16 MiB sandbox: most of it is heap
    assert sandbox.call("checksum") == 0
    assert sandbox.call("touch", 0, 4, 7) == 4
    assert [sandbox.call("read_byte", p) for p in range(5)] == [7, 7, 7, 7, 0]
    assert sandbox.call("touch", pages - 1, 1, 255) == 1
    assert sandbox.call("read_byte", pages - 1) == 255
    assert sandbox.call("checksum") == 4 * 7 + 255
    with pytest.raises(GuestCallError, match="touch"):
        sandbox.call("touch", pages - 1, 2, 1)
    with pytest.raises(GuestCallError):
        sandbox.call("read_byte", pages)
    # an error result does not poison
    assert sandbox.call("add", 1, 1) == 2


def test_compute_matches_host_loop(sandbox):
    # compute(n) is the same C loop the benchmark compiles for the host; n=0 and a known value.
    a = sandbox.call("compute", 1000)
    assert a == sandbox.call("compute", 1000)
    assert a != sandbox.call("compute", 1001)
    assert isinstance(sandbox.call("compute", 10**7), int)


def test_allocator(sandbox):
    assert sandbox.call("alloc_test", 200) == sandbox.call("alloc_test", 200)


def test_file_mapping(testkit, data_file):
    data = data_file.read_bytes()
    with whpfast.Sandbox(testkit, files={"initrd": data_file}) as sb:
        for offset in (0, 1, 4095, 4096, len(data) - 1):
            assert sb.call("file_byte", "initrd", offset) == data[offset]
        with pytest.raises(GuestCallError, match="initrd|offset|range"):
            sb.call("file_byte", "initrd", len(data))
        with pytest.raises(GuestCallError):
            sb.call("file_byte", "nope", 0)


def test_write_to_readonly_file_faults(testkit, data_file):
    before = data_file.read_bytes()
    with whpfast.Sandbox(testkit, files={"initrd": data_file}) as sb:
        with pytest.raises(GuestFault) as info:
            sb.call("fault", "write_readonly_file")
        assert info.value.vector == 14
        assert info.value.error_code & 0x2          # a write
        assert "initrd" in str(info.value)
        assert sb.poisoned
    assert data_file.read_bytes() == before


@pytest.mark.parametrize("kind, vector", [("pagefault", 14), ("divide", 0), ("invalid_opcode", 6)])
def test_faults(testkit, kind, vector):
    with whpfast.Sandbox(testkit) as sb, whpfast.Sandbox(testkit) as other:
        other.call("touch", 0, 1, 9)
        with pytest.raises(GuestFault) as info:
            sb.call("fault", kind)
        fault = info.value
        assert fault.vector == vector
        assert fault.kind == kind
        assert fault.rip >= 0x100000
        if kind == "pagefault":
            assert fault.address == 0x10
            assert "0x10" in str(fault)
        # poisoned until restored or closed
        with pytest.raises(SandboxPoisoned, match="poisoned"):
            sb.call("add", 1, 2)
        # the other sandbox and the process carry on
        assert other.call("read_byte", 0) == 9
        assert other.call("add", 1, 2) == 3
    with whpfast.Sandbox(testkit) as fresh:
        assert fresh.call("add", 1, 2) == 3


def test_unknown_fault_kind_is_an_error(sandbox):
    with pytest.raises(GuestCallError, match="kind"):
        sandbox.call("fault", "nonsense")
    assert sandbox.call("add", 1, 2) == 3


def test_timeout_on_spin(sandbox):
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout, match="spin"):
        sandbox.call("spin", timeout=0.2)
    elapsed = time.monotonic() - t0
    assert 0.2 <= elapsed < 5
    with pytest.raises(SandboxPoisoned):
        sandbox.call("add", 1, 2)


def test_timeout_not_hit_by_fast_call(sandbox):
    for _ in range(50):
        assert sandbox.call("add", 1, 2, timeout=5) == 3


def test_cancel_from_another_thread(sandbox):
    timer = threading.Timer(0.2, sandbox.cancel)
    timer.start()
    with pytest.raises(GuestCancelled):
        sandbox.call("spin")
    timer.join()
    assert sandbox.poisoned


def test_cancel_when_idle_does_nothing(sandbox):
    sandbox.cancel()
    assert sandbox.call("add", 1, 2) == 3


def test_wrong_arguments_raise_before_the_guest_runs(sandbox):
    sandbox.call("touch", 0, 1, 5)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        sandbox.call("add", 1)
    with pytest.raises(TypeError, match="takes 2"):
        sandbox.call("add", 1, 2, 3)
    with pytest.raises(TypeError, match="int"):
        sandbox.call("add", 1, "2")
    with pytest.raises(TypeError, match="bytes"):
        sandbox.call("echo", "not bytes")
    with pytest.raises(TypeError, match="bool"):
        sandbox.call("negate", 1)
    with pytest.raises(TypeError, match="float"):
        sandbox.call("add_float", "1", 2.0)
    with pytest.raises(OverflowError):
        sandbox.call("add", 2**63, 0)
    with pytest.raises(ValueError, match="io_buffer_size"):
        sandbox.call("echo", b"x" * (1 << 20))
    # nothing ran: the heap is as it was, and the sandbox is fine
    assert sandbox.call("read_byte", 0) == 5
    assert sandbox.poisoned is None


def test_unknown_function(sandbox):
    with pytest.raises(GuestCallError, match="no function 'nope'.*add"):
        sandbox.call("nope")
    assert sandbox.call("add", 1, 2) == 3


def test_exports_listing(sandbox):
    assert sandbox.exports["add"] == "ii->i"
    assert sandbox.exports["echo"] == "b->b"
    assert sandbox.exports["hello"] == "->s"


def test_host_function_decorators(sandbox):
    @sandbox.register("triple")
    def triple(x):
        return 3 * x

    @sandbox.register
    def negate_host(x):
        return -x

    assert sandbox.call("call_host", "triple", 5) == 15
    assert sandbox.call("call_host", "negate_host", 5) == -5


def test_host_function_exception_is_chained(sandbox):
    class Boom(Exception):
        pass

    def boom(x):
        raise Boom(f"no {x}")

    sandbox.register("boom", boom)
    with pytest.raises(HostFunctionError, match="Boom") as info:
        sandbox.call("call_host", "boom", 7)
    assert isinstance(info.value.__cause__, Boom)
    assert isinstance(info.value, WhpfastError)
    assert sandbox.poisoned is None
    assert sandbox.call("add", 1, 2) == 3


def test_missing_host_function(sandbox):
    with pytest.raises(GuestCallError, match="no host function named 'missing'"):
        sandbox.call("call_host", "missing", 1)


def test_host_function_bad_result(sandbox):
    sandbox.register("bad", lambda x: object())
    with pytest.raises(HostFunctionError, match="TypeError") as info:
        sandbox.call("call_host", "bad", 1)
    assert isinstance(info.value.__cause__, TypeError)
    sandbox.register("wrong_type", lambda x: "a string")
    with pytest.raises(GuestCallError):
        sandbox.call("call_host", "wrong_type", 1)


def test_close_is_idempotent_and_final(testkit):
    sb = whpfast.Sandbox(testkit)
    assert sb.call("add", 1, 1) == 2
    sb.close()
    sb.close()
    assert sb.closed
    with pytest.raises(SandboxClosed):
        sb.call("add", 1, 1)


@linux_only
def test_unclosed_sandbox_warns_and_is_freed(testkit):
    gc.collect()            # what earlier tests left in reference cycles (fds among it) goes first
    fds_before = len(os.listdir("/proc/self/fd"))
    sb = whpfast.Sandbox(testkit)
    sb.call("add", 1, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del sb
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_bad_construction_arguments(testkit, tmp_path):
    with pytest.raises(ValueError, match="memory_size"):
        whpfast.Sandbox(testkit, memory_size=12345)
    with pytest.raises(ValueError, match="too small"):
        whpfast.Sandbox(testkit, memory_size=1 << 20)
    with pytest.raises(FileNotFoundError):
        whpfast.Sandbox(testkit, files={"x": tmp_path / "missing"})
    with pytest.raises(whpfast.GuestLoadError):
        whpfast.Sandbox(tmp_path / "missing.elf")
    not_elf = tmp_path / "not.elf"
    not_elf.write_bytes(b"hello")
    with pytest.raises(whpfast.GuestLoadError, match="ELF"):
        whpfast.Sandbox(not_elf)


def test_large_sandbox(testkit):
    with whpfast.Sandbox(testkit, memory_size=1 << 30) as sb:
        pages = sb.call("heap_pages")
        assert pages > (1 << 30) // 4096 - 2000
        assert sb.call("touch", pages - 1, 1, 3) == 1
        assert sb.call("read_byte", pages - 1) == 3


def test_two_sandboxes_in_two_threads(testkit):
    errors = []
    results = {}

    def worker(tag):
        try:
            with whpfast.Sandbox(testkit) as sb:
                sb.call("touch", 0, 1, tag)
                total = 0
                for i in range(300):
                    total += sb.call("add", i, tag)
                    assert sb.call("read_byte", 0) == tag
                results[tag] = (total, sb.call("compute", 2_000_000))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (11, 22)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[11][0] == sum(range(300)) + 300 * 11
    assert results[22][0] == sum(range(300)) + 300 * 22
    assert results[11][1] == results[22][1]


def test_threads_run_in_parallel(testkit):
    """KVM_RUN releases the GIL: two long computations overlap in time."""
    with whpfast.Sandbox(testkit) as a, whpfast.Sandbox(testkit) as b:
        n = 200_000_000
        a.call("compute", 1000)
        t0 = time.perf_counter()
        a.call("compute", n)
        single = time.perf_counter() - t0
        spans = {}

        def run(sb, key):
            start = time.perf_counter()
            sb.call("compute", n)
            spans[key] = (start, time.perf_counter())

        threads = [threading.Thread(target=run, args=(sb, k)) for k, sb in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # the two runs overlap: each started before the other finished
        assert spans["a"][0] < spans["b"][1] and spans["b"][0] < spans["a"][1]
        assert single > 0


@linux_only
def test_1000_sandboxes_no_leak(testkit):
    import resource
    def usage():
        gc.collect()
        return len(os.listdir("/proc/self/fd")), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    for _ in range(50):                    # warm up allocator pools and caches
        with whpfast.Sandbox(testkit) as sb:
            sb.call("add", 1, 2)
    fds0, rss0 = usage()
    for i in range(1000):
        with whpfast.Sandbox(testkit) as sb:
            if i % 10 == 0:
                assert sb.call("add", i, 1) == i + 1
    fds1, rss1 = usage()
    assert fds1 == fds0
    assert rss1 - rss0 < 32 * 1024        # KiB: no growth proportional to 1000 sandboxes


@linux_only
def test_signal_during_call_does_not_poison(sandbox):
    """A signal whose Python handler returns normally lets the guest continue."""
    import signal
    hits = []
    old = signal.signal(signal.SIGALRM, lambda *a: hits.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert sandbox.call("compute", 300_000_000) == sandbox.call("compute", 300_000_000)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert hits
    assert sandbox.poisoned is None
