#!/usr/bin/env bash
# Cross-compiles a Cython module for Windows x64 (CPython 3.11, Windows Hypervisor Platform) on
# Debian, so CI can check the WHP backend without a Windows machine.
#
#   .ci/cross_whp.sh [PYX] [OUTDIR]     PYX defaults to whpfast/_whp.pyx,
#                                       OUTDIR to build/cross-win_amd64
#   .ci/cross_whp.sh --self-test [OUTDIR]
#       builds .ci/whp_probe.pyx, then checks that four deliberate mistakes in it
#       (misspelled struct member, wrong pointer type, int passed as pointer, function the
#       header lacks) each make the build FAIL.
#
# Steps: (a) apt: mingw-w64 gcc/binutils/headers (winhvplatform.h, libwinhvplatform.a);
# the Windows CPython headers (Include/ + PC/pyconfig.h) come from Debian's python3.11 *source*
# package, fetched with a private apt config (deb-src lines derived from the system's Debian
# sources; /etc/apt is not touched). (b) Cython (the active Python's; pip-installed if missing)
# -> C. (c) x86_64-w64-mingw32-gcc with -Werror for implicit declarations, incompatible
# pointers, int<->pointer conversions. (d) link a .pyd against -lwinhvplatform and a
# python311.dll import library made with dlltool from every PyAPI_FUNC/PyAPI_DATA name in the
# headers (so a module that uses a non-exported CPython symbol fails to link).
# Then checks the result: PE32+ DLL x86-64, exports PyInit_<mod>, imports python311.dll and
# WinHvPlatform.dll, no mingw runtime DLLs (libgcc_s/libwinpthread) and no msvcrt.dll.
#
# Cache: $WHPFAST_CROSS_CACHE, else $XDG_CACHE_HOME/whpfast-cross, else /tmp/whpfast-cross.
# Knobs: PYTHON (default python3), WHPFAST_CROSS_CRT=ucrt|msvcrt (default ucrt, as python.org
# builds), EXTRA_CFLAGS, EXTRA_LDFLAGS, CYTHON_FLAGS.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PYTHON=${PYTHON:-python3}
PYVER=3.11                                   # Debian bookworm's CPython; also the CI Python
PYNODOT=${PYVER/./}
TRIPLE=x86_64-w64-mingw32
CC=${CROSS_CC:-$TRIPLE-gcc}
CRT=${WHPFAST_CROSS_CRT:-ucrt}
CACHE=${WHPFAST_CROSS_CACHE:-${XDG_CACHE_HOME:-/tmp}/whpfast-cross}
WERROR=(-Werror=implicit-function-declaration -Werror=incompatible-pointer-types -Werror=int-conversion)

say() { printf '[cross_whp] %s\n' "$*"; }
die() { printf '[cross_whp] ERROR: %s\n' "$*" >&2; exit 1; }
run() { printf '+ %s\n' "$*"; "$@"; }
trap 'printf "[cross_whp] ERROR: command failed (line %s): %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

# ---------------------------------------------------------------------------------------------
# (a) toolchain from apt
APT_UPDATED=0
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "apt-get not found; need: ${missing[*]}"
    [ "$(id -u)" -eq 0 ] || die "not root; run: apt-get install ${missing[*]}"
    say "apt: installing ${missing[*]}"
    if [ $APT_UPDATED -eq 0 ]; then
        apt-get update -qq >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null || die "apt-get install ${missing[*]} failed"
}

ensure_toolchain() {
    apt_install gcc-mingw-w64-x86-64-win32 binutils-mingw-w64-x86-64 mingw-w64-x86-64-dev file
    command -v "$CC" >/dev/null || CC=$TRIPLE-gcc-win32
    command -v "$CC" >/dev/null || die "no $TRIPLE-gcc after install"
    local sysroot=/usr/$TRIPLE
    [ -f $sysroot/include/winhvplatform.h ] || die "winhvplatform.h missing from mingw-w64-x86-64-dev"
    [ -f $sysroot/include/winhvplatformdefs.h ] || die "winhvplatformdefs.h missing"
    [ -f $sysroot/lib/libwinhvplatform.a ] || die "libwinhvplatform.a missing"
    say "toolchain: $("$CC" --version | head -1); mingw-w64-x86-64-dev $(dpkg-query -W -f='${Version}' mingw-w64-x86-64-dev)"
}

