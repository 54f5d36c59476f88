"""Sandbox records on disk: one folder per sandbox under the state directory.

``<state_dir>/sandboxes/<id>/state.json`` is the single source of truth for
``ember ps``, ``inspect``, ``rm``: it is rewritten atomically on every change,
so a crash of the CLI or the monitor at any moment leaves a readable record
that ``ember rm -f`` can use to find and clean up whatever is left (the VMM
pid, the monitor pid, the disk folder).

The CLI and the sandbox monitor both change the record, so every
read-modify-write (:meth:`StateStore.update`, :meth:`StateStore.modify`)
holds an ``flock`` on ``state.lock`` in the sandbox folder. That folder is
also the jailed VMM's ``/run`` and belongs to its uid: the lock file is
opened with ``O_NOFOLLOW``, made 0600, and used only if it is a regular file
of ours with a single link (anything else in its place is removed first).

The folder is the sandbox: it appears whole (made under a temporary name and
renamed into place, with a ``name`` file, replaced whole only by ``ember rename``) and as long
as it exists the sandbox is listed and its name stays taken, even when
``state.json`` is missing or unreadable (status ``unknown``). The status is
also checked against the processes: a sandbox whose monitor is gone is
``dead``, whatever the record says.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from ember.config import Config
from ember.errors import EmberError, NotFoundError
from ember.sandbox.record import VMRecord
from ember.sandbox.status import LIVE, Status
from ember.util import atomic_write, atomic_write_json, file_lock, pause_for_test, private_dir


@dataclass
class SandboxState(VMRecord):
    """``state.json``: one `ember run` sandbox; its VM's part (VMM pid, jail,
    netns) is the crash record every VM owner writes (:class:`VMRecord`)."""

    id: str
    name: str
    image: str = ""
    image_id: str = ""
    command: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    status: Status = Status.CREATING
    exit_code: int | None = None
    oom_killed: bool = False
    finished: float | None = None
    error: str = ""
    monitor_pid: int | None = None
    vcpus: int = 1
    cpus: float | None = None  # --cpus: the VMM's cgroup CPU limit too (None: none)
    memory_mib: int = 512
    tty: bool = False
    stdin: bool = False
    auto_remove: bool = False
    restored_from_snapshot: bool = False
    disk: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    network: str = "none"  # none | bridge (ember.net.bridge)
    publish: list[str] = field(default_factory=list)  # "IP:HOSTPORT:PORT/tcp"
    ip_address: str = ""  # on the ember0 bridge; recorded before the netns is made
    monitor_started: float | None = None  # the monitor's start time (guards pid reuse)
    # The container's env, cwd and user ("UID:GID"): `ember exec` starts from them, as
    # `docker exec` does (flags override them).
    exec_defaults: dict = field(default_factory=dict)
    # -v/--mount/--tmpfs (ember.sandbox.mounts.Mount records): a live sandbox's
    # "volume" entries are what holds a named volume (ember.storage.volumes).
    mounts: list[dict] = field(default_factory=list)
    creator_pid: int | None = None  # the process that made the record (until a monitor runs)
    creator_started: float | None = None
    # `ember run` options the monitor and `ember stop` act on (ember.sandbox.options).
    options: dict = field(default_factory=dict)
    restart_count: int = 0  # restarts by the --restart policy (ember.sandbox.restart)
    stop_requested: bool = False  # `ember stop`/`kill`: the restart policy stands down
    health: str = ""  # --health-cmd: starting | healthy | unhealthy (ember.sandbox.health)

    def __post_init__(self) -> None:
        # Records on disk hold the plain word; a word that is no status is an error.
        self.status = Status.parse(self.status)

    @property
    def short_id(self) -> str:
        return self.id[:12]


LOCK_NAME = "state.lock"
NAME_FILE = "name"
SANDBOX_ID = re.compile(r"[0-9a-f]{64}")


def template_vm_id(owner_id: str) -> str:
    """The VM id of a VM template built on behalf of ``owner_id`` (a sandbox or
    pod): derived from it, so the owner's removal finds (by its jail) a build
    that its killed monitor or shim left running."""
    return "tpl-" + owner_id[:60]


class RecordUnreadable(EmberError):
    """The sandbox folder exists but its state.json is missing or cannot be read."""


class StateStore:
    """Reads and writes sandbox records; safe across concurrent CLI processes."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.root = cfg.sandboxes_dir

    def dir(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    def disk_dir(self, sandbox_id: str) -> Path:
        return self.cfg.disks_dir / sandbox_id

    @contextmanager
    def lock(self) -> Iterator[None]:
        """A host-wide lock for name allocation and removal."""
        private_dir(self.root)  # records, sockets and logs are root's alone
        with file_lock(self.root / ".lock"):
            yield

    def create(self, st: SandboxState) -> None:
        """Make the sandbox folder with its record, all at once (call under :meth:`lock`).

        The folder is filled under a temporary name and renamed into place, so
        nobody sees it without its record and name; an id whose folder exists
        (even an unreadable one) is never reused.
        """
        private_dir(self.root)
        for stale in self.root.glob(".new-*"):  # a create killed half-way (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        final = self.dir(st.id)
        if os.path.lexists(final):
            raise EmberError(f"sandbox id {st.id} is already in use")
        tmp = self.root / f".new-{st.id}"
        os.mkdir(tmp, 0o700)
        try:
            atomic_write(tmp / NAME_FILE, st.name + "\n")
            atomic_write_json(tmp / "state.json", asdict(st))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def save(self, st: SandboxState) -> None:
        """Replace the whole record of an existing sandbox."""
        with self.record_lock(st.id):
            self._write(st)

    def _write(self, st: SandboxState) -> None:
        path = self.dir(st.id) / "state.json"
        if not path.parent.is_dir():  # never re-create a removed folder
            raise NotFoundError(f"no such sandbox: {st.id}")
        st.status = Status.parse(st.status)  # update(status=...) writes no stray word
        atomic_write_json(path, asdict(st))

    def load(self, sandbox_id: str) -> SandboxState:
        """The record as written; NotFoundError without a folder, RecordUnreadable
        when the folder has no readable record."""
        folder = self.dir(sandbox_id)
        path = folder / "state.json"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise RecordUnreadable(f"sandbox {sandbox_id}: record unreadable: "
                                           "state.json is not a regular file")
                data = json.loads(f.read())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            known = SandboxState.__dataclass_fields__
            st = SandboxState(**{k: v for k, v in data.items() if k in known})
            if st.id != sandbox_id:
                raise ValueError(f"it names sandbox {st.id!r}")
            return st
        except FileNotFoundError:
            if not folder.is_dir():
                raise NotFoundError(f"no such sandbox: {sandbox_id}") from None
            reason = "state.json is missing"
        except RecordUnreadable:
            raise
        except OSError as exc:
            reason = f"state.json: {exc.strerror or exc}"
        except (ValueError, TypeError) as exc:  # empty, garbage, wrong types
            reason = f"state.json is not a valid record ({exc})" if str(exc) else \
                "state.json is not a valid record"
        raise RecordUnreadable(f"sandbox {sandbox_id}: record unreadable: {reason}")

    def read(self, sandbox_id: str) -> SandboxState:
        """The refreshed record, or an ``unknown`` stand-in when it cannot be read.

        Raises NotFoundError only when the sandbox folder does not exist.
        """
        try:
            return self.refresh(self.load(sandbox_id))
        except RecordUnreadable as exc:
            return self.unknown(sandbox_id, exc.message.split(": ", 1)[-1])

    def unknown(self, sandbox_id: str, reason: str) -> SandboxState:
        """What can be said of a sandbox whose record is unreadable: its id, its
        name (from the ``name`` file written at creation) and why."""
        folder = self.dir(sandbox_id)
        name, created = "", 0.0
        try:
            fd = os.open(folder / NAME_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    created = os.fstat(f.fileno()).st_mtime
                    name = f.read(256).decode(errors="replace").strip()
        except OSError:
            pass
        if not created:
            try:
                created = folder.stat().st_mtime
            except OSError:
                created = time.time()
        return SandboxState(id=sandbox_id, name=name, created=created, status=Status.UNKNOWN,
                            error=reason)

    @contextmanager
    def record_lock(self, sandbox_id: str) -> Iterator[None]:
        """Hold the sandbox's record lock (NotFoundError if its folder is gone)."""
        fd = _open_lock(self.dir(sandbox_id) / LOCK_NAME, sandbox_id)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def modify(self, sandbox_id: str,
               change: Callable[[SandboxState], dict[str, object] | None]) -> SandboxState:
        """Read-modify-write under the record lock: ``change(record)`` returns the
        fields to set (or edits the record and returns None)."""
        with self.record_lock(sandbox_id):
            st = self.load(sandbox_id)
            for key, value in (change(st) or {}).items():
                setattr(st, key, value)
            self._write(st)
            return st

    def update(self, sandbox_id: str, **changes: object) -> SandboxState:
        return self.modify(sandbox_id, lambda _st: changes)

    def remove(self, sandbox_id: str) -> None:
        """Delete a sandbox folder (call under :meth:`lock`, last in a removal).

        The folder is first renamed to ``.rm-<id>``, so the sandbox and its
        name go in one step, never leaving a folder without its record or name
        file; a removal killed before the rest is deleted is finished by the
        next :meth:`all`.
        """
        tomb = self.root / f".rm-{sandbox_id}"
        try:
            with self.record_lock(sandbox_id):  # no update lands mid-removal
                _discard(tomb)
                os.rename(self.dir(sandbox_id), tomb)
        except NotFoundError:
            return  # already gone
        except (EmberError, OSError):
            _discard(tomb)
            try:
                os.rename(self.dir(sandbox_id), tomb)
            except FileNotFoundError:
                return
        pause_for_test("rm-renamed")
        _discard(tomb)

    def sweep(self) -> None:
        """Finish what killed processes left half-done: removals whose folder was
        already renamed away (``.rm-*``) and, when no create holds :meth:`lock`,
        creates killed before their folder was renamed into place (``.new-*``)."""
        for stale in self.root.glob(".rm-*"):
            _discard(stale)
        try:
            f = open(self.root / ".lock", "a")
        except OSError:
            return
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # a create is under way: its .new- folder is not stale
            for stale in self.root.glob(".new-*"):
                _discard(stale)
            self._sweep_abandoned()

    def _sweep_abandoned(self) -> None:
        """Remove records whose creator died before it started a sandbox monitor
        (call holding the host-wide lock). Nothing but the folder exists then:
        the monitor makes the VM, and the disk is made after the monitor."""
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
                continue
            try:
                st = self.load(entry.name)
            except EmberError:
                continue
            if creation_abandoned(st):
                pause_for_test("sweep-abandoned")
                self.remove(st.id)

    def all(self) -> list[SandboxState]:
        """Every sandbox folder, readable or not (status ``unknown``)."""
        out: list[SandboxState] = []
        if not self.root.is_dir():
            return out
        self.sweep()
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
                continue  # the lock file, folders being made
            try:
                out.append(self.read(entry.name))
            except NotFoundError:
                continue  # removed meanwhile
        return sorted(out, key=lambda s: s.created, reverse=True)

    def find(self, ref: str) -> SandboxState:
        """By name, full id or unique id prefix."""
        if not ref:
            raise NotFoundError("no sandbox named")
        candidates = self.all()
        for st in candidates:
            if st.name == ref or st.id == ref:
                return st
        matches = [st for st in candidates if st.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise EmberError(f"sandbox id prefix {ref!r} is ambiguous")
        raise NotFoundError(f"no such sandbox: {ref}")

    def name_taken(self, name: str) -> bool:
        return any(st.name == name for st in self.all())

    def rename(self, sandbox_id: str, name: str) -> SandboxState:
        """Give a sandbox a new name (call under :meth:`lock`, after checking that the
        name is free): the record and the ``name`` file, each replaced whole, so
        an unreadable record still answers to its new name."""
        with self.record_lock(sandbox_id):
            st = self.load(sandbox_id)
            st.name = name
            atomic_write(self.dir(sandbox_id) / NAME_FILE, name + "\n")
            self._write(st)
            return st

    def refresh(self, st: SandboxState) -> SandboxState:
        """Say ``dead`` for a live-looking sandbox whose monitor is gone.

        The monitor owns the VM: without it nothing serves the sandbox, records
        its exit or stops its VM, whatever the record says. A sandbox still
        being created has no monitor pid yet for a moment; it is dead if no
        monitor appeared within 5 minutes.
        """
        if st.status not in LIVE:
            return st
        if creation_abandoned(st):
            st.status = Status.DEAD
            st.error = st.error or (f"its creator (pid {st.creator_pid}) ended before "
                                    "a sandbox monitor started")
            return st
        if not st.monitor_pid and st.status == Status.CREATING:
            if time.time() - st.created > 300:
                st.status = Status.DEAD
                st.error = st.error or "its creation was abandoned (no sandbox monitor)"
            return st
        if monitor_alive(st):
            return st
        st.status = Status.DEAD
        if not st.error:
            who = f"the sandbox monitor (pid {st.monitor_pid})" if st.monitor_pid else \
                "the sandbox monitor"
            if vmm_alive(st) or sandbox_processes(st.id)[1]:
                st.error = f"{who} is gone; its VM still runs until `ember rm -f`"
            else:
                st.error = f"{who} and its VM are gone"
        return st


def _open_lock(path: Path, sandbox_id: str) -> int:
    """Open (making it if need be) a lock file only root can use: never through a
    symbolic link, never a FIFO, device or directory, never a file with other
    links or another owner; such an entry is removed and the open retried."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for _ in range(5):
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            raise NotFoundError(f"no such sandbox: {sandbox_id}") from None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES,
                                 errno.EPERM, errno.ETXTBSY, errno.EWOULDBLOCK):
                raise EmberError(f"sandbox {sandbox_id}: cannot open {path}: {exc}") from None
            _remove_entry(path)
            continue
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink == 1:
            if info.st_mode & 0o077:
                os.fchmod(fd, 0o600)
            return fd
        os.close(fd)
        _remove_entry(path)
    raise EmberError(f"sandbox {sandbox_id}: {path} keeps being replaced: cannot lock the record")


def _discard(path: Path) -> None:
    """Remove a file, link or folder tree if it is there; never fails."""
    try:
        _remove_entry(path)
    except EmberError:
        pass


def _remove_entry(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise EmberError(f"cannot remove {path}: {exc}") from None


def monitor_alive(st: SandboxState) -> bool:
    """True while the sandbox's monitor process runs (the very process, not a pid reuse)."""
    return pid_alive(st.monitor_pid, st.id, started=st.monitor_started)


def creation_abandoned(st: SandboxState) -> bool:
    """True for a record still ``creating``, with no monitor ever started, whose
    creator process has ended (the very process: its start time is compared)."""
    if st.status != Status.CREATING or st.monitor_pid or not st.creator_pid:
        return False
    started = process_started(st.creator_pid)
    if started is None or st.creator_started is None:
        return started is None
    return abs(started - st.creator_started) > 0.5


def vmm_alive(st: SandboxState) -> bool:
    """True while the recorded VMM pid is the sandbox's VMM: QEMU named
    ``ember-SHORT`` or Firecracker with ``--id ID`` (not any process that
    mentions the id, such as a user's ``tail`` of its console log)."""
    return (pid_alive(st.vmm_pid, f"-name ember-{st.id[:12]}")
            or pid_alive(st.vmm_pid, f"--id {st.id}"))


def process_started(pid: int) -> float | None:
    """A process's start time, as :func:`pid_alive` compares it."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def pid_alive(pid: int | None, marker: str, started: float | None = None) -> bool:
    """True if pid runs and its command line mentions marker (guards pid reuse);
    with ``started``, it must also have started then."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is not None and abs(proc.create_time() - started) > 0.5:
            return False
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return marker in cmdline or marker in proc.name() or _environ_mentions(pid, marker)


def _environ_mentions(pid: int, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


def kill_pid(pid: int | None, marker: str, sig: int = 9, started: float | None = None) -> None:
    if pid_alive(pid, marker, started):
        try:
            os.kill(pid, sig)  # type: ignore[arg-type]
        except ProcessLookupError:
            pass


def sandbox_processes(sandbox_id: str, jail_dirs: list[str] | None = None
                      ) -> tuple[list[int], list[int]]:
    """(monitor pids, VMM-side pids) of a sandbox, found by command line alone.

    What `ember rm -f` kills when the record cannot be read or is stale: the
    monitor (``-m ember.sandbox.monitor --id ID``), QEMU (``-name ember-SHORT``,
    jailed or not, and the jailer that starts it), a jailer started for the
    sandbox's VM or a template build on its behalf (``--id``, see
    :func:`template_vm_id`) and any process naming one of ``jail_dirs`` (the
    jailer's waiter). Only for a well-formed id.
    """
    if not SANDBOX_ID.fullmatch(sandbox_id):
        return [], []
    vm_name = f"ember-{sandbox_id[:12]}"
    jailer_ids = {sandbox_id, template_vm_id(sandbox_id)}  # a jailer not yet its waiter
    prefixes = [d.rstrip("/") for d in jail_dirs or []]
    me = os.getpid()
    monitors, vmms = [], []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info.get("cmdline") or []
        if proc.pid == me or not argv:
            continue
        pairs = set(zip(argv, argv[1:], strict=False))
        if "ember.sandbox.monitor" in argv and ("--id", sandbox_id) in pairs:
            monitors.append(proc.pid)
        elif ("-name", vm_name) in pairs or any(("--id", i) in pairs for i in jailer_ids) or any(
                a == p or a.startswith(p + "/") for a in argv for p in prefixes):
            vmms.append(proc.pid)
    return monitors, vmms
