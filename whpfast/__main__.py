"""Command line: `whpfast demo`, `whpfast build-guest foo.c -o foo.elf`, `whpfast --version`
(also as `python -m whpfast ...`)."""

import argparse
import os
import sys
from typing import Optional, Sequence


def program_name() -> str:
    """How the user ran us, for usage lines: `whpfast` (the console script) or `python -m whpfast`."""
    if os.path.basename(sys.argv[0] or "") in ("__main__.py", "-m", "-c", ""):
        return "python -m whpfast"
    return "whpfast"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line; returns the exit status. whpfast's own errors (no usable
    hypervisor, a guest that fails, ...) are printed as one line, not a traceback."""
    from . import __version__
    from .errors import WhpfastError

    argv = sys.argv[1:] if argv is None else list(argv)
    prog = program_name()
    if argv[:1] == ["build-guest"]:
        from .guestbuild import main as build_main
        return build_main(argv[1:], prog=f"{prog} build-guest")
    # Python sandboxes (whpfast/python): `run-python` and the benchmark report `bench`.
    if argv[:1] == ["run-python"]:
        from .python.cli import main as run_python_main
        return run_python_main(argv[1:], prog=f"{prog} run-python")
    if argv[:1] == ["bench"]:
        from .python.bench import main as bench_main
        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog=prog, description="Hardware-isolated micro-VM sandboxes that warm-start in microseconds.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    demo = sub.add_parser("demo", help="start a sandbox, call into it, snapshot it and warm-start it, "
                                       "printing latencies")
    demo.add_argument("--calls", type=_positive, default=3000, help="timed calls per measurement")
    demo.add_argument("--python", action="store_true",
                      help="the Python warm-start demo: hello_world and pandas vs subprocess and os.fork()")
    sub.add_parser("build-guest", help="build a guest ELF from C sources (see build-guest --help)")
    sub.add_parser("run-python", help="run Python code in a warm-started sandbox (see run-python --help)")
    sub.add_parser("bench", help="run the benchmarks and write the report (see bench --help)")
    args = parser.parse_args(argv)
    try:
        if args.python:         # the Python warm-start demo (whpfast/python)
            from .python.bench import demo as python_demo
            return python_demo()
        from .demo import main as demo_main
        return demo_main(args.calls)
    except WhpfastError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `whpfast demo | head`: the reader left; stop quietly (and let the interpreter's final
        # flush of stdout go to /dev/null instead of failing again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