# ---------------------------------------------------------------------------------------------
# (a') Windows CPython headers + python3XX.dll import library, cached
private_sources() {
    # deb-src twins of the system's Debian entries (deb822 and one-line), other repos dropped.
    "$PYTHON" - "$1" <<'PY'
import glob, re, sys
out = []
def debian(uri): return re.search(r'/debian(-security)?/?$', uri)
for f in sorted(glob.glob('/etc/apt/sources.list.d/*.sources')):
    for stanza in re.split(r'\n\s*\n', open(f).read()):
        fields = {}
        for line in stanza.splitlines():
            m = re.match(r'([A-Za-z-]+):\s*(.*)', line)
            if m: fields[m.group(1).lower()] = m.group(2).strip()
        if 'deb' not in fields.get('types', '').split() or fields.get('enabled', 'yes') == 'no':
            continue
        for uri in fields.get('uris', '').split():
            if not debian(uri): continue
            for suite in fields.get('suites', '').split():
                signed = f"[signed-by={fields['signed-by']}] " if fields.get('signed-by', '').startswith('/') else ''
                out.append(f"deb-src {signed}{uri} {suite} {fields.get('components', 'main')}")
for f in ['/etc/apt/sources.list'] + sorted(glob.glob('/etc/apt/sources.list.d/*.list')):
    try: lines = open(f).read().splitlines()
    except OSError: continue
    for line in lines:
        m = re.match(r'\s*deb\s+(\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)', line)
        if m and debian(m.group(2)):
            out.append(f"deb-src {m.group(1) or ''}{m.group(2)} {m.group(3)} {m.group(4)}")
if not out:
    codename = dict(l.strip().split('=', 1) for l in open('/etc/os-release') if '=' in l).get('VERSION_CODENAME', 'bookworm').strip('"')
    out.append(f"deb-src http://deb.debian.org/debian {codename} main")
open(sys.argv[1], 'w').write('\n'.join(dict.fromkeys(out)) + '\n')
PY
}

GENDEF_PY='
import pathlib, re, sys
inc, dll = pathlib.Path(sys.argv[1]), sys.argv[2]
pat = re.compile(r"PyAPI_(FUNC|DATA)\s*\(([^()]|\([^()]*\))*\)[\s*()]*([A-Za-z_]\w*)")
names = {}
for f in sorted(inc.rglob("*.h")):
    text = re.sub(r"/\*.*?\*/", " ", f.read_text(errors="replace"), flags=re.S)
    text = re.sub(r"\b_Py_NO_RETURN\b", " ", text)     # an attribute between type and name
    for m in pat.finditer(text):
        if re.match(r"_?Py", m.group(3)):        # drops macro parameters and WASI pthread stubs
            names.setdefault(m.group(3), m.group(1))
print("LIBRARY", dll)
print("EXPORTS")
for n in sorted(names):
    print("    " + n + (" DATA" if names[n] == "DATA" else ""))
'

ensure_pyheaders() {
    PYDIR=$CACHE/cpython-$PYVER-win_amd64-v2
    if [ -f "$PYDIR/.complete" ]; then
        say "CPython headers: cached in $PYDIR ($(cat "$PYDIR/.complete"))"
        return 0
    fi
    command -v apt-get >/dev/null || die "apt-get not found"
    local apt=$CACHE/apt src=$CACHE/src
    rm -rf "$apt" "$PYDIR.tmp"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$src"
    private_sources "$apt/sources.list"
    say "CPython headers: fetching Debian source package python$PYVER via deb-src:"
    sed 's/^/    /' "$apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
                -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
                -o APT::Sandbox::User=root -o Acquire::Languages=none)
    apt-get "${opts[@]}" update -qq >/dev/null || die "apt-get update (deb-src) failed"
    local ver
    ver=$(apt-cache "${opts[@]}" showsrc "python$PYVER" | awk '/^Version:/{print $2}' | sort -V | tail -1)
    [ -n "$ver" ] || die "no source package python$PYVER"
    (cd "$src" && apt-get "${opts[@]}" source -qq --download-only --tar-only "python$PYVER=$ver" >/dev/null) \
        || die "apt-get source python$PYVER=$ver failed"
    local tarball
    tarball=$(ls "$src"/python"$PYVER"_*.orig.tar.* | sort -V | tail -1)
    say "CPython headers: extracting Include/ and PC/pyconfig.h from $(basename "$tarball")"
    local top
    top=$(tar -tf "$tarball" 2>/dev/null | head -1 | cut -d/ -f1 || true)   # head closes the pipe
    [ -n "$top" ] || die "cannot list $tarball"
    mkdir -p "$PYDIR.tmp/x" "$PYDIR.tmp/include"
    tar -xf "$tarball" -C "$PYDIR.tmp/x" "$top/Include" "$top/PC/pyconfig.h"
    cp -r "$PYDIR.tmp/x/$top/Include/." "$PYDIR.tmp/include/"
    cp "$PYDIR.tmp/x/$top/PC/pyconfig.h" "$PYDIR.tmp/include/pyconfig.h"   # Windows layout
    rm -rf "$PYDIR.tmp/x"
    local pv
    pv=$(sed -n 's/^#define PY_VERSION[[:space:]]*"\(.*\)"/\1/p' "$PYDIR.tmp/include/patchlevel.h")
    [[ $pv == $PYVER.* ]] || die "headers say $pv, expected $PYVER.x"
    "$PYTHON" -c "$GENDEF_PY" "$PYDIR.tmp/include" "python$PYNODOT.dll" > "$PYDIR.tmp/python$PYNODOT.def"
    $TRIPLE-dlltool -m i386:x86-64 -d "$PYDIR.tmp/python$PYNODOT.def" -D "python$PYNODOT.dll" \
        -l "$PYDIR.tmp/libpython$PYNODOT.dll.a" || die "dlltool failed"
    "$CC" -dumpspecs | sed 's/-lmsvcrt\b/-lucrt/g' > "$PYDIR.tmp/ucrt.specs"
    echo "CPython $pv from Debian source python$PYVER $ver; $(grep -c '^    ' "$PYDIR.tmp/python$PYNODOT.def") exports in python$PYNODOT.def" \
        > "$PYDIR.tmp/.complete"
    rm -rf "$PYDIR"; mv "$PYDIR.tmp" "$PYDIR"
    rm -rf "$apt" "$src"                     # 47 MB of lists + tarball; the headers are what's kept
    say "CPython headers: $(cat "$PYDIR/.complete")"
}

