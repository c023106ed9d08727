"""Coverage-guided fuzzing (atheris, i.e. libFuzzer for Python) of what whpfast reads from
untrusted sources:

  snapshot  Snapshot.load on a snapshot file whose metadata (structured edits of real metadata,
            or raw JSON text), vCPU state sizes and header are mutated, with every checksum fixed
            up so that mutations reach the parser; a file that loads is cold-started
            (Sandbox.from_snapshot) and called.
  result    abi.decode_result on an output buffer as a guest may leave it.
  hostcall  abi.decode_host_call on an exchange buffer as a guest may leave it; the decoded
            arguments are encoded back as a reply and decoded again: they must round-trip.

Every input must end in a valid result or the documented exception: SnapshotError from a load
(from a cold start any WhpfastError, or the OSError of a file the snapshot names), MessageError
from a decoder. Anything else propagates and libFuzzer reports it as a crash, with the input.

    python bench/fuzz.py snapshot -max_total_time=300     # a long run (any libFuzzer flags)
    python bench/fuzz.py result -runs=3000 -seed=1        # tests/test_fuzz.py runs these, short

Run it with the installed package (pip install '.[test]'), from anywhere. It prints what the
inputs ended in, as JSON on a line starting with "fuzz-outcomes:", every 2^k inputs and at the
end of a -runs=N run.
"""

import collections
import copy
import json
import math
import os
import struct
import sys
import tempfile
import zlib

import atheris

with atheris.instrument_imports(include=["whpfast"]):
    import whpfast
    from whpfast import abi
    from whpfast.errors import WhpfastError
    from whpfast.snapshot import HEADER, IMAGE_ALIGN, PAGE, Snapshot

TARGETS = {}
outcomes = collections.Counter()
PLANTED = os.environ.get("WHPFAST_FUZZ_PLANT")   # tests/test_fuzz.py: prove a crash is reported


def target(fn):
    TARGETS[fn.__name__.removeprefix("fuzz_")] = fn
    return fn


def planted(name):
    if PLANTED == name:
        raise KeyError(f"planted bug in the {name} target")


# -- snapshot files --------------------------------------------------------------------------

