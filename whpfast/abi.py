"""The host side of the guest ABI (include/whpfast_abi.h; tests/test_abi.py checks that the constants
here match the header). Encodes calls and replies into guest buffers and decodes what the guest
wrote, validating every length and offset before reading: guest memory is untrusted input."""

import struct

from . import errors

ABI_VERSION = 1
PAGE = 4096                              # the guest page (x86-64); the backends' PAGE must match
INFO_ADDR = 0x1000
IMAGE_BASE = 0x100000
INFO_MAGIC = 0x3154534146504857          # "WHPFAST1"

PORT_RETURN = 0xE0
PORT_HOSTCALL = 0xE4
PORT_PRINT = 0xE8
PORT_ABORT = 0xEC
PORT_FAULT = 0xF0
GUEST_PORTS = (PORT_RETURN, PORT_HOSTCALL, PORT_PRINT, PORT_ABORT)

MAGIC_CALL = 0x4C434657
MAGIC_RESULT = 0x53524657
MAGIC_HOSTCALL = 0x43484657
MAGIC_REPLY = 0x50524657

TAG_NONE, TAG_BOOL, TAG_INT, TAG_FLOAT, TAG_BYTES, TAG_STR = range(6)
STATUS_OK, STATUS_ERROR = 0, 1

MAX_ARGS = 16
MAX_FILES = 32
FILE_NAME_MAX = 48

HEADER = struct.Struct("<IIII")          # magic, length, a, b
VALUE_HEADER = struct.Struct("<II")      # tag, length
FILE_ENTRY = struct.Struct(f"<{FILE_NAME_MAX}sQQ")
INFO_HEADER = struct.Struct("<QII10Q")

# Signature letter -> (tag, Python type name for messages)
SIGNATURE = {"n": (TAG_NONE, "None"), "?": (TAG_BOOL, "bool"), "i": (TAG_INT, "int"),
             "f": (TAG_FLOAT, "float"), "b": (TAG_BYTES, "bytes"), "s": (TAG_STR, "str")}
TAG_LETTER = {tag: letter for letter, (tag, _) in SIGNATURE.items()}

_INT = struct.Struct("<IIq")
_FLOAT = struct.Struct("<IId")
_BOOL = struct.Struct("<IIB")


class MessageError(ValueError):
    """What the guest wrote is malformed; the message says how."""


def _align8(n):
    return (n + 7) & ~7


def pack_info(layout):
    def region(name):
        r = layout.region(name)
        return r.gpa, r.size
    fields = []
    for name in ("input", "output", "exchange", "stack", "heap"):
        fields += region(name)
    out = bytearray(INFO_HEADER.pack(INFO_MAGIC, ABI_VERSION, len(layout.files), *fields))
    for f in layout.files:
        out += FILE_ENTRY.pack(f.name.encode(), f.gpa, f.file_size)
    return bytes(out)


def check_file_name(name):
    if not isinstance(name, str) or not name:
        raise TypeError(f"file names must be non-empty str, got {name!r}")
    if len(name.encode()) >= FILE_NAME_MAX or "\0" in name:
        raise ValueError(f"file name {name!r} is too long (at most {FILE_NAME_MAX - 1} bytes, no NUL)")


def letter_of(value):
    """The signature letter for a Python value a host function returned."""
    if value is None:
        return "n"
    if isinstance(value, bool):
        return "?"
    if isinstance(value, int):
        return "i"
    if isinstance(value, float):
        return "f"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "b"
    if isinstance(value, str):
        return "s"
    raise TypeError(f"values crossing into the guest must be None, bool, int, float, bytes or str, "
                    f"not {type(value).__name__}")


