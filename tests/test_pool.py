"""whpfast.Pool on real guests: one PythonSandbox booted per module (setup="import json") and
saved, SDK pools from whpfast.guests.testkit. Answers equal a plain sandbox's; requests are
isolated; threads overlap; asyncio requests do not block the loop; backpressure; a sandbox that
times out, faults or is cancelled is replaced and the pool keeps its size; close waits or
cancels; the statistics fill; bad snapshots and kinds are typed errors."""

import asyncio
import gc
import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest

import whpfast
from whpfast.timing import private_bytes

pytestmark = [pytest.mark.hypervisor]     # either backend (KVM, or WHP over tests/whv)

# A guest loop that runs for `seconds` of the host's monotonic clock (the guest's vDSO clock is
# the host's) and prints its own start and end: intervals measured inside the guests.
SPIN = ("import time\nt0 = time.monotonic()\nwhile time.monotonic() - t0 < {seconds}: pass\n"
        "print(t0, time.monotonic())")


def _span(result):
    assert result.error is None, result.error
    start, end = map(float, result.stdout.split())
    return start, end


@pytest.fixture(scope="module")
def sdk_snapshot(tmp_path_factory):
    with whpfast.Sandbox(whpfast.guests.testkit, memory_size=16 << 20) as sb:
        sb.call("touch", 0, 2, 7)           # the snapshot's own state: pages 0-1 hold 7
        snap = sb.snapshot()
    path = tmp_path_factory.mktemp("pool") / "sdk.snap"
    snap.save(path)
    return snap, str(path)


def _wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


# -- answers and isolation --------------------------------------------------------------------

def test_python_pool_answers_like_a_plain_sandbox(py_box, py_snap):
    code = 'import json\nprint(json.dumps({"a": [1, 2]}))\nprint("err", file=__import__("sys").stderr)'
    want = py_box.run(code)
    for source in (py_snap, py_box, py_box.snapshot):
        with whpfast.Pool(source, size=2) as pool:
            assert pool.kind == "python" and pool.size == 2
            assert pool.run(code) == want
            assert pool.run('print("hello world")') == whpfast.PythonResult("hello world\n", "", None)
            assert pool.eval("sorted({'b': 1, 'a': 2}.items())") == py_box.eval("sorted({'b': 1, 'a': 2}.items())")
            raised = pool.run("raise ValueError('no')")            # the guest's error, not the pool's
            assert "ValueError: no" in raised.error
            with pytest.raises(whpfast.GuestPythonError, match="ZeroDivisionError"):
                pool.eval("1 / 0")
            st = pool.stats()
            assert (st.served, st.failed, st.replaced) == (5, 1, 0)


def test_sdk_pool_answers_like_a_plain_sandbox(sdk_snapshot):
    snap, path = sdk_snapshot
    with whpfast.Sandbox.from_snapshot(snap) as plain:
        want = [plain.call("add", 2, 3), plain.call("echo", b"\x00ab"), plain.call("read_byte", 1)]
    for source in (snap, path):
        with whpfast.Pool(source, size=2) as pool:
            assert pool.kind == "sdk"
            assert [pool.call("add", 2, 3), pool.call("echo", b"\x00ab"), pool.call("read_byte", 1)] == want
            with pytest.raises(whpfast.GuestCallError, match="no function"):
                pool.call("nope")
            with pytest.raises(TypeError):
                pool.call("add", "2", 3)
            assert pool.stats().replaced == 0


def test_each_request_starts_from_the_snapshot(py_snap, sdk_snapshot):
    # A pool of one: the same sandbox serves both requests, and the second sees nothing of the first.
    with whpfast.Pool(py_snap, size=1) as pool:
        assert pool.run("x = 42\nopen('/tmp/left', 'w').write('a')\nimport json\njson.secret = 1").error is None
        assert pool.eval("['x' in globals(), __import__('os').path.exists('/tmp/left'), "
                         "hasattr(__import__('json'), 'secret')]") == [False, False, False]
    snap, _ = sdk_snapshot
    with whpfast.Pool(snap, size=1) as pool:
        assert pool.call("touch", 0, 64, 9) == 64
        assert [pool.call("read_byte", p) for p in (0, 1, 2, 63)] == [7, 7, 0, 0]


