# The guest page, for every extension module (textually included by _kvm.pyx, _whp.pyx, _pages.pyx
# and _linux.pyx): the one compile-time copy of whpfast.abi.PAGE, which whpfast.backend checks
# against the backend's PAGE at import.
DEF PAGE_SIZE = 4096
