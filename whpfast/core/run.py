"""Running a vCPU against a deadline: the same for every personality."""

import time

from .. import backend


def run_until(vcpu, deadline):
    """Runs vcpu to its next exit and returns the exit kind. deadline (a time.monotonic_ns()
    value, or None for none) bounds the run: past it the guest is stopped and the kind is
    EXIT_TIMEOUT, and a deadline already past does not enter the guest at all."""
    if deadline is None:
        return vcpu.run()
    remaining = deadline - time.monotonic_ns()
    return vcpu.run(remaining) if remaining > 0 else backend.impl.EXIT_TIMEOUT
