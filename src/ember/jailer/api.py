"""Python API of the jailer, for code that starts a VMM (Ember's sandbox layer).

A :class:`JailSpec` describes one jail. ``build_argv(spec)`` turns it into the
``ember-jailer ...`` command line (``ember-jailer``'s own parser turns that
command line back into the same JailSpec, so the two cannot drift apart);
``jail_root(spec)`` says where the VMM's ``/`` is on the host, so the caller can
find the sockets and files the VMM creates; ``cleanup(spec)`` removes the jail
directory and cgroups, idempotently, for when the jailer itself could not
(it was SIGKILLed, the machine rebooted).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ember.errors import EmberError
from ember.jailer import cgroups

if TYPE_CHECKING:  # ember-jailer imports this module: it starts faster without tomllib & co
    from ember.config import Config, JailerConfig

PLACE_MODES = ("hardlink", "bind", "copy")
DEFAULT_BASE = "/srv/jailer"


@dataclass
class Placement:
    """A host file or directory made visible inside the jail.

    ``hardlink`` and ``copy`` put a file into the jail directory before the VMM
    starts (a hard link costs nothing on the same file system and falls back to
    a copy across file systems only for the exec file and its libraries);
    ``bind`` mounts it in the VMM's private mount namespace only, so the host
    never sees the mount and it vanishes with the VMM. ``writable`` placements
    are chowned to the jail's uid/gid (for bind and hardlink that is the host
    file itself); read-only binds are mounted read-only.
    """

    host_path: str
    jail_path: str
    mode: str = "hardlink"
    writable: bool = False

    def to_arg(self) -> str:
        return f"{self.mode}{'-rw' if self.writable else ''}:{self.host_path}:{self.jail_path}"

    @classmethod
    def from_arg(cls, text: str) -> Placement:
        """Parse ``MODE[-rw]:HOST:JAIL``; HOST may contain colons, JAIL may not."""
        mode, sep, rest = text.partition(":")
        host, sep2, jail = rest.rpartition(":")
        if not sep or not sep2 or not host or not jail:
            raise ValueError(f"--place {text!r}: expected MODE:HOST_PATH:JAIL_PATH")
        writable = mode.endswith("-rw")
        mode = mode.removesuffix("-rw")
        if mode not in PLACE_MODES:
            raise ValueError(f"--place {text!r}: mode must be one of {', '.join(PLACE_MODES)} "
                             "(with -rw for writable)")
        return cls(host, jail, mode, writable)


@dataclass
class JailSpec:
    """Everything ``ember-jailer`` needs; field names follow its flags."""

    id: str
    exec_file: str
    uid: int
    gid: int
    args: list[str] = field(default_factory=list)
    chroot_base_dir: str = DEFAULT_BASE
    netns: str | None = None
    daemonize: bool = False
    new_pid_ns: bool = True  # always on: accepted for Firecracker's command line only
    cgroups: dict[str, str] = field(default_factory=dict)
    cgroup_version: int | None = None  # None: detect (1 on hybrid hosts like this one)
    parent_cgroup: str | None = None  # None: the exec file's name, as Firecracker does
    resource_limits: dict[str, int] = field(default_factory=dict)  # fsize, no-file
    files: list[Placement] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # empty dirs owned by uid:gid
    seccomp: str = "kill"  # kill | log | off
    seccomp_allow_file: str | None = None  # overrides the vmm_kind list
    vmm_kind: str = "generic"
    kvm: bool | None = None  # None: qemu → from its args, firecracker → yes, generic → no
    tun: bool = False  # /dev/net/tun in the jail (a VMM that opens its tap by name)
    keep_fds: list[int] = field(default_factory=list)  # open fds the VMM inherits
    jailer_binary: str | None = None

    @property
    def exec_name(self) -> str:
        return os.path.basename(self.exec_file)

    @property
    def cgroup_parent(self) -> str:
        return self.parent_cgroup or self.exec_name

    def place(self, host_path: str | os.PathLike, mode: str = "hardlink", writable: bool = False,
              jail_path: str | None = None) -> str:
        """Add a placement and return the path the VMM must use for it.

        Without ``jail_path`` the file lands at ``/<basename>`` (made unique), so
        a caller can write ``"-kernel", spec.place(kernel)``.
        """
        if jail_path is None:
            name = os.path.basename(os.fspath(host_path).rstrip("/")) or "file"
            taken = {p.jail_path for p in self.files} | set(self.dirs)
            jail_path, n = f"/{name}", 1
            while jail_path in taken:
                n += 1
                jail_path = f"/{n}-{name}"
        self.files.append(Placement(os.fspath(host_path), jail_path, mode, writable))
        return jail_path


def jailer_command() -> str:
    """The ember-jailer next to the running interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "ember-jailer"
    if beside.exists():
        return str(beside)
    return shutil.which("ember-jailer") or "ember-jailer"


