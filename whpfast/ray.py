"""whpfast.ray: warm sandbox pools spread over a Ray cluster (`pip install 'whpfast[ray]'`).

    with whpfast.ray.RayPool("warm.snap") as pool:            # a saved snapshot, or one in memory
        ref = pool.submit('print("hello")')                   # a ray.ObjectRef
        ray.get(ref)                                          # PythonResult, as Pool.run gives

RayPool starts Ray actors (`_NodePool`), each holding a local whpfast.Pool of `size` sandboxes
and reserving `num_cpus` CPUs, so Ray's scheduler and resources decide where they run. The
snapshot is put into Ray's object store once, as its non-hole extents (a snapshot file is
sparse: a 512 MiB Python guest is ~12 MiB of data). On each node the first actor to start
fetches it and writes it to a content-addressed file, `<cache_dir>/<sha256>.snap` (written to a
temporary name, fsynced, renamed; under a lock, so the actors of a node write it once); every
actor on the node builds its Pool from that path, so all their sandboxes share the file's pages.
An actor restarted by Ray finds the file and fetches nothing. close() removes the files.

Requests go to the actors in turn (round robin; each actor runs `size` at once, Ray queues the
rest on the actor). Errors from the guest come out of ray.get as Ray's RayTaskError made an
instance of the original class (`as_instanceof_cause`): `except whpfast.GuestTimeout` catches a
timeout, and `.cause` is the original exception with its fields (GuestFault.kind, ...). The
blocking run/eval/call raise that original exception itself."""

import concurrent.futures
import hashlib
import itertools
import math
import os
import shutil
import stat
import tempfile
import threading
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

try:
    import ray
    from ray.exceptions import PendingCallsLimitExceeded, RayActorError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as _e:      # pragma: no cover (the test extra installs ray)
    raise ImportError(f"whpfast.ray needs Ray, which is not installed ({_e}); install it with "
                      f"pip install 'whpfast[ray]'") from _e

import numpy as np

from . import backend
from ._typing import StrPath
from .core.resource import Resource
from .errors import ConfigError, PoolFull, SandboxClosed, SnapshotError, WhpfastError
from .linux.process import LinuxSnapshot
from .pool import Pool, _declared_grant, _resolve, _snapshot_path
from .python.sandbox import PythonSandbox
from .core.container import write_atomic
from .snapshot import Snapshot

__all__ = ["RayPool"]

_CHUNK = 8 << 20          # bytes read or written per system call when shipping a file


# -- the snapshot file, shipped sparse ------------------------------------------------------------

def _data_extents(fd, size):
    """(offset, length) of the file's data, skipping holes (SEEK_DATA/SEEK_HOLE; a file system
    without them reports one extent, the whole file)."""
    extents, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:          # ENXIO: only a hole from pos to the end
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end - start))
        pos = end
    return extents


def _digest(size, extents, data):
    h = hashlib.sha256(b"whpfast-ray-1 %d " % size)
    h.update(extents.tobytes())
    h.update(data)
    return h.hexdigest()


