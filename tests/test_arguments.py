"""Issue 17 item 10: one validation of the arguments every sandbox kind takes. A value of the
wrong type is a TypeError, the right type out of range a ConfigError (also a ValueError), the
same for Sandbox, LinuxSandbox and PythonSandbox."""

import sys

import pytest

import whpfast
from conftest import build_c

pytestmark = [pytest.mark.hypervisor,
              pytest.mark.skipif(sys.platform != "linux", reason="Linux host only: the vDSO clock helper")]


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("args") / "sum", "sum.c", "-static")


@pytest.fixture(scope="module")
def kinds(program):
    return {"sdk": lambda **kw: whpfast.Sandbox(whpfast.guests.testkit, **kw),
            "linux": lambda **kw: whpfast.LinuxSandbox([program], **kw),
            "python": lambda **kw: whpfast.PythonSandbox(**kw)}


@pytest.mark.parametrize("kind", ["sdk", "linux", "python"])
def test_memory_size_of_the_wrong_type_or_range(kinds, kind):
    make = kinds[kind]
    for wrong in ("512M", 512.0, True, None):
        with pytest.raises(TypeError, match="memory_size must be an int number of bytes"):
            make(memory_size=wrong)
    for out_of_range in (-4096, 0, 1 << 50, (64 << 20) + 1):
        with pytest.raises(whpfast.ConfigError, match="memory_size must be a multiple of"):
            make(memory_size=out_of_range)


@pytest.mark.parametrize("kind", ["linux", "python"])
def test_read_that_is_not_a_policy_is_a_type_error(kinds, kind):
    with pytest.raises(TypeError, match="read must be a host path, a list of host paths"):
        kinds[kind](read=123)
    with pytest.raises(whpfast.ReadPolicyError, match="does not exist"):
        kinds[kind](read=["/no/such/host/path"])


def test_linux_sizes(program):
    with pytest.raises(whpfast.ConfigError, match="stack_size must be a multiple of 4 KiB"):
        whpfast.LinuxSandbox([program], stack_size=4097)
    with pytest.raises(TypeError, match="tmp_size must be an int"):
        whpfast.LinuxSandbox([program], tmp_size="64M")


def test_fresh_must_be_a_bool():
    with whpfast.PythonSandbox(memory_size=64 << 20) as sb:
        for op in (sb.run, sb.eval):
            with pytest.raises(TypeError, match="fresh must be True or False, not str 'yes'"):
                op("1", fresh="yes")
        assert sb.eval("1 + 1", fresh=False) == 2