# -- concurrency ------------------------------------------------------------------------------

def test_two_threads_keep_two_sandboxes_busy_at_once(py_snap):
    # Each guest spins 0.3 s by the clock and reports when it ran. Were the GIL held during a
    # guest run, the second guest could not start before the first ended: the intervals overlap
    # only because both guests ran at the same time (timings are not compared: shared machine).
    with whpfast.Pool(py_snap, size=2) as pool:
        _two_guests_run_at_once(pool)


def _two_guests_run_at_once(pool):
    spans = [None, None]

    def client(i):
        spans[i] = _span(pool.run(SPIN.format(seconds=0.3), timeout=30))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (s0, e0), (s1, e1) = spans
    assert e0 - s0 >= 0.3 and e1 - s1 >= 0.3
    overlap = min(e0, e1) - max(s0, s1)
    assert overlap > 0.1, f"the two guests did not run at the same time: {spans}"


def test_asyncio_gather_and_the_loop_keeps_running(py_snap):
    async def main(pool):
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        tick = asyncio.ensure_future(ticker())
        spin = asyncio.ensure_future(pool.arun(SPIN.format(seconds=0.3), timeout=30))
        values = await asyncio.gather(*(pool.aeval(f"{i} * 3") for i in range(24)))
        await spin
        stop.set()
        await tick
        return values, ticks

    with whpfast.Pool(py_snap, size=2, max_queue=32) as pool:      # 25 requests at once
        values, ticks = asyncio.run(main(pool))
        assert values == [i * 3 for i in range(24)]
        assert ticks >= 10, f"the event loop was blocked while a guest ran ({ticks} ticks in >= 0.3 s)"
        st = pool.stats()
        assert st.served == 25 and st.in_use == 0 and st.queued == 0


def test_backpressure_pool_full(py_snap):
    with whpfast.Pool(py_snap, size=1, max_queue=1) as pool:
        results = []
        first = threading.Thread(target=lambda: results.append(pool.run("import time; time.sleep(0.6)")))
        first.start()
        _wait_until(lambda: pool.in_use == 1)
        second = threading.Thread(target=lambda: results.append(pool.eval("2 + 2")))
        second.start()
        _wait_until(lambda: pool.queued == 1)
        t0 = time.monotonic()
        with pytest.raises(whpfast.PoolFull, match="max_queue=1"):
            pool.run("pass")                                 # at once: the queue is full
        with pytest.raises(whpfast.PoolFull, match="queue_timeout=0.05"):
            pool.run("pass", queue_timeout=0.05)             # waited 0.05 s for a sandbox
        assert time.monotonic() - t0 < 0.5                   # both before the first run ended
        with pytest.raises(whpfast.PoolFull):
            asyncio.run(pool.aeval("1"))                     # asyncio requests alike
        first.join()
        second.join()
        assert results[0].error is None and results[1] == 4
        assert pool.run("pass", queue_timeout=5).error is None
        st = pool.stats()
        assert (st.rejected, st.served, st.failed) == (3, 3, 0)
        with pytest.raises(ValueError):
            pool.run("pass", queue_timeout=-1)


# -- health ----------------------------------------------------------------------------------

def test_a_timeout_replaces_the_sandbox_and_the_pool_keeps_its_size(py_snap):
    with whpfast.Pool(py_snap, size=2) as pool:
        with pytest.raises(whpfast.GuestTimeout):
            pool.run("while True: pass", timeout=0.2)
        st = pool.stats()
        assert (st.size, st.in_use, st.replaced, st.failed) == (2, 0, 1, 1)
        # Both sandboxes answer: two requests at once (one spins, so the other gets the second).
        with pytest.raises(whpfast.GuestTimeout):
            pool.run("while True: pass", timeout=0.2)
        spans = asyncio.run(_two_at_once(pool))
        assert all(e - s >= 0.1 for s, e in spans)
        assert pool.stats().replaced == 2 and pool.stats().size == 2


