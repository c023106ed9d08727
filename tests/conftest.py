"""Shared fixtures. Hypervisor tests need a usable hypervisor; they skip only when there truly is
none, and the session then says so loudly. When /dev/kvm *is* usable, any skipped test fails the
run: on the development and CI machines nothing hypervisor-related may skip."""

import os
import subprocess
from pathlib import Path

import pytest

import whpfast


def _hypervisor_problem():
    try:
        whpfast.hypervisor()
        return None
    except whpfast.HypervisorUnavailable as e:
        return str(e)


HYPERVISOR_PROBLEM = _hypervisor_problem()

# tests/whv holds the WHv* layer's own tests: they run with the WHP backend only.
collect_ignore = [] if whpfast.backend.NAME == "whp" else ["whv"]


def pytest_report_header(config):
    if HYPERVISOR_PROBLEM:
        return f"!!! NO HYPERVISOR: {HYPERVISOR_PROBLEM} -- hypervisor tests will be SKIPPED !!!"
    return f"hypervisor: {whpfast.hypervisor()}"


def pytest_collection_modifyitems(config, items):
    if HYPERVISOR_PROBLEM:
        skip = pytest.mark.skip(reason=f"no hypervisor: {HYPERVISOR_PROBLEM}")
        for item in items:
            if "hypervisor" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "hypervisor: needs a usable hypervisor (KVM or WHP)")


def _unexpected_skips(reporter):
    """Skipped tests, less those that only apply to the other backend ("KVM only" / "WHP only")."""
    if reporter is None:
        return 0
    other = "WHP only" if whpfast.backend.NAME == "kvm" else "KVM only"
    return sum(1 for report in reporter.stats.get("skipped", [])
               if other not in str(getattr(report, "longrepr", "")))


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = _unexpected_skips(reporter)
    if HYPERVISOR_PROBLEM:
        if reporter:
            reporter.write_sep("!", f"HYPERVISOR TESTS SKIPPED: {HYPERVISOR_PROBLEM}", red=True)
    elif skipped and exitstatus == 0 and os.path.exists("/dev/kvm"):
        if reporter:
            reporter.write_sep("!", f"{skipped} test(s) skipped although the hypervisor is usable", red=True)
        session.exitstatus = 1


@pytest.fixture
def testkit():
    return whpfast.guests.testkit


@pytest.fixture
def sandbox(testkit):
    with whpfast.Sandbox(testkit, memory_size=16 << 20) as sb:
        yield sb


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.img"
    path.write_bytes(bytes((i * 7 + 3) & 0xFF for i in range(10000)))
    return path



@pytest.fixture(scope="module")
def py_box():
    """A Python sandbox with json imported, booted once per module (the pool and Ray tests)."""
    with whpfast.PythonSandbox(setup="import json") as box:
        yield box


@pytest.fixture(scope="module")
def py_snap(py_box, tmp_path_factory):
    """py_box's warm snapshot saved to a file; its path."""
    return py_box.save(tmp_path_factory.mktemp("snap") / "py.snap")


LINUX_PROGRAMS = Path(__file__).parent / "linux"


def build_c(out, source, *flags):
    """Compiles a C test program with gcc -O1 into out; returns its path as a str. source is the
    name of a file in tests/linux/, or C text (written beside out). A compiler error fails the
    test with gcc's own message."""
    out = Path(out)
    if "\n" in source:
        path = out.with_suffix(".c")
        path.write_text(source)
    else:
        path = LINUX_PROGRAMS / source
    done = subprocess.run(["gcc", "-O1", *flags, "-o", str(out), str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"gcc could not build {path}:\n{done.stderr}", pytrace=False)
    return str(out)
