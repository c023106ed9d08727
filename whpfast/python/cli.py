"""`whpfast run-python [-c CODE | FILE | -] [--setup CODE] [--python EXE] [--read PATH ...]
[--package NAME ... | --all-packages] [--stream]`: runs
CODE (or the file FILE, or stdin for `-`) in a fresh PythonSandbox and reports like `python`
would (its stdout and stderr, the traceback, an exit status of 1 when the code raised,
sys.exit()'s status). With --stream the output is written as the guest writes it, not at the end. With --save PATH it also writes the warm snapshot; with --snapshot PATH it
starts from one instead of booting (the file may use no more than --python, --read and --memory
grant). With --state FILE the code runs as a cell of a session: against the live state saved in
FILE (booting with --setup when FILE does not exist yet), which is then saved back to FILE
(atomically; also after the code raised, whose state is kept; not after a timeout). Exit status 2 is a usage error; whpfast's own errors (no usable /dev/kvm, a timeout, a
refused policy or snapshot) are one line on stderr and status 1."""

import argparse
import sys


def main(argv, prog="whpfast run-python"):
    parser = argparse.ArgumentParser(prog=prog, description="run Python code in a warm-started micro-VM")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", dest="code", help="the code to run")
    source.add_argument("file", nargs="?", help="a file of Python code to run ('-': standard input)")
    parser.add_argument("--setup", default="", help="code run once before the warm snapshot")
    parser.add_argument("--python", default=None, help="the interpreter (default: this one)")
    parser.add_argument("--read", action="append", default=[], help="another host path the guest may read")
    parser.add_argument("--package", action="append", default=None, dest="packages",
                        help="an installed package the code may import besides those --setup imports")
    parser.add_argument("--all-packages", action="store_const", const="all", dest="packages",
                        help="every installed package may be imported")
    parser.add_argument("--memory", type=int, default=512, help="guest memory in MiB (default 512)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds the code may run (default 60)")
    parser.add_argument("--snapshot", help="start from this saved snapshot instead of booting")
    parser.add_argument("--save", help="also save the warm snapshot to this path")
    parser.add_argument("--state", help="a session file: run the code against the live state saved "
                                        "there (created on first use) and save the new state back")
    parser.add_argument("--stream", action="store_true",
                        help="write the output as the guest writes it (default: when the code ends)")
    args = parser.parse_args(argv)
    if args.snapshot and args.setup:
        parser.error("--snapshot cannot be combined with --setup")
    if args.state and (args.snapshot or args.save):
        parser.error("--state cannot be combined with --snapshot or --save")
    import os
    resume = bool(args.state) and os.path.exists(args.state)
    if resume and args.setup:
        parser.error("--setup applies when the --state file is created; it exists already")
    code = args.code
    if code is None:
        try:
            if args.file == "-":
                code = sys.stdin.read()
            else:
                with open(args.file, encoding="utf-8") as f:
                    code = f.read()
        except (OSError, UnicodeDecodeError) as e:
            print(f"{prog}: cannot read {args.file}: {e}", file=sys.stderr)
            return 1

    from ..errors import WhpfastError
    from .sandbox import PythonSandbox
    try:
        if args.snapshot or resume:
            # the file is untrusted: --python, --read and --memory are what it may use
            sb = PythonSandbox.from_snapshot(args.snapshot or args.state, python=args.python,
                                             read=args.read, memory_size=args.memory << 20)
        else:
            sb = PythonSandbox(python=args.python, setup=args.setup, read=args.read,
                               memory_size=args.memory << 20, packages=args.packages)
        with sb:
            if args.save:
                sb.save(args.save)
            result = sb.run(code, timeout=args.timeout, fresh=not args.state,
                            on_output=_write if args.stream else None)
            if args.state:
                sb.checkpoint().save(args.state)
    except WhpfastError as e:
        print(f"{prog}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not args.stream:
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
    if result.error is None:
        return 0
    if result.error.type == "SystemExit":
        # As `python -c` does: sys.exit(n) is the status, sys.exit("why") prints why.
        arg = result.error.message
        if arg in ("", "None"):
            return 0
        if arg.lstrip("-").isdigit():
            return int(arg) & 0xFF
        sys.stderr.write(arg + "\n")
        return 1
    sys.stderr.write(result.error)
    return 1


def _write(stream, text):
    """--stream's on_output: the guest's text to our stdout or stderr, at once."""
    out = sys.stdout if stream == "stdout" else sys.stderr
    out.write(text)
    out.flush()
