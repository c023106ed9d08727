"""What a hostile guest's path names may cost the host (issue 16, item 3), and snapshot files
whose file-system state would only fail on the host once used (item 7).

A guest can make a /tmp path of any length: a chain of directories entered one by one, each
name at most 255 bytes. Every answer that shows such a path (getcwd, readlink of
/proc/self/fd/N, a mapping's name in /proc/self/maps, the former path an unlinked file keeps)
is bounded by PATH_MAX here, as Linux bounds getcwd and readlink, and names are charged to the
/tmp quota by their length. tests/linux/deeppath.c is the hostile guest; the host's peak RSS
(VmHWM) over its run is what is measured."""

import stat
import sys

import pytest

import whpfast
from conftest import build_c
from whpfast.linux import errno as E
from whpfast.linux.errno import LinuxError
from whpfast.linux.fs import AT_FDCWD, O_CREAT, O_PATH, O_RDONLY, O_RDWR, O_WRONLY, FileSystem

MB = 1 << 20
NAME = b"d" * 255
LINK_COST = 2 * 256             # fs._INODE_COST per inode and per name (plus the name's bytes)

# Host growth allowed for the hostile run below (4096 levels of 255-byte names, 100 calls of
# each kind): the /tmp tree itself (~3 MiB of quota, about as much on the host), the guest pages
# the run touches, and slack for the allocator. Before the bound, each mmap kept its own copy of
# the 1 MiB path (100 MiB), each unlinked file another (100 MiB), and every /proc/self/maps read
# built a text of 100 MiB.
HOSTILE_GROWTH_MAX = 48 * MB


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def _reset_peak():
    """Starts VmHWM (peak RSS) over from the current RSS (Linux 4.0+: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")


def err(fn, *args):
    with pytest.raises(LinuxError) as info:
        fn(*args)
    return info.value.errno


def deep_fs(levels, tmp_size=64 * MB):
    """A FileSystem whose cwd is `levels` directories named NAME deep under /tmp."""
    fs = FileSystem([], tmp_size=tmp_size)
    fs.chdir(b"/tmp")
    for _ in range(levels):
        fs.mkdirat(AT_FDCWD, NAME, 0o700)
        fs.chdir(NAME)
    return fs


# ------------------------------------------------------------------ the file system, no VM needed

def test_paths_past_path_max_are_enametoolong_as_on_linux():
    fs = deep_fs(15)                            # /tmp + 15 x 256 = 3844 bytes: still shown
    assert len(fs.getcwd()) == 4 + 15 * 256
    fd = fs.openat(AT_FDCWD, b"f", O_CREAT | O_RDWR, 0o600)
    assert fs.readlinkat(AT_FDCWD, b"/proc/self/fd/%d" % fd) == fs.getcwd() + b"/f"
    fs.mkdirat(AT_FDCWD, NAME, 0o700)
    fs.chdir(NAME)                              # 4100 bytes: Linux's getcwd says ENAMETOOLONG
    assert err(fs.getcwd) == E.ENAMETOOLONG
    fd2 = fs.openat(AT_FDCWD, b"g", O_CREAT | O_RDWR, 0o600)
    assert err(fs.readlinkat, AT_FDCWD, b"/proc/self/fd/%d" % fd2) == E.ENAMETOOLONG
    assert err(fs.readlinkat, AT_FDCWD, b"/proc/self/cwd") == E.ENAMETOOLONG
    # the file itself works as ever, and a mapping of it gets a bounded name
    assert fs.write(fd2, b"data") == 4
    ino = fs._desc(fd2).node.ino
    assert fs.mapping_name(fd2) == b"/tmp/#%d (path too long)" % ino
    assert fs.mapping_name(fd) == fs.readlinkat(AT_FDCWD, b"/proc/self/fd/%d" % fd)
    # arguments: a path of PATH_MAX bytes or a name of 256
    assert err(fs.openat, AT_FDCWD, b"/tmp/" + b"a/" * 2046, O_RDONLY) == E.ENAMETOOLONG
    assert err(fs.mkdirat, AT_FDCWD, b"/tmp/" + b"n" * 256, 0o700) == E.ENAMETOOLONG


def test_unlinked_files_keep_a_bounded_former_path():
    fs = deep_fs(20)
    fds = []
    for i in range(50):
        fds.append(fs.openat(AT_FDCWD, b"u%d" % i, O_CREAT | O_WRONLY, 0o600))
        fs.unlinkat(AT_FDCWD, b"u%d" % i, 0)
    for fd in fds:
        node = fs._desc(fd).node
        assert node.gone == b"/tmp/#%d" % node.ino         # not the 5 KiB path
        assert fs.readlinkat(AT_FDCWD, b"/proc/self/fd/%d" % fd) == node.gone + b" (deleted)"
    tmpfile = fs.openat(AT_FDCWD, b".", 0o20200000 | O_RDWR, 0o600)      # O_TMPFILE
    assert fs._desc(tmpfile).node.gone == b"/tmp/#%d" % fs._desc(tmpfile).node.ino
    # a short path is kept as it was
    fs.chdir(b"/tmp")
    fd = fs.openat(AT_FDCWD, b"short", O_CREAT | O_WRONLY, 0o600)
    fs.unlinkat(AT_FDCWD, b"short", 0)
    assert fs.readlinkat(AT_FDCWD, b"/proc/self/fd/%d" % fd) == b"/tmp/short (deleted)"


def test_tmp_charges_names_by_their_length():
    tmp_size = 256 << 10
    for length in (4, 255):
        fs = FileSystem([], tmp_size=tmp_size)
        made = 0
        with pytest.raises(LinuxError) as info:
            while True:
                fs.mkdirat(AT_FDCWD, b"/tmp/%s" % (b"%d" % made).rjust(length, b"x"), 0o700)
                made += 1
        assert info.value.errno == E.ENOSPC
        per_dir = LINK_COST + length
        assert made == (tmp_size - 256) // per_dir          # the root's inode, then each dir
    # a chain: the same, and symlink targets by their length too
    fs = FileSystem([], tmp_size=tmp_size)
    fs.chdir(b"/tmp")
    levels = 0
    with pytest.raises(LinuxError):
        while True:
            fs.mkdirat(AT_FDCWD, NAME, 0o700)
            fs.chdir(NAME)
            levels += 1
    assert levels == (tmp_size - 256) // (LINK_COST + 255)
    fs = FileSystem([], tmp_size=tmp_size)
    links = 0
    with pytest.raises(LinuxError):
        while True:
            fs.symlinkat(b"t" * 4000, AT_FDCWD, b"/tmp/%05d" % links)
            links += 1
    assert links == (tmp_size - 256) // (LINK_COST + 5 + 4000)


def test_renames_and_unlinked_files_stay_charged():
    fs = FileSystem([], tmp_size=64 << 10)
    fd = fs.openat(AT_FDCWD, b"/tmp/a", O_CREAT | O_RDWR, 0o600)
    assert fs.write(fd, bytes(40 << 10)) == 40 << 10
    fs.unlinkat(AT_FDCWD, b"/tmp/a", 0)
    # the unlinked file's inode and bytes still count while the fd holds it
    assert fs._recount() == 256 + 256 + (40 << 10)
    tmpfile = fs.openat(AT_FDCWD, b"/tmp", 0o20200000 | O_RDWR, 0o600)
    assert fs.write(tmpfile, bytes(20 << 10)) == 20 << 10
    assert fs.write(tmpfile, bytes(8 << 10)) < 8 << 10         # short: the unlinked one counts
    fs.close(fd)
    fs.close(tmpfile)
    assert fs._recount() == 256
    # a rename charges the new name's length
    fs.mkdirat(AT_FDCWD, b"/tmp/x", 0o700)
    fs.renameat(AT_FDCWD, b"/tmp/x", AT_FDCWD, b"/tmp/" + NAME)
    assert fs._recount() == 256 + 256 + 256 + 255


def test_a_full_tmp_with_unlinked_files_held_restores():
    """Former paths are not charged: an unlink never makes /tmp hold more than tmp_size, which
    a reset to a snapshot of it would refuse."""
    fs = deep_fs(10, tmp_size=64 << 10)
    fds = [fs.openat(AT_FDCWD, b"%d" % i, O_CREAT | O_RDWR, 0o600) for i in range(10)]
    fs.write(fds[0], bytes(64 << 10))                   # short: /tmp is full
    for i in range(10):
        fs.unlinkat(AT_FDCWD, b"%d" % i, 0)
    state = FileSystem.decode(fs.encode(fs.capture()))
    fs.reset(state)
    assert fs.readlinkat(AT_FDCWD, b"/proc/self/fd/%d" % fds[3]).endswith(b"/3 (deleted)")


def test_open_descriptions_hold_bounded_host_memory(monkeypatch):
    """Each open of /proc/self/maps holds its text, each directory fd its listing: in all at
    most fs._HELD_MAX, else ENOMEM, instead of max_fds copies."""
    from whpfast.linux import fs as fsmod
    maps = b"x" * (1 << 20)
    fs = FileSystem([], proc_maps=lambda: maps)
    monkeypatch.setattr(fsmod.common, "_HELD_MAX", 8 << 20)
    fds = []
    with pytest.raises(LinuxError) as info:
        for _ in range(100):
            fds.append(fs.openat(AT_FDCWD, b"/proc/self/maps", O_RDONLY, 0))
    assert info.value.errno == E.ENOMEM and len(fds) == 8
    fs.close(fds.pop())
    fds.append(fs.openat(AT_FDCWD, b"/proc/self/maps", O_RDONLY, 0))     # closing gave it back
    for fd in fds:
        fs.close(fd)
    for i in range(3000):
        fs.mkdirat(AT_FDCWD, b"/tmp/%d" % i, 0o700)
    listed = 0
    with pytest.raises(LinuxError) as info:
        for _ in range(100):
            d = fs.openat(AT_FDCWD, b"/tmp", O_RDONLY, 0)
            fs.getdents64(d, 4096)
            listed += 1
    assert info.value.errno == E.ENOMEM and 0 < listed < 100


# ------------------------------------------------------------------------- a hostile guest, in a VM

@pytest.fixture(scope="module")
def deeppath(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("c") / "deeppath", "deeppath.c", "-static")


def _fields(out):
    return {k: int(v) for k, v in (line.split("=") for line in out.decode().split())}


@pytest.mark.hypervisor
@pytest.mark.skipif(sys.platform != "linux", reason="Linux host only (VmHWM)")
def test_a_deep_tmp_path_costs_the_host_a_bounded_amount(deeppath):
    with whpfast.LinuxSandbox([deeppath, "1", "1"], memory_size=64 * MB) as lx:
        assert lx.run(timeout=60).exit_code == 0           # the host's own code paths, warmed
    with whpfast.LinuxSandbox([deeppath, "4096", "100"], memory_size=64 * MB) as lx:
        before = _status_kib("VmRSS")
        _reset_peak()
        r = lx.run(timeout=300)
        growth = (_status_kib("VmHWM") - before) << 10
        held = (_status_kib("VmRSS") - before) << 10
        print(f"host peak RSS growth {growth / MB:.1f} MiB, held after the run {held / MB:.1f} MiB")
        assert growth < HOSTILE_GROWTH_MAX, f"the host grew by {growth / MB:.0f} MiB"
        assert r.exit_code == 0, r.stderr
        got = _fields(r.stdout)
        assert got["levels"] == 4096 and got["mapped"] == 100 and got["unlinked"] == 100
        assert got["getcwd"] == -E.ENAMETOOLONG and got["readlink"] == -E.ENAMETOOLONG
        assert 0 < got["maps"] < 1 * MB
        assert got["open_long"] == -E.ENAMETOOLONG and got["mkdir_long_name"] == -E.ENAMETOOLONG


@pytest.mark.hypervisor
@pytest.mark.skipif(sys.platform != "linux", reason="Linux host only")
def test_a_guest_filling_tmp_with_long_names_gets_enospc_at_the_quota(deeppath):
    tmp_size = 1 * MB
    with whpfast.LinuxSandbox([deeppath, "100000", "1"], memory_size=64 * MB, tmp_size=tmp_size) as lx:
        got = _fields(lx.run(timeout=120).stdout)
    assert got["levels_errno"] == E.ENOSPC
    assert got["levels"] == (tmp_size - 256) // (LINK_COST + 255)


# ------------------------------------------------------------------------- crafted snapshot states

def _craft(fields):
    from whpfast.linux.fs.state import _MAGIC, _dump
    out = [_MAGIC]
    _dump(fields, out)
    return b"".join(out)


def test_decode_refuses_states_that_would_fail_on_the_host():
    fs = FileSystem([])
    good = tuple(fs.capture())
    fds, descs, cwd, umask, tmp, ino = good[:6]
    root = tmp[0]
    link = (99, stat.S_IFLNK, 0o777, 0, 0, 0, b"l", b"target")
    d = (98, stat.S_IFDIR, 0o755, 0, 0, 0, b"d", None)
    cases = {
        "maps without contents": descs + ((("p", b"/proc/self/maps"), O_RDONLY, 0, None),),
        "status without contents": descs + ((("p", b"/proc/self/status"), O_RDONLY, 0, None),),
        "contents on a device": descs + ((("p", b"/dev/null"), O_RDONLY, 0, b"x"),),
        "fd link by path": descs + ((("p", b"/proc/self/fd/0"), O_PATH, 0, None),),
        "bad access mode": descs + ((("c", "stdin"), 3, 0, None),),
        "fd link read": descs + ((("f", 0), O_RDONLY, 0, None),),
    }
    for why, new_descs in cases.items():
        with pytest.raises(ValueError):
            FileSystem.decode(_craft((fds, new_descs, cwd, umask, tmp, ino)))
            pytest.fail(why)
    trees = {
        "symlink target with NUL": (root, link[:7] + (b"a\0b",)),
        "empty symlink target": (root, link[:7] + (b"",)),
        "symlink target of PATH_MAX": (root, link[:7] + (b"a" * 4096,)),
        "former path with NUL": (root, (97, stat.S_IFREG, 0o600, 0, 0, -1, b"/tmp/a\0", b"")),
    }
    for why, new_tmp in trees.items():
        with pytest.raises(ValueError):
            FileSystem.decode(_craft((fds, descs, cwd, umask, new_tmp, ino)))
            pytest.fail(why)
    for why, extra in {"symlink open for reading": ((("t", 1), O_RDONLY, 0, None), (root, link)),
                       "directory open for writing": ((("t", 1), O_RDWR, 0, None), (root, d))}.items():
        with pytest.raises(ValueError):
            FileSystem.decode(_craft((fds, descs + (extra[0],), cwd, umask, extra[1], ino)))
            pytest.fail(why)
    for why, bad_cwd in {"cwd on a console": ("c", "stdin"), "cwd on an fd link": ("f", 0)}.items():
        with pytest.raises(ValueError):
            FileSystem.decode(_craft((fds, descs, bad_cwd, umask, tmp, ino)))
            pytest.fail(why)
    # the good forms still load
    ok = (fds, descs + ((("p", b"/proc/self/maps"), O_RDONLY, 0, b"maps\n"),
                        (("t", 1), O_PATH, 0, None)), cwd, umask, (root, link), ino)
    FileSystem.decode(_craft(ok))


def test_reset_refuses_descriptions_this_file_system_could_not_have_opened(tmp_path):
    from whpfast.errors import SnapshotError
    (tmp_path / "file").write_bytes(b"x")
    fs = FileSystem({"/data": str(tmp_path)})
    fds, descs, cwd, umask, tmp, ino = tuple(fs.capture())[:6]
    for why, desc in {"write access to a host file": (("p", b"/data/file"), O_WRONLY, 0, None),
                      "write access to a synthesized dir": (("p", b"/proc"), O_RDWR, 0, None)}.items():
        state = FileSystem.decode(_craft((fds + ((3, len(descs), False),), descs + (desc,), cwd,
                                          umask, tmp, ino)))
        with pytest.raises(SnapshotError, match="description"):
            fs.reset(state)
            pytest.fail(why)
    state = FileSystem.decode(_craft((fds + ((5000, 0, False),), descs, cwd, umask, tmp, ino)))
    with pytest.raises(SnapshotError, match="fd"):
        fs.reset(state)


# ----------------------------------------------------------------- crafted snapshot files, loaded

def _rewrite_section(path, name, edit):
    """Rewrites section `name` (snapfile.COMPONENTS) of a saved snapshot through `edit` (bytes ->
    bytes) with valid checksums and offsets: what a crafted (not merely corrupted) file is."""
    from whpfast.core import container
    data = path.read_bytes()
    path.write_bytes(container.rebuild(data, {name: edit(container.sections_of(data)[name])}))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A snapshot file of a program parked on stdin with /proc/self/maps open, /tmp/l a symlink."""
    out = tmp_path_factory.mktemp("snap")
    program = build_c(out / "parked", r'''
#include <fcntl.h>
#include <unistd.h>
int main(void) {
    char c;
    if (open("/proc/self/maps", O_RDONLY) != 3 || symlink("/tmp", "/tmp/l")) return 1;
    return read(0, &c, 1) == 1 ? 0 : 2;
}
''', "-static")
    path = out / "good.snap"
    with whpfast.LinuxSandbox([program], memory_size=64 * MB) as lx:
        assert lx.run(timeout=60).waiting
        lx.snapshot().save(path)
    return path


