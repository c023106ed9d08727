"""The command line as a new user meets it (`whpfast ...` and `python -m whpfast ...`), the import
from a source checkout, and the guest build refusing what the loader would refuse."""

import importlib.metadata
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import whpfast

REPO = Path(__file__).resolve().parent.parent
SCRIPT = shutil.which("whpfast", path=os.path.dirname(sys.executable))


def run(args, **kw):
    kw.setdefault("cwd", "/")      # never the source checkout: the installed package runs
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)


def test_console_script_is_installed_next_to_python():
    assert SCRIPT, f"no `whpfast` command next to {sys.executable}"


def test_version():
    version = importlib.metadata.version("whpfast")
    assert whpfast.__version__ == version
    for cmd, prog in (([SCRIPT], "whpfast"), ([sys.executable, "-m", "whpfast"], "python -m whpfast")):
        proc = run(cmd + ["--version"])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"{prog} {version}\n"


@pytest.mark.parametrize("how, prog", [("script", "whpfast"), ("module", "python -m whpfast")])
def test_usage_names_the_command_the_user_typed(how, prog):
    base = [SCRIPT] if how == "script" else [sys.executable, "-m", "whpfast"]
    proc = run(base)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"usage: {prog} [-h] [--version] command")
    proc = run(base + ["build-guest", "--help"])
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"usage: {prog} build-guest ")
    proc = run(base + ["demo", "--calls", "0"])
    assert proc.returncode == 2 and "must be a positive whole number" in proc.stderr


@pytest.mark.hypervisor
def test_demo_runs():
    proc = run([SCRIPT, "demo", "--calls", "20"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"hypervisor: {whpfast.backend.NAME}\n")
    assert "restore + call hello()" in proc.stdout and "median" in proc.stdout


def _without_kvm_access(cmd, tmp_path):
    """cmd run where /dev/kvm exists but cannot be opened: as root, in a private mount namespace
    with a mode-000 copy of the device node bound over it and the capabilities that bypass file
    permissions dropped (EACCES, what a user outside the 'kvm' group gets); as another user, in a
    user namespace with an empty /dev (ENOENT)."""
    if os.geteuid() == 0:
        node = tmp_path / "kvm"
        os.mknod(node, 0o600 | stat.S_IFCHR, os.stat("/dev/kvm").st_rdev)
        os.chmod(node, 0)
        caps = "-dac_override,-dac_read_search"
        script = (f'mount --bind "{node}" /dev/kvm && '
                  f'exec setpriv --bounding-set {caps} --inh-caps {caps} "$@"')
        return run(["unshare", "--mount", "sh", "-c", script, "sh", *cmd])
    script = 'mount -t tmpfs none /dev && exec "$@"'
    return run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *cmd])


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="KVM only: needs a /dev/kvm to deny")
def test_demo_without_kvm_access_prints_one_line(tmp_path):
    proc = _without_kvm_access([SCRIPT, "demo"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    if whpfast.backend.NAME == "kvm":
        assert lines[0].startswith("whpfast: cannot open /dev/kvm: ")
        assert ("add this user to the 'kvm' group" in lines[0]) or ("no KVM device" in lines[0])
    else:   # the WHv* layer over KVM reports WHP's own "not available"
        assert lines[0].startswith("whpfast: the Windows Hypervisor Platform is not available")


def test_import_from_a_source_checkout_says_what_to_do(tmp_path):
    # A copy of the sources without compiled extensions, as a fresh clone is.
    shutil.copytree(REPO / "whpfast", tmp_path / "whpfast",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    proc = run([sys.executable, "-c", "import whpfast"], cwd=tmp_path)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: whpfast was imported from ")
    assert "compiled extensions" in last and "pip install ." in last
    assert "circular import" not in proc.stderr


# -- the guest build refuses what the loader would refuse ------------------------------------

def _params(n):
    return f'''/* {n} int parameters, returns the last */
#include "whpfast_guest.h"
WF_EXPORT(last, "{'i' * n}", 'i') {{ return wf_ok(ret, args[{n - 1}]); }}
'''


@pytest.mark.hypervisor
def test_sixteen_parameters_build_and_run(tmp_path):
    src = tmp_path / "p16.c"
    src.write_text(_params(16))
    out = whpfast.build_guest(src, tmp_path / "p16.elf")
    with whpfast.Sandbox(out) as sb:
        assert sb.exports == {"last": "i" * 16 + "->i"}
        assert sb.call("last", *range(100, 116)) == 115


def test_seventeen_parameters_fail_at_build_time(tmp_path):
    src = tmp_path / "p17.c"
    src.write_text(_params(17))
    with pytest.raises(whpfast.GuestBuildError, match=r"WF_EXPORT\(last\): at most 16 parameters"):
        whpfast.build_guest(src, tmp_path / "p17.elf")
    assert not (tmp_path / "p17.elf").exists()


def test_a_guest_without_exports_fails_at_build_time(tmp_path):
    src = tmp_path / "none.c"
    src.write_text('#include "whpfast_guest.h"\nint helper(int x) { return x + 1; }\n')
    out = tmp_path / "none.elf"
    with pytest.raises(whpfast.GuestBuildError, match="exports no functions.*WF_EXPORT"):
        whpfast.build_guest(src, out)
    assert not out.exists()          # nothing a build tool could take for a finished guest
    proc = run([SCRIPT, "build-guest", str(src), "-o", str(out)])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "whpfast would refuse to load it" in proc.stderr and "exports no functions" in proc.stderr


def test_an_unknown_signature_letter_fails_at_build_time(tmp_path):
    src = tmp_path / "letter.c"
    src.write_text('#include "whpfast_guest.h"\n'
                   'WF_EXPORT(odd, "x", \'i\') { return wf_ok(ret, wf_int(0)); }\n')
    with pytest.raises(whpfast.GuestBuildError, match="export 'odd' has invalid parameters 'x'"):
        whpfast.build_guest(src, tmp_path / "letter.elf")
