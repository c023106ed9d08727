"""The warm-start core both personalities own: `Sandbox` (SDK guests, whpfast/sandbox.py) and
`LinuxSandbox` (Linux programs) are thin layers over it. warm.py: guest memory, dirty tracking,
the host's writes, the hot set, snapshot and restore of memory and vCPU state; run.py: a run
against a deadline."""
