"""The public Sandbox: a micro-VM running one guest ELF, with calls into the guest and host
functions the guest can call back. Backend-neutral: it talks to whatever backend.impl is."""

import os
import stat
import sys
import time
from contextlib import ExitStack
from typing import Any, Callable, Dict, Mapping, Optional, TypeVar, Union, overload

from . import abi, backend, cpu, elf, machine
from .core.gate import Gate, not_started as _not_started
from .core.run import run_timeout, run_until
from .core.hypervisor import Exit
from .core.resource import Resource
from .core import argcheck
from .core.warm import PAGE, RestoreStats, WarmMemory, restore_failed
from .errors import (ConfigError, GuestAbort, GuestCallError, GuestCancelled, GuestFault,
                     GuestTimeout, HostFunctionError, HypervisorError, SandboxBusy,
                     SandboxClosed, SandboxPoisoned, SnapshotError, WhpfastError)
from .snapshot import MAX_IO_BUFFER, MAX_MEMORY, STATE_PARTS, Snapshot
from ._typing import StrPath, Value

impl = backend.impl
EXIT_IO = Exit.IO           # bound once: looking an Exit member up per exit costs ~70 ns
# Sizes past these are refused before anything is allocated (docs/limits.md), the same limits
# snapshot files are held to. Guest memory is MAP_NORESERVE (untouched pages cost nothing), but
# the host keeps 1 bit per page per bitmap and the page tables grow with it; an I/O buffer's
# messages carry 32-bit lengths.
MAX_MEMORY_SIZE = MAX_MEMORY
MAX_IO_BUFFER_SIZE = MAX_IO_BUFFER


_VECTOR_NAMES = {
    0: "#DE divide error", 1: "#DB debug", 3: "#BP breakpoint", 4: "#OF overflow", 5: "#BR bound range",
    6: "#UD invalid opcode", 7: "#NM device not available", 8: "#DF double fault",
    10: "#TS invalid TSS", 11: "#NP segment not present", 12: "#SS stack fault",
    13: "#GP general protection", 14: "#PF page fault", 16: "#MF x87 error", 17: "#AC alignment check",
    18: "#MC machine check", 19: "#XM SIMD floating point", 20: "#VE virtualization", 21: "#CP control protection",
}
_F = TypeVar("_F", bound=Callable[..., Any])    # a host function, kept as it is by register()
_FAULT_KINDS = {0: "divide", 6: "invalid_opcode", 13: "general_protection", 14: "pagefault"}


