"""whpfast.Pool: a fixed number of warm sandboxes made from one snapshot, shared by threads and
asyncio tasks.

Every request takes a free sandbox, restores it to the snapshot (so no request sees another's
state), runs, and hands it on: to the first waiting request (FIFO) or back to the free list. A
request that finds every sandbox busy waits in a bounded queue; past the bound it is refused with
PoolFull. A sandbox whose request faulted, timed out, was cancelled or left it poisoned is closed
and replaced by a new one from the snapshot before the next request gets it, so the pool keeps
its size. Guest code runs with the GIL released, so N threads keep N guests running at once. A
warm Python request releases it once, for its restore and its run together (one backend call,
LinuxSandbox.run(restore=...)); the rest of the request (serving its exits, the answer, the
pool's bookkeeping) holds it, so requests that spend little time in the guest scale less
(docs/guides/pools.md, bench/bench_pool.py).

One lock guards the free list, the queue and the counters; no guest run, restore or sandbox
construction happens while it is held."""

import asyncio
import collections
import concurrent.futures
import math
import os
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Union

import numpy as np
import numpy.typing as npt

from ._typing import StrPath
from .core import mapbudget
from .core.resource import Resource
from .core.run import request_timeout
from . import errors
from .errors import (ConfigError, GuestCallError, GuestCancelled, GuestPythonError, PoolFull,
                     SandboxClosed, SnapshotError, WhpfastError)
from .linux.process import LinuxSnapshot
from .poolworker import RemoteSandbox
from .python.sandbox import PythonResult, PythonSandbox, granted_snapshot
from .sandbox import Sandbox
from .core import container
from .snapshot import Snapshot

HISTORY = 10_000            # requests whose queue wait and run time stats() keeps (a ring)
KINDS = ("python", "sdk")
WORKERS = ("thread", "process")
_CANCEL_RETRY = 0.005       # seconds between repeated cancels of a request (see _Slot.cancel)


KindError = errors.KindError                    # (defined with the other errors; raised here)


@dataclass(frozen=True)
class PoolStats:
    """What a Pool did: counters since it was made, and the queue wait and run time (seconds) of
    the most recent requests (up to HISTORY, oldest first) as numpy arrays.

    served: requests that ran on a sandbox (whatever the outcome); failed: those of them that
    raised; replaced: sandboxes closed and made again after a fault, timeout, cancel or poison;
    rejected: requests refused with PoolFull; size, in_use, queued: at the time of stats()."""
    size: int
    in_use: int
    queued: int
    served: int
    failed: int
    replaced: int
    rejected: int
    queue_wait: "npt.NDArray[np.float64]"
    run_time: "npt.NDArray[np.float64]"

    def _values(self, what: Union[str, "npt.ArrayLike"]) -> "npt.NDArray[np.float64]":
        if isinstance(what, str):
            if what not in ("queue_wait", "run_time"):
                raise ValueError(f"what must be 'queue_wait' or 'run_time', not {what!r}")
            return getattr(self, what)
        return np.asarray(what, dtype=np.float64)

    def median(self, what: Union[str, "npt.ArrayLike"] = "run_time") -> float:
        """Median in seconds of "run_time" (default), "queue_wait" or a given array; nan if empty."""
        values = self._values(what)
        return float(np.median(values)) if len(values) else math.nan

    def p99(self, what: Union[str, "npt.ArrayLike"] = "run_time") -> float:
        """99th percentile in seconds of "run_time" (default), "queue_wait" or a given array."""
        values = self._values(what)
        return float(np.percentile(values, 99)) if len(values) else math.nan


