"""The backend interface: what every hypervisor backend module (whpfast._kvm, whpfast._whp)
provides, written down once. whpfast.backend checks the module it loads against it at import
(`check`), so a backend that lacks a name fails there, by name, instead of at its first use.

- `Backend`: the module (after Hyperlight's VirtualMachine trait): the classes System, Vm, Vcpu,
  GuestMemory, FileMapping, WarmPages and the functions both backends implement.
- `Capabilities`: what only some backends can do, declared by the backend (its CAPABILITIES) in
  place of probing with hasattr.
- `Exit`: the kinds Vcpu.run() returns (ints on the hot path; Exit compares equal to them).
- `VcpuState`: one vCPU state type, the backend's raw register groups by STATE_PARTS name.

Imports nothing of the package but errors and abi: whpfast.backend imports this, not the other way."""

import enum
from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol, Tuple

from ..abi import PAGE

VcpuState = Dict[str, bytes]
"""A vCPU's complete state as Vcpu.save_state() returns it and load_state()/restore_warm() take
it: the backend's raw register structures, one bytes object per name in the backend's
STATE_PARTS (KVM: regs, sregs, xsave, ...; WHP: registers, xsave). Opaque above the backend; a
snapshot stores it as it is and only loads it into the backend that took it."""


class Exit(enum.IntEnum):
    """Why Vcpu.run() returned. run() returns the plain int (the hot path compares ints); these
    compare equal to it, and Exit(kind) names one in a message."""
    IO = 1                  # an OUT/IN: io_port, io_direction, io_size, io_value
    MMIO = 2                # an access outside guest memory: mmio_address, mmio_is_write
    SHUTDOWN = 3            # a triple fault
    INTERNAL_ERROR = 4      # the hypervisor could not emulate: internal_suberror, internal_data
    FAIL_ENTRY = 5          # the hypervisor refused the state: fail_entry_reason
    TIMEOUT = 6             # the run's deadline passed
    CANCELLED = 7           # Vcpu.cancel()
    HLT = 8
    UNKNOWN = 9             # anything else: exit_reason holds the hypervisor's own code


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares it can do beyond the common interface (its CAPABILITIES dict)."""
    file_overlay: bool = False
    """GuestMemory.overlay_file/anonymize and the `overlaid`/`remaps` counters: a part of guest
    memory can be a copy-on-write mapping of a file (snapshot images shared through the page
    cache). Without it a snapshot image is copied into anonymous memory."""
    xsave_area: bool = False
    """Vcpu.get_xsave/set_xsave and xsave_size: the raw XSAVE area on its own."""
    api_calls: bool = False
    """Vcpu.api_calls counts the hypervisor calls made (for measurements; see whpfast.testing)."""


class Mapping(Protocol):
    """One host mapping, unmapped exactly once; exposes the buffer protocol."""
    size: int
    readonly: bool
    address: int

    def close(self) -> None: ...


class GuestMemory(Mapping, Protocol):
    def __init__(self, size: int) -> None: ...


class FileMapping(Mapping, Protocol):
    file_size: int


class Vcpu(Protocol):
    """One virtual processor. run() leaves the details of its exit in the ExitDetails fields."""
    exit_reason: int
    io_port: int
    io_direction: int
    io_size: int
    io_string: bool
    io_value: int
    mmio_address: int
    mmio_is_write: bool
    internal_suberror: int
    internal_data: Tuple[int, ...]
    fail_entry_reason: int
    kicks: int

    def init_long_mode(self, **kwargs: int) -> None: ...
    def enter(self, rip: int, rsp: int, rflags: int = 0x2, rdi: int = 0) -> None: ...
    def run(self, timeout_ns: int = -1) -> int: ...
    def cancel(self) -> None: ...
    def begin_call(self) -> None: ...
    def end_call(self) -> None: ...
    def save_state(self) -> VcpuState: ...
    def load_state(self, state: VcpuState, fpu: bool = True, full: bool = True) -> int: ...
    def restore_warm(self, pages: Any, image: Any, nonzero: Any, n_touched: int, hot_limit: int,
                     n_hot: int, cycle: int, state: VcpuState, fpu: bool) -> Tuple[int, ...]: ...
    def resume_warm(self, pages: Any, image: Any, nonzero: Any, n_touched: int, hot_limit: int,
                    n_hot: int, cycle: int, state: VcpuState, fpu: bool, writes: Any,
                    result: int, user_cs: int, user_ds: int, timeout_ns: int = -1
                    ) -> Tuple[int, ...]: ...
    def close(self) -> None: ...


class Vm(Protocol):
    """One virtual machine: guest memory slots with dirty logging, and its vCPUs."""
    manual_protect: bool
    """clear_dirty_log re-protects pages (KVM's manual protect); False: reading the log does."""

    def set_memory(self, slot: int, gpa: int, size: int, host_address: int,
                   readonly: bool = False, log_dirty: bool = False) -> None:
        """Maps host memory at a guest-physical address (a slot), optionally dirty-logged."""
    def get_dirty_log(self, slot: int, bitmap: Any) -> None:
        """The slot's pages written since the last call, one bit a page."""
    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: Any) -> None:
        """Write-protects the pages of bitmap again (manual_protect)."""
    def create_vcpu(self, index: int = 0) -> Vcpu: ...
    def close(self) -> None: ...


