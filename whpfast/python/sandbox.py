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

from ..errors import (ConfigError, GuestCallError, GuestCancelled, GuestCpuLimit, GuestError,
                      GuestPythonError, GuestTimeout, SandboxClosed, SandboxError, SnapshotError)
from ..linux.errno import LinuxError
from .._typing import StrPath
from ..core import argcheck
from ..core.gate import Gate
from ..core.run import request_timeout, run_timeout
from ..core.resource import Resource
from ..linux.grant import DEFAULT_TMP_SIZE, Grant
from ..linux.process import MAX_OUTPUT_LIMIT, OUTPUT_MARKER, LinuxSandbox, LinuxSnapshot
from .interpreter import describe

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
# Bytes written to fd 1/2 directly (past sys.stdout), per stream and run: LinuxSandbox's output
# limit, RAW_OUTPUT_FACTOR x output_limit (16 MiB by default; at least 4x: a streamed run's
# characters, in UTF-8, always fit).
RAW_OUTPUT_FACTOR = 16
MAX_OUTPUT_CHARS = 16 << 20                  # output_limit at most (the answer is 16 MiB at most)
DEFAULT_CWD = "/tmp/work"                    # the working directory: made at boot, in /tmp
BOOT_TIMEOUT = 300
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
       "MPLBACKEND": "Agg"}              # matplotlib draws in memory: figures come back as PNG


def _env(env, layout):
    """ENV with the caller's env= over it, checked: str names (no "=", no NUL) to str values (no
    NUL); never a variable the interpreter's layout sets (LD_LIBRARY_PATH for a moved prefix)."""
    if env is None:
        return {**ENV, **layout}
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of str to str, not {type(env).__name__}")
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"env must map str to str, got {k!r}: {v!r}")
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise ConfigError(f"env: {k!r} is not a valid environment variable (a name without "
                              f"'=' or NUL, a value without NUL)")
        if k in layout:
            raise ConfigError(f"env cannot set {k}: the interpreter's layout in the sandbox needs "
                              f"{k}={layout[k]}")
    return {**ENV, **env, **layout}


def _cwd(cwd):
    if isinstance(cwd, os.PathLike):
        cwd = os.fspath(cwd)
    if not isinstance(cwd, str):
        raise TypeError(f"cwd must be a str path, not {type(cwd).__name__}")
    if not cwd.startswith("/") or "\0" in cwd:
        raise ConfigError(f"cwd must be an absolute path inside the sandbox, got {cwd!r}")
    return os.path.normpath(cwd)


def _output_limit(value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"output_limit must be an int number of characters, not {value!r}")
    if not 0 <= value <= MAX_OUTPUT_CHARS:
        raise ConfigError(f"output_limit must be between 0 and {MAX_OUTPUT_CHARS} characters, got {value}")
    return value


_CANCEL_RETRY = 0.005        # seconds between repeated cancels of an abandoned arun/aeval
# The working directory, set at boot by a "warm" request (its names do not stay)
_CHDIR = "import os as _os\nif {make}: _os.makedirs({cwd!r}, exist_ok=True)\n_os.chdir({cwd!r})"
FILE_CHUNK = 4 << 20         # bytes of a file per request of sb.files (base64 in JSON: ~5.6 MB)
READ_LIMIT = 1 << 30         # files.read(): bytes at most unless max_size= says otherwise


class _Call:
    """One arun/aeval: abandoned once its awaiting task was cancelled."""
    __slots__ = ("abandoned",)

    def __init__(self):
        self.abandoned = False


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


