"""LinuxSnapshot on disk: a small format of its own, so the SDK's snapshot format stays as it is.

    offset 0   header: magic, version, memory size, then a table of sections, each (name, offset,
               length, CRC-32); the header carries a CRC-32 of itself
    ...        "meta"   JSON: how to rebuild the sandbox (argv, read policy, sizes), the address
                        space, the signal table, pending input, the vCPU state part sizes
               "vcpu"   the backend's raw register structs, concatenated
               "fs"     FileSystem.encode() of the file system's state
               "bitmap" the image's non-zero pages, uint64 words
    (64 KiB    "image"  the memory image, memory_size bytes at the first 64 KiB boundary after the
    aligned)            bitmap. Only its extents (runs of non-zero pages, merged across small gaps:
                        snapshot._extents of the bitmap, so the file need not list them) are
                        written; the rest is a hole, so the file is sparse. Its CRC-32 covers the
                        extents' bytes in order.

Pages of read-only file mappings (a program's libraries: most of a warm Python sandbox) are
not stored when they still hold exactly the host file's bytes: "meta" lists them as references,
per file (the path the program opened it by, the host path that resolved to through the read
policy, st_dev, st_ino, size, mtime_ns, the SHA-256 of the referenced bytes) with the runs
(guest address, file offset, length) of pages that hold them; those pages are holes in the
image, and "bitmap" marks only the pages the image stores. Loading resolves each reference's
path again THROUGH THE SNAPSHOT'S OWN READ POLICY (a reference never gives the program a host
file it could not open itself), checks the file's identity and hash, and maps the pages
copy-on-write from the host file (MAP_PRIVATE over the guest memory: every process shares the
host's page cache copy), or copies them where that is not possible or not safe (see
_apply_refs).

A sandbox made from the file maps the extents copy-on-write (whpfast.snapshot.map_image, as the
SDK's Sandbox.from_snapshot does): sandboxes made from one file share its page cache and pay only
for the pages they write. Snapshot files are therefore immutable once written; save() writes a
new file and renames it over the old one. A file that a user other than root or this process's
owner can write is never mapped (whpfast.snapshot.load_image): its image is read into private
memory, and sandboxes copy from there.

Everything read is untrusted: every length, offset, checksum and field is checked before use
and any problem is a SnapshotError saying what is wrong."""

import hashlib
import json
import os
import stat
import struct
import zlib
from bisect import bisect_right
from collections import namedtuple

import numpy as np

from ..core import verified
from .. import backend, cpu
from ..errors import SnapshotError
from ..snapshot import IMAGE_ALIGN, _extents, extents_crc, load_image, write_sparse
from .fs.state import PATH_MAX
from .errno import LinuxError
from .mm import PAGE, PROT_WRITE, USER_MIN, MmState, Vma, page_table_bytes, page_up, shareable

MAGIC = b"WHPFLNX1"
VERSION = 4            # 2: the image, page aligned and sparse (was packed); 3: "meta" records
                       # the CPU identity (whpfast/cpu.py); 4: file pages stored as references
HEADER = struct.Struct("<8sIIQI")          # magic, version, header size, memory size, sections
SECTION = struct.Struct("<8sQQI4x")
SECTIONS = ("meta", "vcpu", "fs", "bitmap", "image")
MAX_META = 64 << 20
MAX_MEMORY = 64 << 30
# Each extent is one host mapping per sandbox made from the file (vm.max_map_count is 65530):
# fewer, larger extents let many sandboxes share one file, at the cost of a few zero pages stored.
MAX_EXTENTS = 512
# Each reference run is one more host mapping per sandbox (as an extent is); past this many the
# smallest runs are stored as bytes instead.
MAX_REF_RUNS = 2048
COMPARE_CHUNK = 4 << 20    # bytes of a file compared with guest memory at once when saving

