"""The warm-start core both personalities own: `Sandbox` (SDK guests, whpfast/sandbox.py) and
`LinuxSandbox` (Linux programs) are thin layers over it. See warm.py."""