def _edit_fs(edit):
    def rewrite(section):
        state = list(FileSystem.decode(section))
        edit(state)
        return _craft(tuple(state))
    return rewrite


def test_crafted_fs_sections_are_snapshot_errors_at_load(saved, tmp_path):
    from whpfast.linux.process import LinuxSnapshot
    LinuxSnapshot.load(saved)                   # the file as saved loads

    def maps_without_contents(state):
        descs = list(state[1])
        i = next(i for i, d in enumerate(descs) if d[0] == ("p", b"/proc/self/maps"))
        descs[i] = descs[i][:3] + (None,)
        state[1] = tuple(descs)

    def symlink_with_nul(state):
        tmp = list(state[4])
        i = next(i for i, e in enumerate(tmp) if e[6] == b"l")
        tmp[i] = tmp[i][:7] + (b"/t\0mp",)
        state[4] = tuple(tmp)

    for why, edit in {"fd on /proc/self/maps without contents": maps_without_contents,
                      "/tmp symlink target with a NUL byte": symlink_with_nul}.items():
        bad = tmp_path / "crafted.snap"
        bad.write_bytes(saved.read_bytes())
        _rewrite_section(bad, "fs", _edit_fs(edit))
        with pytest.raises(whpfast.SnapshotError, match="file-system state"):
            LinuxSnapshot.load(bad)
            pytest.fail(why)


