"""The system call table of the Linux personality, as data (after gVisor's linux64.go): SYSCALLS
maps every x86-64 number to one Syscall entry: its name, its handler or its refusal, a support
status and a note. Everything else is derived from it here, in one place: the dispatch dicts,
the names `unsupported_syscalls` counts by, and the compatibility page of the docs
(docs/compatibility.md, written by scripts/gen_compatibility.py from `compatibility_page()`).

The statuses:
- supported: served as Linux serves it, within the sandbox's model (one process, one thread, the
  file system its read= policy shows).
- partial: served, with the difference the note names.
- constant: answered with a fixed value (the C dispatcher answers it without a Python call).
- refused: fails with a fixed errno on purpose (the note says why); not counted.
- unimplemented: ENOSYS, counted by name in LinuxSandbox.unsupported_syscalls.

The handlers are grouped by family, in sys_file.py, sys_mm.py, sys_proc.py, sys_time.py and
sys_signal.py; each takes the Task (whpfast/linux/task.py) and the six raw argument registers
(unsigned 64-bit), returns a non-negative result or raises LinuxError. `dispatch()` is the one
place an error becomes -errno and an unknown number becomes ENOSYS; it stays one dict lookup."""

import errno as E
from typing import Callable, NamedTuple, Optional

from .errno import LinuxError
from .mm import PURE_PYTHON
from . import sys_file, sys_mm, sys_proc, sys_signal, sys_time
from .task import PID, UID, fail

STATUSES = ("supported", "partial", "constant", "refused", "unimplemented")


class Syscall(NamedTuple):
    """One entry of SYSCALLS. handler: handler(task, a0..a5) for a supported, partial or
    refused call (a refusal's raises LinuxError(errno)), None for an unimplemented one; value: a
    constant's answer; errno: a refusal's."""
    name: str
    status: str
    handler: Optional[Callable]
    note: str = ""
    value: Optional[int] = None
    errno: Optional[int] = None


def supported(name, handler, note=""):
    return Syscall(name, "supported", handler, note)


def partial(name, handler, note):
    return Syscall(name, "partial", handler, note)


def constant(name, value, note=""):
    def answer(t, *_):
        return value
    return Syscall(name, "constant", answer, note or f"returns {value}", value=value)


def refused(name, err, why):
    def refuse(t, *_):
        fail(err, why)
    return Syscall(name, "refused", refuse, why, errno=err)


def unimplemented(name, note=""):
    return Syscall(name, "unimplemented", None, note)


NO_PROCESSES = "one thread, one process: the sandbox cannot create another"
FIXED_IDENTITY = "the sandbox's identity is fixed"
TIMERS = ("no signal is ever delivered, so no timer could fire (alarm(2) cannot fail on Linux: a "
          "C program sees (unsigned)-1; PythonSandbox's signal.alarm raises OSError ENOSYS, "
          "signal.setitimer signal.ItimerError)")

