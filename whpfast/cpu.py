"""CPU identity: the CPU features a guest program could see, recorded in every snapshot and
compared with this host before a snapshot's guest runs again.

Why it matters: a program reads `cpuid` once and keeps what it learned in its memory (glibc picks
AVX-512 or AVX2 variants of memcpy/strlen through ifuncs and sizes its XSAVE buffers from leaf
0xD), so a snapshot taken on one CPU and resumed on a CPU without those features crashes later,
far from the cause. Loading such a snapshot is a SnapshotError naming what is missing instead.

Which cpuid is recorded: what a guest's own `cpuid` instruction answers on this host, asked of the
testkit guest once per process (read_guest). It is neither the host's instruction nor the table
whpfast hands the hypervisor: on PVM hosts a user-mode guest's cpuid may or may not be
intercepted depending on the CPU (seen: an Intel host where the guest saw the host's leaf 7, an
AMD EPYC host where it did not see INVPCID), and with hardware virtualization (VT-x/AMD-V KVM,
WHP) the guest sees the hypervisor's table, a subset of the host's. Recording the host's values
would claim features a guest never saw and refuse snapshots on hosts that lack only those;
asking a guest records exactly what a program in the snapshot could have used, and a snapshot is
checked against what a guest on the new host would see (tests/test_cpu.py compares it with a
Linux program's own cpuid).

What is compared: the vendor string (must be equal); feature words (leaf 1 ECX/EDX, leaf 7.0
EBX/ECX/EDX, leaf 7.1 EAX, leaf 0xD.1 EAX, leaf 0x80000001 ECX/EDX) where every bit the
snapshot had must be set here (extra features on this host are fine); and the XSAVE layout
(the XCR0 components the CPU supports and the XSAVE size of all of them, leaf 0xD.0 EAX/EDX and
ECX), which must be equal: a program sized its save areas by them. Not compared: what the
guest's own control registers decide rather than the CPU -- OSXSAVE and OSPKE (CR4 bits the
personality sets: an SDK guest and a Linux program differ there) and the XSAVE size for the
XCR0 the guest enabled (leaf 0xD.0 EBX, recorded as "size"), which follows from the components
and the XCR0 whpfast sets.

The record is versioned (VERSION) and, coming from a file, untrusted: parse() checks it."""

import struct
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import _pages
from .errors import SnapshotError

VERSION = 1

# (name in the record, leaf, subleaf, register index in (eax, ebx, ecx, edx))
WORDS: Tuple[Tuple[str, int, int, int], ...] = (
    ("1.ecx", 1, 0, 2), ("1.edx", 1, 0, 3),
    ("7.0.ebx", 7, 0, 1), ("7.0.ecx", 7, 0, 2), ("7.0.edx", 7, 0, 3), ("7.1.eax", 7, 1, 0),
    ("0xd.1.eax", 0xD, 1, 0),
    ("0x80000001.ecx", 0x80000001, 0, 2), ("0x80000001.edx", 0x80000001, 0, 3),
)
# Bits that say something about the machine, not about what code may execute: the hypervisor bit
# (set in a cloud VM, clear on bare metal) would refuse a snapshot for no reason.
# OSXSAVE (1.ecx bit 27) and OSPKE (7.0.ecx bit 4) mirror the guest's CR4, which the personality
# sets, not the CPU.
IGNORED = {"1.ecx": 1 << 31 | 1 << 27, "7.0.ecx": 1 << 4}
XSAVE_FIELDS = ("components", "size", "max_size")
XSAVE_COMPARED = ("components", "max_size")       # "size" follows the guest's XCR0 (see above)

