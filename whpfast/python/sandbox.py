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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from ..errors import (GuestCallError, GuestError, GuestPythonError, SandboxClosed, SandboxError,
                      SnapshotError)
from ..linux.errno import LinuxError
from .._typing import StrPath
from ..core import argcheck
from ..core.gate import Gate
from ..core.run import request_timeout, run_timeout
from ..core.resource import Resource
from ..linux.grant import Grant
from ..linux.process import LinuxSandbox, LinuxSnapshot
from .interpreter import _belongs, _listdir, describe

_encode_str = json.encoder.encode_basestring_ascii     # json.dumps's (ensure_ascii) str encoder
_decode_json = json.JSONDecoder().decode               # json.loads of a str, without its set-up
DRIVER = (Path(__file__).with_name("driver.py")).read_text()
DRIVER_DIGEST = hashlib.sha256(DRIVER.encode()).hexdigest()
MAGIC = b"\x00whpfast-py-ans\x00"           # driver.py's answer header: MAGIC, length (u64 LE)
HEADER = struct.Struct("<16sQ")
FIRST_READ = 4096                            # bytes of the answer buffer _read_answer reads at once
ERROR_FIELDS = {"type", "message", "traceback"}     # of an answer's error (driver.py)
ANSWER_LIMIT = 16 << 20                      # bytes of answer JSON accepted (= driver.py's, = MAX_IO)
DEFAULT_MEMORY_SIZE = 512 << 20
OUTPUT_LIMIT = 1 << 20                       # characters of stdout / stderr kept per run
# (bytes written to fd 1/2 directly, past sys.stdout: LinuxSandbox's output limit applies)
BOOT_TIMEOUT = 300
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}


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
    type, message and traceback), else None."""
    stdout: str
    stderr: str
    error: Optional[PythonError]


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
    # (the ctime too: a chmod decides whether the file may be mapped, see snapshot.load_image)
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

    def _checkpoint(self):
        if self._stale:
            raise SandboxError("the previous run left the interpreter unusable (it exited, timed out "
                               "or did not answer): there is no live state to checkpoint; restore "
                               "a checkpoint or run with fresh=True")
        snapshot = self._lx.snapshot()
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
            snapshot = self._checkpoint()
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

    def run(self, code: str, *, timeout: Optional[float] = None, fresh: bool = True) -> PythonResult:
        """Executes code; returns a PythonResult (stdout, stderr, error). fresh=True (default)
        first restores the warm snapshot, so nothing an earlier run did is visible; fresh=False
        continues in the state the previous run left. timeout: seconds the run may take, past it
        GuestTimeout (a run waiting for another thread's gives up at it too); None: DEFAULT_RUN_TIMEOUT
        (whpfast.core.run, 30 s); math.inf: none. Output written to fd 1/2 past sys.stdout is
        kept up to LinuxSandbox's output limit per stream (then its writes fail, and a marker
        says so)."""
        _check_code(code, "code")
        result, _ = self._call("exec", code, timeout, argcheck.flag(fresh, "fresh"))
        return result

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

    def _call(self, op, code, timeout, fresh):
        timeout = request_timeout(timeout)
        deadline = None if run_timeout(timeout) is None else time.monotonic_ns() + int(timeout * 1e9)
        with self._gate.operation("run()" if op == "exec" else "eval()", deadline):
            self._check_open()
            if not fresh and self._stale:
                raise SandboxError("the previous run left the interpreter unusable (it exited, timed out "
                                   "or did not answer); run again with fresh=True, or restore() a "
                                   "checkpoint() to continue from it")
            return self._request(op, code, timeout, self._snapshot if fresh else None)

    def _request(self, op, code, timeout, restore=None):
        """Sends one request to the parked driver and returns (PythonResult, value); restore:
        the snapshot to restore first, in the same call (LinuxSandbox.run(restore=...): one
        GIL release for the restore and the request's run)."""
        payload = _encode_request(op, code, os.urandom(32).hex())
        self._stale = True                       # until a clean answer says otherwise
        closed = SandboxClosed("the Python sandbox was closed while the code ran")
        try:
            if self._gate.closing:      # (its cancel found no run to stop)
                raise closed
            r = self._lx.run(struct.pack("<I", len(payload)) + payload, timeout=timeout,
                             restore=restore)
            if self._gate.closing:
                raise closed
        except (SandboxError, GuestError):
            if self._gate.closing:
                raise closed from None
            raise
        raw_err = r.stderr.decode("utf-8", "replace")
        if r.exit_code is not None:
            out = r.stdout.decode("utf-8", "replace")
            why = f"the Python process exited with status {r.exit_code} (os._exit or a crash) before answering"
            return PythonResult(out, raw_err, PythonError("WhpfastError", why, why + "\n")), None
        answer = _read_answer(self._lx)
        self._stale = False
        error = answer["error"]
        if error is not None:
            error = PythonError(error["type"], error["message"], error["traceback"])
            if error.type == "ModuleNotFoundError":
                error = self._explain_missing(error)
        result = PythonResult(r.stdout.decode("utf-8", "replace") + answer["stdout"],
                              raw_err + answer["stderr"], error)
        return result, answer["value"]

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


def _encode_request(op, code, seed):
    """json.dumps({"op": op, "code": code, "seed": seed, "cap": OUTPUT_LIMIT}).encode(), the same
    bytes without the encoder's per-call set-up (~3-6 us of a ~220 us request, GIL held): op
    and seed are ours (a name, hex digits); code goes through the C function json.dumps uses
    for a str (ensure_ascii)."""
    return f'{{"op": "{op}", "code": {_encode_str(code)}, "seed": "{seed}", "cap": {OUTPUT_LIMIT}}}'.encode()


def _read_answer(lx):
    """The driver's answer from the buffer of the read it is parked in, checked."""
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
    if not isinstance(answer, dict) or set(answer) != {"stdout", "stderr", "error", "value"}:
        raise bad("wrong fields")
    error = answer["error"]
    if not (isinstance(answer["stdout"], str) and isinstance(answer["stderr"], str)
            and (error is None or (isinstance(error, dict) and set(error) == ERROR_FIELDS
                                   and all(isinstance(v, str) for v in error.values())))):
        raise bad("wrong field types")
    return answer