def test_a_guest_that_exits_or_floods_memory_does_not_break_the_pool(py_snap):
    with whpfast.Pool(py_snap, size=1) as pool:
        exited = pool.run("import os\nos._exit(3)")
        assert "exited with status 3" in exited.error
        hungry = pool.run("x = bytearray(2 << 30)")               # past memory_size: MemoryError
        assert "MemoryError" in hungry.error
        assert pool.eval("1 + 1") == 2
        st = pool.stats()
        assert (st.served, st.failed, st.replaced) == (3, 0, 0)    # the guest's own errors


async def _two_at_once(pool):
    results = await asyncio.gather(*(pool.arun(SPIN.format(seconds=0.1), timeout=30) for _ in range(2)))
    return [_span(r) for r in results]


def test_faults_and_timeouts_replace_sdk_sandboxes(sdk_snapshot):
    snap, path = sdk_snapshot
    kinds = ("pagefault", "divide", "invalid_opcode")
    with whpfast.Pool(path, size=1) as pool:
        for kind in kinds:
            with pytest.raises(whpfast.GuestFault):
                pool.call("fault", kind)
        with pytest.raises(whpfast.GuestTimeout):
            pool.call("spin", timeout=0.1)
        assert pool.call("read_byte", 0) == 7 and pool.call("add", 1, 2) == 3
        st = pool.stats()
        n = len(kinds) + 1
        assert (st.size, st.replaced, st.failed, st.served) == (1, n, n, n + 2)
    with whpfast.Pool(snap, size=1, timeout=0.1) as pool:        # the pool's default timeout
        with pytest.raises(whpfast.GuestTimeout):
            pool.call("spin")
        assert pool.call("add", 1, 2) == 3 and pool.stats().replaced == 1


def test_a_cancelled_task_cancels_its_guest_and_leaks_nothing(py_snap, caplog):
    async def main(pool):
        task = asyncio.ensure_future(pool.arun("while True: pass"))   # no timeout: only cancel stops it
        while pool.in_use == 0:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await pool.aeval("6 * 7")

    with whpfast.Pool(py_snap, size=1) as pool:
        assert asyncio.run(asyncio.wait_for(main(pool), 30)) == 42
        st = pool.stats()
        assert (st.replaced, st.in_use, st.size) == (1, 0, 1)
    gc.collect()        # the abandoned request's future is freed: its GuestCancelled was retrieved
    assert "never retrieved" not in caplog.text, caplog.text


def test_a_late_cancel_does_not_reach_the_next_request(sdk_snapshot):
    # A task abandoned while its call runs keeps cancelling its guest until its request is
    # over; the request that gets the sandbox next must not be hit by those cancels.
    async def main(pool):
        task = asyncio.ensure_future(pool.acall("compute", 30_000_000))
        while pool.in_use == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return [await pool.acall("compute", 3_000_000) for _ in range(20)]

    with whpfast.Pool(sdk_snapshot[0], size=1) as pool:
        want = pool.call("compute", 3_000_000)
        assert asyncio.run(asyncio.wait_for(main(pool), 60)) == [want] * 20
        assert pool.stats().failed <= 1


# -- closing ---------------------------------------------------------------------------------

