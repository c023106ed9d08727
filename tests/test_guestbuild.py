"""Users build their own guests from C with the SDK and call them; guests call back into Python."""

import subprocess
import sys

import pytest

import whpfast

GUEST = r'''
#include "whpfast_guest.h"

static int64_t counter;

WF_EXPORT(greet, "s", 's') {
    static char buf[128];
    const char *name = args[0].ptr;
    size_t n = 0;
    const char *prefix = "hi ";
    for (const char *p = prefix; *p; p++) buf[n++] = *p;
    for (uint32_t i = 0; i < args[0].len && n < sizeof buf - 1; i++) buf[n++] = name[i];
    buf[n] = 0;
    return wf_ok(ret, wf_str(buf));
}

WF_EXPORT(bump, "i", 'i') {
    counter += args[0].i;
    return wf_ok(ret, wf_int(counter));
}

WF_EXPORT(scaled, "f", 'f') {
    struct wf_value arg = wf_float(args[0].f), result;
    if (wf_host_call("scale", "f", &arg, &result) != 0)
        return wf_error(ret, (const char *)result.ptr);
    return wf_ok(ret, wf_float(result.f * 2.0));
}

WF_EXPORT(die, "", 'n') {
    wf_abort("the guest gave up");
}
'''


@pytest.fixture(scope="module")
def user_guest(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guest")
    src = tmp / "user.c"
    src.write_text(GUEST)
    return whpfast.build_guest([src], tmp / "user.elf")


@pytest.mark.hypervisor
def test_user_guest(user_guest):
    with whpfast.Sandbox(user_guest) as sb:
        sb.register("scale", lambda x: x * 10)
        assert sb.call("greet", "bob") == "hi bob"
        assert sb.call("bump", 5) == 5
        assert sb.call("bump", 5) == 10        # guest state persists between calls
        assert sb.call("scaled", 1.5) == 30.0
        with pytest.raises(whpfast.GuestAbort, match="the guest gave up"):
            sb.call("die")
        assert sb.poisoned is None             # an abort is the guest's own choice
        assert sb.call("bump", 1) == 11


def test_compile_error_is_reported(tmp_path):
    src = tmp_path / "bad.c"
    src.write_text("this is not C;\n")
    with pytest.raises(whpfast.GuestBuildError) as info:
        whpfast.build_guest([src], tmp_path / "bad.elf")
    assert "bad.c" in str(info.value)
    assert "error" in str(info.value)


@pytest.mark.hypervisor
def test_command_line(tmp_path):
    src = tmp_path / "cli.c"
    src.write_text(GUEST)
    out = tmp_path / "cli.elf"
    # cwd: outside the source checkout, so `-m whpfast` finds the installed package
    subprocess.run([sys.executable, "-m", "whpfast", "build-guest", str(src), "-o", str(out)],
                   check=True, cwd=tmp_path)
    with whpfast.Sandbox(out) as sb:
        assert sb.call("bump", 3) == 3
