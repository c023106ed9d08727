"""The interpreter a PythonSandbox runs, as the guest sees it: which host files it reads, and at
which inside paths.

What the guest learns of the host is what the policy shows it. System directories (/usr, /lib,
/bin, /etc, ...) hold what any Linux machine holds and are shown at their own paths; an
interpreter or venv anywhere else (a home directory, ~/.pyenv, a CI checkout in /tmp) is shown
at a neutral path instead -- its base installation at /opt/python, a venv at /opt/venv with a
pyvenv.cfg made up to match -- so sys.prefix, tracebacks and /proc/self/maps name no host path.

What the guest may read is the interpreter's own files: the executable, the standard library
(with lib-dynload), the system library directories its extension modules load from (LIB_DIRS),
and its site-packages directories (`site`). A PythonSandbox narrows the site-packages to the
entries its boot and setup looked up plus those the caller lists (`packages`) before its first
snapshot (narrowed())."""

import functools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, Mapping, Optional, Tuple

from ..errors import SandboxError

# System library directories the dynamic loader and the interpreter's extension modules need, and
# what an interpreter's own packages load from outside its prefix: Debian's alternatives (numpy's
# libblas.so.3 and liblapack.so.3 are symlinks through /etc/alternatives, which holds symlinks
# only), the time-zone database (zoneinfo, pandas, dateutil) and the compiled locales (glibc's
# C.UTF-8, which the sandbox's LANG names, is a file there: locale.setlocale(LC_ALL, "") needs it).
LIB_DIRS = ("/lib64", "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib64",
            "/etc/alternatives", "/usr/share/zoneinfo", "/usr/lib/locale")
# Shown at their own paths: what a Linux system has anyway. Anything else is the host's own.
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc")
BASE_VIEW, VENV_VIEW = "/opt/python", "/opt/venv"

# What the interpreter says of itself (run as `python -I -c PROBE`, or here for this process).
PROBE = """\
import json, os, site, sys, sysconfig
print(json.dumps({"prefix": sys.prefix, "base_prefix": sys.base_prefix,
                  "version": "%d.%d" % sys.version_info[:2],
                  "stdlib": sysconfig.get_path("stdlib"), "platstdlib": sysconfig.get_path("platstdlib"),
                  "zip": [p for p in sys.path if p.endswith(".zip")],
                  "site": site.getsitepackages()}))
"""


def _system(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS)


@dataclass(frozen=True)
class Interpreter:
    """An interpreter's files as the guest sees them. `read` ({inside: host}) is its policy
    without site-packages, `site` ({inside: host}) its site-packages directories, `argv0` the
    inside path it runs as, `extra_files` what is made up for it (a venv's pyvenv.cfg), `env`
    what its loader needs (LD_LIBRARY_PATH when libpython sits under a moved prefix)."""
    python: str
    argv0: str
    read: Mapping[str, str]
    site: Mapping[str, str]
    extra_files: Mapping[str, Optional[bytes]]
    env: Mapping[str, str]

    def policy(self, packages: Optional[FrozenSet[str]] = None) -> Tuple[Dict[str, str], Dict[str, Optional[bytes]]]:
        """(read policy, extra files): with `packages` None, every site-packages directory
        whole; else each shown as an empty directory (over whatever the host has there, such as
        a base installation's site-packages inside its stdlib) holding only the entries that
        belong to one of those names (see _belongs)."""
        read, extra = dict(self.read), dict(self.extra_files)
        if packages is None:
            read.update(self.site)
        else:
            extra.update(dict.fromkeys(self.site))
            read.update(self.site_entries(packages))
        return read, extra

    def site_entries(self, packages: FrozenSet[str]) -> Dict[str, str]:
        """{inside: host} of the site-packages entries that belong to one of `packages`."""
        normal = {_normal(p) for p in packages}
        return {f"{inside}/{n}": f"{host}/{n}" for inside, host in self.site.items()
                for n in _listdir(host) if _belongs(n, packages, normal)}


_DIST_SEP = re.compile(r"[-_.]+")


def _normal(name: str) -> str:
    return _DIST_SEP.sub("_", name).lower()


def _belongs(entry: str, packages: FrozenSet[str], normal: FrozenSet[str]) -> bool:
    """Whether the site-packages entry `entry` is part of one of `packages` (import or
    distribution names): the package itself (`pkg`, `pkg.py`, `pkg.cpython-311-...so`), what
    ships beside it (`pkg.libs`, a wheel's vendored libraries) and its metadata
    (`pkg-1.0.dist-info`, `pkg-1.0.egg-info`, `pkg-1.0-nspkg.pth`). normal: the _normal()
    forms of packages."""
    if entry in packages:
        return True
    head = entry.split(".", 1)[0]
    return _normal(head.split("-", 1)[0]) in normal or head in packages