def test_close_waits_for_running_requests_and_refuses_new_ones(py_snap):
    pool = whpfast.Pool(py_snap, size=1, max_queue=2)
    out = {}

    def running():
        out["first"] = _span(pool.run(SPIN.format(seconds=0.3), timeout=30))

    def queued():
        try:
            pool.eval("1")
        except whpfast.WhpfastError as e:
            out["queued"] = e

    threads = [threading.Thread(target=running), threading.Thread(target=queued)]
    threads[0].start()
    _wait_until(lambda: pool.in_use == 1)
    threads[1].start()
    _wait_until(lambda: pool.queued == 1)
    pool.close()
    closed_at = time.monotonic()
    for t in threads:
        t.join()
    assert out["first"][1] <= closed_at                       # close() waited for the running one
    assert isinstance(out["queued"], whpfast.SandboxClosed)   # the queued one was refused
    with pytest.raises(whpfast.SandboxClosed):
        pool.run("pass")
    with pytest.raises(whpfast.SandboxClosed):
        asyncio.run(pool.aeval("1"))
    pool.close()                                              # idempotent
    assert pool.closed and pool.stats().in_use == 0


def test_close_cancel_stops_running_guests(sdk_snapshot, py_snap):
    for source, request in ((sdk_snapshot[1], lambda p: p.call("spin")),
                            (py_snap, lambda p: p.run("while True: pass"))):
        pool = whpfast.Pool(source, size=2)
        errors = []

        def client():
            try:
                request(pool)
            except whpfast.WhpfastError as e:
                errors.append(e)

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        _wait_until(lambda: pool.in_use == 2)
        time.sleep(0.05)
        closer = threading.Thread(target=pool.close, kwargs={"cancel": True})   # from another thread
        closer.start()
        closer.join(20)
        assert not closer.is_alive()
        for t in threads:
            t.join(20)
        assert len(errors) == 2
        assert all(isinstance(e, (whpfast.GuestCancelled, whpfast.SandboxClosed)) for e in errors), errors
        pool.close()


def test_close_from_inside_a_request(sdk_snapshot):
    # on_output runs inside the request: close() from there cannot wait for that request; the
    # request ends normally and its sandbox is closed as it comes back.
    def output(stream, text):
        pool.close()

    pool = whpfast.Pool(sdk_snapshot[0], size=1, on_output=output)
    assert pool.call("hello") == "hello world"
    assert pool.closed and pool.stats().in_use == 0
    with pytest.raises(whpfast.SandboxClosed):
        pool.call("add", 1, 2)
    pool.close()


def test_many_threads_and_tasks_at_once(sdk_snapshot):
    # Threads and asyncio tasks mixing quick calls, timeouts (replacements), queue timeouts and
    # cancelled tasks on a small pool: every outcome is one of the documented ones, the counts
    # add up, and afterwards nothing is in use or queued and both sandboxes answer.
    allowed = (whpfast.PoolFull, whpfast.GuestTimeout)
    outcomes = []
    lock = threading.Lock()

    def note(what):
        with lock:
            outcomes.append(what)

    def client(seed):
        for i in range(25):
            try:
                if (seed + i) % 7 == 0:
                    pool.call("spin", timeout=0.01, queue_timeout=5)
                else:
                    qt = (None, 0, 0.01, 1)[(seed * 3 + i) % 4]
                    assert pool.call("add", seed, i, queue_timeout=qt) == seed + i
                note("ok")
            except allowed as e:
                note(type(e).__name__)

    async def tasks():
        async def one(i):
            try:
                return await pool.acall("compute", 5_000_000 + i, queue_timeout=5)
            except whpfast.PoolFull:
                return None
        pending = [asyncio.ensure_future(one(i)) for i in range(20)]
        await asyncio.sleep(0.02)
        for t in pending[::3]:
            t.cancel()
        return await asyncio.gather(*pending, return_exceptions=True)

    with whpfast.Pool(sdk_snapshot[0], size=2, max_queue=3) as pool:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        results = asyncio.run(asyncio.wait_for(tasks(), 60))
        for t in threads:
            t.join(60)
        assert len(outcomes) == 150
        assert all(r is None or isinstance(r, (int, asyncio.CancelledError)) for r in results), results
        st = pool.stats()
        assert (st.in_use, st.queued, st.size) == (0, 0, 2)
        assert st.rejected == outcomes.count("PoolFull") + results.count(None)
        assert outcomes.count("GuestTimeout") == 21                # (seed + i) % 7 == 0
        assert st.replaced >= 21
        assert asyncio.run(_adds(pool)) == [2, 4]


