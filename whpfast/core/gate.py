"""One operation at a time on a sandbox, the same rules for every kind (Sandbox, LinuxSandbox,
PythonSandbox): another thread's operation waits its turn; the thread running an operation
that calls back into the same sandbox (from a host function, on_print, on_output or a signal
handler) gets SandboxBusy at once, since the operation it would wait for is its own; close()
while an operation runs stops it and frees the sandbox when it unwinds, never under it."""

import threading
import time

from ..errors import GuestTimeout, SandboxBusy, SandboxClosed


def not_started(what):
    return GuestTimeout(f"{what} waited past its timeout for another thread's operation on this "
                        f"sandbox and did not start; the sandbox is not poisoned")


class Operation:
    """`with gate.operation(what)`: the block runs as the sandbox's one operation."""
    __slots__ = ("gate", "what", "deadline")

    def __init__(self, gate, what, deadline):
        self.gate = gate
        self.what = what
        self.deadline = deadline

    def __enter__(self):
        self.gate.enter(self.what, self.deadline)

    def __exit__(self, *exc):
        self.gate.leave()


class Gate:
    """The operation lock of one sandbox. free(): frees the sandbox, called exactly once, with no
    operation running. stop(): makes a running operation end soon (cancels the vCPU, wakes a
    sleep); it must not block on this gate. The mutex guards the fields and is held only
    briefly, never while a guest or user code runs (an RLock: a Python signal handler may
    close() while its thread holds it)."""

    __slots__ = ("_free", "_stop", "_mutex", "_cv", "owner", "in_user_code", "closing", "freed",
                 "_waiting")

    def __init__(self, free, stop):
        self._free = free
        self._stop = stop
        self._mutex = threading.RLock()
        self._cv = threading.Condition(self._mutex)
        self.owner = None               # ident of the thread running an operation
        self.in_user_code = False       # ...which is inside a callback (host function, on_output)
        self.closing = False            # close() was asked for while an operation ran
        self.freed = False
        self._waiting = 0               # threads waiting on _cv (only they need a notify)

    @property
    def closed(self):
        """True once close() was called (freed, or freed when the running operation unwinds)."""
        return self.freed or self.closing

    def operation(self, what, deadline=None):
        return Operation(self, what, deadline)

    def enter(self, what, deadline=None):
        """Makes this thread the one operating (what names the operation in errors). Another
        thread's operation is waited for, until deadline (a time.monotonic_ns() value: then
        GuestTimeout, nothing started); this thread's own: SandboxBusy at once; a closed
        sandbox: SandboxClosed."""
        me = threading.get_ident()
        with self._mutex:
            if self.owner is not None or self.freed or self.closing:
                self._enter_slow(what, deadline, me)
            self.owner = me

    def _enter_slow(self, what, deadline, me):
        if self.owner == me:
            raise SandboxBusy(
                f"{what} was called from inside a host function (or on_print, on_output, a signal "
                f"handler) of an operation running on this same sandbox in this thread; a sandbox "
                f"runs one operation at a time and cannot be re-entered. Return from the callback "
                f"first, or use another sandbox")
        if self.owner is not None and not self.closed:
            free = lambda: self.owner is None or self.closed    # noqa: E731
            timeout = None if deadline is None else max(0, deadline - time.monotonic_ns()) / 1e9
            if not self._wait(free, timeout):
                raise not_started(what)
        if self.closed:
            raise SandboxClosed("the sandbox is closed")

    def leave(self):
        with self._mutex:
            self.owner = None
            self.in_user_code = False
            if self.closing:
                self._release_all()
            elif self._waiting:
                self._cv.notify_all()

    def close(self):
        """Frees the sandbox now when no operation runs. Else the operation is stopped and the
        sandbox freed when it unwinds; from another thread this waits for that, unless the
        operation is inside a callback (which cannot be interrupted: then it returns at once);
        from the operating thread itself (a callback) it returns at once."""
        if self.freed:
            return
        with self._mutex:
            if self.freed:
                return
            if self.owner is None:
                self._release_all()
                return
            self.closing = True
            self._stop()
            self._cv.notify_all()        # threads waiting to operate: they raise SandboxClosed
            if self.owner != threading.get_ident():
                self._wait(lambda: self.freed or self.in_user_code)

    def _release_all(self):
        # with _mutex held, and no operation running
        self.freed = True
        self._cv.notify_all()            # threads waiting to operate: they raise SandboxClosed
        self._free()

    def _wait(self, predicate, timeout=None):
        # with _mutex held
        self._waiting += 1
        try:
            return self._cv.wait_for(predicate, timeout)
        finally:
            self._waiting -= 1

    def user_code(self, fn, *args):
        """Runs a callback of the running operation (host function, on_print, on_output): a
        close() in another thread meanwhile returns at once (user code cannot be interrupted),
        and none starts after a close was asked for."""
        with self._mutex:
            if self.closing:
                raise SandboxClosed("the sandbox was closed during the operation")
            self.in_user_code = True
            if self._waiting:
                self._cv.notify_all()
        try:
            return fn(*args)
        finally:
            self.in_user_code = False
