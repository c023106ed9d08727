"""Type aliases of the public API (for annotations only)."""

import os
from typing import Union

StrPath = Union[str, "os.PathLike[str]"]
"""A file name: str or a path object."""

Value = Union[int, float, bytes, str, bool, None]
"""What a guest function takes and returns: int (64-bit), float, bytes, str, bool or None."""
