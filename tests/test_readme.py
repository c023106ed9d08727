"""README.md and the documentation pages (docs/**/*.md) as a newcomer reads them: every code block
runs as written, in document order, in one empty directory per page (python blocks each in a fresh
interpreter, C blocks saved under the name their first line gives, shell blocks through bash), every
whpfast name they mention exists, and the documentation site builds with `mkdocs build --strict`
(broken links, anchors and API references fail)."""

import builtins
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import whpfast
import whpfast.ray  # noqa: F401  (the docs document it: `whpfast.ray.RayPool` must exist)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README] + sorted(DOCS.rglob("*.md"))
# The pages that document the API as a user calls it: the class names they use bare are exported.
API_PAGES = [README] + [DOCS / name for name in (
    "guides/sdk.md", "guides/snapshots.md", "limits.md", "trust-model.md")]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
# Shell blocks that set up a machine (create venvs, install, run CI scripts) are what .ci/run does
# already, and long runs (benchmarks, fuzzing: bench/) have their own commands; every other shell
# block must be cheap and runs here.
SETUP = re.compile(r"pip install|\.ci/|python3 -m venv|bench/")
C_NAME = re.compile(r"^/\* (\w+\.c) \*/$")


def rel(page):
    return page.relative_to(ROOT).as_posix()


def blocks(page=README):
    text = page.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def all_text(pages=PAGES):
    return "\n".join(page.read_text() for page in pages)


def test_readme_has_the_blocks_this_test_runs():
    """Guards against the extraction silently finding nothing (a changed fence style, a moved
    file): the README and the pages have at least these blocks today."""
    assert len(PAGES) >= 14, [rel(p) for p in PAGES]
    kinds = [lang for lang, _, _ in blocks(README)]
    assert kinds.count("python") >= 4                  # a quickstart per personality
    assert kinds.count("sh") >= 2                      # the fresh-machine commands, the wheel
    docs = [(lang, code) for page in PAGES[1:] for lang, code, _ in blocks(page)]
    assert [lang for lang, _ in docs].count("python") >= 7
    assert [lang for lang, _ in docs].count("c") >= 1
    assert sum(1 for lang, code in docs if lang == "sh" and not SETUP.search(code)) >= 1
    for page in PAGES:
        langs = {lang for lang, _, _ in blocks(page)}
        assert langs <= {"python", "c", "sh"}, f"{rel(page)}: a block in a language this test cannot run: {langs}"


@pytest.mark.hypervisor
@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_code_block_runs_as_written(page, tmp_path):
    env = dict(os.environ)
    # `whpfast` and `python` are the ones of the interpreter running the tests (the venv's).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    ran = {"python": 0, "c": 0, "sh": 0}
    for n, (lang, code, line) in enumerate(blocks(page)):
        where = f"{rel(page)} line {line} ({lang} block)"
        if lang == "c":
            first = code.splitlines()[0]
            name = C_NAME.match(first)
            assert name, f"{where}: a C block must start with /* name.c */ saying what to save it as"
            (tmp_path / name.group(1)).write_text(code)
        elif lang == "python":
            if "LinuxSandbox" in code and whpfast.backend.NAME != "kvm":
                continue            # LinuxSandbox runs on KVM only for now (test_linux_backend)
            script = tmp_path / f"doc_block_{n}.py"
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
    if page == README:
        assert ran["python"] >= (4 if whpfast.backend.NAME == "kvm" else 3), ran
    if page == DOCS / "guides" / "sdk.md":
        assert ran["python"] >= 2 and ran["c"] >= 1 and ran["sh"] >= 1, ran
        assert (tmp_path / "shout.elf").is_file()      # the shell block built the guest


def test_the_docs_build_strict(tmp_path):
    """`mkdocs build --strict` (mkdocs.yml: every warning fails it, broken links and anchors are
    warnings, and mkdocstrings fails on an API reference it cannot resolve)."""
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is not installed: pip install '.[test]' brings it"
    site = tmp_path / "site"
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    built = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    pages = {rel(p)[len("docs/"):].removesuffix("index.md").removesuffix(".md") for p in PAGES[1:]}
    assert {(p + "/" if p else "") + "index.html" for p in pages} <= built, built
    assert "whpfast.sandbox.Sandbox" in (site / "reference" / "index.html").read_text()

def slug(heading):
    """The anchor MkDocs (its toc extension) and GitHub give a heading."""
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def test_the_readme_links_to_pages_and_anchors_that_exist():
    """mkdocs checks the links inside docs/; the README is outside it, so its links are checked
    here: a relative link names a file that exists, and its #anchor a heading of that file."""
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [link for link in links if not re.match(r"\w+:", link)]
    assert len(local) >= 10, local
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else README
        assert target.exists(), f"README.md links to {link}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", FENCE.sub("", target.read_text()), re.M)
            assert anchor in {slug(h) for h in headings}, f"README.md links to {link}: no such heading"


def test_every_whpfast_name_in_the_readme_exists():
    text = all_text()
    dotted = {m.rstrip(".") for m in re.findall(r"\bwhpfast\.([A-Za-z_][\w.]*)", text)}
    assert len(dotted) >= 5
    for name in sorted(dotted):
        obj = whpfast
        for part in name.split("."):
            assert hasattr(obj, part), f"the docs mention whpfast.{name}, which does not exist"
            obj = getattr(obj, part)
    # Class names the API sections use bare (`Snapshot.save`, `GuestFault`, ...) are exported.
    api = all_text(API_PAGES)
    bare = set(re.findall(r"`([A-Z][a-z]\w*)", api)) - set(dir(builtins))
    assert {"Snapshot", "GuestFault", "SnapshotError", "HypervisorUnavailable"} <= bare
    for name in sorted(bare):
        assert name in whpfast.__all__, f"the docs use `{name}`, which whpfast does not export"
    for cls, attr in re.findall(r"\b(Sandbox|Snapshot)\.(\w+)", text):
        assert hasattr(getattr(whpfast, cls), attr), f"the docs mention {cls}.{attr}"


@pytest.mark.hypervisor
def test_every_sandbox_attribute_in_the_readme_exists(testkit):
    names = set(re.findall(r"\bsb\.(\w+)", all_text()))
    assert {"call", "register", "restore", "snapshot", "exports", "last_restore"} <= names
    # `sb` names a Sandbox, or in "Python sandboxes" a PythonSandbox
    with whpfast.Sandbox(testkit) as sb:
        missing = [n for n in sorted(names) if not hasattr(sb, n) and not hasattr(whpfast.PythonSandbox, n)]
    assert not missing, f"the docs mention sb.{missing}, which neither Sandbox nor PythonSandbox has"


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