# Every x86-64 system call number (<asm/unistd_64.h>) and how the sandbox answers it.
SYSCALLS = {
    0: supported("read", sys_file.sys_read,
                 "stdin: the run's input; with none left the run stops, waiting for more "
                 "(RunResult.waiting)"),
    1: partial("write", sys_file.sys_write,
               "stdout and stderr: kept up to the run's output limit, then cut short and EFBIG"),
    2: supported("open", sys_file.sys_open),
    3: supported("close", sys_file.sys_close),
    4: supported("stat", sys_file.sys_stat),
    5: supported("fstat", sys_file.sys_fstat),
    6: supported("lstat", sys_file.sys_lstat),
    7: partial("poll", sys_file.sys_poll,
               "never blocks: an fd is reported ready for POLLIN and POLLOUT as asked"),
    8: supported("lseek", sys_file.sys_lseek),
    9: partial("mmap", sys_mm.sys_mmap,
               "writable shared file mappings fail with ENODEV"),
    10: supported("mprotect", sys_mm.sys_mprotect),
    11: supported("munmap", sys_mm.sys_munmap),
    12: supported("brk", sys_mm.sys_brk),
    13: partial("rt_sigaction", sys_signal.sys_rt_sigaction,
                "recorded (and snapshotted); no signal is ever delivered"),
    14: partial("rt_sigprocmask", sys_signal.sys_rt_sigprocmask,
                "recorded; no signal is ever delivered"),
    15: unimplemented("rt_sigreturn", "no signal is ever delivered: there is no frame to return from"),
    16: partial("ioctl", sys_file.sys_ioctl,
                "the console is not a terminal (ENOTTY); files: what the file system serves"),
    17: supported("pread64", sys_file.sys_pread64),
    18: supported("pwrite64", sys_file.sys_pwrite64),
    19: supported("readv", sys_file.sys_readv),
    20: supported("writev", sys_file.sys_writev),
    21: supported("access", sys_file.sys_access),
    22: refused("pipe", E.ENOSYS, "pipes are not supported"),
    23: unimplemented("select"),
    24: partial("sched_yield", sys_proc.sys_sched_nothing,
                "does nothing: one thread"),
    25: supported("mremap", sys_mm.sys_mremap),
    26: partial("msync", sys_mm.sys_mem_nothing,
                "does nothing: no shared file mapping is writable"),
    27: unimplemented("mincore"),
    28: partial("madvise", sys_mm.sys_madvise,
                "MADV_DONTNEED drops the pages (anonymous ones read as zero again); other "
                "advice is accepted and ignored"),
    29: unimplemented("shmget"),
    30: unimplemented("shmat"),
    31: unimplemented("shmctl"),
    32: supported("dup", sys_file.sys_dup),
    33: supported("dup2", sys_file.sys_dup2),
    34: unimplemented("pause"),
    35: partial("nanosleep", sys_time.sys_nanosleep,
                "sleeps on the host up to the run's deadline (cancel() wakes it); rem is not written"),
    36: unimplemented("getitimer", TIMERS),
    37: unimplemented("alarm", TIMERS),
    38: unimplemented("setitimer", TIMERS),
    39: constant("getpid", PID),
    40: unimplemented("sendfile"),
    41: refused("socket", E.EACCES, "no network in the sandbox"),
    42: unimplemented("connect"),
    43: unimplemented("accept"),
    44: unimplemented("sendto"),
    45: unimplemented("recvfrom"),
    46: unimplemented("sendmsg"),
    47: unimplemented("recvmsg"),
    48: unimplemented("shutdown"),
    49: unimplemented("bind"),
    50: unimplemented("listen"),
    51: unimplemented("getsockname"),
    52: unimplemented("getpeername"),
    53: refused("socketpair", E.EACCES, "no network in the sandbox"),
    54: unimplemented("setsockopt"),
    55: unimplemented("getsockopt"),
    56: refused("clone", E.EAGAIN, NO_PROCESSES),
    57: refused("fork", E.EAGAIN, NO_PROCESSES),
    58: refused("vfork", E.EAGAIN, NO_PROCESSES),
    59: refused("execve", E.EACCES, "the sandbox runs one program"),
    60: supported("exit", sys_proc.sys_exit,
                  "ends the run with the status"),
    61: refused("wait4", E.ECHILD, "there are no child processes"),
    62: partial("kill", sys_signal.sys_kill,
                "the program itself only (else ESRCH): signal 0 and ignored signals do "
                "nothing, any other ends the run (GuestFault)"),
    63: partial("uname", sys_proc.sys_uname,
                "a fixed answer: Linux 6.1.0 x86_64, node name whpfast"),
    64: unimplemented("semget"),
    65: unimplemented("semop"),
    66: unimplemented("semctl"),
    67: unimplemented("shmdt"),
    68: unimplemented("msgget"),
    69: unimplemented("msgsnd"),
    70: unimplemented("msgrcv"),
    71: unimplemented("msgctl"),
    72: supported("fcntl", sys_file.sys_fcntl,
                  "record locks (POSIX and OFD) held within the sandbox"),
    73: supported("flock", sys_file.sys_flock),
    74: partial("fsync", sys_file.sys_nothing,
                "does nothing"),
    75: partial("fdatasync", sys_file.sys_nothing,
                "does nothing"),
    76: unimplemented("truncate"),
    77: supported("ftruncate", sys_file.sys_ftruncate),
    78: unimplemented("getdents"),
    79: supported("getcwd", sys_file.sys_getcwd),
    80: supported("chdir", sys_file.sys_chdir),
    81: supported("fchdir", sys_file.sys_fchdir),
    82: supported("rename", sys_file.sys_rename),
    83: supported("mkdir", sys_file.sys_mkdir),
    84: supported("rmdir", sys_file.sys_rmdir),
    85: supported("creat", sys_file.sys_creat),
    86: unimplemented("link"),
    87: supported("unlink", sys_file.sys_unlink),
    88: supported("symlink", sys_file.sys_symlink),
    89: supported("readlink", sys_file.sys_readlink),
    90: supported("chmod", sys_file.sys_chmod),
    91: supported("fchmod", sys_file.sys_fchmod),
    92: unimplemented("chown"),
    93: unimplemented("fchown"),
    94: unimplemented("lchown"),
    95: supported("umask", sys_proc.sys_umask),
    96: supported("gettimeofday", sys_time.sys_gettimeofday),
    97: partial("getrlimit", sys_proc.sys_getrlimit,
                "the stack size, 1024 open files and the memory size; the other limits infinite"),
    98: partial("getrusage", sys_proc.sys_getrusage,
                "all zero"),
    99: partial("sysinfo", sys_proc.sys_sysinfo,
                "uptime (the guest's), memory_size as total memory and half of it free, one process"),
    100: partial("times", sys_proc.sys_times,
                 "CPU times zero; returns the guest's monotonic clock in 100 Hz ticks"),
    101: unimplemented("ptrace"),
    102: constant("getuid", UID),
    103: unimplemented("syslog"),
    104: constant("getgid", UID),
    105: refused("setuid", E.EPERM, FIXED_IDENTITY),
    106: refused("setgid", E.EPERM, FIXED_IDENTITY),
    107: constant("geteuid", UID),
    108: constant("getegid", UID),
    109: refused("setpgid", E.EPERM, FIXED_IDENTITY),
    110: constant("getppid", PID - 1),
    111: constant("getpgrp", PID),
    112: refused("setsid", E.EPERM, FIXED_IDENTITY),
    113: refused("setreuid", E.EPERM, FIXED_IDENTITY),
    114: refused("setregid", E.EPERM, FIXED_IDENTITY),
    115: partial("getgroups", sys_proc.sys_getgroups,
                 "no supplementary groups"),
    116: refused("setgroups", E.EPERM, FIXED_IDENTITY),
    117: refused("setresuid", E.EPERM, FIXED_IDENTITY),
    118: supported("getresuid", sys_proc.sys_getresuid,
                   "the fixed uid"),
    119: refused("setresgid", E.EPERM, FIXED_IDENTITY),
    120: supported("getresgid", sys_proc.sys_getresuid,
                   "the fixed gid"),
    121: constant("getpgid", PID),
    122: unimplemented("setfsuid"),
    123: unimplemented("setfsgid"),
    124: constant("getsid", PID),
    125: unimplemented("capget"),
    126: unimplemented("capset"),
    127: unimplemented("rt_sigpending"),
    128: unimplemented("rt_sigtimedwait"),
    129: unimplemented("rt_sigqueueinfo"),
    130: unimplemented("rt_sigsuspend"),
    131: partial("sigaltstack", sys_signal.sys_sigaltstack,
                 "recorded; no signal is ever delivered"),
    132: supported("utime", sys_file.sys_utime),
    133: unimplemented("mknod"),
    134: unimplemented("uselib"),
    135: partial("personality", sys_proc.sys_personality,
                 "returns 0 and changes nothing"),
    136: unimplemented("ustat"),
    137: supported("statfs", sys_file.sys_statfs),
    138: supported("fstatfs", sys_file.sys_fstatfs),
    139: unimplemented("sysfs"),
    140: unimplemented("getpriority"),
    141: unimplemented("setpriority"),
    142: unimplemented("sched_setparam"),
    143: unimplemented("sched_getparam"),
    144: unimplemented("sched_setscheduler"),
    145: unimplemented("sched_getscheduler"),
    146: unimplemented("sched_get_priority_max"),
    147: unimplemented("sched_get_priority_min"),
    148: unimplemented("sched_rr_get_interval"),
    149: partial("mlock", sys_mm.sys_mem_nothing,
                 "does nothing"),
    150: partial("munlock", sys_mm.sys_mem_nothing,
                 "does nothing"),
    151: partial("mlockall", sys_mm.sys_mem_nothing,
                 "does nothing"),
    152: partial("munlockall", sys_mm.sys_mem_nothing,
                 "does nothing"),
    153: unimplemented("vhangup"),
    154: unimplemented("modify_ldt"),
    155: unimplemented("pivot_root"),
    156: unimplemented("_sysctl"),
    157: unimplemented("prctl"),
    158: partial("arch_prctl", sys_proc.sys_arch_prctl,
                 "ARCH_SET_FS/GS and ARCH_GET_FS/GS; other codes EINVAL"),
    159: unimplemented("adjtimex"),
    160: partial("setrlimit", sys_proc.sys_setrlimit,
                 "accepted and ignored"),
    161: unimplemented("chroot"),
    162: partial("sync", sys_file.sys_nothing,
                 "does nothing"),
    163: unimplemented("acct"),
    164: unimplemented("settimeofday"),
    165: unimplemented("mount"),
    166: unimplemented("umount2"),
    167: unimplemented("swapon"),
    168: unimplemented("swapoff"),
    169: unimplemented("reboot"),
    170: unimplemented("sethostname"),
    171: unimplemented("setdomainname"),
    172: unimplemented("iopl"),
    173: unimplemented("ioperm"),
    174: unimplemented("create_module"),
    175: unimplemented("init_module"),
    176: unimplemented("delete_module"),
    177: unimplemented("get_kernel_syms"),
    178: unimplemented("query_module"),
    179: unimplemented("quotactl"),
    180: unimplemented("nfsservctl"),
    181: unimplemented("getpmsg"),
    182: unimplemented("putpmsg"),
    183: unimplemented("afs_syscall"),
    184: unimplemented("tuxcall"),
    185: unimplemented("security"),
    186: constant("gettid", PID),
    187: unimplemented("readahead"),
    188: unimplemented("setxattr"),
    189: unimplemented("lsetxattr"),
    190: unimplemented("fsetxattr"),
    191: unimplemented("getxattr"),
    192: unimplemented("lgetxattr"),
    193: unimplemented("fgetxattr"),
    194: unimplemented("listxattr"),
    195: unimplemented("llistxattr"),
    196: unimplemented("flistxattr"),
    197: unimplemented("removexattr"),
    198: unimplemented("lremovexattr"),
    199: unimplemented("fremovexattr"),
    200: partial("tkill", sys_signal.sys_kill,
                 "as kill"),
    201: supported("time", sys_time.sys_time),
    202: partial("futex", sys_proc.sys_futex,
                 "one thread: WAKE wakes nobody, WAIT on an unchanged value fails with "
                 "ETIMEDOUT (nobody could wake it); other operations ENOSYS"),
    203: partial("sched_setaffinity", sys_proc.sys_sched_nothing,
                 "accepted and ignored: one CPU"),
    204: partial("sched_getaffinity", sys_proc.sys_sched_getaffinity,
                 "one CPU"),
    205: unimplemented("set_thread_area"),
    206: unimplemented("io_setup"),
    207: unimplemented("io_destroy"),
    208: unimplemented("io_getevents"),
    209: unimplemented("io_submit"),
    210: unimplemented("io_cancel"),
    211: unimplemented("get_thread_area"),
    212: unimplemented("lookup_dcookie"),
    213: unimplemented("epoll_create"),
    214: unimplemented("epoll_ctl_old"),
    215: unimplemented("epoll_wait_old"),
    216: unimplemented("remap_file_pages"),
    217: supported("getdents64", sys_file.sys_getdents64),
    218: partial("set_tid_address", sys_proc.sys_set_tid_address,
                 "returns the tid; the address is not used (one thread)"),
    219: unimplemented("restart_syscall"),
    220: unimplemented("semtimedop"),
    221: partial("fadvise64", sys_file.sys_nothing,
                 "does nothing"),
    222: unimplemented("timer_create", TIMERS),
    223: unimplemented("timer_settime"),
    224: unimplemented("timer_gettime"),
    225: unimplemented("timer_getoverrun"),
    226: unimplemented("timer_delete"),
    227: unimplemented("clock_settime"),
    228: supported("clock_gettime", sys_time.sys_clock_gettime,
                   "REALTIME and TAI are the host's; MONOTONIC, BOOTTIME and the CPU-time "
                   "clocks the guest's (zero at its boot)"),
    229: supported("clock_getres", sys_time.sys_clock_getres),
    230: partial("clock_nanosleep", sys_time.sys_clock_nanosleep,
                 "as nanosleep; TIMER_ABSTIME supported"),
    231: supported("exit_group", sys_proc.sys_exit,
                   "ends the run with the status"),
    232: unimplemented("epoll_wait"),
    233: unimplemented("epoll_ctl"),
    234: partial("tgkill", sys_signal.sys_tgkill,
                 "as kill"),
    235: supported("utimes", sys_file.sys_utimes),
    236: unimplemented("vserver"),
    237: unimplemented("mbind"),
    238: unimplemented("set_mempolicy"),
    239: unimplemented("get_mempolicy"),
    240: unimplemented("mq_open"),
    241: unimplemented("mq_unlink"),
    242: unimplemented("mq_timedsend"),
    243: unimplemented("mq_timedreceive"),
    244: unimplemented("mq_notify"),
    245: unimplemented("mq_getsetattr"),
    246: unimplemented("kexec_load"),
    247: refused("waitid", E.ECHILD, "there are no child processes"),
    248: unimplemented("add_key"),
    249: unimplemented("request_key"),
    250: unimplemented("keyctl"),
    251: unimplemented("ioprio_set"),
    252: unimplemented("ioprio_get"),
    253: unimplemented("inotify_init"),
    254: unimplemented("inotify_add_watch"),
    255: unimplemented("inotify_rm_watch"),
    256: unimplemented("migrate_pages"),
    257: supported("openat", sys_file.sys_openat),
    258: supported("mkdirat", sys_file.sys_mkdirat),
    259: unimplemented("mknodat"),
    260: unimplemented("fchownat"),
    261: supported("futimesat", sys_file.sys_futimesat),
    262: supported("newfstatat", sys_file.sys_newfstatat),
    263: supported("unlinkat", sys_file.sys_unlinkat),
    264: supported("renameat", sys_file.sys_renameat),
    265: unimplemented("linkat"),
    266: supported("symlinkat", sys_file.sys_symlinkat),
    267: supported("readlinkat", sys_file.sys_readlinkat),
    268: supported("fchmodat", sys_file.sys_fchmodat),
    269: supported("faccessat", sys_file.sys_faccessat),
    270: unimplemented("pselect6"),
    271: unimplemented("ppoll"),
    272: unimplemented("unshare"),
    273: partial("set_robust_list", sys_proc.sys_set_robust_list,
                 "accepted, not used (one thread)"),
    274: unimplemented("get_robust_list"),
    275: unimplemented("splice"),
    276: unimplemented("tee"),
    277: unimplemented("sync_file_range"),
    278: unimplemented("vmsplice"),
    279: unimplemented("move_pages"),
    280: supported("utimensat", sys_file.sys_utimensat),
    281: unimplemented("epoll_pwait"),
    282: unimplemented("signalfd"),
    283: unimplemented("timerfd_create"),
    284: unimplemented("eventfd"),
    285: unimplemented("fallocate"),
    286: unimplemented("timerfd_settime"),
    287: unimplemented("timerfd_gettime"),
    288: unimplemented("accept4"),
    289: unimplemented("signalfd4"),
    290: unimplemented("eventfd2"),
    291: unimplemented("epoll_create1"),
    292: supported("dup3", sys_file.sys_dup3),
    293: refused("pipe2", E.ENOSYS, "pipes are not supported"),
    294: unimplemented("inotify_init1"),
    295: unimplemented("preadv"),
    296: unimplemented("pwritev"),
    297: unimplemented("rt_tgsigqueueinfo"),
    298: unimplemented("perf_event_open"),
    299: unimplemented("recvmmsg"),
    300: unimplemented("fanotify_init"),
    301: unimplemented("fanotify_mark"),
    302: partial("prlimit64", sys_proc.sys_prlimit64,
                 "the program's own only (else ESRCH); reads as getrlimit, a new limit is ignored"),
    303: unimplemented("name_to_handle_at"),
    304: unimplemented("open_by_handle_at"),
    305: unimplemented("clock_adjtime"),
    306: partial("syncfs", sys_file.sys_nothing,
                 "does nothing"),
    307: unimplemented("sendmmsg"),
    308: unimplemented("setns"),
    309: partial("getcpu", sys_proc.sys_getcpu,
                 "CPU 0, node 0"),
    310: unimplemented("process_vm_readv"),
    311: unimplemented("process_vm_writev"),
    312: unimplemented("kcmp"),
    313: unimplemented("finit_module"),
    314: unimplemented("sched_setattr"),
    315: unimplemented("sched_getattr"),
    316: supported("renameat2", sys_file.sys_renameat2),
    317: unimplemented("seccomp"),
    318: supported("getrandom", sys_proc.sys_getrandom,
                   "the host's os.urandom; at most 1 MiB a call"),
    319: unimplemented("memfd_create"),
    320: unimplemented("kexec_file_load"),
    321: unimplemented("bpf"),
    322: refused("execveat", E.EACCES, "the sandbox runs one program"),
    323: unimplemented("userfaultfd"),
    324: unimplemented("membarrier"),
    325: unimplemented("mlock2"),
    326: unimplemented("copy_file_range"),
    327: unimplemented("preadv2"),
    328: unimplemented("pwritev2"),
    329: unimplemented("pkey_mprotect"),
    330: unimplemented("pkey_alloc"),
    331: unimplemented("pkey_free"),
    332: supported("statx", sys_file.sys_statx),
    333: unimplemented("io_pgetevents"),
    334: unimplemented("rseq"),
    424: unimplemented("pidfd_send_signal"),
    425: unimplemented("io_uring_setup"),
    426: unimplemented("io_uring_enter"),
    427: unimplemented("io_uring_register"),
    428: unimplemented("open_tree"),
    429: unimplemented("move_mount"),
    430: unimplemented("fsopen"),
    431: unimplemented("fsconfig"),
    432: unimplemented("fsmount"),
    433: unimplemented("fspick"),
    434: unimplemented("pidfd_open"),
    435: refused("clone3", E.ENOSYS, "not implemented: glibc falls back to clone, which fails with EAGAIN"),
    436: unimplemented("close_range"),
    437: unimplemented("openat2"),
    438: unimplemented("pidfd_getfd"),
    439: supported("faccessat2", sys_file.sys_faccessat2),
    440: unimplemented("process_madvise"),
    441: unimplemented("epoll_pwait2"),
    442: unimplemented("mount_setattr"),
    443: unimplemented("quotactl_fd"),
    444: unimplemented("landlock_create_ruleset"),
    445: unimplemented("landlock_add_rule"),
    446: unimplemented("landlock_restrict_self"),
    447: unimplemented("memfd_secret"),
    448: unimplemented("process_mrelease"),
    449: unimplemented("futex_waitv"),
    450: unimplemented("set_mempolicy_home_node"),
}