# Bit names as Linux's /proc/cpuinfo spells them, for the messages; other bits are named by
# position ("cpuid 7.0.edx bit 12").
_NAMES = {
    "1.edx": "fpu vme de pse tsc msr pae mce cx8 apic - sep mtrr pge mca cmov pat pse36 pn clflush "
             "- dts acpi mmx fxsr sse sse2 ss ht tm ia64 pbe",
    "1.ecx": "pni pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 cid sdbg fma cx16 xtpr pdcm "
             "- pcid dca sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave osxsave avx "
             "f16c rdrand hypervisor",
    "7.0.ebx": "fsgsbase tsc_adjust sgx bmi1 hle avx2 fdp_excptn_only smep bmi2 erms invpcid rtm cqm "
               "zero_fcs_fds mpx rdt_a avx512f avx512dq rdseed adx smap avx512ifma pcommit "
               "clflushopt clwb intel_pt avx512pf avx512er avx512cd sha_ni avx512bw avx512vl",
    "7.0.ecx": "prefetchwt1 avx512vbmi umip pku ospke waitpkg avx512_vbmi2 shstk gfni vaes "
               "vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq - la57 - - - - - rdpid "
               "kl bus_lock_detect cldemote - movdiri movdir64b enqcmd sgx_lc pks",
    "7.0.edx": "- - avx512_4vnniw avx512_4fmaps fsrm uintr - - avx512_vp2intersect srbds_ctrl "
               "md_clear rtm_always_abort - tsx_force_abort serialize hybrid_cpu tsxldtrk - pconfig "
               "arch_lbr ibt - amx_bf16 avx512_fp16 amx_tile amx_int8 spec_ctrl intel_stibp "
               "flush_l1d arch_capabilities core_capabilities spec_ctrl_ssbd",
    "7.1.eax": "- - - - avx_vnni avx512_bf16 - cmpccxadd - - fzrm fsrs fsrc - - - - - - - - "
               "amx_fp16 - avx_ifma - - lam",
    "0xd.1.eax": "xsaveopt xsavec xgetbv1 xsaves xfd",
    "0x80000001.ecx": "lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse "
                      "3dnowprefetch osvw ibs xop skinit wdt - lwp fma4 tce - nodeid_msr - tbm "
                      "topoext perfctr_core perfctr_nb - bpext ptsc perfctr_llc mwaitx",
    "0x80000001.edx": "- - - - - - - - - - - syscall - - - - - - - mp nx - mmxext - - fxsr_opt "
                      "pdpe1gb rdtscp - lm 3dnowext 3dnow",
}


def bit_name(word: str, bit: int) -> str:
    names = _NAMES[word].split()
    name = names[bit] if bit < len(names) else "-"
    if name == "-" and word == "0x80000001.edx":     # AMD repeats most of leaf 1 EDX here
        name = _NAMES["1.edx"].split()[bit]
    return name if name != "-" else f"cpuid {word} bit {bit}"


Cpuid = Callable[[int, int], Tuple[int, int, int, int]]


def read_host(cpuid: Cpuid = _pages.host_cpuid) -> Dict[str, Any]:
    """A record read through `cpuid(leaf, subleaf) -> (eax, ebx, ecx, edx)`, by default the host's
    own instruction: {"version", "vendor", "features": {word: bits}, "xsave": {...}}."""
    max_leaf, b, c, d = cpuid(0, 0)
    vendor = b"".join(r.to_bytes(4, "little") for r in (b, d, c)).decode("latin-1")
    max_ext = cpuid(0x80000000, 0)[0]
    features = {}
    for word, leaf, sub, reg in WORDS:
        present = leaf <= max_leaf if leaf < 0x80000000 else leaf <= max_ext
        features[word] = (cpuid(leaf, sub)[reg] & ~IGNORED.get(word, 0)) if present else 0
    if max_leaf >= 0xD:
        eax, ebx, ecx, edx = cpuid(0xD, 0)
        xsave = {"components": eax | edx << 32, "size": ebx, "max_size": ecx}
    else:
        xsave = {"components": 0, "size": 0, "max_size": 0}
    return {"version": VERSION, "vendor": vendor, "features": features, "xsave": xsave}


