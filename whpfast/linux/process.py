"""LinuxSandbox: an unmodified x86-64 Linux program in a KVM guest at CPL3, every system call served
by the host against a policy (the file system's `read=` list, no network, one thread).

How a system call travels: EFER.SCE and LSTAR point `syscall` at a stub on a user page that does
`out SYSCALL_PORT` (on the PVM hosts `syscall` stays at CPL3, so the stub must be user-executable
and its port open in the TSS I/O bitmap); the exit leaves the registers in kvm_run's sync area,
`syscalls.dispatch` serves the call for the sandbox's Task (task.py: what the handlers see of it),
and the answer goes back as RAX/RIP/RFLAGS through the same area with the next KVM_RUN (no extra
ioctl). CPU exceptions reach the SDK's CPL0 fault stubs (machine.py) and end the run as GuestFault
in Linux terms (signal, address, RIP). The exit loop, the dispatch and the checked guest copies
run in C (whpfast/_linux.pyx); the handlers are Python (sys_*.py, listed in syscalls.SYSCALLS).

Warm start: snapshot() = guest memory + vCPU state + every host-side component (address space,
file system, signal table, pending input); restore() puts all of them back. Memory and vCPU
state go back through the warm-start core Sandbox uses too (whpfast/core/warm.py: the dirty log
for guest writes, its host-dirty bitmap for the host's, fed by mm.fill/mm.store, the hot set)."""

import ctypes
import errno
import functools
import os
import struct
import threading
import time
import weakref
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

from .. import _pages, abi, backend, cpu, machine
from ..core import argcheck
from ..core.gate import Gate
from ..core.hypervisor import Exit
from ..core.run import run_timeout, run_until
from ..core.resource import Resource
from ..elf import read_program
from ..core.warm import BLOCK, WarmMemory, restore_failed
from ..core import image as _image
from ..errors import (ConfigError, GuestCancelled, GuestCpuLimit, GuestFault, GuestLoadError, GuestTimeout,
                      HypervisorError, SandboxClosed, SandboxError, SandboxPoisoned,
                      SnapshotError, WhpfastError)
from . import loader, sys_file, syscalls, vdso
from .._typing import StrPath
from .errno import LinuxError
from .fs import FileSystem
from .grant import DEFAULT_MEMORY_SIZE, DEFAULT_TMP_SIZE, Grant
from ..core.container import ImageAccessors, map_image
from . import snapfile
from .state import IoState, LinuxState, check_config, extra_config, read_config
from .sys_signal import SIGNAL_NAMES
from .task import AT_FDCWD, MAX_IO, UID, Park, ProcState, ProgramExit, ProgramKilled, Task
from .mm import (PAGE, PROT_EXEC, PROT_READ, PROT_WRITE, PURE_PYTHON, USER_MIN, AddressSpace,
                 identity_page_tables, page_table_bytes)

if not PURE_PYTHON:
    from .. import _linux

impl = backend.impl
MASK64 = (1 << 64) - 1
# (DEFAULT_MEMORY_SIZE and DEFAULT_TMP_SIZE: grant.py, where they are what a caller grants too)
ReadPolicy = Union[StrPath, bytes, Iterable[Union[StrPath, bytes]], Mapping[str, str]]
DEFAULT_STACK_SIZE = 8 << 20
MAX_MEMORY_SIZE = 64 << 30          # guest memory (2 MiB pages: a multiple of 2 MiB, 16 MiB at least)
# Bytes of stdout, and of stderr, one run() keeps (output_limit's default): past it a write is
# cut short, later ones fail with EFBIG, and the result is marked (OUTPUT_MARKER, truncated), so
# a program printing without end costs the host at most this much per stream.
OUTPUT_LIMIT = 16 << 20
MAX_OUTPUT_LIMIT = 1 << 30
OUTPUT_MARKER = "\n[whpfast: {stream} truncated at the output limit of {limit} bytes per run]\n"
# run(cpu_time=): the vCPU runs to a wall-clock deadline no later than the CPU time left (this
# thread's CPU time never grows faster than the clock), then the CPU time is read; while some is
# left it runs on, for CPU_SLICE_NS at least (a run may overshoot its CPU time by that much).
CPU_SLICE_NS = 2_000_000

SYSCALL_PORT = 0xE4                 # one of the ports the SDK's TSS bitmap opens to CPL3
SYSCALL_STUB = 0xA000               # user page, read + execute: out SYSCALL_PORT, al; ud2
SYSCALL_STUB_CODE = bytes([0xE6, SYSCALL_PORT, 0x0F, 0x0B])
CR4 = machine.CR4 | (1 << 16) | (1 << 18)       # + FSGSBASE, OSXSAVE (AVX state usable at CPL3)
MSR_STAR, MSR_LSTAR, MSR_SFMASK = 0xC0000081, 0xC0000082, 0xC0000084
# sysret selectors: CS = base + 16, SS = base + 8 with base = USER_DS - 8 (0x10 | 3)
STAR = ((machine.USER_DS - 8) << 48) | (machine.KERNEL_CS << 32)
SFMASK = 0x47700                    # TF DF IF IOPL NT AC cleared on entry, as Linux does
XCR0_CHOICES = (0xE7, 0x7)          # x87|SSE|AVX(|AVX-512) when the CPU has it

_SIGNALS = {0: ("SIGFPE", "divide error"), 1: ("SIGTRAP", "debug trap"), 3: ("SIGTRAP", "breakpoint"),
            4: ("SIGSEGV", "overflow"), 5: ("SIGSEGV", "bound range"), 6: ("SIGILL", "invalid opcode"),
            7: ("SIGSEGV", "device not available"), 8: ("SIGSEGV", "double fault"),
            10: ("SIGSEGV", "invalid TSS"), 11: ("SIGBUS", "segment not present"),
            12: ("SIGBUS", "stack segment fault"), 13: ("SIGSEGV", "general protection fault"),
            14: ("SIGSEGV", "page fault"), 16: ("SIGFPE", "x87 floating-point error"),
            17: ("SIGBUS", "alignment check"), 19: ("SIGFPE", "SIMD floating-point error"),
            21: ("SIGSEGV", "control protection")}


@dataclass(frozen=True)
class RunResult:
    """What one LinuxSandbox.run() produced. exit_code is None while the program still runs
    (waiting for input); waiting is True when it blocks reading stdin with no input left;
    truncated is True when stdout or stderr reached the run's output limit: that stream holds
    the first output_limit bytes and then OUTPUT_MARKER."""
    stdout: bytes
    stderr: bytes
    exit_code: Optional[int]
    waiting: bool
    truncated: bool = False


