"""A/B of the warm path between two installs of whpfast, interleaved: warm PythonSandbox requests
(hello_world, and a pandas job where pandas is installed), each install in its own process per
round, alternating, so both see the same machine.

    python bench/ab_warm.py OLD_VENV/bin/python NEW_VENV/bin/python [--rounds 3]

(make OLD_VENV from an earlier commit: `git archive <rev> | tar -x -C /tmp/old` and
`OLD_VENV/bin/pip install /tmp/old`). Prints each round's medians and the new/old ratios."""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HELLO = 'print("hello world")'
SETUP = "import pandas as pd, numpy as np"
JOB = ("df = pd.DataFrame({'k': np.arange(1000) % 7, 'v': np.arange(1000.0)}); "
       "print(df.groupby('k').v.sum().iloc[3])")


def child(requests):
    import importlib.util
    import time
    import whpfast
    cases = [("hello", "", HELLO, requests)]
    if importlib.util.find_spec("pandas") is not None:
        cases.append(("pandas", SETUP, JOB, max(10, requests // 5)))
    out = {}
    for name, setup, code, n in cases:
        with whpfast.PythonSandbox(setup=setup, warmup=code) as sb:
            want = sb.run(code).stdout
            times = []
            for _ in range(n):
                t0 = time.perf_counter_ns()
                r = sb.run(code)
                times.append(time.perf_counter_ns() - t0)
                assert r.stdout == want, r
            out[name] = float(np.median(times)) / 1e3
    print(json.dumps(out))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.requests)
    runs = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as cwd:        # not a checkout: each imports its install
        for i in range(args.rounds):
            for side in ("old", "new"):
                python = getattr(args, side)
                done = subprocess.run([python, os.path.abspath(__file__), "-", "-", "--child",
                                       "--requests", str(args.requests)],
                                      capture_output=True, text=True, cwd=cwd, check=True)
                runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
            old, new = runs["old"][-1], runs["new"][-1]
            print(f"round {i + 1}: " + ", ".join(
                f"{k} {old[k]:.0f} -> {new[k]:.0f} us ({new[k] / old[k]:.2f}x)" for k in old if k in new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