# ---------------------------------------------------------------------------------------------
# (b) Cython
ensure_cython() {
    if ! "$PYTHON" -c 'import Cython' 2>/dev/null; then
        say "Cython missing in $("$PYTHON" -c 'import sys; print(sys.executable)'); pip install cython"
        "$PYTHON" -m pip install -q 'cython>=3.0' || die "pip install cython failed"
    fi
    say "Cython $("$PYTHON" -c 'import Cython; print(Cython.__version__)') on $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
}

# ---------------------------------------------------------------------------------------------
# (b)-(d) one module: pyx -> c -> o -> pyd, then check the PE file
build_one() {   # build_one PYX OUTDIR ; returns non-zero on any failure (does not exit)
    local pyx out mod c o pyd
    pyx=$(realpath "$1"); out=$2
    mod=$(basename "$pyx" .pyx)
    mkdir -p "$out"; out=$(realpath "$out")
    c=$out/$mod.c; o=$out/$mod.o; pyd=$out/$mod.cp$PYNODOT-win_amd64.pyd
    rm -f "$c" "$o" "$pyd"
    local crt_cflags=() crt_ldflags=()
    if [ "$CRT" = ucrt ]; then
        crt_cflags=(-D_UCRT -D__MSVCRT_VERSION__=0xE00); crt_ldflags=(-specs="$PYDIR/ucrt.specs")
    fi
    # shellcheck disable=SC2086
    run "$PYTHON" -m cython -3 --directive embedsignature=True ${CYTHON_FLAGS:-} -o "$c" "$pyx" || return 1
    # shellcheck disable=SC2086
    run "$CC" -c -O2 -Wall -Wno-unused-function -Wno-unused-variable \
        "${WERROR[@]}" \
        -DMS_WIN64 -DNDEBUG "${crt_cflags[@]}" \
        -I"$PYDIR/include" -I"$(dirname "$pyx")" -I"$ROOT" -I"$ROOT/include" \
        ${EXTRA_CFLAGS:-} "$c" -o "$o" || return 1
    # shellcheck disable=SC2086
    run "$CC" -shared -static-libgcc "${crt_ldflags[@]}" -Wl,--no-undefined -o "$pyd" "$o" \
        -L"$PYDIR" -lpython$PYNODOT -lwinhvplatform ${EXTRA_LDFLAGS:-} || return 1
    check_pyd "$pyd" "$mod" || return 1
    BUILT=$pyd
}