class LinuxSnapshot(ImageAccessors):
    """Guest memory, vCPU state and every host-side component of a LinuxSandbox at one moment.
    Restore it any number of times, save() it, or start new sandboxes from it
    (LinuxSandbox.from_snapshot)."""

    def __init__(self, image: Any, nonzero: Any, vcpu_state: Dict[str, bytes], state: LinuxState,
                 meta: Dict[str, Any], path: Optional[str] = None,
                 file: Any = None, extents: Any = None, image_offset: Optional[int] = None,
                 refs: Any = (), shared: Any = None, delta: Any = None, chain: Any = None) -> None:
        self._image = image         # None: built from chain when first needed (_image_view)
        self._view = None if image is None else memoryview(image)
        self._nonzero = nonzero
        self._state = vcpu_state
        self.state = LinuxState(*state)     # the host-side components (linux/state.py)
        self.meta = meta
        self.path = path
        # A loaded snapshot: the open file its image is mapped from, where, and the image's
        # extents; sandboxes made from it map those copy-on-write (container.map_image).
        self._file = file
        if file is not None:
            weakref.finalize(self, file.close)      # closed with the snapshot, never left to the GC
        self._extents = extents
        self._image_offset = image_offset
        # ...and the host files it refers to (snapfile.FileRef, open), mapped the same way.
        self._refs = tuple(refs)
        # A snapshot taken in this process: the whole-memory image it derives from, shared
        # copy-on-write (core/image.py SharedImage, or None), and the pages where its image
        # differs from that one (None: none, it is that image).
        # On KVM its image is that one with layers over it (core/image.py Chain, or None).
        self._shared, self._delta, self._chain = shared, delta, chain
        for r in self._refs:
            weakref.finalize(self, os.close, r.fd)
        self.nonzero_pages = _pages.count_bits(nonzero)
        # (buffer, length) of the read of stdin the snapshot is parked in, False when it is not
        # parked in one, None until a sandbox has its registers (LinuxSandbox._restore)
        self._parked = None

    @property
    def _image_view(self):
        """The memory image, to read (mapped from the chain's files on first use)."""
        view = self._view
        if view is None:
            self._image = self._chain.image(self.meta["memory_size"])
            view = self._view = memoryview(self._image)
        return view

    def __repr__(self):
        where = f" from {self.path!r}" if self.path else ""
        return (f"<whpfast.LinuxSnapshot{where} of {self.meta['config']['exe']!r}, "
                f"{self.meta['memory_size'] >> 20} MiB, {self.nonzero_pages} non-zero pages>")

    # -- public accessors (and ImageAccessors') -------------------------------------------------

    @property
    def refs(self) -> Tuple[Any, ...]:
        """A loaded snapshot's referenced host files (snapfile.FileRef, open)."""
        return self._refs

    # -- disk ------------------------------------------------------------------------------------

    def save(self, path: StrPath) -> str:
        """Writes the snapshot to path atomically (a new file, then renamed over path)."""
        return snapfile.save(self, path)

    @classmethod
    def load(cls, path: StrPath, *, read: ReadPolicy = (), memory_size: Optional[int] = None,
             tmp_size: Optional[int] = None) -> "LinuxSnapshot":
        """Reads and validates a saved snapshot; SnapshotError says what is wrong. The file is
        untrusted: read=, memory_size= and tmp_size= (as LinuxSandbox takes them; the defaults
        grant no host path, 1 GiB and a 64 MiB /tmp) are what it may use, and one declaring
        more is refused, naming it (whpfast/linux/grant.py)."""
        return cls._load(path, Grant.of(read, memory_size, tmp_size))

    @classmethod
    def _load(cls, path: StrPath, grant: Grant) -> "LinuxSnapshot":
        got = snapfile.load(path, grant)
        return cls(got.image, got.nonzero, got.vcpu_state, got.state, got.meta, path=os.fspath(path),
                   file=got.file, extents=got.extents, image_offset=got.image_offset, refs=got.refs)

    def with_read(self, read: ReadPolicy,
                  extra_files: Optional[Mapping[str, Optional[bytes]]] = None) -> "LinuxSnapshot":
        """This snapshot with another read policy: the same memory, vCPU and host-side state
        (shared, not copied). A sandbox made from it (from_snapshot) resolves the file-system
        state through `read`, so whatever the guest holds open must still be there; a
        PythonSandbox narrows its policy this way before its first snapshot."""
        if self._file is not None:
            raise SnapshotError("with_read() takes a snapshot taken in this process, not a loaded one")
        extra = extra_config(FileSystem._parse_extra_files(dict(extra_files or {})))
        config = check_config(dict(self.meta["config"], read=read_config(read), extra_files=extra))
        return LinuxSnapshot(self._image, self._nonzero, self._state, self.state,
                             dict(self.meta, config=config), path=None,
                             shared=self._shared, delta=self._delta, chain=self._chain)

    def check_grant(self, grant: Grant) -> None:
        """SnapshotError unless `grant` covers what this snapshot declares."""
        grant.check(self.meta["config"], self.meta["memory_size"], f"snapshot {self.path or '(in memory)'}")


