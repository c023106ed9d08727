"""The host's copy of the ABI matches include/whpfast_abi.h, values round-trip through the encoder,
and the hand-assembled CPL0 stubs are the instructions their comments claim."""

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from whpfast import abi, machine
from whpfast.guestbuild import sdk_dir

HEADER = Path(sdk_dir()) / "whpfast_abi.h"


def header_defines():
    out = {}
    for name, value in re.findall(r"^#define\s+(WF_\w+)\s+(0x[0-9A-Fa-f]+|\d+|'.')", HEADER.read_text(), re.M):
        out[name] = ord(value[1]) if value.startswith("'") else int(value, 0)
    return out


def test_constants_match_header():
    d = header_defines()
    pairs = {
        "WF_ABI_VERSION": abi.ABI_VERSION, "WF_PAGE_SIZE": abi.PAGE, "WF_INFO_ADDR": abi.INFO_ADDR, "WF_IMAGE_BASE": abi.IMAGE_BASE,
        "WF_PORT_RETURN": abi.PORT_RETURN, "WF_PORT_HOSTCALL": abi.PORT_HOSTCALL,
        "WF_PORT_PRINT": abi.PORT_PRINT, "WF_PORT_ABORT": abi.PORT_ABORT, "WF_PORT_FAULT": abi.PORT_FAULT,
        "WF_MAGIC_CALL": abi.MAGIC_CALL, "WF_MAGIC_RESULT": abi.MAGIC_RESULT,
        "WF_MAGIC_HOSTCALL": abi.MAGIC_HOSTCALL, "WF_MAGIC_REPLY": abi.MAGIC_REPLY,
        "WF_TAG_NONE": abi.TAG_NONE, "WF_TAG_BOOL": abi.TAG_BOOL, "WF_TAG_INT": abi.TAG_INT,
        "WF_TAG_FLOAT": abi.TAG_FLOAT, "WF_TAG_BYTES": abi.TAG_BYTES, "WF_TAG_STR": abi.TAG_STR,
        "WF_MAX_ARGS": abi.MAX_ARGS, "WF_MAX_FILES": abi.MAX_FILES, "WF_FILE_NAME_MAX": abi.FILE_NAME_MAX,
        "WF_INFO_MAGIC": abi.INFO_MAGIC, "WF_STATUS_OK": abi.STATUS_OK, "WF_STATUS_ERROR": abi.STATUS_ERROR,
    }
    for name, value in pairs.items():
        assert d[name] == value, name
    for letter, (tag, _) in abi.SIGNATURE.items():
        assert letter in {chr(v) for k, v in d.items() if k.startswith("WF_SIG_")}


def test_info_layout_matches_c_struct(tmp_path):
    """Compile a probe that prints offsetof/sizeof of struct wf_info and compare."""
    probe = tmp_path / "probe.c"
    probe.write_text(f'''#include <stdio.h>
#include <stddef.h>
#include "{HEADER}"
int main(void) {{
    printf("%zu %zu %zu %zu %zu\\n", offsetof(struct wf_info, input_addr), offsetof(struct wf_info, heap_size),
           offsetof(struct wf_info, files), sizeof(struct wf_file_entry), sizeof(struct wf_export));
    return 0;
}}''')
    subprocess.run(["cc", "-o", tmp_path / "probe", probe], check=True)
    got = [int(x) for x in subprocess.run([tmp_path / "probe"], capture_output=True, text=True).stdout.split()]
    assert got == [16, abi.INFO_HEADER.size - 8, abi.INFO_HEADER.size, abi.FILE_ENTRY.size, 32]


@pytest.mark.parametrize("letter, value", [
    ("i", 0), ("i", -1), ("i", 2**63 - 1), ("f", 1.5), ("f", float("inf")), ("?", True), ("?", False),
    ("n", None), ("b", b""), ("b", b"\x00" * 9), ("s", ""), ("s", "h\u00e9llo"), ("s", "x" * 8)])
