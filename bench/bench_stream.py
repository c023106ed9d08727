"""Streamed output of a PythonSandbox (issue 20 item 3): a cell printing 10,000 lines, run with
its output collected at the end (the baseline, no listener) and streamed to an on_output
callback, and through stream(), interleaved in one process so all see the same machine.

    python bench/bench_stream.py [--reps 30] [--lines 10000]

Reports per mode the median and p90/p99 of a run's wall time and its ratio to the baseline's
median (goal: <= 1.2x), and for the streamed modes the first line's latency: the guest stamps
its first line with time.time_ns() just before printing it (the guest's wall clock is the
host's, vDSO), the host stamps its arrival in the callback (goal: <= 1 ms)."""

import argparse
import asyncio
import sys
import time

import numpy as np

import whpfast


def cell(lines):
    return (f"import time\nprint(time.time_ns())\nfor i in range(1, {lines}):\n"
            f"    print('line', i)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--lines", type=int, default=10000)
    args = parser.parse_args(argv)
    code = cell(args.lines)
    times = {"collected": [], "on_output": [], "stream()": []}
    first = {"on_output": [], "stream()": []}
    chunks = {"on_output": [], "stream()": []}

    with whpfast.PythonSandbox(warmup=code) as sb:
        want = sb.run(code).stdout.count("\n")
        assert want == args.lines, want

        def collected():
            return sb.run(code)

        def on_output():
            got = []
            r = sb.run(code, on_output=lambda s, t: got.append((t, time.time_ns())))
            return r, got

        async def streamed():
            got = []
            async for event in sb.stream(code):
                if isinstance(event, whpfast.Output):
                    got.append((event.text, time.time_ns()))
                else:
                    result = event
            return result, got

        loop = asyncio.new_event_loop()
        for rep in range(args.reps + 2):          # the first two: warm-up, not counted
            for mode in times:
                t0 = time.perf_counter_ns()
                if mode == "collected":
                    r, got = collected(), None
                elif mode == "on_output":
                    r, got = on_output()
                else:
                    r, got = loop.run_until_complete(streamed())
                elapsed = time.perf_counter_ns() - t0
                assert r.error is None and r.stdout.count("\n") == args.lines, r.error
                if rep < 2:
                    continue
                times[mode].append(elapsed)
                if got is not None:
                    assert "".join(t for t, _ in got) == r.stdout
                    stamp = int(got[0][0].split("\n", 1)[0])
                    first[mode].append(got[0][1] - stamp)
                    chunks[mode].append(len(got))
        loop.close()

    base = np.median(np.array(times["collected"], dtype=float))
    print(f"{args.lines} lines, {args.reps} runs per mode, interleaved ({whpfast.backend.NAME})")
    for mode, values in times.items():
        a = np.array(values, dtype=float) / 1e6
        line = (f"  {mode:10s} median {np.median(a):7.2f} ms  p90 {np.percentile(a, 90):7.2f}  "
                f"p99 {np.percentile(a, 99):7.2f}  ({np.median(a) * 1e6 / base:.2f}x collected)")
        if mode in first:
            f = np.array(first[mode], dtype=float) / 1e3
            line += (f"  first line {np.median(f):6.0f} us median, p90 {np.percentile(f, 90):6.0f}, "
                     f"max {f.max():6.0f}; {np.median(chunks[mode]):.0f} chunks")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
