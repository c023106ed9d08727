"""Hooks for whpfast's tests and benchmarks: the documented way in to a sandbox's backend objects
(its vCPU, its warm memory) and the measurement-only operations, so tests do not reach into
private attributes. The package never imports this module (tests/test_packaging.py checks);
nothing here is needed to use whpfast, and none of it is a stable API.

`target` below is a Sandbox or LinuxSandbox (or a PythonSandbox: its LinuxSandbox)."""

from typing import Any, Dict

from . import backend
from .core.hypervisor import VcpuState


def _sandbox(target: Any) -> Any:
    inner = getattr(target, "_linux", None)      # a PythonSandbox runs in a LinuxSandbox
    return target if inner is None else inner


def vcpu(target: Any) -> Any:
    """The sandbox's backend Vcpu (whpfast/core/hypervisor.py: Vcpu)."""
    return _sandbox(target)._vcpu


def vm(target: Any) -> Any:
    """The sandbox's backend Vm."""
    return _sandbox(target)._vm


def warm(target: Any) -> Any:
    """The sandbox's WarmMemory (whpfast/core/warm.py): dirty tracking, hot set, restores."""
    return _sandbox(target)._warm


def registers(target: Any) -> Dict[str, int]:
    """Every general register, RIP, RFLAGS and the CS/SS selectors of the sandbox's vCPU (or of a
    backend Vcpu) as of its last exit, by name."""
    v = target if isinstance(target, backend.impl.Vcpu) else vcpu(target)
    return backend.impl.registers(v)


def api_calls(target: Any) -> int:
    """The hypervisor calls the vCPU made so far, where the backend counts them
    (capabilities.api_calls: WHP); LookupError elsewhere."""
    if not backend.capabilities.api_calls:
        raise LookupError(f"the {backend.NAME} backend does not count its hypervisor calls")
    v = target if isinstance(target, backend.impl.Vcpu) else vcpu(target)
    return v.api_calls


def load_state_separately(target: Any, state: VcpuState) -> int:
    """Loads a vCPU state with one hypervisor call per register group, as other VMMs do (the
    benchmark compares it with Vcpu.load_state). Returns the calls made."""
    return vcpu(target).load_state_separately(state)


def set_hot_limit(target: Any, limit: int) -> int:
    """Lowers the bound of the sandbox's hot set (the benchmark's old fixed policy); returns the
    bound it had."""
    w = warm(target)
    old, w.hot_limit = w.hot_limit, min(w.hot_limit, limit)
    return old


def stepwise(target: Any, on: bool = True) -> None:
    """Makes the sandbox's restores to the baseline take WarmMemory's stepwise path instead of
    the backend's one-call restore_warm/resume_warm (on=False: back to the one call)."""
    warm(target).one_call = not on


class VcpuSpy:
    """Stands in for a backend Vcpu in a WarmMemory (a cdef object, whose methods cannot be
    replaced): counts the calls of the methods named in `counted`. Install it with
    `spy(target)`."""

    def __init__(self, vcpu: Any, counted=("restore_warm", "load_state", "resume_warm")):
        self.real = vcpu
        self.calls = dict.fromkeys(counted, 0)

    def __getattr__(self, name):
        real = getattr(self.real, name)
        if name in self.calls:
            def counted(*args, **kwargs):
                self.calls[name] += 1
                return real(*args, **kwargs)
            return counted
        return real


def spy(target: Any, counted=("restore_warm", "load_state", "resume_warm")) -> VcpuSpy:
    """Puts a VcpuSpy in the sandbox's WarmMemory in place of its vCPU; returns it (its `real`
    is the vCPU; `unspy` puts that back)."""
    w = warm(target)
    s = w.vcpu = VcpuSpy(w.vcpu, counted)
    return s


def unspy(target: Any) -> None:
    w = warm(target)
    if isinstance(w.vcpu, VcpuSpy):
        w.vcpu = w.vcpu.real
