"""The pod's sandbox container made by the agent itself: a namespace holder.

A CRI pod's sandbox (pause) container exists to hold the namespaces its app
containers join: UTS (the pod's hostname), IPC (the pod's IPC sysctls, SysV
and POSIX shared memory) and, when the pod shares its PID namespace, PID, where
it is PID 1 and reaps orphans. Run through crun it cost a root disk
hot-plugged and mounted and two crun runs: ~1.1 s of a pod's start under TCG,
more than the app container's own create and start. CRI-O makes the same
trade with ``drop_infra_ctr``.

So the agent makes it: a child forked from the agent unshares the UTS, IPC,
mount and PID namespaces, joins the container's cgroup, sets the hostname and
the pod's sysctls, and forks the holder (PID 1 of the new PID namespace);
it writes the holder's pid and exits. The holder does what pause does:
SIGINT and SIGTERM end it with status 0, SIGCHLD reaps, and nothing else. It
is what a container sharing the pod's PID namespace sees as PID 1, so it shows
the sandbox process's command line and runs as its user, chrooted into an
empty folder, with no capability (even as root) and no way to gain one. The
sandbox image's program itself does not run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from ember.agent import cgroups
from ember.agent.reaper import Reaper
from ember.ttrpc import Code, TTRPCError

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
PR_SET_NAME = 15
PR_SET_MM = 35
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_MM_ARG_START = 8
PR_SET_MM_ARG_END = 9

# Sysctls a pod may set, and the namespace each lives in (as runc and crun check).
IPC_SYSCTLS = frozenset({"kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem",
                         "kernel.shmall", "kernel.shmmax", "kernel.shmmni",
                         "kernel.shm_rmid_forced"})
UTS_SYSCTLS = frozenset({"kernel.hostname", "kernel.domainname"})

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_KEEP: list = []  # the holder's command line, alive as long as it is


def check_sysctls(sysctls: object) -> dict[str, str]:
    """The pod's sysctls, or INVALID_ARGUMENT naming one no pod namespace holds."""
    if sysctls is None:
        return {}
    if not isinstance(sysctls, dict):
        raise TTRPCError(Code.INVALID_ARGUMENT, "OCI spec: linux.sysctl must be an object")
    out = {}
    for key, value in sysctls.items():
        if not (isinstance(key, str) and isinstance(value, str)) or "/" in key or ".." in key:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"OCI spec: invalid sysctl {key!r}")
        if not (key in IPC_SYSCTLS or key in UTS_SYSCTLS or key.startswith(("fs.mqueue.", "net."))):
            raise TTRPCError(Code.INVALID_ARGUMENT,
                             f"sysctl {key} is not namespaced: a pod may set only IPC, UTS "
                             "and network sysctls")
        out[key] = value
    return out


def _user(spec: dict) -> tuple[int, int]:
    user = (spec.get("process") or {}).get("user") or {}
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    if not (isinstance(uid, int) and isinstance(gid, int) and uid >= 0 and gid >= 0):
        raise TTRPCError(Code.INVALID_ARGUMENT, "OCI spec: process.user needs numeric uid and gid")
    return uid, gid


def _arg_area() -> tuple[int, int]:
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[45]), int(fields[46])  # arg_start, arg_end (proc(5) fields 48, 49)


def _show_as(args: list[str]) -> None:
    """Make /proc/self/cmdline read args, and comm argv[0]'s name.

    prctl(PR_SET_MM) points the argument area at a copy (the holder is root in
    the guest until it takes the sandbox's user). Should that be refused, the
    area the agent was exec'd with is overwritten, as setproctitle(3) does: one
    string, the arguments joined by spaces, cut to fit.
    """
    text = b"\0".join(a.encode() for a in args) + b"\0"
    buf = ctypes.create_string_buffer(text, len(text))
    _KEEP.append(buf)
    addr = ctypes.addressof(buf)
    start, end = _arg_area()
    if _libc.prctl(PR_SET_MM, PR_SET_MM_ARG_START, addr, 0, 0) == 0:
        if _libc.prctl(PR_SET_MM, PR_SET_MM_ARG_END, addr + len(text), 0, 0) == 0:
            start = end = 0
        else:  # back to the area the agent was exec'd with
            _libc.prctl(PR_SET_MM, PR_SET_MM_ARG_START, start, 0, 0)
    if end > start:
        room = end - start
        line = b" ".join(a.encode() for a in args)[:room - 2] + b"\0"
        ctypes.memmove(start, line + b"\0" * (room - 1 - len(line)) + b"\x01", room)
    name = ctypes.create_string_buffer(os.path.basename(args[0]).encode()[:15])
    _libc.prctl(PR_SET_NAME, ctypes.addressof(name), 0, 0, 0)


