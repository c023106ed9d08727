"""File pages shared, not copied: a saved LinuxSnapshot stores the pages of read-only file
mappings that still hold the host file's bytes as references to that file (resolved through the
snapshot's own read policy, its identity and SHA-256 checked) and maps them copy-on-write from
the host file when loaded; restores stay exact and the host file is never written."""

import contextlib
import gc
import hashlib
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import whpfast
from conftest import build_c
from whpfast.linux import snapfile
from whpfast.linux.fs import inside_path, read_mapping
from test_linux_process import _rewrite_meta       # a crafted file: metadata edited, checksums right

MB = 1 << 20
from whpfast.abi import PAGE
SYSTEM_READ = ["/usr", "/lib", "/lib64"]
DATA_SIZE = 3 * PAGE + 100            # a last partial page: past the end of the file reads zero

MAPS_FILES = whpfast.backend.capabilities.file_overlay

pytestmark = [pytest.mark.hypervisor,
              pytest.mark.skipif(sys.platform != "linux", reason="Linux host only: the vDSO clock helper")]


def fnv(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & ((1 << 64) - 1)
    return h


def answer(data):
    return b"fnv %016x tail 0\n" % fnv(data)


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def host_maps(path):
    """Host mappings of `path` in this process: guest memory mapped from it."""
    gc.collect()                        # earlier tests' snapshots and sandboxes unmapped
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.rstrip().endswith(str(path)))


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """The filemap program (dynamic: libc is referenced too) with a data file it maps read-only,
    parked in read(), saved to a file."""
    out = tmp_path_factory.mktemp("filemap")
    build_c(out / "filemap", "filemap.c")
    data = out / "data" / "data.bin"
    data.parent.mkdir()
    data.write_bytes(np.random.default_rng(7).integers(1, 256, DATA_SIZE, dtype=np.uint8).tobytes())
    os.chmod(data, 0o644)
    with whpfast.LinuxSandbox([inside_path(out / "filemap"), inside_path(data)], read=policy(out, data.parent),
                              memory_size=64 * MB) as lx:
        assert lx.run(b"s\n").stdout == answer(data.read_bytes())
        path = lx.snapshot().save(out / "filemap.snap")
    return out, data, Path(path)


def policy(out, data_dir):
    """The subject's read policy: also the grant its snapshot files are loaded under."""
    read = {p: p for p in SYSTEM_READ}
    read.update(read_mapping([out / "filemap", data_dir]))       # (under /tmp: mounted there)
    return read


def _data_runs(snap, data):
    [ref] = [r for r in snap._refs if r.host == os.fsencode(data)]
    return ref.runs


def test_file_pages_are_references_not_bytes_and_are_mapped_from_the_host_file(subject):
    out, data, path = subject
    before = sha(data)
    snap = whpfast.LinuxSnapshot.load(path, read=policy(out, data.parent))
    names = {os.path.basename(r.host) for r in snap._refs}
    assert b"data.bin" in names and any(n.startswith(b"libc.so") for n in names)
    [(guest, offset, length)] = _data_runs(snap, data)
    assert offset == 0 and length == 4 * PAGE       # every page, the partial last one included
    # Holes in the file's image section, and not marked as stored.
    raw = path.read_bytes()
    at = snap._image_offset + guest
    assert raw[at:at + length] == bytes(length)
    before_maps = host_maps(data)
    with whpfast.LinuxSandbox.from_snapshot(snap) as lx:
        if MAPS_FILES:                  # shared with the page cache (KVM); WHP copies
            assert host_maps(data) > before_maps
        else:
            assert host_maps(data) == before_maps
        assert bytes(lx._mem[guest:guest + DATA_SIZE]) == data.read_bytes()
        assert lx.run(b"s\n").stdout == answer(data.read_bytes())
    assert sha(data) == before


