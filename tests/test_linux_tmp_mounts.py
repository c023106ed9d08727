"""Data under the host's /tmp given to a LinuxSandbox (issue 17 item 6): a read entry below /tmp
is a read-only bind mount in the sandbox's own /tmp, at the same path for a list, where
{inside: host} says for a mapping; writes are EROFS, the mount point is EBUSY to remove, and
restores, snapshot files and their grants keep it. Debian's busybox is the guest."""

import os
import shutil
import sys
import tempfile

import pytest

import whpfast
from conftest import build_c
from test_linux_programs import BUSYBOX, BUSYBOX_LIBS
from whpfast.errors import ReadPolicyError, SnapshotError

pytestmark = [pytest.mark.hypervisor,
              pytest.mark.skipif(sys.platform != "linux", reason="Linux host only: the vDSO clock helper"),
              pytest.mark.skipif(not os.path.exists(BUSYBOX),
                                 reason="needs Debian's busybox: run tests/system-packages.sh")]
BOX = [BUSYBOX, *BUSYBOX_LIBS]      # what busybox itself needs to be read


@pytest.fixture
def data():
    """A tempfile.mkdtemp() data directory: the commonest case there is."""
    path = tempfile.mkdtemp()
    assert path.startswith("/tmp/")
    os.mkdir(os.path.join(path, "sub"))
    with open(os.path.join(path, "data.txt"), "w") as f:
        f.write("the data\n")
    with open(os.path.join(path, "sub", "more.txt"), "w") as f:
        f.write("more\n")
    yield path
    shutil.rmtree(path)


def run(argv, read, **kw):
    with whpfast.LinuxSandbox(argv, read=read, **kw) as lx:
        return lx.run(eof=True, timeout=60)


def sh(script, read):
    """busybox sh -c script: builtins only (the guest has one process: no fork)."""
    return run([BUSYBOX, "sh", "-c", script], read)


@pytest.fixture(scope="module")
def mountsh(tmp_path_factory):
    """tests/linux/mountsh.c: a command loop parked in read(0) between commands."""
    return build_c(tmp_path_factory.mktemp("mountsh") / "mountsh", "mountsh.c", "-static")


@pytest.mark.parametrize("form", ["list", "same path", "elsewhere in /tmp", "outside /tmp"])
def test_a_mkdtemp_directory_is_readable(data, form):
    inside = {"list": data, "same path": data, "elsewhere in /tmp": "/tmp/job/data",
              "outside /tmp": "/data"}[form]
    read = [*BOX, data] if form == "list" else {**{p: p for p in BOX}, inside: data}
    r = run([BUSYBOX, "cat", f"{inside}/data.txt", f"{inside}/sub/more.txt"], read)
    assert r == whpfast.RunResult(b"the data\nmore\n", b"", 0, False), r
    r = run([BUSYBOX, "ls", inside], read)
    assert r == whpfast.RunResult(b"data.txt\nsub\n", b"", 0, False), r
    # the sandbox's /tmp stays its own: writable beside the mount, and the host sees none of it
    parent = os.path.dirname(inside) if inside.startswith("/tmp/") else "/tmp"
    r = sh(f"cd {inside}/sub && pwd && read line < more.txt && echo $line; cd ..; pwd; "
           f"echo hi > /tmp/note && read n < /tmp/note && echo $n && echo x > {parent}/beside "
           f"&& test -f {parent}/beside && echo beside", read)
    assert r.stdout == f"{inside}/sub\nmore\n{inside}\nhi\nbeside\n".encode() and r.exit_code == 0, r
    assert sorted(os.listdir(data)) == ["data.txt", "sub"]


@pytest.mark.parametrize("form", ["list", "mapping"])
def test_writes_in_the_mount_are_erofs(data, form, mountsh):
    inside = data if form == "list" else "/tmp/job/data"
    read = [*BOX, mountsh, data] if form == "list" else {**{p: p for p in BOX + [mountsh]}, inside: data}
    for argv in (["touch", f"{inside}/new"], ["mkdir", f"{inside}/d"], ["rm", f"{inside}/data.txt"],
                 ["rm", "-rf", f"{inside}/sub"], ["mv", f"{inside}/data.txt", "/tmp/x"]):
        r = run([BUSYBOX, *argv], read)
        assert r.exit_code != 0 and b"Read-only file system" in r.stderr, (argv, r)
    r = sh(f"echo changed > {inside}/data.txt", read)
    assert r.exit_code != 0 and b"Read-only file system" in r.stderr, r
    # the system calls' own errnos, from a C program
    with whpfast.LinuxSandbox([mountsh], read=read) as lx:
        r = lx.run(f"write {inside}/data.txt\nwrite {inside}/new\nmkdir {inside}/d\nunlink {inside}/data.txt\n"
                   f"rmdir {inside}\nmv {inside} /tmp/moved\nmv {inside}/data.txt /tmp/x\n".encode())
        assert r.stdout.decode().splitlines() == [
            f"write {inside}/data.txt: Read-only file system", f"write {inside}/new: Read-only file system",
            f"mkdir {inside}/d: Read-only file system", f"unlink {inside}/data.txt: Read-only file system",
            f"rmdir {inside}: Device or resource busy", f"mv {inside}: Device or resource busy",
            f"mv {inside}/data.txt: Invalid cross-device link"], r
    with open(os.path.join(data, "data.txt")) as f:
        assert f.read() == "the data\n"
    assert sorted(os.listdir(data)) == ["data.txt", "sub"]


