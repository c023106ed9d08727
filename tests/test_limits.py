"""Bounds untrusted code meets by default (issue 16, item 9): LinuxSandbox's per-run output limit
(truncated with a marker and RunResult.truncated, host memory bounded), and the default run
timeout of PythonSandbox and Pool requests."""

import math
import subprocess
import sys
import textwrap
import time

import pytest

import whpfast
from conftest import build_c
from whpfast.core import run as core_run
from whpfast.linux import process

pytestmark = pytest.mark.hypervisor
MB = 1 << 20

# argv[1]: bytes per write; argv[2]: "stop" (exit 1 at the first failed write, as yes does) or
# "ignore" (write on forever); argv[3]: "out" or "err" (the stream).
PRINTER_C = r"""
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static char buf[16 << 20];
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    int fd = strcmp(argv[3], "err") ? 1 : 2;
    memset(buf, 'y', n);
    buf[n - 1] = '\n';
    for (;;)
        if (write(fd, buf, n) < 0 && !strcmp(argv[2], "stop")) return 1;
}
"""


@pytest.fixture(scope="module")
def printer(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("limits") / "printer", PRINTER_C, "-static")


def marker(stream, limit=process.OUTPUT_LIMIT):
    return process.OUTPUT_MARKER.format(stream=stream, limit=limit).encode()


def test_the_default_output_limit_is_one_documented_constant():
    assert process.OUTPUT_LIMIT == 16 * MB
    assert "output_limit" in whpfast.LinuxSandbox.__doc__


@pytest.mark.parametrize("stream", ["out", "err"])
def test_printing_without_end_is_cut_at_the_limit_with_a_marker(printer, stream):
    """yes with a 4,000-character line: the first OUTPUT_LIMIT bytes, then the marker; the
    program sees its next write fail (EFBIG) and exits, as yes does on a closed pipe."""
    with whpfast.LinuxSandbox([printer, "4000", "stop", stream], memory_size=64 * MB) as lx:
        r = lx.run(timeout=30)
    kept, other = (r.stdout, r.stderr) if stream == "out" else (r.stderr, r.stdout)
    name = "stdout" if stream == "out" else "stderr"
    assert r.truncated and r.exit_code == 1 and other == b""
    assert kept == (b"y" * 3999 + b"\n") * (process.OUTPUT_LIMIT // 4000) + \
        b"y" * (process.OUTPUT_LIMIT % 4000) + marker(name)


def test_output_limit_per_sandbox_and_per_run_and_on_output_sees_what_is_kept(printer):
    seen = []
    with whpfast.LinuxSandbox([printer, "300", "stop", "out"], memory_size=64 * MB,
                              on_output=lambda stream, data: seen.append(data),
                              output_limit=1000) as lx:
        snap = lx.snapshot()
        r = lx.run(timeout=30)
        assert r.truncated and r.stdout == (b"y" * 299 + b"\n") * 3 + b"y" * 100 + marker("stdout", 1000)
        assert b"".join(seen) == r.stdout[:1000]
        lx.restore(snap)
        r = lx.run(timeout=30, output_limit=0)
        assert r.truncated and r.stdout == marker("stdout", 0)
        assert lx.output_limit == 1000
    with pytest.raises(whpfast.ConfigError, match="output_limit"):
        whpfast.LinuxSandbox([printer], output_limit=-1)
    with whpfast.LinuxSandbox([printer, "10", "stop", "out"], memory_size=64 * MB) as lx:
        with pytest.raises(whpfast.ConfigError, match="output_limit"):
            lx.run(output_limit=True)


def test_output_within_the_limit_is_not_marked(tmp_path):
    hello = build_c(tmp_path / "hello", "hello.c", "-static")
    with whpfast.LinuxSandbox([hello], memory_size=64 * MB) as lx:
        r = lx.run(timeout=10)
    assert not r.truncated and b"whpfast" not in r.stdout


RSS_SCRIPT = textwrap.dedent("""
    import sys, whpfast
    from whpfast import GuestTimeout

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) * 1024

    printer, size, mode, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    lx = whpfast.LinuxSandbox([printer, size, mode, "out"], memory_size=64 << 20)
    before = status("VmRSS")
    try:
        r = lx.run(timeout=timeout)
        kept, truncated = len(r.stdout), r.truncated
    except GuestTimeout as e:
        kept, truncated = len(e.stdout), None
    print(kept, truncated, (status("VmHWM") - before) >> 20)
""")


@pytest.mark.parametrize("size,mode,timeout", [
    ("4000", "stop", "30"),              # yes with a long line: stops at the first EFBIG
    ("4000", "ignore", "3"),             # ...one ignoring the errors: bounded, until its timeout
    (str(16 << 20), "stop", "30"),       # head -c 200M /dev/zero as one huge write after another
])
def test_host_memory_stays_bounded(printer, tmp_path, size, mode, timeout):
    """The host's peak RSS during a run of a program printing without end grows by less than
    the kept output plus the guest's own memory (16 MiB of buffer the guest touches), far from
    what the program writes (hundreds of MiB before the limit)."""
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, printer, size, mode, timeout],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    kept, truncated, grown = out.stdout.split()
    assert int(kept) == process.OUTPUT_LIMIT + len(marker("stdout"))
    assert truncated in ("True", "None")
    print(f"peak RSS growth {grown} MiB for {size}-byte writes ({mode})")
    assert int(grown) < 100, f"the host's RSS grew by {grown} MiB"