def test_a_mapping_name_past_path_max_is_a_snapshot_error(saved, tmp_path):
    import json
    from whpfast.linux.process import LinuxSnapshot

    def long_name(section):
        mm = json.loads(section)
        mm["vmas"][0][3] = (b"/" + b"n" * 5000).hex()
        return json.dumps(mm).encode()
    bad = tmp_path / "crafted.snap"
    bad.write_bytes(saved.read_bytes())
    _rewrite_section(bad, "mm", long_name)
    with pytest.raises(whpfast.SnapshotError, match="name"):
        LinuxSnapshot.load(bad)


# ----------------------------------------------------------------------- other guest-chosen sizes

def test_unknown_system_call_numbers_are_counted_in_a_bounded_table():
    """unsupported_syscalls had one key per number the guest tried: a loop over numbers grew
    the host without bound. Past NAMED_NR_MAX they are counted together."""
    from whpfast.linux import syscalls

    class Process:
        unsupported_syscalls = None

    p = Process()
    for dispatch in {syscalls.dispatch, syscalls.py_dispatch}:
        p.unsupported_syscalls = {}
        for nr in range(5000, 25000):
            assert dispatch(p, nr, (0,) * 6) == -E.ENOSYS
        dispatch(p, (1 << 64) - 1, (0,) * 6)
        dispatch(p, 1000, (0,) * 6)
        assert p.unsupported_syscalls == {f"syscall_{syscalls.NAMED_NR_MAX}+": 20001, "syscall_1000": 1}


