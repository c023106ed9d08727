"""The backend interface (whpfast/core/hypervisor.py): the loaded backend is checked against it at
import, a module that lacks a name or disagrees on a number is refused by name, its capabilities
are declared (and what they promise is there), both type stubs describe the interface, and the
package never imports whpfast.testing."""

import ast
import subprocess
import sys
import types
from pathlib import Path

import pytest

import whpfast
from whpfast import abi, backend
from whpfast.core import hypervisor

STUBS = Path(whpfast.__file__).parent


def test_the_loaded_backend_implements_the_interface():
    assert hypervisor.check(backend.impl, backend.System.__name__) == backend.capabilities
    assert backend.impl.PAGE == abi.PAGE == backend.PAGE
    for e in hypervisor.Exit:
        assert getattr(backend.impl, f"EXIT_{e.name}") == e


def test_capabilities_say_what_is_there():
    caps = backend.capabilities
    assert caps.file_overlay == hasattr(backend.impl.GuestMemory, "overlay_file")
    assert caps.xsave_area == hasattr(backend.impl.Vcpu, "get_xsave")
    assert caps.api_calls == hasattr(backend.impl.Vcpu, "api_calls")


def fake_backend(**changes):
    """A module with every name of the interface (copied from the loaded backend)."""
    module = types.ModuleType("whpfast._fake")
    for name in (*hypervisor.MODULE_NAMES, backend.System.__name__):
        setattr(module, name, getattr(backend.impl, name))
    for name, value in changes.items():
        if value is None:
            delattr(module, name)
        else:
            setattr(module, name, value)
    return module


def test_a_backend_that_lacks_a_name_is_refused_by_name():
    hypervisor.check(fake_backend(), backend.System.__name__)
    with pytest.raises(ImportError, match=r"whpfast\._fake .*syscall_regs, EXIT_HLT"):
        hypervisor.check(fake_backend(syscall_regs=None, EXIT_HLT=None), backend.System.__name__)
    with pytest.raises(ImportError, match=r"EXIT_IO = 5 \(not 1\)"):
        hypervisor.check(fake_backend(EXIT_IO=5), backend.System.__name__)
    with pytest.raises(ImportError, match=r"PAGE = 8192"):
        hypervisor.check(fake_backend(PAGE=8192), backend.System.__name__)
    with pytest.raises(ImportError, match=r"Vcpu\.resume_warm"):
        hypervisor.check(fake_backend(Vcpu=type("Vcpu", (), {})), backend.System.__name__)


def test_a_capability_is_declared_not_guessed():
    with pytest.raises(ImportError, match=r"CAPABILITIES\['teleport'\] \(unknown\)"):
        hypervisor.check(fake_backend(CAPABILITIES={"teleport": True}), backend.System.__name__)
    plain = type("GuestMemory", (), {"size": 0, "readonly": False, "address": 0,
                                     "close": lambda self: None})
    with pytest.raises(ImportError, match=r"GuestMemory\.overlay_file \(for file_overlay\)"):
        hypervisor.check(fake_backend(GuestMemory=plain, CAPABILITIES={"file_overlay": True}),
                         backend.System.__name__)
    caps = hypervisor.check(fake_backend(GuestMemory=plain, CAPABILITIES={}), backend.System.__name__)
    assert caps == hypervisor.Capabilities()


@pytest.mark.parametrize("stub", ["_kvm.pyi", "_whp.pyi"])
def test_both_stubs_describe_the_interface(stub):
    tree = ast.parse((STUBS / stub).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
    assert set(hypervisor.MODULE_NAMES) - names == set()


def test_the_package_does_not_import_its_testing_module():
    code = ("import sys, pkgutil, importlib, whpfast\n"
            "for m in ('whpfast.sandbox', 'whpfast.snapshot', 'whpfast.pool', 'whpfast.linux',"
            " 'whpfast.linux.process', 'whpfast.python', 'whpfast.python.sandbox', 'whpfast.ray'):\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except ImportError:\n"
            "        pass\n"
            "print('whpfast.testing' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd="/")
    assert out.stdout.strip() == "False"
