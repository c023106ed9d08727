"""whpfast: hardware-isolated micro-VM sandboxes that warm-start in microseconds.

    import whpfast
    with whpfast.Sandbox(whpfast.guests.testkit) as sb:
        sb.call("add", 2, 3)
"""

from . import guests
from .backend import hypervisor
from .errors import (GuestAbort, GuestBuildError, GuestCallError, GuestCancelled, GuestError,
                     GuestFault, GuestLoadError, GuestTimeout, HostFunctionError, HypervisorError,
                     HypervisorUnavailable, SandboxClosed, SandboxError, SandboxPoisoned,
                     SnapshotError, WhpfastError)
from .guestbuild import build_guest
from .linux.process import LinuxSandbox, LinuxSnapshot, RunResult
from .sandbox import Sandbox

__version__ = "0.1.0"

__all__ = [
    "Sandbox", "LinuxSandbox", "LinuxSnapshot", "RunResult", "build_guest", "guests", "hypervisor",
    "WhpfastError", "HypervisorUnavailable", "HypervisorError", "SandboxError", "SandboxClosed",
    "SandboxPoisoned", "GuestError", "GuestFault", "GuestTimeout", "GuestCancelled", "GuestAbort",
    "GuestCallError", "HostFunctionError", "GuestLoadError", "GuestBuildError", "SnapshotError",
]

# Python sandboxes (whpfast/python)
from .errors import GuestPythonError  # noqa: E402
from .python import PythonResult, PythonSandbox  # noqa: E402

__all__ += ["PythonSandbox", "PythonResult", "GuestPythonError"]
