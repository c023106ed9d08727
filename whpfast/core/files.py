"""Which host files may be mapped into a sandbox's memory rather than copied: one rule for every
file a sandbox's pages can come from (snapshot files of both personalities, the host files a
Linux program maps or a Linux snapshot refers to)."""

import os
import stat


def shareable(st: os.stat_result) -> bool:
    """Whether pages of the host file with this stat may be mapped (MAP_PRIVATE) rather than
    copied: only regular files that no user other than root and this process's owner can write
    (owner one of them, not group- or world-writable). A mapped file truncated under the
    sandbox would make the host's own accesses (a restore's copy, the hypervisor's fault) end
    in SIGBUS, killing the process and every sandbox in it, and pages of a file changed in
    place change for the guest too until it writes them (MAP_PRIVATE semantics); root and this
    process's own user can do that anyway. (Windows has no euid, and refuses to truncate a
    file that has a mapped view: there every regular file may be mapped.)"""
    if not stat.S_ISREG(st.st_mode):
        return False
    if not hasattr(os, "geteuid"):
        return True
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022