def _check_output_limit(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_OUTPUT_LIMIT:
        raise ConfigError(f"output_limit must be an int of bytes in 0..{MAX_OUTPUT_LIMIT}, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def _host_auxv(key):
    """The host's auxv value for key (AT_HWCAP*): per host, so read once per process."""
    import ctypes
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    libc.getauxval.argtypes = [ctypes.c_ulong]
    return int(libc.getauxval(key))


class LinuxSandbox(Resource):
    """Runs argv (argv[0]: the host path of an x86-64 Linux ELF) in a fresh micro-VM.

    read: host paths the program may read (or {inside: host}); everything else does not exist
    for it, except a private in-memory /tmp and a few synthesized /proc, /sys and /dev files. An
    entry below /tmp (a tempfile.mkdtemp() directory) is a read-only bind mount in that /tmp.
    env: the environment (default: PATH, HOME=/tmp, LANG=C.UTF-8). memory_size bounds both the
    guest's RAM and its address space. on_output(stream, data) sees stdout/stderr as written.
    output_limit: bytes of stdout, and of stderr, one run keeps (default OUTPUT_LIMIT, 16 MiB;
    also the attribute of that name, and run()'s argument); see RunResult.truncated.
    extra_files: {inside path: bytes}, read-only files shown with these contents, over anything
    `read` shows there (at most 64 files, 1 MiB in all; e.g. a configuration file); None for
    an empty directory (read entries below it are shown in it, nothing else of the host's)."""

    def __init__(self, argv: Sequence[Union[str, bytes]], *, env: Optional[Mapping[str, str]] = None,
                 read: ReadPolicy = (),
                 cwd: StrPath = "/", memory_size: int = DEFAULT_MEMORY_SIZE,
                 stack_size: int = DEFAULT_STACK_SIZE,
                 on_output: Optional[Callable[[str, bytes], object]] = None,
                 tmp_size: int = DEFAULT_TMP_SIZE, output_limit: int = OUTPUT_LIMIT,
                 extra_files: Optional[Mapping[str, bytes]] = None) -> None:
        self._closed = True
        _check_output_limit(output_limit)
        argv = [os.fsencode(a) for a in argv] if not isinstance(argv, (str, bytes)) else None
        if not argv:
            raise ValueError("argv must be a non-empty list of str or bytes (argv[0]: the program)")
        if env is None:
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
        envp = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in dict(env).items()]
        argcheck.size(memory_size, "memory_size", minimum=16 << 20, maximum=MAX_MEMORY_SIZE, multiple=2 << 20)
        argcheck.size(stack_size, "stack_size", minimum=64 << 10, maximum=memory_size // 4, multiple=PAGE)
        argcheck.size(tmp_size, "tmp_size", minimum=PAGE, maximum=MAX_MEMORY_SIZE, multiple=PAGE)
        if on_output is not None and not callable(on_output):
            raise TypeError("on_output must be callable or None")
        exe = os.path.abspath(os.fsdecode(argv[0]))
        read = read_config(read)
        if extra_files is not None and not isinstance(extra_files, Mapping):
            raise TypeError(f"extra_files must be a {{inside path: bytes}} mapping, not "
                            f"{type(extra_files).__name__}")
        extra = FileSystem._parse_extra_files(dict(extra_files or {}))   # (TypeError, ReadPolicyError)
        self._config = check_config({"read": read, "exe": exe, "cwd": os.fsdecode(cwd),
                                      "stack_size": stack_size, "tmp_size": tmp_size,
                                      "extra_files": extra_config(extra)})
        self._setup(memory_size, on_output)
        with ExitStack() as undo:
            undo.callback(self._close_parts)
            with ExitStack() as files:          # the program's and interpreter's fds
                image = self._program_image(exe, files)
                elf = loader.parse(image, exe)
                try:
                    self._exec(elf, image, exe, argv, envp, files)
                except LinuxError as e:
                    raise GuestLoadError(f"{exe} does not fit the sandbox ({e}); give it a larger "
                                         f"memory_size") from None
            undo.pop_all()
        self.output_limit = output_limit
        self._closed = False

    @classmethod
    def from_snapshot(cls, snapshot: Union["LinuxSnapshot", StrPath], *, read: Optional[ReadPolicy] = None,
                      memory_size: Optional[int] = None, tmp_size: Optional[int] = None,
                      on_output: Optional[Callable[[str, bytes], object]] = None) -> "LinuxSandbox":
        """A new sandbox in the snapshot's state (a LinuxSnapshot, or the path of a saved one),
        with the read policy the snapshot declares. Its first restore target is that snapshot.

        The caller's read=, memory_size= and tmp_size= are the authority: a snapshot declaring a
        host path they do not grant, more memory or a larger /tmp is refused (SnapshotError).
        From a path, omitted ones grant the least (no host path, 1 GiB, 64 MiB); a LinuxSnapshot
        object keeps the grant it was loaded under, or, taken in this process, what it declares."""
        if not isinstance(snapshot, LinuxSnapshot):
            snapshot = LinuxSnapshot.load(snapshot, read=read if read is not None else (),
                                          memory_size=memory_size, tmp_size=tmp_size)
        elif read is not None or memory_size is not None or tmp_size is not None:
            snapshot.check_grant(Grant.of(read if read is not None else (), memory_size, tmp_size))
        cpu.check(snapshot.meta["cpu"])
        self = cls.__new__(cls)
        self._closed = True
        self._config = dict(snapshot.meta["config"])
        self._setup(snapshot.meta["memory_size"], on_output, snapshot)
        try:
            # Memory already holds the image (_build_vm mapped it) except for the pages the host
            # wrote while building the VM (host_dirty): with the snapshot as baseline, the restore
            # copies back only those, loads the whole vCPU state and the host-side components.
            warm = self._warm
            warm.baseline = snapshot        # not set_baseline(): it would forget the host's writes
            warm.ran = warm.needs_full_reset = True
            self._restore(snapshot)
        except BaseException:
            self._close_parts()
            raise
        self._refresh_vdso()
        self._closed = False
        return self

    def _setup(self, memory_size, on_output, snapshot=None):
        """The VM, its memory with the kernel area (over the snapshot's image, if given), the
        file system and the initial state."""
        config = self._config
        self.memory_size = memory_size
        self.stack_size = config["stack_size"]
        self._on_output = on_output
        with ExitStack() as undo:
            self._build_vm(memory_size, undo, snapshot)
            self.fs = FileSystem.of_config(config, proc_maps=self.mm.maps_text, entropy=os.urandom,
                                           uid=UID, gid=UID)
            undo.pop_all()
        # Per snapshot taken here, its moment's host overlays (mm.overlay_state): what a
        # restore to it keeps (another sandbox's snapshot: none).
        self._overlays_at = weakref.WeakKeyDictionary()
        # what the system call handlers see of the sandbox (task.py)
        self.task = Task(self.mm, self.fs,
                         ProcState((bytes(32),) * 65, 0, struct.pack("<QiiQ", 0, 2, 0, 0)[:24]),
                         stack_size=self.stack_size, memory_size=memory_size,
                         take_input=self._take_input, output=self._output,
                         set_segment_base=self._segment_base, clock_ns=self.guest_clock_ns,
                         sleep=self._sleep)
        self._io = IoState(b"", False, False, None)
        self.mm.mmap_top = self.mm.top - PAGE - self.stack_size - 16 * PAGE
        # The guest's MONOTONIC, MONOTONIC_RAW and BOOTTIME: the host's less these, zero now
        # (a restore moves them: _continue_clocks). Not the host's uptime, which says how long
        # the host has run and, across sandboxes, that they share one.
        self._clock_offsets = _host_clocks()
        self._finish_init()

    # -- construction ----------------------------------------------------------------------------

    def _build_vm(self, memory_size, undo, snapshot=None):
        memory = impl.GuestMemory(memory_size)
        undo.callback(memory.close)
        if snapshot is not None:
            # Before the hypervisor maps the memory: a file's image copy-on-write (shared page
            # cache across sandboxes made from it), an in-memory one copied.
            if snapshot._file is None:
                _image.fill(memory, snapshot)      # shared copy-on-write where it can be
            else:
                map_image(memory, snapshot._file, snapshot._image_offset, snapshot._extents,
                          snapshot._image_view, snapshot._nonzero)
            if snapshot._refs and snapshot._file is not None and backend.capabilities.file_overlay:
                # the referenced pages (map_image copied them with the rest where it copies)
                snapfile.apply_refs(memory, snapshot.refs, snapshot.image)
        vm = backend.system().create_vm()
        undo.callback(vm.close)
        vcpu = vm.create_vcpu(0)
        undo.callback(vcpu.close)
        # Dirty logging starts with the first snapshot: until then no restore needs it, and on
        # the PVM hosts it doubles the cost of a first write to a page (measured: 21 vs 12 us),
        # which is most of a cold boot. From a snapshot the first restore starts it at once:
        # on from the start, the memory slot is set once (each costs milliseconds on PVM).
        warm = WarmMemory(vm, vcpu, memory, log_dirty=snapshot is not None)
        undo.callback(warm.close)
        pt_size = page_table_bytes(memory_size)
        pt_base = memory_size - pt_size
        regions = [
            machine.Region("gdt", machine.GDT_ADDR, PAGE, user=False, writable=True, executable=False),
            machine.Region("idt", machine.IDT_ADDR, PAGE, user=False, writable=True, executable=False),
            machine.Region("stubs", machine.STUBS_ADDR, PAGE, user=False, writable=False, executable=True),
            machine.Region("fault_record", machine.FAULT_RECORD_ADDR, PAGE, user=False, writable=True,
                           executable=False),
            machine.Region("exception_stack", machine.EXCEPTION_STACK[0],
                           machine.EXCEPTION_STACK[1] - machine.EXCEPTION_STACK[0],
                           user=False, writable=True, executable=False),
            machine.Region("double_fault_stack", machine.DOUBLE_FAULT_STACK[0],
                           machine.DOUBLE_FAULT_STACK[1] - machine.DOUBLE_FAULT_STACK[0],
                           user=False, writable=True, executable=False),
            machine.Region("syscall_stub", SYSCALL_STUB, PAGE, user=True, writable=False, executable=True),
            machine.Region("page_tables", pt_base, pt_size, user=False, writable=True, executable=False),
        ]
        layout = machine.Layout(memory_size=memory_size, regions=regions, page_tables=(pt_base, pt_size),
                                cr3=pt_base + pt_size - PAGE, top=memory_size)
        self._memory, self._vm, self._vcpu, self._warm = memory, vm, vcpu, warm
        self._mem = warm.mem
        self.mm = AddressSpace(warm, pt_base, pt_base - PAGE,
                               lambda offset, length, discard, anonymous=False, remap=True:
                                   impl.memory_invalidate(vcpu, memory, offset, length, discard,
                                                          anonymous, remap),
                               lambda offset, length: impl.memory_populate(memory, offset, length),
                               *((memory.overlay_file, memory.overlaid, memory.anonymize)
                                 if backend.capabilities.file_overlay else (None, False, None)))
        gdt, tss = machine._gdt_and_tss()
        store = self.mm.store
        store(machine.GDT_ADDR, gdt)
        store(machine.TSS_ADDR, tss)
        store(machine.IDT_ADDR, machine._idt())
        store(machine.STUBS_ADDR, machine._stubs())
        store(SYSCALL_STUB, SYSCALL_STUB_CODE)
        for gpa, table in identity_page_tables(layout):     # the non-zero pages only
            store(gpa, table)
        args = machine.sregs_arguments(layout)
        args.update(cr4=CR4)
        vcpu.init_long_mode(**args)
        for xcr0 in XCR0_CHOICES:
            try:
                impl.linux_setup(vcpu, xcr0, {MSR_STAR: STAR, MSR_LSTAR: SYSCALL_STUB, MSR_SFMASK: SFMASK})
                break
            except HypervisorError:
                if xcr0 == XCR0_CHOICES[-1]:
                    raise

    def _exec(self, elf, data, exe, argv, envp, files):
        mm = self.mm
        stack_top = mm.top - PAGE
        stack_bottom = stack_top - self.stack_size
        interp = interp_data = None
        if elf.interp:
            interp_data = self._interpreter_image(exe, elf.interp, files)
            interp = loader.parse(interp_data, elf.interp.decode("utf-8", "replace"))
            if interp.interp:
                raise GuestLoadError(f"the interpreter {elf.interp.decode()} itself names an interpreter")
        bias = loader.place(mm, elf, main=True)
        end = loader.load(mm, elf, data, bias, exe.encode())
        mm.set_brk_start(-(-end // PAGE) * PAGE)
        mm.map(stack_bottom, self.stack_size, PROT_READ | PROT_WRITE, fixed=True, name=b"[stack]")
        vdso_image = self._map_vdso()
        entry, base = elf.entry + bias, 0
        if interp is not None:
            base = loader.place(mm, interp, main=False)
            loader.load(mm, interp, interp_data, base, elf.interp)
            entry = interp.entry + base
        auxv = [(loader.AT_PHDR, elf.phdr + bias if elf.phdr >= 0 else 0), (loader.AT_PHENT, 56),
                (loader.AT_PHNUM, elf.phnum), (loader.AT_PAGESZ, PAGE), (loader.AT_BASE, base),
                (loader.AT_FLAGS, 0), (loader.AT_ENTRY, elf.entry + bias),
                (loader.AT_UID, UID), (loader.AT_EUID, UID),
                (loader.AT_GID, UID), (loader.AT_EGID, UID), (loader.AT_SECURE, 0),
                (loader.AT_HWCAP, _host_auxv(loader.AT_HWCAP)), (loader.AT_HWCAP2, _host_auxv(loader.AT_HWCAP2)),
                (loader.AT_CLKTCK, 100), (loader.AT_MINSIGSTKSZ, 4096),
                (loader.AT_SYSINFO_EHDR, vdso_image)]
        sp = loader.build_stack(mm, stack_top, argv, envp, auxv, argv[0], os.urandom(16))
        impl.enter_user(self._vcpu, entry, sp, machine.USER_CS, machine.USER_DS)

    def _map_vdso(self):
        """Maps the vDSO's data area (read-only) and right after it its image (read + execute);
        returns the image's address for AT_SYSINFO_EHDR."""
        mm, image = self.mm, vdso.IMAGE
        data_size = vdso.DATA_PAGES * PAGE
        base = mm.find_free(data_size + len(image))
        mm.map(base, data_size, PROT_READ, fixed=True, name=b"[vvar]")
        mm.map(base + data_size, len(image), PROT_READ | PROT_EXEC, fixed=True, name=b"[vdso]")
        mm.store(base + data_size, image)
        self._refresh_vdso()
        return base + data_size

    def guest_clock_ns(self, clock: int) -> int:
        """The guest's CLOCK_MONOTONIC, CLOCK_MONOTONIC_RAW or CLOCK_BOOTTIME (the time module's
        ids) now, in ns: the host's less the sandbox's offset (the system calls' clock; the
        vDSO's data area carries the same offsets)."""
        return time.clock_gettime_ns(clock) - self._clock_offsets[_CLOCK_INDEX[clock]]

    def _guest_clocks(self):
        return [now - off for now, off in zip(_host_clocks(), self._clock_offsets)]

    def _continue_clocks(self, snapshot):
        """The guest's clocks go on from the values the snapshot recorded (its meta["clock"]),
        whatever the host's clocks read now: after a host reboot, in another process, on another
        host. A snapshot file that predates the record (None) gets the host's clocks, as it did
        when it was taken."""
        values = snapshot.meta.get("clock")
        if values is None:
            self._clock_offsets = (0, 0, 0)
        else:
            self._clock_offsets = tuple(now - v for now, v in zip(_host_clocks(), values))

    def _refresh_vdso(self):
        """Pairs the guest's TSC with the host's clocks now, in the vDSO's data area (a new VM,
        or a restored snapshot whose pairing is stale). A host write: marked for the next
        restore. In C (_linux.refresh_vdso) unless WHPFAST_PURE_PYTHON=1: it runs on every
        restore."""
        where = self._vvar()
        if where is None:
            return
        if PURE_PYTHON:
            def write(view):
                vdso.refresh(view, 0, clock_offsets=self._clock_offsets)
                return len(view)
            self.mm.fill(where[0], where[1] - where[0], write)
        else:
            _linux.refresh_vdso(self.mm, where[0], *_vdso_parameters(), 0, *self._clock_offsets)

    def _fs_image(self, path, files):
        """A loader.Image of the regular file at path in the sandbox's file system, read through
        an fd that `files` (an ExitStack) closes; LinuxError when it cannot be."""
        fs = self.fs
        fd = fs.openat(AT_FDCWD, path, os.O_RDONLY, 0)
        files.callback(fs.close, fd)

        def read_into(buf, offset):
            try:
                return fs.pread_into(fd, buf, offset)
            except LinuxError as e:         # e.g. ESTALE: replaced on the host meanwhile
                raise GuestLoadError(f"cannot read {os.fsdecode(path)} to load it ({e})") from None
        return loader.Image(fs.regular_size(fd), read_into)

    def _program_image(self, exe, files):
        """argv[0] as the program sees it: through the sandbox's file system where it is visible
        there (a `read` mapping such as {"/": rootfs} decides where it comes from); a program
        the policy does not show is read from the host path argv[0] names -- the caller named
        it -- whether `read` is a list of host paths or an {inside: host} mapping."""
        try:
            return self._fs_image(os.fsencode(exe), files)
        except LinuxError:
            pass
        return loader.Image.of(read_program(exe))

    def _interpreter_image(self, exe, path, files):
        try:
            return self._fs_image(path, files)
        except LinuxError as e:
            raise GuestLoadError(
                f"{exe} is dynamically linked: its interpreter {path.decode('utf-8', 'replace')} is not "
                f"readable inside the sandbox ({os.strerror(e.errno)}); add it to read= together with "
                f"the libraries the program loads (e.g. read=['/lib', '/usr/lib', ...])") from None

    def _finish_init(self):
        self._poisoned = None
        # One operation (run, restore, snapshot, parked_read) at a time, by core/gate.py's rules.
        self._gate = Gate(self._free, self.cancel)
        self._wake = threading.Event()
        self._deadline = None
        self._run_deadline = None               # this run's: _deadline, or earlier for cpu_time
        self._cpu_budget = None                 # ns of this thread's CPU time this run may use
        self._cpu_start = 0
        self.last_cpu_time = None
        self._stdout = bytearray()
        self._stderr = bytearray()
        self.output_limit = OUTPUT_LIMIT
        self._output_limit = OUTPUT_LIMIT       # this run's
        self._truncated = ()                    # the streams this run cut
        self.last_restore = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the VM and its memory. Idempotent. A run in another thread is stopped (it raises
        SandboxClosed) and close() returns once it has unwound and freed everything; if that run
        is inside on_output, which cannot be interrupted, close() returns at once and the sandbox
        is freed when on_output returns. From inside on_output of this sandbox, the close takes
        effect when the run unwinds: the program does not run again and run() raises
        SandboxClosed."""
        if not self._closed:
            self._gate.close()

    def _free(self):
        # (the gate's free: called once, with no operation running)
        self._closed = True
        self._close_parts()

    def _close_parts(self):
        self.fs.close_all()
        self._warm.close()
        self._vcpu.close()
        self._vm.close()
        self._memory.close()

    @property
    def closed(self) -> bool:
        """True once close() was called (the memory is freed when a running run unwinds)."""
        return self._closed or self._gate.closing

    @property
    def unsupported_syscalls(self) -> Dict[str, int]:
        """The system calls the program made that the sandbox does not implement (answered
        ENOSYS), counted by name; docs/compatibility.md lists which those are."""
        return self.task.unsupported_syscalls

    @property
    def syscall_count(self) -> int:
        """The system calls the program made so far."""
        return self.task.syscall_count

    @property
    def poisoned(self) -> Optional[str]:
        return self._poisoned

    @property
    def waiting(self) -> bool:
        return self._io.waiting

    @property
    def exit_code(self) -> Optional[int]:
        return self._io.exit_code

    def cancel(self) -> None:
        """Stops a run going on in another thread (GuestCancelled), also one sleeping in a
        nanosleep. Does nothing when no run is going on."""
        if not self._closed:
            self._vcpu.cancel()
            self._wake.set()

    # -- running --------------------------------------------------------------------------------

    def run(self, input: Union[bytes, bytearray, memoryview] = b"", *, eof: bool = False,
            timeout: Optional[float] = None, restore: Optional[LinuxSnapshot] = None,
            output_limit: Optional[int] = None, cpu_time: Optional[float] = None) -> RunResult:
        """Runs the program until it exits or blocks reading stdin with no input left. input is
        appended to what stdin still holds; eof=True makes a read with nothing left return 0.
        restore: first puts the sandbox back to this snapshot, as restore() does. A warm request
        (a snapshot parked in a read of stdin, restored to from the last restore's snapshot, and
        input for that read) then takes one C call for the restore, the read's answer and the
        run up to the next exit: the GIL is released once for all of it (see _resume).
        output_limit: bytes of stdout, and of stderr, this run keeps (None: self.output_limit).
        cpu_time: seconds of CPU time the run may use (None: no limit but the timeout), past it
        GuestCpuLimit (a GuestTimeout; the sandbox is poisoned as by a timeout). It is the CPU
        time of the thread that runs it: the guest's own (KVM accounts it to that thread) and
        the host's work serving its system calls and restoring it, not the time it waits
        (sleeps, a busy machine, a slow stream consumer); on_output's time counts too. It is
        checked at the wall-clock deadline it implies, so a run may exceed it by CPU_SLICE_NS.
        last_cpu_time: the seconds of CPU time the last run with a cpu_time used."""
        if not isinstance(input, (bytes, bytearray, memoryview)):
            raise TypeError(f"input must be bytes, not {type(input).__name__}")
        timeout = run_timeout(timeout)
        cpu_budget = run_timeout(cpu_time, "cpu_time")
        cpu_budget = None if cpu_budget is None else int(cpu_budget * 1e9)
        limit = _check_output_limit(self.output_limit if output_limit is None else output_limit)
        start = None if timeout is None else time.monotonic_ns() + int(timeout * 1e9)
        with self._gate.operation("run()", start):      # (waiting counts against timeout)
            self.last_cpu_time = None
            resume = None
            if restore is not None:
                self._check_restore(restore)
                resume = self._resume_plan(restore, bytes(input), eof)
                if resume is None:
                    self._restore_locked(restore)
            self._check_ready()
            if resume is None:
                io = self._io
                # (IoState(...) rather than _replace(): this path runs per request, holding the GIL)
                self._io = IoState(io.input + bytes(input), io.eof or eof, io.waiting, io.exit_code)
            self._stdout, self._stderr = bytearray(), bytearray()
            self._output_limit, self._truncated = limit, ()
            self._deadline = None if timeout is None else time.monotonic_ns() + int(timeout * 1e9)
            self._timeout = timeout
            self._cpu_budget = cpu_budget
            if cpu_budget is not None:
                self._cpu_start = time.thread_time_ns()
            self._run_deadline = self._cpu_deadline(0)
            if self._wake.is_set():
                self._wake.clear()
            # Opens the run for cancel() (a cancel() from before it is forgotten); end_call()
            # closes it, so a late cancel() cannot poison the next run.
            self._vcpu.begin_call()
            try:
                if self._gate.closing:           # a close() whose cancel came before begin_call
                    raise SandboxClosed("the sandbox was closed while run() started")
                return self._loop(resume)
            except WhpfastError:
                raise
            except Exception as e:
                # A host-side failure while serving the program (a bug): typed, and the sandbox
                # is poisoned, its state mid-call.
                raise self._poison(SandboxError(
                    f"the host failed while serving the program ({type(e).__name__}: {e}); "
                    f"restore a snapshot or close it")) from e
            except BaseException as e:
                self._poisoned = f"the run was interrupted by {type(e).__name__}: {e}"
                self._warm.needs_full_reset = True
                raise
            finally:
                self._vcpu.end_call()
                if cpu_budget is not None:
                    self.last_cpu_time = (time.thread_time_ns() - self._cpu_start) / 1e9

    def _cpu_deadline(self, used):
        """The deadline the vCPU runs to next: the run's, or sooner when the CPU time left (of
        the run's cpu_time, `used` ns used) runs out before it at the latest."""
        deadline, budget = self._deadline, self._cpu_budget
        if budget is None:
            return deadline
        cpu_end = time.monotonic_ns() + max(budget - used, CPU_SLICE_NS)
        return cpu_end if deadline is None else min(deadline, cpu_end)

    def _loop(self, resume=None):
        vcpu = self._vcpu
        first = -1
        if resume is None:
            io = self._io
            pending = io.waiting             # the vCPU sits at a system call not answered yet
            self._io = IoState(io.input, io.eof, False, io.exit_code)
        else:
            pending = False
            first = self._resume(*resume)
        self._warm.ran = True
        try:
            while True:
                kind = _serve(self.task, vcpu, pending, run_until, self._run_deadline, syscalls.dispatch,
                              impl.syscall_regs, impl.syscall_return, Exit.IO, SYSCALL_PORT,
                              SYSCALL_STUB, machine.USER_CS, machine.USER_DS, first)
                if kind != Exit.TIMEOUT or self._cpu_budget is None or self._run_deadline == self._deadline:
                    break
                # The CPU-time deadline, not the run's: the vCPU stopped between instructions
                # (or was not entered) and goes on while CPU time is left.
                used = time.thread_time_ns() - self._cpu_start
                if used >= self._cpu_budget:
                    kind = None
                    break
                self._run_deadline = self._cpu_deadline(used)
                pending, first = False, -1
        except Park:
            io = self._io
            self._io = IoState(io.input, io.eof, True, io.exit_code)
            return self._result(None, True)
        except ProgramExit as e:
            self._io = self._io._replace(exit_code=e.status)
            return self._result(e.status, False)
        except ProgramKilled as e:
            name = SIGNAL_NAMES.get(e.signal, f"signal {e.signal}")
            exc = GuestFault(f"the program killed itself with {name} (signals are not delivered "
                             f"in the sandbox)", kind="signal", rip=impl.syscall_regs(vcpu)[7])
            exc.signal = name
            raise self._poison(exc)
        except GuestFault as e:             # syscall_return refused the return address
            e.signal = e.kind
            raise self._poison(e)
        raise self._poison(self._stop_error(kind))

    def _resume_plan(self, snapshot, input, eof):
        """For run(restore=snapshot): the staged work of a warm request, or None when it is not
        one (then run() restores first, as restore() does). One when the warm-start core can
        resume this snapshot (the restore's baseline, the last run ended cleanly), the snapshot
        is parked in read(0, buf, count) with stdin still the console, the read has input to
        return, and its buffer is writable: the read is then answered here by sys_read's own
        decision (sys_file.read_stdin, which takes the bytes from the input), with the bytes
        staged to be written after the restore's page copies.
        The host-side components are put back here (the restore's part that needs no guest
        memory); the memory and registers go back in _resume."""
        parked = snapshot._parked
        if PURE_PYTHON or not parked or self._poisoned or not self._warm.can_resume(snapshot):
            return None
        io = snapshot.state.io
        data = io.input + input
        if not data or io.exit_code is not None:
            return None
        mm = self.mm
        mm_state, fs_state, proc, _ = snapshot.state
        mm.revert_overlays(self._overlays_at.get(snapshot), snapshot._nonzero)
        self._forget_translations(False)
        mm.reset(mm_state)
        self.fs.reset(fs_state)
        self.task.proc = proc
        self._io = IoState(data, io.eof or eof, False, None)        # the input the read finds
        self._continue_clocks(snapshot)
        # sys_read's decision: the bytes it reads, or (not stdin's read: a file at fd 0, a buffer
        # no longer writable) a plain restore, after which sys_read itself answers the call
        buf, count = parked
        try:
            answer = sys_file.read_stdin(self.task, 0, buf, count)
        except LinuxError:
            answer = None
        if answer is None:
            self._restore_locked(snapshot)
            return None
        n = len(answer)
        writes = [(buf, answer)]
        where = self._vvar()
        if where is not None:
            seq, = struct.unpack_from("<I", snapshot._image_view, where[0])
            writes.append((where[0], _linux.vdso_data(seq, *_vdso_parameters(), 0,
                                                      *self._clock_offsets)))
        return snapshot, tuple(writes), n

    def _resume(self, snapshot, writes, result):
        """The warm request's restore and the read's answer, and the run to the first exit, in
        one call of the warm-start core (WarmMemory.resume). Returns that exit's kind. A failed
        restore poisons the sandbox as a failed restore() does."""
        deadline = self._run_deadline
        timeout_ns = -1 if deadline is None else max(1, deadline - time.monotonic_ns())
        self.task.syscall_count += 1            # the read it answers
        try:
            (dirty, host, copied, zeroed, _, _, _, register_calls, kind,
             ns) = self._warm.resume(snapshot, writes, result, machine.USER_CS, machine.USER_DS,
                                     timeout_ns)
        except BaseException as e:
            raise restore_failed(self, e, "a warm request's restore and run")
        self._poisoned = None
        self.last_restore = dict(self._figures(copied, zeroed, dirty, host, register_calls, False),
                                 ns=ns)
        return kind

    def _result(self, exit_code, waiting):
        return RunResult(self._collected("stdout"), self._collected("stderr"), exit_code, waiting,
                         bool(self._truncated))

    def _collected(self, stream):
        """This run's output on stream, with OUTPUT_MARKER when it was cut."""
        data = bytes(self._stdout if stream == "stdout" else self._stderr)
        if stream in self._truncated:
            data += OUTPUT_MARKER.format(stream=stream, limit=self._output_limit).encode()
        return data

    # services for the system call handlers (through the Task)

    def _take_input(self, n: int) -> bytes:
        """Up to n bytes of stdin; b"" at end of input; Park when there is none yet."""
        io = self._io
        if n == 0:
            return b""
        if io.input:
            data = io.input[:n]
            self._io = IoState(io.input[n:], io.eof, io.waiting, io.exit_code)
            return data
        if io.eof:
            return b""
        raise Park()

    def _output(self, stream: str, data: bytes) -> int:
        """A write of data to stdout or stderr; returns the bytes taken. Past the run's output
        limit on that stream the write is cut short, and one with no room left fails with
        EFBIG (what a write past RLIMIT_FSIZE gets when SIGXFSZ is not delivered): the program
        learns its output is lost, and the host keeps at most the limit."""
        kept = self._stdout if stream == "stdout" else self._stderr
        room = self._output_limit - len(kept)
        if len(data) > room:
            if stream not in self._truncated:
                self._truncated += (stream,)
            if room <= 0:
                raise LinuxError(errno.EFBIG, f"{stream} is past the run's output limit")
            data = data[:room]
        kept.extend(data)
        if self._on_output is not None:
            try:
                self._gate.user_code(self._on_output, stream, bytes(data))
            except WhpfastError as e:    # the program stopped mid-write, as for any exception
                raise self._poison(e)
        return len(data)

    def _segment_base(self, which: str, value: Optional[int]) -> int:
        return impl.segment_base(self._vcpu, which, value)

    def _sleep(self, seconds: float) -> None:
        """nanosleep: waits on the host, until the run's deadline at most; cancel() wakes it."""
        if self._deadline is not None:
            seconds = min(seconds, max(0, (self._deadline - time.monotonic_ns()) / 1e9))
        self._wake.wait(min(seconds, 86400))    # longer sleeps: the program sleeps again

    # -- failures -------------------------------------------------------------------------------

    def _check_ready(self):
        if self._closed:
            raise SandboxClosed("the sandbox is closed")
        if self._poisoned:
            raise SandboxPoisoned(f"the sandbox is poisoned ({self._poisoned}); restore a snapshot or close it")
        if self._io.exit_code is not None:
            raise SandboxError(f"the program has exited with status {self._io.exit_code}; "
                               f"restore a snapshot to run it again")

    def _poison(self, exc):
        self._poisoned = str(exc)
        self._warm.needs_full_reset = True
        exc.stdout, exc.stderr = self._collected("stdout"), self._collected("stderr")
        return exc

    def _stop_error(self, kind):
        vcpu = self._vcpu
        if kind == Exit.IO and vcpu.io_port == abi.PORT_FAULT:
            return self._fault()
        if kind == Exit.IO and vcpu.io_port == SYSCALL_PORT and vcpu.io_direction \
                and vcpu.io_size == 1 and not vcpu.io_string:
            return self._bad_syscall_exit()
        if kind == Exit.IO:
            return GuestFault(f"the program used I/O port {vcpu.io_port:#x} ("
                              f"{'out' if vcpu.io_direction else 'in'}, {vcpu.io_size} bytes"
                              f"{', string' if vcpu.io_string else ''}): not a system call", kind="io")
        if kind is None:
            return GuestCpuLimit(f"the program used its CPU time of {self._cpu_budget / 1e9:g} s and "
                                 f"was stopped")
        if kind == Exit.TIMEOUT:
            return GuestTimeout(f"the program ran past its timeout of {self._timeout} s and was stopped")
        if kind == Exit.CANCELLED and self._gate.closing:
            return SandboxClosed("the sandbox was closed while run() ran; the run was stopped")
        if kind == Exit.CANCELLED:
            return GuestCancelled("the run was cancelled")
        if kind == Exit.SHUTDOWN:
            return GuestFault("the program triple-faulted", kind="triple_fault")
        if kind == Exit.MMIO:
            return GuestFault(f"the program touched guest-physical {vcpu.mmio_address:#x} outside its "
                              f"memory", kind="mmio", address=vcpu.mmio_address)
        if kind == Exit.INTERNAL_ERROR:
            return GuestFault(f"hypervisor internal error, suberror {vcpu.internal_suberror}",
                              kind="internal_error")
        return HypervisorError(f"unexpected exit reason {vcpu.exit_reason}")

    def _bad_syscall_exit(self):
        """The system-call port's OUT that _serve did not take for a system call: from outside
        the stub (the program's own `out`: on Linux a #GP, SIGSEGV), or a `syscall` whose return
        address (RCX, the program's choice when it jumps to the stub itself) is not a canonical
        user address, which Linux's sysret path answers with SIGSEGV too."""
        regs = impl.syscall_regs(self._vcpu)
        rcx, rip = regs[7], regs[9]
        if rip in (SYSCALL_STUB, SYSCALL_STUB + 2):
            detail = (f"a system call whose return address rcx={rcx:#x} is not a canonical user "
                      f"address (sysret cannot return there)")
            rip = rcx
        else:
            detail = (f"an `out` to the system-call port {SYSCALL_PORT:#x} from its own code, "
                      f"not from the system-call stub (only `syscall` makes system calls)")
        exc = GuestFault(f"the program was killed by SIGSEGV: {detail} at rip={rip:#x}"
                         f"{self._where(rip)}", kind="SIGSEGV", vector=13, error_code=0,
                         rip=rip, address=0)
        exc.signal = "SIGSEGV"
        return exc

    def _fault(self):
        vector, error_code, rip, cr2 = machine.read_fault(self._mem)
        signal, what = _SIGNALS.get(vector, ("SIGSEGV", f"exception {vector}"))
        address = None
        if vector == 14:
            address = cr2
            access, present = machine.page_fault_access(error_code)
            problem = "protection violation" if present else "not mapped"
            detail = f"{access} of address {cr2:#x} ({problem})"
        elif vector in (13, 12, 17):
            address = 0
            detail = what
        else:
            detail = what
        exc = GuestFault(f"the program was killed by {signal}: {detail} at rip={rip:#x}{self._where(rip)}",
                         kind=signal, vector=vector, error_code=error_code, rip=rip, address=address)
        exc.signal = signal
        return exc

    def _where(self, addr):
        for v in self.mm.vmas:
            if v.start <= addr < v.end and v.name:
                return f" ({v.name.decode('utf-8', 'replace')}+{addr - v.start + v.offset:#x})"
        return ""

    # -- snapshots ------------------------------------------------------------------------------

    def snapshot(self) -> LinuxSnapshot:
        """Captures guest memory, the vCPU and every host-side component.

        When the sandbox still derives from a snapshot taken or started from in this process
        (the last one taken, restored or started from, with no fault, timeout or cancel since)
        the capture is incremental: where the backend can map memory over memory (KVM) the new
        image is that snapshot's with a layer holding the pages written since over it
        (core/image.py Chain; a chain past its bounds is flattened, which costs the pages of its
        layers); elsewhere a copy of that snapshot's image with those pages copied in.
        Otherwise it costs a pass over the mapped memory. Restores cost only what changed since
        either way."""
        with self._gate.operation("snapshot()"):
            return self._snapshot()

    def _snapshot_to_start_from(self):
        """snapshot() for new sandboxes to start from at once (PythonSandbox.fork): see
        _snapshot's compact."""
        with self._gate.operation("snapshot()"):
            return self._snapshot(compact=True)

    def _snapshot(self, compact=False):
        """snapshot() (in the gate). compact: new sandboxes will start from it (fork): an
        incremental image whose layers a clone could not map all of is flattened, so that they
        share every page instead of copying some (core/image.py)."""
        if self._closed:
            raise SandboxClosed("the sandbox is closed")
        if self._poisoned:
            raise SandboxPoisoned(f"cannot snapshot a poisoned sandbox ({self._poisoned})")
        warm, base = self._warm, self._warm.baseline
        if (warm.can_capture_delta() and isinstance(base, LinuxSnapshot) and base._file is None
                and base.meta["memory_size"] == self.memory_size):
            chain = _image.Chain.of(base, self.memory_size // PAGE)
            if chain is not None:
                # only the pages written since, into a layer over base's (core/image.py)
                image, grown = None, []
                try:
                    changed, state = warm.capture_delta(
                        None, lambda mem, changed: grown.append(chain.extend(mem, changed,
                                                                             compact)))
                except BaseException:
                    warm.forget_baseline()          # the dirty log may be consumed
                    raise
                chain, = grown
            else:
                image = impl.GuestMemory(self.memory_size)
                try:
                    _image.fill(image, base)
                    changed, state = warm.capture_delta(image)
                except BaseException:
                    image.close()
                    warm.forget_baseline()          # the dirty log may be consumed
                    raise
            nonzero = base._nonzero | changed
            shared = base._shared
            delta = None if shared is None else (changed if base._delta is None
                                                 else base._delta | changed)
        else:
            image, shared = _image.new_image(self.memory_size)
            nonzero, state = warm.capture(image, self._captured_ranges)
            if shared is not None:
                shared.seal(nonzero)
            delta = chain = None
        snap = LinuxSnapshot(image, nonzero, state, self._components(),
                             {"memory_size": self.memory_size, "config": self._config,
                              "cpu": cpu.host(), "clock": self._guest_clocks()},
                             shared=shared, delta=delta, chain=chain)
        self._warm.set_baseline(snap)
        self.mm.changed = []
        self._overlays_at[snap] = self.mm.overlay_state()
        return snap

    def _captured_ranges(self):
        """Whole bitmap words covering the kernel area, every mapping and the page tables:
        everything else is zero (the address space's invariant)."""
        spans = [(0, USER_MIN), (self.mm.pt_base, self.memory_size)]
        spans += [(v.start, v.end) for v in self.mm.vmas]
        spans = sorted((s // BLOCK * BLOCK, -(-e // BLOCK) * BLOCK) for s, e in spans)
        merged = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        return merged

    def _components(self):
        return LinuxState(self.mm.capture(), self.fs.capture(), self.task.proc, self._io)

    def restore(self, snapshot: LinuxSnapshot) -> None:
        """Puts memory, vCPU state and every host-side component back to the snapshot's and
        clears a poisoned state."""
        with self._gate.operation("restore()"):
            self._check_restore(snapshot)
            self._restore_locked(snapshot)

    def _check_restore(self, snapshot):
        if not isinstance(snapshot, LinuxSnapshot):
            raise TypeError(f"restore() takes a LinuxSnapshot, not {type(snapshot).__name__}")
        if self._closed:
            raise SandboxClosed("the sandbox is closed")
        if snapshot.meta["memory_size"] != self.memory_size:
            raise SnapshotError("the snapshot is of a sandbox with another memory_size")
        if snapshot.meta["config"] != self._config:
            raise SnapshotError("the snapshot is of another program or read policy "
                                "(use LinuxSandbox.from_snapshot to start it)")
        cpu.check(snapshot.meta["cpu"])

    def _restore_locked(self, snapshot):
        t0 = time.perf_counter_ns()
        try:
            stats = self._restore(snapshot)
        except BaseException as e:
            self._warm.forget_baseline()
            raise restore_failed(self, e)
        self._refresh_vdso()
        self._poisoned = None
        self.last_restore = dict(stats, ns=time.perf_counter_ns() - t0)

    def _restore(self, snapshot):
        """Memory and vCPU state through the warm-start core, then what only this personality
        has: stale translations and the host-side components. After a failure the core wants a
        full restore next; the caller poisons."""
        full = snapshot is not self._warm.baseline
        # first: it marks the pages it zeroes for the copies below
        self.mm.revert_overlays(self._overlays_at.get(snapshot), snapshot._nonzero)
        stats = self._warm.restore(snapshot, self._captured_ranges)
        self._forget_translations(full)
        mm_state, fs_state, self.task.proc, self._io = snapshot.state
        self.mm.reset(mm_state)
        self.fs.reset(fs_state)
        self._continue_clocks(snapshot)
        if snapshot._parked is None:        # the registers are the snapshot's now
            snapshot._parked = self._parked_locked() or False
        return self._figures(stats.pages_copied, stats.pages_zeroed, stats.dirty_pages,
                             stats.host_pages, stats.register_calls, full)

    def _figures(self, copied, zeroed, dirty, host, register_calls, full):
        """last_restore's figures (but its time) for a restore of either path."""
        return {"pages_copied": copied, "pages_zeroed": zeroed, "dirty_pages": dirty,
                "host_pages": host, "register_ioctls": register_calls, "full": full,
                "mm_ranges": self._mm_ranges}

    def _forget_translations(self, full):
        """Makes the hypervisor drop its translations of the pages whose page-table entries the
        host changed since the baseline (all user memory if full), which a restore puts back;
        before the guest runs again, on either side of the restore's copies."""
        mm = self.mm
        changed = [(USER_MIN, mm.top)] if full else mm.changed
        self._mm_ranges = len(changed)
        if changed:
            mm.changed = []
            for start, end in _merge(changed):
                impl.memory_invalidate(self._vcpu, self._memory, start, end - start, False)

    # -- added by whpfast.python ---------------------------------------------------------------------

    def _vvar(self):
        """(start, end) of the [vvar] mapping, or None. Every restore refreshes it: a walk over all
        mappings cost ~0.5 ms of a pandas sandbox's ~1 ms restore, so once found it is looked up
        by address (binary search), and found again by a walk only if it moved or vanished. And
        while the mappings are those of one captured state (mm._frozen: a restore to the
        baseline puts the same state object back; any change of a mapping clears it), the
        answer found for that state is reused."""
        mm = self.mm
        state = mm._frozen
        if state is not None and state is getattr(self, "_vvar_state", None):
            return self._vvar_found
        found, at = None, getattr(self, "_vvar_at", None)
        if at is not None:
            i, j = mm._span(at, at + 1)
            if i < j and mm.vmas[i].name == b"[vvar]":
                found = mm.vmas[i].start, mm.vmas[i].end
        if found is None:
            for v in mm.vmas:
                if v.name == b"[vvar]":
                    self._vvar_at = v.start
                    found = v.start, v.end
                    break
        self._vvar_state, self._vvar_found = state, found
        return found

    # -- for cooperating programs ------------------------------------------------------------------

    def parked_read(self) -> Optional[Tuple[int, int]]:
        """(address, length) of the buffer of the plain read(0, buf, n) the program is parked in,
        or None when it is not parked in one. A cooperating program can leave its answer in that
        buffer for the host to read there (mm.read), which saves the exit of a write(2); the
        buffer's contents are the program's word, to be validated like any guest data."""
        if self.closed:
            return None
        with self._gate.operation("parked_read()"):
            if self._poisoned:
                return None
            return self._parked_locked()

    def _parked_locked(self):
        if not self._io.waiting:
            return None
        nr, fd, buf, count = impl.syscall_regs(self._vcpu)[:4]
        if nr != syscalls.NUMBERS["read"] or fd != 0:
            return None
        return buf, min(count, MAX_IO)


_CLOCKS = (time.CLOCK_MONOTONIC, time.CLOCK_MONOTONIC_RAW, time.CLOCK_BOOTTIME)
_CLOCK_INDEX = {c: i for i, c in enumerate(_CLOCKS)}


def _host_clocks():
    """The host's MONOTONIC, MONOTONIC_RAW and BOOTTIME now, in ns (the clocks the guest sees
    moved by LinuxSandbox._clock_offsets)."""
    return tuple(time.clock_gettime_ns(c) for c in _CLOCKS)


@functools.lru_cache(maxsize=None)
def _vdso_parameters():
    """(clock sample function's address, mode, mult, shift, coarse resolution) for
    _linux.refresh_vdso, once per process (the calibration is too): the fields vdso.refresh
    would write, taken from a scratch area vdso.write_data fills (so it checks them, and the
    formulas stay in one place)."""
    cal = vdso.calibrate()
    scratch = bytearray(vdso.DATA_SIZE)
    vdso.write_data(scratch, 0, tsc_hz=cal.tsc_hz if cal.invariant else None, tsc_base=0,
                    monotonic_base_ns=0, realtime_base_ns=0, raw_base_ns=0, boottime_base_ns=0)
    mode, _, mult, shift, coarse = vdso._BODY.unpack_from(scratch, vdso._SEQ.size)[:5]
    return ctypes.cast(vdso._helper(), ctypes.c_void_p).value, mode, mult, shift, coarse


def _py_serve(p, vcpu, pending, run_until, deadline, dispatch, syscall_regs, syscall_return,
              exit_io, port, stub, user_cs, user_ds, first=-1):
    """The exit loop: _linux.serve in Python (WHPFAST_PURE_PYTHON=1), documented there. Returns
    the kind of the first exit that is not a system call."""
    while True:
        if not pending:
            kind, first = (run_until(vcpu, deadline) if first < 0 else first), -1
            if kind != exit_io or vcpu.io_port != port or vcpu.io_direction != 1 \
                    or vcpu.io_size != 1 or vcpu.io_string:
                return kind
            regs = syscall_regs(vcpu)
            if regs[9] not in (stub, stub + 2) or regs[7] >> 47:
                return kind
        else:
            regs = syscall_regs(vcpu)
        pending = False
        p.syscall_count += 1
        result = dispatch(p, regs[0], regs[1:7])
        syscall_return(vcpu, result & MASK64, user_cs, user_ds)


_serve = _py_serve if PURE_PYTHON else _linux.serve


def _merge(ranges):
    out = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out
