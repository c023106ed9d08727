"""What `pip install` put on disk is what a user should get: the package, the compiled extensions
without debug info, their type stubs, the guest SDK and the testkit guest, the LICENSE; and no
build inputs (Cython sources, generated C). Checked on the installed distribution's file list
(its RECORD, i.e. the wheel's contents). The tests named *files* import nothing from whpfast, so
a wheel can be checked where it cannot run (see .github/workflows/wheels.yml).

Also: the public API is annotated, and a type checker (mypy --strict) sees every public name
and signature, including the compiled modules' (stubtest compares the stubs with them)."""

import importlib.metadata
import inspect
import os
import struct
import subprocess
import sys
from pathlib import PurePosixPath

import pytest

DIST = importlib.metadata.distribution("whpfast")
FILES = [PurePosixPath(str(f)) for f in DIST.files]
EXTENSION_SUFFIXES = (".so", ".pyd")


def _extensions():
    # The package's extension modules sit in whpfast/ itself; deeper shared objects are not
    # modules (whpfast/linux/vdso/host_clock.so is a helper loaded with ctypes).
    return [f for f in FILES if f.parts[0] == "whpfast" and len(f.parts) == 2
            and f.suffix in EXTENSION_SUFFIXES]


def test_files_ship_no_build_inputs():
    assert len(FILES) > 20, FILES
    inputs = [f for f in FILES if f.suffix in (".pyx", ".pxd", ".pxi")
              or (f.suffix == ".c" and f.parts[:2] != ("whpfast", "sdk")
                  and f.parts[:2] != ("whpfast", "guests")
                  and f.parts[:3] != ("whpfast", "linux", "vdso"))   # the vDSO's, rebuilt by tests
              or f.parts[:2] == ("whpfast", "includes")]
    assert not inputs, f"build inputs in the installed package: {inputs}"
    assert not any(f.name.endswith(".c") and f.name.startswith("_") for f in FILES)


def test_files_ship_the_extensions_with_their_stubs_and_py_typed():
    names = {f.name.split(".")[0] for f in _extensions()}
    assert "_pages" in names and ({"_kvm", "_whp"} & names), names
    for name in names:
        assert PurePosixPath("whpfast", name + ".pyi") in FILES, f"no type stub for {name}"
    assert PurePosixPath("whpfast", "py.typed") in FILES


def test_files_ship_the_sdk_and_the_testkit_guest():
    for name in ("whpfast_guest.h", "whpfast_abi.h", "whpfast_runtime.c", "whpfast_guest.ld"):
        assert PurePosixPath("whpfast", "sdk", name) in FILES, name
    assert not any(f.parts[:3] == ("whpfast", "sdk", "compat") for f in FILES)
    assert PurePosixPath("whpfast", "guests", "testkit.elf") in FILES


def test_files_ship_the_license_the_metadata_names():
    licenses = [f for f in FILES if f.name == "LICENSE" and f.parts[0].endswith(".dist-info")]
    assert licenses, "no LICENSE in the distribution"
    text = DIST.locate_file(licenses[0]).read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    meta = DIST.metadata
    assert meta.get("License-Expression") == "Apache-2.0" or meta.get("License") == "Apache-2.0"


