"""Builds the WHP backend (whpfast/_whp.pyx) for Linux against the KVM-backed WHv* layer.

    python tests/whv/build_whp.py [OUTDIR]        (default build/whv; runs build.sh first)

Prints the path of the extension. Run the test suite on it with
    WHPFAST_BACKEND=whp WHPFAST_WHP_MODULE=<that path> pytest
The same -Werror flags as the Windows cross-build: a call that does not match mingw's
winhvplatform.h fails here too."""

import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FLAGS = ["-O2", "-fPIC", "-Wall", "-Wno-unused-function", "-Werror=implicit-function-declaration",
         "-Werror=incompatible-pointer-types", "-Werror=int-conversion",
         # the layer's own hook (whv_kvm_host_wrote, see _whp.pyx): absent from Windows builds
         "-DWHPFAST_WHV_LAYER"]


def build(out):
    out = Path(out).resolve()
    subprocess.run(["bash", str(HERE / "build.sh"), str(out)], check=True)
    c_file = out / "_whp.c"
    # From the repository root, so Cython sees whpfast/ as the package: module whpfast._whp.
    subprocess.run([sys.executable, "-m", "cython", "-3", "-o", str(c_file), "whpfast/_whp.pyx"],
                   check=True, cwd=ROOT)
    module = out / ("_whp" + sysconfig.get_config_var("EXT_SUFFIX"))
    cc = sysconfig.get_config_var("CC").split()[0]
    subprocess.run([cc, *FLAGS, "-shared", "-I", str(ROOT / "include" / "compat"),
                    "-I", str(out / "winhv-include"), "-I", sysconfig.get_paths()["include"],
                    str(c_file), "-o", str(module), "-L", str(out), "-lwhv_kvm",
                    f"-Wl,-rpath,{out}"], check=True)
    return module


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else ROOT / "build" / "whv"))
