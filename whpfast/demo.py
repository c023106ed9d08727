"""`python -m whpfast demo`: start a sandbox, call into it, and print the latencies measured."""

import time

from . import guests
from .backend import hypervisor
from .sandbox import Sandbox
from .timing import summary, time_calls


def main(calls=3000):
    print(f"hypervisor: {hypervisor()}")
    t0 = time.perf_counter_ns()
    with Sandbox(guests.testkit, memory_size=16 << 20) as sb:
        created = time.perf_counter_ns() - t0
        print(f"sandbox created in {created / 1e6:.2f} ms; guest says: ", end="", flush=True)
        greeting = sb.call("hello")
        assert greeting == "hello world", greeting
        print(summary("call add(2, 3)", time_calls(lambda: sb.call("add", 2, 3), calls)))
        payload = bytes(range(256)) * 16
        print(summary("call echo(4 KiB)", time_calls(lambda: sb.call("echo", payload), calls)))
    return 0