# -- derived from SYSCALLS ------------------------------------------------------------------

NAMES = {nr: entry.name for nr, entry in SYSCALLS.items()}
NUMBERS = {name: nr for nr, name in NAMES.items()}
# {nr: handler} of every call with one (all but the unimplemented), and {nr: value} of the
# constants, which the C dispatcher answers before it looks in TABLE
TABLE = {nr: entry.handler for nr, entry in SYSCALLS.items() if entry.handler is not None}
CONSTANTS = {nr: entry.value for nr, entry in SYSCALLS.items() if entry.status == "constant"}
NAMED_NR_MAX = 4096         # unknown numbers past this are counted together (the guest picks
                            # them: one name each would grow unsupported_syscalls without bound)


def unsupported_name(nr):
    """The key of unsupported_syscalls for system call nr."""
    name = NAMES.get(nr)
    if name is None:
        name = f"syscall_{nr}" if 0 <= nr < NAMED_NR_MAX else f"syscall_{NAMED_NR_MAX}+"
    return name


def py_dispatch(t, nr, args):
    """Runs system call nr for task t; returns the value for RAX (negative errno on failure).
    In C: _linux.Dispatcher (bound as `dispatch` at the end of this module)."""
    fn = TABLE.get(nr)
    if fn is None:
        name = unsupported_name(nr)
        t.unsupported_syscalls[name] = t.unsupported_syscalls.get(name, 0) + 1
        return -E.ENOSYS
    try:
        result = fn(t, *args)
    except LinuxError as e:
        return -e.errno
    return result


