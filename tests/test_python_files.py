"""Files in and out of a PythonSandbox (issue 20 item 2): sb.files.write/read/list/remove on the
sandbox's own file system (its /tmp, with the working directory in it), in its live state,
between cells, in bytes and text, held to tmp_size, part of checkpoint() and fork(); host paths
stay read-only. Hostile cases: a guest (or its tampered driver) cannot write past its quota,
reach a host path, or make the host take more than it asked for. One sandbox booted per module;
each test starts from its warm snapshot (fresh=True), then works in the live state."""

import errno
import os

import pytest

import whpfast
from whpfast.errors import GuestCallError, GuestTimeout, SandboxClosed, SandboxError
from whpfast.python import sandbox as pysandbox

pytestmark = [pytest.mark.hypervisor]     # either backend (KVM, or WHP over tests/whv)

TMP = 24 << 20


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A host directory shown read-only at /tmp/shared and at /data."""
    d = tmp_path_factory.mktemp("shared")
    (d / "input.csv").write_text("a,b\n1,2\n")
    return d


@pytest.fixture(scope="module")
def box(shared):
    with whpfast.PythonSandbox(setup="import os, sys", memory_size=192 << 20, tmp_size=TMP,
                               read={"/tmp/shared": str(shared), "/data": str(shared)}) as sb:
        yield sb


@pytest.fixture
def sb(box):
    box.run("pass")                 # a fresh live state: the warm snapshot's
    return box


def test_bytes_and_text_round_trip(sb):
    assert sb.files.write("/tmp/work/data.bin", bytes(range(256))) == 256
    assert sb.files.read("/tmp/work/data.bin") == bytes(range(256))
    sb.files.write("notes.txt", "café\n")                  # relative: from the working directory
    assert sb.files.read("/tmp/work/notes.txt") == "café\n".encode()
    assert sb.files.read("notes.txt", encoding="utf-8") == "café\n"
    sb.files.write("latin.txt", "café", encoding="latin-1")
    assert sb.files.read("latin.txt") == b"caf\xe9"
    sb.files.write("empty", b"")
    assert sb.files.read("empty") == b""


def test_files_are_shared_with_the_cells(sb):
    sb.files.write("in.txt", "41")
    r = sb.run("n = int(open('in.txt').read()) + 1\nopen('out.txt', 'w').write(str(n))", fresh=False)
    assert r.error is None
    assert sb.files.read("out.txt") == b"42"
    assert sb.eval("n", fresh=False) == 42                 # the namespace went on: no restore
    sb.run("os.makedirs('/tmp/work/plots/a')\nopen('/tmp/work/plots/a/p.png', 'wb').write(b'PNG')",
           fresh=False)
    assert sb.files.read("plots/a/p.png") == b"PNG"
    assert sb.eval("sorted(os.listdir('.'))", fresh=False) == ["in.txt", "out.txt", "plots"]


def test_a_fresh_run_starts_without_them(sb):
    sb.files.write("x.txt", "1")
    assert sb.eval("os.path.exists('x.txt')") is False        # fresh=True: the warm snapshot's /tmp


def test_write_makes_parent_directories_and_replaces_whole(sb):
    sb.files.write("/tmp/work/a/b/c.txt", "long contents")
    sb.files.write("/tmp/work/a/b/c.txt", "short")
    assert sb.files.read("a/b/c.txt") == b"short"


def test_list(sb):
    sb.files.write("d/one.txt", "1")
    sb.files.write("d/two.bin", b"22")
    sb.run("os.mkdir('d/sub')\nos.symlink('one.txt', 'd/link')", fresh=False)
    entries = sb.files.list("d")
    assert [(e.name, e.path, e.kind) for e in entries] == [
        ("link", "d/link", "link"), ("one.txt", "d/one.txt", "file"), ("sub", "d/sub", "dir"),
        ("two.bin", "d/two.bin", "file")]
    assert [e.size for e in entries if e.kind == "file"] == [1, 2]
    assert [e.name for e in sb.files.list()] == ["d"]        # the working directory
    assert "work" in [e.name for e in sb.files.list("/tmp")]
    with pytest.raises(FileNotFoundError):
        sb.files.list("nowhere")
    with pytest.raises(NotADirectoryError):
        sb.files.list("d/one.txt")


def test_remove(sb):
    sb.files.write("r/f.txt", "1")
    sb.files.write("r/g/h.txt", "2")
    sb.files.remove("r/f.txt")
    with pytest.raises(FileNotFoundError):
        sb.files.read("r/f.txt")
    with pytest.raises(OSError) as caught:
        sb.files.remove("r")
    assert caught.value.errno == errno.ENOTEMPTY
    sb.files.remove("r", recursive=True)
    assert sb.files.list() == []
    with pytest.raises(FileNotFoundError):
        sb.files.remove("r")


def test_errors_are_the_oserrors_python_raises(sb):
    with pytest.raises(FileNotFoundError) as caught:
        sb.files.read("/tmp/work/missing.txt")
    assert caught.value.filename == "/tmp/work/missing.txt"
    with pytest.raises(IsADirectoryError):
        sb.files.read("/tmp")
    with pytest.raises(IsADirectoryError):
        sb.files.write("/tmp/work/", b"x")
    with pytest.raises(TypeError):
        sb.files.write("x", 3)
    with pytest.raises(TypeError):
        sb.files.read(b"/tmp/x")
    with pytest.raises(ValueError):
        sb.files.read("a\0b")


def test_large_files_go_in_chunks(sb):
    data = os.urandom(2 * pysandbox.FILE_CHUNK + 12345)
    assert sb.files.write("big.bin", data) == len(data)
    assert sb.eval("os.path.getsize('big.bin')", fresh=False) == len(data)
    assert sb.files.read("big.bin") == data
    with pytest.raises(ValueError, match="max_size"):
        sb.files.read("big.bin", max_size=len(data) - 1)
    assert sb.files.read("big.bin", max_size=len(data)) == data


def test_files_are_part_of_checkpoints_and_forks(sb):
    sb.files.write("state.txt", "before")
    cp = sb.checkpoint()
    sb.files.write("state.txt", "after")
    sb.files.write("new.txt", "n")
    sb.restore(cp)
    assert sb.files.read("state.txt") == b"before"
    assert [e.name for e in sb.files.list()] == ["state.txt"]
    a, b = sb.fork(2)
    with a, b:
        a.files.write("state.txt", "a")
        b.files.remove("state.txt")
        assert a.files.read("state.txt") == b"a"
        assert b.files.list() == []
        assert sb.files.read("state.txt") == b"before"


def test_a_stale_interpreter_gives_a_clear_error(sb):
    with pytest.raises(GuestTimeout):
        sb.run("while True: pass", timeout=0.3, fresh=False)
    with pytest.raises(SandboxError, match="live interpreter"):
        sb.files.read("anything")
    with pytest.raises(SandboxError, match="live interpreter"):
        sb.files.write("anything", b"")
    sb.run("pass")
    assert sb.files.list() == []


def test_closed(box, shared):
    other = whpfast.PythonSandbox.from_snapshot(box.snapshot, read={"/tmp/shared": str(shared),
                                                                    "/data": str(shared)},
                                                memory_size=192 << 20, tmp_size=TMP)
    other.files.write("x", "1")
    other.close()
    with pytest.raises(SandboxClosed):
        other.files.read("x")


# -- hostile: the quota, the host's paths, a tampered driver --------------------------------------

def test_a_write_past_the_quota_fails_and_leaves_the_file_as_it_was(sb):
    sb.files.write("keep.txt", "old")
    with pytest.raises(OSError) as caught:
        sb.files.write("keep.txt", b"x" * (TMP + 1))
    assert caught.value.errno == errno.ENOSPC
    assert sb.files.read("keep.txt") == b"old"
    assert [e.name for e in sb.files.list()] == ["keep.txt"]      # no part file left
    sb.files.write("fits.bin", b"y" * (TMP // 2))                 # the space was given back


def test_files_written_by_the_guest_cannot_escape_its_quota(sb):
    r = sb.run("import itertools\nn = 0\ntry:\n"
               "    for i in itertools.count():\n"
               "        with open(f'f{i}', 'wb') as f: f.write(b'z' * (1 << 20))\n"
               "        n += 1\n"
               "except OSError as e:\n    print(e.errno)", fresh=False)
    assert r.stdout == f"{errno.ENOSPC}\n", r
    used = sum(e.size for e in sb.files.list())
    assert used <= TMP
    with pytest.raises(OSError) as caught:
        sb.files.write("more.bin", b"m" * (1 << 20))
    assert caught.value.errno == errno.ENOSPC


def test_host_paths_stay_read_only(sb, shared):
    before = sorted(os.listdir(shared))
    for path in ("/tmp/shared/input.csv", "/tmp/shared/new.txt", "/data/new.txt",
                 "/tmp/work/../shared/evil.txt", "/usr/evil.txt", "../../etc/evil",
                 "/proc/self/evil", "/data/sub/dir/new.txt"):
        with pytest.raises(OSError) as caught:
            sb.files.write(path, b"pwned")
        assert caught.value.errno in (errno.EROFS, errno.EACCES, errno.ENOENT, errno.EPERM), path
    for path in ("/tmp/shared/input.csv", "/data/input.csv", "/tmp/shared"):
        with pytest.raises(OSError):
            sb.files.remove(path, recursive=True)
    assert sorted(os.listdir(shared)) == before
    assert (shared / "input.csv").read_text() == "a,b\n1,2\n"
    # what the policy shows can be read, as the guest reads it
    assert sb.files.read("/data/input.csv") == b"a,b\n1,2\n"
    assert [e.name for e in sb.files.list("/tmp/shared")] == ["input.csv"]
    with pytest.raises(FileNotFoundError):
        sb.files.read("/etc/shadow-not-shown")


def tamper(sb, action, body):
    sb.run(f"import sys, base64\n_d = sys.modules['__main__']\n"
           f"_d._FILE_ACTIONS[{action!r}] = lambda r: {body}", fresh=False)


@pytest.mark.parametrize("action, body", [
    ("read", "'not base64!'"),
    ("read", "base64.b64encode(b'x' * (r['size'] + 1)).decode()"),
    ("read", "[1, 2]"),
    ("list", "[['../escape', 1, 'file']]"),
    ("list", "[['a', -1, 'file']]"),
    ("list", "{'a': 1}"),
    ("write", "'done'"),
    ("remove", "0"),
])
def test_a_tampered_driver_cannot_feed_the_host_garbage(sb, action, body):
    tamper(sb, action, body)
    args = {"read": ("x",), "list": (".",), "write": ("x", b"1"), "remove": ("x",)}[action]
    with pytest.raises(GuestCallError, match="malformed"):
        getattr(sb.files, action)(*args)
    assert sb.eval("1 + 1") == 2                          # a fresh run starts clean


def test_a_driver_that_never_ends_a_read_is_bounded(sb):
    tamper(sb, "read", "base64.b64encode(b'x' * r['size']).decode()")
    with pytest.raises(ValueError, match="max_size"):
        sb.files.read("x", max_size=3 * pysandbox.FILE_CHUNK)


def test_a_driver_that_hangs_times_out(sb):
    tamper(sb, "list", "__import__('time').sleep(3600)")
    with pytest.raises(GuestTimeout):
        sb.files.list(".", timeout=0.5)
    with pytest.raises(SandboxError, match="live interpreter"):
        sb.files.list(".")


def test_an_oserror_answer_is_checked(sb):
    tamper(sb, "read", "_d.__dict__['_file_read'](r)")     # (the real one: still works)
    assert sb.files.read("/data/input.csv") == b"a,b\n1,2\n"
    sb.run("def _bad(r):\n    raise OSError(99999, 'odd')\n_d._FILE_ACTIONS['read'] = _bad", fresh=False)
    with pytest.raises(GuestCallError, match="malformed"):
        sb.files.read("x")
