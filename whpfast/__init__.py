"""whpfast: hardware-isolated micro-VM sandboxes that warm-start in microseconds.

    import whpfast
    with whpfast.Sandbox(whpfast.guests.testkit) as sb:
        sb.call("add", 2, 3)
"""

import importlib.util as _importlib_util
import os as _os


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

from . import guests  # noqa: E402  (after the check above, on purpose)
from .backend import hypervisor  # noqa: E402
from .errors import (GuestAbort, GuestBuildError, GuestCallError, GuestCancelled,  # noqa: E402
                     GuestError, GuestFault, GuestLoadError, GuestTimeout, HostFunctionError,
                     HypervisorError, HypervisorUnavailable, SandboxBusy, SandboxClosed,
                     SandboxError, SandboxPoisoned, SnapshotError, WhpfastError)
from .errors import ConfigError, KindError, PayloadTooLarge, ReadPolicyError  # noqa: E402
from .guestbuild import build_guest  # noqa: E402
from .linux.process import LinuxSandbox, LinuxSnapshot, RunResult  # noqa: E402
from .sandbox import RestoreStats, Sandbox  # noqa: E402
from .snapshot import Snapshot  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Sandbox", "Snapshot", "RestoreStats", "LinuxSandbox", "LinuxSnapshot", "RunResult",
    "build_guest", "guests", "hypervisor", "__version__",
    "WhpfastError", "HypervisorUnavailable", "HypervisorError", "SandboxError", "SandboxClosed",
    "SandboxBusy", "SandboxPoisoned", "GuestError", "GuestFault", "GuestTimeout", "GuestCancelled",
    "GuestAbort", "GuestCallError", "HostFunctionError", "GuestLoadError", "GuestBuildError", "SnapshotError",
    "ConfigError", "ReadPolicyError", "KindError", "PayloadTooLarge",
]

# Python sandboxes (whpfast/python)
from .errors import GuestPythonError  # noqa: E402
from .python import Output, PythonError, PythonResult, PythonSandbox  # noqa: E402

__all__ += ["PythonSandbox", "PythonResult", "PythonError", "Output", "GuestPythonError"]

# Pools of warm sandboxes (whpfast/pool.py)
from .errors import MappingBudgetError, PoolFull  # noqa: E402
from .pool import Pool, PoolStats  # noqa: E402

__all__ += ["Pool", "PoolStats", "PoolFull", "MappingBudgetError"]
