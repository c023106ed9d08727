"""A Pool's worker process (Pool(..., workers="process")): one warm sandbox made from a snapshot
file, serving the pool's requests one at a time over a pipe, so that sandboxes in different
processes run their host-side Python (serving exits, decoding answers) without sharing a GIL.

Parent and worker are the same program and trust each other (messages are pickles, as with
multiprocessing); the guest is the untrusted party, and nothing it sends is unpickled: a worker
pickles only the PythonResult or value its sandbox already checked and decoded. Frames: an 8-byte
little-endian length, then a pickle. The parent sends ("init", kind, path, grant), then
(op, args, timeout) per request and ("close",); the worker answers each with ("ok", value,
poisoned) or ("error", exception, poisoned). A cancel is one byte on a second pipe, read by a
thread of the worker that cancels the sandbox's running guest."""

import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import Any, Dict, Optional, Tuple

from .errors import SandboxClosed, WhpfastError

_LENGTH = struct.Struct("<Q")
MAX_FRAME = 1 << 30                 # a pickled answer (up to 16 MiB of output, escaped) fits


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other end of the pool's pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _send(fd: int, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _receive(fd: int) -> Any:
    n, = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size))
    if n > MAX_FRAME:
        raise ValueError(f"a pool message of {n} bytes")
    return pickle.loads(_read_exactly(fd, n))


class RemoteSandbox:
    """The parent's side of one worker process: what a Pool slot needs of a sandbox (request,
    cancel, poisoned, closed, close)."""

    def __init__(self, kind: str, path: str, grant: Dict[str, Any]) -> None:
        self.closed = True
        self.poisoned: Optional[str] = None
        cancel_r, self._cancel_w = os.pipe()
        try:
            # cwd "/": the worker must import the installed whpfast, never a source tree
            self._proc = subprocess.Popen([sys.executable, "-m", "whpfast.poolworker", str(cancel_r)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          pass_fds=(cancel_r,), cwd="/")
        except BaseException:
            os.close(self._cancel_w)
            raise
        finally:
            os.close(cancel_r)
        self._to, self._from = self._proc.stdin.fileno(), self._proc.stdout.fileno()
        try:
            self._ask(("init", kind, os.path.abspath(path), grant))
        except BaseException:
            self._end()
            raise
        self.closed = False

    def _ask(self, message: Tuple[Any, ...]) -> Any:
        try:
            _send(self._to, message)
            status, value, self.poisoned = _receive(self._from)
        except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
            self.poisoned = f"the pool's worker process ended ({e})"
            raise SandboxClosed(f"the pool's worker process {self._proc.pid} ended or broke its "
                                f"pipe ({e}); the pool makes another") from None
        if status == "error":
            raise value
        return value

    def request(self, op: str, args: Tuple[Any, ...], timeout: Optional[float]) -> Any:
        return self._ask((op, args, timeout))

    def cancel(self) -> None:
        try:
            os.write(self._cancel_w, b"c")
        except OSError:
            pass                            # the worker is gone: nothing runs

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            _send(self._to, ("close",))
        except OSError:
            pass
        self._end()

    def _end(self) -> None:
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        try:
            os.close(self._cancel_w)
        except OSError:
            pass


def _serve(sandbox: Any, kind: str, op: str, args: Tuple[Any, ...], timeout: Optional[float],
           source: Any) -> Any:
    if op == "call":
        sandbox.restore(source)
        return sandbox.call(*args, timeout=timeout)
    if op == "run":
        return sandbox.run(args[0], timeout=timeout)
    return sandbox.eval(args[0], timeout=timeout)


def _poisoned(sandbox: Any) -> Optional[str]:
    inner = getattr(sandbox, "linux", sandbox)
    return "closed" if sandbox.closed else inner.poisoned


def main(argv: Any = None) -> int:
    cancel_fd = int((argv or sys.argv[1:])[0])
    # Frames go to a copy of the pipe; fd 1 itself becomes stderr, so nothing else (a print, a
    # C library's write) can come between two frames.
    to, frm = os.dup(sys.stdout.fileno()), sys.stdin.fileno()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _, kind, path, grant = _receive(frm)
    try:
        if kind == "sdk":
            from .snapshot import Snapshot
            from .sandbox import Sandbox
            source: Any = Snapshot.load(path)
            sandbox = Sandbox.from_snapshot(source, **grant)
        else:
            from .python.sandbox import PythonSandbox
            source = None
            sandbox = PythonSandbox.from_snapshot(path, **grant)
    except Exception as e:
        _send(to, ("error", e, "not made"))
        return 1
    _send(to, ("ok", None, None))

    def cancels() -> None:
        while os.read(cancel_fd, 1):
            sandbox.cancel()
    threading.Thread(target=cancels, daemon=True).start()
    while True:
        try:
            message = _receive(frm)
        except EOFError:
            break
        if message[0] == "close":
            break
        op, args, timeout = message
        try:
            value = _serve(sandbox, kind, op, args, timeout, source)
        except Exception as e:
            try:
                _send(to, ("error", e, _poisoned(sandbox)))
            except (pickle.PicklingError, TypeError, AttributeError):
                _send(to, ("error", WhpfastError(f"{type(e).__name__}: {e}"), _poisoned(sandbox)))
            continue
        _send(to, ("ok", value, _poisoned(sandbox)))
    sandbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
