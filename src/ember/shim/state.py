"""The shim's in-memory view of its containers and processes, and the files it keeps.

Layout of a pod folder (``<state_dir>/shim/<key>``, a short hash so socket
paths stay under the 107-byte limit whatever the ids are)::

    shim.sock             the ttrpc socket containerd talks to
    pod.json              shim pid, VMM pid, cgroups made (for `delete` after a crash)
    vm/                   the VM's folder (agent and QMP sockets, console log)
    containers/<id>.json  per container: bundle, exit status once known
    c/<key>/              per container: its root disk when the shim made one
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.shim.proto import task_pb2
from ember.shim.rootfs import Disk
from ember.shim.stdio import StdioPumps

CREATED = task_pb2.CREATED
RUNNING = task_pb2.RUNNING
STOPPED = task_pb2.STOPPED
PAUSED = task_pb2.PAUSED


@dataclass
class Proc:
    """A container's init process (exec_id "") or an exec'd one."""

    cid: str
    exec_id: str
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    spec: bytes = b""  # exec: the OCI process JSON
    pid: int = 0
    status: task_pb2.Status = CREATED
    exit_status: int = 0
    exited_at_ns: int = 0
    exited: threading.Event = field(default_factory=threading.Event)
    pumps: StdioPumps | None = None

    def mark_exited(self, status: int, at_ns: int | None = None) -> None:
        self.status = STOPPED
        self.exit_status = status
        self.exited_at_ns = at_ns or time.time_ns()


@dataclass
class Container:
    id: str
    bundle: str
    owner: bool  # booted the pod's VM
    init: Proc
    rootfs: list = field(default_factory=list)  # containerd Mounts, for the create event
    disk: Disk | None = None
    drive_id: str | None = None
    work_dir: Path | None = None
    execs: dict[str, Proc] = field(default_factory=dict)
    vm_paused: bool = False
    # Made at Start with one agent call and one crun run (containerd's CRI plugin
    # creates and starts a task in one StartContainer): (guest spec, root disk).
    pending: tuple[dict, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def proc(self, exec_id: str) -> Proc | None:
        return self.init if not exec_id else self.execs.get(exec_id)