def test_mapping_names_are_shared_and_maps_text_is_bounded(monkeypatch):
    from whpfast.linux import mm

    class Space:                                # what maps_text and _intern use of one
        vmas = []
        _names, _names_max = {}, mm.MAX_DEAD_NAMES

    space = Space()
    name = b"/tmp/" + b"n" * 4000
    first = mm.AddressSpace._intern(space, bytes(name))
    assert mm.AddressSpace._intern(space, bytes(name)) is first      # one copy for every mmap
    for i in range(3 * mm.MAX_DEAD_NAMES):                             # names of mappings gone
        mm.AddressSpace._intern(space, b"/tmp/%d" % i)
    assert len(space._names) <= mm.MAX_DEAD_NAMES
    space.vmas = [mm.Vma(0x10000 + 2 * i * mm.PAGE, 0x11000 + 2 * i * mm.PAGE, 1, first, 0)
                  for i in range(3000)]
    monkeypatch.setattr(mm, "MAPS_TEXT_MAX", 16 << 20)
    assert len(mm.AddressSpace.maps_text(space)) < 16 << 20            # 12 MB: served
    space.vmas = space.vmas * 2                                         # 24 MB: refused
    with pytest.raises(LinuxError) as info:
        mm.AddressSpace.maps_text(space)
    assert info.value.errno == E.ENOMEM


