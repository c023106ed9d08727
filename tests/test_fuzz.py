"""Short, seeded runs of the coverage-guided fuzzer (bench/fuzz.py, atheris): the snapshot loader
with checksums fixed up so mutations reach the parser, the call-result decoder, the host-call
decoder, the Linux file system against the host kernel (fsdiff) and random system calls from a
real guest (syscalls). Every input must end in the documented exception or a valid result (and
for fsdiff in the host kernel's answers); the harness turns anything else into a libFuzzer
crash, which fails the run (and the planted bugs below show it does). The long
run is `python bench/fuzz.py <target> -max_total_time=300` (docs/fuzzing.md)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "bench" / "fuzz.py"

if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
    pytest.skip("atheris has wheels for Linux x86-64 only", allow_module_level=True)


def fuzz(target, runs, tmp_path, plant=None, seed=1):
    """Runs the harness in its own process (libFuzzer exits the process when it is done)."""
    env = dict(os.environ, PYTHONHASHSEED="0")       # same seed, same inputs, same coverage
    env.pop("WHPFAST_FUZZ_PLANT", None)
    if plant:
        env["WHPFAST_FUZZ_PLANT"] = plant
    proc = subprocess.run([sys.executable, str(FUZZ), target, f"-runs={runs}", f"-seed={seed}",
                           f"-artifact_prefix={tmp_path}/"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fuzz-outcomes: ")]
    outcomes = json.loads(lines[-1].split(": ", 1)[1]) if lines else {}
    return proc, outcomes


def check(proc, outcomes, runs):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Done {runs} runs" in proc.stderr
    assert outcomes.get("inputs") == runs, outcomes


def test_result_decoder(tmp_path):
    proc, outcomes = fuzz("result", 5000, tmp_path)
    check(proc, outcomes, 5000)
    assert outcomes["MessageError"] > 0
    # the decoder was driven to every kind of value, not only to its error paths
    assert all(outcomes.get(f"ok: {letter}", 0) > 0 for letter in "n?ifbs"), outcomes


def test_host_call_decoder(tmp_path):
    proc, outcomes = fuzz("hostcall", 5000, tmp_path)
    check(proc, outcomes, 5000)
    assert outcomes["MessageError"] > 0 and outcomes["ok"] > 0
    assert sum(outcomes.get(f"argument: {letter}", 0) > 0 for letter in "n?ifbs") >= 4, outcomes


@pytest.mark.hypervisor
def test_snapshot_loader(tmp_path):
    proc, outcomes = fuzz("snapshot", 2000, tmp_path)
    check(proc, outcomes, 2000)
    assert outcomes["load: SnapshotError"] > 0
    # some mutated files are still valid (e.g. another guest path): those cold-start and run
    assert outcomes["load: ok"] > 0 and outcomes["cold start: ok"] > 0, outcomes


def test_file_system_against_the_host_kernel(tmp_path):
    reached = set()
    # The seed decides which inputs a run makes, and so does the coverage of fs.py and the
    # harness: a change to either moves the rare successes (chmod and access succeed a few times
    # in 2,000 sequences). So the runs of several seeds together must reach each one; every run
    # must find no difference.
    for seed in (1, 2, 3, 5):
        proc, outcomes = fuzz("fsdiff", 2000, tmp_path, seed=seed)
        check(proc, outcomes, 2000)
        assert outcomes["sequences"] == 2000        # each ended with the two /tmp trees the same
        reached |= {k for k, v in outcomes.items() if k.endswith(": ok") and v > 0}
    # the sequences get past the errors: files and links are made, looked at, changed
    for op in ("open", "mkdir", "symlink", "lstat", "chmod", "access"):
        assert f"{op}: ok" in reached, (op, sorted(reached))


@pytest.mark.hypervisor
def test_system_calls_from_a_guest(tmp_path):
    proc, outcomes = fuzz("syscalls", 1000, tmp_path)
    check(proc, outcomes, 1000)
    assert outcomes["results"] > 900, outcomes
    assert sum(1 for k in outcomes if k.startswith("errno ")) >= 4, outcomes
    assert outcomes["max RSS MiB"] < 1024, outcomes


@pytest.mark.parametrize("target", ["result", "fsdiff",
                                    pytest.param("syscalls", marks=pytest.mark.hypervisor)])
def test_harness_reports_an_undocumented_exception(tmp_path, target):
    proc, _ = fuzz(target, 200, tmp_path, plant=target)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "KeyError" in output and f"planted bug in the {target} target" in output
    assert list(tmp_path.glob("crash-*")), "libFuzzer keeps the input that crashed"
