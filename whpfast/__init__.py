"""whpfast: hardware-isolated micro-VM sandboxes that warm-start in microseconds.

    import whpfast
    with whpfast.Sandbox(whpfast.guests.testkit) as sb:
        sb.call("add", 2, 3)
"""

import importlib
import importlib.util as _importlib_util
import os as _os
from typing import TYPE_CHECKING, Any, List


def _check_built() -> None:
    """Imported from a source checkout (e.g. `python -c "import whpfast"` in the repository root),
    the compiled extensions are missing and the first `from . import _kvm` fails with a baffling
    'circular import' message. Say what is going on instead."""
    if _importlib_util.find_spec(f"{__name__}._pages") is not None:
        return
    here = _os.path.dirname(_os.path.abspath(__file__))
    raise ImportError(
        f"whpfast was imported from {here}, where its compiled extensions (_pages, and _kvm or "
        f"_whp) are not built: this looks like the source directory. Install it with "
        f"`pip install .` and run Python from another directory, or use the `whpfast` command.",
        name=__name__, path=here)


_check_built()

from .errors import (ConfigError, GuestAbort, GuestBuildError, GuestCallError,  # noqa: E402
                     GuestCancelled, GuestCpuLimit, GuestError, GuestFault, GuestLoadError,
                     GuestPythonError,
                     GuestTimeout, HostFunctionError, HypervisorError, HypervisorUnavailable,
                     KindError, MappingBudgetError, PayloadTooLarge, PoolFull, ReadPolicyError,
                     SandboxBusy, SandboxClosed, SandboxError, SandboxPoisoned, SnapshotError,
                     WhpfastError)

__version__ = "0.1.0"

# The rest is imported when first used (PEP 562), so that `import whpfast` costs the errors
# only: the personalities bring numpy, asyncio and the backend with them. name -> (module, the
# attribute of it, or None for the module itself).
_LAZY = {
    "guests": (".guests", None), "hypervisor": (".backend", "hypervisor"),
    "build_guest": (".guestbuild", "build_guest"),
    "Sandbox": (".sandbox", "Sandbox"), "RestoreStats": (".sandbox", "RestoreStats"),
    "Snapshot": (".snapshot", "Snapshot"),
    "LinuxSandbox": (".linux.process", "LinuxSandbox"), "LinuxSnapshot": (".linux.process", "LinuxSnapshot"),
    "RunResult": (".linux.process", "RunResult"),
    "PythonSandbox": (".python", "PythonSandbox"), "PythonResult": (".python", "PythonResult"),
    "PythonError": (".python", "PythonError"), "Output": (".python", "Output"),
    "Pool": (".pool", "Pool"), "PoolStats": (".pool", "PoolStats"),
}

if TYPE_CHECKING:       # what type checkers and IDEs see: the same names, eagerly
    from . import guests
    from .backend import hypervisor
    from .guestbuild import build_guest
    from .linux.process import LinuxSandbox, LinuxSnapshot, RunResult
    from .pool import Pool, PoolStats
    from .python import Output, PythonError, PythonResult, PythonSandbox
    from .sandbox import RestoreStats, Sandbox
    from .snapshot import Snapshot


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = importlib.import_module(module, __name__)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value                 # once: later look-ups are plain attribute reads
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Sandbox", "Snapshot", "RestoreStats", "LinuxSandbox", "LinuxSnapshot", "RunResult",
    "build_guest", "guests", "hypervisor", "__version__",
    "WhpfastError", "HypervisorUnavailable", "HypervisorError", "SandboxError", "SandboxClosed",
    "SandboxBusy", "SandboxPoisoned", "GuestError", "GuestFault", "GuestTimeout", "GuestCpuLimit",
    "GuestCancelled",
    "GuestAbort", "GuestCallError", "HostFunctionError", "GuestLoadError", "GuestBuildError", "SnapshotError",
    "ConfigError", "ReadPolicyError", "KindError", "PayloadTooLarge",
    "PythonSandbox", "PythonResult", "PythonError", "Output", "GuestPythonError",
    "Pool", "PoolStats", "PoolFull", "MappingBudgetError",
]