def _read_sparse(path):
    """(size, extents as an (n, 2) int64 array, data as one uint8 array, sha256 of all three)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        extents = np.array(_data_extents(f.fileno(), size), dtype=np.int64).reshape(-1, 2)
        data = np.empty(int(extents[:, 1].sum()), dtype=np.uint8)
        view, at = memoryview(data), 0
        for offset, length in extents:
            f.seek(offset)
            end = at + length
            while at < end:
                n = f.readinto(view[at:min(end, at + _CHUNK)])
                if not n:
                    raise SnapshotError(f"{path!r} shrank while it was read; snapshot files must not "
                                        f"be changed once written")
                at += n
    return size, extents, data, _digest(size, extents, data)


def _write_sparse(path, size, extents, data):
    """The file rebuilt from its extents, holes left as holes, written atomically."""
    def fill(f):
        view, at = memoryview(data), 0
        for offset, length in extents:
            f.seek(offset)
            f.write(view[at:at + length])
            at += length
        f.truncate(size)
    write_atomic(path, fill)


def _cache_dir(cache_dir):
    """The node's directory of shipped snapshots: created private (0700); one that another user
    owns or others may write to is refused (its files would be trusted as snapshots)."""
    directory = os.path.abspath(cache_dir or os.path.join(tempfile.gettempdir(), "whpfast-ray"))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if os.name == "posix" and (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()
                               or st.st_mode & 0o022):
        raise ConfigError(f"the snapshot cache {directory} is not a directory owned by this user and "
                          f"writable by it alone; remove it or pass cache_dir= another path")
    return directory


class _DirLock:
    """An exclusive lock on the cache directory, across processes (released if one dies)."""

    def __init__(self, directory):
        self._file = open(os.path.join(directory, ".lock"), "a+b")

    def __enter__(self):
        if os.name == "posix":
            import fcntl
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        else:                     # Windows: not run here (Ray on Windows is not tested)
            import msvcrt
            self._file.seek(0)
            msvcrt.locking(self._file.fileno(), msvcrt.LK_LOCK, 1)
        return self

    def __exit__(self, *exc):
        self._file.close()        # closing releases the lock


def _node_file(directory, digest, shipped):
    """The snapshot as a file on this node: (path, wrote, fetched). Called with the directory
    locked: the first actor of a node fetches the snapshot from the object store and writes it;
    the others (and restarted actors) find it."""
    path = os.path.join(directory, f"{digest}.snap")
    if os.path.exists(path):
        return path, False, False
    size, extents, data = ray.get(shipped)
    if _digest(size, extents, data) != digest:
        raise SnapshotError("the snapshot fetched from Ray's object store does not match its "
                            "digest; create the RayPool again")
    _write_sparse(path, size, extents, data)
    return path, True, True


# -- the actor: one local Pool ----------------------------------------------------------------------

@ray.remote(concurrency_groups={"control": 1})
class _NodePool:
    """A Ray actor holding one whpfast.Pool built from the node's copy of the snapshot. Its
    requests run in `size` threads (max_concurrency); info() runs in a group of its own, so it
    answers while every sandbox is busy. An error building the pool is kept and raised by every
    call (a typed whpfast error, not an actor that dies and restarts over and over)."""

    def __init__(self, digest, shipped, kind, size, timeout, cache_dir, grant):
        self._pool: Optional[Pool] = None
        self._error: Optional[BaseException] = None
        self._info = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                      "shipped": shipped[0].hex(), "path": None, "wrote": False, "fetched": False}
        try:
            directory = _cache_dir(cache_dir)
            with _DirLock(directory):
                path, wrote, fetched = _node_file(directory, digest, shipped[0])
                self._info.update(path=path, wrote=wrote, fetched=fetched)
                # opened (mapped) under the lock, so another pool's close() cannot remove the
                # file in between; once mapped, its removal does not matter
                self._pool = Pool(path, size=size, kind=kind, timeout=timeout, **grant)
            # the threads of run_batch, shared by all batches: at most `size` of their requests
            # wait in the pool's queue at once, besides the single ones (max_concurrency)
            self._batch = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="whpfast-batch")
        except Exception as e:     # noqa: BLE001 (kept and raised by every call, see above)
            self._error = e

    def _live(self) -> Pool:
        if self._pool is None:
            raise self._error      # type: ignore[misc]
        return self._pool

    def run(self, code, timeout):
        return self._live().run(code, timeout=timeout)

    def eval(self, expr, timeout):
        return self._live().eval(expr, timeout=timeout)

    def call(self, name, args, timeout):
        return self._live().call(name, *args, timeout=timeout)

    def run_batch(self, codes, timeout):
        """Runs a list of codes on the pool, `size` at a time; the results in order (the first
        error in order is raised). One Ray task for many requests: Ray's own cost per task
        (~0.8 ms here) is paid once."""
        pool = self._live()
        futures = [self._batch.submit(pool.run, code, timeout=timeout) for code in codes]
        return [f.result() for f in futures]

    @ray.method(concurrency_group="control")
    def remove_file(self):
        """Removes the node's snapshot file (at close: sandboxes that mapped it keep its pages; a
        later actor of any pool writes it again)."""
        path = self._info["path"]
        if path is not None:
            with _DirLock(os.path.dirname(path)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    @ray.method(concurrency_group="control")
    def info(self):
        """Where this actor runs and what it did with the snapshot; its pool's stats."""
        return dict(self._info, backend=backend.NAME, stats=self._live().stats())


# -- the driver's side ------------------------------------------------------------------------------

def _count(value, what):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive int, got {value!r}")
    return value


