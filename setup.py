"""Builds the hypervisor backend extension for this platform, ships the guest SDK inside the
package (whpfast/sdk), builds the testkit guest with it (whpfast/guests/testkit.elf) and the Linux
personality's vDSO (whpfast/linux/vdso/linux-vdso.so.1, with its host helper)."""

import importlib.util
import shutil
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load(name, path):
    # Loaded from its file: the package itself cannot be imported before its extension is built.
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _guestbuild():
    return _load("_whpfast_guestbuild", "whpfast/guestbuild.py")


class build_py_with_guests(build_py):
    def run(self):
        # build/lib is reused between builds: files an older version put there (since removed or
        # excluded) would end up in this wheel. Start from an empty package directory.
        shutil.rmtree(Path(self.build_lib) / "whpfast", ignore_errors=True)
        super().run()
        package = Path(self.build_lib) / "whpfast"
        sdk = package / "sdk"
        shutil.rmtree(sdk, ignore_errors=True)
        # compat/ is for building the WHP backend off Windows, not for guests
        shutil.copytree(ROOT / "include", sdk, ignore=shutil.ignore_patterns("compat"))
        guests = package / "guests"
        guests.mkdir(parents=True, exist_ok=True)
        _guestbuild().build_guest([ROOT / "whpfast" / "guests" / "testkit.c"], guests / "testkit.elf",
                                  sdk_dir=sdk)
        _load("_whpfast_vdso", "whpfast/linux/vdso.py").build(package / "linux" / "vdso")


# No debug info in the shipped extensions (Python's own CFLAGS carry -g; -g0 after it wins):
# it tripled their size and nobody debugs an installed wheel. MSVC adds none by default.
no_debug = [] if sys.platform == "win32" else ["-g0"]
extensions = [Extension("whpfast._pages", ["whpfast/_pages.pyx"], extra_compile_args=no_debug),
              Extension("whpfast._linux", ["whpfast/_linux.pyx"], extra_compile_args=no_debug)]
if sys.platform == "win32":
    extensions.append(Extension("whpfast._whp", ["whpfast/_whp.pyx"], libraries=["WinHvPlatform"]))
else:
    extensions.append(Extension("whpfast._kvm", ["whpfast/_kvm.pyx"], extra_compile_args=no_debug))

setup(
    ext_modules=cythonize(extensions, language_level=3,
                          compiler_directives={"embedsignature": True}),
    cmdclass={"build_py": build_py_with_guests},
)
