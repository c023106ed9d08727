"""Python sandboxes that warm-start: PythonSandbox (sandbox.py) runs a CPython interpreter in a
LinuxSandbox with the in-guest driver (driver.py)."""

from .sandbox import FileInfo, Files, Output, PythonError, PythonResult, PythonSandbox

__all__ = ["PythonSandbox", "PythonResult", "PythonError", "Output", "Files", "FileInfo"]