async def _adds(pool):
    return await asyncio.gather(pool.acall("add", 1, 1), pool.acall("add", 2, 2))


def test_an_unclosed_pool_warns_and_is_freed(sdk_snapshot):
    pool = whpfast.Pool(sdk_snapshot[0], size=1)
    with pytest.warns(ResourceWarning, match="unclosed"):
        del pool
        gc.collect()


# -- statistics and output -------------------------------------------------------------------

def test_timeouts(sdk_snapshot):
    with whpfast.Pool(sdk_snapshot[0], size=1, timeout=math.inf) as pool:    # inf: none
        assert pool.call("add", 1, 1, timeout=math.inf) == 2
        for bad in (0, -1):
            with pytest.raises(ValueError, match="timeout"):
                pool.call("add", 1, 1, timeout=bad)
        for bad in ("1", True):
            with pytest.raises(TypeError, match="timeout"):
                pool.call("add", 1, 1, timeout=bad)
    with pytest.raises(ValueError, match="timeout"):
        whpfast.Pool(sdk_snapshot[0], size=1, timeout=-1)


def test_stats_arrays_fill(sdk_snapshot):
    with whpfast.Pool(sdk_snapshot[0], size=2) as pool:
        empty = pool.stats()
        assert len(empty.run_time) == 0 and empty.median() != empty.median()     # nan
        for i in range(30):
            assert pool.call("add", i, i) == 2 * i
        st = pool.stats()
        assert st.served == 30 and st.queue_wait.shape == st.run_time.shape == (30,)
        assert st.queue_wait.dtype.kind == "f" and (st.run_time > 0).all() and (st.queue_wait >= 0).all()
        assert 0 < st.median() <= st.p99() <= st.run_time.max()
        assert st.median("queue_wait") <= st.p99("queue_wait")
        assert st.median(st.run_time) == st.median()


def test_on_output(sdk_snapshot, py_snap):
    seen = []
    with whpfast.Pool(sdk_snapshot[0], size=1, on_output=lambda s, t: seen.append((s, t))) as pool:
        assert pool.call("hello") == "hello world"
    assert "".join(t for _, t in seen) == "hello world\n" and {s for s, _ in seen} == {"stdout"}
    seen.clear()
    with whpfast.Pool(py_snap, size=1, on_output=lambda s, t: seen.append((s, t))) as pool:
        pool.run("print('out'); import sys; print('err', file=sys.stderr)")
        pool.run("pass")
    assert seen == [("stdout", "out\n"), ("stderr", "err\n")]


# -- shared pages ----------------------------------------------------------------------------

@pytest.mark.skipif(whpfast.backend.NAME != "kvm", reason="KVM only: the WHP backend copies a snapshot "
                    "file's image into each sandbox (no copy-on-write file mapping there)")
def test_sandboxes_from_one_file_share_its_pages(py_box, py_snap):
    # From a path every sandbox maps the one loaded file copy-on-write; from the in-memory
    # snapshot, its image (a memfd, core/image.py) the same way. The private memory a pool of 3
    # adds beside a pool of 1 (which loaded the file) is far below the image either way.
    image = py_box.snapshot.nonzero_pages * 4096

    def per_sandbox(source):
        gc.collect()
        with whpfast.Pool(source, size=1):
            before = private_bytes()
            with whpfast.Pool(source, size=3):
                return (private_bytes() - before) / 3

    shared, from_memory = per_sandbox(py_snap), per_sandbox(py_box.snapshot)
    assert image > 8 << 20, image
    assert shared < image / 4 and from_memory < image / 4, (shared, from_memory, image)


# -- bad input -------------------------------------------------------------------------------