def build_argv(spec: JailSpec) -> list[str]:
    """The ``ember-jailer`` command line that sets up ``spec`` and runs its VMM."""
    argv = [spec.jailer_binary or jailer_command(),
            "--id", spec.id, "--exec-file", spec.exec_file,
            "--uid", str(spec.uid), "--gid", str(spec.gid),
            "--chroot-base-dir", spec.chroot_base_dir,
            "--vmm-kind", spec.vmm_kind, "--seccomp-level", spec.seccomp]
    if spec.netns:
        argv += ["--netns", spec.netns]
    if spec.daemonize:
        argv.append("--daemonize")
    if spec.new_pid_ns:
        argv.append("--new-pid-ns")
    for name, value in spec.cgroups.items():
        argv += ["--cgroup", f"{name}={value}"]
    if spec.cgroup_version is not None:
        argv += ["--cgroup-version", str(spec.cgroup_version)]
    if spec.parent_cgroup:
        argv += ["--parent-cgroup", spec.parent_cgroup]
    for resource, limit in spec.resource_limits.items():
        argv += ["--resource-limit", f"{resource}={limit}"]
    for placement in spec.files:
        argv += ["--place", placement.to_arg()]
    for d in spec.dirs:
        argv += ["--mkdir", d]
    if spec.seccomp_allow_file:
        argv += ["--seccomp-allow-file", spec.seccomp_allow_file]
    if spec.kvm is not None:
        argv.append("--kvm" if spec.kvm else "--no-kvm")
    if spec.tun:
        argv.append("--tun")
    for fd in spec.keep_fds:
        argv += ["--keep-fd", str(fd)]
    return argv + ["--", *spec.args]


def jail_dir(spec: JailSpec) -> Path:
    """``<base>/<exec name>/<id>``: holds ``root/`` plus ``vmm.pid`` and ``jailer.pid``."""
    return Path(spec.chroot_base_dir) / spec.exec_name / spec.id


def jail_root(spec: JailSpec) -> Path:
    """The host path of the VMM's ``/``: a jail path P is at ``jail_root(spec) / P``."""
    return jail_dir(spec) / "root"


def host_path(spec: JailSpec, path_in_jail: str) -> Path:
    return jail_root(spec) / path_in_jail.lstrip("/")


def vmm_pid(spec: JailSpec) -> int | None:
    """The VMM's pid (host pid namespace), once the jailer has exec'd it."""
    try:
        return int((jail_dir(spec) / "vmm.pid").read_text())
    except (OSError, ValueError):
        return None


def live_vmm(spec: JailSpec) -> int | None:
    """The VMM's pid once it is in this jail and while it runs there (guards
    against pid reuse, and against a pid written before the jail was entered)."""
    pid = vmm_pid(spec)
    if pid is None:
        return None
    try:
        return pid if os.readlink(f"/proc/{pid}/root") == str(jail_root(spec)) else None
    except OSError:
        return None


def cleanup(spec: JailSpec) -> None:
    """Stop a VMM still running in the jail, remove the jail directory and its
    cgroups; safe to call any number of times.

    Removal never follows symlinks or crosses into mounts (binds exist only in
    the VMM's own mount namespace), so a hostile VMM cannot steer it.
    """
    pid = live_vmm(spec)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(jail_dir(spec), ignore_errors=True)
    cgroups.remove_jail_cgroups(spec.cgroup_parent, spec.id)


def allocate_uid(jcfg: JailerConfig, key: str, etc: str | os.PathLike = "/etc") -> int:
    """A uid (used as gid too) for one sandbox, from ``[uid_base, uid_base + uid_count)``.

    Starts at a hash of ``key`` and skips uids that a running process already
    has (a shared uid could signal the other's VMM) and ids the host's account
    files use or delegate (``ember.jailer.uids``: passwd, group, subuid, subgid),
    so a VMM never shares an id with a user, a group or a rootless container.
    """
    import psutil  # here: ember-jailer itself imports this module and must start fast

    from ember.jailer.uids import MAX_ID, reserved_ids

    if jcfg.uid_base < 1 or jcfg.uid_count < 1 or jcfg.uid_base + jcfg.uid_count - 1 > MAX_ID:
        raise EmberError(f"jailer.uid_base {jcfg.uid_base} and uid_count {jcfg.uid_count}: "
                         f"the range must lie within 1..{MAX_ID}")
    reserved = reserved_ids(etc)
    taken = set()
    for proc in psutil.process_iter(["uids"]):
        try:
            taken.add(proc.info["uids"].real)
        except (psutil.Error, AttributeError):
            continue
    start = int(hashlib.sha256(key.encode()).hexdigest(), 16) % jcfg.uid_count
    for i in range(jcfg.uid_count):
        uid = jcfg.uid_base + (start + i) % jcfg.uid_count
        if uid not in taken and uid not in reserved:
            return uid
    raise EmberError(f"no free jailer uid left in [{jcfg.uid_base}, "
                     f"{jcfg.uid_base + jcfg.uid_count}): all are running or used by "
                     "/etc/passwd, group, subuid or subgid (change jailer.uid_base or uid_count)")


def spec_from_config(cfg: Config, **fields) -> JailSpec:
    """A JailSpec with the ``[jailer]`` settings of the configuration filled in."""
    j = cfg.jailer
    defaults = {"chroot_base_dir": j.chroot_base_dir, "seccomp": j.seccomp,
                "cgroup_version": j.cgroup_version or None, "parent_cgroup": j.parent_cgroup}
    return JailSpec(**{**defaults, **fields})
