"""Chooses the hypervisor backend once, at import: the Windows Hypervisor Platform on Windows, KVM
elsewhere. Both modules expose the same classes (System, GuestMemory, FileMapping; Vm and Vcpu
through them) and the same EXIT_* numbers, so the facade never asks which one it has."""

import sys
import threading

from .errors import HypervisorUnavailable

if sys.platform == "win32":
    from . import _whp as impl
    NAME = "whp"
    System = impl.WhpSystem
else:
    from . import _kvm as impl
    NAME = "kvm"
    System = impl.KvmSystem

_system = None
_lock = threading.Lock()


def system():
    """The process-wide hypervisor handle, opened on first use. Raises HypervisorUnavailable."""
    global _system
    if _system is None:
        with _lock:
            if _system is None:
                _system = System()
    return _system


def hypervisor():
    """The name of the usable hypervisor ("kvm" or "whp"); HypervisorUnavailable says why not."""
    system()
    return NAME


__all__ = ["NAME", "impl", "system", "hypervisor", "HypervisorUnavailable"]
