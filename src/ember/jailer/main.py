"""``ember-jailer``: Firecracker's jailer command line, for any VMM.

Parses the command line into a :class:`JailSpec` and hands it to
:func:`ember.jailer.jail.run`. Every failure is one line on stderr
(``ember-jailer: ...``) and exit code 125; once the VMM runs, the jailer exits
with the VMM's own status (128+N when a signal N ended it).
"""

from __future__ import annotations

import argparse
import os
import sys

from ember.errors import EmberError
from ember.jailer.api import JailSpec, Placement
from ember.jailer.profiles import PROFILES
from ember.jailer.seccomp import MODES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise EmberError(message)


def _parser() -> _Parser:
    p = _Parser(prog="ember-jailer", allow_abbrev=False,
                description="Confine a VMM process: chroot, namespaces, cgroups, uid/gid, "
                            "no capabilities, seccomp. Arguments after -- go to the VMM.")
    p.add_argument("--id", required=True, help="jail id: letters, digits and '-', at most 64")
    p.add_argument("--exec-file", required=True, help="the VMM binary")
    p.add_argument("--uid", required=True, type=int)
    p.add_argument("--gid", required=True, type=int)
    p.add_argument("--chroot-base-dir", default="/srv/jailer")
    p.add_argument("--netns", help="network namespace to join, e.g. /var/run/netns/NAME "
                                   "(without it the VMM gets a new, empty one)")
    p.add_argument("--daemonize", action="store_true",
                   help="detach (setsid, stdio to /dev/null) once the VMM runs")
    p.add_argument("--new-pid-ns", action="store_true",
                   help="accepted for Firecracker's command line: the VMM always gets new "
                        "PID, IPC and UTS namespaces")
    p.add_argument("--tun", action="store_true",
                   help="create /dev/net/tun in the jail (for a VMM that opens its tap by name)")
    p.add_argument("--cgroup", action="append", default=[], metavar="FILE=VALUE")
    p.add_argument("--cgroup-version", type=int, choices=(1, 2))
    p.add_argument("--parent-cgroup")
    p.add_argument("--resource-limit", action="append", default=[], metavar="fsize=N|no-file=N")
    p.add_argument("--vmm-kind", choices=tuple(PROFILES), default="generic",
                   help="picks the seccomp allow-list and what goes into the jail")
    p.add_argument("--seccomp-level", choices=MODES, default="kill",
                   help="kill (default), log (allow but audit-log unlisted calls), off")
    p.add_argument("--seccomp-allow-file", help="own allow-list: syscall names, # comments")
    p.add_argument("--place", action="append", default=[], metavar="MODE[-rw]:HOST:JAIL",
                   help="MODE is hardlink, bind or copy; -rw makes it writable by uid/gid")
    p.add_argument("--mkdir", action="append", default=[], metavar="JAIL_PATH",
                   help="an empty directory in the jail owned by uid/gid (for sockets)")
    p.add_argument("--keep-fd", action="append", default=[], type=int, metavar="FD",
                   help="pass this open descriptor on to the VMM (repeatable)")
    kvm = p.add_mutually_exclusive_group()
    kvm.add_argument("--kvm", dest="kvm", action="store_true", default=None)
    kvm.add_argument("--no-kvm", dest="kvm", action="store_false")
    return p


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise EmberError(f"{flag} {item!r}: expected NAME=VALUE")
        out.append((name, value))
    return out


def parse(argv: list[str]) -> JailSpec:
    """Turn ``ember-jailer`` arguments into a JailSpec (the inverse of build_argv)."""
    if "--" in argv:
        cut = argv.index("--")
        own, exec_args = argv[:cut], argv[cut + 1:]
    else:
        own, exec_args = argv, []
    ns = _parser().parse_args(own)
    limits = {}
    for name, value in _pairs(ns.resource_limit, "--resource-limit"):
        if name not in ("fsize", "no-file"):
            raise EmberError(f"--resource-limit {name}: only fsize and no-file are supported")
        try:
            limits[name] = int(value)
        except ValueError:
            raise EmberError(f"--resource-limit {name}={value}: not a number") from None
    try:
        files = [Placement.from_arg(p) for p in ns.place]
    except ValueError as exc:
        raise EmberError(str(exc)) from None
    return JailSpec(
        id=ns.id, exec_file=ns.exec_file, uid=ns.uid, gid=ns.gid, args=exec_args,
        chroot_base_dir=ns.chroot_base_dir, netns=ns.netns, daemonize=ns.daemonize,
        new_pid_ns=True, cgroups=dict(_pairs(ns.cgroup, "--cgroup")),
        cgroup_version=ns.cgroup_version, parent_cgroup=ns.parent_cgroup,
        resource_limits=limits, files=files, dirs=ns.mkdir, seccomp=ns.seccomp_level,
        seccomp_allow_file=ns.seccomp_allow_file, vmm_kind=ns.vmm_kind, kvm=ns.kvm,
        keep_fds=ns.keep_fd, tun=ns.tun,
    )


def _close_inherited_fds(keep: list[int]) -> None:
    """Nothing the caller had open may leak into the VMM (Firecracker does the
    same), except what ``--keep-fd`` names (e.g. ``-incoming fd:3``)."""
    for fd in keep:
        if fd <= 2:
            raise EmberError(f"--keep-fd {fd}: stdin, stdout and stderr are always passed on")
        try:
            os.fstat(fd)
        except OSError:
            raise EmberError(f"--keep-fd {fd}: not an open file descriptor") from None
        os.set_inheritable(fd, True)
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _allow_root() -> bool:
    from ember.config import load_config

    return load_config().jailer.allow_root


def main(argv: list[str] | None = None, in_place: bool = False) -> None:
    """``ember-jailer ARGS``. ``in_place``: this process is PID 1 of a PID
    namespace made for it (the pre-forked helper of ember.jailer.launch), so
    it becomes the VMM itself instead of forking it and waiting."""
    from ember.jailer.jail import run

    argv = sys.argv[1:] if argv is None else argv
    try:
        spec = parse(argv)
        _close_inherited_fds(spec.keep_fds)
        # jailer.allow_root only matters for uid or gid 0: reading the configuration
        # otherwise would add its imports to every sandbox start.
        allow_root = (spec.uid == 0 or spec.gid == 0) and _allow_root()
        os.environ.clear()
        # The jail's folders and files get the modes its design gives them, whatever
        # umask the caller had (with 027 the jail uid could not reach its own VMM).
        os.umask(0o022)
        code = run(spec, allow_root=allow_root, in_place=in_place)
    except EmberError as exc:
        print(f"ember-jailer: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    sys.exit(code)
