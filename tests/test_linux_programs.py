"""Real, unmodified Linux programs in LinuxSandbox: a dynamically linked C program through its
PT_INTERP, Debian's busybox (busybox-static, or the dynamic busybox with its libraries), Debian's /usr/bin/python3 and this venv's python with numpy and
pandas, against the file system's read= policy. The heavy Python guests boot once per module and
are warm-started (restore + one line of stdin) per test."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import whpfast
from conftest import build_c
from whpfast.linux.fs import inside_path, read_mapping

HERE = Path(__file__).parent / "linux"
DRIVER = (HERE / "driver.py").read_text()
SYSTEM_READ = ["/usr", "/lib", "/lib64", "/etc"]
BUSYBOX = "/bin/busybox"         # tests/system-packages.txt installs it (README's test command)


def _interpreter(path):
    """An ELF executable's PT_INTERP (its dynamic loader), or None for a static one."""
    data = Path(path).read_bytes()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 3:
            return data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    return None


# What Debian's dynamic busybox loads (its loader and libc), none for busybox-static.
BUSYBOX_LIBS = ["/lib", "/lib64", "/usr/lib"] if os.path.exists(BUSYBOX) and _interpreter(BUSYBOX) else []
VENV = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))

# Any backend (KVM, or WHP over tests/whv); the personality's host side is Linux-only so far
# (docs/guides/windows.md, "Linux programs on WHP").
pytestmark = [pytest.mark.hypervisor,
              pytest.mark.skipif(sys.platform != "linux", reason="Linux host only: the vDSO clock helper")]


def compile_c(tmp_path_factory, name, *flags):
    return build_c(tmp_path_factory.mktemp("c") / name, f"{name}.c", *flags)


def run(argv, **kw):
    timeout = kw.pop("timeout", 30)
    with whpfast.LinuxSandbox(argv, **kw) as lx:
        return lx.run(eof=True, timeout=timeout)


@pytest.fixture(scope="module")
def dynamic_hello(tmp_path_factory):
    return compile_c(tmp_path_factory, "hello")


def test_dynamic_program_through_its_interpreter(dynamic_hello):
    r = run([dynamic_hello, "x"], read=SYSTEM_READ)
    assert r.stdout == f"hello from 2 args: [{dynamic_hello}] [x]\n".encode() and r.exit_code == 3


def test_interpreter_outside_read_is_a_load_error_naming_it(dynamic_hello):
    with pytest.raises(whpfast.GuestLoadError, match=r"interpreter /lib64/ld-linux-x86-64.so.2 is not readable "
                                                     r"inside the sandbox.*read="):
        whpfast.LinuxSandbox([dynamic_hello], read=["/etc"])


@pytest.mark.skipif(not os.path.exists("/usr/bin/sqlite3"), reason="needs Debian's sqlite3")
def test_sqlite3_shell_on_tmp():
    r = run(["/usr/bin/sqlite3", "/tmp/c.db", "create table t(x); insert into t values (1),(2); "
             "select sum(x) from t;"], read=SYSTEM_READ)
    assert (r.stdout, r.stderr, r.exit_code) == (b"3\n", b"", 0)


def test_vdso_serves_clocks_without_exits(tmp_path_factory):
    program = compile_c(tmp_path_factory, "clock", "-static")
    with whpfast.LinuxSandbox([program], memory_size=64 << 20) as lx:
        r = lx.run(timeout=10)
        calls = lx.syscall_count
    assert r.stdout.startswith(b"backwards=0 realtime=") and r.exit_code == 0
    assert calls < 40          # 4000 clock reads; a static glibc start-up alone makes ~15 calls


@pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs Debian's busybox: run tests/system-packages.sh")
class TestBusybox:
    def host(self, *args):
        return subprocess.run([BUSYBOX, *args], capture_output=True, check=True).stdout

    def test_ls(self):
        r = run([BUSYBOX, "ls", "-1", "/usr/lib/x86_64-linux-gnu/gconv"], read=["/usr/lib", *BUSYBOX_LIBS])
        assert r.exit_code == 0 and r.stdout == self.host("ls", "-1", "/usr/lib/x86_64-linux-gnu/gconv")

    def test_sort_and_sha256sum(self):
        files = ["/etc/passwd", "/etc/group", "/usr/lib/os-release"]
        r = run([BUSYBOX, "sha256sum", *files], read=["/etc", "/usr/lib", *BUSYBOX_LIBS])
        assert r.exit_code == 0 and r.stdout == self.host("sha256sum", *files)
        r = run([BUSYBOX, "sort", "/etc/passwd"], read=["/etc", *BUSYBOX_LIBS])
        assert r.exit_code == 0 and r.stdout == self.host("sort", "/etc/passwd")

    def test_sort_reads_stdin(self):
        with whpfast.LinuxSandbox([BUSYBOX, "sort"], read=BUSYBOX_LIBS) as lx:
            assert lx.run(b"pear\napple\n").waiting
            assert lx.run(b"fig\n", eof=True) == whpfast.RunResult(b"apple\nfig\npear\n", b"", 0, False)

    def test_path_outside_read_does_not_exist(self):
        r = run([BUSYBOX, "cat", __file__], read=["/etc", *BUSYBOX_LIBS])    # a real host file
        assert r.exit_code == 1 and b"No such file or directory" in r.stderr and r.stdout == b""

    def test_write_under_read_is_erofs_and_the_host_file_is_untouched(self, tmp_path):
        target = tmp_path / "file"
        target.write_text("original")
        r = run([BUSYBOX, "sh", "-c", "echo changed > /data/file; echo status $?"],
                read={"/data": str(tmp_path), BUSYBOX: BUSYBOX, **{p: p for p in BUSYBOX_LIBS}})
        assert b"Read-only file system" in r.stderr and r.stdout == b"status 1\n"
        assert target.read_text() == "original"