def encode_value(buf, off, limit, letter, value, what):
    """Writes one value at buf[off:] (never past limit) and returns the next offset. Raises
    TypeError for a value that does not match the letter (a bool is not an int), OverflowError
    for an int outside int64, ValueError for a str that has no UTF-8 form (a lone surrogate) and
    PayloadTooLarge (a ValueError) when the buffer is too small."""
    if letter == "i":
        if not isinstance(value, int) or isinstance(value, bool):
            # bool is an int subclass in Python, but a different type in the ABI: True is no 1
            raise TypeError(f"{what} must be int, not {type(value).__name__}")
        if not -(1 << 63) <= value < (1 << 63):
            raise OverflowError(f"{what} = {value} does not fit in a signed 64-bit integer")
        if off + 16 > limit:
            raise _too_big(what, limit)
        _INT.pack_into(buf, off, TAG_INT, 8, value)
        return off + 16
    if letter == "f":
        if not isinstance(value, (float, int)) or isinstance(value, bool):
            raise TypeError(f"{what} must be float, not {type(value).__name__}")
        if off + 16 > limit:
            raise _too_big(what, limit)
        _FLOAT.pack_into(buf, off, TAG_FLOAT, 8, float(value))
        return off + 16
    if letter == "?":
        if not isinstance(value, bool):
            raise TypeError(f"{what} must be bool, not {type(value).__name__}")
        if off + 16 > limit:
            raise _too_big(what, limit)
        buf[off:off + 16] = bytes(16)
        _BOOL.pack_into(buf, off, TAG_BOOL, 1, value)
        return off + 16
    if letter == "n":
        if value is not None:
            raise TypeError(f"{what} must be None, not {type(value).__name__}")
        if off + 8 > limit:
            raise _too_big(what, limit)
        VALUE_HEADER.pack_into(buf, off, TAG_NONE, 0)
        return off + 8
    if letter == "b":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
        data = memoryview(value)
        # any memoryview is bytes-like: a strided or multi-dimensional one crosses as a C-order copy
        data = data.cast("B") if data.c_contiguous else memoryview(data.tobytes())
        tag, padded = TAG_BYTES, _align8(len(data))
    elif letter == "s":
        if not isinstance(value, str):
            raise TypeError(f"{what} must be str, not {type(value).__name__}")
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as e:
            # a lone surrogate has no UTF-8 form: the guest could never return it intact
            raise ValueError(f"{what} is not valid Unicode text: it contains the lone surrogate "
                             f"{value[e.start]!r} at index {e.start}, which has no UTF-8 form") from None
        tag, padded = TAG_STR, _align8(len(data) + 1)      # always a terminating zero for C
    else:
        raise TypeError(f"unknown signature letter {letter!r}")
    end = off + 8 + padded
    if end > limit:
        raise _too_big(what, limit)
    n = len(data)
    VALUE_HEADER.pack_into(buf, off, tag, n)
    buf[off + 8:off + 8 + n] = data
    buf[off + 8 + n:end] = bytes(padded - n)
    return end


PayloadTooLarge = errors.PayloadTooLarge          # (defined with the other errors; raised here)


def _too_big(what, limit):
    # encode_call / encode_reply add the buffer's real size and payload limit
    return PayloadTooLarge(f"{what} does not fit in the buffer it must cross; "
                           f"create the sandbox with a larger io_buffer_size")


def max_payload(buffer_size):
    """The largest bytes value one message in a buffer of buffer_size bytes can carry (a str
    takes one byte less: its terminating zero). Several values share the same room, each with
    an 8-byte header and its data padded to 8 bytes."""
    return buffer_size - HEADER.size - VALUE_HEADER.size


def _too_big_in(what, buffer, size):
    return PayloadTooLarge(f"{what} does not fit in the {size}-byte {buffer} buffer, which carries "
                           f"at most {max_payload(size)} bytes of data ({max_payload(size) - 1} of "
                           f"UTF-8 str) in one value, less 8 bytes plus padding to 8 for each further "
                           f"value; create the sandbox with a larger io_buffer_size")


def encode_call(buf, base, size, index, name, params, args):
    """Writes a call message for export `index` into buf[base:base+size]; returns its length."""
    if len(args) != len(params):
        raise TypeError(f"{name}() takes {len(params)} argument{'s' * (len(params) != 1)} "
                        f"({_describe(params)}), got {len(args)}")
    limit = base + size
    off = base + HEADER.size
    for i, (letter, arg) in enumerate(zip(params, args)):
        what = f"argument {i + 1} of {name}()"
        try:
            off = encode_value(buf, off, limit, letter, arg, what)
        except PayloadTooLarge:
            raise _too_big_in(what, "input", size) from None
    HEADER.pack_into(buf, base, MAGIC_CALL, off - base, index, len(params))
    return off - base