def _errno_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _drop_privileges(last_cap: int, uid: int, gid: int) -> None:
    """The sandbox's user, no capability and no way to gain one: pausing and
    reaping need none.

    A sandbox image running as root kept runc's default capabilities in its
    pause container; the holder keeps none, even as root, so a container that
    shares the pod's PID namespace finds a PID 1 with less power than itself.
    """
    for cap in range(last_cap + 1):  # while CAP_SETPCAP is still held
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise _errno_error("prctl(PR_CAPBSET_DROP)")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        raise _errno_error("capset")
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise _errno_error("prctl(PR_SET_NO_NEW_PRIVS)")


def _down(signum: int, frame: object) -> None:
    os._exit(0)


def _reap(signum: int, frame: object) -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


@dataclass(frozen=True)
class HolderSpec:
    """What a sandbox spec asks of its holder, checked before anything is made."""

    hostname: str
    sysctls: dict[str, str]
    uid: int
    gid: int
    args: list[str]

    @classmethod
    def of(cls, spec: dict) -> HolderSpec:
        hostname = spec.get("hostname")
        uid, gid = _user(spec)
        return cls(hostname if isinstance(hostname, str) else "",
                   check_sysctls((spec.get("linux") or {}).get("sysctl")), uid, gid,
                   list((spec.get("process") or {}).get("args") or ["/pause"]))


def setup_child(want: HolderSpec, root: str, cgroup: str | None) -> Callable[[], int]:
    """What the forked child runs: namespaces, cgroup, hostname, sysctls, then the holder.

    Everything that can fail happens here, before the holder is forked, and the
    holder inherits it all (namespaces, root, user, command line, signal
    handlers). Errors are one line on stderr and exit status 1; on success the
    holder's pid is written to stdout.
    """
    hostname, sysctls, uid, gid, args = want.hostname, want.sysctls, want.uid, want.gid, want.args
    with open("/proc/sys/kernel/cap_last_cap") as f:  # read here: the child chroots
        last_cap = int(f.read())

    def child() -> int:
        try:
            if _libc.unshare(CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNS | CLONE_NEWPID) != 0:
                raise _errno_error("unshare")
            if cgroup is not None:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            if hostname:
                try:
                    socket.sethostname(hostname)
                except OSError as e:
                    raise OSError(e.errno, f"hostname {hostname!r}: {e.strerror}") from None
            for key, value in sysctls.items():
                try:
                    with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                        f.write(value)
                except OSError as e:
                    raise OSError(e.errno, f"sysctl {key}={value}: {e.strerror}") from None
            _show_as(args)
            null = os.open(os.devnull, os.O_RDWR)
            os.chroot(root)
            os.chdir("/")
            signal.signal(signal.SIGINT, _down)
            signal.signal(signal.SIGTERM, _down)
            signal.signal(signal.SIGCHLD, _reap)
            _drop_privileges(last_cap, uid, gid)
            pid = os.fork()
            if pid == 0:  # the holder: PID 1 of the pod's PID namespace
                for fd in (0, 1, 2):  # the agent reads the pipes to their end
                    os.dup2(null, fd)
                os.close(null)
                while True:
                    signal.pause()
            os.write(1, f"{pid}\n".encode())
            return 0
        except (OSError, ValueError) as e:
            text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            os.write(2, f"{text}\n".encode(errors="replace"))
            return 1
    return child


def start(reaper: Reaper, spec: dict, root: str, cgroup_path: str,
          timeout: float = 30.0) -> int:
    """Make the holder; its pid. INVALID_ARGUMENT for what the spec asks that
    cannot be had (the child's one line), and then nothing is left."""
    want = HolderSpec.of(spec)  # checked before anything is made
    os.makedirs(root, mode=0o555, exist_ok=True)
    child = setup_child(want, root, cgroups.make(cgroup_path))
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        ex = reaper.fork(child, null, out_w, err_w)
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        cgroups.remove(cgroup_path)
        raise
    finally:
        for fd in (null, out_w, err_w):
            os.close(fd)
    with os.fdopen(out_r, "rb") as out, os.fdopen(err_r, "rb") as err:
        pid_line = out.read()
        message = err.read().decode(errors="replace").strip()
    if not ex.wait(timeout) or ex.exit_code != 0 or not pid_line.strip().isdigit():
        if not ex.done:
            os.kill(ex.pid, signal.SIGKILL)
            ex.wait(5)
        cgroups.remove(cgroup_path)
        raise TTRPCError(Code.INVALID_ARGUMENT if message else Code.INTERNAL,
                         f"the pod's namespaces: {message or 'the holder did not start'}")
    return int(pid_line)
