"""Command line: `python -m whpfast demo` and `python -m whpfast build-guest foo.c -o foo.elf`."""

import argparse
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["build-guest"]:
        from .guestbuild import main as build_main
        return build_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m whpfast")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="start a sandbox, call into it and print latencies")
    demo.add_argument("--calls", type=int, default=3000, help="timed calls per measurement")
    sub.add_parser("build-guest", help="build a guest ELF from C sources (see build-guest --help)")
    args = parser.parse_args(argv)
    from .demo import main as demo_main
    return demo_main(args.calls)


if __name__ == "__main__":
    sys.exit(main())
