"""Builds guest C code into a whpfast guest image with the system C compiler.

A guest image is a static, freestanding x86-64 ELF linked at WF_IMAGE_BASE (0x100000) by the SDK's
linker script, with the SDK runtime (entry point, host interface, heap, libc subset) linked in.
Stdlib only, so it works wherever a C compiler does.
"""

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

StrPath = Union[str, "os.PathLike[str]"]

try:
    from .errors import GuestBuildError
except ImportError:  # errors.py not there yet, or this file loaded on its own
    class GuestBuildError(Exception):
        """The C compiler failed to build a guest."""

RUNTIME = "whpfast_runtime.c"
LINKER_SCRIPT = "whpfast_guest.ld"

# Why each flag:
#   -ffreestanding -nostdlib     no libc, no crt startup files: the SDK runtime is all there is
#   -static -fno-pic -no-pie     absolute addresses at WF_IMAGE_BASE; no GOT, PLT or interpreter
#   -fno-stack-protector         there is no TLS canary (%fs:0x28 would fault)
#   -fcf-protection=none         no endbr64 / .note.gnu.property: no CET in the guest
#   -fno-asynchronous-unwind-tables -fno-unwind-tables -fno-exceptions
#                                no .eh_frame: nothing unwinds, and it would only cost pages
#   -ffunction-sections -fdata-sections -Wl,--gc-sections
#                                drop the SDK parts a guest does not use (smaller image to load
#                                and snapshot); the script KEEPs the export table
#   -Wl,-z,max-page-size=4096    4 KiB segment alignment (the guest's page size)
#   -Wl,-z,noexecstack           no executable-stack warning for objects without .note.GNU-stack
#   -Wl,--build-id=none          no .note.gnu.build-id (and the build is reproducible)
#   -lgcc                        arithmetic helpers GCC may call (e.g. 128-bit division)
# -mno-red-zone is not needed: guest code runs at CPL3 and exceptions switch to the TSS stack.
CFLAGS = (
    "-O2", "-ffreestanding", "-nostdlib", "-static", "-fno-pic", "-no-pie",
    "-fno-stack-protector", "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fno-exceptions",
    "-ffunction-sections", "-fdata-sections",
)
LDFLAGS = (
    "-Wl,--gc-sections", "-Wl,-z,max-page-size=4096", "-Wl,-z,noexecstack",
    "-Wl,--build-id=none",
)
# WHPFAST_GUEST_LIBS replaces them, e.g. "" for clang targeting ELF on Windows (no libgcc there).
LIBS = tuple(shlex.split(os.environ.get("WHPFAST_GUEST_LIBS", "-lgcc")))


def sdk_dir() -> Path:
    """The SDK directory (whpfast_guest.h, whpfast_abi.h, the runtime and the linker script):
    `sdk/` next to this file in an installed wheel, `include/` in a source checkout."""
    shipped = Path(__file__).resolve().parent / "sdk"
    if shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parent.parent / "include"


_default_sdk_dir = sdk_dir  # the parameters named sdk_dir below shadow the function


def compiler_command(sources: Iterable[StrPath], output: StrPath, *, cc: Optional[str] = None,
                     extra_flags: Sequence[str] = (), sdk_dir: Optional[StrPath] = None) -> List[str]:
    """The compiler command line build_guest runs, as a list."""
    sdk = Path(sdk_dir) if sdk_dir is not None else _default_sdk_dir()
    cc = cc or os.environ.get("CC") or "cc"
    return [
        *shlex.split(cc),  # CC may carry arguments ("ccache gcc")
        *CFLAGS, f"-I{sdk}", *extra_flags,
        *LDFLAGS, f"-Wl,-T,{sdk / LINKER_SCRIPT}",
        "-o", str(output),
        *(str(s) for s in sources), str(sdk / RUNTIME),
        *LIBS,
    ]


def build_guest(sources: Union[StrPath, Iterable[StrPath]], output: StrPath, *,
                cc: Optional[str] = None, extra_flags: Sequence[str] = (),
                sdk_dir: Optional[StrPath] = None) -> Path:
    """Compiles the C `sources` (one path or several) plus the SDK runtime into the guest image
    `output` and returns its path. `cc` defaults to $CC, then "cc"; `extra_flags` go to the
    compiler after the standard ones (e.g. "-O3", "-DN=4"). Compiler warnings are passed on to
    stderr. The image is then checked the way Sandbox will load it (exports, signatures), so a
    guest that would be refused at load fails here. Raises GuestBuildError with the command and
    the compiler's output, or with what the loader refused."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [Path(s) for s in sources]
    if not sources:
        raise GuestBuildError("build_guest: no source files given")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = compiler_command(sources, output, cc=cc, extra_flags=tuple(extra_flags),
                           sdk_dir=sdk_dir)
    text = shlex.join(cmd)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise GuestBuildError(f"cannot run the C compiler ({e}); set CC or pass cc=.\n"
                              f"command: {text}") from e
    if proc.returncode != 0:
        raise GuestBuildError(f"guest build failed (exit status {proc.returncode})\n"
                              f"command: {text}\n{proc.stdout.rstrip()}")
    if proc.stdout:
        sys.stderr.write(proc.stdout)
    try:
        _check_elf(output, text)
    except GuestBuildError:
        output.unlink(missing_ok=True)   # no unusable image left behind for a build tool to reuse
        raise
    return output


def _check_elf(path: Path, command: str) -> None:
    """A compiler for another target links without complaint, and a guest with no exports (or an
    export the host refuses) links too; catch both here, not at load."""
    with open(path, "rb") as f:
        head = f.read(20)
    # e_ident: magic, EI_CLASS 2 (64-bit), EI_DATA 1 (little-endian); e_machine 62 (x86-64)
    if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1 or head[18:20] != b"\x3e\x00":
        raise GuestBuildError(f"the compiler did not produce a 64-bit x86-64 ELF: {path}\n"
                              f"command: {command}")
    try:
        from . import elf
        from .errors import GuestLoadError
    except ImportError:   # loaded on its own by setup.py, before the package exists: Sandbox checks
        return
    try:
        elf.parse(path.read_bytes(), str(path))
    except GuestLoadError as e:
        raise GuestBuildError(f"the guest built, but whpfast would refuse to load it: {e}\n"
                              f"command: {command}") from None


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m whpfast build-guest") -> int:
    """whpfast build-guest foo.c [more.c] -o foo.elf [--cc CC] [-- compiler flags]"""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # everything after "--" goes to the compiler verbatim
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="Build C sources into a whpfast guest image (static x86-64 ELF).",
        epilog="Compiler flags go after '--', e.g. -- -O3 -DN=4")
    parser.add_argument("sources", nargs="+", help="C source files")
    parser.add_argument("-o", "--output", required=True, help="the guest image to write")
    parser.add_argument("--cc", help="C compiler (default: $CC, then cc)")
    parser.add_argument("--sdk-dir", help="SDK directory (default: the one shipped with whpfast)")
    args = parser.parse_args(argv)
    try:
        path = build_guest(args.sources, args.output, cc=args.cc, extra_flags=extra,
                           sdk_dir=args.sdk_dir)
    except GuestBuildError as e:
        print(e, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