def test_bad_snapshots_and_kinds(tmp_path, sdk_snapshot, py_snap):
    gc.collect()                        # earlier tests' snapshots let go of their files first
    fds = len(os.listdir("/proc/self/fd"))
    garbage = tmp_path / "garbage.snap"
    garbage.write_bytes(b"not a snapshot" * 100)
    truncated = tmp_path / "truncated.snap"
    truncated.write_bytes(open(py_snap, "rb").read(4096))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad, match in ((tmp_path / "missing.snap", "cannot open"), (garbage, "not a whpfast snapshot"),
                       (tmp_path, "not a regular file"), (fifo, "not a regular file"),
                       (truncated, "truncated")):
        with pytest.raises(whpfast.SnapshotError, match=match):
            whpfast.Pool(bad, size=2)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= fds          # nothing leaked
    with pytest.raises(whpfast.ConfigError, match="kind='python'.*SDK") as e:
        whpfast.Pool(sdk_snapshot[1], kind="python", size=1)
    assert isinstance(e.value, TypeError)
    with pytest.raises(whpfast.ConfigError, match="kind"):
        whpfast.Pool(py_snap, kind="java", size=1)
    for size in (0, -1, True, 1.5):
        with pytest.raises(whpfast.ConfigError, match="size"):
            whpfast.Pool(py_snap, size=size)
    with pytest.raises(TypeError, match="sb.snapshot"):
        with whpfast.Sandbox(whpfast.guests.testkit) as sb:
            whpfast.Pool(sb)
    with whpfast.Pool(sdk_snapshot[1], size=1) as sdk, whpfast.Pool(py_snap, size=1, kind="python") as py:
        with pytest.raises(TypeError, match="call"):
            sdk.run("pass")
        with pytest.raises(whpfast.ConfigError, match="call"):
            asyncio.run(sdk.aeval("1"))
        with pytest.raises(TypeError, match="run"):
            py.call("add", 1, 2)
        with pytest.raises(ValueError, match="timeout"):
            py.run("pass", timeout=0)
        with pytest.raises(TypeError, match="str"):
            py.run(b"print(1)")
        assert sdk.stats().served == py.stats().served == 0


