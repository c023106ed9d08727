"""The ELF loader rejects every malformed guest with GuestLoadError, before anything is mapped."""

import struct
import subprocess
from pathlib import Path

import pytest

import whpfast
from whpfast import elf, guestbuild
from whpfast.errors import GuestLoadError


@pytest.fixture(scope="module")
def good():
    return Path(whpfast.guests.testkit).read_bytes()


def patched(data, offset, fmt, *values):
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def phdr_offset(data, index):
    phoff = struct.unpack_from("<Q", data, 32)[0]
    return phoff + index * 56


def test_good_image(good):
    image = elf.parse(good, "testkit")
    assert {"add", "echo", "hello", "spin", "fault"} <= set(image.exports)
    assert image.exports["touch"].params == "iii"
    assert all(s.vaddr >= 0x100000 for s in image.segments)
    assert any(s.executable and not s.writable for s in image.segments)


@pytest.mark.parametrize("cut", [0, 10, 63, 64, 100, 200, 1000, 4096, 5000])
def test_truncated(good, cut):
    with pytest.raises(GuestLoadError):
        elf.parse(good[:cut])


@pytest.mark.parametrize("offset, fmt, value, match", [
    (0, "<4s", b"\x7fELG", "bad magic"),
    (4, "<B", 1, "64-bit"),
    (5, "<B", 2, "little-endian"),
    (16, "<H", 3, "executable"),
    (18, "<H", 40, "x86-64"),
    (24, "<Q", 0x50, "entry point"),
    (32, "<Q", 1 << 40, "program header"),
    (54, "<H", 40, "program header"),
    (40, "<Q", 1 << 40, "section header"),
])
def test_bad_header_fields(good, offset, fmt, value, match):
    with pytest.raises(GuestLoadError, match=match):
        elf.parse(patched(good, offset, fmt, value))


def test_segment_outside_image_area(good):
    off = phdr_offset(good, 0)
    with pytest.raises(GuestLoadError, match="outside the image area"):
        elf.parse(patched(good, off + 16, "<Q", 0x1000))          # p_vaddr into the system area
    with pytest.raises(GuestLoadError, match="outside the image area"):
        elf.parse(patched(good, off + 40, "<Q", 1 << 40))          # absurd p_memsz


def test_segment_file_range_checked(good):
    off = phdr_offset(good, 0)
    with pytest.raises(GuestLoadError, match="past the file end"):
        elf.parse(patched(good, off + 8, "<Q", len(good)))          # p_offset at the end
    with pytest.raises(GuestLoadError, match="more file bytes"):
        elf.parse(patched(good, off + 32, "<Q", 1 << 30))           # p_filesz > p_memsz


def test_dynamic_rejected(good):
    off = phdr_offset(good, 0)
    with pytest.raises(GuestLoadError, match="static"):
        elf.parse(patched(good, off, "<I", 3))                      # PT_INTERP


def test_no_exports(tmp_path):
    src = tmp_path / "empty.c"
    src.write_text("int unused;\n")
    out = tmp_path / "empty.elf"
    # The compiler itself: build_guest refuses such a guest already (tests/test_cli.py).
    subprocess.run(guestbuild.compiler_command([src], out), check=True)
    with pytest.raises(GuestLoadError, match="exports no functions"):
        elf.load(out)
