"""containerd.task.v2.Task, served by the shim over ttrpc, backed by the pod's VM.

Each containerd call maps onto the guest agent: Create attaches the
container's root disk and creates it in the guest (booting the VM first for
the pod's sandbox container), Start starts it and watches it exit, Exec/Start
run extra processes, Kill/ResizePty/CloseIO/Update/Stats/Pids forward to the
agent, Pause/Resume pause the whole VM when the container is alone in it (its
processes *and* its guest kernel stop) and freeze the container otherwise.

Errors follow containerd's conventions (errdefs over gRPC codes): an unknown
container or exec is NOT_FOUND, a bad spec INVALID_ARGUMENT, an operation
that the process's state forbids (delete of a running task, exec in a stopped
one) FAILED_PRECONDITION, a kill of an exited process NOT_FOUND ("already
finished", as runc's shim answers: containerd takes it as done), checkpointing
UNIMPLEMENTED. A failed request never takes the shim down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf import empty_pb2

from ember import __version__, trace
from ember.agent.proto import AGENT_SERVICE, agent_pb2
from ember.config import Config
from ember.errors import (
    AgentError,
    CommandNotFound,
    CommandNotRunnable,
    EmberError,
    NotFoundError,
    VMError,
)
from ember.sandbox.events import PodEvents
from ember.sandbox.vm import SandboxVM
from ember.shim import guestspec, metrics, podns, rootfs, volumes
from ember.shim.events import Publisher, timestamp
from ember.shim.layout import ANN_TYPE, pod_identity, short_key
from ember.shim.pod import Pod, SizeError
from ember.shim.proto import events_pb2 as ev
from ember.shim.proto import task_pb2 as pb
from ember.shim.state import CREATED, PAUSED, RUNNING, STOPPED, Container, Proc
from ember.shim.stdio import StdioPumps
from ember.ttrpc import Code, Server, TTRPCError
from ember.util import atomic_write_json

log = logging.getLogger("ember.shim.service")

SERVICE = "containerd.task.v2.Task"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DRAIN_TIMEOUT = 2.0
EMPTY = empty_pb2.Empty()


def _err(exc: EmberError) -> TTRPCError:
    """The ttrpc status for an Ember error (containerd turns it into an errdefs error)."""
    if isinstance(exc, (CommandNotFound, CommandNotRunnable)):
        return TTRPCError(Code.UNKNOWN, f"exec failed: {exc.message}")
    if isinstance(exc, NotFoundError):
        return TTRPCError(Code.NOT_FOUND, exc.message)
    if isinstance(exc, rootfs.RootfsError):
        return TTRPCError(Code.INVALID_ARGUMENT, exc.message)
    if isinstance(exc, VMError):
        return TTRPCError(Code.UNAVAILABLE, exc.message)
    code = getattr(exc, "code", None)
    return TTRPCError(code if isinstance(code, int) and code else Code.UNKNOWN, exc.message)


class TaskService:
    """All containers of one pod; one instance per shim process."""

    def __init__(self, cfg: Config, pod_dir: Path, group_id: str, namespace: str,
                 publisher: Publisher, on_exit: Callable[[], None]) -> None:
        self.cfg = cfg
        self.dir = pod_dir
        self.namespace = namespace
        self.events = publisher
        self.pod = Pod(cfg, pod_dir, group_id)
        # Every task event goes to the node's event log too (`ember events`, metrics).
        self.pod.events = publisher.node = PodEvents(cfg.state_dir, group_id, cfg.vm.hypervisor)
        self.volumes = volumes.PodVolumes(cfg.data_dir / "shim-volumes" / pod_dir.name)
        self.volumes.bind(self.pod)
        self.on_exit = on_exit
        self.pid = os.getpid()
        self._lock = threading.RLock()
        self._containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self._shutting_down = False
        self._vm_stopper: threading.Thread | None = None

    def register(self, server: Server) -> None:
        server.register_proto_service(pb.DESCRIPTOR.services_by_name["Task"], self)
        # `ember metrics` reaches the pod's guest here: the VM's agent channel is ours alone.
        server.register(AGENT_SERVICE, "GuestStats", self._guest_stats)

    def _guest_stats(self, payload: bytes, ctx) -> bytes:
        """ember.agent.v1.Agent/GuestStats of the pod's guest; UNAVAILABLE at once while
        the VM is paused (its agent cannot answer) or not running."""
        with self._lock:
            paused = any(c.vm_paused for c in self._containers.values())
        agent = self.pod.agent
        if paused or agent is None:
            raise TTRPCError(Code.UNAVAILABLE, "the pod's VM is " + ("paused" if paused
                                                                     else "not running"))
        left = ctx.time_left()
        try:
            return agent.guest_stats(timeout=min(left, 10.0) if left is not None else 10.0
                                     ).SerializeToString()
        except EmberError as exc:
            raise _err(exc) from None

    # ---------------------------------------------------------------- lookups
    def _container(self, cid: str) -> Container:
        with self._lock:
            c = self._containers.get(cid)
        if c is None:
            raise TTRPCError(Code.NOT_FOUND, f"container {cid!r} not found")
        return c

    def _proc(self, cid: str, exec_id: str) -> tuple[Container, Proc]:
        c = self._container(cid)
        p = c.proc(exec_id)
        if p is None:
            raise TTRPCError(Code.NOT_FOUND, f"exec {exec_id!r} not found in container {cid!r}")
        return c, p

    def _agent(self):
        agent = self.pod.agent
        if agent is None:
            raise TTRPCError(Code.FAILED_PRECONDITION, "the pod's VM is not running")
        return agent

    def _vm(self) -> SandboxVM:
        vm = self.pod.vm
        if vm is None:
            raise TTRPCError(Code.FAILED_PRECONDITION, "the pod's VM is not running")
        return vm

    def _record(self, c: Container) -> None:
        """What `delete` reports if the shim dies: the exit status once known."""
        p = c.init
        with contextlib.suppress(OSError):
            atomic_write_json(self.dir / "containers" / f"{c.id}.json", {
                "bundle": c.bundle, "pid": p.pid, "status": int(p.status),
                "exit_status": p.exit_status, "exited_at_ns": p.exited_at_ns,
            })

    # ----------------------------------------------------------------- create
    def Create(self, req: pb.CreateTaskRequest, ctx) -> pb.CreateTaskResponse:
        cid = req.id
        if not ID_RE.match(cid):
            raise TTRPCError(Code.INVALID_ARGUMENT, f"invalid container id {cid!r}")
        if req.checkpoint:
            raise TTRPCError(Code.UNIMPLEMENTED, "restoring from a checkpoint is not supported")
        with self._lock:
            if self._shutting_down:
                raise TTRPCError(Code.FAILED_PRECONDITION, "the shim is shutting down")
            if cid in self._containers or cid in self._creating:
                raise TTRPCError(Code.ALREADY_EXISTS, f"container {cid!r} already exists")
            self._creating.add(cid)
        try:
            c = self._create(req)
        finally:
            with self._lock:
                self._creating.discard(cid)
        with self._lock:
            self._containers[cid] = c
        self._record(c)
        io = ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                       terminal=req.terminal)
        self.events.publish(ev.TaskCreate(container_id=cid, bundle=req.bundle, rootfs=req.rootfs,
                                          io=io, pid=c.init.pid))
        return pb.CreateTaskResponse(pid=c.init.pid)

    def _read_spec(self, bundle: str) -> dict:
        path = Path(bundle) / "config.json"
        try:
            spec = json.loads(path.read_text())
        except FileNotFoundError:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"bundle {bundle} has no config.json") from None
        except (OSError, ValueError) as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"{path} is not a valid OCI spec: {exc}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
            raise TTRPCError(Code.INVALID_ARGUMENT, f"{path} is not a valid OCI spec: no process")
        args = spec["process"].get("args")
        if not isinstance(args, list) or not args:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"{path}: process.args must be a non-empty list")
        return spec

    def _create(self, req: pb.CreateTaskRequest) -> Container:
        cid = req.id
        spec = self._read_spec(req.bundle)
        try:
            podns.refuse_host_sharing(spec)  # before any VM boots: a refusal leaves nothing
        except podns.HostSharingError as exc:
            raise _err(exc) from None
        annotations = spec.get("annotations") or {}
        joining, sandbox = pod_identity(annotations)
        if joining:
            if sandbox != self.pod.group_id:
                raise TTRPCError(Code.FAILED_PRECONDITION,
                                 f"container {cid} belongs to sandbox {sandbox!r}, "
                                 "not this shim's pod")
            if not self.pod.running:
                raise TTRPCError(Code.FAILED_PRECONDITION,
                                 f"sandbox {self.pod.group_id} has no running VM")
        elif self.pod.running or self.pod.vm is not None:
            raise TTRPCError(Code.ALREADY_EXISTS, "this pod already has its sandbox container")
        try:
            self.volumes.check(spec)  # refuse before anything is booted or attached
        except EmberError as exc:
            raise _err(exc) from None
        work = self.dir / "c" / short_key(cid, n=12)
        mounts = [rootfs.MountSpec(m.type, m.source, list(m.options)) for m in req.rootfs]
        # A CRI pod's sandbox: the agent holds the pod's namespaces without
        # running the sandbox image (ember.agent.podholder), so no disk for it.
        hold = not joining and podns.is_sandbox(annotations)
        # containerd's CRI plugin creates and starts the task within one
        # StartContainer: the guest makes and runs it at Start, with one agent
        # call and one crun run, as `ember run` does.
        defer = joining and annotations.get(ANN_TYPE) == "container"
        boot_error: list[BaseException] = []
        booter = None
        if not joining:
            booter = threading.Thread(target=self._boot, args=(spec, annotations, boot_error),
                                      name="vm-boot", daemon=True)
            booter.start()
        c = Container(cid, req.bundle, not joining,
                      Proc(cid, "", req.stdin, req.stdout, req.stderr, req.terminal,
                           pid=self.pid), list(req.rootfs), work_dir=work)
        try:
            try:
                if not hold:
                    with trace.span("rootfs prepare"):
                        c.disk = rootfs.prepare(mounts, Path(req.bundle), work,
                                                self.cfg.data_dir / "shim-rootfs")
            finally:
                if booter is not None:
                    booter.join()
            if boot_error:
                raise boot_error[0]
            guest, files = guestspec.for_guest(spec, cid)
            agent = self._agent()
            for f in files:
                agent.copy_file(f.path, f.data, mode=f.mode, make_dirs=True)
            guest["mounts"] = self.volumes.carry(guest, cid)
            if hold:
                with trace.span("pod namespaces"):
                    agent.create_container(cid, guest, None, hold_namespaces=True)
            else:
                assert c.disk is not None
                with trace.span("disk attach"):
                    c.drive_id, dev = self._vm().attach_disk(c.disk.path, c.disk.format,
                                                             c.disk.readonly)
                blk = agent_pb2.BlockDevice(kind=dev.kind, address=dev.address, fstype="ext4",
                                            readonly=c.disk.readonly)
                if defer:
                    c.pending = (guest, blk)
                else:
                    with trace.span("container create"):
                        agent.create_container(cid, guest, blk, stdin=bool(req.stdin))
        except SizeError as exc:
            self._undo_create(c)
            raise TTRPCError(Code.INVALID_ARGUMENT, str(exc)) from None
        except EmberError as exc:
            self._undo_create(c)
            raise _err(exc) from None
        except BaseException:
            self._undo_create(c)
            raise
        if c.pending is None:  # else the guest learns of it at Start
            self._wire(c, agent)
        return c

    def _wire(self, c: Container, agent) -> None:
        p = c.init
        p.pumps = StdioPumps(agent, c.id, "", p.stdin, p.stdout, p.stderr)
        p.pumps.start()

    def _boot(self, spec: dict, annotations: dict, errors: list[BaseException]) -> None:
        try:
            self.pod.boot(spec, annotations)
        except BaseException as exc:  # noqa: BLE001 - handed to the request thread
            errors.append(exc)

    def _undo_create(self, c: Container) -> None:
        """Leave nothing behind from a failed Create."""
        agent = self.pod.agent
        if agent is not None:
            with contextlib.suppress(EmberError):
                agent.remove_container(c.id)
            self.volumes.container_removed(c.id)
        if c.drive_id and self.pod.vm is not None:
            with contextlib.suppress(EmberError):
                self.pod.vm.detach_disk(c.drive_id)
        if c.work_dir is not None:
            shutil.rmtree(c.work_dir, ignore_errors=True)
        if c.owner:
            self._stop_pod()

    # ------------------------------------------------------------------ start
    def Start(self, req: pb.StartRequest, ctx) -> pb.StartResponse:
        c, p = self._proc(req.id, req.exec_id)
        with c.lock:
            if p.status != CREATED:
                raise TTRPCError(Code.FAILED_PRECONDITION,
                                 f"process {self._name(p)} was already started")
            agent = self._agent()
            failed = None
            try:
                if p.exec_id:
                    agent.exec_process(c.id, p.exec_id, p.spec, stdin=bool(p.stdin))
                    p.pumps = StdioPumps(agent, c.id, p.exec_id, p.stdin, p.stdout, p.stderr)
                    p.pumps.start()
                elif c.pending is not None:
                    with trace.span("container create+start"):
                        agent.create_container(c.id, *c.pending, stdin=bool(p.stdin),
                                               start=True)
                    c.pending = None
                    self._wire(c, agent)
                else:
                    with trace.span("container start"):
                        agent.start_container(c.id)
            except EmberError as exc:
                status = 127 if isinstance(exc, CommandNotFound) else 126
                if p.exec_id:
                    p.mark_exited(status)
                    p.exited.set()
                if p.exec_id or c.pending is None:
                    raise _err(exc) from None
                # crun never made the init: it has ended, as runc's does when its exec fails
                failed = (status, _err(exc))
            else:
                p.status = RUNNING
        if failed is not None:
            self._exited(c, p, failed[0])
            raise failed[1]
        threading.Thread(target=self._wait_exit, args=(c, p), daemon=True,
                         name=f"wait-{c.id[:8]}-{p.exec_id[:8]}").start()
        if p.exec_id:
            self.events.publish(ev.TaskExecStarted(container_id=c.id, exec_id=p.exec_id,
                                                   pid=p.pid))
        else:
            self._record(c)
            self.events.publish(ev.TaskStart(container_id=c.id, pid=p.pid))
        return pb.StartResponse(pid=p.pid)

    def _wait_exit(self, c: Container, p: Proc) -> None:
        """Block on the guest process; then drain its output and report the exit."""
        agent = self.pod.agent
        status, at_ns = 255, 0
        try:
            if agent is None:
                raise AgentError("the pod's VM is gone")
            r = agent.wait_process(c.id, p.exec_id, timeout=None)
            status, at_ns = r.exit_status, r.exited_at_ns
            if r.oom_killed:  # containerd's order: /tasks/oom before /tasks/exit
                self.events.publish(ev.TaskOOM(container_id=c.id))
        except EmberError as exc:
            log.warning("waiting for %s: %s", self._name(p), exc)
        if p.pumps is not None:
            p.pumps.drain(DRAIN_TIMEOUT)
        # Before /tasks/exit: the kubelet reads the termination message then, and a
        # caller of exec expects the container's writes to host folders to be there.
        self.volumes.process_exited(c.id, init=not p.exec_id)
        self._exited(c, p, status, at_ns)

    def _exited(self, c: Container, p: Proc, status: int, at_ns: int = 0) -> None:
        with c.lock:
            if p.exited.is_set():
                return
            p.mark_exited(status, at_ns)
        if not p.exec_id:
            self._record(c)
        self.events.publish(ev.TaskExit(container_id=c.id, id=p.exec_id or c.id, pid=p.pid,
                                        exit_status=p.exit_status,
                                        exited_at=timestamp(p.exited_at_ns)))
        p.exited.set()

    @staticmethod
    def _name(p: Proc) -> str:
        return f"{p.cid}/{p.exec_id}" if p.exec_id else p.cid

    # ----------------------------------------------------------------- delete
    def Delete(self, req: pb.DeleteRequest, ctx) -> pb.DeleteResponse:
        c, p = self._proc(req.id, req.exec_id)
        with c.lock:
            if p.status in (RUNNING, PAUSED):
                raise TTRPCError(Code.FAILED_PRECONDITION,
                                 f"process {self._name(p)} is still running; kill it first")
        if p.exec_id:
            with c.lock:
                c.execs.pop(p.exec_id, None)
            if p.pumps is not None:
                p.pumps.close()
        else:
            self._remove_container(c)
        resp = pb.DeleteResponse(pid=p.pid, exit_status=p.exit_status,
                                 exited_at=timestamp(p.exited_at_ns or time.time_ns()))
        self.events.publish(ev.TaskDelete(container_id=c.id, pid=p.pid, exit_status=p.exit_status,
                                          exited_at=resp.exited_at, id=p.exec_id))
        return resp

    def _remove_container(self, c: Container) -> None:
        for proc in [c.init, *c.execs.values()]:
            if proc.pumps is not None:
                proc.pumps.close()
        agent = self.pod.agent
        if agent is not None:
            try:
                agent.remove_container(c.id, timeout_ms=0)
            except EmberError as exc:
                log.warning("removing %s in the guest: %s", c.id, exc)
            self.volumes.container_removed(c.id)
            if c.drive_id and self.pod.vm is not None:
                try:
                    self.pod.vm.detach_disk(c.drive_id)
                except EmberError as exc:
                    log.warning("detaching %s's disk: %s", c.id, exc)
        if c.work_dir is not None:
            shutil.rmtree(c.work_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "containers" / f"{c.id}.json").unlink()
        with self._lock:
            self._containers.pop(c.id, None)
            others = list(self._containers.values())
        if c.owner:
            # Stopping the sandbox stops the pod: whatever still runs in the VM ends with it.
            # The guest powers off in the background (containerd's Delete need not wait);
            # teardown() joins it before the shim exits.
            self._vm_stopper = threading.Thread(target=self._stop_pod, name="vm-stop")
            self._vm_stopper.start()
            for other in others:
                for proc in [other.init, *other.execs.values()]:
                    if proc.status in (RUNNING, PAUSED, CREATED) and not proc.exited.is_set():
                        self._exited(other, proc, 255)

    def _stop_pod(self) -> None:
        self.pod.shutdown()
        self.volumes.close()

    # ------------------------------------------------------------------- exec
    def Exec(self, req: pb.ExecProcessRequest, ctx) -> empty_pb2.Empty:
        c = self._container(req.id)
        if not ID_RE.match(req.exec_id):
            raise TTRPCError(Code.INVALID_ARGUMENT, f"invalid exec id {req.exec_id!r}")
        try:
            proc_spec = json.loads(req.spec.value or b"null")
        except ValueError as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"exec {req.exec_id}: process spec is not JSON: {exc}") from None
        if not isinstance(proc_spec, dict) or not proc_spec.get("args"):
            raise TTRPCError(Code.INVALID_ARGUMENT, f"exec {req.exec_id}: process spec has no args")
        with c.lock:
            if req.exec_id in c.execs:
                raise TTRPCError(Code.ALREADY_EXISTS,
                                 f"exec {req.exec_id!r} already exists in container {c.id!r}")
            if c.init.status not in (RUNNING, PAUSED):
                raise TTRPCError(Code.FAILED_PRECONDITION, f"container {c.id} is not running")
            c.execs[req.exec_id] = Proc(c.id, req.exec_id, req.stdin, req.stdout, req.stderr,
                                        req.terminal, json.dumps(proc_spec).encode(), pid=self.pid)
        self.events.publish(ev.TaskExecAdded(container_id=c.id, exec_id=req.exec_id))
        return EMPTY

    # ---------------------------------------------------------- state & wait
    def State(self, req: pb.StateRequest, ctx) -> pb.StateResponse:
        c, p = self._proc(req.id, req.exec_id)
        status = p.status
        if status == RUNNING and not p.exec_id and c.vm_paused:
            status = PAUSED
        return pb.StateResponse(
            id=c.id, bundle=c.bundle, pid=p.pid, status=status, stdin=p.stdin, stdout=p.stdout,
            stderr=p.stderr, terminal=p.terminal, exit_status=p.exit_status,
            exited_at=timestamp(p.exited_at_ns) if p.exited_at_ns else None, exec_id=p.exec_id)

    def Wait(self, req: pb.WaitRequest, ctx) -> pb.WaitResponse:
        _, p = self._proc(req.id, req.exec_id)
        p.exited.wait()
        return pb.WaitResponse(exit_status=p.exit_status, exited_at=timestamp(p.exited_at_ns))

    def Connect(self, req: pb.ConnectRequest, ctx) -> pb.ConnectResponse:
        c = self._container(req.id)
        return pb.ConnectResponse(shim_pid=self.pid, task_pid=c.init.pid, version=__version__)

    # ------------------------------------------------------ signals and I/O
    def Kill(self, req: pb.KillRequest, ctx) -> empty_pb2.Empty:
        c, p = self._proc(req.id, req.exec_id)
        if p.status == STOPPED or p.exited.is_set():
            raise self._already_finished(p)
        if c.pending is not None and p is c.init:  # never run: it ends as runc's init would
            self._exited(c, p, 128 + (req.signal or 15))
            return EMPTY
        if c.vm_paused:
            self._resume_vm(c)  # a signal to a frozen VM would wait for the resume anyway
        try:
            self._agent().signal_process(c.id, p.exec_id, req.signal or 15,
                                         all=req.all and not p.exec_id)
        except NotFoundError:
            # The guest has no such running process: it is gone, whether or not
            # its exit has reached us yet.
            raise self._already_finished(p) from None
        except EmberError as exc:
            if self._vm_gone():
                # The VM died (QEMU killed, guest crashed): every process in it is gone.
                # Report the exit now, so containerd's stop does not fail on a dead agent.
                self._exited(c, p, 255)
                raise self._already_finished(p) from None
            raise _err(exc) from None
        return EMPTY

    def _vm_gone(self) -> bool:
        vm = self.pod.vm
        return vm is None or vm.vmm is None or vm.vmm.exited()

    def _already_finished(self, p: Proc) -> TTRPCError:
        """runc's shim answer for a signal to an exited process: containerd's "not found"."""
        return TTRPCError(Code.NOT_FOUND, f"process {self._name(p)} already finished: not found")

    def ResizePty(self, req: pb.ResizePtyRequest, ctx) -> empty_pb2.Empty:
        c, p = self._proc(req.id, req.exec_id)
        if not p.terminal:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"process {self._name(p)} has no terminal")
        if p.status != RUNNING:
            return EMPTY  # containerd resizes right after start; a finished process ignores it
        try:
            self._agent().tty_resize(c.id, p.exec_id, rows=req.height, cols=req.width)
        except EmberError as exc:
            raise _err(exc) from None
        return EMPTY

    def CloseIO(self, req: pb.CloseIORequest, ctx) -> empty_pb2.Empty:
        _, p = self._proc(req.id, req.exec_id)
        if req.stdin and p.pumps is not None:
            p.pumps.close_stdin()
        return EMPTY

    # ------------------------------------------------------ resources & stats
    def _ask_guest(self, cid: str, what: str):
        """Call agent.<what>(cid) for a container whose VM is running."""
        c = self._container(cid)
        if c.vm_paused:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"container {c.id} is paused (the VM is stopped)")
        try:
            return getattr(self._agent(), what)(c.id)
        except EmberError as exc:
            raise _err(exc) from None

    def Pids(self, req: pb.PidsRequest, ctx) -> pb.PidsResponse:
        pids = self._ask_guest(req.id, "list_pids")
        return pb.PidsResponse(processes=[pb.ProcessInfo(pid=pid) for pid in pids])

    def Stats(self, req: pb.StatsRequest, ctx) -> pb.StatsResponse:
        st = self._ask_guest(req.id, "stats_container")
        return pb.StatsResponse(stats=metrics.pack(metrics.to_metrics(st)))

    def Update(self, req: pb.UpdateTaskRequest, ctx) -> empty_pb2.Empty:
        c = self._container(req.id)
        try:
            resources = json.loads(req.resources.value or b"null")
        except ValueError as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"update: resources are not JSON: {exc}") from None
        if not isinstance(resources, dict):
            raise TTRPCError(Code.INVALID_ARGUMENT, "update: resources must be a JSON object")
        try:
            self._agent().update_container(c.id, resources)
        except EmberError as exc:
            raise _err(exc) from None
        return EMPTY

    # --------------------------------------------------------- pause / resume
    def _alone(self, c: Container) -> bool:
        with self._lock:
            return c.owner and len(self._containers) == 1

    def Pause(self, req: pb.PauseRequest, ctx) -> empty_pb2.Empty:
        c = self._container(req.id)
        if c.init.status != RUNNING:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"container {c.id} is not running")
        try:
            if self._alone(c) and self.pod.vm is not None and self.pod.vm.vmm is not None:
                if not c.vm_paused:
                    self.pod.vm.vmm.pause()
                    c.vm_paused = True
            else:
                self._agent().pause_container(c.id)
                c.init.status = PAUSED
        except EmberError as exc:
            raise _err(exc) from None
        self.events.publish(ev.TaskPaused(container_id=c.id))
        return EMPTY

    def _resume_vm(self, c: Container) -> None:
        if self.pod.vm is not None and self.pod.vm.vmm is not None:
            self.pod.vm.vmm.resume()
        c.vm_paused = False

    def Resume(self, req: pb.ResumeRequest, ctx) -> empty_pb2.Empty:
        c = self._container(req.id)
        try:
            if c.vm_paused:
                self._resume_vm(c)
            elif c.init.status == PAUSED:
                self._agent().resume_container(c.id)
                c.init.status = RUNNING
            else:
                raise TTRPCError(Code.FAILED_PRECONDITION, f"container {c.id} is not paused")
        except EmberError as exc:
            raise _err(exc) from None
        self.events.publish(ev.TaskResumed(container_id=c.id))
        return EMPTY

    def Checkpoint(self, req: pb.CheckpointTaskRequest, ctx) -> empty_pb2.Empty:
        raise TTRPCError(Code.UNIMPLEMENTED, "checkpointing a micro-VM container is not supported")

    # --------------------------------------------------------------- shutdown
    def Shutdown(self, req: pb.ShutdownRequest, ctx) -> empty_pb2.Empty:
        with self._lock:
            if self._containers and not req.now:
                return EMPTY  # other containers of the pod still live here
            self._shutting_down = True
        threading.Thread(target=self.teardown, name="shutdown", daemon=True).start()
        return EMPTY

    def teardown(self) -> None:
        """Stop everything and let the process exit (after the Shutdown answer went out)."""
        time.sleep(0.05)
        with self._lock:
            containers = list(self._containers.values())
        for c in containers:
            for p in [c.init, *c.execs.values()]:
                if p.pumps is not None:
                    p.pumps.close()
        if self._vm_stopper is not None:
            self._vm_stopper.join()
        self._stop_pod()
        self.events.flush(5.0)
        self.on_exit()
