"""CPU identity in snapshots (whpfast/cpu.py): what is recorded is what a guest program sees (on
any host: the guest's cpuid may differ from the host's instruction), a
snapshot claiming a feature this host lacks is refused naming it (files edited with every
checksum fixed up, and in-memory snapshots), unedited round trips work, and malformed records
are SnapshotError."""

import copy
import json
import os
import sys
from pathlib import Path

import pytest

import whpfast
from conftest import build_c
from whpfast import cpu
from whpfast.errors import SnapshotError
from whpfast.core import container

MB = 1 << 20


def lacking(count=2):
    """(word, [bit names]) of `count` named features of leaf 7.0 EBX/EDX this host lacks."""
    here = cpu.host()["features"]
    for word in ("7.0.ebx", "7.0.edx", "7.0.ecx"):
        bits = [i for i in range(32) if not here[word] >> i & 1 and not cpu.IGNORED.get(word, 0) >> i & 1
                and not cpu.bit_name(word, i).startswith("cpuid ")]
        if len(bits) >= count:
            return word, bits[:count]
    raise AssertionError("this host has every named feature of leaf 7")


def claim_missing(record):
    """Edits a record to claim two features this host lacks; returns their names as a
    message lists them."""
    word, bits = lacking()
    for bit in bits:
        record["features"][word] |= 1 << bit
    return ", ".join(cpu.bit_name(word, bit) for bit in bits)


# -- the record itself ---------------------------------------------------------------------

@pytest.mark.hypervisor
def test_host_record_is_well_formed_and_stable():
    record = cpu.host()
    assert cpu.parse(record) is record
    assert len(record["vendor"]) == 12 and record["vendor"] in ("GenuineIntel", "AuthenticAMD",
                                                                "HygonGenuine", "CentaurHauls")
    assert record["features"]["1.edx"] >> 26 & 1, "x86-64 implies sse2"
    assert record["features"]["0x80000001.edx"] >> 29 & 1, "x86-64 implies lm"
    assert record["xsave"]["size"] >= 576 and record["xsave"]["components"] & 3 == 3
    assert cpu.read_guest() == record and cpu.host() is not cpu.host()   # a fresh copy each time
    assert cpu.incompatibility(record) is None
    assert cpu.read_host()["vendor"] == record["vendor"]


@pytest.mark.hypervisor
@pytest.mark.skipif(sys.platform != "linux", reason="KVM only: LinuxSandbox's host side is Linux")
def test_record_holds_everything_a_guest_program_sees(tmp_path):
    """The record is what a Linux program's own cpuid answers, every word and the XSAVE layout,
    whether or not the hypervisor shows it the host's values (on some PVM hosts it hides
    features such as INVPCID; with hardware virtualization it shows its own table)."""
    program = build_c(tmp_path / "cpuid", "cpuid.c", "-static")
    with whpfast.LinuxSandbox([str(program)], memory_size=32 * MB) as lx:
        result = lx.run(timeout=10)
    assert result.exit_code == 0, result
    table = {}
    for line in result.stdout.decode().splitlines():
        leaf, sub, *regs = map(int, line.split())
        table[leaf, sub] = tuple(regs)
    assert len(table) == 8
    seen = cpu.read_host(lambda leaf, sub: table[leaf, sub])
    recorded = cpu.host()
    assert seen["vendor"] == recorded["vendor"] and seen["features"] == recorded["features"]
    assert all(seen["xsave"][k] == recorded["xsave"][k] for k in cpu.XSAVE_COMPARED)
    assert cpu.missing(seen, recorded) == [] and cpu.missing(recorded, seen) == []


