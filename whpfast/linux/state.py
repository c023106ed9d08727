"""A LinuxSandbox's host-side state as snapshot components (whpfast/core/container.py): each has
a name, a version and one encode/decode contract, decode checking every field of what is
untrusted input (a ValueError saying what is wrong).

    "linux"  JSON: memory size, construction config (checked by check_config), CPU identity,
             the guest's clocks, the vCPU state part sizes, and what a PythonSandbox adds
             ("python", checked there)
    "vcpu"   the backend's raw register structs, concatenated (the backend checks them)
    "mm"     JSON: the address space (mm.MmState: mappings, brk)
    "proc"   JSON: the signal state (task.ProcState)
    "io"     JSON: pending input, EOF, whether a read waits, the exit status (IoState)
    "fs"     the file system's state (_fsstate.encode)
    "files"  JSON: the host files whose pages are referenced, not stored (snapfile.FILES)

A new piece of host-side state is one more Component here, one more field of LinuxState (what
snapshot() captures and restore() resets) and one line in snapfile.COMPONENTS."""

import os
from collections import namedtuple
from typing import Any, Mapping

from .. import backend, cpu
from ..core import argcheck
from ..core.container import BytesComponent, Component, JsonComponent
from .fs import state as _fsstate
from .fs.state import PATH_MAX
from .fs import FileSystem
from .mm import PAGE, USER_MIN, MmState, Vma, page_table_bytes
from .task import ProcState

IoState = namedtuple("IoState", "input eof waiting exit_code")
# The host-side components of a LinuxSandbox at one moment (what a LinuxSnapshot holds).
LinuxState = namedtuple("LinuxState", "mm fs proc io")
MAX_JSON = 64 << 20


# -- the construction config ---------------------------------------------------------------------

def read_config(read: Any) -> Any:
    """A read policy as a config records it: a list of host paths or a {inside: host} dict, str."""
    read = argcheck.read_policy(read)
    if isinstance(read, Mapping):
        return {os.fsdecode(k): os.fsdecode(v) for k, v in read.items()}
    return [os.fsdecode(r) for r in ([read] if isinstance(read, (str, bytes, os.PathLike)) else read)]


def extra_config(extra: Any) -> Any:
    """Checked extra files as a config records them: latin-1 text (JSON has no bytes), None."""
    return {os.fsdecode(k): None if v is None else v.decode("latin-1") for k, v in extra.items()}


def check_config(config: Any) -> Any:
    """The construction arguments a snapshot records, checked (they come from a file)."""
    if not isinstance(config, dict):
        raise TypeError("not a mapping")
    read = config["read"]
    if isinstance(read, dict):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in read.items()):
            raise ValueError("read policy entries must be strings")
    elif not (isinstance(read, list) and all(isinstance(r, str) for r in read)):
        raise ValueError("read policy must be a list or a mapping of strings")
    for key in ("exe", "cwd"):
        if not isinstance(config[key], str):
            raise ValueError(f"{key} must be a string")
    for key in ("stack_size", "tmp_size"):
        if not isinstance(config[key], int) or config[key] <= 0 or config[key] % PAGE:
            raise ValueError(f"{key} is invalid")
    extra = config.get("extra_files", {})
    if not (isinstance(extra, dict) and all(isinstance(k, str) and (v is None or isinstance(v, str))
                                            for k, v in extra.items())):
        raise ValueError("extra_files must be a mapping of strings")
    try:
        FileSystem._parse_extra_files({k: v if v is None else v.encode("latin-1") for k, v in extra.items()})
    except UnicodeEncodeError:
        raise ValueError("extra_files contents must be latin-1 text (bytes)") from None
    checked = {k: config[k] for k in ("read", "exe", "cwd", "stack_size", "tmp_size")}
    if extra:
        checked["extra_files"] = dict(extra)
    return checked


def check_clock(values: Any) -> Any:
    """The guest's MONOTONIC, MONOTONIC_RAW and BOOTTIME at the snapshot, in ns (restores go on
    from them, LinuxSandbox._continue_clocks); None: the host's clocks."""
    if values is None:
        return None
    if not (isinstance(values, list) and len(values) == 3
            and all(type(v) is int and 0 <= v < 1 << 62 for v in values)):
        raise ValueError("the guest's clocks are invalid")
    return values


def user_top(memory_size: int) -> int:
    """The end of what user mappings may cover."""
    return memory_size - page_table_bytes(memory_size) - PAGE


# -- the components ------------------------------------------------------------------------------

