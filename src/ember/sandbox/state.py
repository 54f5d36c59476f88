"""Sandbox records on disk: one folder per sandbox under the state directory.

``<state_dir>/sandboxes/<id>/state.json`` is the single source of truth for
``ember ps``, ``inspect``, ``rm``: it is rewritten atomically on every change,
so a crash of the CLI or the monitor at any moment leaves a readable record
that ``ember rm -f`` can use to find and clean up whatever is left (the VMM
pid, the monitor pid, the disk folder).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from ember.config import Config
from ember.errors import EmberError, NotFoundError
from ember.util import atomic_write_json


@dataclass
class SandboxState:
    id: str
    name: str
    image: str = ""
    image_id: str = ""
    command: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    status: str = "creating"  # creating | running | paused | exited | dead
    exit_code: int | None = None
    oom_killed: bool = False
    finished: float | None = None
    error: str = ""
    monitor_pid: int | None = None
    vmm_pid: int | None = None
    vmm_kind: str = "qemu"
    vcpus: int = 1
    cpus: float | None = None  # --cpus: the VMM's cgroup CPU limit too (None: none)
    memory_mib: int = 512
    tty: bool = False
    stdin: bool = False
    auto_remove: bool = False
    restored_from_snapshot: bool = False
    disk: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    jail: dict = field(default_factory=dict)
    network: str = "none"  # none | bridge (ember.net.bridge)
    publish: list[str] = field(default_factory=list)  # "IP:HOSTPORT:PORT/tcp"
    ip_address: str = ""  # on the ember0 bridge; recorded before the netns is made
    netns: str = ""

    @property
    def short_id(self) -> str:
        return self.id[:12]


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
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def save(self, st: SandboxState) -> None:
        atomic_write_json(self.dir(st.id) / "state.json", asdict(st))

    def load(self, sandbox_id: str) -> SandboxState:
        path = self.dir(sandbox_id) / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFoundError(f"no such sandbox: {sandbox_id}") from None
        except (OSError, ValueError) as exc:
            raise EmberError(f"sandbox {sandbox_id}: unreadable state ({exc})") from None
        known = SandboxState.__dataclass_fields__
        return SandboxState(**{k: v for k, v in data.items() if k in known})

    def update(self, sandbox_id: str, **changes: object) -> SandboxState:
        st = self.load(sandbox_id)
        for key, value in changes.items():
            setattr(st, key, value)
        self.save(st)
        return st

    def all(self) -> list[SandboxState]:
        out = []
        if not self.root.is_dir():
            return out
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and (entry / "state.json").exists():
                try:
                    out.append(self.refresh(self.load(entry.name)))
                except EmberError:
                    continue
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

    def refresh(self, st: SandboxState) -> SandboxState:
        """Notice a sandbox whose monitor and VMM died without recording it."""
        if st.status in ("running", "paused", "creating"):
            monitor_alive = pid_alive(st.monitor_pid, st.id)
            vmm_alive = pid_alive(st.vmm_pid, st.id[:12])
            if not monitor_alive and not vmm_alive and st.status != "creating":
                st.status = "dead"
                st.error = st.error or "the VM and its monitor are gone"
            elif st.status == "creating" and not monitor_alive and time.time() - st.created > 300:
                st.status = "dead"
        return st


def pid_alive(pid: int | None, marker: str) -> bool:
    """True if pid runs and its command line mentions marker (guards pid reuse)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
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


def kill_pid(pid: int | None, marker: str, sig: int = 9) -> None:
    if pid_alive(pid, marker):
        try:
            os.kill(pid, sig)  # type: ignore[arg-type]
        except ProcessLookupError:
            pass