def encode_reply(buf, base, size, status, letter, value):
    """A result or reply message (magic chosen by the caller's buffer: the reply to a host call)."""
    limit = base + size
    what = "the host function's result"
    try:
        off = encode_value(buf, base + HEADER.size, limit, letter, value, what)
    except PayloadTooLarge:
        raise _too_big_in(what, "exchange", size) from None
    HEADER.pack_into(buf, base, MAGIC_REPLY, off - base, status, 0)
    return off - base


def _describe(params):
    return ", ".join(SIGNATURE[p][1] for p in params) or "no arguments"


def read_header(buf, base, size, length, magic, what):
    """Validates a message header the guest wrote; returns (a, b, end)."""
    if not HEADER.size <= length <= size:
        raise MessageError(f"{what}: length {length} is outside 16..{size}")
    got_magic, got_length, a, b = HEADER.unpack_from(buf, base)
    if got_magic != magic:
        raise MessageError(f"{what}: bad magic {got_magic:#x}, expected {magic:#x}")
    if got_length != length:
        raise MessageError(f"{what}: header says {got_length} bytes, the port said {length}")
    return a, b, base + length


def decode_value(buf, off, end, what):
    """Reads one value the guest wrote; returns (letter, value, next offset)."""
    if off + 8 > end:
        raise MessageError(f"{what}: value header runs past the message end")
    tag, n = VALUE_HEADER.unpack_from(buf, off)
    start = off + 8
    if n > end - start:
        raise MessageError(f"{what}: value of {n} bytes runs past the message end")
    letter = TAG_LETTER.get(tag)
    fixed = {TAG_NONE: 0, TAG_BOOL: 1, TAG_INT: 8, TAG_FLOAT: 8}
    if letter is None:
        raise MessageError(f"{what}: unknown value tag {tag}")
    if tag in fixed and n != fixed[tag]:
        raise MessageError(f"{what}: a {SIGNATURE[letter][1]} must be {fixed[tag]} bytes, got {n}")
    if tag == TAG_NONE:
        value = None
    elif tag == TAG_BOOL:
        b = buf[start]
        if b > 1:
            raise MessageError(f"{what}: bool byte is {b}, not 0 or 1")
        value = bool(b)
    elif tag == TAG_INT:
        value = struct.unpack_from("<q", buf, start)[0]
    elif tag == TAG_FLOAT:
        value = struct.unpack_from("<d", buf, start)[0]
    elif tag == TAG_BYTES:
        value = bytes(buf[start:start + n])
    else:
        try:
            value = bytes(buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MessageError(f"{what}: str is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    padded = _align8(n + 1) if tag == TAG_STR else _align8(n)
    return letter, value, min(start + padded, end)


def decode_result(buf, base, size, length):
    """Reads the result message the guest wrote (output buffer at base, size bytes; length from
    the port); returns (status, letter, value). Raises MessageError."""
    status, _, end = read_header(buf, base, size, length, MAGIC_RESULT, "result")
    letter, value, _ = decode_value(buf, base + HEADER.size, end, "result")
    return status, letter, value


def decode_host_call(buf, base, size, length):
    """Reads a host-call request the guest wrote (exchange buffer at base, size bytes; length from
    the port); returns (name, args). Raises MessageError."""
    argc, name_len, end = read_header(buf, base, size, length, MAGIC_HOSTCALL, "host call")
    off = base + HEADER.size
    if argc > MAX_ARGS or name_len == 0 or name_len > 255 or off + name_len > end:
        raise MessageError(f"host call header is inconsistent (argc {argc}, name {name_len} bytes)")
    name = bytes(buf[off:off + name_len]).decode("utf-8", "replace")
    off += _align8(name_len)
    args = []
    for i in range(argc):
        _, value, off = decode_value(buf, off, end, f"host call argument {i + 1}")
        args.append(value)
    return name, args
