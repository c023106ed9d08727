"""`whpfast run-python -c CODE [--setup CODE] [--python EXE] [--read PATH ...]`: runs CODE in a
fresh PythonSandbox and reports like `python -c` would (its stdout and stderr, the traceback, an
exit status of 1 when the code raised, sys.exit()'s status). With --save PATH it also writes the warm snapshot;
with --snapshot PATH it starts from one instead of booting (the file may use no more than --python,
--read and --memory grant)."""

import argparse
import sys


def main(argv):
    parser = argparse.ArgumentParser(prog="whpfast run-python",
                                     description="run Python code in a warm-started micro-VM")
    parser.add_argument("-c", dest="code", required=True, help="the code to run")
    parser.add_argument("--setup", default="", help="code run once before the warm snapshot")
    parser.add_argument("--python", default=None, help="the interpreter (default: this one)")
    parser.add_argument("--read", action="append", default=[], help="another host path the guest may read")
    parser.add_argument("--memory", type=int, default=512, help="guest memory in MiB (default 512)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds the code may run (default 60)")
    parser.add_argument("--snapshot", help="start from this saved snapshot instead of booting")
    parser.add_argument("--save", help="also save the warm snapshot to this path")
    args = parser.parse_args(argv)

    from ..errors import WhpfastError
    from .sandbox import PythonSandbox
    try:
        if args.snapshot:
            if args.setup:
                parser.error("--snapshot cannot be combined with --setup")
            # the file is untrusted: --python, --read and --memory are what it may use
            sb = PythonSandbox.from_snapshot(args.snapshot, python=args.python, read=args.read,
                                             memory_size=args.memory << 20)
        else:
            sb = PythonSandbox(python=args.python, setup=args.setup, read=args.read,
                               memory_size=args.memory << 20)
        with sb:
            if args.save:
                sb.save(args.save)
            result = sb.run(args.code, timeout=args.timeout)
    except WhpfastError as e:
        print(f"whpfast: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.write(result.stderr)
    if result.error is None:
        return 0
    last = result.error.rstrip("\n").rpartition("\n")[2]
    if last == "SystemExit" or last.startswith("SystemExit: "):
        # As `python -c` does: sys.exit(n) is the status, sys.exit("why") prints why.
        arg = last[len("SystemExit: "):]
        if arg in ("", "None"):
            return 0
        if arg.lstrip("-").isdigit():
            return int(arg) & 0xFF
        sys.stderr.write(arg + "\n")
        return 1
    sys.stderr.write(result.error)
    return 1