@pytest.mark.hypervisor
def test_mmap_of_a_tmp_file_copies_the_range_mapped(tmp_path):
    """sys_mmap copies only the mapped range of a /tmp file (it copied the whole file per call):
    the bytes at each offset, zeros past the end of the file, and ENODEV for a directory."""
    program = build_c(tmp_path / "tmpmap", r'''
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/mman.h>
int main(void) {
    static unsigned char page[4096];
    int fd = open("/tmp/f", O_CREAT | O_RDWR, 0600);
    for (int i = 0; i < 3; i++) {
        for (int j = 0; j < 4096; j++) page[j] = (unsigned char)(i * 7 + j);
        if (write(fd, page, 4096) != 4096) return 1;
    }
    if (write(fd, "tail", 4) != 4) return 1;
    unsigned char *m = mmap(NULL, 3 * 4096, PROT_READ, MAP_PRIVATE, fd, 4096);
    if (m == MAP_FAILED) return 2;
    int bad = 0;
    for (int j = 0; j < 4096; j++) bad += m[j] != (unsigned char)(7 + j) || m[4096 + j] != (unsigned char)(14 + j);
    printf("pages=%d tail=%.4s zero=%d\n", bad == 0, m + 2 * 4096, m[2 * 4096 + 4] == 0 && m[3 * 4096 - 1] == 0);
    int d = open("/tmp", O_RDONLY);
    printf("dir=%d\n", mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, d, 0) == MAP_FAILED ? errno : 0);
    return 0;
}
''', "-static")
    with whpfast.LinuxSandbox([program], memory_size=64 * MB) as lx:
        r = lx.run(timeout=60)
    assert r.stdout == b"pages=1 tail=tail zero=1\ndir=%d\n" % E.ENODEV, r.stdout