# One referenced host file. runs: ((guest address, file offset, length), ...), page-aligned
# guest addresses and lengths, in guest address order. fd (loaded only): the host file, open.
# shared: whether its pages may be mapped from the file (else they are copied, see mm.shareable).
FileRef = namedtuple("FileRef", "inside host dev ino size mtime_ns sha256 runs fd shared",
                     defaults=(None, False))


def save(snapshot, path):
    path = os.fspath(path)
    meta = dict(snapshot.meta)
    mm_state, fs_state, proc, io = snapshot._components
    fs_bytes = snapshot._fs_codec.encode(fs_state)
    meta["mm"] = {"vmas": [[v.start, v.end, v.prot, v.name.hex(), v.offset, v.pristine] for v in mm_state.vmas],
                  "brk_start": mm_state.brk_start, "brk": mm_state.brk}
    meta["proc"] = {"actions": [a.hex() for a in proc.actions], "sigmask": proc.sigmask,
                    "altstack": proc.altstack.hex()}
    meta["io"] = {"input": io.input.hex(), "eof": io.eof, "waiting": io.waiting, "exit_code": io.exit_code}
    parts = backend.impl.STATE_PARTS
    meta["vcpu_parts"] = [[p, len(snapshot._state[p])] for p in parts]
    memory_size = snapshot.meta["memory_size"]
    view = snapshot._image_view
    refs = _references(snapshot, mm_state, view)
    meta["files"] = [{"inside": r.inside.hex(), "host": r.host.hex(), "dev": r.dev, "ino": r.ino,
                      "size": r.size, "mtime_ns": r.mtime_ns, "sha256": r.sha256,
                      "runs": [list(run) for run in r.runs]} for r in refs]
    stored = snapshot._nonzero & ~_ref_bitmap(refs, memory_size // PAGE)   # the rest: references
    extents = _extents(stored, memory_size // PAGE, MAX_EXTENTS)
    sections = {
        "meta": json.dumps(meta, sort_keys=True).encode(),
        "vcpu": b"".join(snapshot._state[p] for p in parts),
        "fs": fs_bytes,
        "bitmap": stored.tobytes(),
    }
    image_crc = extents_crc(view, extents)
    header_size = HEADER.size + SECTION.size * len(SECTIONS) + 4
    table, offset = [], header_size
    for name in SECTIONS[:-1]:
        table.append(SECTION.pack(name.encode(), offset, len(sections[name]), zlib.crc32(sections[name])))
        offset += len(sections[name])
    image_offset = _image_offset(offset)
    table.append(SECTION.pack(b"image", image_offset, memory_size, image_crc))
    header = HEADER.pack(MAGIC, VERSION, header_size, memory_size, len(SECTIONS)) + b"".join(table)
    header += struct.pack("<I", zlib.crc32(header))
    return write_sparse(path, header + b"".join(sections[name] for name in SECTIONS[:-1]), view,
                        extents, image_offset, memory_size)


def _policy(config):
    """A FileSystem with the snapshot's read policy: references are resolved through it, as the
    program's own open() would be."""
    from .fs import FileSystem
    return FileSystem.of_config(config)


def _open_inside(fs, inside):
    """(host fd, host path, fstat) of the regular host file the program would get by opening
    `inside` read-only; the fd is the caller's to close. LinuxError when it could not open it
    (or it is no host file: /tmp, a synthesized file)."""
    from .fs import AT_FDCWD, O_RDONLY
    from .errno import ENODEV
    fd = fs.openat(AT_FDCWD, inside, O_RDONLY)
    try:
        host = fs.host_file(fd)
        if host is None:
            raise LinuxError(ENODEV, "not a host file")
        hfd = os.dup(host[0])
        return hfd, os.fsencode(fs._desc(fd).node.host), os.fstat(hfd)
    finally:
        fs.close(fd)


def _references(snapshot, mm_state, view):
    """The FileRefs for this image: the pages of read-only pristine file mappings whose bytes
    equal the host file's now (compared, page by page: pristine is a claim, not a proof)."""
    by_name = {}
    for v in mm_state.vmas:
        if v.pristine and not v.prot & PROT_WRITE and v.name.startswith(b"/"):
            by_name.setdefault(v.name, []).append(v)
    if not by_name:
        return []
    try:
        fs = _policy(snapshot.meta["config"])
    except ValueError:          # ReadPolicyError: a read path is gone from the host since
        return []               # (every page is stored then)
    found = []
    try:
        for inside, vmas in by_name.items():
            try:
                hfd, host, st = _open_inside(fs, inside)
            except (LinuxError, OSError):
                continue                    # gone or not a host file: its pages are stored
            try:
                runs = []
                for v in vmas:
                    end = min(v.end, v.start + page_up(max(st.st_size - v.offset, 0)))
                    for lo in range(v.start, end, COMPARE_CHUNK):
                        hi = min(lo + COMPARE_CHUNK, end)
                        at = v.offset + (lo - v.start)
                        want = np.zeros(hi - lo, dtype=np.uint8)
                        data = os.pread(hfd, hi - lo, at)
                        want[:len(data)] = np.frombuffer(data, dtype=np.uint8)
                        have = np.frombuffer(view[lo:hi], dtype=np.uint8)
                        same = (have == want).reshape(-1, PAGE).all(axis=1)
                        for first, count in _true_runs(same):
                            g, o, n = lo + first * PAGE, at + first * PAGE, count * PAGE
                            if runs and runs[-1][0] + runs[-1][2] == g and runs[-1][1] + runs[-1][2] == o:
                                runs[-1][2] += n
                            else:
                                runs.append([g, o, n])
                if runs:
                    found.append((inside, host, st, runs, hfd))
                    hfd = None
            finally:
                if hfd is not None:
                    os.close(hfd)
        # Bounded host mappings per sandbox: past MAX_REF_RUNS, the smallest runs are stored.
        ranked = sorted(((run[2], i, j) for i, (*_, runs, _) in enumerate(found)
                         for j, run in enumerate(runs)), reverse=True)
        keep = {(i, j) for _, i, j in ranked[:MAX_REF_RUNS]}
        refs = []
        for i, (inside, host, st, runs, hfd) in enumerate(found):
            chosen = [tuple(run) for j, run in enumerate(runs) if (i, j) in keep]
            if chosen:
                refs.append(FileRef(inside, host, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                    _digest(view, chosen, st.st_size), tuple(chosen)))
        return refs
    finally:
        for *_, hfd in found:
            os.close(hfd)
        fs.close_all()


def _true_runs(flags):
    """(first, count) of each run of True in a bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flags.view(np.int8), [0]))))
    return zip(edges[::2].tolist(), (edges[1::2] - edges[::2]).tolist())


def _digest(view, runs, size):
    """SHA-256 of the file bytes the runs reference, in order (a last partial page without its
    zero tail), as they lie in guest memory `view`."""
    h = hashlib.sha256()
    for g, o, n in runs:
        h.update(view[g:g + max(0, min(n, size - o))])
    return h.hexdigest()


def _identity(st):
    """What core/verified.py knows a file by (its ctime last)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _ref_bitmap(refs, pages):
    bits = np.zeros(-(-pages // 64) * 64, dtype=bool)
    for r in refs:
        for g, _, n in r.runs:
            bits[g // PAGE:(g + n) // PAGE] = True
    return np.packbits(bits, bitorder="little").view(np.uint64)


def _decode_refs(files, memory_size, mm_state):
    """The FileRefs of a file's "meta", every field checked: runs inside user memory, in order,
    not overlapping, within the file's pages, and each lying in read-only mappings of that very
    file at those offsets (what the program sees there is that file, as the address space says)."""
    if not isinstance(files, list) or len(files) > MAX_REF_RUNS:
        raise ValueError("file references are invalid")
    top = memory_size - page_table_bytes(memory_size) - PAGE
    refs, total, spans = [], 0, []
    for f in files:
        inside, host = bytes.fromhex(f["inside"]), bytes.fromhex(f["host"])
        if not inside.startswith(b"/") or b"\0" in inside or b"\0" in host or len(inside) > 4096:
            raise ValueError("a referenced file's path is invalid")
        for key in ("dev", "ino", "size", "mtime_ns"):
            if type(f[key]) is not int or not 0 <= f[key] < 1 << 64:
                raise ValueError(f"a referenced file's {key} is invalid")
        digest = f["sha256"]
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ValueError("a referenced file's SHA-256 is invalid")
        runs = []
        for run in f["runs"]:
            if not (isinstance(run, list) and len(run) == 3 and all(type(x) is int for x in run)):
                raise ValueError("a reference run is invalid")
            g, o, n = run
            if g % PAGE or n % PAGE or n <= 0 or g < USER_MIN or g + n > top or not 0 <= o < f["size"] \
                    or o + n > page_up(f["size"]):
                raise ValueError(f"reference run {g:#x}+{n:#x} (file offset {o:#x}) is outside "
                                 f"memory or the file")
            _check_mapped(mm_state, inside, g, o, n)
            runs.append((g, o, n))
            spans.append((g, g + n))
        total += len(runs)
        if not runs or total > MAX_REF_RUNS:
            raise ValueError("too many or too few reference runs")
        refs.append(FileRef(inside, host, f["dev"], f["ino"], f["size"], f["mtime_ns"], digest, tuple(runs)))
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError("reference runs overlap")
    return refs


def _check_mapped(mm_state, inside, g, o, n):
    vmas = mm_state.vmas
    i = bisect_right(mm_state.starts, g) - 1
    end = g + n
    while g < end:
        if i < 0 or i >= len(vmas) or not vmas[i].start <= g < vmas[i].end:
            raise ValueError(f"reference run at {g:#x} lies outside the mappings")
        v = vmas[i]
        if v.name != inside or v.prot & PROT_WRITE or not v.pristine or v.offset + (g - v.start) != o:
            raise ValueError(f"reference run at {g:#x} is not a read-only mapping of that file there")
        o += min(v.end, end) - g
        g = min(v.end, end)
        i += 1


def _resolve_refs(refs, config, bad):
    """Opens each reference's file through the snapshot's read policy and checks it is the file
    the snapshot was made with; returns the FileRefs with fd and shared set (the fds are the
    caller's to close)."""
    if not refs:
        return []
    try:
        fs = _policy(config)
    except ValueError as e:     # ReadPolicyError
        raise bad(f"its read policy does not work on this host ({e}), and it refers to files "
                  f"through it") from None
    out = []
    try:
        for r in refs:
            name = os.fsdecode(r.inside)
            try:
                hfd, host, st = _open_inside(fs, r.inside)
            except (LinuxError, OSError) as e:
                raise bad(f"it refers to {name}, which its own read policy does not let the program "
                          f"open ({e}): a crafted file, or the file is gone; make the snapshot again")
            out.append(r._replace(fd=hfd, shared=shareable(st)))
            if host != r.host:
                raise bad(f"it refers to {name}, which now resolves to {os.fsdecode(host)}, not "
                          f"{os.fsdecode(r.host)}: make the snapshot again")
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (r.dev, r.ino, r.size, r.mtime_ns):
                raise bad(f"{name} ({os.fsdecode(host)}) changed since the snapshot was made (its "
                          f"inode, size or modification time differ): make the snapshot again")
        return out
    except BaseException:
        for r in out:
            os.close(r.fd)
        raise
    finally:
        fs.close_all()


def apply_refs(memory, refs, source=None):
    """Puts the referenced pages into memory (fresh, zero where they lie): mapped copy-on-write
    from the host file where the backend can (KVM: GuestMemory.overlay_file), the file is
    shareable and the offset page aligned; else copied, from `source` (a view of memory that
    holds them) or the file. On WHP the memory is VirtualAlloc'ed and the WHv* layer pins its
    pages when the partition maps them, so nothing can be mapped over it: there every
    referenced page is copied. A last partial page reads zero past the end of the file either
    way (the kernel zero-fills it; a copy leaves it zero)."""
    overlay = getattr(memory, "overlay_file", None)       # GuestMemory (KVM), not FileMapping
    view = None
    try:
        for r in refs:
            for g, o, n in r.runs:
                if overlay is not None and r.shared and o % PAGE == 0:
                    overlay(r.fd, o, g, n)
                    continue
                if view is None:
                    view = memoryview(memory)
                if source is not None:
                    view[g:g + n] = source[g:g + n]
                else:
                    got = os.preadv(r.fd, [view[g:g + n]], o)
                    view[g + got:g + n] = bytes(n - got)
    finally:
        if view is not None:
            view.release()


def _image_offset(end):
    """Where the image starts: the first 64 KiB boundary after the sections (Windows maps file
    views only there; on Linux any page would do)."""
    return -(-end // IMAGE_ALIGN) * IMAGE_ALIGN


def load(path, fs_decode, grant):
    """Reads and checks a snapshot file; returns (meta, vcpu state, components, image, nonzero,
    file, extents, image offset, refs) with the components decoded (fs through fs_decode) and
    meta["config"] checked, and what it declares held to `grant` (grant.Grant: the caller's
    authority) before any host file it refers to is opened. The image is the whole memory image: the file's image section
    mapped read-only, or, when the file references host files, guest-sized memory holding the
    section's extents and the referenced pages (both mapped copy-on-write where the backend can,
    see apply_refs). file is the open file it came from (the caller's to close, with the image
    and the refs' fds), extents the stored pages' runs, refs the FileRefs, resolved and open."""
    path = os.fspath(path)

    def bad(why):
        return SnapshotError(f"{path} is not a usable Linux snapshot: {why}")

    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore it)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"cannot open snapshot {path!r}: {e.strerror}") from e
    f = os.fdopen(fd, "rb")
    try:
        return _load(f, path, bad, fs_decode, grant)
    except BaseException:
        f.close()
        raise


def _load(f, path, bad, fs_decode, grant):
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        raise bad("not a regular file")
    size = st.st_size
    head = f.read(HEADER.size)
    if len(head) != HEADER.size:
        raise bad("too short")
    magic, version, header_size, memory_size, n = HEADER.unpack(head)
    if magic != MAGIC:
        raise bad("wrong magic (not a whpfast Linux snapshot)")
    if version != VERSION:
        raise bad(f"format version {version}: made by "
                  f"{'an older' if version < VERSION else 'a newer'} whpfast, which this one "
                  f"(version {VERSION}) does not read; make the snapshot again with this one")
    if n != len(SECTIONS) or header_size != HEADER.size + SECTION.size * n + 4:
        raise bad("wrong section count")
    if memory_size % (2 << 20) or not 16 << 20 <= memory_size <= MAX_MEMORY:
        raise bad(f"memory size {memory_size:#x} is invalid")
    rest = f.read(header_size - HEADER.size)
    if len(rest) != header_size - HEADER.size:
        raise bad("truncated header")
    if zlib.crc32(head + rest[:-4]) != struct.unpack("<I", rest[-4:])[0]:
        raise bad("header checksum mismatch")
    table = {}
    expected = header_size
    for i, name in enumerate(SECTIONS):
        raw_name, offset, length, crc = SECTION.unpack_from(rest, i * SECTION.size)
        if name == "image":
            expected = _image_offset(expected)
            if length != memory_size:
                raise bad(f"the image has {length} bytes, memory {memory_size}")
        if raw_name.rstrip(b"\0") != name.encode() or offset != expected or offset + length > size:
            raise bad(f"section {name!r} is misplaced or truncated")
        table[name] = (offset, length, crc)
        expected = offset + length
    if expected != size:
        raise bad("trailing or missing bytes")

    def section(name, limit):
        offset, length, crc = table[name]
        if length > limit:
            raise bad(f"section {name!r} is too large")
        f.seek(offset)
        data = f.read(length)
        if len(data) != length or zlib.crc32(data) != crc:
            raise bad(f"section {name!r} checksum mismatch")
        return data

    pages = memory_size // PAGE
    words = (pages + 63) // 64
    try:
        meta = json.loads(section("meta", MAX_META))
    except (ValueError, RecursionError) as e:       # RecursionError: nesting too deep
        raise bad(f"metadata is not JSON ({str(e)[:200]})") from None
    state_bytes = section("vcpu", 1 << 20)
    fs_bytes = section("fs", 1 << 30)
    bitmap = section("bitmap", words * 8)
    if len(bitmap) != words * 8:
        raise bad("page bitmap has the wrong size")
    stored = np.frombuffer(bitmap, dtype=np.uint64).copy()
    if pages % 64 and int(stored[-1]) >> (pages % 64):
        raise bad("page bitmap marks pages past the end of memory")
    try:
        state, components = _decode_meta(meta, state_bytes, memory_size, fs_bytes, fs_decode)
        from .process import _check_config      # (process imports this module)
        meta["config"] = _check_config(meta["config"])
        meta["clock"] = _check_clock(meta.get("clock"))
        refs = _decode_refs(meta.pop("files"), memory_size, components[0])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise bad(f"metadata is inconsistent ({type(e).__name__}: {e})") from None
    why = cpu.incompatibility(meta["cpu"])          # before anything is mapped or runs
    if why:
        raise bad(why)
    grant.check(meta["config"], memory_size, f"snapshot {path}")
    referenced = _ref_bitmap(refs, pages)
    if np.any(stored & referenced):
        raise bad("pages are both stored and referenced")
    # The extents follow from the bitmap (they cover every stored page by construction); pages
    # outside them come from anonymous memory, zero whatever the file's holes hold.
    extents = _extents(stored, pages, MAX_EXTENTS)
    offset, _, crc = table["image"]
    refs = _resolve_refs(refs, meta["config"], bad)
    image = None
    try:
        image = load_image(f, offset, memory_size, extents, writable=bool(refs))
        # The image's checks and the referenced files' hashes, unless this host made them before
        # for this very file and these very references (core/verified.py: identities, ctimes
        # included, unchanged: so are their bytes).
        identities = tuple(_identity(os.fstat(r.fd)) for r in refs)
        record = f"crc {crc:08x} " + hashlib.sha256(repr([(r.runs, r.sha256) for r in refs]).encode()).hexdigest()
        checked = verified.known("snapshot", st, identities) == record
        if not checked:
            with memoryview(image) as view:
                got = 0
                for first, count in extents:
                    got = zlib.crc32(view[first * PAGE:(first + count) * PAGE], got)
                if got != crc:
                    raise bad("page data checksum mismatch")
                # Zero pages inside an extent (a merged gap) are mapped from the file too: they
                # must be zero there, as the bitmap says (restores zero them; a guest must never
                # see the file's bytes there instead).
                bits = np.unpackbits(stored.view(np.uint8), bitorder="little")
                for first, count in extents:
                    for page in (np.flatnonzero(bits[first:first + count] == 0) + first).tolist():
                        if np.frombuffer(view, np.uint64, PAGE // 8, page * PAGE).any():
                            raise bad(f"page {page} is marked zero but holds data")
        apply_refs(image, refs)
        if not checked:
            with memoryview(image) as view:
                # Hashed where they now lie: the image holds exactly the bytes checked.
                for r in refs:
                    if _digest(view, r.runs, r.size) != r.sha256:
                        raise bad(f"{os.fsdecode(r.inside)} ({os.fsdecode(r.host)}) holds other bytes "
                                  f"than when the snapshot was made (SHA-256 differs): make the "
                                  f"snapshot again")
            verified.remember("snapshot", st, identities, record,
                              newest_ns=max([st.st_ctime_ns] + [i[-1] for i in identities]))
    except BaseException:
        if image is not None:
            image.close()
        for r in refs:
            os.close(r.fd)
        raise
    return meta, state, components, image, stored | referenced, f, extents, offset, refs


def _check_clock(values):
    """The guest's MONOTONIC, MONOTONIC_RAW and BOOTTIME at the snapshot, in ns (restores go on
    from them, LinuxSandbox._continue_clocks); None in files that predate the record."""
    if values is None:
        return None
    if not (isinstance(values, list) and len(values) == 3
            and all(type(v) is int and 0 <= v < 1 << 62 for v in values)):
        raise ValueError("the guest's clocks are invalid")
    return values


def _decode_meta(meta, state_bytes, memory_size, fs_bytes, fs_decode):
    from .process import IoState                 # (process imports this module)
    from .task import ProcState
    if meta["memory_size"] != memory_size:
        raise ValueError("memory size differs from the header's")
    cpu.parse(meta["cpu"])
    parts = backend.impl.STATE_PARTS
    names = [p for p, _ in meta["vcpu_parts"]]
    if names != list(parts):
        raise ValueError(f"vCPU state parts {names} are not this backend's {list(parts)}")
    state, at = {}, 0
    for part, length in meta["vcpu_parts"]:
        if not isinstance(length, int) or length < 0:
            raise ValueError("bad vCPU part length")
        state[part] = state_bytes[at:at + length]
        at += length
    if at != len(state_bytes):
        raise ValueError("vCPU state length mismatch")
    top = memory_size - page_table_bytes(memory_size) - PAGE
    vmas, previous_end = [], USER_MIN
    for start, end, prot, name, offset, pristine in meta["mm"]["vmas"]:
        for value in (start, end, prot, offset):
            if not isinstance(value, int) or value < 0:
                raise ValueError("bad mapping field")
        if len(name) >= 2 * PATH_MAX:           # names are paths (fs.FileSystem.mapping_name)
            raise ValueError(f"mapping {start:#x}-{end:#x} has a name of over {PATH_MAX} bytes")
        if start % PAGE or end % PAGE or not previous_end <= start < end <= top or prot > 7:
            raise ValueError(f"mapping {start:#x}-{end:#x} is invalid")
        vmas.append(Vma(start, end, prot, bytes.fromhex(name), offset, bool(pristine)))
        previous_end = end
    brk_start, brk = meta["mm"]["brk_start"], meta["mm"]["brk"]
    if not (isinstance(brk_start, int) and isinstance(brk, int) and USER_MIN <= brk_start <= brk <= top):
        raise ValueError("brk is invalid")
    mm_state = MmState(tuple(vmas), tuple(v.start for v in vmas), brk_start, brk)
    p = meta["proc"]
    actions = tuple(bytes.fromhex(a) for a in p["actions"])
    if len(actions) != 65 or any(len(a) != 32 for a in actions):
        raise ValueError("signal table is invalid")
    altstack = bytes.fromhex(p["altstack"])
    if len(altstack) != 24 or not isinstance(p["sigmask"], int):
        raise ValueError("signal state is invalid")
    proc = ProcState(actions, p["sigmask"] & ((1 << 64) - 1), altstack)
    io = meta["io"]
    exit_code = io["exit_code"]
    if exit_code is not None and not (isinstance(exit_code, int) and 0 <= exit_code <= 255):
        raise ValueError("exit code is invalid")
    io_state = IoState(bytes.fromhex(io["input"]), bool(io["eof"]), bool(io["waiting"]), exit_code)
    fs_state = fs_decode(fs_bytes)
    return state, (mm_state, fs_state, proc, io_state)