def test_rm_rf_above_the_mount_fails_on_it_and_a_restore_keeps_everything(data, mountsh):
    empty = tempfile.mkdtemp()
    try:
        # busybox's rm -rf: the files in a mount are EROFS (it then leaves their directories be),
        # an empty mount point EBUSY
        read = {**{p: p for p in BOX}, "/tmp/job/data": data, "/tmp/job/empty": empty}
        r = run([BUSYBOX, "rm", "-rf", "/tmp/job"], read)
        assert r.exit_code == 1 and r.stderr.decode().splitlines() == [
            "rm: can't remove '/tmp/job/data/data.txt': Read-only file system",
            "rm: can't remove '/tmp/job/data/sub/more.txt': Read-only file system",
            "rm: can't remove '/tmp/job/empty': Device or resource busy"], r
    finally:
        os.rmdir(empty)
    read = {**{p: p for p in BOX + [mountsh]}, "/tmp/job/data": data}
    with whpfast.LinuxSandbox([mountsh], read=read) as lx:
        assert lx.run(b"write /tmp/job/out\n").stdout == b"write /tmp/job/out: ok\n"
        snap = lx.snapshot()
        r = lx.run(b"rmrf /tmp/job\nls /tmp/job\nmv /tmp/job /tmp/elsewhere\ncat /tmp/job/data/data.txt\n")
        assert r.stdout.decode().splitlines() == [
            "rmrf /tmp/job/data/data.txt: Read-only file system",
            "rmrf /tmp/job/data/sub/more.txt: Read-only file system",
            "rmrf /tmp/job/data/sub: Read-only file system",
            "rmrf /tmp/job/data: Device or resource busy",
            "rmrf /tmp/job: Directory not empty",
            "rmrf /tmp/job: 5 failed",
            "ls /tmp/job: data",                    # out is gone, the mount is not
            "mv /tmp/job: Device or resource busy",   # (Linux would move the mount along)
            "the data"], r
        lx.restore(snap)
        r = lx.run(b"ls /tmp/job\ncat /tmp/job/data/sub/more.txt\nrmrf /tmp\nls /tmp\n")
        assert r.stdout.decode().splitlines()[:2] == ["ls /tmp/job: data out", "more"], r
        left = "ls /tmp: " + " ".join(sorted(["job", mountsh.split("/")[2]]))    # (mountsh is in /tmp too)
        assert r.stdout.decode().splitlines()[-1] == left, r
        lx.restore(snap)
        r = lx.run(b"ls /tmp\nls /tmp/job\ncat /tmp/job/data/data.txt\n")
        assert r.stdout == f"{left}\nls /tmp/job: data out\nthe data\n".encode(), r
    assert sorted(os.listdir(data)) == ["data.txt", "sub"]


def test_a_snapshot_file_keeps_its_tmp_mounts_under_the_grant(data, tmp_path, mountsh):
    with whpfast.LinuxSandbox([mountsh], read=[mountsh, data]) as lx:
        assert lx.run(f"cd {data}/sub\n".encode()).waiting
        path = lx.snapshot().save(tmp_path / "mountsh.snap")
    ask = f"pwd\ncat more.txt\ncat ../data.txt\nrmdir {data}\n".encode()
    answer = f"pwd: {data}/sub\nmore\nthe data\nrmdir {data}: Device or resource busy\n".encode()
    with whpfast.LinuxSandbox.from_snapshot(path, read=[mountsh, data]) as lx:
        assert lx.run(ask).stdout == answer
    with pytest.raises(SnapshotError, match=f"host path '{data}' .*is not granted"):
        whpfast.LinuxSandbox.from_snapshot(path, read=[mountsh])
    with pytest.raises(SnapshotError, match=f"host path '{data}' .*is not granted"):
        whpfast.LinuxSnapshot.load(path, read={mountsh: mountsh, "/tmp/other": data})
    snap = whpfast.LinuxSnapshot.load(path, read={"/": "/"})
    with whpfast.LinuxSandbox.from_snapshot(snap) as lx:     # a grant of a directory above both
        assert lx.run(ask).stdout == answer


def test_errors_name_the_side_that_is_wrong(data):
    with pytest.raises(ReadPolicyError, match=r"^read: host path '/nonexistent-dir' does not exist$"):
        run([BUSYBOX, "true"], {**{p: p for p in BOX}, "/data": "/nonexistent-dir"})
    with pytest.raises(ReadPolicyError, match=r"^read: inside path '/proc/data' is under /proc or /dev"):
        run([BUSYBOX, "true"], {**{p: p for p in BOX}, "/proc/data": data})
    with pytest.raises(ReadPolicyError, match=r"^read: inside path '/tmp' is the sandbox's own /tmp"):
        run([BUSYBOX, "true"], {**{p: p for p in BOX}, "/tmp": data})
    # {host: inside} by mistake: the host side is named, and the hint says which side is which
    with pytest.raises(ReadPolicyError, match=r"^read: host path '/data' does not exist \(a mapping is "
                                              r"\{inside: host\}"):
        run([BUSYBOX, "true"], {**{p: p for p in BOX}, data: "/data"})
