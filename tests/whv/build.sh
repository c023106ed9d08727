#!/usr/bin/env bash
# Builds the WHP-on-KVM test shim and its test program.
#
#   tests/whv/build.sh [OUTDIR] [--test]
#
# OUTDIR (default build/whv) receives:
#   libwhv_kvm.so     the shim (WHv* + kernel32/CRT subset on /dev/kvm)
#   test_shim         its test program (rpath $ORIGIN), run with --test
#   winhv-include/    symlinks to mingw's winhvplatform.h and winhvplatformdefs.h
# Include order for anything built against the shim: include/compat, then OUTDIR/winhv-include.
# If x86_64-w64-mingw32-gcc is installed, the struct layouts (tests/whv/layout.c) are also
# compared with real Windows x64 and the build fails on any difference.
# Knobs: CC (default cc), MINGW_INCLUDE (dir holding winhvplatform.h; default: the
# mingw-w64-x86-64-dev locations), CROSS_CC (default x86_64-w64-mingw32-gcc).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=
RUN_TEST=0
for arg in "$@"; do
    case "$arg" in
        --test) RUN_TEST=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) OUT=$arg ;;
    esac
done
OUT=${OUT:-$ROOT/build/whv}
CC=${CC:-cc}
CROSS_CC=${CROSS_CC:-x86_64-w64-mingw32-gcc}

say() { printf '[whv] %s\n' "$*"; }
die() { printf '[whv] ERROR: %s\n' "$*" >&2; exit 1; }

if [ -z "${MINGW_INCLUDE:-}" ]; then
    for d in /usr/share/mingw-w64/include /usr/x86_64-w64-mingw32/include; do
        [ -f "$d/winhvplatform.h" ] && { MINGW_INCLUDE=$d; break; }
    done
fi
[ -n "${MINGW_INCLUDE:-}" ] && [ -f "$MINGW_INCLUDE/winhvplatform.h" ] && [ -f "$MINGW_INCLUDE/winhvplatformdefs.h" ] ||
    die "mingw's winhvplatform.h not found: apt-get install mingw-w64-x86-64-dev (or set MINGW_INCLUDE)"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Only these two mingw headers: everything else Windows comes from include/compat.
rm -rf "$OUT/winhv-include"
mkdir -p "$OUT/winhv-include"
ln -s "$MINGW_INCLUDE/winhvplatform.h" "$MINGW_INCLUDE/winhvplatformdefs.h" "$OUT/winhv-include/"

CFLAGS=(-Wall -Werror=implicit-function-declaration -Werror=incompatible-pointer-types -Werror=int-conversion
        -fPIC -O2)
INCLUDES=(-I "$ROOT/include/compat" -I "$OUT/winhv-include")

say "libwhv_kvm.so"
"$CC" "${CFLAGS[@]}" "${INCLUDES[@]}" -fvisibility=hidden -shared -o "$OUT/libwhv_kvm.so" "$HERE/whv_kvm.c" -lpthread
say "test_shim"
"$CC" "${CFLAGS[@]}" "${INCLUDES[@]}" -o "$OUT/test_shim" "$HERE/test_shim.c" \
    -L "$OUT" -lwhv_kvm -Wl,-rpath,'$ORIGIN' -lpthread

# Struct layouts: Linux build vs real Windows x64 (both from the same mingw headers).
layout_table() {   # compiler, args... -> the numbers of whv_layout[], one per line
    "$@" -S -O0 -o - "$HERE/layout.c" | awk '/^whv_layout:/{f=1; next} f && $1==".quad"{print $2; next} f && NF{exit}'
}
if command -v "$CROSS_CC" >/dev/null 2>&1; then
    linux=$(layout_table "$CC" "${INCLUDES[@]}")
    windows=$(layout_table "$CROSS_CC")
    [ -n "$linux" ] && [ "$(printf '%s\n' "$linux" | wc -l)" -gt 50 ] || die "layout table empty"
    if [ "$linux" != "$windows" ]; then
        diff <(printf '%s\n' "$linux") <(printf '%s\n' "$windows") >&2 || true
        die "struct layouts differ between the Linux build and Windows x64 (see tests/whv/layout.c)"
    fi
    say "layouts identical to Windows x64 ($(printf '%s\n' "$linux" | wc -l) sizes/offsets, $CROSS_CC)"
else
    say "layout check skipped: $CROSS_CC not installed"
fi

say "built in $OUT"
if [ $RUN_TEST -eq 1 ]; then
    say "running test_shim"
    "$OUT/test_shim"
fi
