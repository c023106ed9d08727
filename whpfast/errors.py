"""The exceptions of whpfast, all rooted in WhpfastError. Messages say what happened and what to do.

`from_errno` is the one place where a failed system call becomes one of these."""

import errno as _errno
import os as _os
from typing import Optional


class WhpfastError(Exception):
    """Root of every whpfast exception."""

    def __reduce__(self):
        # Pickle (Ray, multiprocessing) rebuilds an exception as cls(*args), which fails for the
        # keyword-only fields (GuestFault's kind, GuestPythonError's traceback) and garbles
        # GuestAbort's message: rebuild from args and attributes instead, without __init__.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls, args, state):
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class HypervisorUnavailable(WhpfastError):
    """No usable hypervisor: no device, no permission, missing capability."""


class HypervisorError(WhpfastError):
    """The hypervisor refused an operation that should have worked."""

    def __init__(self, message: str, errno: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno


class SandboxError(WhpfastError):
    """The sandbox cannot take this request in its current state."""


class SandboxClosed(SandboxError):
    """The sandbox (or the object behind it) is closed."""


class SandboxBusy(SandboxError):
    """A host function called back into its own sandbox (call, restore, snapshot) while the call
    that runs it holds the vCPU; return from the host function first, or use another sandbox."""


class SandboxPoisoned(SandboxError):
    """An earlier call faulted, timed out or was interrupted; restore a snapshot or close it."""


class PoolFull(WhpfastError):
    """A Pool refused a request: every sandbox is busy and its queue is full (max_queue), or no
    sandbox became free within the request's queue_timeout. Retry later, or make the pool larger."""


class MappingBudgetError(WhpfastError):
    """Another sandbox would not fit in this process's host mappings (vm.max_map_count, shared
    by every sandbox of the process; whpfast/core/mapbudget.py): peak, what one sandbox may
    need; left, what is free; limit, vm.max_map_count. Use fewer sandboxes per process."""

    def __init__(self, message: str, *, peak: int, left: int, limit: int) -> None:
        super().__init__(message)
        self.peak, self.left, self.limit = peak, left, limit


class GuestLoadError(WhpfastError, ValueError):
    """The guest ELF cannot be loaded (malformed, or does not fit the sandbox)."""


class ConfigError(WhpfastError, ValueError):
    """A sandbox parameter is out of range or names something unusable (a memory size past the
    limit, a read-only "file" that is a device or a FIFO)."""


class ReadPolicyError(ConfigError):
    """A Linux or Python sandbox's `read=` policy (or cwd) is invalid: an inside path that is not
    absolute, lies under /proc or /dev or is /tmp itself (below /tmp an entry is a read-only mount
    in the sandbox's own /tmp), a host path that does not exist, a path mapped twice. The
    message says which side of {inside: host} is wrong."""


class KindError(ConfigError, TypeError):
    """A request or snapshot of the other kind: run/eval on an SDK pool, call on a Python pool,
    kind= that does not match the snapshot. Both a ConfigError and a TypeError."""


class PayloadTooLarge(WhpfastError, ValueError):
    """A value does not fit in the I/O buffer it must cross (an argument, a result, a host
    function's reply); the message names the buffer and its limit."""


class GuestBuildError(WhpfastError):
    """The C compiler failed to build a guest."""


class GuestError(WhpfastError):
    """Something the guest did ended the call."""


class GuestFault(GuestError):
    """The guest took a CPU exception (or triple-faulted, or touched memory it may not)."""

    def __init__(self, message: str, *, kind: str, vector: Optional[int] = None,
                 error_code: Optional[int] = None, rip: Optional[int] = None,
                 address: Optional[int] = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.vector = vector
        self.error_code = error_code
        self.rip = rip
        self.address = address


class GuestTimeout(GuestError):
    """The call ran past its timeout and was stopped."""


class GuestCpuLimit(GuestTimeout):
    """The call used up its CPU time (a run's cpu_time, or what is left of a PythonSandbox's
    cpu_time_total) and was stopped; it is a GuestTimeout, and the sandbox is left as after one."""


class GuestCancelled(GuestError):
    """The call was stopped by Sandbox.cancel()."""


class GuestAbort(GuestError):
    """The guest aborted the call with a message."""

    def __init__(self, message: str) -> None:
        super().__init__(f"guest aborted: {message}")
        self.guest_message = message


class GuestCallError(GuestError):
    """The call could not be made or its result is unusable: unknown function, a result of the
    wrong type or malformed, or an error the guest function returned."""


class HostFunctionError(GuestCallError):
    """A host function that the guest called raised; the original exception is __cause__."""


class SnapshotError(WhpfastError):
    """A snapshot cannot be taken, saved, loaded or restored."""


def from_errno(err: int, what: str, path: Optional[object] = None, device: bool = False) -> Exception:
    """Turns a failed system call into the matching exception: HypervisorUnavailable when the
    hypervisor device itself cannot be opened, the standard OSError subclass (FileNotFoundError,
    PermissionError, ...) for a user's file, HypervisorError for everything else."""
    reason = _os.strerror(err)
    if device:
        hint = {
            _errno.ENOENT: "this machine has no KVM device: enable virtualization and load the kvm module",
            _errno.ENODEV: "the KVM module is loaded but has no hardware support behind it",
            _errno.EACCES: "add this user to the 'kvm' group (or fix the device's permissions)",
            _errno.EPERM: "add this user to the 'kvm' group (or fix the device's permissions)",
        }.get(err, "check that KVM works on this machine")
        return HypervisorUnavailable(f"cannot open {path}: {reason}; {hint}")
    if path is not None:
        return OSError(err, f"{what}: {reason}", str(path))
    if err == _errno.ENOMEM:
        return HypervisorError(f"{what} failed: the host is out of memory (ENOMEM)", err)
    return HypervisorError(f"{what} failed: {reason} (errno {err})", err)


# The Windows Hypervisor Platform's HRESULTs (winhvplatformdefs.h does not define them; values
# from Microsoft's WHP documentation), and the generic ones its calls return.
WHP_HRESULTS = {
    0x80370300: "WHV_E_UNKNOWN_CAPABILITY",
    0x80370301: "WHV_E_INSUFFICIENT_BUFFER",
    0x80370302: "WHV_E_UNKNOWN_PROPERTY",
    0x80370303: "WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG",
    0x80370304: "WHV_E_INVALID_PARTITION_CONFIG",
    0x80370305: "WHV_E_GPA_RANGE_NOT_FOUND",
    0x80370306: "WHV_E_VP_ALREADY_EXISTS",
    0x80370307: "WHV_E_VP_DOES_NOT_EXIST",
    0x80370308: "WHV_E_INVALID_VP_STATE",
    0x80370309: "WHV_E_INVALID_VP_REGISTER_NAME",
    0xC0370008: "ERROR_HV_INSUFFICIENT_MEMORY (hypervisor)",
    0x80070005: "E_ACCESSDENIED",
    0x80070057: "E_INVALIDARG",
    0x8007000E: "E_OUTOFMEMORY",
    0x80004001: "E_NOTIMPL",
    0x80004005: "E_FAIL",
}

# Win32 error codes (GetLastError) -> errno, for the files and memory the WHP backend maps.
_WIN32_ERRNO = {2: _errno.ENOENT, 3: _errno.ENOENT, 5: _errno.EACCES, 8: _errno.ENOMEM,
                14: _errno.ENOMEM, 32: _errno.EBUSY, 87: _errno.EINVAL, 1455: _errno.ENOMEM}


def from_hresult(hr: int, what: str) -> "HypervisorError":
    """Turns a failed WHv* call's HRESULT into HypervisorError naming the code."""
    hr &= 0xFFFFFFFF
    name = WHP_HRESULTS.get(hr, "unknown HRESULT")
    if hr in (0x8007000E, 0xC0370008):
        return HypervisorError(f"{what} failed: {name} ({hr:#010x}): the host is out of memory", hr)
    return HypervisorError(f"{what} failed: {name} ({hr:#010x})", hr)


def from_winerror(code: int, what: str, path: Optional[object] = None) -> Exception:
    """A failed kernel32 call (GetLastError code) as from_errno would report it."""
    err = _WIN32_ERRNO.get(code)
    if err is None:
        return HypervisorError(f"{what} failed: Windows error {code}", code)
    return from_errno(err, what, path)


class GuestPythonError(GuestError):
    """Python code in a PythonSandbox raised; .traceback is the guest's traceback as text (its
    stdout and stderr up to the exception ride along as .stdout and .stderr)."""

    def __init__(self, message: str, *, traceback: str, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback
        self.stdout = stdout
        self.stderr = stderr