def boot(argv, modules, read, memory_size=1 << 30):
    lx = whpfast.LinuxSandbox([*argv, "-c", DRIVER, *modules], read=read, memory_size=memory_size)
    first = lx.run(timeout=120)
    assert first.waiting, first
    return lx, lx.snapshot()


def ask(lx, snap, line, timeout=30):
    lx.restore(snap)
    r = lx.run(line.encode() + b"\n", timeout=timeout)
    assert r.waiting and r.stderr == b"", r
    return r.stdout


NUMPY_JOB = "print(repr(float(numpy.random.default_rng(7).standard_normal(100000).sum())), numpy.arange(10).sum())"
PANDAS_JOB = ("print(pandas.DataFrame({'k': [i % 3 for i in range(300)], 'v': range(300)})"
              ".groupby('k').v.mean().to_json())")


def host_answer(python, line, modules):
    script = "".join(f"import {m}\n" for m in modules) + line
    return subprocess.run([python, "-c", script], capture_output=True, check=True).stdout


@pytest.fixture(scope="module")
def debian_python():
    lx, snap = boot(["/usr/bin/python3"], ["numpy", "pandas"], SYSTEM_READ)
    yield lx, snap
    lx.close()


def test_debian_python_prints(debian_python):
    assert ask(*debian_python, "print(1)") == b"1\n"


def test_debian_python_numpy_matches_the_host(debian_python):
    assert ask(*debian_python, NUMPY_JOB) == host_answer("/usr/bin/python3", NUMPY_JOB, ["numpy"])


def test_debian_python_pandas(debian_python):
    assert ask(*debian_python, PANDAS_JOB) == host_answer("/usr/bin/python3", PANDAS_JOB, ["pandas"])


def test_tmp_writes_vanish_on_restore(debian_python):
    lx, snap = debian_python
    write = "open('/tmp/state', 'w').write('x'); print(open('/tmp/state').read())"
    assert ask(lx, snap, write) == b"x\n"
    assert ask(lx, snap, "import os; print(os.path.exists('/tmp/state'))") == b"False\n"


def test_python_sees_the_policy(debian_python):
    lx, snap = debian_python
    assert ask(lx, snap, "import os; print(os.path.exists('/root'), os.path.exists('/usr/bin/python3'))") \
        == b"False True\n"
    answer = ask(lx, snap, "exec(\"try: open('/etc/new-file', 'w')\\nexcept OSError as e: print(e.errno)\")")
    assert answer == b"30\n"                                                # EROFS


def test_python_snapshot_file_cold_starts(debian_python, tmp_path):
    lx, snap = debian_python
    path = snap.save(tmp_path / "python.snap")
    with whpfast.LinuxSandbox.from_snapshot(path, read=SYSTEM_READ) as cold:     # the caller's grant
        assert cold.run(b"print(numpy.arange(4).sum(), pandas.__name__)\n").stdout == b"6 pandas\n"
        cold.restore(cold_snap := whpfast.LinuxSnapshot.load(path, read=SYSTEM_READ))
        assert cold.run(b"print(2)\n").stdout == b"2\n"
        assert cold_snap.meta["config"]["read"] == SYSTEM_READ


def test_python_warm_start_is_exact(debian_python):
    lx, snap = debian_python
    answers = {ask(lx, snap, "x = globals().setdefault('counter', 0) + 1; globals()['counter'] = x; print(x)")
               for _ in range(20)}
    assert answers == {b"1\n"}


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the tests run outside a venv")
def test_venv_python_with_pip_numpy_and_pandas():
    """This venv's python (numpy from pip: whpfast depends on it; pandas when installed, as CI
    does) gives the same answers inside the sandbox as on the host."""
    try:
        import pandas  # noqa: F401
        modules = ["numpy", "pandas"]
    except ImportError:
        modules = ["numpy"]
    # A venv under /tmp (a checkout there, as CI's) is mounted at its own path in the sandbox's /tmp.
    read = read_mapping(SYSTEM_READ + [VENV, sys.base_prefix])
    lx, snap = boot([inside_path(sys.executable)], modules, read)
    try:
        assert ask(lx, snap, "import sys; print(sys.prefix)") == f"{inside_path(sys.prefix)}\n".encode()
        assert ask(lx, snap, NUMPY_JOB) == host_answer(sys.executable, NUMPY_JOB, ["numpy"])
        if "pandas" in modules:
            assert ask(lx, snap, PANDAS_JOB) == host_answer(sys.executable, PANDAS_JOB, ["pandas"])
    finally:
        lx.close()


def test_a_program_outside_a_dict_read_is_read_from_the_host_as_with_a_list(tmp_path_factory, tmp_path):
    """Issue 17 item 7: one rule for both forms of read=: the program argv[0] names is loaded from
    the host when the policy does not show it (it failed to load with a mapping before)."""
    program = compile_c(tmp_path_factory, "sum", "-static")
    data = tmp_path / "data"
    data.mkdir()
    for read in ({"/data": str(data)}, [str(SYSTEM_READ[0])]):
        with whpfast.LinuxSandbox([program], read=read, memory_size=32 << 20) as lx:
            assert lx.run(b"5\n").stdout == b"sum 5\n"
