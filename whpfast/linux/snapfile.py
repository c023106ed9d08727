"""LinuxSnapshot on disk: a snapshot container file (whpfast/core/container.py: header, section
table with CRCs and size caps, the sparse page-aligned image) of kind "linux", whose sections are
the components in COMPONENTS (whpfast/linux/state.py says what each holds) and "files" (FILES,
here): the host files whose pages the image references instead of storing them.

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

A sandbox made from the file maps the extents copy-on-write (container.map_image, as the SDK's
Sandbox.from_snapshot does): sandboxes made from one file share its page cache and pay only
for the pages they write. Snapshot files are therefore immutable once written; save() writes a
new file and renames it over the old one. A file that a user other than root or this process's
owner can write is never mapped (container.load_image): its image is read into private
memory, and sandboxes copy from there.

Everything read is untrusted: every length, offset, checksum and field is checked before use
and any problem is a SnapshotError saying what is wrong."""

import hashlib
import os
from bisect import bisect_right
from collections import namedtuple
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import numpy as np

from ..core import container, verified
from .. import backend, cpu
from ..errors import SnapshotError
from .errno import ENODEV, LinuxError
from .fs import AT_FDCWD, O_RDONLY, FileSystem
from .grant import Grant
from .mm import PAGE, PROT_WRITE, USER_MIN, page_up, shareable
from .state import FS, IO, META, MM, PROC, VCPU, LinuxState, split_vcpu, user_top

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


@dataclass(frozen=True)
class SnapshotFile:
    """What load() read of a snapshot file, checked: meta (memory size, config, CPU, clocks),
    vcpu_state (by part), state (LinuxState), image (the whole memory image: the file's image
    section mapped read-only, or, when the file references host files, guest-sized memory
    holding the section's extents and the referenced pages, both mapped copy-on-write where the
    backend can, see apply_refs), nonzero (its non-zero pages), file (the open file, the
    caller's to close, with the image and the refs' fds), extents (the stored pages' runs),
    image_offset (where the image lies in file) and refs (the FileRefs, resolved and open)."""
    meta: Dict[str, Any]
    vcpu_state: Dict[str, bytes]
    state: LinuxState
    image: Any
    nonzero: Any
    file: Any
    extents: Any
    image_offset: int
    refs: Tuple[Any, ...]


def save(snapshot, path):
    """Writes a LinuxSnapshot (its public accessors: meta, state, vcpu_state, image, nonzero)
    to path atomically."""
    parts = backend.impl.STATE_PARTS
    vcpu = snapshot.vcpu_state
    memory_size = snapshot.meta["memory_size"]
    view = snapshot.image
    state = snapshot.state
    refs = _references(snapshot, state.mm, view)
    stored = snapshot.nonzero & ~_ref_bitmap(refs, memory_size // PAGE)   # the rest: references
    meta = dict(snapshot.meta, vcpu_parts=[[p, len(vcpu[p])] for p in parts])
    sections = [(META, meta), (VCPU, b"".join(vcpu[p] for p in parts)), (MM, state.mm),
                (PROC, state.proc), (IO, state.io), (FS, state.fs), (FILES, refs)]
    return container.write(os.fspath(path), "linux", memory_size, sections, view, stored, MAX_EXTENTS)


def _policy(config):
    """A FileSystem with the snapshot's read policy: references are resolved through it, as the
    program's own open() would be."""
    return FileSystem.of_config(config)


def _open_inside(fs, inside):
    """(host fd, host path, fstat) of the regular host file the program would get by opening
    `inside` read-only; the fd is the caller's to close. LinuxError when it could not open it
    (or it is no host file: /tmp, a synthesized file)."""
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


def _dump_refs(refs):
    return [{"inside": r.inside.hex(), "host": r.host.hex(), "dev": r.dev, "ino": r.ino,
             "size": r.size, "mtime_ns": r.mtime_ns, "sha256": r.sha256,
             "runs": [list(run) for run in r.runs]} for r in refs]


def _decode_refs(files, memory_size, mm_state):
    """The FileRefs of a file's "meta", every field checked: runs inside user memory, in order,
    not overlapping, within the file's pages, and each lying in read-only mappings of that very
    file at those offsets (what the program sees there is that file, as the address space says)."""
    if not isinstance(files, list) or len(files) > MAX_REF_RUNS:
        raise ValueError("file references are invalid")
    top = user_top(memory_size)
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


FILES = container.JsonComponent("files", lambda value, version, context: _decode_refs(value, *context),
                                max_size=64 << 20, dump=_dump_refs)
# The sections of a Linux snapshot file, in order (then the container's "pages" and "image").
COMPONENTS = (META, VCPU, MM, PROC, IO, FS, FILES)


def load(path: Any, grant: Grant) -> SnapshotFile:
    """Reads and checks a snapshot file: every component decoded and checked, what it declares
    held to `grant` (grant.Grant: the caller's authority) before any host file it refers to is
    opened, the image and the referenced files checked (see SnapshotFile)."""
    path = os.fspath(path)

    def bad(why):
        return SnapshotError(f"{path} is not a usable Linux snapshot: {why}")

    f = container.open_file(path)
    try:
        return _load(f, path, bad, grant)
    except BaseException:
        f.close()
        raise


def _load(f, path, bad, grant):
    box = container.read(f, path, "linux", COMPONENTS, MAX_EXTENTS, bad)
    memory_size = box.memory_size
    if memory_size % (2 << 20) or not 16 << 20 <= memory_size:
        raise bad(f"memory size {memory_size:#x} is invalid")
    try:
        meta = box.decode(META, memory_size)
        state = split_vcpu(box.decode(VCPU), meta.pop("vcpu_parts"))
        mm_state = box.decode(MM, memory_size)
        components = LinuxState(mm_state, box.decode(FS), box.decode(PROC), box.decode(IO))
        refs = box.decode(FILES, (memory_size, mm_state))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise bad(f"metadata is inconsistent ({type(e).__name__}: {e})") from None
    why = cpu.incompatibility(meta["cpu"])          # before anything is mapped or runs
    if why:
        raise bad(why)
    grant.check(meta["config"], memory_size, f"snapshot {path}")
    pages = memory_size // PAGE
    stored = box.stored
    referenced = _ref_bitmap(refs, pages)
    if np.any(stored & referenced):
        raise bad("pages are both stored and referenced")
    # The extents follow from the bitmap (they cover every stored page by construction); pages
    # outside them come from anonymous memory, zero whatever the file's holes hold.
    extents = box.extents
    refs = _resolve_refs(refs, meta["config"], bad)
    image = None
    st = box.stat
    try:
        image = container.load_image(f, box.image_offset, memory_size, extents, writable=bool(refs))
        # The image's checks and the referenced files' hashes, unless this host made them before
        # for this very file and these very references (core/verified.py: identities, ctimes
        # included, unchanged: so are their bytes).
        identities = tuple(_identity(os.fstat(r.fd)) for r in refs)
        record = (f"crc {box.image_crc:08x} "
                  + hashlib.sha256(repr([(r.runs, r.sha256) for r in refs]).encode()).hexdigest())
        checked = verified.known("snapshot", st, identities) == record
        if not checked:
            with memoryview(image) as view:
                container.check_image(view, box, bad)
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
    return SnapshotFile(meta, state, components, image, stored | referenced, f, extents,
                        box.image_offset, tuple(refs))