def test_missing_features_vendor_and_xsave_layout_are_named():
    here = cpu.host()
    record = copy.deepcopy(here)
    names = claim_missing(record)
    assert cpu.missing(record, here) == [names]
    with pytest.raises(SnapshotError, match=names):
        cpu.check(record)
    fewer = copy.deepcopy(here)
    fewer["features"]["1.edx"] &= ~(1 << 26)                   # this host has more: fine
    assert cpu.missing(fewer, here) == [] and cpu.incompatibility(fewer) is None
    other = copy.deepcopy(here)
    other["vendor"] = "GenuineIotel"
    other["xsave"]["max_size"] += 64
    problems = cpu.missing(other, here)
    assert problems[0].startswith("vendor GenuineIotel") and "XSAVE layout max_size" in problems[1]
    enabled = copy.deepcopy(here)                              # the guest's own XCR0 and CR4
    enabled["xsave"]["size"] += 64
    enabled["features"]["1.ecx"] |= 1 << 27                    # OSXSAVE
    enabled["features"]["7.0.ecx"] |= 1 << 4                   # OSPKE
    assert cpu.missing(enabled, here) == []
    hypervisor = copy.deepcopy(here)
    hypervisor["features"]["1.ecx"] |= 1 << 31                 # where it ran says nothing
    assert cpu.missing(hypervisor, here) == []


