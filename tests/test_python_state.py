"""Live interpreter state on PythonSandbox (issue 20 item 1): run/eval with fresh=False continue
from the previous cell; checkpoint() snapshots that state (restore, save, from_snapshot, Pool);
fork() makes independent interpreters from it; a failed cell keeps it. A pandas interpreter is
booted ONCE per module and each test starts from its warm snapshot (fresh=True), then builds
its own live state."""

import os
import subprocess
import sys

import pytest

import whpfast
from whpfast.errors import GuestTimeout, SandboxError

pytestmark = [pytest.mark.hypervisor]     # either backend (KVM, or WHP over tests/whv)

SETUP = "import numpy as np\nimport pandas as pd"


@pytest.fixture(scope="module")
def sb():
    with whpfast.PythonSandbox(setup=SETUP, memory_size=256 << 20) as box:
        yield box


@pytest.fixture
def live(sb):
    """sb in a fresh live state holding a DataFrame `df` (column a: 0..9) and a counter `n`."""
    sb.run("df = pd.DataFrame({'a': range(10)})\nn = 0")
    sb.run("n += 1", fresh=False)
    return sb


def test_cells_continue_and_a_fresh_run_does_not_see_them(live):
    assert live.eval("(n, int(df.a.sum()))", fresh=False) == [1, 45]
    assert live.eval("'df' in globals()") is False


def test_checkpoint_restore(live):
    cp = live.checkpoint()
    live.run("n += 10\ndel df", fresh=False)
    assert live.eval("(n, 'df' in globals())", fresh=False) == [11, False]
    live.restore(cp)
    assert live.eval("(n, int(df.a.sum()))", fresh=False) == [1, 45]
    live.run("n += 5", fresh=False)
    live.restore(cp)                     # again: a checkpoint is restored any number of times
    assert live.eval("n", fresh=False) == 1
    assert live.snapshot is not cp and live.eval("'n' in globals()") is False


def test_checkpoints_chain_and_each_keeps_its_moment(live):
    cps = []
    for i in range(4):
        live.run(f"n = {i}\nblob = bytes([{i}]) * (1 << 20)", fresh=False)
        cps.append(live.checkpoint())
    for i, cp in reversed(list(enumerate(cps))):
        live.restore(cp)
        assert live.eval("(n, blob[0], blob[-1], len(blob))", fresh=False) == [i, i, i, 1 << 20]


@pytest.mark.parametrize("bounds", [None, (3, 4, 2)])
def test_long_chains_of_checkpoints(live, monkeypatch, tmp_path, bounds):
    """Checkpoints past a chain's bounds (core/image.py: layers, runs a clone maps, runs of a
    flat layer; made tiny here so that flattening and the clone's copying path run) each keep
    their moment, through restore, from_snapshot, save and fork, in any order."""
    from whpfast.core import image
    flattened = []
    if bounds:
        for name, value in zip(("MAX_LAYERS", "MAX_RUNS", "FLAT_RUNS"), bounds):
            monkeypatch.setattr(image, name, value)
        flatten = image.Chain.flatten
        monkeypatch.setattr(image.Chain, "flatten",
                            lambda self, *args: flattened.append(1) or flatten(self, *args))
    live.run("keep = {}\nrows = [None] * 64", fresh=False)
    cps = []
    for i in range(7):
        # scattered writes (a dict, list slots, new objects) and one block of ~100 pages
        live.run(f"keep[{i}] = str({i}) * 5000\nrows[{i} * 9 % 64] = {i}\n"
                 f"block = np.full(50000, {i})", fresh=False)
        cps.append(live.checkpoint())
    want = "(sorted(keep), [r for r in rows if r is not None], int(block[0]), int(block.sum()))"
    if bounds and cps[4]._chain is not None:        # (KVM: layered images)
        assert flattened and len(cps[4]._chain.runs()) > image.MAX_RUNS    # clones copy some

    def expect(i):
        return [list(range(i + 1)), [r for r in sorted(range(i + 1), key=lambda r: r * 9 % 64)],
                i, 50000 * i]
    for i in (6, 2, 5, 0, 3):
        live.restore(cps[i])
        assert live.eval(want, fresh=False) == expect(i)
    with whpfast.PythonSandbox.from_snapshot(cps[4]) as other:
        assert other.eval(want, fresh=False) == expect(4)
    with whpfast.PythonSandbox.from_snapshot(cps[1].save(tmp_path / "c1.snap")) as other:
        assert other.eval(want, fresh=False) == expect(1)
    live.restore(cps[5])
    a, = live.fork()
    with a:
        a.run("keep[99] = 'a'", fresh=False)
        assert a.eval(want, fresh=False) == [list(range(6)) + [99]] + expect(5)[1:]
    assert live.eval(want, fresh=False) == expect(5)


