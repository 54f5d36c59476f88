"""The jailer's only per-VMM knowledge: one :class:`VmmProfile` per kind of
VMM (``--vmm-kind``), with its seccomp allow-list and how it is laid out and
started in the jail. The rest of the jailer reads profile fields and never
compares kinds.

Seccomp allow-lists:

QEMU: the syscalls ``qemu-system-x86_64 -M microvm -accel tcg`` made under
``strace -f`` while booting a Debian cloud kernel with a busybox initrd, serving
QMP (including stop/cont, getfd and migration to a file descriptor) and a
virtio-serial agent socket, with virtio-blk disks — plus their close relatives
that glibc picks between at run time (``pread64``/``preadv``, ``poll``/``ppoll``,
``clone``/``clone3``...), so that a different code path of the same feature does
not kill the VM. ``docs/jailer.md`` says how to re-derive it.

Firecracker: the names in its published per-thread filters (vmm, api, vcpu
threads), plus what it does before it installs those filters itself (start-up,
loading its own seccomp filters, opening the API socket), which our filter —
loaded before exec — has to let through.

Every list implicitly gets ``execve`` (the jailer's own exec of the VMM).

Names alone are not enough for four families of calls; ``ARG_RULES`` below
narrows them by argument (and ``ember.jailer.seccomp`` applies those rules to
any list, an ``--seccomp-allow-file`` one included):

* ``io_uring_setup/enter/register`` are refused with EPERM whatever the list
  says: a ring performs mkdirat, symlinkat, renameat, openat... in the kernel
  without those syscalls ever passing the filter. QEMU probes io_uring at start
  and falls back to ppoll when the probe fails; Firecracker does not use it.
* ``clone`` passes only without namespace flags, and ``clone3`` (whose flags
  live in memory, out of seccomp's reach) fails with ENOSYS so that glibc
  falls back to ``clone`` — the approach of Docker's and systemd's filters.
* ``socket``/``socketpair`` pass only for AF_UNIX: QMP, the agent socket and
  Firecracker's API and vsock sockets. Networking reaches both VMMs as a tap
  descriptor, so neither opens AF_INET/AF_INET6, netlink or packet sockets.
* ``ioctl`` passes only for the request families the VMMs use: KVM, the
  terminal requests of a serial console on stdio, TUN/TAP, and block-device
  queries. TIOCSTI (typing into the jailer's terminal), SIOC* (network
  configuration), loop, userfaultfd, perf... are killed.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from ember.jailer.files import QEMU_DATA_DIRS, qemu_modules

_COMMON_RUNTIME = """
    read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2
    open openat close close_range lseek fstat newfstatat statx access faccessat faccessat2
    readlink readlinkat getdents64 fcntl dup dup2 dup3 pipe2 ftruncate fallocate
    fsync fdatasync statfs fstatfs unlink unlinkat
    mmap munmap mremap mprotect madvise brk
    futex set_robust_list get_robust_list rseq set_tid_address gettid getpid getppid
    clone clone3 exit exit_group sched_yield sched_getaffinity sched_setaffinity
    rt_sigaction rt_sigprocmask rt_sigreturn sigaltstack rt_sigtimedwait tgkill tkill
    clock_gettime clock_getres clock_nanosleep nanosleep gettimeofday
    timerfd_create timerfd_settime timerfd_gettime eventfd2
    poll ppoll epoll_create1 epoll_ctl epoll_wait epoll_pwait epoll_pwait2
    socket socketpair bind listen accept accept4 connect getsockname getpeername
    getsockopt setsockopt sendmsg recvmsg sendto recvfrom shutdown
    ioctl prctl arch_prctl prlimit64 getrandom uname sysinfo
    getuid geteuid getgid getegid getresuid getresgid
"""

QEMU = _COMMON_RUNTIME + """
    memfd_create signalfd4 get_mempolicy set_mempolicy mbind membarrier
    getcwd fchdir chdir io_setup io_destroy io_submit io_getevents
    sched_getparam sched_getscheduler sched_setscheduler mlock mlockall munlock
    msync copy_file_range getpriority setpriority umask fadvise64
    seccomp restart_syscall