MALFORMED = {
    "not an object": lambda r: [],
    "missing key": lambda r: r.pop("xsave") and r,
    "extra key": lambda r: dict(r, extra=1),
    "version": lambda r: dict(r, version=2),
    "bool version": lambda r: dict(r, version=True),
    "vendor length": lambda r: dict(r, vendor="AMD"),
    "vendor type": lambda r: dict(r, vendor=12),
    "feature word too wide": lambda r: r["features"].update({"1.ecx": 1 << 32}) or r,
    "negative word": lambda r: r["features"].update({"7.0.ebx": -1}) or r,
    "float word": lambda r: r["features"].update({"7.0.ebx": 1.0}) or r,
    "bool word": lambda r: r["features"].update({"7.0.ebx": True}) or r,
    "unknown word": lambda r: r["features"].update({"9.eax": 0}) or r,
    "missing word": lambda r: r["features"].pop("1.edx") and r,
    "xsave size string": lambda r: r["xsave"].update({"size": "2432"}) or r,
    "xsave components too wide": lambda r: r["xsave"].update({"components": 1 << 64}) or r,
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_records_are_refused(case):
    with pytest.raises(ValueError):
        cpu.parse(MALFORMED[case](cpu.host()))


def assert_claimed_features_refused(path, rewrite, snapshot_class, sandbox_class):
    """A file whose record claims two features this host lacks (checksums fixed up) is refused by
    load and from_snapshot, naming both."""
    names = []
    rewrite(path, lambda meta: names.append(claim_missing(meta["cpu"])))
    with pytest.raises(SnapshotError, match=f"features this host lacks: {names[0]}"):
        snapshot_class.load(path)
    with pytest.raises(SnapshotError, match=names[0]):
        sandbox_class.from_snapshot(path)


# -- SDK snapshots (Sandbox) ---------------------------------------------------------------

def rewrite_sdk_meta(path, edit):
    """Rewrites a saved Sandbox snapshot's metadata through `edit` (in place), every offset and checksum
    fixed up: a crafted file, not a corrupted one."""
    data = Path(path).read_bytes()
    meta = json.loads(container.sections_of(data)["sdk"])
    edit(meta)
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    os.unlink(path)                                # a new file: Snapshot.load caches by inode
    Path(path).write_bytes(container.rebuild(data, {"sdk": meta_bytes}))


@pytest.fixture
def sdk_snapshot(tmp_path):
    path = tmp_path / "sdk.snap"
    with whpfast.Sandbox(whpfast.guests.testkit, memory_size=4 * MB) as sb:
        sb.call("touch", 0, 2, 0x5A)
        sb.snapshot().save(path)
    return path


@pytest.mark.hypervisor
def test_sdk_round_trip_keeps_the_record(sdk_snapshot):
    rewrite_sdk_meta(sdk_snapshot, lambda meta: None)       # the rewrite itself changes nothing
    snap = whpfast.Snapshot.load(sdk_snapshot)
    assert snap.meta["cpu"] == cpu.host()
    with whpfast.Sandbox.from_snapshot(sdk_snapshot) as sb:
        assert sb.call("read_byte", 0) == 0x5A
        sb.restore(snap)
        assert sb.call("add", 2, 3) == 5


@pytest.mark.hypervisor
def test_sdk_file_claiming_missing_features_is_refused(sdk_snapshot):
    assert_claimed_features_refused(sdk_snapshot, rewrite_sdk_meta, whpfast.Snapshot, whpfast.Sandbox)


@pytest.mark.hypervisor
@pytest.mark.parametrize("case", ["missing key", "vendor length", "bool word", "not an object"])
def test_sdk_file_with_malformed_record_is_refused(sdk_snapshot, case):
    rewrite_sdk_meta(sdk_snapshot, lambda meta: meta.update(cpu=MALFORMED[case](meta["cpu"])))
    with pytest.raises(SnapshotError, match="metadata is inconsistent"):
        whpfast.Snapshot.load(sdk_snapshot)


@pytest.mark.hypervisor
def test_sdk_in_memory_snapshot_from_another_cpu_is_refused_before_the_guest_runs():
    with whpfast.Sandbox(whpfast.guests.testkit, memory_size=4 * MB) as sb:
        sb.call("touch", 0, 1, 7)
        snap = sb.snapshot()
        names = claim_missing(snap.meta["cpu"])
        sb.call("touch", 0, 1, 9)
        with pytest.raises(SnapshotError, match=names):
            sb.restore(snap)
        assert sb.poisoned is None and sb.call("read_byte", 0) == 9    # nothing was touched
        with pytest.raises(SnapshotError, match=names):
            whpfast.Sandbox.from_snapshot(snap)


# -- Linux snapshots (LinuxSandbox) --------------------------------------------------------

def linux_only(test):
    test = pytest.mark.hypervisor(test)
    return pytest.mark.skipif(sys.platform != "linux", reason="KVM only: LinuxSandbox's host side is Linux")(test)


@pytest.fixture(scope="module")
def sum_program(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("cpu-programs") / "sum", "sum.c", "-static")


@pytest.fixture
def linux_snapshot(sum_program, tmp_path):
    path = tmp_path / "linux.snap"
    with whpfast.LinuxSandbox([sum_program], memory_size=32 * MB) as lx:
        lx.run()
        lx.snapshot().save(path)
    return path


@linux_only
def test_linux_round_trip_and_claimed_features(linux_snapshot):
    from test_linux_process import _rewrite_meta
    snap = whpfast.LinuxSnapshot.load(linux_snapshot)
    assert snap.meta["cpu"] == cpu.host()
    with whpfast.LinuxSandbox.from_snapshot(linux_snapshot) as lx:
        assert lx.run(b"2\n").stdout == b"sum 2\n"
        lx.restore(snap)
        assert lx.run(b"3\n").stdout == b"sum 3\n"
    assert_claimed_features_refused(linux_snapshot, _rewrite_meta, whpfast.LinuxSnapshot,
                                    whpfast.LinuxSandbox)


@linux_only
@pytest.mark.parametrize("case", ["missing key", "extra key", "feature word too wide", "not an object"])
def test_linux_file_with_malformed_record_is_refused(linux_snapshot, case):
    from test_linux_process import _rewrite_meta
    _rewrite_meta(linux_snapshot, lambda meta: meta.update(cpu=MALFORMED[case](meta["cpu"])))
    with pytest.raises(SnapshotError, match="metadata is inconsistent"):
        whpfast.LinuxSnapshot.load(linux_snapshot)


@linux_only
def test_linux_in_memory_snapshot_from_another_cpu_is_refused(sum_program):
    with whpfast.LinuxSandbox([sum_program], memory_size=32 * MB) as lx:
        lx.run()
        snap = lx.snapshot()
        names = claim_missing(snap.meta["cpu"])
        assert lx.run(b"1\n").stdout == b"sum 1\n"
        with pytest.raises(SnapshotError, match=names):
            lx.restore(snap)
        assert lx.poisoned is None
        assert lx.run(b"1\n").stdout == b"sum 2\n"          # not restored: the state carried on
        with pytest.raises(SnapshotError, match=names):
            whpfast.LinuxSandbox.from_snapshot(snap)