check_pyd() {
    local pyd=$1 mod=$2 dump imports bad
    dump=$($TRIPLE-objdump -p "$pyd") || return 1
    say "check: $(file -b "$pyd")"
    file -b "$pyd" | grep -q 'PE32+ executable (DLL).*x86-64' || { say "FAIL: not a PE32+ x86-64 DLL"; return 1; }
    grep -Eq "^[[:space:]]+\[ *[0-9]+\] PyInit_$mod\$" <<<"$dump" || { say "FAIL: PyInit_$mod not exported"; return 1; }
    imports=$(awk '/DLL Name:/{print tolower($3)}' <<<"$dump" | sort -u)
    say "check: exports PyInit_$mod; imports: $(tr '\n' ' ' <<<"$imports")"
    grep -qx "python$PYNODOT.dll" <<<"$imports" || { say "FAIL: no import from python$PYNODOT.dll"; return 1; }
    # a module that declares the WHP API must really import it (modules without it, e.g. _pages, need not)
    if grep -q winhvplatform "${pyd%.*.pyd}.c" 2>/dev/null || grep -qi winhvplatform <<<"$dump"; then
        grep -qx "winhvplatform.dll" <<<"$imports" || { say "FAIL: no import from WinHvPlatform.dll"; return 1; }
    fi
    bad=$(grep -E '^(lib.*\.dll|msvcr.*\.dll)$' <<<"$imports" || true)
    if [ "$CRT" = msvcrt ]; then bad=$(grep -v '^msvcrt\.dll$' <<<"$bad" || true); fi
    [ -z "$bad" ] || { say "FAIL: imports DLLs a Windows Python does not ship: $bad"; return 1; }
    say "check: WinHvPlatform.dll functions: $(sed -n '/DLL Name: winhvplatform.dll/,/^$/p' <<<"$dump" | awk 'NR>2 && NF>=3 {print $3}' | tr '\n' ' ')"
    say "check: $(sed -n '/DLL Name: python'$PYNODOT'.dll/,/^$/p' <<<"$dump" | awk 'NR>2 && NF>=3' | wc -l) symbols from python$PYNODOT.dll"
}

# ---------------------------------------------------------------------------------------------
self_test() {   # builds the probe, then proves each mistake breaks the build
    local out=$1 probe=$HERE/whp_probe.pyx
    [ -f "$probe" ] || die "$probe missing"
    say "self-test: good probe must build"
    build_one "$probe" "$out/good" || die "self-test: the good probe did not build"
    local cases=(
        "misspelled struct member|s/exit_ctx\.IoPortAccess\.PortNumber/exit_ctx.IoPortAccess.PortNumbr/;s/UINT16 PortNumber\$/UINT16 PortNumbr/"
        "wrong pointer type argument|s/UINT64 \*Bitmap,/UINT32 *Bitmap,/;s/cdef UINT64 bitmap\[4\]/cdef UINT32 bitmap[8]/"
        "integer passed as pointer|s/void \*ExitContext,/UINT64 ExitContext,/;s/&self.exit_ctx, sizeof(WHV_RUN_VP_EXIT_CONTEXT)/<UINT64>self.part, 224/"
        "function missing from the header|s/return WHvCancelRunVirtualProcessor(self.part, 0, 0)/return WHvCancelRunVirtualProcessor2(self.part, 0, 0)/;s/^    HRESULT WHvCancelRunVirtualProcessor(/    HRESULT WHvCancelRunVirtualProcessor2(WHV_PARTITION_HANDLE, UINT32, UINT32)\n&/"
    )
    local entry name expr n=0 bad
    for entry in "${cases[@]}"; do
        name=${entry%%|*}; expr=${entry#*|}; n=$((n + 1))
        bad=$out/bad$n/whp_probe.pyx
        mkdir -p "$(dirname "$bad")"
        sed -e "$expr" "$probe" > "$bad"
        cmp -s "$probe" "$bad" && die "self-test: mutation '$name' changed nothing"
        say "self-test: mistake $n ($name) must FAIL:"
        diff "$probe" "$bad" | sed 's/^/    /' || true
        if (build_one "$bad" "$out/bad$n" > "$out/bad$n/log" 2>&1); then
            cat "$out/bad$n/log"; die "self-test: mistake '$name' built anyway"
        fi
        grep -E 'error:|Error compiling|undefined reference' "$out/bad$n/log" | head -3 | sed 's/^/    -> /'
    done
    say "self-test: good probe built, all $n mistakes rejected"
}

# ---------------------------------------------------------------------------------------------
main() {
    local t0=$SECONDS selftest=0
    if [ "${1:-}" = --self-test ]; then selftest=1; shift; fi
    local pyx=${1:-$ROOT/whpfast/_whp.pyx} out=${2:-$ROOT/build/cross-win_amd64}
    [ $selftest -eq 1 ] && out=${1:-$CACHE/self-test}
    [ $selftest -eq 1 ] || [ -f "$pyx" ] || die "$pyx not found"
    mkdir -p "$CACHE"
    ensure_toolchain
    ensure_cython
    ensure_pyheaders
    say "target: CPython $PYVER win_amd64 ($CRT CRT), headers $PYDIR/include"
    if [ $selftest -eq 1 ]; then
        self_test "$out"
    else
        BUILT=
        build_one "$pyx" "$out" || die "cross build of $pyx failed"
        say "OK: $BUILT"
    fi
    say "done in $((SECONDS - t0)) s"
}

main "$@"
