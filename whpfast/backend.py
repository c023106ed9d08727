"""Chooses the hypervisor backend once, at import: the Windows Hypervisor Platform on Windows, KVM
elsewhere. Both modules expose the same classes (System, GuestMemory, FileMapping; Vm and Vcpu
through them) and the same EXIT_* numbers, so the facade never asks which one it has."""

import importlib.util
import os
import sys
import threading
from typing import Any

from .errors import HypervisorUnavailable

impl: Any           # the backend module: whpfast._kvm or whpfast._whp (same classes and names)
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
    System = impl.WhpSystem
elif NAME == "kvm":
    from . import _kvm as impl
    System = impl.KvmSystem
else:
    raise ImportError(f"WHPFAST_BACKEND={NAME!r}: the backends are 'kvm' and 'whp'")

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


__all__ = ["NAME", "impl", "system", "hypervisor", "HypervisorUnavailable"]