class Base:
    """A real snapshot of the test guest, taken once, and the pieces its file is made of."""

    def __init__(self, workdir):
        path = os.path.join(workdir, "base.snap")
        with whpfast.Sandbox(whpfast.guests.testkit, memory_size=4 << 20) as sb:
            sb.call("touch", 0, 3, 0x5A)
            sb.snapshot().save(path)
        data = open(path, "rb").read()
        fields = HEADER.unpack_from(data, 0)
        self.fields = list(fields)
        meta_off, meta_len, state_off, state_len, bitmap_off, bitmap_len, image_off = \
            fields[7], fields[8], fields[9], fields[10], fields[11], fields[12], fields[13]
        self.memory_size = fields[5]
        self.meta_bytes = data[meta_off:meta_off + meta_len]
        self.meta = json.loads(self.meta_bytes)
        self.state = data[state_off:state_off + state_len]
        self.bitmap = data[bitmap_off:bitmap_off + bitmap_len]
        self.image = data[image_off:image_off + self.memory_size]
        self.extents = [tuple(e) for e in self.meta["extents"]]
        self.workdir = workdir
        self.n = 0

    def write(self, meta_bytes, state, header_edit=None):
        """A complete snapshot file around these sections, every checksum right; returns its path."""
        extents = self.extents
        try:
            claimed = json.loads(meta_bytes)["extents"]
            extents = [(int(a), int(b)) for a, b in claimed]
        except Exception:
            pass
        image_crc = 0
        for first, count in extents:
            lo, hi = max(0, first) * PAGE, min(self.memory_size, max(0, first + count) * PAGE)
            image_crc = zlib.crc32(self.image[lo:max(lo, hi)], image_crc)
        meta_off = HEADER.size
        state_off = meta_off + len(meta_bytes)
        bitmap_off = state_off + len(state)
        image_off = -(-(bitmap_off + len(self.bitmap)) // IMAGE_ALIGN) * IMAGE_ALIGN
        fields = list(self.fields)
        fields[7:14] = [meta_off, len(meta_bytes), state_off, len(state), bitmap_off,
                        len(self.bitmap), image_off]
        fields[15] = len(extents)
        fields[17:21] = [zlib.crc32(meta_bytes), zlib.crc32(state), zlib.crc32(self.bitmap), image_crc]
        if header_edit is not None:
            index, value = header_edit
            fields[index] = value
        fields[21] = 0
        try:
            header = bytearray(HEADER.pack(*fields))
        except struct.error:
            header = bytearray(HEADER.pack(*self.fields))
        struct.pack_into("<I", header, HEADER.size - 8, zlib.crc32(header))
        self.n += 1
        tmp = os.path.join(self.workdir, f"in-{self.n}.snap")
        with open(tmp, "wb") as f:
            f.write(bytes(header) + meta_bytes + state + self.bitmap)
            for first, count in self.extents:
                f.seek(image_off + first * PAGE)
                f.write(self.image[first * PAGE:(first + count) * PAGE])
            f.truncate(image_off + self.memory_size)
        path = os.path.join(self.workdir, "input.snap")
        os.replace(tmp, path)           # a new file each time, as save() makes them
        return path


_DEEP = "\x00deep:"


def random_value(fdp, depth=0):
    kind = fdp.ConsumeIntInRange(0, 13)
    if kind == 0:
        return fdp.ConsumeInt(8)
    if kind == 1:
        return (-1) ** fdp.ConsumeIntInRange(0, 1) * 2 ** fdp.ConsumeIntInRange(0, 130) \
            + fdp.ConsumeIntInRange(-2, 2)
    if kind == 2:
        return fdp.PickValueInList([math.inf, -math.inf, math.nan, 0.5, -0.0, 1e308, 4096.0])
    if kind == 3:
        return fdp.ConsumeBool()
    if kind == 4:
        return None
    if kind == 5:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 80))
    if kind == 6:
        return fdp.PickValueInList(["", "\0", "\ud800", "heap", "input", "i" * 17, "x" * 5000,
                                    "0" * 64, "/dev/zero", "kvm", "whp", "ii", "n", "?"])
    if kind == 7 and depth < 3:
        return [random_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 6))]
    if kind == 8 and depth < 3:
        return {fdp.ConsumeUnicode(6): random_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))}
    if kind == 9:
        return f"{_DEEP}{fdp.ConsumeIntInRange(1, 100000)}"    # replaced by nested lists in the text
    if kind == 10:
        return fdp.ConsumeIntInRange(0, 1 << 36) * PAGE
    if kind == 11:
        return [fdp.ConsumeIntInRange(-1, 1 << 20), fdp.ConsumeIntInRange(-1, 1 << 20)]
    return fdp.ConsumeIntInRange(-4, 1 << 24)


def tweak(fdp, value):
    """A small change of a value of the same kind, or a value of another kind."""
    if type(value) is int and fdp.ConsumeBool():
        return fdp.PickValueInList([value + 1, value - 1, value * 2, value + PAGE, -value, 0,
                                    value ^ (1 << fdp.ConsumeIntInRange(0, 70)), float(value), str(value)])
    if isinstance(value, str) and fdp.ConsumeBool():
        return fdp.PickValueInList([value + "x", value[:-1], value.upper(), value * 3, "", value + "\ud800"])
    if isinstance(value, list) and value and fdp.ConsumeBool():
        value = list(value)
        op = fdp.ConsumeIntInRange(0, 3)
        i = fdp.ConsumeIntInRange(0, len(value) - 1)
        if op == 0:
            del value[i]
        elif op == 1:
            value.insert(i, copy.deepcopy(value[i]))
        elif op == 2:
            value.append(random_value(fdp))
        else:
            value.reverse()
        return value
    if isinstance(value, dict) and fdp.ConsumeBool():
        value = dict(value)
        keys = sorted(value)
        if keys and fdp.ConsumeBool():
            del value[fdp.PickValueInList(keys)]
        else:
            value[fdp.PickValueInList(keys + ["extra", ""])] = random_value(fdp)
        return value
    return random_value(fdp)