def test_fork_children_are_independent(live):
    live.run("box = {'who': 'parent'}", fresh=False)
    a, b = live.fork(2)
    with a, b:
        a.run("box['who'] = 'a'\ndf['a'] *= 100\nopen('/tmp/mark', 'w').write('a')", fresh=False)
        b.run("box['who'] = 'b'", fresh=False)
        assert a.eval("(box['who'], int(df.a.sum()))", fresh=False) == ["a", 4500]
        assert b.eval("(box['who'], int(df.a.sum()), __import__('os').path.exists('/tmp/mark'))",
                      fresh=False) == ["b", 45, False]
        assert live.eval("(box['who'], int(df.a.sum()), n)", fresh=False) == ["parent", 45, 1]
        # a fork's fresh runs start from the parent's warm snapshot
        assert a.eval("'df' in globals()") is False and a.eval("pd.__name__") == "pandas"


def test_a_hostile_fork_cannot_see_or_change_its_siblings(live):
    """One fork searches every writable mapping of its own for what a sibling wrote after the
    fork, then overwrites the objects it shares (copy-on-write) with that sibling and crashes
    its own interpreter; the sibling and the parent are untouched."""
    token = os.urandom(16).hex()             # known to the test and the victim only
    live.run("secret = None", fresh=False)
    evil, victim = live.fork(2)
    with evil, victim:
        victim.run(f"secret = 'sibling-only:' + {token!r}\nvals = list(range(1000))", fresh=False)
        scribble = (   # every readable-writable mapping of its own; what follows each marker
            "import ctypes, re\n"
            "seen = set()\n"
            "with open('/proc/self/maps') as f: maps = f.read()\n"
            "for line in maps.splitlines():\n"
            "    lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
            "    if line.split()[1].startswith('rw') and hi - lo <= 64 << 20:\n"
            "        seen.update(re.findall(rb'sibling-only:([0-9a-f]{32})', ctypes.string_at(lo, hi - lo)))\n"
            "print(sorted(seen))\n")
        out = evil.run(scribble, fresh=False)
        assert out.error is None and token not in out.stdout
        # and it overwrites the heap the fork shares with its sibling copy-on-write, then dies
        try:
            evil.run("import ctypes\n"
                     "for o in list(globals().values()):\n"
                     "    if isinstance(o, list): o[:] = ['evil'] * len(o)\n"
                     "ctypes.memset(id(df) & ~4095, 0x41, 4096)\n", fresh=False, timeout=10)
        except whpfast.GuestError:        # (it may well crash its own interpreter)
            pass
        assert victim.eval("(secret, sum(vals), int(df.a.sum()))", fresh=False) == \
            ["sibling-only:" + token, 499500, 45]
        assert live.eval("(secret, int(df.a.sum()))", fresh=False) == [None, 45]


def test_a_failed_cell_keeps_the_state(live):
    r = live.run("n += 1\n1/0", fresh=False)
    assert r.error.type == "ZeroDivisionError"
    with pytest.raises(whpfast.GuestPythonError):
        live.eval("undefined_name", fresh=False)
    r = live.run("hog = []\nwhile True: hog.append(bytearray(1 << 20))", fresh=False)
    assert r.error.type == "MemoryError"
    live.run("del hog", fresh=False)
    assert live.eval("(n, int(df.a.sum()))", fresh=False) == [2, 45]


def test_a_timeout_loses_the_live_state_until_a_checkpoint_is_restored(live):
    cp = live.checkpoint()
    with pytest.raises(GuestTimeout):
        live.run("n = 99\nwhile True: pass", fresh=False, timeout=0.5)
    with pytest.raises(SandboxError, match="restore"):
        live.run("n", fresh=False)
    with pytest.raises(SandboxError, match="no live state"):
        live.checkpoint()
    live.restore(cp)
    assert live.eval("n", fresh=False) == 1


def test_checkpoint_save_from_snapshot_and_pool(live, tmp_path):
    cp = live.checkpoint()
    path = cp.save(tmp_path / "live.snap")
    with whpfast.PythonSandbox.from_snapshot(path) as other:
        assert other.eval("(n, int(df.a.sum()))", fresh=False) == [1, 45]
    with whpfast.PythonSandbox.from_snapshot(cp) as other:
        assert other.eval("n", fresh=False) == 1
    with whpfast.Pool(cp, size=1) as pool:
        # a pool restores its snapshot per request: every request sees the checkpoint's state
        assert pool.run("n += 1\nprint(n, len(df))").stdout == "2 10\n"
        assert pool.run("print(n)").stdout == "1\n"


def test_restore_refuses_other_snapshots(live, tmp_path):
    with pytest.raises(TypeError):
        live.restore(str(tmp_path))
    with whpfast.PythonSandbox(memory_size=64 << 20) as small:
        with pytest.raises(whpfast.SnapshotError):
            live.restore(small.checkpoint())
    with pytest.raises(ValueError):
        live.fork(0)


def test_run_python_state_file(tmp_path):
    state = tmp_path / "session.snap"
    cmd = [sys.executable, "-m", "whpfast", "run-python", "--memory", "64", "--state", str(state)]
    r = subprocess.run(cmd + ["-c", "x = 41\nprint('one')"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "one\n") and state.exists()
    r = subprocess.run(cmd + ["-c", "x += 1\nprint(x)\n1/0"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == "42\n" and "ZeroDivisionError" in r.stderr
    r = subprocess.run(cmd + ["-c", "print(x)"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "42\n")
    r = subprocess.run(cmd + ["--setup", "import json", "-c", "pass"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 2 and "--setup" in r.stderr