# -- default run timeout --------------------------------------------------------------------------

def test_the_default_run_timeout_is_one_documented_constant():
    assert core_run.DEFAULT_RUN_TIMEOUT == 30
    assert core_run.request_timeout(None) == 30
    assert core_run.request_timeout(math.inf) == math.inf and core_run.run_timeout(math.inf) is None
    assert core_run.request_timeout(2.5) == 2.5
    with pytest.raises(ValueError):
        core_run.request_timeout(0)
    assert "DEFAULT_RUN_TIMEOUT" in whpfast.PythonSandbox.run.__doc__
    assert "DEFAULT_RUN_TIMEOUT" in whpfast.Pool.__doc__


@pytest.fixture
def short_default(monkeypatch):
    monkeypatch.setattr(core_run, "DEFAULT_RUN_TIMEOUT", 1.0)


def test_python_run_without_timeout_stops_at_the_default(py_box, short_default):
    for fn, code in ((py_box.run, "while True: pass"), (py_box.eval, "any(iter(int, 1))")):
        t0 = time.monotonic()
        with pytest.raises(whpfast.GuestTimeout):
            fn(code)
        assert 0.9 < time.monotonic() - t0 < 10
    assert py_box.eval("6 * 7", timeout=math.inf) == 42          # inf: no timeout
    assert py_box.run("print(1)", timeout=5).stdout == "1\n"


def test_pool_requests_without_timeout_stop_at_the_default(py_snap, short_default):
    with whpfast.Pool(py_snap, size=1) as pool:
        with pytest.raises(whpfast.GuestTimeout):
            pool.run("while True: pass")
        assert pool.eval("1 + 1") == 2
    with whpfast.Pool(py_snap, size=1, timeout=math.inf) as pool:  # the pool's own: none
        assert pool.eval("sum(range(10))") == 45
        with pytest.raises(whpfast.GuestTimeout):
            pool.run("while True: pass", timeout=0.5)


def test_raw_python_output_is_bounded_by_the_linux_limit(py_box):
    """os.write(1, ...) past sys.stdout: kept up to LinuxSandbox's limit, then the guest's
    writes fail (OSError EFBIG) and the stdout ends with the marker."""
    r = py_box.run("import os\nwhile True: os.write(1, b'y' * (1 << 20))", timeout=60)
    assert "OSError: [Errno 27]" in r.error
    assert r.stdout == "y" * process.OUTPUT_LIMIT + marker("stdout").decode()
    assert py_box.run("print(1)").stdout == "1\n"


def test_sdk_pool_calls_without_timeout_stop_at_the_default(testkit, short_default):
    with whpfast.Sandbox(testkit, memory_size=16 * MB) as sb:
        snap = sb.snapshot()
    with whpfast.Pool(snap, size=1) as pool:
        t0 = time.monotonic()
        with pytest.raises(whpfast.GuestTimeout):
            pool.call("spin")
        assert 0.9 < time.monotonic() - t0 < 10
        assert pool.call("add", 1, 2) == 3