def edit(fdp, node):
    """Walks from node to a random descendant and changes it; returns the new node."""
    if isinstance(node, (list, dict)) and node and fdp.ConsumeIntInRange(0, 4):
        keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
        key = fdp.PickValueInList(keys)
        node = copy.copy(node)
        node[key] = edit(fdp, node[key])
        return node
    return tweak(fdp, node)


def meta_text(meta):
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    while _DEEP in text:                      # json.dumps cannot write 100000 levels itself
        start = text.index('"' + json.dumps(_DEEP)[1:-1])
        end = text.index('"', start + 1)
        depth = int(text[start + 1:end].split(":")[-1])
        text = text[:start] + "[" * depth + "]" * depth + text[end + 1:]
    return text.encode("utf-8", "surrogatepass")


base = None


@target
def fuzz_snapshot(data):
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 9)
    state = base.state
    header_edit = None
    if mode <= 6:                             # structured edits of the real metadata
        meta = base.meta
        for _ in range(fdp.ConsumeIntInRange(1, 3)):
            meta = edit(fdp, meta)
        meta_bytes = meta_text(meta)
        sizes = meta.get("state_sizes") if isinstance(meta, dict) else None
        if isinstance(sizes, list) and all(type(s) is int and 0 <= s <= 4096 for s in sizes) and fdp.ConsumeBool():
            state = (state * 2)[:sum(sizes)].ljust(sum(sizes), b"\0")    # lengths agree, parts wrong
    elif mode == 7:                           # the real text with bytes spliced in
        text = bytearray(base.meta_bytes)
        at = fdp.ConsumeIntInRange(0, len(text))
        text[at:at + fdp.ConsumeIntInRange(0, 8)] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))
        meta_bytes = bytes(text)
    elif mode == 8:                           # raw bytes
        meta_bytes = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048))
    else:                                     # a header field
        meta_bytes = base.meta_bytes
        index = fdp.ConsumeIntInRange(1, 20)
        header_edit = (index, fdp.ConsumeIntInRange(0, (1 << 32) - 1 if index < 5 or index > 16 else (1 << 64) - 1))
    if not meta_bytes:
        meta_bytes = b" "
    path = base.write(meta_bytes, state, header_edit)
    try:
        snap = Snapshot.load(path)
    except whpfast.SnapshotError:
        outcomes["load: SnapshotError"] += 1
        planted("snapshot")
        return
    outcomes["load: ok"] += 1
    try:
        with whpfast.Sandbox.from_snapshot(snap, on_print=lambda text: None) as sb:
            # The snapshot's guest is as untrusted as the file: a valid file may declare other
            # exports, or run other code under the name "add"; the host must only stay sound.
            if sb.exports.get("add") != "ii->i":
                outcomes["cold start: add declared otherwise"] += 1
                return
            value = sb.call("add", 2, 3, timeout=5)
            if type(value) is not int:
                raise AssertionError(f"add() declared to return int returned {value!r}")
            outcomes["cold start: ok" if value == 5 else "cold start: add computes otherwise"] += 1
    except WhpfastError as e:
        outcomes[f"cold start: {type(e).__name__}"] += 1
    except OSError as e:                      # a file the (mutated) snapshot names
        if e.filename is None:
            raise
        outcomes["cold start: OSError of a named file"] += 1


# -- the decoders of guest messages ------------------------------------------------------------

_TYPES = {"n": type(None), "?": bool, "i": int, "f": float, "b": bytes, "s": str}


