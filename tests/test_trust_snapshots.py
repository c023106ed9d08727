"""Issue 16, items 1 and 2: a snapshot file declares, the caller grants.

Crafted files are made the way an attacker would: a real snapshot saved by whpfast, its metadata
edited and every checksum recomputed (tests/test_linux_process._rewrite_meta,
tests/test_cpu.rewrite_sdk_meta). The victim loads them the documented ways -- from_snapshot,
LinuxSnapshot.load, PythonSandbox.from_snapshot, Pool -- and must get a SnapshotError naming
what the file asked for, before anything it names is mapped; within the caller's grant the same
files work. On both backends (WHP over tests/whv in CI)."""

import os
import sys

import pytest

import whpfast
from conftest import build_c
from test_cpu import rewrite_sdk_meta
from test_linux_process import _rewrite_meta
from whpfast import SnapshotError

pytestmark = [pytest.mark.hypervisor,
              pytest.mark.skipif(sys.platform != "linux", reason="Linux host only: the vDSO clock helper")]

MB = 1 << 20
SECRET = b"the secret the guest must never read\n"

# Reads the file named by its one line of stdin and prints it: a tenant that reads whatever the
# policy lets it.
CAT = r'''
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    char path[4096], buf[4096];
    for (;;) {
        if (!fgets(path, sizeof path, stdin)) return 0;
        path[strcspn(path, "\n")] = 0;
        int fd = open(path, O_RDONLY);
        if (fd < 0) { printf("open %s: %s\n", path, strerror(errno)); fflush(stdout); continue; }
        ssize_t n = read(fd, buf, sizeof buf);
        close(fd);
        fwrite(buf, 1, n > 0 ? n : 0, stdout);
        fflush(stdout);
    }
}
'''


