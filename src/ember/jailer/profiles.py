"""Seccomp allow-lists, one per kind of VMM.

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
"""

from __future__ import annotations

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
    io_uring_setup io_uring_enter io_uring_register
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

PROFILES: dict[str, str] = {"qemu": QEMU, "firecracker": FIRECRACKER, "generic": GENERIC}


def syscalls_for(kind: str) -> list[str]:
    """The sorted, de-duplicated allow-list for a VMM kind."""
    return sorted(set(PROFILES[kind].split()) | {"execve"})


def read_allow_file(path: str) -> list[str]:
    """Parse an allow-list file: syscall names, whitespace separated, ``#`` comments."""
    names: set[str] = set()
    with open(path) as f:
        for line in f:
            names.update(line.split("#", 1)[0].split())
    return sorted(names | {"execve"})
