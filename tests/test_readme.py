"""README.md as a newcomer reads it: every code block runs as written, in document order, in one
empty directory (python blocks each in a fresh interpreter, C blocks saved under the name their
first line gives, shell blocks through bash), and every whpfast name it mentions exists."""

import builtins
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import whpfast
import whpfast.ray  # noqa: F401  (the README documents it: `whpfast.ray.RayPool` must exist)

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
# Shell blocks that set up a machine (create venvs, install, run CI scripts) are what .ci/run does
# already, and long runs (benchmarks, fuzzing: bench/) have their own commands; every other shell
# block must be cheap and runs here.
SETUP = re.compile(r"pip install|\.ci/|python3 -m venv|bench/")
C_NAME = re.compile(r"^/\* (\w+\.c) \*/$")


def blocks():
    text = README.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def sections_before(heading):
    text = README.read_text()
    return text[:text.index(heading)]


def test_readme_has_the_blocks_this_test_runs():
    """Guards against the extraction silently finding nothing (a changed fence style, a moved
    file): the README has at least these blocks today."""
    kinds = [lang for lang, _, _ in blocks()]
    assert kinds.count("python") >= 3
    assert kinds.count("c") >= 1
    assert sum(1 for lang, code, _ in blocks() if lang == "sh" and not SETUP.search(code)) >= 1
    assert set(kinds) <= {"python", "c", "sh"}, f"a block in a language this test cannot run: {kinds}"


@pytest.mark.hypervisor
def test_every_code_block_runs_as_written(tmp_path):
    env = dict(os.environ)
    # `whpfast` and `python` are the ones of the interpreter running the tests (the venv's).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    ran = {"python": 0, "c": 0, "sh": 0}
    for n, (lang, code, line) in enumerate(blocks()):
        where = f"README.md line {line} ({lang} block)"
        if lang == "c":
            first = code.splitlines()[0]
            name = C_NAME.match(first)
            assert name, f"{where}: a C block must start with /* name.c */ saying what to save it as"
            (tmp_path / name.group(1)).write_text(code)
        elif lang == "python":
            if "LinuxSandbox" in code and whpfast.backend.NAME != "kvm":
                continue            # LinuxSandbox runs on KVM only for now (test_linux_backend)
            script = tmp_path / f"readme_block_{n}.py"
            script.write_text(code)
            proc = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, f"{where} failed:\n{code}\n--- output ---\n{proc.stdout}{proc.stderr}"
        elif lang == "sh":
            if SETUP.search(code):
                continue
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, f"{where} failed:\n{code}\n--- output ---\n{proc.stdout}{proc.stderr}"
        ran[lang] += 1
    assert ran["python"] >= 3 and ran["c"] >= 1 and ran["sh"] >= 1, ran
    assert (tmp_path / "shout.elf").is_file()      # the shell block built the guest


def test_every_whpfast_name_in_the_readme_exists():
    text = README.read_text()
    dotted = {m.rstrip(".") for m in re.findall(r"\bwhpfast\.([A-Za-z_][\w.]*)", text)}
    assert len(dotted) >= 5
    for name in sorted(dotted):
        obj = whpfast
        for part in name.split("."):
            assert hasattr(obj, part), f"README mentions whpfast.{name}, which does not exist"
            obj = getattr(obj, part)
    # Class names the API sections use bare (`Snapshot.save`, `GuestFault`, ...) are exported.
    api = sections_before("## How it works")
    bare = set(re.findall(r"`([A-Z][a-z]\w*)", api)) - set(dir(builtins))
    assert {"Snapshot", "GuestFault", "SnapshotError", "HypervisorUnavailable"} <= bare
    for name in sorted(bare):
        assert name in whpfast.__all__, f"README uses `{name}`, which whpfast does not export"
    for cls, attr in re.findall(r"\b(Sandbox|Snapshot)\.(\w+)", text):
        assert hasattr(getattr(whpfast, cls), attr), f"README mentions {cls}.{attr}"


@pytest.mark.hypervisor
def test_every_sandbox_attribute_in_the_readme_exists(testkit):
    names = set(re.findall(r"\bsb\.(\w+)", README.read_text()))
    assert {"call", "register", "restore", "snapshot", "exports", "last_restore"} <= names
    # `sb` names a Sandbox, or in "Python sandboxes" a PythonSandbox
    with whpfast.Sandbox(testkit) as sb:
        missing = [n for n in sorted(names) if not hasattr(sb, n) and not hasattr(whpfast.PythonSandbox, n)]
    assert not missing, f"README mentions sb.{missing}, which neither Sandbox nor PythonSandbox has"


# -- the test command and its system packages (issue 17: CI cannot pass on what a user lacks) --

def readme_test_command():
    text = README.read_text()
    lines = [line for line in text.splitlines() if line.rstrip().endswith("&& pytest")]
    assert len(lines) == 1, lines
    return lines[0].strip()


def system_packages():
    listing = (Path(__file__).parent / "system-packages.txt").read_text()
    return [word for line in listing.splitlines() for word in line.split("#")[0].split()]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (README.parent / ".ci" / "run").read_text()
    command = readme_test_command()
    assert command.startswith("sh tests/system-packages.sh && ")
    assert f"( {command} ) 2>&1" in ci


def test_readme_names_every_system_package_the_tests_need():
    text = " ".join(README.read_text().split())
    packages = system_packages()
    assert {"gcc", "busybox-static|busybox", "python3-pandas"} <= set(packages)
    assert "`" + " ".join(packages) + "`" in text
