"""PythonSandbox benchmarks (hello_world, pandas, density, snapshot) against native baselines in
the same run: python bench/bench_python.py [--out DIR] [--compare old.json] [--quick].

The measuring code lives in the package (whpfast/python/bench.py) so that `whpfast bench` and
`whpfast demo --python` run it from an installed wheel too; this script runs only the Python
benches (`whpfast bench` adds the SDK and Linux ones)."""

import sys

from whpfast.python.bench import main

if __name__ == "__main__":
    sys.exit(main(["--python-only", *sys.argv[1:]]))
