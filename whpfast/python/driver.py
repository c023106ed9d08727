# The whpfast Python driver. It runs INSIDE the guest interpreter (stdlib only) and serves one
# request at a time; the host snapshots it while it waits for the next one, so every request
# starts from exactly the same parked state.
#
# Request (stdin):  4-byte little-endian length, then a JSON object
#     {"op": "exec" | "eval" | "warm", "code": str, "seed": hex str (host entropy), "cap": int}
#     ("warm" executes in a throwaway copy of the globals: first-call work without new names)
# Answer: MAGIC, the length as 8 bytes little-endian, then a JSON object
#     {"stdout": str, "stderr": str, "value": any JSON,
#      "error": None | {"type": the exception's class name, "message": its str(), "traceback": text}}
# left at the start of the buffer of the read(0) the driver parks in: the host reads it there at
# the parking exit, so a request costs one exit fewer than a write(1) of the answer. Whatever
# user code writes to fd 1 and 2 directly (os.write, C code) reaches the caller as output too.
import errno
import io
import json
import linecache
import os
import random
import sys
import traceback

MAGIC = b"\x00whpfast-py-ans\x00"
FILENAME = "<sandbox>"
_compiled = {}                   # (mode, source) -> code object, for the warm-up's code
ANSWER_LIMIT = 16 << 20          # bytes of answer JSON: the host's limit (one read(2) moves at most 16 MiB)


class _Capture(io.TextIOBase):
    """sys.stdout / sys.stderr while user code runs: keeps the first `cap` characters, counts
    the rest, and says so at the end (the answer as a whole is capped too: ANSWER_LIMIT)."""

    def __init__(self, cap):
        self.parts, self.size, self.cap = [], 0, cap
        self.buffer = _Bytes(self)

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if self.size < self.cap:
            self.parts.append(s[:self.cap - self.size])
        self.size += len(s)
        return len(s)

    def writable(self):
        return True

    @property
    def encoding(self):
        return "utf-8"

    def getvalue(self):
        text = "".join(self.parts)
        if self.size > self.cap:
            text += (f"\n[whpfast: output truncated: {self.size} characters written, "
                     f"the first {self.cap} kept]\n")
        return text


class _Bytes:
    """sys.stdout.buffer: bytes written there join the same capture."""

    def __init__(self, text):
        self.text = text

    def write(self, b):
        self.text.write(bytes(b).decode("utf-8", "replace"))
        return len(b)

    def flush(self):
        pass


def _reseed(seed):
    # A restored snapshot repeats its generators' state: reseed what users expect to be random
    # (256 bits of host entropy each; numpy's from a uint32 array: its cheapest full seeding).
    seed = bytes.fromhex(seed)
    random.seed(int.from_bytes(seed, "little"))
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed(sys.modules["numpy"].frombuffer(seed, dtype="<u4"))


def _error(exc):
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code is _serve.__code__:
        tb = tb.tb_next                          # the driver's own frame says nothing to the user
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    try:
        message = str(exc)
    except BaseException:                        # a user __str__ may raise: as traceback prints it
        message = "<exception str() failed>"
    return _described(type(exc).__name__, message, text)


def _described(kind, message, text):
    return {"type": kind, "message": message, "traceback": text}


def _serve(request, namespace):
    op, code = request["op"], request["code"]
    _reseed(request["seed"])
    out, err = _Capture(request["cap"]), _Capture(request["cap"])
    saved = sys.stdout, sys.stderr, sys.stdin
    sys.stdout, sys.stderr, sys.stdin = out, err, io.StringIO()
    value = error = None
    try:
        # Source lines for the guest's tracebacks.
        linecache.cache[FILENAME] = (len(code), None, code.splitlines(True), FILENAME)
        mode = "eval" if op == "eval" else "exec"
        compiled = _compiled.get((mode, code))
        if compiled is None:
            compiled = compile(code, FILENAME, mode)
            if op == "warm":
                # The warm-up's code object stays in the snapshot: a run of the same code
                # skips compile(), ~30 us of a small request here (code objects are immutable).
                _compiled[mode, code] = compiled
        if op == "eval":
            value = eval(compiled, namespace)
        else:
            exec(compiled, dict(namespace) if op == "warm" else namespace)
    except BaseException as e:                   # SystemExit and KeyboardInterrupt too
        error = _error(e)
    finally:
        sys.stdout, sys.stderr, sys.stdin = saved
    answer = {"stdout": out.getvalue(), "stderr": err.getvalue(), "error": error, "value": None}
    data = None
    if op == "eval" and error is None:
        try:
            answer["value"] = value
            data = json.dumps(answer).encode()
        except (TypeError, ValueError, RecursionError) as e:
            answer["value"] = None
            why = f"the value of the expression cannot be carried as JSON: {type(e).__name__}: {e}"
            answer["error"] = _described(type(e).__name__, why, why + "\n")
    if data is None:
        data = json.dumps(answer).encode()
    if len(data) > ANSWER_LIMIT:
        # The host reads at most ANSWER_LIMIT bytes: drop the value, keep the start of the output
        # (at most 6 bytes of JSON per character, so both fit).
        keep = ANSWER_LIMIT // 16
        for stream in ("stdout", "stderr"):
            if len(answer[stream]) > keep:
                answer[stream] = answer[stream][:keep] + "\n[whpfast: output truncated: the answer was too large]\n"
        answer["value"] = None
        why = f"the answer is {len(data)} bytes as JSON, over the {ANSWER_LIMIT >> 20} MiB limit; the value was dropped"
        answer["error"] = _described("ValueError", why, why + "\n")
        data = json.dumps(answer).encode()
    return data


def _frame(answer):
    return MAGIC + len(answer).to_bytes(8, "little") + answer


def _no_alarm(seconds):
    # alarm(2) cannot fail on Linux, so CPython's signal.alarm returns whatever it gets: in the
    # sandbox (no signal is ever delivered, the syscall is ENOSYS) that is 4294967295, silently.
    raise OSError(errno.ENOSYS, "signal.alarm is not supported in the sandbox: no signal is "
                                "delivered (bound a run with its timeout)")


def main():
    import _signal
    import signal
    _signal.alarm = signal.alarm = _no_alarm
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    stdin = io.FileIO(0, "rb", closefd=False)       # readinto: one plain read(0, buf, n)
    buf = bytearray(1 << 16)
    pending = bytearray()
    answer = b""
    while True:
        while len(pending) < 4 or len(pending) < 4 + int.from_bytes(pending[:4], "little"):
            frame = _frame(answer)
            answer = b""
            if len(frame) > len(buf):
                buf = bytearray(len(frame))
            buf[:len(frame)] = frame
            n = stdin.readinto(buf)
            if not n:
                return
            pending += buf[:n]
        size = int.from_bytes(pending[:4], "little")
        request = json.loads(pending[4:4 + size])
        del pending[:4 + size]
        answer = _serve(request, namespace)


main()
