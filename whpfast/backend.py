"""Chooses the hypervisor backend once, at import: the Windows Hypervisor Platform on Windows, KVM
elsewhere, and checks the module against the backend interface (whpfast/core/hypervisor.py: the
names both implement, the exit numbers, the page size), so the facade never asks which one it
has. What only some backends can do is in `capabilities`, not probed with hasattr."""

import importlib.util
import os
import sys
import threading
from typing import Any

from .core.hypervisor import PAGE, Backend, Capabilities, Exit, VcpuState, check
from .errors import HypervisorUnavailable

impl: Backend       # the backend module: whpfast._kvm or whpfast._whp (checked: same names)
System: Any
# WHPFAST_BACKEND=whp with WHPFAST_WHP_MODULE=<path of a _whp extension> loads the WHP backend
# built for Linux over the KVM-backed WHv* layer of tests/whv (how CI runs it off Windows).
NAME = os.environ.get("WHPFAST_BACKEND") or ("whp" if sys.platform == "win32" else "kvm")
if NAME == "whp":
    _path = os.environ.get("WHPFAST_WHP_MODULE")
    if _path:
        _spec = importlib.util.spec_from_file_location(f"{__package__}._whp", _path)
        impl = importlib.util.module_from_spec(_spec)
        sys.modules[_spec.name] = impl
        _spec.loader.exec_module(impl)
    else:
        from . import _whp as impl
elif NAME == "kvm":
    from . import _kvm as impl
else:
    raise ImportError(f"WHPFAST_BACKEND={NAME!r}: the backends are 'kvm' and 'whp'")
_SYSTEM = "WhpSystem" if NAME == "whp" else "KvmSystem"
capabilities: Capabilities = check(impl, _SYSTEM)
"""What this backend can do beyond the common interface (declared by it, checked at import)."""
System = getattr(impl, _SYSTEM)

_system: Any = None
_lock = threading.Lock()


def system() -> Any:
    """The process-wide hypervisor handle, opened on first use. Raises HypervisorUnavailable."""
    global _system
    if _system is None:
        with _lock:
            if _system is None:
                _system = System()
    return _system


def hypervisor() -> str:
    """The name of the usable hypervisor ("kvm" or "whp"); HypervisorUnavailable says why not."""
    system()
    return NAME


__all__ = ["NAME", "PAGE", "Capabilities", "Exit", "VcpuState", "capabilities", "impl", "system",
           "hypervisor", "HypervisorUnavailable"]