class System(Protocol):
    manual_dirty_log: bool

    def create_vm(self) -> Vm: ...
    def close(self) -> None: ...


class Backend(Protocol):
    """A backend module. Its System class is named after it (KvmSystem, WhpSystem)."""
    PAGE: int
    CAPABILITIES: Dict[str, bool]
    STATE_PARTS: Tuple[str, ...]
    Vm: Any
    Vcpu: Any
    GuestMemory: Any
    FileMapping: Any
    WarmPages: Any

    # The Linux personality's primitives (whpfast.linux): system calls exit through a user-page stub.
    def linux_setup(self, vcpu: Vcpu, xcr0: int, msrs: Dict[int, int]) -> None: ...
    def syscall_regs(self, vcpu: Vcpu) -> Tuple[int, ...]: ...
    def syscall_return(self, vcpu: Vcpu, result: int, user_cs: int, user_ds: int) -> None: ...
    def enter_user(self, vcpu: Vcpu, rip: int, rsp: int, user_cs: int, user_ds: int) -> None: ...
    def segment_base(self, vcpu: Vcpu, which: str, value: Optional[int] = None) -> int: ...
    def memory_invalidate(self, vcpu: Vcpu, memory: Mapping, offset: int, length: int,
                          discard: bool, anonymous: bool = False, remap: bool = True) -> None: ...
    def memory_populate(self, memory: Mapping, offset: int, length: int) -> None: ...


def _members(*protocols):
    names = []
    for p in protocols:
        for cls in p.__mro__:
            if cls is Protocol or cls is object or cls.__module__ != __name__:
                continue
            names += [n for n in (*getattr(cls, "__annotations__", {}), *vars(cls))
                      if not n.startswith("_") and n not in names]
    return tuple(names)


MODULE_NAMES = _members(Backend) + tuple(f"EXIT_{e.name}" for e in Exit)
"""The names every backend module has (checked at import by `check`)."""
CLASS_MEMBERS = {"Vcpu": _members(Vcpu), "Vm": _members(Vm), "GuestMemory": _members(GuestMemory),
                 "FileMapping": _members(FileMapping)}
"""The members every backend's classes have (System's: see `check`)."""
CAPABILITY_MEMBERS = {"file_overlay": ("GuestMemory", ("overlay_file", "anonymize", "overlaid", "remaps")),
                      "xsave_area": ("Vcpu", ("get_xsave", "set_xsave", "xsave_size")),
                      "api_calls": ("Vcpu", ("api_calls",))}


def check(module: Any, system: str) -> Capabilities:
    """Checks a backend module against the interface (pyzmq's checked backend selection): every
    name of MODULE_NAMES, the members of its classes, the system class `system`, the exit
    numbers, the page size and the members its declared capabilities promise. Returns its
    Capabilities; ImportError naming everything missing or different."""
    name = getattr(module, "__name__", repr(module))
    problems = [n for n in (*MODULE_NAMES, system) if not hasattr(module, n)]
    for cls, members in CLASS_MEMBERS.items():
        if hasattr(module, cls):
            problems += [f"{cls}.{m}" for m in members if not hasattr(getattr(module, cls), m)]
    if hasattr(module, system):
        problems += [f"{system}.{m}" for m in _members(System)
                     if not hasattr(getattr(module, system), m)]
    problems += [f"EXIT_{e.name} = {getattr(module, f'EXIT_{e.name}')} (not {e.value})"
                 for e in Exit if getattr(module, f"EXIT_{e.name}", e.value) != e.value]
    if getattr(module, "PAGE", PAGE) != PAGE:
        problems.append(f"PAGE = {module.PAGE} (not {PAGE})")
    declared = dict(getattr(module, "CAPABILITIES", {}))
    unknown = set(declared) - set(CAPABILITY_MEMBERS)
    problems += [f"CAPABILITIES[{k!r}] (unknown)" for k in sorted(unknown)]
    for cap, (cls, members) in CAPABILITY_MEMBERS.items():
        if declared.get(cap) and hasattr(module, cls):
            problems += [f"{cls}.{m} (for {cap})" for m in members
                         if not hasattr(getattr(module, cls), m)]
    if problems:
        raise ImportError(f"the backend module {name} does not implement the backend interface "
                          f"(whpfast/core/hypervisor.py): {', '.join(problems)}")
    return Capabilities(**{k: bool(v) for k, v in declared.items()})