def granted_snapshot(snapshot, python=None, read=(), memory_size=None, tmp_size=None):
    """The LinuxSnapshot of a PythonSandbox that `snapshot` (a path or a LinuxSnapshot) is,
    held to the caller's grant (see PythonSandbox.from_snapshot): a file is loaded under it (once
    per file while in use, _load_shared), an object is checked against it when any is given.
    SnapshotError for a snapshot of another kind, driver or interpreter, or one asking more."""
    asked = python is not None or memory_size is not None or tmp_size is not None or bool(read)
    grant = None
    if asked or not isinstance(snapshot, LinuxSnapshot):
        python = os.path.abspath(python or sys.executable)
        grant = Grant.of(_policy(describe(python), read)[0], memory_size or DEFAULT_MEMORY_SIZE,
                         tmp_size)
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
    is in the snapshot instead of being redone by every run.

    Environment and limits (docs/limits.md lists the defaults): env: variables set over ENV
    (PATH, HOME=/tmp, LANG, MPLBACKEND), not those the interpreter's layout needs. cwd: the
    working directory (default DEFAULT_CWD, /tmp/work; one under /tmp is made at boot, another
    must be a directory `read` shows, read-only). memory_size bounds the guest's memory (past
    it MemoryError); tmp_size its /tmp, where it writes (past it OSError ENOSPC).
    output_limit: characters of stdout, and of stderr, a run keeps (then a marker; bytes
    written to fd 1/2 directly: RAW_OUTPUT_FACTOR x as many). cpu_time: seconds of CPU time one
    run (run, eval, a streamed run) may use, cpu_time_total: all of this sandbox's runs
    together (its forks go on from what it used); past either the run raises GuestCpuLimit, a
    GuestTimeout, and the state is as after a timeout (the next fresh=False run raises; a
    fresh run or restore() starts clean); once cpu_time_total is used up every run raises
    GuestCpuLimit without starting. None: no CPU limit but each run's timeout (30 s by
    default), which CPU time never exceeds. CPU time is the guest's, as KVM accounts it to the
    thread that runs it, plus the host's work for it (see LinuxSandbox.run); not the time it
    waits."""

    def __init__(self, *, python: Optional[StrPath] = None, setup: str = "",
                 read: Union[StrPath, Iterable[StrPath]] = (), memory_size: int = DEFAULT_MEMORY_SIZE,
                 warmup: str = "", timeout: float = BOOT_TIMEOUT,
                 packages: Union[None, str, Iterable[str]] = None,
                 env: Optional[Mapping[str, str]] = None, cwd: StrPath = DEFAULT_CWD,
                 tmp_size: int = DEFAULT_TMP_SIZE, output_limit: int = OUTPUT_LIMIT,
                 cpu_time: Optional[float] = None, cpu_time_total: Optional[float] = None) -> None:
        self._closed = True
        _check_code(setup, "setup")
        _check_code(warmup, "warmup")
        packages = _packages(packages)
        python = os.path.abspath(python or sys.executable)
        interp = describe(python)
        read = argcheck.read_policy(read)
        environ = _env(env, interp.env)
        cwd = _cwd(cwd)
        self._init_common()
        self._set_limits(output_limit, cpu_time, cpu_time_total)
        # Booted with every site-packages entry readable; narrowed below to what boot, setup and
        # warm-up looked up (and `packages`) before the snapshot every run starts from.
        policy, extra = _policy(interp, read)
        self._lx = LinuxSandbox([interp.argv0, "-I", "-B", "-c", DRIVER], env=environ,
                                read=policy, extra_files=extra, memory_size=memory_size,
                                tmp_size=tmp_size)
        try:
            self._lx.output_limit = self._raw_output_limit
            first = self._lx.run(timeout=timeout)
            if not first.waiting:
                raise SandboxError(f"the interpreter {python} did not start the driver (exit status "
                                   f"{first.exit_code}): {first.stderr.decode('utf-8', 'replace')[-2000:]}")
            in_tmp = cwd == "/tmp" or cwd.startswith("/tmp/")
            result, _ = self._request("warm", _CHDIR.format(cwd=cwd, make=in_tmp), timeout)
            if result.error is not None:
                raise ConfigError(f"cwd {cwd!r} cannot be the working directory: {result.error.message}")
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
        self._lx.output_limit = self._raw_output_limit
        self.python = python
        self._closed = False

    def _set_limits(self, output_limit, cpu_time, cpu_time_total, cpu_used=0.0):
        self._output_limit = _output_limit(output_limit)
        self._raw_output_limit = min(MAX_OUTPUT_LIMIT, RAW_OUTPUT_FACTOR * output_limit)
        self._cpu_time = run_timeout(cpu_time, "cpu_time")
        self._cpu_time_total = run_timeout(cpu_time_total, "cpu_time_total")
        self._cpu_used = cpu_used

    @property
    def files(self) -> "Files":
        """The files of the live state: sb.files.write(path, data), read(path), list(dir),
        remove(path) (see Files)."""
        return self._files

    @property
    def output_limit(self) -> int:
        """Characters of stdout, and of stderr, one run keeps."""
        return self._output_limit

    @property
    def cpu_time(self) -> Optional[float]:
        """Seconds of CPU time one run may use (None: only its timeout bounds it)."""
        return self._cpu_time

    @property
    def cpu_time_total(self) -> Optional[float]:
        """Seconds of CPU time all runs of this sandbox (and the sandbox it was forked from,
        until the fork) may use together (None: no total)."""
        return self._cpu_time_total

    @property
    def cpu_time_used(self) -> float:
        """Seconds of CPU time the runs counted against cpu_time_total used so far (counted
        only while a CPU limit is set)."""
        return self._cpu_used

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
        self._running = None         # the _Call of the run going on (arun's cancel finds it)
        self._running_lock = threading.Lock()
        self._files = Files(self)

    @classmethod
    def from_snapshot(cls, snapshot: Union[LinuxSnapshot, StrPath], *, python: Optional[StrPath] = None,
                      read: Union[StrPath, Iterable[StrPath], Mapping[str, str]] = (),
                      memory_size: Optional[int] = None, tmp_size: Optional[int] = None,
                      output_limit: int = OUTPUT_LIMIT, cpu_time: Optional[float] = None,
                      cpu_time_total: Optional[float] = None) -> "PythonSandbox":
        """A sandbox in a saved warm state (a path written by save(), or a LinuxSnapshot taken by
        a PythonSandbox). Sandboxes started from one path share the file's loaded image.

        A file is untrusted: the arguments are the authority, as for the constructor. It must
        have been made for `python` (default: this interpreter, sys.executable), may read only
        that interpreter's files and the caller's `read` paths, and may have at most
        `memory_size` of memory (default 512 MiB) and a /tmp of at most `tmp_size` (default 64
        MiB); else SnapshotError naming what it asks for. A LinuxSnapshot object without
        arguments keeps the grant it was loaded under (taken in this process: what it
        declares). The environment and working directory are the snapshot's (its guest's
        state); output_limit, cpu_time and cpu_time_total are the caller's, as for the
        constructor (a snapshot file carries none)."""
        snapshot = granted_snapshot(snapshot, python, read, memory_size, tmp_size)
        info = snapshot.meta["python"]
        self = cls.__new__(cls)
        self._closed = True
        self._init_common()
        self._set_limits(output_limit, cpu_time, cpu_time_total)
        self._lx = LinuxSandbox.from_snapshot(snapshot)
        self._lx.output_limit = self._raw_output_limit
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
        `.snapshot`; its limits (output_limit, cpu_time, cpu_time_total) with the CPU time it
        used so far. Close them (or use them as context managers) when done."""
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
        child._set_limits(self._output_limit, self._cpu_time, self._cpu_time_total, self._cpu_used)
        child._lx = LinuxSandbox.from_snapshot(live)
        child._lx.output_limit = self._raw_output_limit
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

    async def arun(self, code: str, *, timeout: Optional[float] = None, fresh: bool = True,
                   on_output: Optional[Callable[[str, str], object]] = None) -> PythonResult:
        """run() for asyncio: `await sb.arun(code)` runs it in a worker thread (the default
        executor) and the event loop goes on. Cancelling the await (task.cancel(),
        asyncio.wait_for's timeout) cancels the run: it stops as cancel() stops it (the
        interpreter state is then as after a timeout) or, if it had not started, never starts;
        the CancelledError propagates. on_output is called in the worker thread."""
        _check_code(code, "code")
        return await self._async("exec", code, timeout, argcheck.flag(fresh, "fresh"), on_output)

    async def aeval(self, expr: str, *, timeout: Optional[float] = None, fresh: bool = True) -> Any:
        """eval() for asyncio, cancelled as arun() is."""
        _check_code(expr, "expr")
        return await self._async("eval", expr, timeout, argcheck.flag(fresh, "fresh"))

    async def _async(self, op, code, timeout, fresh, on_output=None):
        if on_output is not None and not callable(on_output):
            raise TypeError("on_output must be callable (stream, text) or None")
        loop = asyncio.get_running_loop()
        call = _Call()
        work = loop.run_in_executor(None, functools.partial(self._call, op, code, timeout, fresh,
                                                            on_output, call))
        try:
            result, value = await asyncio.shield(work)
        except asyncio.CancelledError:
            # Nobody awaits `work` now: its outcome (GuestCancelled, most likely) is retrieved
            # here, or asyncio would log "Future exception was never retrieved".
            work.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._abandon(call, work, loop)
            raise
        if op == "eval" and result.error is not None:
            raise GuestPythonError(f"the guest raised:\n{result.error}", traceback=result.error,
                                   stdout=result.stdout, stderr=result.stderr)
        return result if op == "exec" else value

    def _abandon(self, call, work, loop):
        """Stops the run of an abandoned arun/aeval: it does not start if it has not, and is
        cancelled again every _CANCEL_RETRY s while it runs (a cancel() that comes before the
        LinuxSandbox's run opens is forgotten, by design)."""
        call.abandoned = True

        def again():
            if work.done():
                return
            with self._running_lock:
                if self._running is call:
                    self._lx.cancel()
            loop.call_later(_CANCEL_RETRY, again)
        again()

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

    def _call(self, op, code, timeout, fresh, on_output=None, call=None):
        timeout = request_timeout(timeout)
        deadline = None if run_timeout(timeout) is None else time.monotonic_ns() + int(timeout * 1e9)
        with self._gate.operation("run()" if op == "exec" else "eval()", deadline):
            self._check_open()
            if call is not None and call.abandoned:
                raise GuestCancelled("the run was cancelled before it started")
            if not fresh and self._stale:
                raise SandboxError("the previous run left the interpreter unusable (it exited, timed out "
                                   "or did not answer); run again with fresh=True, or restore() a "
                                   "checkpoint() to continue from it")
            cpu = self._cpu_left()
            with self._running_lock:
                self._running = call
            try:
                return self._request(op, code, timeout, self._snapshot if fresh else None,
                                     on_output, cpu)
            finally:
                with self._running_lock:
                    self._running = None

    def _files_op(self, what, exchange, timeout):
        """Runs `exchange`, a generator that yields "file" requests (dicts) and is sent the
        value of each answer, as one operation; returns what it returns. An OSError the guest's
        file system raised is raised here as one (and into nothing: the exchange ends)."""
        timeout = request_timeout(timeout)
        with self._gate.operation(what):
            self._check_open()
            if self._stale:
                raise SandboxError(f"{what} needs the live interpreter, and the previous run left it "
                                   f"unusable (it exited, timed out or was cancelled); restore() a "
                                   f"checkpoint() or run with fresh=True first")
            request = next(exchange)
            while True:
                value = self._file_request(request, timeout)
                try:
                    request = exchange.send(value)
                except StopIteration as done:
                    return done.value

    def _file_request(self, request, timeout):
        payload = json.dumps({"op": "file", **request}).encode()
        self._stale = True                       # until a clean answer says otherwise
        try:
            if self._gate.closing:
                raise SandboxClosed("the Python sandbox was closed")
            r = self._lx.run(struct.pack("<I", len(payload)) + payload, timeout=timeout)
        except (SandboxError, GuestError):
            if self._gate.closing:
                raise SandboxClosed("the Python sandbox was closed while a file request ran") from None
            raise
        if r.exit_code is not None:
            raise SandboxError(f"the Python process exited with status {r.exit_code} during a file "
                               f"request; run with fresh=True or restore() a checkpoint")
        answer = _read_answer(self._lx, "eval")
        self._stale = False
        error = answer["error"]
        if error is not None:
            raise GuestCallError(f"the guest's driver failed a file request: {error['type']}: "
                                 f"{error['message']}")
        value = answer["value"]
        if isinstance(value, dict) and set(value) == {"errno", "strerror"}:
            code, text = value["errno"], value["strerror"]
            if not (isinstance(code, int) and 0 < code < 4096 and isinstance(text, str)):
                raise _malformed("an error's fields")
            raise OSError(code, text, request["path"])
        return value

    def _cpu_left(self):
        """Seconds of CPU time the next run may use (None: no limit); GuestCpuLimit when
        cpu_time_total is used up."""
        per, total = self._cpu_time, self._cpu_time_total
        if total is None:
            return per
        left = total - self._cpu_used
        if left <= 0:
            raise GuestCpuLimit(f"the sandbox has used its cpu_time_total of {total:g} s "
                                f"({self._cpu_used:.3f} s); the run was not started")
        return left if per is None else min(per, left)

    def _request(self, op, code, timeout, restore=None, on_output=None, cpu=None):
        """Sends one request to the parked driver and returns (PythonResult, value); restore:
        the snapshot to restore first, in the same call (LinuxSandbox.run(restore=...): one
        GIL release for the restore and the request's run). on_output: the run streams its
        output to it (the driver writes through to fd 1/2; none: it captures, no write exits)."""
        payload = _encode_request(op, code, os.urandom(32).hex(), on_output is not None,
                                  self._output_limit)
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
                                 restore=restore, cpu_time=cpu)
            finally:
                if listener is not None:
                    self._lx._on_output = None
                if cpu is not None and self._lx.last_cpu_time is not None:
                    self._cpu_used += self._lx.last_cpu_time
            if listener is not None:
                listener.finish(r)
            if self._gate.closing:
                raise closed
        except (SandboxError, GuestError) as e:
            if self._gate.closing:
                raise closed from None
            if listener is not None and listener.error is not None:
                raise listener.error from None
            if isinstance(e, GuestCpuLimit) and cpu != self._cpu_time:
                why = GuestCpuLimit(f"the run used the rest of the sandbox's cpu_time_total of "
                                    f"{self._cpu_time_total:g} s ({cpu:.3f} s) and was stopped")
                why.stdout, why.stderr = getattr(e, "stdout", b""), getattr(e, "stderr", b"")
                raise why from None
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
            entries = describe(self.python).site_entries(frozenset([name]))
        except SandboxError:
            return error
        # (an entry is hidden unless the policy shows it, or its whole site-packages directory)
        if any(e not in read and e.rpartition("/")[0] not in read for e in entries):
            hint = (f"{name!r} is installed but not visible in this sandbox: its setup did not "
                    f"import it. Pass PythonSandbox(packages=[{name!r}]) (or packages=\"all\") to "
                    f"make it importable.")
            return PythonError(error.type, f"{error.message} ({hint})", f"{error.traceback}[whpfast: {hint}]\n")
        return error