"""

FIRECRACKER = _COMMON_RUNTIME + """
    seccomp restart_syscall
"""

# Union, for a VMM that is neither (or when unsure): still blocks mount,
# ptrace, bpf, keyctl, module loading, kexec, setuid and namespace calls.
GENERIC = QEMU + FIRECRACKER



@dataclass(frozen=True)
class VmmProfile:
    """How the jailer treats one kind of VMM."""

    syscalls: str  # the seccomp allow-list, whitespace separated
    keep_host_path: bool = False  # exec at its host path (QEMU finds its modules from it)
    kvm: str = "no"  # gets /dev/kvm: "always", "no", or "from-args" (an -accel kvm in argv)
    data_dirs: tuple[str, ...] = ()  # host folders bound read-only (firmware, keymaps)
    modules: Callable[[str], list[str]] | None = None  # loadable modules of the binary
    id_args: bool = False  # argv starts with --id ID, as Firecracker's own jailer passes


PROFILES: dict[str, VmmProfile] = {
    "qemu": VmmProfile(QEMU, keep_host_path=True, kvm="from-args", data_dirs=QEMU_DATA_DIRS,
                       modules=qemu_modules),
    "firecracker": VmmProfile(FIRECRACKER, kvm="always", id_args=True),
    "generic": VmmProfile(GENERIC),
}


# Denied with an errno instead of killing, so that a VMM's probe falls back.
ERRNO_RULES: dict[str, int] = {
    "io_uring_setup": errno.EPERM, "io_uring_enter": errno.EPERM,
    "io_uring_register": errno.EPERM, "clone3": errno.ENOSYS,
}

CLONE_NAMESPACES = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000  # NEWNS CGROUP UTS IPC
                    | 0x10000000 | 0x20000000 | 0x40000000)             # NEWUSER NEWPID NEWNET
AF_UNIX = 1

# ioctl requests: (mask, value) pairs, one allowed if (request & mask) == value.
_BYTE = 0x0000FF00  # the request's "type" byte
_EXACT = 0xFFFFFFFF  # the kernel truncates the request to 32 bits
IOCTLS: list[tuple[int, int]] = [
    (_BYTE, 0xAE00),  # KVMIO: every KVM ioctl (system, VM, vCPU, device fds)
    (_BYTE, 0x1200),  # block-device queries: BLKGETSIZE64, BLKSSZGET, BLKDISCARD...
    (_BYTE, 0x2200),  # SCSI generic: QEMU's host_device driver probes a /dev disk with SG_GET_*
    (0x4000FF00, 0x40005400),  # 'T' with a write direction: TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ...
    (0x8000FF00, 0x80005400),  # 'T' with a read direction: TUNGETIFF, TUNGETFEATURES...
    # Terminal requests without a direction, one by one (TIOCSTI 0x5412 is not one):
    *((_EXACT, req) for req in (
        0x5401, 0x5402, 0x5403, 0x5404,  # TCGETS TCSETS TCSETSW TCSETSF
        0x5413, 0x5414,  # TIOCGWINSZ TIOCSWINSZ
        0x540F,  # TIOCGPGRP
        0x541B, 0x5421, 0x5450, 0x5451, 0x5452,  # FIONREAD FIONBIO FIONCLEX FIOCLEX FIOASYNC
    )),
]

# syscall -> (argument index, [(mask, value)...]): the call passes when the
# argument matches one of the pairs; otherwise the filter's default (kill/log).
ARG_RULES: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "clone": (0, [(CLONE_NAMESPACES, 0)]),
    "socket": (0, [(_EXACT, AF_UNIX)]),
    "socketpair": (0, [(_EXACT, AF_UNIX)]),
    "ioctl": (1, IOCTLS),
}


def syscalls_for(kind: str) -> list[str]:
    """The sorted, de-duplicated allow-list for a VMM kind."""
    return sorted(set(PROFILES[kind].syscalls.split()) | {"execve"})


def read_allow_file(path: str) -> list[str]:
    """Parse an allow-list file: syscall names, whitespace separated, ``#`` comments."""
    names: set[str] = set()
    with open(path) as f:
        for line in f:
            names.update(line.split("#", 1)[0].split())
    return sorted(names | {"execve"})
