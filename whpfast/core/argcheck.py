"""Checks of the arguments every sandbox kind takes, so that one mistake gets one answer
whatever the kind: a value of the wrong type is a TypeError, a value of the right type out of
range a ConfigError (also a ValueError), each saying what was expected."""

import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError

MIB = 1 << 20


def _bytes(n: int) -> str:
    return f"{n >> 20} MiB" if n >= MIB and n % MIB == 0 else f"{n >> 10} KiB" if n % 1024 == 0 else f"{n} bytes"


def size(value: Any, what: str, *, minimum: int, maximum: int, multiple: int) -> int:
    """An int number of bytes, a multiple of `multiple`, between minimum and maximum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int number of bytes, not {type(value).__name__} {value!r}")
    if not minimum <= value <= maximum or value % multiple:
        raise ConfigError(f"{what} must be a multiple of {_bytes(multiple)} between {_bytes(minimum)} "
                          f"and {_bytes(maximum)}, got {value}")
    return value


def flag(value: Any, what: str) -> bool:
    """A bool: a truthy string such as 'yes' is a mistake, not a yes."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, not {type(value).__name__} {value!r}")
    return value


def read_policy(value: Any, what: str = "read") -> Any:
    """A read policy as the Linux and Python sandboxes take it: a host path, an iterable of host
    paths, or a {inside: host} mapping (its entries are checked where they are used)."""
    if isinstance(value, (str, bytes, os.PathLike, Mapping)):
        return value
    if not isinstance(value, Iterable):
        raise TypeError(f"{what} must be a host path, a list of host paths or an {{inside: host}} "
                        f"mapping, not {type(value).__name__} {value!r}")
    return value