def compatibility_page():
    """docs/compatibility.md: SYSCALLS as a page (scripts/gen_compatibility.py writes it; a test
    checks it is not stale)."""
    counts = {s: sum(e.status == s for e in SYSCALLS.values()) for s in STATUSES}
    out = ["# Linux compatibility", "",
           "<!-- Generated from whpfast/linux/syscalls.py (SYSCALLS) by scripts/gen_compatibility.py;",
           "     do not edit by hand. -->", "",
           "How `LinuxSandbox` answers each x86-64 Linux system call. The table is the one the",
           "sandbox dispatches from (`whpfast/linux/syscalls.py`), so it cannot disagree with it.", "",
           "- **supported**: served as Linux serves it, within the sandbox's model (one process, one",
           "  thread, the file system its `read=` policy shows).",
           "- **partial**: served, with the difference the note names.",
           "- **constant**: answered with a fixed value.",
           "- **refused**: fails with the errno shown, on purpose.",
           "- **unimplemented**: fails with `ENOSYS` and is counted by name in",
           "  `LinuxSandbox.unsupported_syscalls`.", "",
           ", ".join(f"{counts[s]} {s}" for s in STATUSES) + f" ({len(SYSCALLS)} numbers).", "",
           "| nr | name | status | note |", "| ---: | --- | --- | --- |"]
    for nr, e in sorted(SYSCALLS.items()):
        status = e.status if e.errno is None else f"refused ({E.errorcode[e.errno]})"
        note = e.note.replace("|", "\\|")
        out.append(f"| {nr} | `{e.name}` | {status} | {note} |")
    return "\n".join(out) + "\n"


dispatch = py_dispatch
if not PURE_PYTHON:
    from .. import _linux
    dispatch = _linux.Dispatcher(TABLE, CONSTANTS, unsupported_name)