class RayPool(Resource):
    """Warm sandbox pools on Ray actors, all started from one snapshot.

    snapshot: the path of a saved snapshot (Python or SDK), a Snapshot, a PythonSandbox or its
    snapshot. actors: how many actors (default: the cluster's CPUs // num_cpus, at least 1), or
    per_node: that many actors on every alive node that has num_cpus CPUs (pinned to it).
    num_cpus: CPUs each actor reserves; size: sandboxes in each actor's Pool (default num_cpus,
    rounded up): an actor runs that many requests at once. kind, timeout: as for whpfast.Pool.
    max_queue: requests each actor may have pending (Ray's max_pending_calls); past it submit
    raises PoolFull. max_restarts / max_task_retries: Ray's, for an actor whose process dies
    (restarted; its requests in flight run again up to max_task_retries times). cache_dir: the
    nodes' directory for the snapshot file (default <tmp>/whpfast-ray). start_timeout: seconds
    the actors may take to start (None: no limit); past it, as when the cluster has too few free
    CPUs for them, ConfigError. options: more ray.remote options for the actors (resources,
    runtime_env, ...). python, read, files, memory_size, tmp_size: the grant every node's Pool holds the
    snapshot file to (see whpfast.Pool); for a snapshot object given here (trusted: made or
    loaded in this process) they default to what it declares."""

    def __init__(self, snapshot: Union[Snapshot, LinuxSnapshot, PythonSandbox, StrPath], *,
                 actors: Optional[int] = None, per_node: Optional[int] = None, num_cpus: float = 1,
                 size: Optional[int] = None, kind: Optional[str] = None,
                 timeout: Optional[float] = None, max_queue: Optional[int] = None,
                 max_restarts: int = -1, max_task_retries: int = 1,
                 cache_dir: Optional[StrPath] = None, start_timeout: Optional[float] = 300,
                 options: Optional[Dict[str, Any]] = None, python: Optional[StrPath] = None,
                 read: Union[StrPath, Iterable[StrPath], Mapping[str, str]] = (),
                 files: Optional[Mapping[str, StrPath]] = None,
                 memory_size: Optional[int] = None, tmp_size: Optional[int] = None) -> None:
        self._closed = True
        self._lock = threading.Lock()
        self._actors: List[Any] = []
        if actors is not None and per_node is not None:
            raise ConfigError("give actors= (in total) or per_node=, not both")
        _count(actors, "actors")
        _count(per_node, "per_node")
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or not num_cpus > 0:
            raise ConfigError(f"num_cpus must be a positive number, got {num_cpus!r}")
        self.size = _count(size, "size") or math.ceil(num_cpus)
        self.max_queue = _count(max_queue, "max_queue")
        given = {"python": python, "read": read, "files": files, "memory_size": memory_size,
                 "tmp_size": tmp_size}
        grant = {k: v for k, v in given.items() if v is not None and v != ()}
        if not grant:
            grant = _declared_grant(snapshot)
        scratch = tempfile.mkdtemp(prefix="whpfast-ray-")
        try:
            path = _snapshot_path(snapshot, scratch)
            self.kind, _ = _resolve(path, kind)          # a bad file fails here, before any actor
            size_bytes, extents, data, self.digest = _read_sparse(path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        # Put once; the actors get the reference inside a list, so Ray does not fetch it for
        # them: only the actor that writes a node's file calls ray.get on it.
        self._shipped = ray.put((size_bytes, extents, data))
        self.shipped_bytes = int(data.nbytes)
        del data
        self._options = dict(num_cpus=num_cpus, max_concurrency=self.size, max_restarts=max_restarts,
                             max_task_retries=max_task_retries,
                             max_pending_calls=-1 if max_queue is None else max_queue, **(options or {}))
        self._args = (self.digest, [self._shipped], self.kind, self.size, timeout,
                      None if cache_dir is None else os.fspath(cache_dir), grant)
        if per_node is not None:
            nodes = [n["NodeID"] for n in ray.nodes()
                     if n["Alive"] and n["Resources"].get("CPU", 0) >= num_cpus]
            if not nodes:
                raise ConfigError(f"no alive Ray node has {num_cpus} CPUs for an actor")
            self._places = [n for n in nodes for _ in range(per_node)]
        else:
            total = actors or max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus))
            self._places = [None] * total
        self._turn = itertools.count()
        self._ready = False
        self._closed = False
        try:
            self._actors = [self._start(place, strict=True) for place in self._places]
            # every actor built its pool, or its error is raised here
            try:
                ray.get([a.info.remote() for a in self._actors], timeout=start_timeout)
            except ray.exceptions.GetTimeoutError:
                raise ConfigError(
                    f"{len(self._actors)} actors of {num_cpus} CPUs did not start within {start_timeout} s "
                    f"(the cluster has {ray.available_resources().get('CPU', 0)} CPUs free now); use "
                    f"fewer actors or a smaller num_cpus, or a longer start_timeout") from None
            self._ready = True
        except BaseException:
            self.close()
            raise

    def _start(self, node, strict):
        options = self._options
        if node is not None:
            options = dict(options, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=not strict))
        return _NodePool.options(**options).remote(*self._args)

    # -- state ----------------------------------------------------------------------------------

    @property
    def actors(self) -> List[Any]:
        """The actor handles (a copy of the list)."""
        return list(self._actors)

    def info(self) -> List[Dict[str, Any]]:
        """Per actor: node_id, pid, path (the node's snapshot file), wrote (this actor wrote it),
        fetched (it fetched the snapshot from the object store), shipped (the ObjectRef's id),
        backend, stats (its Pool's PoolStats). A pool error of an actor is raised here."""
        return ray.get([a.info.remote() for a in self._live_actors()])

    def _live_actors(self):
        if self._closed:
            raise SandboxClosed("the RayPool is shut down")
        return self._actors

    # -- requests -------------------------------------------------------------------------------

    def _submit(self, method, *args):
        with self._lock:
            actors = self._live_actors()
            actor = actors[next(self._turn) % len(actors)]
        try:
            return getattr(actor, method).remote(*args)
        except PendingCallsLimitExceeded:
            raise PoolFull(f"the actor's queue is full ({self.max_queue} pending requests, max_queue=); "
                           f"wait for results or raise max_queue") from None

    def submit(self, code: str, *, timeout: Optional[float] = None) -> "ray.ObjectRef":
        """Runs Python code on an actor; an ObjectRef of its PythonResult."""
        return self._submit("run", code, timeout)

    def submit_eval(self, expr: str, *, timeout: Optional[float] = None) -> "ray.ObjectRef":
        """Evaluates a Python expression on an actor; an ObjectRef of its value."""
        return self._submit("eval", expr, timeout)

    def submit_call(self, name: str, *args: Any, timeout: Optional[float] = None) -> "ray.ObjectRef":
        """Calls an SDK guest's function on an actor; an ObjectRef of its result."""
        return self._submit("call", name, args, timeout)

    def run(self, code: str, *, timeout: Optional[float] = None) -> Any:
        """submit() and wait; a request lost with an actor that died for good is sent again."""
        return self._wait("run", code, timeout)

    def eval(self, expr: str, *, timeout: Optional[float] = None) -> Any:
        """submit_eval() and wait (see run)."""
        return self._wait("eval", expr, timeout)

    def call(self, name: str, *args: Any, timeout: Optional[float] = None) -> Any:
        """submit_call() and wait (see run)."""
        return self._wait("call", name, args, timeout)

    def map(self, codes: Sequence[str], *, timeout: Optional[float] = None,
            chunksize: Optional[int] = None) -> List[Any]:
        """Runs every code over the actors, `chunksize` codes per Ray task (default: about four
        tasks per actor, at most 64 codes each); their PythonResults in order. A guest error
        raises the first one in order, as ray.get of a list does."""
        codes = list(codes)
        if chunksize is None:
            chunksize = max(1, min(64, math.ceil(len(codes) / (4 * max(1, len(self._actors))))))
        _count(chunksize, "chunksize")
        refs = [self._submit("run_batch", codes[i:i + chunksize], timeout)
                for i in range(0, len(codes), chunksize)]
        return [result for chunk in ray.get(refs) for result in chunk]

    def _wait(self, method, *args):
        try:
            try:
                return ray.get(self._submit(method, *args))
            except RayActorError:
                if not self.replace_dead():
                    raise
                return ray.get(self._submit(method, *args))
        except RayTaskError as e:
            # The blocking forms raise whpfast's own error as the actor raised it, not Ray's
            # wrapper (whose message is the actor's traceback, in terminal colours).
            if isinstance(e.cause, WhpfastError):
                raise e.cause from None
            raise

    def replace_dead(self) -> int:
        """Starts a new actor for every one that is dead for good (killed with ray.kill, out of
        restarts, its node gone); the number replaced. Ray restarts an actor whose process died by
        itself (max_restarts); this is for the rest. run/eval/call do it when they meet one."""
        replaced = 0
        with self._lock:
            actors = self._live_actors()
            pings = [a.info.remote() for a in actors]
            for i, ping in enumerate(pings):
                try:
                    ray.get(ping)
                except RayActorError:
                    self._actors[i] = self._start(self._places[i], strict=False)
                    replaced += 1
                except RayTaskError:
                    pass               # alive; its pool error is raised by its requests
        return replaced

    # -- shutdown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Removes the snapshot files the actors' nodes hold, kills the actors (their sandboxes
        go with their processes) and drops the object store copy. Idempotent."""
        started, self._closed = not self._closed and self._ready, True
        actors, self._actors = self._actors, []
        if ray.is_initialized():
            if started:
                try:
                    ray.get([a.remove_file.remote() for a in actors], timeout=30)
                except ray.exceptions.RayError:
                    pass        # an actor dead for good: its node keeps the file (a cache)
            for actor in actors:
                ray.kill(actor, no_restart=True)
        self._shipped = None

    shutdown = close

    def __repr__(self) -> str:
        state = "shut down" if self._closed else f"{len(self._actors)} actors x {self.size} sandboxes"
        return f"<whpfast.ray.RayPool {getattr(self, 'kind', '?')} {state}>"