def test_value_round_trip(letter, value):
    buf = bytearray(b"\xaa" * 128)
    end = abi.encode_value(buf, 8, 128, letter, value, "v")
    assert (end - 8) % 8 == 0
    got_letter, got, nxt = abi.decode_value(buf, 8, end, "v")
    assert (got_letter, got, nxt) == (letter, value, end)
    if letter == "s":
        n = len(value.encode())
        assert buf[16 + n] == 0               # C code may treat it as a C string


def test_encoder_rejects_overflow_and_wrong_types():
    buf = bytearray(64)
    with pytest.raises(ValueError, match="io_buffer_size"):
        abi.encode_value(buf, 0, 64, "b", b"x" * 100, "arg")
    with pytest.raises(TypeError):
        abi.encode_value(buf, 0, 64, "i", 1.0, "arg")
    with pytest.raises(OverflowError):
        abi.encode_value(buf, 0, 64, "i", -(2**63) - 1, "arg")


@pytest.mark.parametrize("mutate, match", [
    (lambda b: struct.pack_into("<I", b, 0, 99), "unknown value tag"),
    (lambda b: struct.pack_into("<I", b, 4, 1000), "past the message end"),
    (lambda b: struct.pack_into("<II", b, 0, abi.TAG_INT, 4), "must be 8 bytes"),
    (lambda b: struct.pack_into("<IIB", b, 0, abi.TAG_BOOL, 1, 7), "not 0 or 1"),
    (lambda b: struct.pack_into("<II2s", b, 0, abi.TAG_STR, 2, b"\xff\xfe"), "UTF-8"),
])
def test_decoder_rejects_malformed_values(mutate, match):
    buf = bytearray(32)
    mutate(buf)
    with pytest.raises(abi.MessageError, match=match):
        abi.decode_value(buf, 0, 32, "v")


def test_header_checks():
    buf = bytearray(64)
    struct.pack_into("<IIII", buf, 0, abi.MAGIC_RESULT, 24, 0, 0)
    assert abi.read_header(buf, 0, 64, 24, abi.MAGIC_RESULT, "r")[2] == 24
    with pytest.raises(abi.MessageError, match="magic"):
        abi.read_header(buf, 0, 64, 24, abi.MAGIC_REPLY, "r")
    with pytest.raises(abi.MessageError, match="port said"):
        abi.read_header(buf, 0, 64, 32, abi.MAGIC_RESULT, "r")
    with pytest.raises(abi.MessageError, match="outside"):
        abi.read_header(buf, 0, 64, 65, abi.MAGIC_RESULT, "r")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="binutils' objdump is not installed")
def test_exception_stubs_disassemble_as_intended(tmp_path):
    code = machine._stubs()
    (tmp_path / "stubs.bin").write_bytes(code)
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64",
                          f"--adjust-vma={machine.STUBS_ADDR:#x}", str(tmp_path / "stubs.bin")],
                         capture_output=True, text=True, check=True).stdout
    common = machine.STUBS_ADDR + 32 * machine.STUB_SIZE
    # #DE pushes a fake error code, #PF does not (the CPU pushes one)
    assert re.search(rf"{machine.STUBS_ADDR:x}:\s+6a 00\s+push\s+\$0x0", out)
    pf = machine.STUBS_ADDR + 14 * machine.STUB_SIZE
    assert re.search(rf"{pf:x}:\s+6a 0e\s+push\s+\$0xe\n\s+{pf + 2:x}:.*jmp\s+0x{common:x}", out)
    tail = out[out.index(f"{common:x}:"):]
    assert tail.count("pop    %rax") == 7
    assert f"movabs %rax,{machine.FAULT_RECORD_ADDR:#x}" in tail
    assert "mov    %cr2,%rax" in tail
    assert f"out    %al,${abi.PORT_FAULT:#x}" in tail


def test_io_bitmap_allows_exactly_the_guest_ports():
    _, tss = machine._gdt_and_tss()
    bitmap = tss[machine.TSS_SIZE:machine.TSS_SIZE + machine.IO_BITMAP_BYTES]
    allowed = {p for p in range(256) if not bitmap[p // 8] & (1 << (p % 8))}
    assert allowed == set(range(0xE0, 0xF0))
    assert abi.PORT_FAULT not in allowed
    assert tss[-1] == 0xFF
