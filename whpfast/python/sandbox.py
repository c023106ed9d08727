"""PythonSandbox: a Python interpreter in a LinuxSandbox, snapshotted warm and restored per run.

The guest runs `driver.py` (shipped beside this file, stdlib only): it parks reading stdin, and
each request (length-prefixed JSON on stdin) is executed in one namespace, user output captured
and capped, and one framed JSON answer left in the buffer of the read it parks in again, where
the host picks it up at that parking exit (LinuxSandbox.parked_read): no write(2) exit. The warm
snapshot is taken at that parking read, after `setup` and one request of each kind ran
("prewarm": the driver's first-call work is in the snapshot instead of in every request).

Everything the guest sends back is untrusted: the answer's length is checked against the
parked read's buffer and a cap before anything is copied, then it is decoded as JSON (never
unpickled) and its fields type-checked; anything else is a GuestCallError and the sandbox is
restored before it runs again."""

import asyncio
import base64
import binascii
import codecs
import collections
import functools
import hashlib
import json
import json.encoder
import os
import re
import struct
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Any, AsyncIterator, Callable, Dict, Iterable, List, Mapping, Optional,
                    Union)

from ..errors import (GuestCallError, GuestError, GuestPythonError, GuestTimeout, SandboxClosed,
                      SandboxError, SnapshotError)
from ..linux.errno import LinuxError
from .._typing import StrPath
from ..core import argcheck
from ..core.gate import Gate
from ..core.run import request_timeout, run_timeout
from ..core.resource import Resource
from ..linux.grant import Grant
from ..linux.process import OUTPUT_MARKER, LinuxSandbox, LinuxSnapshot
from .interpreter import _belongs, _listdir, describe

_encode_str = json.encoder.encode_basestring_ascii     # json.dumps's (ensure_ascii) str encoder
_decode_json = json.JSONDecoder().decode               # json.loads of a str, without its set-up
DRIVER = (Path(__file__).with_name("driver.py")).read_text()
DRIVER_DIGEST = hashlib.sha256(DRIVER.encode()).hexdigest()
MAGIC = b"\x00whpfast-py-ans\x00"           # driver.py's answer header: MAGIC, length (u64 LE)
HEADER = struct.Struct("<16sQ")
FIRST_READ = 4096                            # bytes of the answer buffer _read_answer reads at once
ERROR_FIELDS = {"type", "message", "traceback"}     # of an answer's error (driver.py)
ANSWER_FIELDS = {"stdout", "stderr", "error", "value", "display"}
BINARY_TYPES = frozenset(("image/png", "image/jpeg", "image/gif", "application/pdf"))  # driver.BINARY
# stream(): output events waiting for the consumer, at most (then the guest waits for it)
STREAM_PENDING_EVENTS = 1024
STREAM_PENDING_CHARS = 1 << 20
ANSWER_LIMIT = 16 << 20                      # bytes of answer JSON accepted (= driver.py's, = MAX_IO)
DEFAULT_MEMORY_SIZE = 512 << 20
OUTPUT_LIMIT = 1 << 20                       # characters of stdout / stderr kept per run
# (bytes written to fd 1/2 directly, past sys.stdout: LinuxSandbox's output limit applies)
BOOT_TIMEOUT = 300
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
       "MPLBACKEND": "Agg"}              # matplotlib draws in memory: figures come back as PNG


class PythonError(str):
    """An exception the guest's code raised, as fields: `type` (its class name, e.g.
    "ZeroDivisionError"), `message` (its str()), `traceback` (the text Python prints). It is
    that text too (a str): str(error), `"ZeroDivisionError" in error` and printing work as they
    did. An error whpfast itself reports about a run (the process exited before answering) has
    type "WhpfastError"."""
    type: str
    message: str

    def __new__(cls, type: str, message: str, traceback: str) -> "PythonError":
        self = super().__new__(cls, traceback)
        self.type, self.message = type, message
        return self

    @property
    def traceback(self) -> str:
        return str.__str__(self)

    def __reduce__(self) -> Any:              # pickles (Ray, multiprocessing) with its fields
        return PythonError, (self.type, self.message, str.__str__(self))