def test_a_write_into_a_shared_page_is_private_and_a_restore_puts_the_snapshots_bytes_back(subject):
    """The guest makes the mapping writable and fills it (copy-on-write); the host writes into
    one of its pages behind the guest (lx.mm.store); a restore reads back the snapshot's bytes
    in every page, and the host file never changes."""
    out, data, path = subject
    before, content = sha(data), data.read_bytes()
    snap = whpfast.LinuxSnapshot.load(path, read=policy(out, data.parent))
    [(guest, _, length)] = _data_runs(snap, data)
    with whpfast.LinuxSandbox.from_snapshot(snap) as lx, \
            whpfast.LinuxSandbox.from_snapshot(snap) as other:
        for round in range(3):
            assert lx.run(b"wQ\n").stdout == answer(b"Q" * DATA_SIZE)
            lx.mm.store(guest + PAGE, b"\xee" * 64)
            assert bytes(lx._mem[guest + PAGE:guest + PAGE + 64]) == b"\xee" * 64
            assert other.run(b"s\n").stdout == answer(content)        # another sandbox: untouched
            lx.restore(snap)
            assert bytes(lx._mem[guest:guest + length]) == bytes(snap._image_view[guest:guest + length])
            assert bytes(lx._mem[guest:guest + DATA_SIZE]) == content
            assert lx.run(b"s\n").stdout == answer(content)
    assert sha(data) == before


def test_unmapped_then_mapped_again_pages_read_zero_then_the_file(subject):
    out, data, path = subject
    content = data.read_bytes()
    snap = whpfast.LinuxSnapshot.load(path, read=policy(out, data.parent))
    with whpfast.LinuxSandbox.from_snapshot(snap) as lx:
        for _ in range(2):
            assert lx.run(b"u\n").stdout == answer(bytes(DATA_SIZE))
            assert lx.run(b"m\n").stdout == answer(content)
            lx.restore(snap)
            assert lx.run(b"s\n").stdout == answer(content)


def test_a_file_others_may_write_is_copied_not_mapped(subject, tmp_path):
    """A file another user could truncate under the sandbox (SIGBUS on the host's next access)
    or change in place is referenced, but its pages are copied at load."""
    out, data, path = subject
    os.chmod(data, 0o666)
    try:
        before = host_maps(data)        # (earlier tests' snapshots may not be collected yet)
        snap = whpfast.LinuxSnapshot.load(path, read=policy(out, data.parent))
        [ref] = [r for r in snap._refs if r.host == os.fsencode(data)]
        assert not ref.shared
        with whpfast.LinuxSandbox.from_snapshot(snap) as lx:
            assert host_maps(data) == before
            assert lx.run(b"s\n").stdout == answer(data.read_bytes())
    finally:
        os.chmod(data, 0o644)


