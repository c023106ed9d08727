"""`whpfast demo` (`python -m whpfast demo`): start a sandbox, call into it, snapshot it, then
warm-start it (restore + call) over and over, printing the latencies measured."""

import time

from .backend import hypervisor
from . import guests
from .sandbox import Sandbox
from .timing import summary, time_calls


def main(calls: int = 3000) -> int:
    print(f"hypervisor: {hypervisor()}")
    printed = []
    t0 = time.perf_counter_ns()
    with Sandbox(guests.testkit, memory_size=16 << 20, on_print=printed.append) as sb:
        created = time.perf_counter_ns() - t0
        greeting = sb.call("hello")
        print(f"sandbox created in {created / 1e6:.2f} ms; the guest printed {''.join(printed)!r} "
              f"and returned {greeting!r}")
        print(summary("call add(2, 3)", time_calls(lambda: sb.call("add", 2, 3), calls)))
        payload = bytes(range(256)) * 16
        print(summary("call echo(4 KiB)", time_calls(lambda: sb.call("echo", payload), calls)))
        # Warm start: snapshot once, then restore and call again, over and over.
        snap = sb.snapshot()
        print(summary("restore + call hello()",
                      time_calls(lambda: (sb.restore(snap), sb.call("hello")), calls)))
        last = sb.last_restore
        print(f"  each restore: {last.pages_copied + last.pages_zeroed} pages reset, "
              f"{last.hypervisor_calls} hypervisor calls, {last.ns / 1000:.1f} us")
    return 0