def _section_names(path):
    """Section names of an ELF64 little-endian file, read from its section header table."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    return [data[strtab + h[0]:data.index(b"\0", strtab + h[0])].decode() for h in headers]


@pytest.mark.skipif(sys.platform == "win32", reason="KVM only: ELF extensions")
def test_files_extensions_carry_no_debug_info():
    extensions = [f for f in _extensions() if f.suffix == ".so"]
    assert extensions
    for f in extensions:
        sections = _section_names(DIST.locate_file(f))
        assert ".text" in sections
        debug = [s for s in sections if s.startswith((".debug", ".zdebug"))]
        assert not debug, f"{f} carries debug info: {debug}"


def test_the_installed_package_finds_its_sdk():
    from whpfast import guestbuild, guests
    sdk = guestbuild.sdk_dir()
    assert sdk.name == "sdk" and sdk.parent.name == "whpfast", sdk
    assert (sdk / "whpfast_guest.h").is_file()
    assert os.path.isfile(guests.testkit)


# -- types -------------------------------------------------------------------------------------

def _public_callables():
    import whpfast
    for name in whpfast.__all__:
        obj = getattr(whpfast, name)
        if inspect.isfunction(obj):
            yield f"whpfast.{name}", obj
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr not in ("__init__", "__enter__", "__exit__"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member) and member.__module__.startswith("whpfast"):
                    yield f"whpfast.{name}.{attr}", member


def test_public_api_is_annotated():
    seen = []
    for where, fn in _public_callables():
        seen.append(where)
        sig = inspect.signature(fn)
        missing = [p for p in sig.parameters.values()
                   if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
        assert not missing, f"{where}: parameters {[p.name for p in missing]} are not annotated"
        assert sig.return_annotation is not inspect.Signature.empty, f"{where}: no return annotation"
    for expected in ("whpfast.Sandbox.call", "whpfast.Sandbox.restore", "whpfast.Snapshot.save",
                     "whpfast.Snapshot.load", "whpfast.build_guest", "whpfast.hypervisor",
                     "whpfast.GuestFault.__init__"):
        assert expected in seen


USER_PROGRAM = '''
from pathlib import Path
from typing import List, Optional

import whpfast


def use(path: Path) -> List[object]:
    elf: Path = whpfast.build_guest(["shout.c"], path / "shout.elf", extra_flags=["-O3"])
    with whpfast.Sandbox(whpfast.guests.testkit, memory_size=16 << 20,
                         files={"initrd": path / "data.img"}, on_print=print) as sb:
        sb.register("double", lambda x: 2 * x)

        @sb.register("triple")
        def triple(x: int) -> int:
            return 3 * x
        tripled: int = triple(2)                   # the decorator keeps the function's type
        total = sb.call("add", 2, 3, timeout=1.5)
        exports: dict[str, str] = sb.exports
        snap: whpfast.Snapshot = sb.snapshot()
        sb.restore(snap)
        stats: Optional[whpfast.RestoreStats] = sb.last_restore
        saved: str = snap.save(path / "warm.snap")
        why: Optional[str] = sb.poisoned
        sb.cancel()
    with whpfast.Sandbox.from_snapshot(whpfast.Snapshot.load(saved)) as fresh:
        fresh.close()
    try:
        name: str = whpfast.hypervisor()
    except whpfast.HypervisorUnavailable as e:
        name = str(e)
    fault = whpfast.GuestFault("x", kind="pagefault", vector=14)
    vector: Optional[int] = fault.vector
    version: str = whpfast.__version__
    with whpfast.PythonSandbox(memory_size=64 << 20) as py:
        result: whpfast.PythonResult = py.run("print(1)")
        error: Optional[str] = result.error
    with whpfast.LinuxSandbox(["/bin/true"]) as lx:
        status: Optional[int] = lx.run(eof=True).exit_code
    return [elf, total, exports, stats, why, name, vector, version, fresh.closed, tripled, error, status]
'''


def _mypy(*args, cwd):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_a_users_program_type_checks_strictly(tmp_path):
    """--strict fails on any call into an unannotated function, so this proves the annotations
    reach a user's type checker (py.typed) as well as that they fit real use."""
    (tmp_path / "user.py").write_text(USER_PROGRAM)
    proc = _mypy("mypy", "--strict", "--no-color-output", "--cache-dir", str(tmp_path / "cache"),
                 "user.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and it does check: a wrong type is reported
    (tmp_path / "user.py").write_text(USER_PROGRAM + "\nwhpfast.Sandbox(42)\n")
    proc = _mypy("mypy", "--strict", "--no-color-output", "--cache-dir", str(tmp_path / "cache"),
                 "user.py", cwd=tmp_path)
    assert proc.returncode == 1 and 'Argument 1 to "Sandbox"' in proc.stdout, proc.stdout


def test_extension_stubs_match_the_compiled_modules(tmp_path):
    """mypy's stubtest imports the compiled modules and compares every public name, signature
    and class with the .pyi stubs (a method added to a .pyx without its stub fails here)."""
    allow = tmp_path / "allowlist.txt"
    allow.write_text(
        # Cython's own pickling helpers and doctest dict, not whpfast's API
        "whpfast\\._\\w+\\.(\\w+\\.)?__(reduce|setstate)_cython__\n"
        "whpfast\\._\\w+\\.__test__\n"
        # an __init__ without parameters keeps the type slot's (self, /, *args, **kwargs)
        "whpfast\\._whp\\.WhpSystem\\.__init__\n")
    from whpfast import backend
    modules = ["whpfast._pages", "whpfast._linux", f"whpfast._{backend.NAME}"]
    # (whpfast.backend first: under WHPFAST_WHP_MODULE it is what puts the WHP module built
    # for the tests/whv layer in place as whpfast._whp; `import whpfast` alone loads no backend)
    stubtest = ("import sys, whpfast.backend\nfrom mypy.stubtest import main\n"
                "sys.argv[0] = 'stubtest'\nsys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", stubtest, "--ignore-disjoint-bases",
                           "--ignore-unused-allowlist", "--allowlist", str(allow), *modules],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_whpfast_is_light_and_names_load_when_used():
    """Issue 18 item 5: `import whpfast` imports the errors only (measured: ~10 ms, was ~180 ms
    with numpy, asyncio and both personalities); each public name loads its module on first use,
    and dir()/`from whpfast import *` still list and give them all."""
    import subprocess
    import sys
    probe = ("import sys, whpfast\n"
             "heavy = sorted(m for m in ('numpy', 'asyncio', 'whpfast.machine', 'whpfast.pool',\n"
             "               'whpfast.linux.process', 'whpfast._kvm', 'whpfast._whp') if m in sys.modules)\n"
             "assert not heavy, heavy\n"
             "assert set(whpfast.__all__) <= set(dir(whpfast))\n"
             "from whpfast import *\n"
             "assert PythonSandbox.__name__ == 'PythonSandbox' and 'whpfast.python.sandbox' in sys.modules\n"
             "assert whpfast.Pool is whpfast.pool.Pool and whpfast.guests.__name__ == 'whpfast.guests'\n"
             "try:\n    whpfast.no_such_name\nexcept AttributeError as e:\n    assert 'no_such_name' in str(e)\n"
             "else:\n    raise SystemExit('no AttributeError')\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