@dataclass(frozen=True)
class FileInfo:
    """An entry of sb.files.list(dir): its name, its path (dir joined with the name), its size
    in bytes (of the link itself for a symlink) and its kind: "file", "dir", "link" or
    "other"."""
    name: str
    path: str
    size: int
    kind: str


FILE_KINDS = frozenset(("file", "dir", "link", "other"))


def _guest_path(path):
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"path must be a str (a path inside the sandbox), not {type(path).__name__}")
    if not path or "\0" in path:
        raise ValueError(f"path must be a non-empty path without NUL, got {path!r}")
    return path


class Files:
    """sb.files: the files of the sandbox's own file system from the host, in its live state
    (what run(..., fresh=False) continues from): /tmp, with the working directory in it, and,
    read-only, what `read` shows. The guest's interpreter does the work, between cells, through
    its driver (no restore): its file system enforces what the guest itself may do, so a write
    is held to tmp_size (OSError ENOSPC past it; the file is then left as it was) and to /tmp (a
    host path is a read-only mount: OSError EROFS), and the files are part of checkpoint() and
    fork(). Relative paths are from the guest's working directory. Errors from the guest's
    file system are the OSError subclasses Python raises (FileNotFoundError, ...). A fresh run
    (fresh=True, the default) starts from the warm snapshot, without what was written here:
    use fresh=False to see it. timeout: seconds for each request of at most FILE_CHUNK bytes
    (default: DEFAULT_RUN_TIMEOUT). After a run that left the interpreter unusable (it timed
    out, was cancelled or exited) there is no live state: SandboxError, until restore() or a
    fresh run."""

    def __init__(self, sandbox):
        self._sb = weakref.proxy(sandbox)

    def write(self, path: StrPath, data: Union[bytes, bytearray, memoryview, str], *,
              encoding: str = "utf-8", timeout: Optional[float] = None) -> int:
        """Writes data (bytes, or a str encoded with `encoding`) to the file at path, replacing
        it whole (atomically: a failed write leaves it as it was), making its missing parent
        directories. Returns the bytes written."""
        path = _guest_path(path)
        if isinstance(data, str):
            data = data.encode(encoding)
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes or str, not {type(data).__name__}")
        view = memoryview(data).cast("B")
        chunks = [view[i:i + FILE_CHUNK] for i in range(0, len(view), FILE_CHUNK)] or [view]

        def exchange():
            for i, chunk in enumerate(chunks):
                value = yield {"action": "write", "path": path, "first": i == 0,
                               "last": i == len(chunks) - 1,
                               "data": base64.b64encode(chunk).decode("ascii")}
                if value is not None:
                    raise _malformed("a write's answer is not null")
            return len(view)
        return self._sb._files_op("files.write()", exchange(), timeout)

    def read(self, path: StrPath, *, encoding: Optional[str] = None, max_size: int = READ_LIMIT,
             timeout: Optional[float] = None) -> Union[bytes, str]:
        """The contents of the file at path: bytes, or a str decoded with `encoding` when
        given. A file larger than max_size bytes (default READ_LIMIT, 1 GiB) raises
        ValueError (a host path's file may be large)."""
        path = _guest_path(path)
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
            raise TypeError(f"max_size must be an int number of bytes >= 0, not {max_size!r}")

        def exchange():
            parts, got = [], 0
            while True:
                want = min(FILE_CHUNK, max_size + 1 - got)
                value = yield {"action": "read", "path": path, "offset": got, "size": want}
                if not isinstance(value, str):
                    raise _malformed("a read's answer is not base64 text")
                try:
                    chunk = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise _malformed("a read's answer is not base64") from None
                if len(chunk) > want:
                    raise _malformed("a read's answer is larger than asked for")
                parts.append(chunk)
                got += len(chunk)
                if got > max_size:
                    raise ValueError(f"{path} is larger than max_size={max_size} bytes")
                if len(chunk) < want:
                    return b"".join(parts)
        data = self._sb._files_op("files.read()", exchange(), timeout)
        return data if encoding is None else data.decode(encoding)

    def list(self, path: StrPath = ".", *, timeout: Optional[float] = None) -> List[FileInfo]:
        """The entries of the directory at path (default: the working directory), sorted by
        name, as FileInfo(name, path, size, kind)."""
        path = _guest_path(path)

        def exchange():
            value = yield {"action": "list", "path": path}
            if not isinstance(value, list):
                raise _malformed("a listing is not a list")
            out = []
            for entry in value:
                if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                        and entry[0] not in ("", ".", "..") and "/" not in entry[0]
                        and isinstance(entry[1], int) and not isinstance(entry[1], bool)
                        and entry[1] >= 0 and entry[2] in FILE_KINDS):
                    raise _malformed("a listing's entry is not [name, size, kind]")
                out.append(FileInfo(entry[0], path.rstrip("/") + "/" + entry[0], entry[1], entry[2]))
            return sorted(out, key=lambda e: e.name)
        return self._sb._files_op("files.list()", exchange(), timeout)

    def remove(self, path: StrPath, *, recursive: bool = False, timeout: Optional[float] = None) -> None:
        """Removes the file (or symlink) at path, or the directory: empty, or with all it holds
        when recursive=True."""
        path = _guest_path(path)
        argcheck.flag(recursive, "recursive")

        def exchange():
            value = yield {"action": "remove", "path": path, "recursive": recursive}
            if value is not None:
                raise _malformed("a remove's answer is not null")
        self._sb._files_op("files.remove()", exchange(), timeout)


def _malformed(why):
    return GuestCallError(f"the guest's answer to a file request is malformed ({why}); the "
                          f"interpreter's driver was tampered with. The next fresh run starts clean.")


def _encode_request(op, code, seed, stream=False, cap=OUTPUT_LIMIT):
    """json.dumps({"op": op, "code": code, "seed": seed, "cap": cap, "stream": stream}).encode(),
    the same bytes without the encoder's per-call set-up (~3-6 us of a ~220 us request, GIL
    held): op and seed are ours (a name, hex digits); code goes through the C function
    json.dumps uses for a str (ensure_ascii)."""
    return (f'{{"op": "{op}", "code": {_encode_str(code)}, "seed": "{seed}", "cap": {int(cap)}, '
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
