"""Soak of a Pool of Python sandboxes under hostile requests (issue 16's acceptance): for
--seconds, --threads threads send a mix of ordinary and hostile requests to one Pool of --size
sandboxes, checking every answer; RSS, open fds and mappings of the process are read at the
start (after one warm-up round of every kind) and at the end.

The hostile kinds are those of the trust issue: deep /tmp paths with long names mapped and
resolved back (getcwd, /proc/self/fd), mmap/munmap floods, output floods past the output limit,
endless loops (timeout), memory exhaustion, an `out` to the system-call port from the guest's
own code (a fault: the pool replaces that sandbox), the /proc/self/fd + O_CREAT trick, fork.

    python bench/soak_pool.py --seconds 1200 --size 8      # the 20-minute run of the note
    python bench/soak_pool.py --seconds 20 --size 2        # a quick look

Fails (exit status 1) when an answer is wrong, or when fds, mappings or RSS grew past what the
pool's sandboxes may hold between requests: --fd-slack per sandbox (bounded host-fd caches),
--map-slack, and each sandbox's guest RAM plus --rss-slack MiB."""

import argparse
import collections
import gc
import json
import os
import random
import sys
import threading
import time

import whpfast

SETUP = "import os, mmap, ctypes, errno"
DEEP = """
os.chdir('/tmp')
for i in range(120):
    name = 'd' * 250 + str(i % 10)
    os.mkdir(name); os.chdir(name)
f = open('file', 'wb+'); f.write(b'a' * 8192); f.flush()
for _ in range(40):
    m = mmap.mmap(f.fileno(), 8192, flags=mmap.MAP_PRIVATE); m.close()   # (shared writable: ENODEV)
try:
    os.getcwd(); result = 'cwd'
except OSError as e:
    result = errno.errorcode[e.errno]
try:
    os.readlink(f'/proc/self/fd/{f.fileno()}')
except OSError as e:
    result += ' ' + errno.errorcode[e.errno]
print(result)
"""
MAPS = """
blocks = [mmap.mmap(-1, 1 << 16) for _ in range(400)]
for b in blocks[::2]:
    b.close()
print(len(open('/proc/self/maps').read()) > 0)
"""
FLOOD = """
line = b'y' * 4000 + b'\\n'
try:
    while True:
        os.write(1, line)
except OSError as e:
    print(errno.errorcode[e.errno], file=__import__('sys').stderr)
"""
SPIN = "while True: pass"
MEMORY = "x = []\nwhile True: x.append(bytearray(1 << 24))"
# out 0xE4, al; ret: the system-call port from the guest's own code, not the stub
PORT = """
buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(bytes([0xE6, 0xE4, 0xC3]))
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
ctypes.CFUNCTYPE(None)(addr)()
"""
FDTRICK = """
os.symlink('/etc/passwd', '/tmp/link')
fd = os.open('/tmp/link', os.O_PATH | os.O_NOFOLLOW)
try:
    os.open(f'/proc/self/fd/{fd}', os.O_CREAT | os.O_WRONLY)
    print('opened')
except OSError as e:
    print(errno.errorcode[e.errno])
"""
FORK = """
try:
    os.fork(); print('forked')
except OSError as e:
    print(errno.errorcode[e.errno])
"""

# kind: (code, timeout, check(result or exception) -> bool, weight)
KINDS = {
    "ok":      ("print(1 + 1)", None, lambda r: r.stdout == "2\n" and r.error is None, 40),
    "deep":    (DEEP, 20, lambda r: r.error is None and r.stdout.split()[0] in ("cwd", "ENAMETOOLONG"), 4),
    "maps":    (MAPS, 20, lambda r: r.stdout == "True\n", 4),
    "flood":   (FLOOD, 20, lambda r: r.stderr.endswith("EFBIG\n") or "truncated" in r.stdout, 2),
    "spin":    (SPIN, 0.3, lambda e: isinstance(e, whpfast.GuestTimeout), 3),
    "memory":  (MEMORY, 20, lambda r: r.error is not None and r.error.type == "MemoryError", 2),
    "port":    (PORT, 20, lambda e: isinstance(e, whpfast.GuestFault), 2),
    "fdtrick": (FDTRICK, 20, lambda r: r.stdout == "ELOOP\n", 3),
    "fork":    (FORK, 20, lambda r: r.stdout in ("EAGAIN\n", "ENOSYS\n"), 2),
}


def usage():
    gc.collect()
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) >> 10
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return {"rss_mib": rss, "fds": len(os.listdir("/proc/self/fd")), "maps": maps}


def request(pool, kind):
    code, timeout, check, _ = KINDS[kind]
    try:
        outcome = pool.run(code, timeout=timeout if timeout is not None else 10)
    except whpfast.WhpfastError as e:
        outcome = e
    try:
        return check(outcome), outcome
    except AttributeError:           # an exception where a result was due, or the other way
        return False, outcome


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--memory", type=int, default=128, help="MiB per sandbox")
    parser.add_argument("--rss-slack", type=int, default=64,
                        help="MiB of RSS growth allowed beyond size x memory (the guests' RAM)")
    parser.add_argument("--map-slack", type=int, default=300, help="mappings of growth allowed")
    parser.add_argument("--fd-slack", type=int, default=16,
                        help="fds of growth allowed per sandbox (its bounded caches of host fds)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    with whpfast.PythonSandbox(setup=SETUP, memory_size=args.memory << 20) as box:
        pool = whpfast.Pool(box, size=args.size, max_queue=4 * args.threads)
    counts, bad = collections.Counter(), []
    lock = threading.Lock()
    with pool:
        for kind in KINDS:                                   # warm-up: every kind once
            ok, outcome = request(pool, kind)
            if not ok:
                bad.append((kind, repr(outcome)[:500]))
        start, t0 = usage(), time.monotonic()
        kinds = [k for k, v in KINDS.items() for _ in range(v[3])]

        def worker(seed):
            rng = random.Random(seed)
            while time.monotonic() - t0 < args.seconds:
                kind = rng.choice(kinds)
                ok, outcome = request(pool, kind)
                with lock:
                    counts[kind] += 1
                    if not ok:
                        bad.append((kind, repr(outcome)[:500]))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        end = usage()
        stats = pool.stats()
    figures = {"seconds": round(elapsed, 1), "requests": sum(counts.values()), "by_kind": dict(counts),
               "start": start, "end": end, "wrong_answers": len(bad), "replaced": stats.replaced,
               "failed": stats.failed, "served": stats.served}
    print(json.dumps(figures, indent=1))
    for kind, outcome in bad[:10]:
        print(f"WRONG {kind}: {outcome}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    # A sandbox may come to hold all its guest RAM (the memory hog touches it: a restore copies
    # pages back, it does not give them to the host) and its caches of host fds.
    grew = (end["fds"] > start["fds"] + args.fd_slack * args.size
            or end["maps"] > start["maps"] + args.map_slack
            or end["rss_mib"] > start["rss_mib"] + args.size * args.memory + args.rss_slack)
    return 1 if bad or grew else 0


if __name__ == "__main__":
    sys.exit(main())