class Sandbox(Resource):
    """A hardware-isolated micro-VM running `guest` (a path to a guest ELF built with the SDK).

    files maps a name to a host file the guest sees as a read-only memory mapping. on_print
    receives what the guest prints (default: written to sys.stdout). Use as a context manager or
    call close(); an unclosed sandbox warns (ResourceWarning) when collected and is still freed."""

    last_restore: Optional[RestoreStats]    # what the last restore() did

    def __init__(self, guest: StrPath, *, memory_size: int = machine.DEFAULT_MEMORY_SIZE,
                 files: Optional[Mapping[str, StrPath]] = None,
                 io_buffer_size: int = machine.DEFAULT_IO_BUFFER_SIZE,
                 stack_size: int = machine.DEFAULT_STACK_SIZE,
                 on_print: Optional[Callable[[str], object]] = None) -> None:
        self._closed = True          # until fully built, so __del__ and close() are safe
        self._check_sizes(memory_size, io_buffer_size, stack_size)
        files = self._check_files(files)
        image = elf.load(guest)
        with ExitStack() as undo:
            mappings = self._map_files(files, undo)
            try:
                layout = machine.make_layout(image, memory_size, io_buffer_size=io_buffer_size,
                                             stack_size=stack_size,
                                             files=[(n, m.file_size) for n, m in zip(files, mappings)])
            except ValueError as e:
                raise ConfigError(str(e)) from None
            memory = impl.GuestMemory(memory_size)
            undo.callback(memory.close)
            machine.write_environment(memory, layout, image)
            self._start(image, layout, memory, mappings, files, on_print, None, undo)

    @classmethod
    def from_snapshot(cls, snapshot: Union[Snapshot, StrPath], *,
                      files: Optional[Mapping[str, StrPath]] = None,
                      memory_size: Optional[int] = None,
                      on_print: Optional[Callable[[str], object]] = None) -> "Sandbox":
        """A new sandbox whose memory and vCPU state are the snapshot's (a Snapshot, or the path
        of a saved one). From a file, its memory maps the file copy-on-write: sandboxes made from
        one file share its pages and each pays only for the pages it writes.

        A snapshot file is untrusted: it declares, the arguments grant. files= names the host
        file behind each read-only file mapping the snapshot has (the paths it recorded are
        never mapped from a file's word); memory_size= is the most guest memory it may have
        (default 16 MiB). A snapshot taken in this process (not loaded) may omit both: it maps
        the paths its sandbox was given, and files= then overrides some of them."""
        if not isinstance(snapshot, Snapshot):
            snapshot = Snapshot.load(snapshot)
        meta = snapshot.meta
        layout = machine.Layout.from_dict(meta["layout"])
        what = f"snapshot {snapshot.path}" if snapshot.path else "the snapshot"
        if memory_size is not None or snapshot.path is not None:
            limit = machine.DEFAULT_MEMORY_SIZE if memory_size is None else memory_size
            cls._check_sizes(limit, PAGE, PAGE)
            if layout.memory_size > limit:
                raise SnapshotError(f"{what} needs {layout.memory_size >> 20} MiB of guest memory; the "
                                    f"caller's memory_size= allows {limit >> 20} MiB")
        cpu.check(meta["cpu"])
        recorded = {f["name"]: f["path"] for f in meta["files"]}
        given = cls._check_files(files)
        paths = given if snapshot.path is not None else dict(recorded, **given)
        if set(paths) != set(recorded) or set(recorded) != {region.name for region in layout.files}:
            raise SnapshotError(f"{what} maps files {sorted(recorded)}; files= must name the host "
                                f"file of each (got {sorted(paths)})")
        paths = {region.name: paths[region.name] for region in layout.files}   # the layout's order
        guest = meta["guest"]
        image = elf.GuestImage(path=guest["path"], entry=guest["entry"], segments=(), end=0,
                               digest=guest["digest"],
                               exports={n: elf.Export(i, n, p, r) for n, i, p, r in guest["exports"]})
        self = cls.__new__(cls)
        self._closed = True
        with ExitStack() as undo:
            mappings = self._map_files(paths, undo)
            for region, m in zip(layout.files, mappings):
                if m.file_size != region.file_size:      # (its size is the caller's to know)
                    raise SnapshotError(f"file {region.name!r} must have {region.file_size} bytes, "
                                        f"as when the snapshot was taken; {paths[region.name]!r} has "
                                        f"{m.file_size}")
            memory = impl.GuestMemory(layout.memory_size)
            undo.callback(memory.close)
            snapshot.map_into(memory)
            try:
                self._start(image, layout, memory, mappings, paths, on_print, snapshot, undo)
            except ValueError as e:         # a vCPU state part of the wrong size for this backend
                raise SnapshotError(f"the snapshot's vCPU state is unusable: {e}") from None
        return self

    @staticmethod
    def _check_sizes(memory_size, io_buffer_size, stack_size):
        for what, value, limit in (("memory_size", memory_size, MAX_MEMORY_SIZE),
                                   ("io_buffer_size", io_buffer_size, MAX_IO_BUFFER_SIZE),
                                   ("stack_size", stack_size, MAX_MEMORY_SIZE)):
            argcheck.size(value, what, minimum=PAGE, maximum=limit, multiple=PAGE)

    @staticmethod
    def _check_files(files):
        files = {name: os.fspath(path) for name, path in (files or {}).items()}
        for name, path in files.items():
            abi.check_file_name(name)
            try:
                st = os.stat(path)
            except OSError:
                continue            # FileMapping reports it (FileNotFoundError, PermissionError)
            # Opening a FIFO blocks until a writer comes; a device has no size to map.
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"file {name!r} = {path!r} is not a regular file; only regular "
                                  f"files can be mapped into the guest")
            if st.st_size == 0:
                raise ConfigError(f"file {name!r} = {path!r} is empty; a mapping needs at least one byte")
        return files

    @staticmethod
    def _map_files(files, undo):
        mappings = []
        for path in files.values():
            m = impl.FileMapping(path)
            undo.callback(m.close)
            mappings.append(m)
        return mappings

    def _start(self, image, layout, memory, mappings, files, on_print, snapshot, undo):
        """Creates the VM around prepared memory; from a snapshot, loads its vCPU state too."""
        if on_print is not None and not callable(on_print):
            raise TypeError("on_print must be callable or None")
        vm = backend.system().create_vm()
        undo.callback(vm.close)
        vcpu = vm.create_vcpu(0)
        undo.callback(vcpu.close)
        # Memory as slot 0, dirty-logged: restores copy back only the pages written. (What
        # write_environment or a snapshot put there before is covered: with no baseline yet, a
        # restore scans all of memory.)
        warm = WarmMemory(vm, vcpu, memory)
        undo.callback(warm.close)
        for slot, (region, m) in enumerate(zip(layout.files, mappings), start=1):
            # Read-only at the hypervisor too: a write that slipped past the page tables would
            # exit as MMIO instead of changing the file's pages.
            vm.set_memory(slot, region.gpa, region.size, m.address, readonly=True)
        if snapshot is None:
            vcpu.init_long_mode(**machine.sregs_arguments(layout))
        else:
            vcpu.load_state(snapshot.vcpu_state, fpu=True, full=True)
        undo.pop_all()
        self._image = image
        self._layout = layout
        self._layout_dict = layout.to_dict()
        self._memory = memory
        self._warm = warm
        self._mem = warm.mem
        self._file_mappings = mappings
        self._file_paths = files
        self._vm = vm
        self._vcpu = vcpu
        self._on_print = on_print
        self._host_functions = {}
        # One operation (call, restore, snapshot) at a time, by core/gate.py's rules.
        self._gate = Gate(self._free, vcpu.cancel)
        self._poisoned = None
        self._host_error = None
        r = layout.region
        self._input = (r("input").gpa, r("input").size)
        self._output = (r("output").gpa, r("output").size)
        self._exchange = (r("exchange").gpa, r("exchange").size)
        self._stack_top = r("stack").end - 8      # as if `call` had pushed a return address
        warm.set_baseline(snapshot)
        self.last_restore = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the VM and its memory. Idempotent. A call running in another thread is stopped
        (it raises SandboxClosed) and close() returns once it has unwound and freed everything;
        if that thread is inside a host function, which cannot be interrupted, close() returns at
        once and the sandbox is freed when the host function returns. From inside a host function
        of this sandbox, the close takes effect when the call unwinds: the guest does not run
        again and the call raises SandboxClosed."""
        if not self._closed:
            self._gate.close()

    def _free(self):
        # (the gate's free: called once, with no operation running)
        self._closed = True
        self._warm.close()
        self._vcpu.close()
        self._vm.close()
        self._memory.close()
        for m in self._file_mappings:
            m.close()

    def _acquire(self, what, deadline=None, call=False):
        """Makes this thread the one operating on the sandbox (what: "restore()", "snapshot()",
        or a guest function's name for call=True, which also opens the call for cancel()); see
        Gate.enter. From inside a host function of this sandbox's own running call it raises
        SandboxBusy at once: the call holds the vCPU, so waiting would deadlock."""
        self._gate.enter(f"call({what!r})" if call else what, deadline)
        if call:
            # From here cancel() stops this call; a cancel before it found no call and did
            # nothing (nothing observable has happened yet; a close() then is seen by
            # _check_ready). GIL-atomic, like cancel().
            self._vcpu.begin_call()

    def _release(self):
        self._vcpu.end_call()
        self._gate.leave()

    def _user_code(self, fn, *args):
        """Runs a host function or on_print (see Gate.user_code)."""
        return self._gate.user_code(fn, *args)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("poisoned" if self._poisoned else "ready")
        return f"<whpfast.Sandbox {getattr(self, '_image', None) and self._image.path!r} {state}>"

    @property
    def closed(self) -> bool:
        """True once close() was called (the memory is freed when a running call unwinds)."""
        return self._closed or self._gate.closing

    @property
    def poisoned(self) -> Optional[str]:
        """Why the sandbox is poisoned (a str), or None when it is usable."""
        return self._poisoned

    @property
    def exports(self) -> Dict[str, str]:
        """The guest's functions: name -> signature such as "ii->i"."""
        return {e.name: f"{e.params}->{e.result}" for e in self._image.exports.values()}

    @property
    def memory_size(self) -> int:
        return self._layout.memory_size

    # -- host functions ----------------------------------------------------------------------

    @overload
    def register(self, name: str) -> Callable[[_F], _F]: ...
    @overload
    def register(self, name: _F) -> _F: ...
    @overload
    def register(self, name: str, fn: _F) -> _F: ...

    def register(self, name: Union[str, Callable[..., Any]],
                 fn: Optional[Callable[..., Any]] = None) -> Any:
        """Makes fn callable from the guest as `name`. Also a decorator: @sb.register("name") or
        @sb.register (the function's own name)."""
        if fn is None:
            if callable(name):
                return self.register(name.__name__, name)
            return lambda f: self.register(name, f)
        if not isinstance(name, str) or not name or len(name.encode()) > 255:
            raise TypeError(f"host function names must be non-empty str of at most 255 bytes, got {name!r}")
        if not callable(fn):
            raise TypeError(f"host function {name!r} must be callable, got {type(fn).__name__}")
        self._host_functions[name] = fn
        return fn

    def unregister(self, name: str) -> None:
        self._host_functions.pop(name, None)

    # -- calls -------------------------------------------------------------------------------

    def call(self, name: str, *args: Value, timeout: Optional[float] = None) -> Any:
        """Calls guest function `name`. Arguments and results are int (64-bit), float, bytes, str,
        bool or None; wrong types or counts raise TypeError before the guest runs (a bool is not
        an int), as do OverflowError (an int outside int64) and ValueError (a str with a lone
        surrogate, a value too big for the input buffer).

        timeout (seconds) bounds the whole call: waiting for another thread's operation on this
        sandbox, the guest's run time and the time spent in host functions. Past it the call
        raises GuestTimeout: a running guest is stopped at once and the sandbox is poisoned; a
        host function cannot be interrupted, so the call ends as soon as it returns (its result
        is not passed to the guest); a call still waiting for another thread does not start and
        poisons nothing."""
        export = self._image.exports.get(name) if isinstance(name, str) else None
        if export is None:
            raise GuestCallError(f"the guest has no function {name!r}; it exports "
                                 f"{', '.join(sorted(self._image.exports))}")
        timeout = run_timeout(timeout)
        deadline = None if timeout is None else time.monotonic_ns() + int(timeout * 1e9)
        self._acquire(name, deadline, call=True)
        try:
            self._check_ready()
            if deadline is not None and time.monotonic_ns() >= deadline:
                raise _not_started(f"call({name!r})")    # got the sandbox just too late
            self._host_write(self._input, lambda mem, base, size: abi.encode_call(
                mem, base, size, export.index, name, export.params, args))
            return self._run_call(export, timeout, deadline)
        finally:
            self._release()

    def cancel(self) -> None:
        """Stops the call running on this sandbox, from any thread (or from one of its host
        functions): it raises GuestCancelled and the sandbox is poisoned. A running guest stops
        at once; a host function cannot be interrupted, so the call ends when it returns. Does
        nothing when no call runs (nor to a later call); any number of cancels cost as much as
        one (at most one signal to the vCPU thread per call)."""
        if not self._closed:             # vcpu.cancel() is safe on a closed vCPU too (and
            self._vcpu.cancel()          # holds the GIL, as close() does: no use after free)

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Captures memory and the complete vCPU state. Its cost follows the memory size (every
        page is scanned, non-zero ones copied); take snapshots once, restore them often."""
        with self._gate.operation("snapshot()"):
            self._check_ready()
            image = impl.GuestMemory(self._layout.memory_size)
            nonzero, state = self._warm.capture(image)
            meta = {
                "backend": backend.NAME, "abi": abi.ABI_VERSION, "cpu": cpu.host(),
                "guest": {"path": self._image.path, "digest": self._image.digest, "entry": self._image.entry,
                          "exports": [[e.name, e.index, e.params, e.result] for e in self._image.exports.values()]},
                "layout": self._layout_dict,
                "files": [{"name": n, "path": os.path.abspath(p)} for n, p in self._file_paths.items()],
                "state_sizes": [len(state[part]) for part in STATE_PARTS],
            }
            snap = Snapshot(image, nonzero, state, meta)
            self._warm.set_baseline(snap)
            return snap

    def restore(self, snapshot: Snapshot) -> None:
        """Puts memory and vCPU state back to the snapshot's, exactly, and clears a poisoned
        state. Restoring the baseline (the snapshot this sandbox was made from or last took or
        restored) copies back only the pages written since; another snapshot costs a full pass
        over memory once. sb.last_restore tells what it did."""
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"restore() takes a Snapshot, not {type(snapshot).__name__}")
        with self._gate.operation("restore()"):
            if self.closed:
                raise SandboxClosed("the sandbox is closed")
            why = snapshot.compatible_with(self._layout_dict, self._image.digest)
            if why:
                raise SnapshotError(f"cannot restore this snapshot into this sandbox: {why}")
            try:
                stats = self._warm.restore(snapshot)
            except BaseException as e:
                raise restore_failed(self, e)
            self._poisoned = None
            self.last_restore = stats

    def _check_ready(self):
        if self.closed:
            raise SandboxClosed("the sandbox is closed")
        if self._poisoned:
            raise SandboxPoisoned(f"the sandbox is poisoned by an earlier call ({self._poisoned}); "
                                  f"restore a snapshot or close it")

    def _run_call(self, export, timeout, deadline):
        vcpu = self._vcpu
        vcpu.enter(self._image.entry, self._stack_top)
        self._warm.ran = True
        self._host_error = None
        try:
            while True:
                kind = run_until(vcpu, deadline)
                if kind != EXIT_IO:
                    raise self._poison(self._exit_error(kind, export, timeout))
                port, length = vcpu.io_port, vcpu.io_value
                # Only the exits the ABI defines count: a 32-bit `out` (the CPL0 fault stub: an
                # 8-bit one). An IN or string I/O on the same port is not a return or an abort.
                if vcpu.io_direction != 1 or vcpu.io_string or \
                        vcpu.io_size != (1 if port == abi.PORT_FAULT else 4):
                    raise self._poison(self._undefined_io())
                if port == abi.PORT_RETURN:
                    return self._result(export, length)
                if port == abi.PORT_HOSTCALL:
                    self._host_call(length)
                elif port == abi.PORT_PRINT:
                    self._print(self._guest_text(length, "printed text"))
                elif port == abi.PORT_ABORT:
                    # An empty message: the runtime rejected the info page (another ABI version).
                    message = self._guest_text(length, "abort message") or \
                        "no message (a guest built for another whpfast ABI aborts this way)"
                    raise GuestAbort(message) from self._host_error
                elif port == abi.PORT_FAULT:
                    raise self._poison(self._fault())
                else:
                    raise self._poison(GuestFault(f"the guest wrote to unexpected I/O port {port:#x}",
                                                  kind="io"))
        except WhpfastError:
            raise
        except BaseException as e:
            # Ctrl-C or an error escaping a host function's BaseException: the guest stopped
            # somewhere in the middle of the call, so its state is not trustworthy.
            self._poisoned = f"the call was interrupted by {type(e).__name__}"
            self._warm.needs_full_reset = True
            raise

    def _poison(self, exc):
        self._poisoned = str(exc)
        self._warm.needs_full_reset = True
        return exc

    def _result(self, export, length):
        base, size = self._output
        try:
            status, letter, value = abi.decode_result(self._mem, base, size, length)
        except abi.MessageError as e:
            raise GuestCallError(f"{export.name}() returned a malformed result: {e}") from self._host_error
        if status != abi.STATUS_OK:
            message = f"{export.name}() failed in the guest: {value}"
            if self._host_error is not None:
                raise HostFunctionError(message) from self._host_error
            raise GuestCallError(message)
        if self._host_error is not None:
            raise HostFunctionError(f"{export.name}() called a host function that raised "
                                    f"{type(self._host_error).__name__}: {self._host_error}") from self._host_error
        if letter != export.result:
            raise GuestCallError(f"{export.name}() is declared to return "
                                 f"{abi.SIGNATURE[export.result][1]} but returned {abi.SIGNATURE[letter][1]}")
        return value

    def _guest_text(self, length, what):
        base, size = self._exchange
        if length > size:
            raise GuestCallError(f"the guest's {what} claims {length} bytes; the exchange buffer holds {size}")
        return bytes(self._mem[base:base + length]).decode("utf-8", "replace")

    def _print(self, text):
        if self._on_print is not None:
            try:
                self._user_code(self._on_print, text)
            except WhpfastError as e:    # the guest stopped mid-call, as for any other exception
                raise self._poison(e)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    def _host_call(self, length):
        base, size = self._exchange
        try:
            name, args = abi.decode_host_call(self._mem, base, size, length)
        except abi.MessageError as e:
            return self._reply_error(f"malformed host call request: {e}")
        fn = self._host_functions.get(name)
        if fn is None:
            return self._reply_error(f"no host function named {name!r} is registered")
        try:
            result = self._user_code(fn, *args)
        except Exception as e:
            if self._host_error is None:
                self._host_error = e
            return self._reply_error(f"host function {name!r} raised {type(e).__name__}: {e}")
        try:
            self._reply(abi.STATUS_OK, abi.letter_of(result), result)
        except (TypeError, ValueError, OverflowError) as e:
            # an int outside int64, a lone surrogate, a result too big for the exchange buffer:
            # the host function's fault, so the caller sees HostFunctionError with this cause
            if self._host_error is None:
                self._host_error = e
            self._reply_error(f"host function {name!r} returned an unusable result ({type(e).__name__}: {e})")

    def _reply_error(self, message):
        # backslashreplace: an exception's text may hold lone surrogates, which UTF-8 cannot carry
        data = message.encode("utf-8", "backslashreplace")[:max(0, self._exchange[1] - 64)]
        self._reply(abi.STATUS_ERROR, "s", data.decode("utf-8", "ignore"))

    def _reply(self, status, letter, value):
        self._host_write(self._exchange, lambda mem, base, size: abi.encode_reply(
            mem, base, size, status, letter, value))

    def _host_write(self, buffer, encode):
        """Runs encode(mem, base, size), which writes a message into a guest buffer and returns
        its length, through the one host write of the warm-start core (so that restore copies
        those pages back too)."""
        base, size = buffer
        return self._warm.write(base, size, encode)

    def _fault(self):
        vector, error_code, rip, cr2 = machine.read_fault(self._mem)
        name = _VECTOR_NAMES.get(vector, f"vector {vector}")
        where = f"at rip={rip:#x}"
        address = None
        if vector == 14:
            address = cr2
            access, present = machine.page_fault_access(error_code)
            problem = "protection violation" if present else "page not mapped"
            detail = f"{access} of {cr2:#x} ({problem}{self._describe_address(cr2)})"
        else:
            detail = f"error code {error_code:#x}" if vector in machine.VECTORS_WITH_ERROR_CODE else ""
        return GuestFault(f"guest fault {name} {where}{': ' + detail if detail else ''}",
                          kind=_FAULT_KINDS.get(vector, "exception"), vector=vector,
                          error_code=error_code, rip=rip, address=address)

    def _describe_address(self, address):
        for f in self._layout.files:
            if f.gpa <= address < f.gpa + f.size:
                return f", inside read-only file mapping {f.name!r}"
        for r in self._layout.regions:
            if r.gpa <= address < r.end:
                return f", inside {'guest' if r.user else 'supervisor-only'} region {r.name!r}"
        return ""

    def _undefined_io(self):
        vcpu = self._vcpu
        what = f"{'out' if vcpu.io_direction == 1 else 'in'} of {vcpu.io_size} bytes" + \
            (" (string or REP I/O)" if vcpu.io_string else "")
        return GuestFault(f"the guest made an I/O access the whpfast ABI does not define: {what} on "
                          f"port {vcpu.io_port:#x} (only a 32-bit `out` of a message length is)", kind="io")

    def _exit_error(self, kind, export, timeout):
        vcpu = self._vcpu
        if kind == Exit.TIMEOUT:
            return GuestTimeout(f"{export.name}() ran past its timeout of {timeout} s (guest and host "
                                f"function time together) and was stopped")
        if kind == Exit.CANCELLED and self._gate.closing:
            return SandboxClosed(f"the sandbox was closed while {export.name}() ran; the call was stopped")
        if kind == Exit.CANCELLED:
            return GuestCancelled(f"{export.name}() was cancelled")
        if kind == Exit.MMIO:
            return GuestFault(f"the guest {'wrote' if vcpu.mmio_is_write else 'read'} guest-physical "
                              f"{vcpu.mmio_address:#x}, which is not writable memory"
                              f"{self._describe_address(vcpu.mmio_address)}",
                              kind="mmio", address=vcpu.mmio_address)
        if kind == Exit.SHUTDOWN:
            return GuestFault("the guest triple-faulted (a fault while delivering a fault)", kind="triple_fault")
        if kind == Exit.HLT:
            return GuestFault("the guest halted", kind="halt")
        if kind == Exit.INTERNAL_ERROR:
            hint = (": the hypervisor could not emulate an instruction (on PVM hosts SSE at CPL0 "
                    "fails this way)") if vcpu.internal_suberror == 1 else ""
            return GuestFault(f"hypervisor internal error, suberror {vcpu.internal_suberror}{hint}; "
                              f"data {[hex(d) for d in vcpu.internal_data]}", kind="internal_error")
        if kind == Exit.FAIL_ENTRY:
            return HypervisorError(f"the hypervisor failed to enter the guest "
                                   f"(hardware reason {vcpu.fail_entry_reason:#x})")
        return HypervisorError(f"unexpected exit reason {vcpu.exit_reason}")
