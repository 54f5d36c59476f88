"""The ember.agent.v1.Agent service: containers in the guest, run with crun."""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.agent import (
    archive,
    cgroups,
    netconf,
    podholder,
    signals,
    spec,
    storage,
    system,
    volumes,
)
from ember.agent.crun import Crun
from ember.agent.portfwd import PortTable
from ember.agent.process import Process, launch
from ember.agent.proto import agent_pb2 as pb
from ember.agent.reaper import Reaper
from ember.agent.streams import PacedBuffer, drain
from ember.ttrpc import Code, Context, Server, TTRPCError
from ember.version import __version__

log = logging.getLogger("ember.agent")

MAX_WAIT_MS = 60_000
EMPTY = pb.Empty()


@dataclass
class Container:
    id: str
    bundle: str
    cgroup_path: str
    init: Process
    mounts: list[str] = field(default_factory=list)  # mount points, in mount order
    execs: dict[str, Process] = field(default_factory=dict)
    started: bool = False
    holder: bool = False  # the pod's namespace holder (ember.agent.podholder), not crun's
    lock: threading.Lock = field(default_factory=threading.Lock)


def _container_stats(c: Container) -> pb.StatsContainerResponse:
    st = cgroups.stats(c.cgroup_path)
    mem_stat = st.pop("memory_stat")
    return pb.StatsContainerResponse(memory_stat=mem_stat, **st)


