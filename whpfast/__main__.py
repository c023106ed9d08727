"""Command line: `python -m whpfast demo` and `python -m whpfast build-guest foo.c -o foo.elf`."""

import argparse
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["build-guest"]:
        from .guestbuild import main as build_main
        return build_main(argv[1:])
    # Python sandboxes (whpfast/python): `run-python` and the benchmark report `bench`.
    if argv[:1] == ["run-python"]:
        from .python.cli import main as run_python_main
        return run_python_main(argv[1:])
    if argv[:1] == ["bench"]:
        from .python.bench import main as bench_main
        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m whpfast")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="start a sandbox, call into it and print latencies")
    demo.add_argument("--calls", type=int, default=3000, help="timed calls per measurement")
    demo.add_argument("--python", action="store_true",
                      help="the Python warm-start demo: hello_world and pandas vs subprocess and os.fork()")
    sub.add_parser("build-guest", help="build a guest ELF from C sources (see build-guest --help)")
    sub.add_parser("run-python", help="run Python code in a warm-started sandbox (see run-python --help)")
    sub.add_parser("bench", help="run the benchmarks and write the report (see bench --help)")
    args = parser.parse_args(argv)
    if args.command == "demo" and args.python:
        from .python.bench import demo as python_demo
        return python_demo()
    from .demo import main as demo_main
    return demo_main(args.calls)


if __name__ == "__main__":
    sys.exit(main())
