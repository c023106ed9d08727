"""Guests shipped with whpfast, as paths to their ELF files (built from C with the SDK when the
package is built). `testkit` exports the functions the tests and benchmarks rely on; see
testkit.c for the contract."""

from pathlib import Path

_HERE = Path(__file__).resolve().parent

testkit = str(_HERE / "testkit.elf")