def _check_meta(meta, version, memory_size):
    if not isinstance(meta, dict):
        raise ValueError("the metadata is not an object")
    required = {"memory_size", "config", "cpu", "clock", "vcpu_parts"}
    if not required <= set(meta) <= required | {"python"}:
        raise ValueError(f"the metadata has the keys {sorted(meta)}, not {sorted(required)}")
    if meta["memory_size"] != memory_size:
        raise ValueError("memory size differs from the header's")
    cpu.parse(meta["cpu"])
    parts = backend.impl.STATE_PARTS
    vcpu_parts = meta["vcpu_parts"]
    if not (isinstance(vcpu_parts, list) and all(isinstance(p, list) and len(p) == 2 for p in vcpu_parts)):
        raise ValueError("vCPU state parts are invalid")
    names = [p for p, _ in vcpu_parts]
    if names != list(parts):
        raise ValueError(f"vCPU state parts {names} are not this backend's {list(parts)}")
    if not all(type(n) is int and n >= 0 for _, n in vcpu_parts):
        raise ValueError("bad vCPU part length")
    if "python" in meta and not isinstance(meta["python"], dict):
        raise ValueError("the Python record is not an object")
    return dict(meta, config=check_config(meta["config"]), clock=check_clock(meta["clock"]))


def split_vcpu(data: bytes, vcpu_parts: Any) -> dict:
    """The vCPU state by part from the "vcpu" section and the parts' sizes."""
    state, at = {}, 0
    for part, length in vcpu_parts:
        state[part] = data[at:at + length]
        at += length
    if at != len(data):
        raise ValueError("vCPU state length mismatch")
    return state


def _dump_mm(mm_state):
    return {"vmas": [[v.start, v.end, v.prot, v.name.hex(), v.offset, v.pristine] for v in mm_state.vmas],
            "brk_start": mm_state.brk_start, "brk": mm_state.brk}


def _check_mm(value, version, memory_size):
    top = user_top(memory_size)
    vmas, previous_end = [], USER_MIN
    for start, end, prot, name, offset, pristine in value["vmas"]:
        for field in (start, end, prot, offset):
            if not isinstance(field, int) or field < 0:
                raise ValueError("bad mapping field")
        if len(name) >= 2 * PATH_MAX:           # names are paths (fs.FileSystem.mapping_name)
            raise ValueError(f"mapping {start:#x}-{end:#x} has a name of over {PATH_MAX} bytes")
        if start % PAGE or end % PAGE or not previous_end <= start < end <= top or prot > 7:
            raise ValueError(f"mapping {start:#x}-{end:#x} is invalid")
        vmas.append(Vma(start, end, prot, bytes.fromhex(name), offset, bool(pristine)))
        previous_end = end
    brk_start, brk = value["brk_start"], value["brk"]
    if not (isinstance(brk_start, int) and isinstance(brk, int) and USER_MIN <= brk_start <= brk <= top):
        raise ValueError("brk is invalid")
    return MmState(tuple(vmas), tuple(v.start for v in vmas), brk_start, brk)


def _dump_proc(proc):
    return {"actions": [a.hex() for a in proc.actions], "sigmask": proc.sigmask, "altstack": proc.altstack.hex()}


def _check_proc(value, version, context):
    actions = tuple(bytes.fromhex(a) for a in value["actions"])
    if len(actions) != 65 or any(len(a) != 32 for a in actions):
        raise ValueError("signal table is invalid")
    altstack = bytes.fromhex(value["altstack"])
    if len(altstack) != 24 or not isinstance(value["sigmask"], int):
        raise ValueError("signal state is invalid")
    return ProcState(actions, value["sigmask"] & ((1 << 64) - 1), altstack)


def _dump_io(io):
    return {"input": io.input.hex(), "eof": io.eof, "waiting": io.waiting, "exit_code": io.exit_code}


def _check_io(value, version, context):
    exit_code = value["exit_code"]
    if exit_code is not None and not (isinstance(exit_code, int) and 0 <= exit_code <= 255):
        raise ValueError("exit code is invalid")
    return IoState(bytes.fromhex(value["input"]), bool(value["eof"]), bool(value["waiting"]), exit_code)


class _FsComponent(Component):
    name, max_size = "fs", 1 << 30

    def encode(self, value):
        return _fsstate.encode(value)

    def decode(self, data, version, context):
        return _fsstate.decode(data)


META = JsonComponent("linux", _check_meta, max_size=MAX_JSON)
MM = JsonComponent("mm", _check_mm, max_size=MAX_JSON, dump=_dump_mm)
PROC = JsonComponent("proc", _check_proc, max_size=1 << 16, dump=_dump_proc)
IO = JsonComponent("io", _check_io, max_size=MAX_JSON, dump=_dump_io)
FS = _FsComponent()
VCPU = BytesComponent("vcpu", 1 << 20)
