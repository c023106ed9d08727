"""The system call table as data (whpfast/linux/syscalls.py, SYSCALLS): one entry a number, each
consistent with its status; the dispatch dicts, the ENOSYS names and the compatibility page all
come from it; the handler modules import without the sandbox (no import cycle)."""

import ast
import errno
import inspect
import pathlib
import subprocess
import sys

import pytest

from whpfast.linux import syscalls
from whpfast.linux.task import Task

ROOT = pathlib.Path(__file__).resolve().parent.parent
HANDLER_MODULES = ("sys_file", "sys_mm", "sys_proc", "sys_time", "sys_signal")


def test_the_compatibility_page_is_the_tables():
    """docs/compatibility.md is what scripts/gen_compatibility.py writes from the table now."""
    page = (ROOT / "docs" / "compatibility.md").read_text()
    assert page == syscalls.compatibility_page(), \
        "docs/compatibility.md is stale: run python scripts/gen_compatibility.py"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_compatibility.py"), "--check"],
                          cwd="/", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_entry_is_consistent_with_its_status():
    names = set()
    for nr, e in syscalls.SYSCALLS.items():
        assert isinstance(e, syscalls.Syscall) and e.status in syscalls.STATUSES, nr
        assert e.name not in names, e.name
        names.add(e.name)
        assert (e.handler is None) == (e.status == "unimplemented"), e.name
        assert (e.value is not None) == (e.status == "constant"), e.name
        assert (e.errno is not None) == (e.status == "refused"), e.name
        if e.status in ("partial", "refused"):
            assert e.note, f"{e.name}: a {e.status} call says how"
        if e.status in ("supported", "partial"):
            assert e.handler.__module__ in {f"whpfast.linux.{m}" for m in HANDLER_MODULES}, e.name
            first = next(iter(inspect.signature(e.handler).parameters))
            assert first == "t", f"{e.name}: a handler takes the Task first"
    assert syscalls.NAMES[0] == "read" and syscalls.NUMBERS["clone3"] == 435
    assert syscalls.NAMES[450] == "set_mempolicy_home_node"


def test_the_dispatch_dicts_are_the_tables():
    table = {nr: e for nr, e in syscalls.SYSCALLS.items()}
    assert set(syscalls.TABLE) == {nr for nr, e in table.items() if e.status != "unimplemented"}
    assert syscalls.CONSTANTS == {nr: e.value for nr, e in table.items() if e.status == "constant"}
    assert all(syscalls.TABLE[nr] is e.handler for nr, e in table.items() if e.handler)


def _task():
    return Task(None, None, None, stack_size=0, memory_size=0, take_input=None, output=None,
                set_segment_base=None, clock_ns=None, sleep=None)


@pytest.mark.parametrize("dispatch", ["dispatch", "py_dispatch"])
def test_refused_constant_and_unimplemented_calls_answer_as_the_table_says(dispatch):
    """(None of these touch the task's parts: a Task without them serves them.) Refusals and
    constants are not counted; an unimplemented call is ENOSYS, counted under its name."""
    dispatch = getattr(syscalls, dispatch)
    t = _task()
    for nr, e in syscalls.SYSCALLS.items():
        if e.status in ("supported", "partial"):
            continue
        result = dispatch(t, nr, (0,) * 6)
        if e.status == "refused":
            assert result == -e.errno, e.name
        elif e.status == "constant":
            assert result == e.value, e.name
        elif e.status == "unimplemented":
            assert result == -errno.ENOSYS and t.unsupported_syscalls[e.name] == 1, e.name
    unimplemented = {e.name for e in syscalls.SYSCALLS.values() if e.status == "unimplemented"}
    assert set(t.unsupported_syscalls) == unimplemented


def _module_imports(path):
    """The whpfast.linux modules a module imports when it is imported (module level only: an
    import inside a function is lazy, the usual way out of a cycle)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_no_import_cycle_and_the_handlers_do_not_import_the_sandbox():
    """whpfast.linux's module-level imports form no cycle, and the table, the Task and the
    handler modules do not reach process.py: the handlers know the Task, not LinuxSandbox."""
    here = ROOT / "whpfast" / "linux"
    graph = {p.stem: _module_imports(p) & {q.stem for q in here.glob("*.py")}
             for p in here.glob("*.py")}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for module in graph:
        assert module not in reach(module), f"import cycle through whpfast/linux/{module}.py"
    for module in HANDLER_MODULES + ("syscalls", "task"):
        assert "process" not in reach(module), module