def _retarget(meta, old, inside, host):
    """Points the reference to `old` (and the mapping the program sees there) at another file."""
    for f in meta["files"]:
        if bytes.fromhex(f["host"]) == os.fsencode(old):
            old_inside = bytes.fromhex(f["inside"])
            f["inside"], f["host"] = os.fsencode(inside).hex(), os.fsencode(host).hex()
            st = os.stat(host)
            f.update(dev=st.st_dev, ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)
            f["runs"] = [[g, o, min(n, -(-st.st_size // PAGE) * PAGE)] for g, o, n in f["runs"]]
    for v in meta["mm"]["vmas"]:
        if bytes.fromhex(v[3]) == old_inside:
            v[3] = os.fsencode(inside).hex()


@pytest.mark.parametrize("target", ["/etc/shadow", "outside"])
def test_a_reference_to_a_file_outside_the_read_policy_is_refused(subject, tmp_path, target):
    """A crafted file whose reference (and mapping) names a host file the program could not
    open itself: /etc/shadow, or a file beside the data directory, not under `read`."""
    out, data, path = subject
    if target == "outside":
        target = str(out / "secret.bin")
        Path(target).write_bytes(b"secret" * 1000)
    if not os.path.exists(target):
        pytest.fail(f"{target} is missing on this host")
    crafted = tmp_path / "crafted.snap"
    shutil.copyfile(path, crafted)
    _rewrite_meta(crafted, lambda m: _retarget(m, data, target, target))
    with pytest.raises(whpfast.SnapshotError, match="read policy does not let the program open"):
        whpfast.LinuxSnapshot.load(crafted, read=policy(out, data.parent))
    with pytest.raises(whpfast.SnapshotError, match="read policy"):
        whpfast.LinuxSandbox.from_snapshot(crafted, read=policy(out, data.parent))


def test_a_reference_the_address_space_does_not_show_is_refused(subject, tmp_path):
    """A run moved to where the program has no mapping of that file, or overlapping another."""
    out, data, path = subject
    edits = {
        "moved": lambda f: f["runs"][0].__setitem__(0, f["runs"][0][0] + 64 * PAGE),
        "past the file": lambda f: f["runs"][0].__setitem__(2, f["runs"][0][2] + 16 * PAGE),
        "bad hash": lambda f: f.update(sha256="0" * 63 + "x"),
        "doubled": lambda f: f["runs"].append(list(f["runs"][0])),
    }
    for name, edit in edits.items():
        crafted = tmp_path / "crafted.snap"
        shutil.copyfile(path, crafted)

        def change(meta):
            for f in meta["files"]:
                if bytes.fromhex(f["host"]) == os.fsencode(data):
                    edit(f)
        _rewrite_meta(crafted, change)
        with pytest.raises(whpfast.SnapshotError, match="not a usable Linux snapshot"):
            whpfast.LinuxSnapshot.load(crafted, read=policy(out, data.parent))


@contextlib.contextmanager
def _one_byte_changed(data):
    """`data` with byte 100 flipped and its size and modification time as they were (so only
    the content tells); put back afterwards. Yields the original content."""
    content, st = data.read_bytes(), os.stat(data)
    try:
        data.write_bytes(content[:100] + bytes([content[100] ^ 1]) + content[101:])
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
        yield content
    finally:
        data.write_bytes(content)
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_changed_file_is_refused_naming_it(subject, tmp_path):
    out, data, path = subject
    with _one_byte_changed(data) as content:
        # Same size, modification time put back: only the hash can tell.
        with pytest.raises(whpfast.SnapshotError, match=r"data\.bin.*SHA-256 differs.*make the snapshot again"):
            whpfast.LinuxSnapshot.load(path, read=policy(out, data.parent))
        # Modified the ordinary way: its identity says so before any hashing.
        data.write_bytes(content)
        with pytest.raises(whpfast.SnapshotError, match=r"data\.bin.*changed since the snapshot was made"):
            whpfast.LinuxSnapshot.load(path, read=policy(out, data.parent))
    assert whpfast.LinuxSnapshot.load(path, read=policy(out, data.parent))._refs          # as it was: loads again


def test_a_file_made_by_an_older_whpfast_is_refused_with_what_to_do(subject, tmp_path):
    """A file of the format before the snapshot container (magic WHPFLNX1), and a container file
    of an older major, are refused saying to make them again."""
    out, data, path = subject
    raw = bytearray(path.read_bytes())
    older_major = bytearray(raw)
    struct.pack_into("<H", older_major, 8, 0)
    size = struct.unpack_from("<I", raw, 20)[0]
    struct.pack_into("<I", older_major, size - 4, zlib.crc32(older_major[:size - 4]))
    for name, old_bytes in (("v4.snap", b"WHPFLNX1" + struct.pack("<I", 4) + raw[12:]),
                            ("major0.snap", older_major)):
        old = tmp_path / name
        old.write_bytes(old_bytes)
        with pytest.raises(whpfast.SnapshotError, match="made by an older whpfast.*make it again"):
            whpfast.LinuxSnapshot.load(old, read=policy(out, data.parent))


def test_a_loaded_snapshot_saves_again_with_the_same_references(subject, tmp_path):
    out, data, path = subject
    snap = whpfast.LinuxSnapshot.load(path, read=policy(out, data.parent))
    again = whpfast.LinuxSnapshot.load(snap.save(tmp_path / "again.snap"), read=policy(out, data.parent))
    assert [(r.host, r.runs, r.sha256) for r in again._refs] == [(r.host, r.runs, r.sha256) for r in snap._refs]
    assert np.array_equal(again._nonzero, snap._nonzero)
    with whpfast.LinuxSandbox.from_snapshot(again) as lx:
        assert lx.run(b"s\n").stdout == answer(data.read_bytes())


# -- live mappings: a program's read-only mmap of a host file is that file, copy-on-write ----------

def _boot(subject):
    out, data, _ = subject
    return whpfast.LinuxSandbox([inside_path(out / "filemap"), inside_path(data)], read=policy(out, data.parent),
                                memory_size=64 * MB)


def _differing_pages(a, b):
    a, b = np.frombuffer(a, np.uint8).reshape(-1, PAGE), np.frombuffer(b, np.uint8).reshape(-1, PAGE)
    return set(np.flatnonzero((a != b).any(axis=1)).tolist())


def _mapping_of(lx, data):
    [v] = [v for v in lx.mm.vmas if v.name == inside_path(data).encode()]
    return v.start


def test_a_live_read_only_file_mapping_shares_the_host_file(subject):
    out, data, _ = subject
    before = host_maps(data)
    with _boot(subject) as lx:
        assert lx.run(b"s\n").stdout == answer(data.read_bytes())
        if MAPS_FILES:
            assert host_maps(data) == before + 1 and lx.mm.shared >= 1
        else:
            assert host_maps(data) == before and lx.mm.shared == 0
        guest = _mapping_of(lx, data)
        assert bytes(lx._mem[guest:guest + DATA_SIZE]) == data.read_bytes()
        assert not any(lx._mem[guest + DATA_SIZE:guest + 4 * PAGE])      # past the end: zero


def test_map_unmap_write_cycles_then_restore_give_back_the_snapshot_exactly(subject):
    """munmap (fresh zero pages in its place), mmap MAP_FIXED of the file again, mprotect
    writable + a write (a private copy on the host: the dirty log must report it), in every
    order: each restore brings back the snapshot's bytes in every page, and the file never
    changes."""
    out, data, _ = subject
    before, content = sha(data), data.read_bytes()
    with _boot(subject) as lx:
        assert lx.run(b"s\n").stdout == answer(content)
        snap = lx.snapshot()
        guest = _mapping_of(lx, data)
        vvar = {p for v in lx.mm.vmas if v.name == b"[vvar]" for p in range(v.start // PAGE, v.end // PAGE)}
        for commands in ([b"u\n", b"m\n"], [b"wA\n"], [b"u\n"], [b"m\n", b"wB\n", b"u\n", b"m\n"],
                         [b"u\n", b"m\n", b"wC\n"]):
            for c in commands:
                lx.run(c)
            lx.restore(snap)
            assert lx.last_restore["pages_copied"] + lx.last_restore["pages_zeroed"] >= 4
            differ = _differing_pages(lx._mem, snap._image_view)
            assert differ <= vvar, (commands, sorted(differ)[:8])
            assert bytes(lx._mem[guest:guest + DATA_SIZE]) == content
            assert lx.run(b"s\n").stdout == answer(content)
    assert sha(data) == before


def test_a_host_file_changed_in_place_under_a_live_mapping(subject, tmp_path):
    """MAP_PRIVATE semantics, as Linux has them: where the file is mapped (KVM), pages the guest
    has not written show a change made in place on the host afterwards; where it is copied
    (WHP), they keep the bytes of the moment of mapping. (Only files no other user may write
    are mapped: mm.shareable.)"""
    out, data, _ = subject
    content, st = data.read_bytes(), os.stat(data)
    changed = b"\x01" * 200 + content[200:]
    with _boot(subject) as lx:
        assert lx.run(b"s\n").stdout == answer(content)
        try:
            with open(data, "r+b") as f:          # in place: same inode, the page cache changes
                f.write(changed[:200])
            assert lx.run(b"s\n").stdout == answer(changed if MAPS_FILES else content)
        finally:
            data.write_bytes(content)
            os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_references_are_bounded_and_the_rest_is_stored(subject, tmp_path, monkeypatch):
    """Each reference run is a host mapping per sandbox: past MAX_REF_RUNS the smallest runs
    are stored as bytes instead, and the file loads and runs the same."""
    out, data, path = subject
    snap = whpfast.LinuxSnapshot.load(path, read=policy(out, data.parent))
    runs = sorted(n for r in snap._refs for _, _, n in r.runs)
    assert len(runs) >= 2
    monkeypatch.setattr(snapfile, "MAX_REF_RUNS", 1)
    small = whpfast.LinuxSnapshot.load(snap.save(tmp_path / "one.snap"), read=policy(out, data.parent))
    assert [n for r in small._refs for _, _, n in r.runs] == [runs[-1]]
    assert np.array_equal(small._nonzero | snap._nonzero, small._nonzero)
    with whpfast.LinuxSandbox.from_snapshot(small) as lx:
        assert lx.run(b"s\n").stdout == answer(data.read_bytes())


def test_discarding_anonymous_pages_frees_them_beside_live_file_mappings(tmp_path):
    """A dynamic program (libc mapped from the host file) discarding its anonymous pages: they
    are freed with MADV_DONTNEED and read zero, not remapped (which costs host mappings, and
    past 64 leaves them resident) as pages under a file mapping must be."""
    build_c(tmp_path / "discard", "discard.c")
    read = {p: p for p in SYSTEM_READ}
    read.update(read_mapping([tmp_path / "discard"]))
    with whpfast.LinuxSandbox([inside_path(tmp_path / "discard")], read=read, memory_size=64 * MB) as lx:
        assert lx.run(b"s\n").stdout == b"nonzero 1048576\n"
        assert (lx.mm.shared > 0) == MAPS_FILES and lx.mm.files is not None
        remaps = getattr(lx._memory, "remaps", 0)
        for command in (b"u\n", b"wA\n", b"d\n", b"wB\n", b"f\n", b"p\n"):
            lx.run(command)
        assert lx.run(b"d\n").stdout == b"nonzero 0\n"
        assert getattr(lx._memory, "remaps", 0) == remaps


def test_a_read_policy_that_no_longer_works_on_the_host_is_a_snapshot_error(subject, tmp_path):
    """The directory the references resolve through is gone: a SnapshotError at load, not
    some other error later."""
    out, data, _ = subject
    gone = tmp_path / "gone"
    gone.mkdir()
    shutil.copyfile(data, gone / "data.bin")
    read = {p: p for p in SYSTEM_READ}
    read.update(read_mapping([out / "filemap", gone]))
    with whpfast.LinuxSandbox([inside_path(out / "filemap"), inside_path(gone / "data.bin")], read=read,
                              memory_size=64 * MB) as lx:
        assert lx.run(b"s\n").stdout == answer(data.read_bytes())
        path = lx.snapshot().save(tmp_path / "gone.snap")
    shutil.rmtree(gone)
    with pytest.raises(whpfast.SnapshotError, match=f"host path '{gone}' .* does not work on this host"):
        whpfast.LinuxSnapshot.load(path, read=policy(out, tmp_path))     # granted, but gone


def test_a_host_checks_a_file_once_and_still_refuses_it_changed(subject, tmp_path, monkeypatch):
    """Issue 21 goal 7: the second load of a snapshot file on a host skips the image checksum and
    the referenced files' SHA-256 (core/verified.py remembers them by file identity, ctime
    included) -- and a referenced file changed since, even with its size and mtime put back, is
    still refused: its ctime moved, so nothing remembered applies."""
    from whpfast.core import verified
    from whpfast.linux import snapfile
    out, data, path = subject
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "RACY_NS", 0)             # (the files were made a moment ago)
    digests = []
    real_digest = snapfile._digest
    monkeypatch.setattr(snapfile, "_digest", lambda *a: digests.append(a) or real_digest(*a))
    whpfast.LinuxSnapshot.load(path, read=policy(out, data.parent))
    first = len(digests)
    assert first > 0 and len(os.listdir(tmp_path / "cache" / "whpfast" / "verified")) == 1
    whpfast.LinuxSnapshot.load(path, read=policy(out, data.parent))
    assert len(digests) == first                            # nothing hashed again
    with _one_byte_changed(data):
        with pytest.raises(whpfast.SnapshotError, match=r"data\.bin.*SHA-256 differs"):
            whpfast.LinuxSnapshot.load(path, read=policy(out, data.parent))
    # Records in a directory others may write are neither believed nor made.
    os.chmod(tmp_path / "cache" / "whpfast" / "verified", 0o777)
    before = len(digests)
    whpfast.LinuxSnapshot.load(path, read=policy(out, data.parent))
    assert len(digests) > before
    # A check in the same clock tick as the file's last change is not remembered (racy).
    monkeypatch.setattr(verified, "RACY_NS", 10 ** 18)
    os.chmod(tmp_path / "cache" / "whpfast" / "verified", 0o700)
    entries = len(os.listdir(tmp_path / "cache" / "whpfast" / "verified"))
    fresh = tmp_path / "fresh.snap"
    shutil.copyfile(path, fresh)
    whpfast.LinuxSnapshot.load(fresh, read=policy(out, data.parent))
    assert len(os.listdir(tmp_path / "cache" / "whpfast" / "verified")) == entries