def _file_kind(path):
    """"sdk" or "python" from a snapshot file's header (whpfast/core/container.py: its kind).
    Opened without blocking (a FIFO) and checked to be a regular file first."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise SnapshotError(f"cannot open snapshot {os.fspath(path)!r}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotError(f"snapshot {os.fspath(path)!r} is not a regular file")
        head = os.pread(fd, container.HEADER.size, 0)
    finally:
        os.close(fd)
    try:
        return {"sdk": "sdk", "linux": "python"}[container.kind_of(head)]
    except SnapshotError as e:
        raise SnapshotError(f"{os.fspath(path)!r}: {e}; save one with Snapshot.save() or "
                            f"PythonSandbox.save()") from None


def _resolve(snapshot, kind):
    """(kind, source): source is a Snapshot, a LinuxSnapshot or a path, checked against kind."""
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"kind must be 'python', 'sdk' or None (detected), not {kind!r}")
    if isinstance(snapshot, PythonSandbox):
        snapshot = snapshot.snapshot
    if isinstance(snapshot, Snapshot):
        found = "sdk"
    elif isinstance(snapshot, LinuxSnapshot):
        found = "python"
    elif isinstance(snapshot, (str, bytes, os.PathLike)):
        found = _file_kind(snapshot)
    else:
        raise TypeError(f"Pool takes a whpfast.Snapshot, a PythonSandbox or its snapshot, or the path "
                        f"of a saved snapshot, not {type(snapshot).__name__}"
                        + ("; take one with sb.snapshot()" if isinstance(snapshot, Sandbox) else ""))
    if kind is not None and kind != found:
        raise KindError(f"kind={kind!r}, but the snapshot is of a{'n SDK' if found == 'sdk' else ' Python'} "
                        f"sandbox (kind {found!r})")
    return found, snapshot


def _snapshot_path(snapshot, scratch):
    """A file holding the snapshot: the path given, the file a loaded snapshot came from
    (snapshot files are immutable), or the snapshot saved into scratch."""
    if isinstance(snapshot, (str, bytes, os.PathLike)):
        return os.fsdecode(snapshot)
    if isinstance(snapshot, PythonSandbox):
        snapshot = snapshot.snapshot
    if isinstance(snapshot, (Snapshot, LinuxSnapshot)):
        return snapshot.path or snapshot.save(os.path.join(scratch, "snapshot.snap"))
    raise TypeError(f"RayPool takes a whpfast.Snapshot, a PythonSandbox or its snapshot, or the path "
                    f"of a saved snapshot, not {type(snapshot).__name__}")


def _declared_grant(snapshot):
    """The Pool arguments that grant a snapshot object what it declares: its nodes load it from
    a file, where it needs them. Nothing for a path (the caller's arguments are the grant)."""
    if isinstance(snapshot, PythonSandbox):
        snapshot = snapshot.snapshot
    if isinstance(snapshot, LinuxSnapshot):
        return {"python": snapshot.meta["python"]["python"], "read": dict(snapshot.meta["config"]["read"]),
                "memory_size": snapshot.meta["memory_size"], "tmp_size": snapshot.meta["config"]["tmp_size"]}
    if isinstance(snapshot, Snapshot):
        return {"files": {f["name"]: f["path"] for f in snapshot.meta["files"]},
                "memory_size": snapshot.meta["layout"]["memory_size"]}
    return {}


class _Request:
    """One request holding a slot; cancelled once someone asked to stop it."""
    __slots__ = ("cancelled",)

    def __init__(self):
        self.cancelled = False


class _Slot:
    """One sandbox place of the pool: the sandbox (None after a replacement failed: made again
    before its next request) and the request holding it (None while free)."""
    __slots__ = ("sandbox", "request")

    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.request = None

    def cancel(self):
        """Stops the request holding this slot (with the pool's lock held, so the slot cannot
        pass to another request meanwhile). A sandbox's cancel() acts only on a guest run going
        on at that moment (a restore cannot be cut short), so cancellers repeat it until the
        request is over; the flag stops an SDK request between its restore and its call."""
        if self.request is None:
            return
        self.request.cancelled = True
        sb = self.sandbox
        if sb is not None:
            (sb.linux if isinstance(sb, PythonSandbox) else sb).cancel()   # (or a RemoteSandbox)

    def poisoned(self):
        sb = self.sandbox
        if sb is None or sb.closed:
            return True
        return bool((sb.linux if isinstance(sb, PythonSandbox) else sb).poisoned)   # (or remote)


class _ThreadWaiter:
    """A thread waiting in the queue: woken with a slot or an error. It waits on a lock of its
    own, released when one is handed to it, not on a condition of the pool's lock: woken, it
    owns its slot and goes on, instead of sleeping once more until the thread that woke it
    lets go of the pool's lock (a hand-off at saturation costs one wake-up, not two)."""
    __slots__ = ("ready", "slot", "error")

    def __init__(self):
        self.ready = threading.Lock()
        self.ready.acquire()
        self.slot = self.error = None

    def deliver(self, slot):            # with the pool's lock held
        self.slot = slot
        self.ready.release()
        return True

    def fail(self, error):              # with the pool's lock held
        self.error = error
        self.ready.release()


class _AsyncWaiter:
    """A task waiting in the queue: its future is resolved in its event loop's thread, where a
    slot for a task that was cancelled meanwhile goes back to the pool."""
    __slots__ = ("pool", "loop", "future")

    def __init__(self, pool, loop):
        self.pool, self.loop, self.future = pool, loop, loop.create_future()

    def deliver(self, slot):            # with the pool's lock held
        try:
            self.loop.call_soon_threadsafe(self._set, slot)
            return True
        except RuntimeError:            # its loop is closed: nobody will take it
            return False

    def _set(self, slot):
        if self.future.done():          # cancelled or timed out while the slot was on its way
            self.pool._give_back(slot, None)
        else:
            self.future.set_result(slot)

    def fail(self, error):
        def set_error():
            if not self.future.done():
                self.future.set_exception(error)
        try:
            self.loop.call_soon_threadsafe(set_error)
        except RuntimeError:
            pass


class Pool(Resource):
    """`size` warm sandboxes made from one snapshot (default: one per CPU), each restored to it
    before every request. Thread-safe; `arun`/`aeval`/`acall` for asyncio.

    snapshot: a whpfast.Snapshot (SDK guests), a PythonSandbox or its `.snapshot` (a
    LinuxSnapshot), or the path of a saved snapshot of either kind (loaded once; every sandbox
    maps its pages copy-on-write, so they share them). kind: "python" or "sdk"; None detects it.
    max_queue: requests that may wait for a sandbox (default 4 * size); a request finding the
    queue full raises PoolFull at once (unless it passes queue_timeout=). on_output(stream, text):
    SDK guests' prints as they happen (stream "stdout"); a Python request's captured stdout and
    stderr when it ends (non-empty ones). timeout: the default run timeout of every request
    (None: DEFAULT_RUN_TIMEOUT of whpfast.core.run, 30 s; math.inf: none); a request's own
    timeout= overrides it.

    workers: "thread" (default) keeps the sandboxes in this process, "process" each in a worker
    process of its own (whpfast/poolworker.py: no GIL shared between sandboxes' host-side work;
    a request costs a pipe round trip more; a snapshot object is saved into a private temporary
    directory first; output reaches on_output when a request ends).

    A snapshot file is untrusted: these arguments are the authority, as for from_snapshot.
    Python pools: python= (the interpreter it must have been made for, default this one), read=
    (host paths beyond that interpreter's files), memory_size= and tmp_size=; SDK pools: files= (the host
    file behind each of its file mappings) and memory_size=. A snapshot declaring more is refused
    (SnapshotError). A snapshot object (a PythonSandbox, one taken in this process, or one loaded
    with its grant) needs none of them."""

    def __init__(self, snapshot: Union[Snapshot, LinuxSnapshot, PythonSandbox, StrPath], *,
                 size: Optional[int] = None, kind: Optional[str] = None,
                 max_queue: Optional[int] = None,
                 on_output: Optional[Callable[[str, str], object]] = None,
                 timeout: Optional[float] = None, python: Optional[StrPath] = None,
                 read: Union[StrPath, Iterable[StrPath]] = (),
                 files: Optional[Mapping[str, StrPath]] = None,
                 memory_size: Optional[int] = None, tmp_size: Optional[int] = None,
                 workers: str = "thread") -> None:
        self._closed = True
        if workers not in WORKERS:
            raise ConfigError(f"workers must be 'thread' or 'process', not {workers!r}")
        self.workers = workers
        if size is None:
            size = os.cpu_count() or 1
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"size must be a positive int (sandboxes), got {size!r}")
        if max_queue is None:
            max_queue = 4 * size
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ConfigError(f"max_queue must be an int >= 0 (waiting requests), got {max_queue!r}")
        if on_output is not None and not callable(on_output):
            raise TypeError("on_output must be callable (stream, text) or None")
        self._timeout = None if timeout is None else request_timeout(timeout)
        self.kind, self._source = _resolve(snapshot, kind)
        if self.kind == "sdk" and (python is not None or read):
            raise ConfigError("python= and read= are for Python pools; an SDK pool takes files=")
        if self.kind == "python" and files is not None:
            raise ConfigError("files= is for SDK pools; a Python pool takes read=")
        # The caller's grant: every SDK sandbox is checked against it; a Python pool's first one
        # is, and the later ones start from the snapshot object it loaded, which keeps that grant.
        if self.kind == "sdk" and tmp_size is not None:
            raise ConfigError("tmp_size= is for Python pools (an SDK guest has no /tmp)")
        given = ({"files": files, "memory_size": memory_size} if self.kind == "sdk" else
                 {"python": python, "read": read, "memory_size": memory_size, "tmp_size": tmp_size})
        self._grant: Dict[str, Any] = {k: v for k, v in given.items() if v is not None and v != ()}
        self._scratch: Optional[str] = None
        if workers == "process":
            # Each worker loads a file under the caller's grant (a snapshot object: what it
            # declares, as RayPool's nodes do); the file is saved once into a private directory.
            if not isinstance(self._source, (str, bytes, os.PathLike)):
                self._scratch = tempfile.mkdtemp(prefix="whpfast-pool-")
                self._grant = {**_declared_grant(self._source), **self._grant}
                self._source = _snapshot_path(self._source, self._scratch)
            self._source = os.path.abspath(os.fsdecode(self._source))
        self._on_output = on_output
        self.size = size
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)     # notified when a slot comes back
        self._waiters: Deque[Any] = collections.deque()
        self._busy: List[_Slot] = []                     # slots out with a request
        self._closing = False
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._served = self._failed = self._replaced = self._rejected = 0
        self._queue_wait = np.zeros(HISTORY)
        self._run_time = np.zeros(HISTORY)
        self._free: List[_Slot] = []
        # each live sandbox's share of the process's mapping budget, given back when the pool
        # retires it (at garbage collection otherwise: too late for a pool replacing sandboxes)
        self._reservations: Dict[int, Any] = {}
        try:
            for _ in range(size):
                self._free.append(_Slot(self._make()))
        except BaseException:
            for slot in self._free:
                self._retire(slot.sandbox)
            self._remove_scratch()
            raise
        self._closed = False

    def _make(self):
        """A new sandbox from the snapshot, within the process's budget of host mappings
        (mapbudget.reserve: MappingBudgetError when it would not fit). The first one from a path
        loads the file; the loaded snapshot is kept, so every later one maps the same file's
        pages (no second load). With workers="process", a worker process that loads the file
        (its mappings are its own, outside this process's budget)."""
        if self.workers == "process":
            return RemoteSandbox(self.kind, self._source, self._grant)
        if self.kind == "sdk":
            if not isinstance(self._source, Snapshot):
                self._source = Snapshot.load(self._source)
            on_print = None
            if self._on_output is not None:
                on_output = self._on_output
                on_print = lambda text: on_output("stdout", text)  # noqa: E731
            with mapbudget.reserving(self._source) as reservation:
                sb = reservation.attach(Sandbox.from_snapshot(self._source, on_print=on_print, **self._grant))
        else:
            # the first sandbox loads the file under the caller's grant; the object keeps it
            self._source, self._grant = granted_snapshot(self._source, **self._grant), {}
            with mapbudget.reserving(self._source) as reservation:
                sb = reservation.attach(PythonSandbox.from_snapshot(self._source))
        self._reservations[id(sb)] = reservation
        return sb

    def _retire(self, sandbox):
        """Closes a sandbox of the pool and gives its mapping reservation back."""
        sandbox.close()
        reservation = self._reservations.pop(id(sandbox), None)
        if reservation is not None:
            reservation.release()

    # -- state ----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def snapshot(self) -> Union[Snapshot, LinuxSnapshot]:
        """The snapshot every request starts from (loaded from the file, for a path)."""
        return self._source

    @property
    def in_use(self) -> int:
        return len(self._busy)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def stats(self) -> PoolStats:
        """Counters and the recent requests' queue wait and run time (copies)."""
        with self._lock:
            n = self._served
            keep = min(n, HISTORY)
            order = np.arange(n - keep, n) % HISTORY
            return PoolStats(self.size, len(self._busy), len(self._waiters), n, self._failed,
                             self._replaced, self._rejected, self._queue_wait[order], self._run_time[order])

    def __repr__(self) -> str:
        state = "closed" if self._closing else f"{len(self._busy)} in use, {len(self._waiters)} queued"
        return f"<whpfast.Pool {self.kind} size={self.size} {state}>"

    # -- requests -------------------------------------------------------------------------------

    def run(self, code: str, *, timeout: Optional[float] = None,
            queue_timeout: Optional[float] = None) -> PythonResult:
        """Runs Python code in a fresh sandbox (Python pools); a PythonResult."""
        return self._sync("run", (code,), timeout, queue_timeout)

    def eval(self, expr: str, *, timeout: Optional[float] = None,
             queue_timeout: Optional[float] = None) -> Any:
        """Evaluates a Python expression in a fresh sandbox (Python pools); its value (as JSON)."""
        return self._sync("eval", (expr,), timeout, queue_timeout)

    def call(self, name: str, *args: Any, timeout: Optional[float] = None,
             queue_timeout: Optional[float] = None) -> Any:
        """Calls guest function `name` in a freshly restored sandbox (SDK pools)."""
        return self._sync("call", (name,) + args, timeout, queue_timeout)

    async def arun(self, code: str, *, timeout: Optional[float] = None,
                   queue_timeout: Optional[float] = None) -> PythonResult:
        """run() for asyncio: the event loop is not blocked."""
        return await self._async("run", (code,), timeout, queue_timeout)

    async def aeval(self, expr: str, *, timeout: Optional[float] = None,
                    queue_timeout: Optional[float] = None) -> Any:
        """eval() for asyncio."""
        return await self._async("eval", (expr,), timeout, queue_timeout)

    async def acall(self, name: str, *args: Any, timeout: Optional[float] = None,
                    queue_timeout: Optional[float] = None) -> Any:
        """call() for asyncio."""
        return await self._async("call", (name,) + args, timeout, queue_timeout)

    def _check(self, op, args, timeout, queue_timeout):
        if (op == "call") != (self.kind == "sdk"):
            if op == "call":
                raise KindError("call() is for SDK guests; this pool runs Python sandboxes: use "
                                "run(code) or eval(expr)")
            raise KindError(f"{op}() is for Python sandboxes; this pool runs an SDK guest: use "
                            f"call(name, *args)")
        if op != "call" and not isinstance(args[0], str):     # before it takes a sandbox
            raise TypeError(f"{'code' if op == 'run' else 'expr'} must be a str of Python source, "
                            f"not {type(args[0]).__name__}")
        if queue_timeout is not None and (isinstance(queue_timeout, bool) or not isinstance(
                queue_timeout, (int, float)) or not queue_timeout >= 0):
            raise ValueError(f"queue_timeout must be a number of seconds >= 0 or None, got {queue_timeout!r}")
        return request_timeout(self._timeout if timeout is None else timeout)

    def _sync(self, op, args, timeout, queue_timeout):
        timeout = self._check(op, args, timeout, queue_timeout)
        queued_at = time.perf_counter()
        slot = self._enter(None, queue_timeout)
        return self._serve(slot, _Request(), op, args, timeout, queued_at)

    async def _async(self, op, args, timeout, queue_timeout):
        timeout = self._check(op, args, timeout, queue_timeout)
        loop = asyncio.get_running_loop()
        queued_at = time.perf_counter()
        waiter = _AsyncWaiter(self, loop)
        slot = self._enter(waiter, queue_timeout)
        if slot is None:
            try:
                # shield(): a timeout or cancel must not cancel the future under the lock's nose;
                # everything below and _AsyncWaiter._set run in this loop's thread, so a slot
                # already on its way is either here (given back) or finds the future done.
                slot = await asyncio.wait_for(asyncio.shield(waiter.future), queue_timeout)
            except BaseException as e:
                with self._lock:
                    try:
                        self._waiters.remove(waiter)
                    except ValueError:
                        pass
                    if isinstance(e, asyncio.TimeoutError):
                        self._rejected += 1
                future = waiter.future
                if future.done() and not future.cancelled() and future.exception() is None:
                    self._give_back(future.result(), None)
                elif not future.done():
                    future.cancel()
                if isinstance(e, asyncio.TimeoutError):
                    raise PoolFull(f"no sandbox became free within queue_timeout={queue_timeout} s "
                                   f"({self.size} sandboxes busy)") from None
                raise
        # The slot is ours: from here _serve (in a worker thread) always gives it back. shield():
        # a cancelled task must not cancel the worker's future before it started, which would
        # lose the slot; instead the guest is cancelled, and the worker gives the slot back.
        request = slot.request = _Request()
        try:
            work = loop.run_in_executor(self._workers(), self._serve, slot, request, op, args,
                                        timeout, queued_at)
        except BaseException:
            self._give_back(slot, None)
            raise
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # Nobody awaits `work` now: its outcome (GuestCancelled, most likely) is retrieved
            # here, or asyncio would log "Future exception was never retrieved" when it is freed.
            work.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._cancel_until_done(slot, request, work, loop)
            raise

    def _cancel_until_done(self, slot, request, work, loop):
        """Cancels the guest of an abandoned request, again every _CANCEL_RETRY s while it runs
        (a cancel during its restore does not stop the run that follows)."""
        def again():
            with self._lock:
                if slot.request is not request:
                    return                  # over: the slot went on
                slot.cancel()
            loop.call_later(_CANCEL_RETRY, again)
        again()

    def _workers(self):
        # Made at the first async request. A request that holds a slot runs even if close()
        # began meanwhile (close waits for it), as a thread's would.
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.size, thread_name_prefix="whpfast-pool")
            return self._executor

    def _enter(self, waiter, queue_timeout):
        """A free slot now; else queues `waiter` (an async one: returns None, the slot comes
        through its future) or waits here (a thread). PoolFull when the queue is full and no
        queue_timeout was given, or when queue_timeout passes without a free sandbox."""
        with self._lock:
            if self._closing:
                raise SandboxClosed("the pool is closed")
            if self._free and not self._waiters:
                return self._take_free()
            if (queue_timeout is None and len(self._waiters) >= self.max_queue) or queue_timeout == 0:
                self._rejected += 1
                raise PoolFull(f"all {self.size} sandboxes are busy and {len(self._waiters)} requests "
                               f"wait (max_queue={self.max_queue}); retry later, or pass "
                               f"queue_timeout= to wait")
            if waiter is not None:
                self._waiters.append(waiter)
                return None
            me = _ThreadWaiter()
            self._waiters.append(me)
        try:
            got = me.ready.acquire(timeout=-1 if queue_timeout is None
                                   else min(queue_timeout, threading.TIMEOUT_MAX))
        except BaseException:
            # An interrupt (KeyboardInterrupt) while waiting: leave the queue, or pass on a slot
            # that arrived meanwhile (closed now if the pool is closing).
            with self._lock:
                if me.slot is None:
                    if me.error is None:
                        self._waiters.remove(me)
                elif not self._hand_on(me.slot) and me.slot.sandbox is not None:
                    self._retire(me.slot.sandbox)
            raise
        if not got:
            with self._lock:
                if me.slot is None and me.error is None:    # (else one was handed over just now)
                    self._waiters.remove(me)
                    self._rejected += 1
                    raise PoolFull(f"no sandbox became free within queue_timeout={queue_timeout} s "
                                   f"({self.size} sandboxes busy)")
        if me.error is not None:
            raise me.error
        return me.slot

    def _take_free(self):
        # with the lock held
        slot = self._free.pop()
        self._busy.append(slot)
        return slot

    def _serve(self, slot, request, op, args, timeout, queued_at):
        """Runs one request on a slot it owns, and gives the slot back whatever happens."""
        started = time.perf_counter()
        slot.request = request
        outer, _current.pool = getattr(_current, "pool", None), self
        try:
            if slot.sandbox is None:     # its replacement failed earlier: try again
                slot.sandbox = self._make()
            result = self._execute(slot, request, op, args, timeout)
        except BaseException as e:
            broken = e if slot.sandbox is not None and self._breaks(e, slot, request) else None
            self._give_back(slot, broken, (started - queued_at, time.perf_counter() - started, True))
            raise
        finally:
            _current.pool = outer
        self._give_back(slot, None, (started - queued_at, time.perf_counter() - started, False))
        return result

    def _execute(self, slot, request, op, args, timeout):
        sb = slot.sandbox
        if isinstance(sb, RemoteSandbox):
            if request.cancelled:
                raise GuestCancelled("the request was cancelled before it started")
            value = sb.request(op, args, timeout)
            if op == "run":
                self._forward(value.stdout, value.stderr)
            return value
        if op == "call":
            sb.restore(self._source)
            if request.cancelled:
                raise GuestCancelled("the request was cancelled before its call started")
            return sb.call(*args, timeout=timeout)
        if op == "run":
            result = sb.run(args[0], timeout=timeout)
            self._forward(result.stdout, result.stderr)
            return result
        try:
            value = sb.eval(args[0], timeout=timeout)
        except GuestPythonError as e:
            self._forward(e.stdout, e.stderr)
            raise
        return value

    def _forward(self, stdout, stderr):
        if self._on_output is not None:
            for stream, text in (("stdout", stdout), ("stderr", stderr)):
                if text:
                    self._on_output(stream, text)

    @staticmethod
    def _breaks(error, slot, request):
        """Whether a request's error means its sandbox must be replaced: a fault, timeout,
        cancel, failed restore, anything that left it poisoned or closed, or an interruption
        (KeyboardInterrupt). Not: the guest code's own error (a Python exception, an SDK
        function's error result, a host function's exception) or a bad argument (TypeError,
        ValueError before the guest ran)."""
        if request.cancelled or slot.poisoned() or not isinstance(error, Exception):
            return True
        if isinstance(error, (GuestPythonError, GuestCallError)):
            return False
        return isinstance(error, WhpfastError) and not isinstance(error, ConfigError)

    def _give_back(self, slot, broken, record=None):
        """Hands a slot on after a request: a broken sandbox is closed and made again first
        (outside the lock; if that fails the slot goes on empty and its next request makes it);
        then the first waiter gets it, or it goes back to the free list. After close() the
        sandbox is closed instead. record: the request's (queue wait, run time, failed), for
        the metrics (under the same hold of the lock)."""
        replaced = False
        if broken is not None:
            old, slot.sandbox = slot.sandbox, None
            if old is not None:
                self._retire(old)
            if not self._closing:
                replaced = True
                try:
                    slot.sandbox = self._make()
                except Exception:
                    pass                 # made by the slot's next request (which gets the error)
        with self._lock:
            if record is not None:
                i = self._served % HISTORY
                self._queue_wait[i], self._run_time[i], failed = record
                self._served += 1
                self._failed += failed
            self._replaced += replaced
            if self._hand_on(slot) or slot.sandbox is None:
                return
        self._retire(slot.sandbox)

    def _hand_on(self, slot):
        """With the lock held: the slot to the first waiter or the free list; False if the pool
        is closing (the slot is retired and the caller closes its sandbox)."""
        slot.request = None
        if not self._closing:
            while self._waiters:
                if self._waiters.popleft().deliver(slot):
                    return True
            self._busy.remove(slot)
            self._free.append(slot)
            return True
        self._busy.remove(slot)
        self._idle.notify_all()
        return False

    # -- closing --------------------------------------------------------------------------------

    def close(self, cancel: bool = False) -> None:
        """Stops taking requests (new and queued ones raise SandboxClosed), waits for the running
        ones (cancel=True: cancels them; they raise GuestCancelled or SandboxClosed) and closes
        every sandbox once. Idempotent, from any thread; every caller returns once all is closed
        (a caller that runs inside a request of this pool, e.g. from on_output, does not wait:
        that request's sandbox is closed when it ends)."""
        with self._lock:
            self._closing = True
            waiters, free = list(self._waiters), self._free
            self._waiters.clear()
            self._free = []
            for w in waiters:
                w.fail(SandboxClosed("the pool was closed while this request waited for a sandbox"))
        for slot in free:
            if slot.sandbox is not None:
                self._retire(slot.sandbox)
        inside = getattr(_current, "pool", None) is self
        with self._lock:
            while self._busy and not inside:
                if cancel:
                    for slot in self._busy:
                        slot.cancel()
                self._idle.wait(_CANCEL_RETRY if cancel else None)
            executor, self._executor = self._executor, None
            done = not self._busy
        if executor is not None:
            executor.shutdown(wait=done and not inside)
        if done:
            self._remove_scratch()
        self._closed = True

    def _remove_scratch(self):
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


_current = threading.local()     # .pool: the pool whose request this thread runs (see close())
