"""Per-interpreter environment and limits on PythonSandbox (issue 20 item 5): env, cwd, tmp_size,
memory_size, output_limit, a CPU-time limit per run and in total (GuestCpuLimit, counted as CPU
time, not wall time), the same limits through from_snapshot and fork, and arun/aeval. One
sandbox booted per module; each test warm-starts from it (from_snapshot of its snapshot costs
no boot)."""

import asyncio
import errno
import gc
import time

import pytest

import whpfast
from whpfast.errors import (ConfigError, GuestCancelled, GuestCpuLimit, GuestTimeout, SandboxError,
                            SnapshotError)
from whpfast.python import sandbox as pysandbox

pytestmark = [pytest.mark.hypervisor]     # either backend (KVM, or WHP over tests/whv)

TMP = 8 << 20
OUT = 1000
ENV = {"GREETING": "hello", "LANG": "C.UTF-8", "HOME": "/tmp/work"}


@pytest.fixture(scope="module")
def sb():
    with whpfast.PythonSandbox(setup="import os, sys, time", memory_size=128 << 20, env=ENV,
                               cwd="/tmp/work/project", tmp_size=TMP, output_limit=OUT,
                               cpu_time=0.3) as box:
        yield box


@pytest.fixture
def twin(sb):
    """A sandbox from sb's warm snapshot with the limits given (no boot)."""
    made = []

    def make(**limits):
        box = whpfast.PythonSandbox.from_snapshot(sb.snapshot, **limits)
        made.append(box)
        return box
    yield make
    for box in made:
        box.close()


# -- environment ---------------------------------------------------------------------------------

def test_env_is_set_over_the_defaults(sb):
    env = sb.eval("dict(os.environ)")
    assert env["GREETING"] == "hello" and env["HOME"] == "/tmp/work"
    assert env["PATH"] == pysandbox.ENV["PATH"] and env["MPLBACKEND"] == "Agg"


def test_env_is_checked():
    with pytest.raises(TypeError):
        pysandbox._env({"A": 1}, {})
    with pytest.raises(TypeError):
        pysandbox._env(["A=1"], {})
    for bad in ({"A=B": "1"}, {"": "1"}, {"A": "x\0y"}):
        with pytest.raises(ConfigError):
            pysandbox._env(bad, {})
    # what the interpreter's layout needs (a moved prefix's libpython) cannot be changed
    layout = {"LD_LIBRARY_PATH": "/opt/python/lib"}
    with pytest.raises(ConfigError, match="LD_LIBRARY_PATH"):
        pysandbox._env({"LD_LIBRARY_PATH": "/tmp"}, layout)
    assert pysandbox._env({"A": "1"}, layout)["LD_LIBRARY_PATH"] == "/opt/python/lib"


def test_cwd_is_made_in_tmp_and_relative_paths_start_there(sb):
    assert sb.eval("os.getcwd()") == "/tmp/work/project"
    r = sb.run("open('notes.txt', 'w').write('x')\nprint(os.path.abspath('notes.txt'))")
    assert r.stdout == "/tmp/work/project/notes.txt\n"


def test_cwd_is_checked():
    with pytest.raises(ConfigError):
        pysandbox._cwd("relative/dir")
    with pytest.raises(TypeError):
        pysandbox._cwd(3)
    assert pysandbox._cwd("/tmp/a/../b/") == "/tmp/b"


def test_a_cwd_outside_tmp_must_exist():
    with pytest.raises(ConfigError, match="/no/such/dir"):
        whpfast.PythonSandbox(memory_size=64 << 20, cwd="/no/such/dir")


# -- /tmp, memory, output ----------------------------------------------------------------------

def test_tmp_size_bounds_what_the_guest_writes(sb):
    r = sb.run("f = open('/tmp/big', 'wb')\n"
               "try:\n    while True: f.write(b'x' * 65536)\n"
               "except OSError as e:\n    print(e.errno, f.tell() <= %d)" % TMP)
    assert r.stdout == f"{errno.ENOSPC} True\n", r


def test_memory_size_bounds_the_heap(sb):
    r = sb.run("x = bytearray(200 << 20)")
    assert r.error is not None and r.error.type == "MemoryError"


def test_output_limit_caps_each_stream(sb):
    r = sb.run(f"print('x' * {OUT + 500}, end='')\nprint('y' * {OUT + 1}, file=sys.stderr)")
    assert r.stdout.startswith("x" * OUT) and not r.stdout.startswith("x" * (OUT + 1))
    assert "output truncated" in r.stdout and "output truncated" in r.stderr
    seen = []
    r = sb.run(f"print('z' * {OUT + 5}, end='')", on_output=lambda s, t: seen.append(t))
    assert "".join(seen) == r.stdout and r.stdout.startswith("z" * OUT) and "truncated" in r.stdout
    # bytes written to fd 1 directly: RAW_OUTPUT_FACTOR x output_limit
    raw = pysandbox.RAW_OUTPUT_FACTOR * OUT
    r = sb.run(f"os.write(1, b'r' * {raw + 10})")
    assert r.stdout.startswith("r" * raw) and "truncated at the output limit" in r.stdout


