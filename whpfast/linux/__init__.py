"""The Linux personality: unmodified x86-64 Linux programs at CPL3, every system call served by
the host. `fs` is its file system (pure Python, host side); `errno` its error type."""
