#!/bin/sh
# Installs what tests/system-packages.txt lists and this machine lacks (Debian and derivatives:
# apt-get, through sudo when not root). The first step of README.md's test command.
set -eu
list="$(dirname "$0")/system-packages.txt"
packages=$(sed 's/#.*//' "$list" | tr -s ' \t' '\n\n' | grep -v '^$')
if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "system-packages.sh: not a Debian system; the tests need the equivalents of:" $packages >&2
    exit 0
fi
missing=""
installed() { dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q '^install ok installed$'; }
for entry in $packages; do          # "a|b": either will do; the first is installed when neither is
    found=""
    for p in $(echo "$entry" | tr '|' ' '); do installed "$p" && found=1; done
    [ -n "$found" ] || missing="$missing ${entry%%|*}"
done
[ -z "$missing" ] && exit 0
echo "system-packages.sh: installing$missing"
as_root=""
[ "$(id -u)" -eq 0 ] || as_root="sudo"
$as_root apt-get update -q
$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
