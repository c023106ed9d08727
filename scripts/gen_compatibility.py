"""Writes docs/compatibility.md from the system call table (whpfast/linux/syscalls.py, SYSCALLS):
run it after changing the table. --check: exit 1, writing nothing, when the page is stale
(tests/test_linux_syscall_table.py checks the same). Run with the installed whpfast."""

import argparse
import pathlib
import sys

from whpfast.linux.syscalls import compatibility_page

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "compatibility.md"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only say whether the page is stale")
    args = parser.parse_args()
    text = compatibility_page()
    current = PAGE.read_text() if PAGE.exists() else None
    if args.check:
        if current != text:
            print(f"{PAGE} is stale: run python scripts/gen_compatibility.py", file=sys.stderr)
            return 1
        return 0
    if current != text:
        PAGE.write_text(text)
        print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
