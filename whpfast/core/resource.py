"""What every sandbox kind (Sandbox, LinuxSandbox, PythonSandbox) shares as a resource: the
context-manager protocol, and the last-resort cleanup of one that was never closed."""

import warnings
from typing import TypeVar

R = TypeVar("R", bound="Resource")


class Resource:
    """close() frees everything and is idempotent (each subclass defines it); `with` closes; an
    unclosed one warns (ResourceWarning) when it is collected and is freed then."""

    _closed = True          # until a subclass's constructor has built everything

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: R) -> R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self.close()