def test_limits_are_checked(sb):
    for bad in (-1, pysandbox.MAX_OUTPUT_CHARS + 1):
        with pytest.raises(ConfigError):
            whpfast.PythonSandbox.from_snapshot(sb.snapshot, output_limit=bad)
    with pytest.raises(TypeError):
        whpfast.PythonSandbox.from_snapshot(sb.snapshot, output_limit="1k")
    with pytest.raises(ConfigError):
        whpfast.PythonSandbox.from_snapshot(sb.snapshot, cpu_time=0)
    with pytest.raises(TypeError):
        whpfast.PythonSandbox.from_snapshot(sb.snapshot, cpu_time_total="1s")


# -- CPU time ------------------------------------------------------------------------------------

def test_a_busy_run_stops_at_its_cpu_time(sb):
    t0 = time.monotonic()
    with pytest.raises(GuestCpuLimit) as caught:
        sb.run("while True: pass", timeout=30)
    assert isinstance(caught.value, GuestTimeout)
    assert time.monotonic() - t0 < 15
    assert 0.3 <= sb.linux.last_cpu_time < 0.3 + 0.1
    # as after a timeout: no live state to continue, a fresh run starts clean
    with pytest.raises(SandboxError, match="fresh=True"):
        sb.run("pass", fresh=False)
    assert sb.eval("1 + 1") == 2


def test_waiting_is_not_cpu_time(sb):
    r = sb.run("time.sleep(0.8)\nprint('slept')", timeout=10)       # cpu_time is 0.3 s
    assert r.stdout == "slept\n" and sb.linux.last_cpu_time < 0.3


def test_cpu_time_total_bounds_all_runs_together(twin):
    box = twin(cpu_time_total=0.5)
    assert box.cpu_time is None and box.cpu_time_total == 0.5
    box.run("x = 0\nfor i in range(100000): x += i")
    used = box.cpu_time_used
    assert 0 < used < 0.5
    with pytest.raises(GuestCpuLimit, match="cpu_time_total"):
        box.run("while True: pass", timeout=30)
    assert 0.5 <= box.cpu_time_used < 0.6
    with pytest.raises(GuestCpuLimit, match="not started"):
        box.run("print(1)")
    with pytest.raises(GuestCpuLimit, match="not started"):
        box.eval("1")


def test_forks_go_on_from_what_their_parent_used(twin):
    box = twin(cpu_time=5, cpu_time_total=10, output_limit=50)
    box.run("x = 0\nfor i in range(100000): x += i", fresh=False)
    fork, = box.fork()
    with fork:
        assert (fork.cpu_time, fork.cpu_time_total, fork.output_limit) == (5, 10, 50)
        assert fork.cpu_time_used == box.cpu_time_used > 0
        assert "truncated" in fork.run("print('a' * 60)", fresh=False).stdout


def test_without_cpu_limits_nothing_is_measured(twin):
    box = twin()
    box.run("pass")
    assert box.linux.last_cpu_time is None and box.cpu_time_used == 0


# -- from_snapshot: the file declares, the caller grants -----------------------------------------

def test_from_snapshot_keeps_env_and_cwd_and_takes_the_callers_limits(sb, twin):
    box = twin(output_limit=10, cpu_time=2)
    assert box.eval("(os.environ['GREETING'], os.getcwd())") == ["hello", "/tmp/work/project"]
    assert (box.output_limit, box.cpu_time) == (10, 2)


def test_a_snapshot_file_cannot_widen_its_tmp(sb, tmp_path):
    path = sb.save(tmp_path / "env.snap")
    with pytest.raises(SnapshotError, match="/tmp"):
        whpfast.PythonSandbox.from_snapshot(path, tmp_size=TMP // 2, memory_size=128 << 20)
    with whpfast.PythonSandbox.from_snapshot(path, tmp_size=TMP, memory_size=128 << 20) as box:
        assert box.eval("os.getcwd()") == "/tmp/work/project"


# -- asyncio -------------------------------------------------------------------------------------

def test_arun_and_aeval(sb):
    async def main():
        r = await sb.arun("print('a')")
        v = await sb.aeval("6 * 7")
        return r, v
    r, v = asyncio.run(main())
    assert r.stdout == "a\n" and v == 42
    with pytest.raises(whpfast.GuestPythonError):
        asyncio.run(sb.aeval("1 / 0"))


def test_cancelling_arun_cancels_the_run_quietly(twin):
    box = twin(cpu_time=60)
    problems, ran = [], []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: problems.append(ctx))
        task = asyncio.ensure_future(box.arun("while True: pass", timeout=60))
        queued = asyncio.ensure_future(box.arun("print('ran')", on_output=lambda s, t: ran.append(t)))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        queued.cancel()
        task.cancel()
        for t in (task, queued):
            with pytest.raises(asyncio.CancelledError):
                await t
        # as after a timeout: the cancelled run left no live state
        with pytest.raises(SandboxError, match="fresh=True"):
            await box.arun("pass", fresh=False)
        # the run stops soon, and the sandbox is usable again
        r = await box.arun("print('again')", timeout=30)
        return time.monotonic() - t0, r
    took, r = asyncio.run(main())
    gc.collect()
    assert took < 10 and r.stdout == "again\n"
    assert problems == [] and ran == []          # the queued run never ran


def test_a_cancel_that_comes_before_the_run_means_it_never_runs(sb):
    call = pysandbox._Call()
    call.abandoned = True
    with pytest.raises(GuestCancelled):
        sb._call("exec", "pass", None, True, None, call)
    assert sb.eval("1") == 1
