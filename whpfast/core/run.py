"""Running a vCPU against a deadline: the same for every personality."""

import time

from .hypervisor import Exit
from ..errors import ConfigError

EXIT_TIMEOUT = Exit.TIMEOUT

# A timeout this long (or inf) is no timeout: deadlines are int64 nanoseconds.
MAX_TIMEOUT = 1e9
# Seconds a request of untrusted code (PythonSandbox.run/eval, a Pool's requests) may run when
# its caller gives no timeout: bounded by default, math.inf to lift it.
DEFAULT_RUN_TIMEOUT = 30.0


def run_timeout(value, what="timeout"):
    """A run timeout as given to call()/run(): a positive number of seconds, or None for none
    (also math.inf, or MAX_TIMEOUT seconds and more). Not a number (a str, a bool): TypeError;
    zero, negative or NaN: ConfigError (a ValueError), as for every argument (core/argcheck.py)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a positive number of seconds or None, not "
                        f"{type(value).__name__} {value!r}")
    if not value > 0:
        raise ConfigError(f"{what} must be a positive number of seconds or None, got {value!r}")
    return None if value >= MAX_TIMEOUT else value


def request_timeout(value, what="timeout"):
    """The timeout of a request of untrusted code as given: None means DEFAULT_RUN_TIMEOUT (read
    at each request), math.inf none at all, else a positive number of seconds (checked as
    run_timeout checks it). Returns a number, inf for none, which run_timeout() takes."""
    if value is None:
        return DEFAULT_RUN_TIMEOUT
    run_timeout(value, what)
    return value


def run_until(vcpu, deadline):
    """Runs vcpu to its next exit and returns the exit kind. deadline (a time.monotonic_ns()
    value, or None for none) bounds the run: past it the guest is stopped and the kind is
    EXIT_TIMEOUT, and a deadline already past does not enter the guest at all."""
    if deadline is None:
        return vcpu.run()
    remaining = deadline - time.monotonic_ns()
    return vcpu.run(remaining) if remaining > 0 else EXIT_TIMEOUT