class AgentService:
    """Implements every RPC of agent.proto; one instance per agent."""

    def __init__(self, base_dir: str, reaper: Reaper, crun_binary: str = "crun",
                 cgroup_manager: str = "", pid1: bool = False,
                 on_destroy: Callable[[], None] | None = None,
                 disk_timeout: float = storage.RESOLVE_TIMEOUT) -> None:
        self.base = os.path.abspath(base_dir)
        self.disk_timeout = disk_timeout
        self.reaper = reaper
        self.pid1 = pid1
        self.on_destroy = on_destroy
        self.ports = PortTable()  # port forwarding (kubectl port-forward)
        os.makedirs(os.path.join(self.base, "containers"), exist_ok=True)
        self.crun = Crun(reaper, os.path.join(self.base, "crun"), os.path.join(self.base, "logs"),
                         crun_binary, cgroup_manager)
        self._lock = threading.Lock()
        self._containers: dict[str, Container] = {}
        self._reserved: set[str] = set()
        self._crun_version: str | None = None
        self.volumes = volumes.Volumes(reaper.run_command, disk_timeout)

    def register(self, server: Server) -> None:
        server.register_proto_service(pb.DESCRIPTOR.services_by_name["Agent"], self)

    # -- lookup helpers -----------------------------------------------------

    def _container(self, cid: str) -> Container:
        with self._lock:
            c = self._containers.get(cid)
        if c is None:
            raise TTRPCError(Code.NOT_FOUND, f"container {cid!r} not found")
        return c

    def _runnable(self, cid: str) -> Container:
        """A container crun runs: the pod's namespace holder has no root to run in."""
        c = self._container(cid)
        if c.holder:
            raise TTRPCError(Code.FAILED_PRECONDITION,
                             f"container {cid!r} is the pod's sandbox: Ember holds its "
                             "namespaces without running its image, so nothing runs in it")
        return c

    def _process(self, cid: str, exec_id: str) -> Process:
        c = self._container(cid)
        if not exec_id:
            return c.init
        p = c.execs.get(exec_id)
        if p is None:
            raise TTRPCError(Code.NOT_FOUND, f"exec {exec_id!r} not found in container {cid!r}")
        return p

    # -- containers ---------------------------------------------------------

    def CreateContainer(self, req: pb.CreateContainerRequest, ctx: Context) -> pb.Empty:
        cid = req.container_id
        spec.check_id("container id", cid)
        with self._lock:
            if cid in self._containers or cid in self._reserved:
                raise TTRPCError(Code.ALREADY_EXISTS, f"container {cid!r} already exists")
            self._reserved.add(cid)
        bundle = os.path.join(self.base, "containers", cid)
        if req.hold_namespaces:
            return self._create_holder(req, cid, bundle)
        mounts: list[str] = []
        t0 = time.monotonic()
        try:
            # Fail fast on a bad spec, before anything is mounted.
            spec.prepare(req.oci_spec, cid, "/", False, ["/"] * len(req.extra_disks),
                         self._init_pid)
            if not req.HasField("rootfs") or not req.rootfs.kind:
                raise TTRPCError(Code.INVALID_ARGUMENT, "CreateContainer needs a rootfs disk")
            storage.remove_tree(bundle)
            os.makedirs(bundle)
            disks = [(req.rootfs, os.path.join(bundle, "rootfs"))]
            disks += [(d, os.path.join(bundle, "disks", str(i)))
                      for i, d in enumerate(req.extra_disks)]
            for dev, target in disks:
                storage.mount_disk(dev.kind, dev.address, target, dev.fstype, dev.readonly,
                                   list(dev.options), self.reaper.run_command, self.disk_timeout)
                mounts.append(target)
            t_disks = time.monotonic()
            config = spec.prepare(req.oci_spec, cid, mounts[0], req.rootfs.readonly,
                                  mounts[1:], self._init_pid)
            _write_json(os.path.join(bundle, "config.json"), config)
            proc = Process(cid, "", terminal=bool(config["process"].get("terminal")))
            op = ["run", "--detach"] if req.start else ["create"]
            launch(self.crun, proc, [*op, "--bundle", bundle, cid],
                   os.path.join(bundle, "init.pid"), bundle, req.stdin,
                   config["process"]["args"][0])
            c = Container(cid, bundle, config["linux"]["cgroupsPath"], proc, mounts,
                          started=req.start)
            with self._lock:
                self._containers[cid] = c
            log.info("%s container %s (pid %d) in %.0f ms, disks %.0f ms",
                     "created and started" if req.start else "created", cid, proc.pid,
                     (time.monotonic() - t0) * 1e3, (t_disks - t0) * 1e3)
        except BaseException:
            self._cleanup(cid, bundle, mounts)
            raise
        finally:
            with self._lock:
                self._reserved.discard(cid)
        return EMPTY

    def _create_holder(self, req: pb.CreateContainerRequest, cid: str, bundle: str) -> pb.Empty:
        """A pod's sandbox container: the agent holds the pod's namespaces itself."""
        t0 = time.monotonic()
        try:
            config = spec.prepare(req.oci_spec, cid, "/", False, [], self._init_pid)
            if req.HasField("rootfs") or req.extra_disks or req.stdin:
                raise TTRPCError(Code.INVALID_ARGUMENT,
                                 "the pod's namespace holder takes no disk and no stdin")
            storage.remove_tree(bundle)
            os.makedirs(bundle)
            proc = Process(cid, "")
            proc.pid = podholder.start(self.reaper, config, os.path.join(bundle, "root"),
                                       config["linux"]["cgroupsPath"])
            proc.exit = self.reaper.watch(proc.pid)
            proc.stdout.close()
            proc.stderr.close()
            c = Container(cid, bundle, config["linux"]["cgroupsPath"], proc, started=req.start,
                          holder=True)
            with self._lock:
                self._containers[cid] = c
            log.info("pod namespaces held for %s (pid %d) in %.0f ms", cid, proc.pid,
                     (time.monotonic() - t0) * 1e3)
        except BaseException:
            storage.remove_tree(bundle)
            raise
        finally:
            with self._lock:
                self._reserved.discard(cid)
        return EMPTY

    def _init_pid(self, cid: str) -> int | None:
        """The pid of a container's init while it runs: the pod's namespaces are its."""
        with self._lock:
            c = self._containers.get(cid)
        return c.init.pid if c is not None and c.init.running else None

    def StartContainer(self, req: pb.ContainerRequest, ctx: Context) -> pb.Empty:
        c = self._container(req.container_id)
        with c.lock:
            if c.started:
                raise TTRPCError(Code.FAILED_PRECONDITION,
                                 f"container {c.id!r} was already started")
            if c.holder:  # it holds the namespaces from its creation on
                c.started = True
                return EMPTY
            argv0 = _argv0(os.path.join(c.bundle, "config.json"))
            t0 = time.monotonic()
            self.crun.run(["start", c.id], argv0=argv0)
            c.started = True
            log.info("started container %s in %.0f ms", c.id, (time.monotonic() - t0) * 1e3)
        return EMPTY

    def ExecProcess(self, req: pb.ExecProcessRequest, ctx: Context) -> pb.Empty:
        c = self._runnable(req.container_id)
        spec.check_id("exec id", req.exec_id)
        proc_spec = spec.check_process(spec.parse_json(req.process, "process"), "process")
        proc = _add_exec(c, Process(c.id, req.exec_id, terminal=bool(proc_spec.get("terminal"))))
        work = os.path.join(c.bundle, "execs")
        os.makedirs(work, exist_ok=True)
        pfile = os.path.join(work, f"{req.exec_id}.json")
        _write_json(pfile, proc_spec)
        try:
            launch(self.crun, proc, ["exec", "--detach", "--process", pfile, c.id],
                   os.path.join(work, f"{req.exec_id}.pid"), work, req.stdin, proc_spec["args"][0])
        except BaseException:
            with c.lock:
                c.execs.pop(req.exec_id, None)
            raise
        return EMPTY

    def Archive(self, req: pb.ArchiveRequest, ctx: Context) -> pb.Empty:
        """A tar stream into or out of the container's root, as process exec_id
        (see ember.agent.archive): the host writes a tar to its stdin (put*),
        or reads one (get) or a JSON listing (list) from its stdout; errors are
        one line on stderr, the outcome its exit status."""
        c = self._runnable(req.container_id)
        spec.check_id("exec id", req.exec_id)
        try:
            path = archive.check_request(req.op, req.path)
        except archive.ArchiveError as e:
            raise TTRPCError(Code.INVALID_ARGUMENT, str(e)) from e
        fds: list[int] = []
        proc = _add_exec(c, Process(c.id, req.exec_id, helper=True, stdout=PacedBuffer()))
        init_pid = c.init.pid
        try:
            in_r, in_w = os.pipe()
            fds += [in_r, in_w]
            out_r, out_w = os.pipe()
            fds += [out_r, out_w]
            err_r, err_w = os.pipe()
            fds += [err_r, err_w]
            proc.exit = self.reaper.fork(
                lambda: archive.run_in_container(init_pid, req.op, path), in_r, out_w, err_w)
        except BaseException:
            for fd in fds:
                os.close(fd)
            with c.lock:
                c.execs.pop(req.exec_id, None)
            raise
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        proc.pid = proc.exit.pid
        proc.stdin_fd = in_w
        os.set_blocking(in_w, False)
        drain(out_r, proc.stdout, f"{proc.name}-stdout")
        drain(err_r, proc.stderr, f"{proc.name}-stderr")
        return EMPTY

    def WaitProcess(self, req: pb.ProcessRequest, ctx: Context) -> pb.WaitProcessResponse:
        p = self._process(req.container_id, req.exec_id)
        if p.exit is None:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"process {p.name} was never started")
        p.exit.wait()
        oom = False
        if not req.exec_id:  # the init's exit: did the OOM killer take part?
            c = self._container(req.container_id)
            oom = cgroups.oom_kills(c.cgroup_path) > 0
        return pb.WaitProcessResponse(exit_status=p.exit.exit_code,
                                      exited_at_ns=p.exit.exited_at_ns, signal=p.exit.signal,
                                      oom_killed=oom)

    def SignalProcess(self, req: pb.SignalProcessRequest, ctx: Context) -> pb.Empty:
        c = self._container(req.container_id)
        if req.all and not c.holder:  # the holder is alone in its PID namespace's root
            self.crun.run(["kill", "--all", c.id, str(req.signal)])
            return EMPTY
        p = self._process(req.container_id, req.exec_id)
        if not p.running:
            raise TTRPCError(Code.NOT_FOUND, f"process {p.name} is not running")
        if signals.would_be_lost(p.pid, req.signal):
            # A namespace init still starting: hold the signal until it can take it.
            signals.send_when_caught(p.pid, req.signal, lambda: p.running, p.name)
            return EMPTY
        try:
            os.kill(p.pid, req.signal)
        except ProcessLookupError as e:
            raise TTRPCError(Code.NOT_FOUND, f"process {p.name} is not running") from e
        except (OSError, ValueError) as e:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"cannot send signal {req.signal}: {e}") from e
        return EMPTY

    def WriteStdin(self, req: pb.WriteStdinRequest, ctx: Context) -> pb.WriteStdinResponse:
        p = self._process(req.container_id, req.exec_id)
        return pb.WriteStdinResponse(len=p.write_stdin(req.data))

    def CloseStdin(self, req: pb.ProcessRequest, ctx: Context) -> pb.Empty:
        self._process(req.container_id, req.exec_id).close_stdin()
        return EMPTY

    def _read(self, req: pb.ReadStreamRequest, which: str) -> pb.ReadStreamResponse:
        p = self._process(req.container_id, req.exec_id)
        wait_s = min(req.wait_ms, MAX_WAIT_MS) / 1000
        data, offset, eof = getattr(p, which).read(req.offset, req.max_bytes, wait_s)
        return pb.ReadStreamResponse(data=data, offset=offset, eof=eof)

    def ReadStdout(self, req: pb.ReadStreamRequest, ctx: Context) -> pb.ReadStreamResponse:
        return self._read(req, "stdout")

    def ReadStderr(self, req: pb.ReadStreamRequest, ctx: Context) -> pb.ReadStreamResponse:
        return self._read(req, "stderr")

    def TtyWinResize(self, req: pb.TtyWinResizeRequest, ctx: Context) -> pb.Empty:
        self._process(req.container_id, req.exec_id).resize(req.rows, req.cols)
        return EMPTY

    def RemoveContainer(self, req: pb.RemoveContainerRequest, ctx: Context) -> pb.Empty:
        with self._lock:
            c = self._containers.get(req.container_id)
        if c is None:
            return EMPTY  # idempotent: already gone
        with c.lock:
            if c.init.running and req.timeout_ms:
                try:
                    os.kill(c.init.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                c.init.exit.wait(req.timeout_ms / 1000)  # type: ignore[union-attr]
            self._cleanup(c.id, c.bundle, c.mounts, c)
            with self._lock:
                self._containers.pop(c.id, None)
        log.info("removed container %s", c.id)
        return EMPTY

    def _cleanup(self, cid: str, bundle: str, mounts: list[str], c: Container | None = None
                 ) -> None:
        """Kill, delete, unmount, remove: leaves nothing behind, errors or not."""
        if c is not None and c.holder:
            if c.init.running:
                try:
                    os.kill(c.init.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if c.init.exit is not None and not c.init.exit.wait(10):
                log.warning("the namespace holder of %s did not exit", cid)
            cgroups.remove(c.cgroup_path)
            storage.remove_tree(bundle)
            return
        try:
            self.crun.run(["delete", "--force", cid], timeout=30)
        except TTRPCError as e:
            if c is not None and "not found" not in e.message.lower() \
                    and "No such file" not in e.message:
                log.warning("%s", e)
        if c is not None:
            for p in c.execs.values():
                if p.helper and p.running:  # an archive whose reader or writer went away
                    p.stdout.close()
                    try:
                        os.kill(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for p in [c.init, *c.execs.values()]:
                if p.exit is not None and not p.exit.wait(10):
                    log.warning("process %s did not exit after crun delete", p.name)
                p.release()
        for target in reversed(mounts):
            try:
                storage.umount(target)
            except OSError as e:
                log.warning("%s", e)
        storage.remove_tree(bundle)

    def StatsContainer(self, req: pb.ContainerRequest, ctx: Context) -> pb.StatsContainerResponse:
        return _container_stats(self._container(req.container_id))

    def PauseContainer(self, req: pb.ContainerRequest, ctx: Context) -> pb.Empty:
        self.crun.run(["pause", self._runnable(req.container_id).id])
        return EMPTY

    def ResumeContainer(self, req: pb.ContainerRequest, ctx: Context) -> pb.Empty:
        self.crun.run(["resume", self._runnable(req.container_id).id])
        return EMPTY

    def UpdateContainer(self, req: pb.UpdateContainerRequest, ctx: Context) -> pb.Empty:
        c = self._container(req.container_id)
        resources = spec.parse_json(req.resources, "resources")
        if c.holder:  # it runs nothing a limit could bound (runc's pause: a few KiB)
            return EMPTY
        path = os.path.join(c.bundle, f"resources-{threading.get_ident()}.json")
        _write_json(path, resources)
        try:
            self.crun.run(["update", f"--resources={path}", c.id])
        finally:
            os.unlink(path)
        return EMPTY

    def ListPids(self, req: pb.ContainerRequest, ctx: Context) -> pb.PidsResponse:
        c = self._container(req.container_id)
        pids = cgroups.pids(c.cgroup_path)
        if not pids and c.init.running:
            pids = _pid_namespace_members(c.init.pid)
        return pb.PidsResponse(pids=pids or [])

    def ListProcesses(self, req: pb.Empty, ctx: Context) -> pb.ListProcessesResponse:
        out = pb.ListProcessesResponse()
        with self._lock:
            containers = list(self._containers.values())
        for c in containers:
            for p in [c.init, *c.execs.values()]:
                done = p.exit is not None and p.exit.done
                out.processes.add(container_id=c.id, exec_id=p.exec_id, pid=p.pid,
                                  running=p.running,
                                  exit_status=p.exit.exit_code if done else 0)  # type: ignore[union-attr]
        return out

    # -- guest ----------------------------------------------------------------

    def CopyFile(self, req: pb.CopyFileRequest, ctx: Context) -> pb.Empty:
        system.copy_file(req.path, req.data, req.mode, req.uid, req.gid, req.append,
                         req.make_dirs)
        return EMPTY

    def GetGuestDetails(self, req: pb.Empty, ctx: Context) -> pb.GuestDetailsResponse:
        if self._crun_version is None:
            self._crun_version = self.crun.version()
        return pb.GuestDetailsResponse(
            kernel_release=platform.release(), agent_version=__version__,
            mem_total_bytes=system.mem_total_bytes(), cpus=os.cpu_count() or 1,
            crun_version=self._crun_version, uptime_s=system.uptime_s())

    def GuestStats(self, req: pb.Empty, ctx: Context) -> pb.GuestStatsResponse:
        """Guest memory, load, CPU and every container's cgroup numbers (for `ember metrics`)."""
        mem = system.meminfo()
        load = system.loadavg()
        user, sys_ns, idle = system.cpu_times_ns()
        out = pb.GuestStatsResponse(
            mem_total_bytes=mem.get("MemTotal", 0), mem_available_bytes=mem.get("MemAvailable", 0),
            mem_free_bytes=mem.get("MemFree", 0), load1=load[0], load5=load[1], load15=load[2],
            cpu_user_ns=user, cpu_system_ns=sys_ns, cpu_idle_ns=idle, cpus=os.cpu_count() or 1,
            uptime_s=system.uptime_s(), oom_kills=system.oom_kills())
        with self._lock:
            containers = list(self._containers.values())
        for c in containers:
            out.containers[c.id].CopyFrom(_container_stats(c))
        return out

    def SyncGuest(self, req: pb.SyncGuestRequest, ctx: Context) -> pb.Empty:
        if req.time_ns:
            system.set_clock(req.time_ns)
        if req.entropy:
            system.add_entropy(req.entropy)
        return EMPTY

    def UpdateInterface(self, req: pb.UpdateInterfaceRequest, ctx: Context) -> pb.Empty:
        netconf.configure(self.reaper.run_command, req.name, req.mac, req.mtu, list(req.addresses),
                          [(r.dest, r.gateway) for r in req.routes])
        return EMPTY

    # -- pod volumes (ember.agent.volumes) --------------------------------------

    def SyncTree(self, req: pb.SyncTreeRequest, ctx: Context) -> pb.Empty:
        self.volumes.sync_tree(req)
        return EMPTY

    def ReadFile(self, req: pb.ReadFileRequest, ctx: Context) -> pb.ReadFileResponse:
        return self.volumes.read_file(req)

    def ListTree(self, req: pb.ListTreeRequest, ctx: Context) -> pb.ListTreeResponse:
        return self.volumes.list_tree(req)

    def MountVolume(self, req: pb.MountVolumeRequest, ctx: Context) -> pb.Empty:
        self.volumes.mount_volume(req)
        return EMPTY

    def UnmountVolume(self, req: pb.UnmountVolumeRequest, ctx: Context) -> pb.Empty:
        self.volumes.unmount_volume(req)
        return EMPTY

    # -- port forwarding (ember.agent.portfwd) -----------------------------------

    def ListPorts(self, req: pb.Empty, ctx: Context) -> pb.ListPortsResponse:
        return pb.ListPortsResponse(ports=self.ports.list_ports())

    def PortConnect(self, req: pb.PortConnectRequest, ctx: Context) -> pb.PortConnectResponse:
        return pb.PortConnectResponse(conn_id=self.ports.connect(req.port))

    def PortWrite(self, req: pb.PortWriteRequest, ctx: Context) -> pb.Empty:
        self.ports.write(req.conn_id, req.data, req.close_write)
        return EMPTY

    def PortRead(self, req: pb.PortReadRequest, ctx: Context) -> pb.PortReadResponse:
        data, eof = self.ports.read(req.conn_id, req.max_bytes, req.wait_ms)
        return pb.PortReadResponse(data=data, eof=eof)

    def PortClose(self, req: pb.PortCloseRequest, ctx: Context) -> pb.Empty:
        self.ports.close(req.conn_id)
        return EMPTY

    def DestroySandbox(self, req: pb.Empty, ctx: Context) -> pb.Empty:
        with self._lock:
            ids = list(self._containers)
        for cid in ids:
            try:
                self.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), ctx)
            except Exception:  # noqa: BLE001 - power off regardless
                log.exception("removing %s", cid)
        self.volumes.unmount_all()
        os.sync()
        # Answer first, then go: the host is waiting for this response.
        then = system.power_off if self.pid1 else self.on_destroy
        if then is not None:
            ctx.call_after_response(then)
        log.info("sandbox destroyed")
        return EMPTY


def _add_exec(c: Container, proc: Process) -> Process:
    """Register a new process of a running container under its exec id."""
    with c.lock:
        if proc.exec_id in c.execs:
            raise TTRPCError(Code.ALREADY_EXISTS,
                             f"exec {proc.exec_id!r} already exists in container {c.id!r}")
        if not c.init.running:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"container {c.id!r} is not running")
        c.execs[proc.exec_id] = proc
    return proc


def _write_json(path: str, obj: object) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.rename(tmp, path)


def _argv0(config_path: str) -> str:
    try:
        with open(config_path) as f:
            return json.load(f)["process"]["args"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return ""


def _pid_namespace_members(init_pid: int) -> list[int]:
    """Pids sharing init's pid namespace (when the cgroup cannot be read)."""
    try:
        ns = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return []
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == ns:
                    out.append(int(name))
            except OSError:
                continue
    return sorted(out)