@dataclass(frozen=True)
class PythonResult:
    """What one PythonSandbox.run() produced: the guest's stdout and stderr, and the guest
    traceback when the code raised (SystemExit included) as a PythonError (a str with the fields
    type, message and traceback), else None. value: the repr() of the cell's last expression
    (None when the cell does not end with one, or it is None), as Jupyter shows it. display:
    MIME bundles as Jupyter gives them ({"text/plain": str, "text/html": str, "image/png": bytes,
    ...}), from display() calls, the last expression's _repr_*_ methods and the matplotlib
    figures left open, in that order."""
    stdout: str
    stderr: str
    error: Optional[PythonError]
    value: Optional[str] = None
    display: List[Dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Output:
    """One piece of a streamed run's output (PythonSandbox.stream): stream is "stdout" or
    "stderr", text what the guest wrote there (decoded as UTF-8 across writes)."""
    stream: str
    text: str


class _Listener:
    """LinuxSandbox's on_output for one run with an on_output(stream, text) callback: decodes
    each stream's bytes incrementally (a UTF-8 character split across writes comes whole) and
    calls the callback. An exception from it stops the run: it is kept, the guest is cancelled,
    and run() raises it when the run has unwound."""

    def __init__(self, callback, lx):
        self.callback, self.lx, self.error = callback, lx, None
        self.decoders = {name: codecs.getincrementaldecoder("utf-8")("replace")
                         for name in ("stdout", "stderr")}

    def __call__(self, stream, data):
        if self.error is None:
            self._send(stream, self.decoders[stream].decode(data))

    def _send(self, stream, text):
        if text and self.error is None:
            try:
                self.callback(stream, text)
            except Exception as e:
                self.error = e
                self.lx.cancel()

    def finish(self, r):
        """The end of the run r (a RunResult): what the decoders hold, and the output limit's
        marker for a stream it cut."""
        for stream, data in (("stdout", r.stdout), ("stderr", r.stderr)):
            text = self.decoders[stream].decode(b"", final=True)
            marker = OUTPUT_MARKER.format(stream=stream, limit=self.lx._output_limit)
            if r.truncated and data.endswith(marker.encode()):
                text += marker
            self._send(stream, text)


_loaded = weakref.WeakValueDictionary()     # snapshot files loaded and still in use, by identity
_loaded_lock = threading.Lock()


def _load_shared(path, grant):
    """The LinuxSnapshot of a file, loaded once while any sandbox uses it: sandboxes started from
    one path share one in-memory image (and skip the load). A file replaced since is reloaded.
    Every caller's grant is checked, the first one's before the file's references are opened."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SnapshotError(f"cannot open snapshot {os.fspath(path)!r}: {e.strerror}") from None
    # (the ctime too: a chmod decides whether the file may be mapped, see core/container.load_image)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _loaded_lock:
        snapshot = _loaded.get(key)
        if snapshot is None:
            snapshot = _loaded[key] = LinuxSnapshot._load(path, grant)
        else:
            snapshot.check_grant(grant)
        return snapshot


ALL = "all"                                  # packages=ALL: every site-packages entry


def _packages(value):
    """packages= checked: None (what setup looks up), ALL, or an iterable of names."""
    if value is None or value == ALL:
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) \
            or not all(isinstance(p, str) and p and "/" not in p for p in value):
        raise TypeError(f"packages must be {ALL!r} or a list of package names, not {value!r}")
    return frozenset(value)


def _policy(interp, read, packages=None):
    """(read policy, extra files) of a sandbox for the Interpreter `interp`: its own files
    (site-packages whole with packages None, else only the entries of `packages`) where it shows
    them; the caller's host paths at the same paths, or its {inside: host} mapping."""
    if isinstance(read, (str, bytes, os.PathLike)):
        read = [read]
    policy, extra = interp.policy(packages)
    if isinstance(read, Mapping):
        policy.update((os.fsdecode(k), os.fsdecode(v)) for k, v in read.items())
    else:
        policy.update((os.path.abspath(os.fsdecode(r)),) * 2 for r in read)
    return policy, extra


def granted_snapshot(snapshot, python=None, read=(), memory_size=None):
    """The LinuxSnapshot of a PythonSandbox that `snapshot` (a path or a LinuxSnapshot) is,
    held to the caller's grant (see PythonSandbox.from_snapshot): a file is loaded under it (once
    per file while in use, _load_shared), an object is checked against it when any is given.
    SnapshotError for a snapshot of another kind, driver or interpreter, or one asking more."""
    asked = python is not None or memory_size is not None or bool(read)
    grant = None
    if asked or not isinstance(snapshot, LinuxSnapshot):
        python = os.path.abspath(python or sys.executable)
        grant = Grant.of(_policy(describe(python), read)[0], memory_size or DEFAULT_MEMORY_SIZE)
    if not isinstance(snapshot, LinuxSnapshot):
        snapshot = _load_shared(snapshot, grant)
    elif grant is not None:
        snapshot.check_grant(grant)
    info = snapshot.meta.get("python")
    if not isinstance(info, dict) or not isinstance(info.get("python"), str):
        raise SnapshotError(f"{snapshot.path or 'the snapshot'} is a Linux snapshot but not of a "
                            f"PythonSandbox; make one with PythonSandbox(...).save(path)")
    if info.get("driver") != DRIVER_DIGEST:
        raise SnapshotError(f"{snapshot.path or 'the snapshot'} was made with another version of "
                            f"whpfast's Python driver; make it again with this whpfast")
    if grant is not None and info["python"] != python:
        raise SnapshotError(f"{snapshot.path or 'the snapshot'} was made for the interpreter "
                            f"{info['python']}, not {python}; pass python= to allow it")
    return snapshot


def _check_code(code, what):
    if not isinstance(code, str):
        raise TypeError(f"{what} must be a str of Python source, not {type(code).__name__}")
    return code


class PythonSandbox(Resource):
    """A Python interpreter in a micro-VM, warm-started for every run.

    python: the interpreter (default: the one running, sys.executable), read with its standard
    library, shown where whpfast.python.interpreter says (a venv or prefix outside the system
    directories at /opt/venv or /opt/python). packages: the site-packages the guest may import
    besides those its boot, setup and warmup imported (names such as "scipy"), or "all"
    (whpfast.python.sandbox.ALL) for every installed one. read: more host paths the guest may
    read (at the same paths; {inside: host} to choose); setup: code run once
    before the warm snapshot (e.g. "import pandas as pd"): its names are the globals every run
    starts from. warmup: code run once before the snapshot in a throwaway copy of those globals
    (typically the request itself), so its first-call work (lazy imports, caches, heap growth)
    is in the snapshot instead of being redone by every run. memory_size bounds the guest's
    memory: past it the guest gets MemoryError."""

    def __init__(self, *, python: Optional[StrPath] = None, setup: str = "",
                 read: Union[StrPath, Iterable[StrPath]] = (), memory_size: int = DEFAULT_MEMORY_SIZE,
                 warmup: str = "", timeout: float = BOOT_TIMEOUT,
                 packages: Union[None, str, Iterable[str]] = None) -> None:
        self._closed = True
        _check_code(setup, "setup")
        _check_code(warmup, "warmup")
        packages = _packages(packages)
        python = os.path.abspath(python or sys.executable)
        interp = describe(python)
        read = argcheck.read_policy(read)
        self._init_common()
        # Booted with every site-packages entry readable; narrowed below to what boot, setup and
        # warm-up looked up (and `packages`) before the snapshot every run starts from.
        policy, extra = _policy(interp, read)
        self._lx = LinuxSandbox([interp.argv0, "-I", "-B", "-c", DRIVER], env={**ENV, **interp.env},
                                read=policy, extra_files=extra, memory_size=memory_size)
        try:
            first = self._lx.run(timeout=timeout)
            if not first.waiting:
                raise SandboxError(f"the interpreter {python} did not start the driver (exit status "
                                   f"{first.exit_code}): {first.stderr.decode('utf-8', 'replace')[-2000:]}")
            # setup, then the user's warm-up, then one request of each kind (the driver's own
            # first-call work: json, compile, the capture classes) before the snapshot.
            for op, code, what in (("exec", setup, "setup"), ("warm", warmup, "warmup"),
                                   ("exec", "pass", "the driver's warm-up"),
                                   ("eval", "None", "the driver's warm-up")):
                result, _ = self._request(op, code, timeout)
                if result.error is not None:
                    raise GuestPythonError(f"{what} raised in the guest:\n{result.error}",
                                           traceback=result.error, stdout=result.stdout, stderr=result.stderr)
            snapshot = self._lx.snapshot()
            if packages != ALL:
                snapshot = self._narrow(snapshot, interp, read, packages)
            snapshot.meta["python"] = {"driver": DRIVER_DIGEST, "python": python,
                                       "setup_sha256": hashlib.sha256(setup.encode()).hexdigest()}
            self._snapshot = snapshot
        except BaseException:
            self._lx.close()
            raise
        self.python = python
        self._closed = False

    def _narrow(self, snapshot, interp, read, packages):
        """`snapshot` under the policy that shows, of the site-packages, only the entries the
        guest has looked up so far and those of `packages`; self._lx is then a sandbox in it.
        What the guest holds open stays readable (the entries it opened were looked up)."""
        used = frozenset(os.fsdecode(n) for d in interp.site for n in self._lx.fs.looked_up(d))
        narrowed = snapshot.with_read(*_policy(interp, read, used | (packages or frozenset())))
        lx = LinuxSandbox.from_snapshot(narrowed)
        self._lx.close()
        self._lx = lx
        return narrowed

    def _init_common(self):
        # One operation (run, eval, save) at a time, by core/gate.py's rules. A close() during
        # one cancels the LinuxSandbox's run and frees it when the operation unwinds, never
        # under it (the answer is read from its memory after the run).
        self._gate = Gate(self._free, lambda: self._lx.cancel())
        self._stale = False          # the guest is not parked at a clean read: restore first

    @classmethod
    def from_snapshot(cls, snapshot: Union[LinuxSnapshot, StrPath], *, python: Optional[StrPath] = None,
                      read: Union[StrPath, Iterable[StrPath], Mapping[str, str]] = (),
                      memory_size: Optional[int] = None) -> "PythonSandbox":
        """A sandbox in a saved warm state (a path written by save(), or a LinuxSnapshot taken by
        a PythonSandbox). Sandboxes started from one path share the file's loaded image.

        A file is untrusted: the arguments are the authority, as for the constructor. It must
        have been made for `python` (default: this interpreter, sys.executable), may read only
        that interpreter's files and the caller's `read` paths, and may have at most
        `memory_size` of memory (default 512 MiB); else SnapshotError naming what it asks for.
        A LinuxSnapshot object without arguments keeps the grant it was loaded under (taken in
        this process: what it declares)."""
        snapshot = granted_snapshot(snapshot, python, read, memory_size)
        info = snapshot.meta["python"]
        self = cls.__new__(cls)
        self._closed = True
        self._init_common()
        self._lx = LinuxSandbox.from_snapshot(snapshot)
        self._snapshot = snapshot
        self.python = info["python"]
        self._closed = False
        return self

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the VM. Idempotent. A run in another thread is stopped (it raises SandboxClosed)
        and close() returns once it has unwound; from inside the sandbox's own run (a signal
        handler) the close takes effect when the run unwinds, which raises SandboxClosed."""
        if not self._closed:
            self._gate.close()

    def cancel(self) -> None:
        """Stops a run going on in another thread: it raises GuestCancelled and the next fresh
        run starts clean (the sandbox is not closed). Does nothing when no run is going on."""
        if not self._closed:
            self._lx.cancel()

    def _free(self):
        # (the gate's free: called once, with no operation running)
        self._closed = True
        self._lx.close()

    @property
    def closed(self) -> bool:
        return self._closed or self._gate.closing

    @property
    def snapshot(self) -> LinuxSnapshot:
        """The warm LinuxSnapshot every fresh run starts from."""
        return self._snapshot

    @property
    def linux(self) -> LinuxSandbox:
        """The LinuxSandbox underneath (for statistics such as last_restore)."""
        return self._lx

    def save(self, path: StrPath) -> str:
        """Writes the warm snapshot to path (atomically); PythonSandbox.from_snapshot(path)
        starts new sandboxes from it."""
        with self._gate.operation("save()"):
            self._check_open()
            return self._snapshot.save(path)

    # -- live state ----------------------------------------------------------------------------------

    def checkpoint(self) -> LinuxSnapshot:
        """A snapshot of the live state: what run(..., fresh=False) continues from now. It is
        a PythonSandbox snapshot like `.snapshot`: restore() puts this sandbox back to it, its
        save(path) writes it, and PythonSandbox.from_snapshot, Pool and RayPool start from it
        (with this sandbox's read policy). It costs the pages written since the last checkpoint,
        restore or start (plus those by which that one differs from the last whole capture,
        see LinuxSandbox.snapshot), not the whole memory. SandboxError when there is no live
        state (the last run timed out, was cancelled or exited: restore one first)."""
        with self._gate.operation("checkpoint()"):
            self._check_open()
            return self._checkpoint()

    def _checkpoint(self, compact=False):
        if self._stale:
            raise SandboxError("the previous run left the interpreter unusable (it exited, timed out "
                               "or did not answer): there is no live state to checkpoint; restore "
                               "a checkpoint or run with fresh=True")
        snapshot = self._lx._snapshot_to_start_from() if compact else self._lx.snapshot()
        snapshot.meta["python"] = dict(self._snapshot.meta["python"])
        return snapshot

    def restore(self, snapshot: LinuxSnapshot) -> None:
        """Makes `snapshot` (a checkpoint() of this sandbox or of one with the same interpreter
        and read policy, or its `.snapshot`) the live state: the next run(..., fresh=False)
        continues from it. Fresh runs still start from `.snapshot`."""
        if not isinstance(snapshot, LinuxSnapshot):
            raise TypeError(f"restore() takes a LinuxSnapshot (a checkpoint()), not {type(snapshot).__name__}")
        with self._gate.operation("restore()"):
            self._check_open()
            granted_snapshot(snapshot)            # of a PythonSandbox, with this driver
            self._lx.restore(snapshot)
            self._stale = False

    def fork(self, n: int = 1) -> "list[PythonSandbox]":
        """n new sandboxes, each in the live state (a checkpoint() taken now), then independent:
        what one runs is never seen by this one or another (each has its own VM; their memory
        shares the checkpoint's pages copy-on-write where the backend can). Each has this
        sandbox's interpreter and read policy, and its fresh runs start from this sandbox's
        `.snapshot`. Close them (or use them as context managers) when done."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, not {n!r}")
        with self._gate.operation("fork()"):
            self._check_open()
            snapshot = self._checkpoint(compact=True)
            forks = []
            try:
                for _ in range(n):
                    forks.append(self._child(snapshot))
            except BaseException:
                for f in forks:
                    f.close()
                raise
            return forks

    def _child(self, live):
        child = type(self).__new__(type(self))
        child._closed = True
        child._init_common()
        child._lx = LinuxSandbox.from_snapshot(live)
        child._snapshot = self._snapshot
        child.python = self.python
        child._closed = False
        return child

    # -- running -----------------------------------------------------------------------------------

    def run(self, code: str, *, timeout: Optional[float] = None, fresh: bool = True,
            on_output: Optional[Callable[[str, str], object]] = None) -> PythonResult:
        """Executes code; returns a PythonResult (stdout, stderr, error, value, display). on_output:
        called with (stream, text) as the guest writes stdout and stderr, in its order (see
        stream() for the batching); the result still holds all of it. It runs in this thread
        while the guest waits (its time counts against timeout); an exception it raises stops
        the run, and run() raises it (the next fresh run starts clean). fresh=True (default)
        first restores the warm snapshot, so nothing an earlier run did is visible; fresh=False
        continues in the state the previous run left. timeout: seconds the run may take, past it
        GuestTimeout (a run waiting for another thread's gives up at it too); None: DEFAULT_RUN_TIMEOUT
        (whpfast.core.run, 30 s); math.inf: none. Output written to fd 1/2 past sys.stdout is
        kept up to LinuxSandbox's output limit per stream (then its writes fail, and a marker
        says so)."""
        _check_code(code, "code")
        if on_output is not None and not callable(on_output):
            raise TypeError("on_output must be callable (stream, text) or None")
        result, _ = self._call("exec", code, timeout, argcheck.flag(fresh, "fresh"), on_output)
        return result

    async def stream(self, code: str, *, timeout: Optional[float] = None,
                     fresh: bool = True) -> AsyncIterator[Union[Output, PythonResult]]:
        """run() for asyncio, streamed: `async for event in sb.stream(code)` gives Output(stream,
        text) events as the guest writes, in its order, then the PythonResult last; an error
        run() would raise is raised there. The run goes on in a worker thread. The guest's
        sys.stdout and sys.stderr are written through in batches: a line at once when the last
        batch is at least 2 ms old, else with the next line after that, at flush()
        (print(..., flush=True), tqdm), at 64 Ki characters, or at the end of the run. Bounded:
        at most STREAM_PENDING_EVENTS events (STREAM_PENDING_CHARS characters) wait for a slow
        consumer, then the guest waits, up to the run's timeout (GuestTimeout). Closing the
        generator early (aclose(), `async with contextlib.aclosing(...)`) cancels the run."""
        _check_code(code, "code")
        timeout = request_timeout(timeout)
        loop = asyncio.get_running_loop()
        channel = _Channel(loop, run_timeout(timeout))
        work = loop.run_in_executor(None, functools.partial(
            self.run, code, timeout=timeout, fresh=fresh, on_output=channel.put))
        work.add_done_callback(lambda _: channel.finish())
        try:
            while True:
                events = await channel.take()
                if not events:
                    break
                for event in events:
                    yield event
            yield await work
        finally:
            if not work.done():
                channel.close()
                self.cancel()
                await asyncio.wait((work,))
            if not work.cancelled():
                work.exception()             # (retrieved: the consumer left, it is not news)

    def eval(self, expr: str, *, timeout: Optional[float] = None, fresh: bool = True) -> Any:
        """Evaluates expr and returns its value, carried as JSON (lists for tuples, str keys).
        An exception in the guest raises GuestPythonError with the guest traceback. timeout: as
        for run()."""
        _check_code(expr, "expr")
        result, value = self._call("eval", expr, timeout, argcheck.flag(fresh, "fresh"))
        if result.error is not None:
            raise GuestPythonError(f"the guest raised:\n{result.error}", traceback=result.error,
                                   stdout=result.stdout, stderr=result.stderr)
        return value

    def _check_open(self):
        if self.closed:
            raise SandboxClosed("the Python sandbox is closed")

    def _call(self, op, code, timeout, fresh, on_output=None):
        timeout = request_timeout(timeout)
        deadline = None if run_timeout(timeout) is None else time.monotonic_ns() + int(timeout * 1e9)
        with self._gate.operation("run()" if op == "exec" else "eval()", deadline):
            self._check_open()
            if not fresh and self._stale:
                raise SandboxError("the previous run left the interpreter unusable (it exited, timed out "
                                   "or did not answer); run again with fresh=True, or restore() a "
                                   "checkpoint() to continue from it")
            return self._request(op, code, timeout, self._snapshot if fresh else None, on_output)

    def _request(self, op, code, timeout, restore=None, on_output=None):
        """Sends one request to the parked driver and returns (PythonResult, value); restore:
        the snapshot to restore first, in the same call (LinuxSandbox.run(restore=...): one
        GIL release for the restore and the request's run). on_output: the run streams its
        output to it (the driver writes through to fd 1/2; none: it captures, no write exits)."""
        payload = _encode_request(op, code, os.urandom(32).hex(), on_output is not None)
        self._stale = True                       # until a clean answer says otherwise
        closed = SandboxClosed("the Python sandbox was closed while the code ran")
        listener = None
        try:
            if self._gate.closing:      # (its cancel found no run to stop)
                raise closed
            if on_output is not None:
                # (the LinuxSandbox's on_output for this run only: none, and no cost, otherwise)
                listener = self._lx._on_output = _Listener(on_output, self._lx)
            try:
                r = self._lx.run(struct.pack("<I", len(payload)) + payload, timeout=timeout,
                                 restore=restore)
            finally:
                if listener is not None:
                    self._lx._on_output = None
            if listener is not None:
                listener.finish(r)
            if self._gate.closing:
                raise closed
        except (SandboxError, GuestError):
            if self._gate.closing:
                raise closed from None
            if listener is not None and listener.error is not None:
                raise listener.error from None
            raise
        if listener is not None and listener.error is not None:
            raise listener.error
        raw_err = r.stderr.decode("utf-8", "replace")
        if r.exit_code is not None:
            out = r.stdout.decode("utf-8", "replace")
            why = f"the Python process exited with status {r.exit_code} (os._exit or a crash) before answering"
            return PythonResult(out, raw_err, PythonError("WhpfastError", why, why + "\n")), None
        answer = _read_answer(self._lx, op)
        self._stale = False
        error = answer["error"]
        if error is not None:
            error = PythonError(error["type"], error["message"], error["traceback"])
            if error.type == "ModuleNotFoundError":
                error = self._explain_missing(error)
        value = answer["value"]
        result = PythonResult(r.stdout.decode("utf-8", "replace") + answer["stdout"],
                              raw_err + answer["stderr"], error,
                              value if op == "exec" else None, answer["display"])
        return result, value

    def _explain_missing(self, error):
        """`error` with a hint when the module it misses is installed but not shown to this
        sandbox (its setup did not import it: see `packages`)."""
        m = re.fullmatch(r"No module named '([^'.]+)[^']*'", error.message)
        if m is None or self._closed:       # (while it boots, every package is visible)
            return error
        name, read = m.group(1), self._snapshot.meta["config"]["read"]
        try:
            site = describe(self.python).site
        except SandboxError:
            return error
        for inside, host in site.items():
            if inside not in read and any(_belongs(n, frozenset([name])) and f"{inside}/{n}" not in read
                                          for n in _listdir(host)):
                hint = (f"{name!r} is installed but not visible in this sandbox: its setup did not "
                        f"import it. Pass PythonSandbox(packages=[{name!r}]) (or packages=\"all\") to "
                        f"make it importable.")
                return PythonError(error.type, f"{error.message} ({hint})", f"{error.traceback}[whpfast: {hint}]\n")
        return error


def _encode_request(op, code, seed, stream=False):
    """json.dumps({"op": op, "code": code, "seed": seed, "cap": OUTPUT_LIMIT, "stream": stream}).encode(),
    the same bytes without the encoder's per-call set-up (~3-6 us of a ~220 us request, GIL
    held): op and seed are ours (a name, hex digits); code goes through the C function
    json.dumps uses for a str (ensure_ascii)."""
    return (f'{{"op": "{op}", "code": {_encode_str(code)}, "seed": "{seed}", "cap": {OUTPUT_LIMIT}, '
            f'"stream": {"true" if stream else "false"}}}').encode()


class _Channel:
    """stream()'s events between the run's thread (put) and the event loop (take): adjacent
    output of one stream is merged; at most STREAM_PENDING_EVENTS events or
    STREAM_PENDING_CHARS characters wait, then put() waits for take(), until the run's timeout
    (GuestTimeout, which stops the run) or close() (the consumer left: the run stops)."""

    def __init__(self, loop, timeout):
        self.loop, self.timeout = loop, timeout
        self.cond = threading.Condition()
        self.events = collections.deque()        # [stream, [text, ...]]
        self.chars = 0
        self.waiter = None                       # the future take() awaits
        self.closed = self.done = False
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def put(self, stream, text):
        with self.cond:
            while not self.closed and (len(self.events) >= STREAM_PENDING_EVENTS
                                       or self.chars >= STREAM_PENDING_CHARS):
                left = None if self.deadline is None else self.deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise GuestTimeout(f"the run's output was not consumed within its timeout of "
                                       f"{self.timeout} s")
                self.cond.wait(left)
            if self.closed:
                raise SandboxError("the stream's consumer left")
            if self.events and self.events[-1][0] == stream:
                self.events[-1][1].append(text)
            else:
                self.events.append([stream, [text]])
            self.chars += len(text)
            waiter, self.waiter = self.waiter, None
        if waiter is not None:
            self.loop.call_soon_threadsafe(_wake, waiter)

    def finish(self):
        # (in the loop's thread: the run's future is done)
        with self.cond:
            self.done = True
            waiter, self.waiter = self.waiter, None
        if waiter is not None:
            _wake(waiter)

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    async def take(self):
        """The events waiting (at least one), or [] once the run is over and all were taken."""
        while True:
            with self.cond:
                if self.events:
                    events = [Output(stream, "".join(parts)) for stream, parts in self.events]
                    self.events.clear()
                    self.chars = 0
                    self.cond.notify_all()
                    return events
                if self.done:
                    return []
                waiter = self.waiter = self.loop.create_future()
            await waiter


def _wake(future):
    if not future.done():
        future.set_result(None)


def _read_answer(lx, op="eval"):
    """The driver's answer from the buffer of the read it is parked in, checked (op "exec": its
    value is a repr, a str, or None)."""
    def bad(why):
        return GuestCallError(f"the guest's answer is malformed ({why}); the interpreter's driver was "
                              f"tampered with or did not finish. The next fresh run starts clean.")

    where = lx.parked_read()
    if where is None:
        raise bad("no answer: the guest is not parked in a read of stdin")
    address, length = where
    try:
        # The header and, for a small answer (the usual one), the body too in one checked read
        # of the buffer's start; a larger body in a second read once its length is checked.
        head = lx.mm.read(address, min(length, FIRST_READ)) if length >= HEADER.size else b""
        magic, size = HEADER.unpack_from(head) if head else (b"", 0)
        if magic != MAGIC:
            raise bad("no answer header: the guest waits for input it was not sent (did the code read stdin?)")
        if size > length - HEADER.size or size > ANSWER_LIMIT:
            raise bad(f"its length {size} exceeds its buffer of {length} bytes or the "
                      f"{ANSWER_LIMIT >> 20} MiB limit")
        if HEADER.size + size <= len(head):
            body = head[HEADER.size:HEADER.size + size]
        else:
            body = lx.mm.read(address + HEADER.size, size)
    except LinuxError:
        raise bad("its buffer is not readable guest memory") from None
    try:
        answer = _decode_json(body.decode("ascii"))      # driver.py's json.dumps: ASCII
    except (ValueError, RecursionError) as e:
        raise bad(f"not JSON: {type(e).__name__}") from None
    if not isinstance(answer, dict) or set(answer) != ANSWER_FIELDS:
        raise bad("wrong fields")
    error = answer["error"]
    if not (isinstance(answer["stdout"], str) and isinstance(answer["stderr"], str)
            and (error is None or (isinstance(error, dict) and set(error) == ERROR_FIELDS
                                   and all(isinstance(v, str) for v in error.values())))
            and isinstance(answer["display"], list)
            and (op != "exec" or answer["value"] is None or isinstance(answer["value"], str))):
        raise bad("wrong field types")
    if answer["display"]:
        answer["display"] = [_bundle(b, bad) for b in answer["display"]]
    return answer


def _bundle(bundle, bad):
    """A display bundle of the answer, checked: str MIME types to str data (application/json:
    any JSON), binary types base64 and given back as bytes."""
    if not isinstance(bundle, dict):
        raise bad("a display bundle is not an object")
    out = {}
    for mime, data in bundle.items():
        if mime in BINARY_TYPES:
            if not isinstance(data, str):
                raise bad(f"display data of {mime} is not base64 text")
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise bad(f"display data of {mime} is not base64") from None
        elif mime != "application/json" and not isinstance(data, str):
            raise bad(f"display data of {mime} is not text")
        out[mime] = data
    return out
