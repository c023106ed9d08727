"""A snapshot file other users can write (issue 16, item 6): it is read into private memory and
never mapped, so truncating it under live sandboxes cannot SIGBUS the host; a file only root or
this process's owner can write is still mapped (its pages shared). Every check runs in a
subprocess: a SIGBUS kills that process and fails the test instead of killing pytest."""

import os
import signal
import subprocess
import sys

import pytest

import whpfast
from conftest import build_c

pytestmark = pytest.mark.hypervisor

# argv: kind, path, mode (octal), truncate (1/0). Prints how many of this process's mappings
# are of the file, then whether the sandboxes still answer (after the file was truncated).
CHECK = r"""
import os, sys, whpfast
kind, path, mode, truncate = sys.argv[1], sys.argv[2], int(sys.argv[3], 8), sys.argv[4] == "1"
os.chmod(path, mode)

def mapped():
    with open("/proc/self/maps") as f:
        return sum(line.rstrip("\n").endswith(" " + path) for line in f)

if kind == "sdk":
    snap = whpfast.Snapshot.load(path)
    box = whpfast.Sandbox.from_snapshot(snap)
    shared = mapped()
    if truncate:
        os.truncate(path, 0)           # as another user could
    answers = [box.call("add", 1, 2)]
    box.restore(snap)
    answers.append(box.call("add", 1, 2))
    with whpfast.Sandbox.from_snapshot(snap) as other:
        answers.append(other.call("add", 1, 2))
    ok = answers == [3, 3, 3]
elif kind == "linux":
    snap = whpfast.LinuxSnapshot.load(path)
    box = whpfast.LinuxSandbox.from_snapshot(snap)
    shared = mapped()
    if truncate:
        os.truncate(path, 0)
    answers = [box.run(b"a\n", timeout=10).stdout]
    box.restore(snap)
    answers.append(box.run(b"b\n", timeout=10).stdout)
    with whpfast.LinuxSandbox.from_snapshot(snap) as other:
        answers.append(other.run(b"c\n", timeout=10).stdout)
    ok = answers == [b"tick\n"] * 3
else:
    box = whpfast.PythonSandbox.from_snapshot(path)
    shared = mapped()
    if truncate:
        os.truncate(path, 0)
    ok = [box.eval("6 * 7") for _ in range(3)] == [42] * 3
print(shared, ok)
"""

@pytest.fixture(scope="module")
def snapshot_files(tmp_path_factory, py_box):
    """One saved snapshot of each kind; each test copies the one it needs."""
    out = tmp_path_factory.mktemp("trust")
    files = {}
    with whpfast.Sandbox(whpfast.guests.testkit, memory_size=16 << 20) as sb:
        files["sdk"] = sb.snapshot().save(out / "sdk.snap")
    ticker = build_c(out / "ticker", "ticker.c", "-static")
    with whpfast.LinuxSandbox([ticker], memory_size=32 << 20) as lx:
        assert lx.run(timeout=10).waiting
        files["linux"] = lx.snapshot().save(out / "linux.snap")
    files["python"] = py_box.save(out / "python.snap")
    return files


def check(snapshot_files, tmp_path, kind, mode, truncate):
    path = tmp_path / f"{kind}.snap"
    with open(snapshot_files[kind], "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    out = subprocess.run([sys.executable, "-c", CHECK, kind, str(path), oct(mode), str(int(truncate))],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode != -signal.SIGBUS, "the host died of SIGBUS: the truncated file was mapped"
    assert out.returncode == 0, out.stderr
    shared, ok = out.stdout.split()
    return int(shared), ok == "True"


@pytest.mark.parametrize("kind", ["sdk", "linux", "python"])
def test_a_snapshot_file_others_can_write_is_copied_and_survives_truncation(snapshot_files, tmp_path, kind):
    shared, ok = check(snapshot_files, tmp_path, kind, 0o666, truncate=True)
    assert shared == 0 and ok


@pytest.mark.parametrize("kind", ["sdk", "linux", "python"])
def test_a_group_writable_snapshot_file_is_not_mapped_either(snapshot_files, tmp_path, kind):
    shared, ok = check(snapshot_files, tmp_path, kind, 0o620, truncate=False)
    assert shared == 0 and ok


@pytest.mark.parametrize("kind", ["sdk", "linux", "python"])
def test_a_snapshot_file_only_its_owner_can_write_is_still_mapped(snapshot_files, tmp_path, kind):
    shared, ok = check(snapshot_files, tmp_path, kind, 0o644, truncate=False)
    if kind == "python" and not whpfast.backend.capabilities.file_overlay:
        # WHP: a snapshot that references library files is put together in guest-sized memory,
        # its image copied from the file, whoever may write it (nothing can be mapped over
        # memory the WHv* layer pins)
        assert shared == 0 and ok
    else:
        assert shared >= 1 and ok


def test_the_rule_owner_and_mode():
    """core.files.shareable, the one rule for snapshot files and referenced files alike."""
    from whpfast.core.files import shareable

    def st(mode, uid):
        return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))

    me = os.geteuid()
    other = 65534 if me != 65534 else 65533
    assert shareable(st(0o100644, me)) and shareable(st(0o100644, 0)) and shareable(st(0o100600, me))
    assert not shareable(st(0o100644, other))                # another user owns it
    assert not shareable(st(0o100664, me)) and not shareable(st(0o100646, 0))
    assert not shareable(st(0o020644, me))                   # not a regular file


def test_a_python_snapshot_file_made_writable_since_it_was_loaded_is_loaded_again(py_box, tmp_path):
    """PythonSandbox shares one loaded snapshot per file; a chmod (ctime) makes it a new version,
    so the mapping decision is made again for it."""
    path = py_box.save(tmp_path / "py.snap")
    os.chmod(path, 0o644)
    with whpfast.PythonSandbox.from_snapshot(path) as first:
        os.chmod(path, 0o666)
        with whpfast.PythonSandbox.from_snapshot(path) as second:
            assert second.snapshot is not first.snapshot
            assert second.eval("1 + 1") == 2