def guest_buffer(fdp, magic):
    """A buffer of exactly base + size bytes (a read past it raises), a message at base."""
    base = fdp.ConsumeIntInRange(0, 24)
    size = fdp.ConsumeIntInRange(16, 600)
    plausible = fdp.ConsumeIntInRange(0, 3)   # mostly a plausible header, so decoding goes deeper
    length = fdp.ConsumeIntInRange(16, size) if plausible else fdp.ConsumeIntInRange(0, (1 << 32) - 1)
    header = (fdp.ConsumeIntInRange(0, 2) if magic == abi.MAGIC_RESULT else fdp.ConsumeIntInRange(0, 17),
              0 if magic == abi.MAGIC_RESULT else fdp.ConsumeIntInRange(0, 40))
    value = (fdp.ConsumeIntInRange(0, 6), fdp.PickValueInList([0, 1, 8, fdp.ConsumeIntInRange(0, size)]))
    buf = bytearray(base) + bytearray(fdp.ConsumeBytes(size).ljust(size, b"\0"))
    if plausible:       # header: (status, 0) of a result, (argument count, name length) of a call
        struct.pack_into("<IIII", buf, base, magic, length, *header)
        at = 16 if magic == abi.MAGIC_RESULT else 16 + (header[1] + 7) // 8 * 8
        if at + 8 <= size:                                    # and a value header (tag, length)
            struct.pack_into("<II", buf, base + at, *value)
    return buf, base, size, length


def check_value(letter, value):
    if letter not in _TYPES or type(value) is not _TYPES[letter]:
        raise AssertionError(f"decoded {value!r} for letter {letter!r}")
    if letter == "i" and not -(1 << 63) <= value < (1 << 63):
        raise AssertionError(f"decoded int {value} outside int64")


@target
def fuzz_result(data):
    fdp = atheris.FuzzedDataProvider(data)
    buf, base, size, length = guest_buffer(fdp, abi.MAGIC_RESULT)
    try:
        status, letter, value = abi.decode_result(memoryview(buf), base, size, length)
    except abi.MessageError:
        outcomes["MessageError"] += 1
        planted("result")
        return
    check_value(letter, value)
    if type(status) is not int:
        raise AssertionError(f"status {status!r}")
    outcomes[f"ok: {letter}"] += 1


def same(a, b):
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return type(a) is type(b) and a == b


@target
def fuzz_hostcall(data):
    fdp = atheris.FuzzedDataProvider(data)
    buf, base, size, length = guest_buffer(fdp, abi.MAGIC_HOSTCALL)
    try:
        name, args = abi.decode_host_call(memoryview(buf), base, size, length)
    except abi.MessageError:
        outcomes["MessageError"] += 1
        planted("hostcall")
        return
    if type(name) is not str or not name or len(args) > abi.MAX_ARGS:
        raise AssertionError(f"decoded name {name!r} with {len(args)} arguments")
    for arg in args:
        letter = abi.letter_of(arg)
        check_value(letter, arg)
        # what the host would send back: a reply with this value decodes to the same value
        reply = bytearray(size + 16)
        n = abi.encode_reply(reply, 0, size + 16, abi.STATUS_OK, letter, arg)
        struct.pack_into("<I", reply, 0, abi.MAGIC_RESULT)
        status, got_letter, got = abi.decode_result(reply, 0, size + 16, n)
        if status != abi.STATUS_OK or got_letter != letter or not same(got, arg):
            raise AssertionError(f"{arg!r} came back as {got!r}")
    outcomes["ok"] += 1
    for arg in args:
        outcomes[f"argument: {abi.letter_of(arg)}"] += 1


# -- driver ----------------------------------------------------------------------------------

def main():
    global base
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}}} [libFuzzer flags, e.g. -runs=N -seed=1]")
    name = sys.argv.pop(1)
    fn = TARGETS[name]
    runs = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("-runs=")), None)
    workdir = tempfile.TemporaryDirectory(prefix="whpfast-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    if name == "snapshot":
        base = Base(workdir.name)
    count = 0

    def one_input(data):
        nonlocal count
        fn(data)
        count += 1
        if count & (count - 1) == 0 or count == runs:
            print(f"fuzz-outcomes: {json.dumps({'target': name, 'inputs': count, **outcomes})}",
                  file=sys.stderr, flush=True)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