def read_guest() -> Dict[str, Any]:
    """The record of what a guest's cpuid answers on this host and backend: the testkit guest
    (shipped with whpfast) is asked each leaf. Costs one small sandbox (a few ms)."""
    from .guests import testkit
    from .sandbox import Sandbox
    with Sandbox(testkit, memory_size=4 << 20) as sb:
        def ask(leaf: int, sub: int) -> Tuple[int, int, int, int]:
            eax, ebx, ecx, edx = struct.unpack("<4I", sb.call("cpuid", leaf, sub))
            return eax, ebx, ecx, edx
        return read_host(ask)


_host: Optional[Dict[str, Any]] = None
_host_lock = threading.Lock()


def _here() -> Dict[str, Any]:
    global _host
    if _host is None:
        with _host_lock:
            if _host is None:
                _host = read_guest()
    return _host


def host() -> Dict[str, Any]:
    """What a guest sees on this host (read_guest), read once per process; a fresh copy each
    time: callers may keep it in a snapshot's metadata."""
    here = _here()
    return {"version": here["version"], "vendor": here["vendor"],
            "features": dict(here["features"]), "xsave": dict(here["xsave"])}


def parse(record: Any) -> Dict[str, Any]:
    """Checks a record read from a snapshot file (exact types, every key, ranges); raises
    ValueError saying what is wrong. Returns it."""
    def fields(value, what, keys):
        if type(value) is not dict or set(value) != set(keys):
            raise ValueError(f"{what} must be an object with the keys {sorted(keys)}")
        return value

    def u(value, what, bits):
        if type(value) is not int or not 0 <= value < 1 << bits:
            raise ValueError(f"{what} must be an unsigned {bits}-bit integer, not {value!r}")

    fields(record, "cpu record", ("version", "vendor", "features", "xsave"))
    if type(record["version"]) is not int or record["version"] != VERSION:
        raise ValueError(f"cpu record version {record['version']!r}; this whpfast reads {VERSION}")
    vendor = record["vendor"]
    if type(vendor) is not str or len(vendor) != 12:
        raise ValueError("cpu vendor must be a 12-character string")
    for word, value in fields(record["features"], "cpu features", [w[0] for w in WORDS]).items():
        u(value, f"cpu feature word {word}", 32)
    xsave = fields(record["xsave"], "cpu xsave", XSAVE_FIELDS)
    u(xsave["components"], "xsave components", 64)
    u(xsave["size"], "xsave size", 32)
    u(xsave["max_size"], "xsave max_size", 32)
    return record


def missing(record: Dict[str, Any], here: Dict[str, Any]) -> List[str]:
    """What a parsed record has that `here` lacks, as readable items (empty: compatible)."""
    problems = []
    if record["vendor"] != here["vendor"]:
        problems.append(f"vendor {record['vendor']} (this host: {here['vendor']})")
    lacking = []
    for word, _, _, _ in WORDS:
        bits = record["features"][word] & ~here["features"][word] & ~IGNORED.get(word, 0)
        lacking += [bit_name(word, i) for i in range(32) if bits >> i & 1]
    if lacking:
        problems.append(", ".join(lacking))
    theirs, ours = record["xsave"], here["xsave"]
    differ = [k for k in XSAVE_COMPARED if theirs[k] != ours[k]]
    if differ:
        problems.append("XSAVE layout " + ", ".join(
            f"{k} {theirs[k]:#x} (this host: {ours[k]:#x})" for k in differ))
    return problems


def incompatibility(record: Dict[str, Any]) -> Optional[str]:
    """Why a parsed record cannot run on this host, or None."""
    here = _here()
    if record == here:
        return None
    problems = missing(record, here)
    if not problems:
        return None
    return (f"it was taken on a CPU with features this host lacks: {'; '.join(problems)}. A "
            f"program in it may already use them (glibc picks its code paths once); take the "
            f"snapshot again on this host, or use it on one with these CPU features")


def check(record: Dict[str, Any], what: str = "the snapshot") -> None:
    """Raises SnapshotError unless this host offers everything a parsed record holds."""
    why = incompatibility(record)
    if why:
        raise SnapshotError(f"{what} cannot run here: {why}")
