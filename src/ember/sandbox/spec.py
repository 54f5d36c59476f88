"""Build the OCI runtime spec (config.json) for a container from its image.

The image config gives Entrypoint, Cmd, Env, WorkingDir and User; the user's
flags override them the way ``docker run`` does. The result is what the guest
agent hands to crun, so it follows the runtime-spec defaults runc and crun
generate (mounts, masked paths, Docker's default capability set).
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field

from ember.errors import EmberError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]

RLIMIT_NAMES = {
    "nofile": "RLIMIT_NOFILE", "nproc": "RLIMIT_NPROC", "core": "RLIMIT_CORE",
    "cpu": "RLIMIT_CPU", "fsize": "RLIMIT_FSIZE", "stack": "RLIMIT_STACK",
    "memlock": "RLIMIT_MEMLOCK", "as": "RLIMIT_AS", "data": "RLIMIT_DATA",
    "msgqueue": "RLIMIT_MSGQUEUE", "nice": "RLIMIT_NICE", "rtprio": "RLIMIT_RTPRIO",
    "sigpending": "RLIMIT_SIGPENDING", "locks": "RLIMIT_LOCKS",
}


@dataclass
class ProcessOptions:
    """What `ember run` / `ember exec` flags say about the process."""

    command: list[str] | None = None
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    tty: bool = False
    ulimits: list[str] = field(default_factory=list)  # "nofile=1024:2048"
    # (rows, cols) of the caller's terminal: the pty starts at that size, so a
    # program that asks at once (stty size) never sees 0x0 before the first resize.
    console_size: tuple[int, int] | None = None


def parse_user(user: str) -> tuple[int, int | None]:
    """Parse "UID[:GID]" (numbers only: names need the image's passwd file)."""
    uid_s, _, gid_s = user.partition(":")
    try:
        uid = int(uid_s)
        gid = int(gid_s) if gid_s else None
    except ValueError:
        raise EmberError(f"invalid user {user!r}: use UID[:GID] with numbers") from None
    if uid < 0 or (gid is not None and gid < 0):
        raise EmberError(f"invalid user {user!r}: ids must not be negative")
    return uid, gid


def merge_env(base: list[str], overrides: list[str]) -> list[str]:
    """Docker semantics: later KEY=VALUE wins; a bare KEY is taken from nowhere (dropped)."""
    out: dict[str, str] = {}
    for item in [*base, *overrides]:
        if "=" not in item:
            raise EmberError(f"invalid environment variable {item!r}: use KEY=VALUE")
        key, _, value = item.partition("=")
        if not key:
            raise EmberError(f"invalid environment variable {item!r}: empty name")
        out[key] = value
    if "PATH" not in out:
        out["PATH"] = DEFAULT_PATH
    return [f"{k}={v}" for k, v in out.items()]


def resolve_args(image_config: dict, opts: ProcessOptions) -> list[str]:
    cfg = image_config.get("config") or image_config.get("Config") or {}
    entrypoint = opts.entrypoint if opts.entrypoint is not None else (cfg.get("Entrypoint") or [])
    if opts.command:
        cmd = opts.command
    elif opts.entrypoint is not None:
        cmd = []
    else:
        cmd = cfg.get("Cmd") or []
    if isinstance(entrypoint, str):
        entrypoint = shlex.split(entrypoint)
    args = [*entrypoint, *cmd]
    if not args:
        raise EmberError("image has no command: give one after the image name")
    return args


def parse_ulimit(text: str) -> dict:
    name, _, limits = text.partition("=")
    soft_s, _, hard_s = limits.partition(":")
    if name not in RLIMIT_NAMES or not soft_s:
        raise EmberError(f"invalid ulimit {text!r}: use NAME=SOFT[:HARD], e.g. nofile=1024:2048")
    try:
        soft = int(soft_s)
        hard = int(hard_s) if hard_s else soft
    except ValueError:
        raise EmberError(f"invalid ulimit {text!r}: limits must be numbers") from None
    return {"type": RLIMIT_NAMES[name], "soft": soft, "hard": hard}


def build_process(image_config: dict, opts: ProcessOptions, base_env: list[str] | None = None) -> dict:
    """The OCI "process" object (also used for `exec`)."""
    cfg = image_config.get("config") or image_config.get("Config") or {}
    args = resolve_args(image_config, opts)
    env = merge_env(base_env if base_env is not None else (cfg.get("Env") or []), opts.env)
    if opts.tty and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    user = opts.user if opts.user is not None else (cfg.get("User") or "0")
    uid, gid = parse_user(user)
    cwd = opts.workdir or cfg.get("WorkingDir") or "/"
    if not cwd.startswith("/"):
        raise EmberError(f"invalid working directory {cwd!r}: must be an absolute path")
    rlimits = [parse_ulimit(u) for u in opts.ulimits] or [
        {"type": "RLIMIT_NOFILE", "soft": 1048576, "hard": 1048576}
    ]
    process = {
        "terminal": opts.tty,
        "user": {"uid": uid, "gid": gid if gid is not None else 0},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {k: list(DEFAULT_CAPS) for k in ("bounding", "effective", "permitted")},
        "rlimits": rlimits,
        "noNewPrivileges": False,
    }
    if opts.tty and opts.console_size:
        rows, cols = opts.console_size
        process["consoleSize"] = {"height": int(rows), "width": int(cols)}
    return process


def build_spec(
    image_config: dict,
    opts: ProcessOptions,
    hostname: str,
    cpus: float | None = None,
    memory_bytes: int | None = None,
    readonly_rootfs: bool = False,
) -> dict:
    """A complete OCI runtime spec for the container's init process."""
    resources: dict = {}
    if memory_bytes:
        resources["memory"] = {"limit": memory_bytes}
    if cpus:
        period = 100000
        resources["cpu"] = {"quota": int(math.ceil(cpus * period)), "period": period}
    return {
        "ociVersion": "1.0.2",
        "process": build_process(image_config, opts),
        "root": {"path": "rootfs", "readonly": readonly_rootfs},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")],
            "resources": resources,
            "maskedPaths": [
                "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
                "/sys/firmware", "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }


# Every capability the guest kernel (6.1) knows; a privileged container gets all.
ALL_CAPS = DEFAULT_CAPS + [
    "CAP_DAC_READ_SEARCH", "CAP_LINUX_IMMUTABLE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_LEASE", "CAP_AUDIT_CONTROL",
    "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]


def make_privileged(spec: dict) -> dict:
    """``--privileged``, as Docker's, inside the guest only: every capability,
    no masked or read-only paths, /sys and cgroups writable, no seccomp, and an
    allow-all device rule. That rule is what containerd writes for a CRI
    privileged container too; on seeing it the guest agent gives the container
    the guest's device nodes (ember.agent.devices). The host is never reached:
    these are the guest kernel's capabilities and devices.
    """
    spec["process"]["capabilities"] = {k: list(ALL_CAPS) for k in
                                       ("bounding", "effective", "permitted")}
    linux = spec.setdefault("linux", {})
    for key in ("maskedPaths", "readonlyPaths", "seccomp"):
        linux.pop(key, None)
    linux.setdefault("resources", {})["devices"] = [{"allow": True, "access": "rwm"}]
    for m in spec.get("mounts", []):
        if m.get("destination") in ("/sys", "/sys/fs/cgroup"):
            m["options"] = [o for o in m.get("options", []) if o != "ro"] + ["rw"]
    return spec


def joined_netns(spec: dict) -> str | None:
    """The network namespace path an OCI spec joins, if any (CRI's sandbox: CNI's netns)."""
    for ns in ((spec.get("linux") or {}).get("namespaces") or []):
        if isinstance(ns, dict) and ns.get("type") == "network" and ns.get("path"):
            return str(ns["path"])
    return None