def describe(python: str) -> Interpreter:
    """The Interpreter of the host interpreter `python` (an absolute path). SandboxError when it
    cannot be asked (not there, not a CPython)."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        facts = _probe_here()
    else:
        try:
            st = os.stat(python)
        except OSError as e:
            raise SandboxError(f"cannot ask the interpreter {python} for its library paths "
                               f"({e.strerror}); pass python= a working CPython") from None
        facts = _ask(python, st.st_dev, st.st_ino, st.st_mtime_ns)
    return _layout(python, facts)


@functools.lru_cache(maxsize=1)
def _probe_here() -> Dict:
    import io
    from contextlib import redirect_stdout
    out = io.StringIO()
    with redirect_stdout(out):
        exec(PROBE, {})
    return json.loads(out.getvalue())


@functools.lru_cache(maxsize=64)
def _ask(python: str, *identity: int) -> Dict:
    """The probe's answer from another interpreter (once per path and file identity): two venvs
    of one base Python resolve to the same binary but have their own site-packages."""
    try:
        out = subprocess.run([python, "-I", "-c", PROBE], capture_output=True, check=True,
                             timeout=60).stdout
        facts = json.loads(out)
        if not isinstance(facts, dict):
            raise ValueError("not a mapping")
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise SandboxError(f"cannot ask the interpreter {python} for its library paths ({e}); "
                           f"pass python= a working CPython") from None
    return facts


def _venv_config(prefix: str) -> Dict[str, str]:
    """The key = value lines of a venv's pyvenv.cfg (the caller's own file)."""
    try:
        with open(os.path.join(prefix, "pyvenv.cfg"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    pairs = (line.partition("=") for line in lines)
    return {k.strip().lower(): v.strip() for k, sep, v in pairs if sep}


def _layout(python: str, facts: Dict) -> Interpreter:
    prefix, base = os.path.normpath(facts["prefix"]), os.path.normpath(facts["base_prefix"])
    venv = prefix != base
    views: Dict[str, str] = {}          # host prefix -> where it is shown
    if not _system(base):
        views[base] = BASE_VIEW
    if venv and not _system(prefix):
        views[prefix] = VENV_VIEW

    def inside(host: str) -> Optional[str]:
        host = os.path.normpath(host)
        for p in sorted(views, key=len, reverse=True):
            if host == p or host.startswith(p + "/"):
                return views[p] + host[len(p):]
        return host if _system(host) else None

    real = os.path.realpath(python)
    argv0 = f"{inside(prefix)}/bin/{os.path.basename(python)}"   # where getpath looks for a prefix
    read: Dict[str, str] = {argv0: real}
    stdlib, platstdlib = facts["stdlib"], facts["platstdlib"]
    # (a venv's platstdlib is its own lib/pythonX.Y, which holds only its site-packages)
    dynload = [] if platstdlib == stdlib else [os.path.join(platstdlib, "lib-dynload")]
    for host in [stdlib, *dynload, *facts["zip"], *LIB_DIRS]:
        where = inside(host)
        if where is not None and os.path.exists(host):
            read[where] = host
    env: Dict[str, str] = {}
    extra: Dict[str, Optional[bytes]] = {}
    if base in views:
        # A relocatable build (pyenv, uv, python.org) finds libpython through an absolute RUNPATH
        # naming the host prefix: the loader is pointed at the moved one instead.
        lib = os.path.join(base, "lib")
        libs = sorted(n for n in _listdir(lib) if n.startswith("libpython"))
        for n in libs:
            read[f"{BASE_VIEW}/lib/{n}"] = os.path.join(lib, n)
        if libs:
            env["LD_LIBRARY_PATH"] = f"{BASE_VIEW}/lib"
    if venv:
        cfg = _venv_config(prefix)
        system_site = cfg.get("include-system-site-packages", "false").lower() == "true"
        extra[f"{inside(prefix)}/pyvenv.cfg"] = (
            f"home = {inside(base)}/bin\ninclude-system-site-packages = "
            f"{'true' if system_site else 'false'}\nversion = {cfg.get('version', facts['version'])}\n"
        ).encode()
    site = {}
    for host in facts["site"]:
        where = inside(host)
        if where is not None and os.path.isdir(host):
            site[where] = host
    return Interpreter(os.path.abspath(python), argv0, read, site, extra, env)


def _listdir(path: str) -> Tuple[str, ...]:
    try:
        return tuple(os.listdir(path))
    except OSError:
        return ()
