"""The jailer's sequence: validate, build the jail, fork the VMM into it, supervise.

Order follows Firecracker's jailer (validate, clear the environment, build
``<base>/<exec name>/<id>/root``, put the binary there, join the netns, set
rlimits, enter the cgroups, unshare the mount namespace, pivot_root, create
device nodes, daemonize, new PID namespace, drop uid/gid, exec), with three
differences that make it safe for any VMM:

* the VMM always gets new PID, IPC and UTS namespaces and a network
  namespace: the one ``--netns`` names, else a new empty one, so a
  compromised VMM reaches no host socket (its NIC, if any, comes as a
  descriptor, or as a tap in the named namespace with ``--tun``);

* it stays behind as a small supervisor (parent of the VMM) so it can remove
  the jail and cgroups when the VMM exits and forward signals to it (unless
  it runs in place: see :func:`_become_vmm`);
* the child also sets no_new_privs, empties every capability set and loads a
  seccomp allow-list as the very last step before execve;
* bind mounts (and the tmpfs ``/dev``) exist only in the VMM's mount namespace.

Everything that can be checked is checked before anything is created, and a
failure later undoes what was made, so a bad argument leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ember.errors import EmberError
from ember.jailer import cgroups, files, linux, profiles, seccomp, waiter
from ember.jailer.api import JailSpec, jail_dir, jail_root
from ember.util import atomic_write

_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_FORWARDED = waiter.FORWARDED
_DEVICES = [  # (jail path, major, minor, mode, owned by the jail uid)
    ("/dev/null", 1, 3, 0o666, False),
    ("/dev/zero", 1, 5, 0o666, False),
    ("/dev/full", 1, 7, 0o666, False),
    ("/dev/random", 1, 8, 0o666, False),
    ("/dev/urandom", 1, 9, 0o666, False),
]
_TUN = ("/dev/net/tun", 10, 200, 0o660, True)
_KVM = ("/dev/kvm", 10, 232, 0o660, True)


@dataclass
class Plan:
    """What validation worked out; the child needs it after fork."""

    spec: JailSpec
    filt: object
    cgroups: cgroups.CgroupPlan
    libraries: list[str]
    binds: list[tuple[str, Path, bool]] = field(default_factory=list)
    devices: list[tuple[str, int, int, int, bool]] = field(default_factory=list)
    rlimits: list[tuple[int, int]] = field(default_factory=list)
    created_dirs: list[Path] = field(default_factory=list)
    last_cap: int = 40
    lib_cache: files.LibraryCache | None = None


def jailed_exec(spec: JailSpec) -> str:
    """Where the binary sits in the jail: ``/<name>`` like Firecracker, except QEMU.

    QEMU finds its modules and firmware relative to its own location (Debian's
    build is relocatable), so it keeps its host path, e.g. /usr/bin/qemu-system-x86_64.
    """
    if profiles.PROFILES[spec.vmm_kind].keep_host_path:
        return os.path.normpath(spec.exec_file)
    return "/" + spec.exec_name


def _wants_kvm(spec: JailSpec) -> bool:
    if spec.kvm is not None:
        return spec.kvm
    rule = profiles.PROFILES[spec.vmm_kind].kvm
    if rule == "always":
        return True
    if rule == "from-args":
        args = spec.args
        return "-enable-kvm" in args or any(
            ("accel=kvm" in a) or (a.startswith("kvm") and i > 0 and args[i - 1] == "-accel")
            for i, a in enumerate(args))
    return False


def validate(spec: JailSpec, allow_root: bool) -> Plan:
    """Check every argument; raise a one-line EmberError before anything exists."""
    if os.geteuid() != 0:
        raise EmberError("must run as root (it builds namespaces, cgroups and device nodes)")
    if spec.vmm_kind not in profiles.PROFILES:
        raise EmberError(f"--vmm-kind {spec.vmm_kind!r}: one of {', '.join(profiles.PROFILES)}")
    if not _ID_RE.match(spec.id):
        raise EmberError(f"--id {spec.id!r}: use 1-64 letters, digits or '-'")
    exe = spec.exec_file
    if not os.path.isabs(exe):
        raise EmberError(f"--exec-file {exe}: must be an absolute path")
    if not os.path.isfile(exe):
        raise EmberError(f"--exec-file {exe}: no such file")
    if not os.access(exe, os.X_OK):
        raise EmberError(f"--exec-file {exe}: not executable")
    for name, value in (("--uid", spec.uid), ("--gid", spec.gid)):
        if value < 0 or value > 0xFFFFFFFE:
            raise EmberError(f"{name} {value}: out of range")
        if value == 0 and not allow_root:
            raise EmberError(f"{name} 0: running the VMM as root is forbidden "
                             "(jailer.allow_root = false)")
    if not os.path.isabs(spec.chroot_base_dir):
        raise EmberError(f"--chroot-base-dir {spec.chroot_base_dir}: must be an absolute path")
    if os.path.exists(jail_dir(spec)):
        raise EmberError(f"jail {jail_dir(spec)} already exists (id in use?)")
    if spec.netns and not os.path.exists(spec.netns):
        raise EmberError(f"--netns {spec.netns}: no such network namespace")
    parent = spec.cgroup_parent
    if parent.startswith("/") or ".." in Path(parent).parts:
        raise EmberError(f"--parent-cgroup {parent}: must be a relative path without '..'")
    version = spec.cgroup_version or cgroups.detect_version()
    if version not in (1, 2):
        raise EmberError(f"--cgroup-version {version}: must be 1 or 2")
    for name in spec.cgroups:
        if "/" in name or "." not in name:
            raise EmberError(f"--cgroup {name}: expected a cgroup file such as memory.max")
    cg = cgroups.CgroupPlan(version, parent, spec.id, list(spec.cgroups.items()))
    cg.targets()  # checks that the hierarchies exist
    if spec.seccomp_allow_file:
        try:
            names = profiles.read_allow_file(spec.seccomp_allow_file)
        except OSError as exc:
            raise EmberError(f"--seccomp-allow-file {spec.seccomp_allow_file}: "
                             f"{exc.strerror}") from None
    else:
        names = profiles.syscalls_for(spec.vmm_kind)
    filt = seccomp.build_filter(spec.seccomp, names)
    root = jail_root(spec)
    for p in spec.files:
        files.under(root, p.jail_path)
        if not os.path.exists(p.host_path):
            raise EmberError(f"--place {p.to_arg()}: {p.host_path} does not exist")
        if p.mode == "hardlink" and os.path.isdir(p.host_path):
            raise EmberError(f"--place {p.to_arg()}: cannot hard link a directory "
                             "(use bind or copy)")
    for d in spec.dirs:
        files.under(root, d)
    rlimits = [(resource.RLIMIT_NOFILE, 2048)]  # Firecracker's default
    for name, value in spec.resource_limits.items():
        if value < 0:
            raise EmberError(f"--resource-limit {name}={value}: must not be negative")
        kind = resource.RLIMIT_FSIZE if name == "fsize" else resource.RLIMIT_NOFILE
        rlimits = [r for r in rlimits if r[0] != kind] + [(kind, value)]
    devices = list(_DEVICES)
    if spec.tun:
        if not os.path.exists("/dev/net/tun"):
            raise EmberError("--tun: /dev/net/tun does not exist on this host")
        devices.append(_TUN)
    if _wants_kvm(spec):
        if not os.path.exists("/dev/kvm"):
            raise EmberError("the VMM wants KVM but /dev/kvm does not exist")
        devices.append(_KVM)
    find_modules = profiles.PROFILES[spec.vmm_kind].modules
    modules = find_modules(exe) if find_modules is not None else []
    cache = files.LibraryCache(Path(spec.chroot_base_dir) / f".libs-{spec.exec_name}.json")
    libs = sorted(set(cache.libraries(exe, *modules)) | set(modules))
    return Plan(spec, filt, cg, libs, devices=devices, rlimits=rlimits,
                last_cap=linux.last_capability(), lib_cache=cache)


def build(plan: Plan) -> None:
    """Create the jail directory and put everything in; undo it all on failure."""
    spec = plan.spec
    home = jail_dir(spec)
    root = jail_root(spec)
    # Record which of base/exec-name we create, so a failure removes only ours.
    for d in (Path(spec.chroot_base_dir), home.parent):
        if not d.exists():
            d.mkdir(mode=0o755, parents=True)
            plan.created_dirs.append(d)
    try:
        home.mkdir(mode=0o755)
    except FileExistsError:
        raise EmberError(f"jail {home} already exists (id in use?)") from None
    try:
        root.mkdir(mode=0o755)
        (root / "dev").mkdir(mode=0o755)
        (home / "ns").mkdir(mode=0o700)  # mount point of the namespace's tmpfs root
        exe_target = files.under(root, jailed_exec(spec))
        files.make_parents(root, exe_target)
        files.link_or_copy(spec.exec_file, exe_target)
        for lib in plan.libraries:
            target = files.under(root, lib)
            files.make_parents(root, target)
            if not target.exists():
                files.link_or_copy(lib, target)
        for data_dir in profiles.PROFILES[spec.vmm_kind].data_dirs:
            if os.path.isdir(data_dir):
                target = files.under(root, data_dir)
                files.make_parents(root, target)
                files.make_stub(data_dir, target)
                plan.binds.append((data_dir, target, False))
        for p in spec.files:
            target = files.under(root, p.jail_path)
            files.make_parents(root, target)
            if p.mode == "bind":
                files.make_stub(p.host_path, target)
                plan.binds.append((p.host_path, target, p.writable))
                if p.writable:
                    os.chown(p.host_path, spec.uid, spec.gid)
            elif p.mode == "hardlink":
                files.link_or_copy(p.host_path, target, allow_copy=False)
                if p.writable:
                    os.chown(target, spec.uid, spec.gid)
            else:
                files.copy_into(p.host_path, target)
                os.chown(target, spec.uid if p.writable else 0, spec.gid)
                if not p.writable and target.is_file():
                    target.chmod((target.stat().st_mode & 0o755) | 0o040)
        for extra_dir in spec.dirs:
            target = files.under(root, extra_dir)
            target.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(target, spec.uid, spec.gid)
        plan.cgroups.create()
    except EmberError:
        unbuild(plan)
        raise
    except OSError as exc:
        unbuild(plan)
        raise EmberError(f"cannot build the jail in {home}: {exc}") from None


def unbuild(plan: Plan, rollback: bool = True) -> None:
    """Remove the jail and its cgroups; on rollback also the parents this run made.

    After a normal VMM exit the shared parents (``<base>/<exec name>``, the
    parent cgroup) stay, as with Firecracker: other jails may be using them.
    """
    shutil.rmtree(jail_dir(plan.spec), ignore_errors=True)
    cgroups.remove_jail_cgroups(plan.cgroups.parent, plan.spec.id)
    if not rollback:
        return
    plan.cgroups.remove_created()
    for d in reversed(plan.created_dirs):
        try:
            d.rmdir()
        except OSError:
            pass


def child(plan: Plan) -> None:
    """In the forked child: confine ourselves step by step, then exec the VMM."""
    spec = plan.spec
    for sig in (*_FORWARDED, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)  # Python ignores SIGPIPE/SIGXFSZ; don't pass that on
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    plan.cgroups.enter(0)  # "0" means the writing process
    if spec.netns:
        fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
        linux.setns(fd, linux.CLONE_NEWNET)
        os.close(fd)
    else:
        linux.unshare(linux.CLONE_NEWNET)  # empty: not even lo is up, no host socket to reach
    linux.unshare(linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
    for kind, value in plan.rlimits:
        resource.setrlimit(kind, (value, value))
    root = str(jail_root(spec))
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount(root, root, None, linux.MS_BIND)
    linux.mount(None, root, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_NOSUID)
    for src, target, writable in plan.binds:
        linux.mount(src, str(target), None, linux.MS_BIND | linux.MS_REC)
        flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_NOSUID | linux.MS_NODEV
        linux.mount(None, str(target), None, flags | (0 if writable else linux.MS_RDONLY))
    linux.mount("tmpfs", f"{root}/dev", "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC,
                "mode=755,size=64k")
    _pivot_into(root, str(jail_dir(spec) / "ns"))
    for path, major, minor, mode, owned in plan.devices:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.mknod(path, stat.S_IFCHR | mode, os.makedev(major, minor))
        os.chmod(path, mode)  # mknod applies the umask
        if owned:
            os.chown(path, spec.uid, spec.gid)
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    linux.drop_bounding_set(plan.last_cap)
    os.setgroups([])
    os.setresgid(spec.gid, spec.gid, spec.gid)
    os.setresuid(spec.uid, spec.uid, spec.uid)
    linux.clear_capabilities()
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
    exe = jailed_exec(spec)
    argv = [exe, *spec.args]
    if profiles.PROFILES[spec.vmm_kind].id_args:
        argv[1:1] = ["--id", spec.id]  # what Firecracker's own jailer passes
    seccomp.load(plan.filt)
    os.execve(exe, argv, {})


def _pivot_into(root: str, stage: str) -> None:
    """Make ``root`` our ``/`` and drop every host mount from this namespace.

    A bare pivot_root into the jail would do, but then /proc/PID/root reads
    "/" from the host. Instead a small tmpfs becomes the namespace's root, the
    jail's mount is moved to the same path inside it, the host's mounts are
    detached, and we chroot into the jail: /proc/PID/root then names the jail
    directory, and nothing of the host is left above it (an escape from the
    chroot would need CAP_SYS_CHROOT, which the VMM no longer has, and would
    find an empty tmpfs).
    """
    linux.mount("tmpfs", stage, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                "mode=700,size=16k")
    inner = stage + root
    os.makedirs(inner, mode=0o755)
    linux.mount(root, inner, None, linux.MS_MOVE)
    os.mkdir(f"{stage}/old_root", 0o700)
    linux.pivot_root(stage, f"{stage}/old_root")
    os.chdir("/")
    linux.umount2("/old_root", linux.MNT_DETACH)
    os.rmdir("/old_root")
    os.chroot(root)
    os.chdir("/")


def _daemonize() -> int | None:
    """Fork; the foreground process waits for word that the VMM runs, then exits.

    Returns the write end of the report pipe in the daemon, never returns in
    the foreground process.
    """
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    if os.fork() > 0:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode(errors="replace")
        if msg != "ok":
            raise EmberError(msg or "the jailer daemon died during setup")
        os._exit(0)
    os.close(rfd)
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return wfd


def run(spec: JailSpec, allow_root: bool = False, in_place: bool = False) -> int:
    """Validate, build, start the VMM in the jail, wait for it, clean up; its exit code.

    ``in_place`` (PID 1 of a PID namespace of our own): become the VMM instead,
    never returning; see :func:`_become_vmm`.
    """
    if in_place and spec.daemonize:
        raise EmberError("--daemonize: not with a jailer that becomes the VMM in place")
    plan = validate(spec, allow_root)
    build(plan)
    if in_place:
        _become_vmm(plan)
    report = None
    try:
        if spec.daemonize:
            report = _daemonize()
        code = _start_and_supervise(plan, report)
    except BaseException as exc:
        unbuild(plan)
        if report is not None:
            os.write(report, (exc.message if isinstance(exc, EmberError) else str(exc)).encode())
            os._exit(125)
        raise
    return code


def _become_vmm(plan: Plan) -> None:
    """Confine this very process and exec the VMM: no fork, no waiter.

    Only for the pre-forked helper of :mod:`ember.jailer.launch`, which is PID 1
    of a PID namespace made for it, so the VMM still gets a namespace where it
    sees no other process. Our parent reaps the VMM and removes the jail
    (:func:`ember.jailer.api.cleanup`); PDEATHSIG ties the VMM to that parent.
    ``vmm.pid`` is written first, with the pid the host sees (``/proc`` is
    still the host's), so the parent can tell when the jail is entered. A
    failure once the jail is built says why on stderr and exits 125, leaving
    the jail to the parent, which cleans up after any failed start.
    """
    home = jail_dir(plan.spec)
    try:
        atomic_write(home / "vmm.pid", f"{int(os.readlink('/proc/self'))}\n")
        if plan.lib_cache is not None:
            plan.lib_cache.save()
    except OSError as exc:
        os.write(2, f"ember-jailer: jail setup failed: {_failure(exc)}\n".encode())
        os._exit(125)
    _exec_vmm(plan, 2, "ember-jailer: jail setup failed: {}\n")


def _exec_vmm(plan: Plan, report: int, form: str) -> None:
    """:func:`child`, which execs the VMM; if it fails instead, ``form`` with
    the reason written to ``report``, and exit 125."""
    try:
        child(plan)
        msg = "exec returned"
    except BaseException as exc:  # noqa: BLE001 - whatever it was, report it
        msg = _failure(exc)
    try:
        os.write(report, form.format(msg).encode())
    finally:
        os._exit(125)


def _failure(exc: BaseException) -> str:
    if isinstance(exc, EmberError):
        return exc.message
    if isinstance(exc, OSError):
        return f"{exc.filename or ''} {exc.strerror or exc}".strip()
    return f"{type(exc).__name__}: {exc}"


def _start_and_supervise(plan: Plan, report: int | None) -> int:
    spec = plan.spec
    pending: list[int] = []  # caught before the waiter runs; it delivers them

    def forward(signum: int, _frame: object) -> None:
        pending.append(signum)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    linux.unshare(linux.CLONE_NEWPID)  # our next child is PID 1 of a new namespace
    errr, errw = os.pipe2(os.O_CLOEXEC)
    child_pid = os.fork()
    if child_pid == 0:
        os.close(errr)
        _exec_vmm(plan, errw, "jail setup failed: {}")
    os.close(errw)
    with os.fdopen(errr, "rb") as r:
        failure = r.read().decode(errors="replace")
    if failure:
        os.waitpid(child_pid, 0)
        raise EmberError(failure)
    pid = child_pid
    for fd in spec.keep_fds:  # the VMM has them now; a pipe's reader must see its EOF
        try:
            os.close(fd)
        except OSError:
            pass
    if plan.lib_cache is not None:
        plan.lib_cache.save()  # only now: a start that failed leaves nothing behind
    home = jail_dir(spec)
    atomic_write(home / "vmm.pid", f"{pid}\n")
    atomic_write(home / "jailer.pid", f"{os.getpid()}\n")
    if report is not None:
        os.write(report, b"ok")
        os.close(report)
    _become_waiter(plan, pid, pending)
    # Only if the lean waiter could not be exec'd: supervise here, as it would.
    escalated: list[int] = []

    def deliver(signum: int, _frame: object) -> None:
        if waiter.deliver(pid, signum):
            escalated.append(signum)

    for sig in _FORWARDED:
        signal.signal(sig, deliver)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    _, status = os.waitpid(pid, 0)
    unbuild(plan, rollback=False)
    return waiter.exit_code(status, escalated)


def _become_waiter(plan: Plan, pid: int, pending: list[int]) -> None:
    """Exec the small stdlib-only waiter in place of this process (same pid).

    The full jailer holds ~11 MiB for the whole life of the VMM; the waiter
    ~4 MiB. Forwarded signals are blocked across the exec and stay pending
    until the waiter has its handlers, so none is lost; those this process
    caught itself are raised again while blocked, so the waiter both
    delivers them and knows when one had to become SIGKILL (its exit code
    then says 128+SIGTERM, not 128+SIGKILL). Returns only if exec failed,
    with the signals still blocked.
    """
    leaves = [str(p) for p in cgroups.jail_cgroup_dirs(plan.cgroups.parent, plan.spec.id)]
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    while pending:  # a handler may still run for one caught just before the block
        os.kill(os.getpid(), pending.pop())
    try:
        os.execv(sys.executable, [sys.executable, "-I", "-S", waiter.__file__, str(pid),
                                  str(jail_dir(plan.spec)), *leaves])
    except OSError:
        pass