@pytest.fixture(scope="module")
def cat(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust-cat")
    return build_c(d / "cat", CAT.replace("#include <unistd.h>", "#include <unistd.h>\n#include <errno.h>"),
                   "-static")


@pytest.fixture
def dirs(tmp_path):
    """A data directory the tenant is granted, and a secret directory beside it (outside every
    root), both host directories outside /tmp's reserved inside path (mapped under /data)."""
    data, secret = tmp_path / "data", tmp_path / "secret"
    data.mkdir()
    secret.mkdir()
    (data / "hello.txt").write_bytes(b"hello\n")
    (secret / "key").write_bytes(SECRET)
    (data / "escape").symlink_to(secret)          # a symlink inside the root, leading outside it
    return data, secret


def granted(cat, data):
    """The honest policy: the data directory at /data, the program's directory at /prog."""
    return {"/data": str(data), "/prog": os.path.dirname(cat)}


def linux_snapshot(cat, data, path, memory_size=64 * MB):
    with whpfast.LinuxSandbox(["/prog/cat"], read=granted(cat, data), memory_size=memory_size) as lx:
        assert lx.run(b"/data/hello.txt\n").stdout == b"hello\n"
        lx.snapshot().save(path)
    return path


def widen(path, **read):
    _rewrite_meta(path, lambda meta: meta["config"]["read"].update(read))


# -- item 1: Linux and Python snapshot files --------------------------------------------------

def test_a_widened_read_policy_is_refused_everywhere(cat, dirs, tmp_path):
    data, secret = dirs
    path = linux_snapshot(cat, data, tmp_path / "evil.snap")
    widen(path, **{"/loot": str(secret), "/etc": "/etc"})
    grant = granted(cat, data)
    for load in (lambda: whpfast.LinuxSnapshot.load(path, read=grant),
                 lambda: whpfast.LinuxSandbox.from_snapshot(path, read=grant),
                 lambda: whpfast.LinuxSandbox.from_snapshot(path)):
        with pytest.raises(SnapshotError, match="not granted") as info:
            load()
        assert str(secret) in str(info.value) or "'/etc'" in str(info.value)
    # Granted what it asks, the same file works (the check refuses only what is not granted).
    with whpfast.LinuxSandbox.from_snapshot(path, read={**grant, "/loot": str(secret), "/etc": "/etc"}) as lx:
        assert lx.run(b"/loot/key\n").stdout == SECRET


def test_the_honest_file_needs_the_callers_grant(cat, dirs, tmp_path):
    data, _ = dirs
    path = linux_snapshot(cat, data, tmp_path / "honest.snap")
    with pytest.raises(SnapshotError, match=rf"host path '{data}' \(at '/data'\) is not granted"):
        whpfast.LinuxSandbox.from_snapshot(path)                      # the default grants no path
    with whpfast.LinuxSandbox.from_snapshot(path, read=granted(cat, data)) as lx:
        assert lx.run(b"/data/hello.txt\n").stdout == b"hello\n"
    # A loaded snapshot keeps the grant it was loaded under; narrower arguments are checked.
    snap = whpfast.LinuxSnapshot.load(path, read=granted(cat, data))
    with whpfast.LinuxSandbox.from_snapshot(snap) as lx:
        assert lx.run(b"/data/hello.txt\n").stdout == b"hello\n"
    with pytest.raises(SnapshotError, match="not granted"):
        whpfast.LinuxSandbox.from_snapshot(snap, read=[])


def test_a_declared_path_under_a_granted_root_is_covered_unless_a_symlink_leads_out(cat, dirs, tmp_path):
    data, secret = dirs
    path = linux_snapshot(cat, data, tmp_path / "inner.snap")
    prog = os.path.dirname(cat)

    def declare(read):
        _rewrite_meta(path, lambda meta: meta["config"].update(read=dict(read, **{"/prog": prog})))

    declare({"/data": str(data)})                       # granted through a root above it: covered
    with whpfast.LinuxSandbox.from_snapshot(path, read={"/": str(tmp_path), "/prog": prog}) as lx:
        assert lx.run(b"/data/hello.txt\n").stdout == b"hello\n"
    declare({"/data/hello.txt": str(data / "hello.txt")})            # a file under the root
    whpfast.LinuxSandbox.from_snapshot(path, read=granted(cat, data)).close()
    for read in ({"/x": str(data)},                                   # the same host path elsewhere
                 {"/data/escape": str(data / "escape")},              # a symlink leading out
                 {"/data": str(secret)},                              # another host path there
                 {"/data/../etc": "/etc"}):
        declare(read)
        with pytest.raises(SnapshotError):
            whpfast.LinuxSandbox.from_snapshot(path, read=granted(cat, data))


def test_memory_and_tmp_beyond_the_grant_are_refused(cat, dirs, tmp_path):
    data, _ = dirs
    path = linux_snapshot(cat, data, tmp_path / "big.snap", memory_size=64 * MB)
    grant = granted(cat, data)
    with pytest.raises(SnapshotError, match="64 MiB of guest memory; the caller's memory_size= allows 32 MiB"):
        whpfast.LinuxSandbox.from_snapshot(path, read=grant, memory_size=32 * MB)
    _rewrite_meta(path, lambda meta: meta["config"].update(tmp_size=1 << 30))
    with pytest.raises(SnapshotError, match="/tmp of 1024 MiB"):
        whpfast.LinuxSandbox.from_snapshot(path, read=grant)
    with whpfast.LinuxSandbox.from_snapshot(path, read=grant, tmp_size=1 << 30) as lx:
        assert lx.run(b"/data/hello.txt\n").stdout == b"hello\n"


def test_a_refused_file_opens_none_of_the_host_files_it_names(cat, dirs, tmp_path, monkeypatch):
    """Refused before its references are resolved: the loader never looks at the secret."""
    data, secret = dirs
    path = linux_snapshot(cat, data, tmp_path / "evil.snap")
    widen(path, **{"/loot": str(secret)})
    looked = []
    for name in ("open", "stat", "lstat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda p, *a, real=real, **k: looked.append(p) or real(p, *a, **k))
    with pytest.raises(SnapshotError, match="not granted"):
        whpfast.LinuxSnapshot.load(path, read=granted(cat, data))
    monkeypatch.undo()
    assert looked and not [p for p in looked if isinstance(p, (str, bytes)) and str(secret) in os.fsdecode(p)]


@pytest.fixture(scope="module")
def python_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust-py")
    with whpfast.PythonSandbox(setup="x = 1", memory_size=256 * MB) as sb:
        return sb.save(d / "py.snap")


def test_python_file_widened_is_refused_by_from_snapshot_and_pool(python_file, tmp_path):
    evil = tmp_path / "evil.snap"
    evil.write_bytes(open(python_file, "rb").read())
    widen(evil, **{"/etc": "/etc"})
    with pytest.raises(SnapshotError, match="'/etc'"):
        whpfast.PythonSandbox.from_snapshot(evil)
    with pytest.raises(SnapshotError, match="'/etc'"):
        whpfast.Pool(evil, size=1)
    # the unedited file: this interpreter's files are the default grant
    with whpfast.PythonSandbox.from_snapshot(python_file) as sb:
        assert sb.eval("x") == 1
    with pytest.raises(SnapshotError, match="256 MiB of guest memory"):
        whpfast.PythonSandbox.from_snapshot(python_file, memory_size=128 * MB)


def test_python_file_for_another_interpreter_is_refused(python_file, tmp_path):
    other = tmp_path / "other.snap"
    other.write_bytes(open(python_file, "rb").read())
    _rewrite_meta(other, lambda meta: meta["python"].update(python="/usr/bin/python3"))
    with pytest.raises(SnapshotError, match="made for the interpreter /usr/bin/python3"):
        whpfast.PythonSandbox.from_snapshot(other)


def test_declared_extra_files_are_bounded_and_grant_nothing(cat, dirs, tmp_path):
    """Made-up files (a PythonSandbox's pyvenv.cfg, empty directories over site-packages) are
    content, not authority: a file may declare them, within their bounds, and they open nothing
    of the host's. More than the bounds, or one under /proc, /dev or /tmp, is refused."""
    data, secret = dirs
    path = linux_snapshot(cat, data, tmp_path / "extra.snap")
    _rewrite_meta(path, lambda meta: meta["config"].update(
        extra_files={"/data/hello.txt": "made up\n", "/loot": None}))
    with whpfast.LinuxSandbox.from_snapshot(path, read=granted(cat, data)) as lx:
        assert lx.run(b"/data/hello.txt\n").stdout == b"made up\n"      # over the granted file
        assert lx.run(b"/loot/key\n").stdout.startswith(b"open /loot/key: No such file")
    for extra, why in (({f"/f{i}": "" for i in range(65)}, "at most 64"),
                       ({"/big": "x" * (1 << 20)}, "more than"),
                       ({"/proc/self/status": "forged"}, "outside /proc"),
                       ({"/x": 5}, "mapping of strings")):
        bad = tmp_path / "bad.snap"
        bad.write_bytes(open(path, "rb").read())
        _rewrite_meta(bad, lambda meta: meta["config"].update(extra_files=extra))
        with pytest.raises(SnapshotError, match=why):
            whpfast.LinuxSandbox.from_snapshot(bad, read=granted(cat, data))


# -- item 2: SDK snapshots' files= ------------------------------------------------------------

@pytest.fixture
def sdk_file(tmp_path):
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(bytes(range(256)) * 16)
    path = tmp_path / "sdk.snap"
    with whpfast.Sandbox(whpfast.guests.testkit, files={"initrd": str(initrd)}) as sb:
        sb.snapshot().save(path)
    return path, initrd


def test_sdk_file_maps_only_what_the_caller_names(sdk_file, tmp_path):
    path, initrd = sdk_file
    secret = tmp_path / "shadow"
    secret.write_bytes(b"s" * 12345)
    rewrite_sdk_meta(path, lambda meta: meta["files"][0].update(path=str(secret)))
    for make in (lambda: whpfast.Sandbox.from_snapshot(path), lambda: whpfast.Pool(path, size=1)):
        with pytest.raises(SnapshotError, match=r"maps files \['initrd'\]; files= must name") as info:
            make()
        assert "12345" not in str(info.value)          # nothing about the file it named
    with whpfast.Sandbox.from_snapshot(path, files={"initrd": str(initrd)}) as sb:
        assert sb.call("file_byte", "initrd", 3) == 3
    with whpfast.Pool(path, size=1, files={"initrd": str(initrd)}) as pool:
        assert pool.call("file_byte", "initrd", 7) == 7
    with pytest.raises(SnapshotError, match="must have 4096 bytes"):
        whpfast.Sandbox.from_snapshot(path, files={"initrd": str(secret)})


def test_sdk_file_memory_beyond_the_grant_is_refused(tmp_path):
    path = tmp_path / "big.snap"
    with whpfast.Sandbox(whpfast.guests.testkit, memory_size=32 * MB) as sb:
        sb.snapshot().save(path)
    with pytest.raises(SnapshotError, match="32 MiB of guest memory; the caller's memory_size= allows 16 MiB"):
        whpfast.Sandbox.from_snapshot(path)
    with whpfast.Sandbox.from_snapshot(path, memory_size=32 * MB) as sb:
        assert sb.call("add", 2, 3) == 5


def test_sdk_snapshot_taken_here_keeps_its_files(sdk_file):
    """An in-memory snapshot was made under its sandbox's arguments: no files= needed."""
    path, initrd = sdk_file
    with whpfast.Sandbox(whpfast.guests.testkit, files={"initrd": str(initrd)}) as sb:
        snap = sb.snapshot()
    with whpfast.Sandbox.from_snapshot(snap) as again:
        assert again.call("file_byte", "initrd", 5) == 5