def test_bench_smoke(tmp_path):
    """bench/bench_pool.py --quick: every configuration measured, answers checked, JSON and npz
    written (the figures themselves are not judged here: shared machine)."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "bench_pool.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "bench_pool.json").read_text())
    assert set(result["throughput_per_s_median"]) == {
        "pool1_clients1", "pool1_clients2", "pool2_clients1", "pool2_clients2", "pool2_clients4",
        "plain_clients1", "compute_pool1_clients1", "compute_pool2_clients2", "processes2_pool1",
        "sdk_pool1_clients1", "sdk_pool2_clients2", "proc_pool1_clients1", "proc_pool2_clients2",
        "sdk_proc_pool1_clients1", "sdk_proc_pool2_clients2"}
    assert 0 < result["hello_gil_free_share"] < 1
    assert all(v > 0 for v in result["throughput_per_s_median"].values())
    assert result["latency"]["queue_wait_pool2_clients4"]["p99_us"] > 0
    import numpy as np
    with np.load(tmp_path / "bench_pool.npz") as samples:
        assert len(samples["run_time_pool2_clients2"]) == 100


def test_replaced_sandboxes_give_their_mapping_reservation_back(py_snap):
    """The soak found it (bench/soak_pool.py): a pool replacing sandboxes (faults, timeouts) kept
    each old one's share of the process's mapping budget until garbage collection, and after
    ~90 replacements could make no sandbox at all (MappingBudgetError for every request)."""
    from whpfast.core import mapbudget
    gc.disable()                         # as when cycles are collected late
    try:
        with whpfast.Pool(py_snap, size=1) as pool:
            held = mapbudget.reserved()
            for _ in range(3):
                with pytest.raises(whpfast.GuestTimeout):
                    pool.run("while True: pass", timeout=0.2)
            assert pool.stats().replaced == 3 and mapbudget.reserved() == held
            assert pool.run("print(1)").stdout == "1\n"
        assert mapbudget.reserved() == held - mapbudget.sandbox_peak(pool.snapshot)
    finally:
        gc.enable()


# -- workers="process" (issue 21 goal 3): each sandbox in a worker process of its own ----------

def test_process_workers_answer_like_threads_and_run_at_once(py_box, py_snap, sdk_snapshot):
    """A process-backed pool gives the same answers, errors and replacements as the thread-backed
    one; its sandboxes live in worker processes (none in this one), run at the same time, and a
    snapshot object is saved once into a private directory that close() removes."""
    with whpfast.Pool(py_box, size=2, workers="process") as pool:
        scratch = pool._scratch
        assert scratch and os.stat(scratch).st_mode & 0o077 == 0
        assert pool.run("print(json.dumps([1]))").stdout == "[1]\n"
        assert pool.eval("json.dumps({'a': 1})") == '{"a": 1}'
        assert pool.run("1/0").error.type == "ZeroDivisionError"
        with pytest.raises(whpfast.GuestPythonError, match="NameError"):
            pool.eval("nope")
        with pytest.raises(whpfast.GuestTimeout):
            pool.run("while True: pass", timeout=0.3)
        assert pool.run("print('after')").stdout == "after\n" and pool.stats().replaced == 1
        _two_guests_run_at_once(pool)
        pids = {slot.sandbox._proc.pid for slot in pool._free}
        assert len(pids) == 2 and os.getpid() not in pids
    assert not os.path.exists(scratch)
    _, path = sdk_snapshot
    with whpfast.Pool(path, size=1, workers="process") as pool:
        assert pool.call("add", 2, 3) == 5
        assert pool.call("touch", 0, 64, 9) == 64
        assert [pool.call("read_byte", p) for p in (0, 1, 2)] == [7, 7, 0]   # restored each time
    with pytest.raises(whpfast.ConfigError, match="workers"):
        whpfast.Pool(py_snap, size=1, workers="fork")


def test_process_workers_cancel_and_grant(py_snap, tmp_path):
    """A cancelled asyncio request cancels the guest in its worker; a file is loaded in the
    worker under the caller's grant only (a widened file is refused there, as here)."""
    async def main(pool):
        task = asyncio.ensure_future(pool.arun(SPIN.format(seconds=30), timeout=60))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await pool.arun("print('next')")
    with whpfast.Pool(py_snap, size=1, workers="process") as pool:
        t0 = time.monotonic()
        assert asyncio.run(main(pool)).stdout == "next\n"
        assert time.monotonic() - t0 < 20
    from test_linux_process import _rewrite_meta
    evil = tmp_path / "evil.snap"
    evil.write_bytes(open(py_snap, "rb").read())
    _rewrite_meta(evil, lambda meta: meta["config"]["read"].update({"/etc": "/etc"}))
    with pytest.raises(whpfast.SnapshotError, match="'/etc'"):
        whpfast.Pool(evil, size=1, workers="process")


def test_a_python_pool_grants_a_larger_tmp_when_asked(tmp_path):
    """A snapshot declaring a /tmp above the default 64 MiB is refused unless the pool's caller
    grants it (tmp_size=), in either worker mode; a snapshot object grants what it declares."""
    with whpfast.PythonSandbox(tmp_size=128 << 20, memory_size=256 << 20) as sb:
        path = sb.save(tmp_path / "big-tmp.snap")
        for workers in ("thread", "process"):
            with pytest.raises(whpfast.SnapshotError, match="/tmp of 128 MiB"):
                whpfast.Pool(path, size=1, workers=workers)
            with whpfast.Pool(path, size=1, workers=workers, tmp_size=128 << 20) as pool:
                assert pool.run("print(1)").stdout == "1\n"
            with whpfast.Pool(sb, size=1, workers=workers) as pool:
                assert pool.run("print(2)").stdout == "2\n"
    with pytest.raises(whpfast.ConfigError, match="tmp_size"):
        whpfast.Pool(whpfast.Snapshot.__new__(whpfast.Snapshot), size=1, tmp_size=1 << 20)
