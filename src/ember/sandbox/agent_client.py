"""Host-side typed client for the guest agent (over ember.ttrpc).

Statuses become ember.errors: a command that cannot be found is
CommandNotFound (exit 127), one that cannot be run CommandNotRunnable (126),
an unknown container NotFoundError, anything else AgentError.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

from ember.agent.proto import AGENT_SERVICE as SERVICE
from ember.agent.proto import agent_pb2 as pb
from ember.errors import AgentError, CommandNotFound, CommandNotRunnable, NotFoundError
from ember.sandbox.output import OutputReader, read_method
from ember.ttrpc import Client, Code, ConnectionClosed, Transport, TTRPCError


def translate(err: TTRPCError) -> Exception:
    """The ember error for an agent status."""
    msg = err.message
    low = msg.lower()
    # Only the agent's exec errors ('exec: "cmd": ...') mean the command is
    # missing; other NotFound statuses name containers, execs or disks.
    if err.code == Code.NOT_FOUND and ("executable file not found" in low or (
            low.startswith("exec:") and "no such file" in low)):
        return CommandNotFound(msg)
    if err.code == Code.PERMISSION_DENIED and msg.startswith("exec:"):
        return CommandNotRunnable(msg)
    if err.code == Code.NOT_FOUND:
        return NotFoundError(msg)
    e = AgentError(msg)
    e.code = err.code  # type: ignore[attr-defined]
    return e


def _blockdev(dev: Any) -> pb.BlockDevice | None:
    """A device (see _device), or None for an optional one left unset."""
    return None if dev is None else _device(dev)


def _device(dev: Any) -> pb.BlockDevice:
    """Accept a BlockDevice, a dict of its fields, or an object with the same attributes."""
    if isinstance(dev, pb.BlockDevice):
        return dev
    if isinstance(dev, dict):
        return pb.BlockDevice(**dev)
    return pb.BlockDevice(kind=dev.kind, address=dev.address,
                          fstype=getattr(dev, "fstype", "") or "",
                          readonly=bool(getattr(dev, "readonly", False)),
                          options=list(getattr(dev, "options", []) or []))


def _json(obj: Any) -> bytes:
    return obj if isinstance(obj, bytes) else json.dumps(obj).encode()


READY_FIRST_TRY_S = 0.25  # wait_ready: the first try's deadline, doubled on each retry
READY_MAX_TRY_S = 5.0


class AgentClient:
    """One method per Agent RPC; thread-safe (calls may run concurrently)."""

    def __init__(self, conn: Client | Transport | socket.socket | int,
                 timeout: float | None = 60.0) -> None:
        self.ttrpc = conn if isinstance(conn, Client) else Client(conn)
        self.timeout = timeout

    @classmethod
    def connect_unix(cls, path: str, timeout: float = 5.0) -> AgentClient:
        try:
            return cls(Client.connect_unix(path, timeout))
        except ConnectionError as e:
            raise AgentError(f"cannot reach the guest agent at {path}: {e}") from e

    def close(self) -> None:
        self.ttrpc.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, req, resp_type, timeout: float | None | str = "default"):
        t = self.timeout if timeout == "default" else timeout
        try:
            return self.ttrpc.call(SERVICE, method, req, resp_type, timeout=t)  # type: ignore[arg-type]
        except TTRPCError as e:
            raise translate(e) from None
        except ConnectionClosed as e:
            raise AgentError(f"lost the connection to the guest agent: {e}") from None

    # -- containers -----------------------------------------------------------

    def create_container(self, container_id: str, spec: dict | bytes, rootfs: Any,
                         stdin: bool = False, extra_disks: list | None = None,
                         start: bool = False, hold_namespaces: bool = False) -> None:
        """Create a container; with ``start``, start it in the same call. With
        ``hold_namespaces`` (a pod's sandbox, no rootfs) the agent holds the
        pod's namespaces itself instead of running the spec's image."""
        self._call("CreateContainer", pb.CreateContainerRequest(
            container_id=container_id, oci_spec=_json(spec), rootfs=_blockdev(rootfs),
            stdin=stdin, extra_disks=[_device(d) for d in extra_disks or []], start=start,
            hold_namespaces=hold_namespaces), pb.Empty)

    def start_container(self, container_id: str) -> None:
        self._call("StartContainer", pb.ContainerRequest(container_id=container_id), pb.Empty)

    def exec_process(self, container_id: str, exec_id: str, process: dict | bytes,
                     stdin: bool = False) -> None:
        self._call("ExecProcess", pb.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, process=_json(process), stdin=stdin),
            pb.Empty)

    def wait_process(self, container_id: str, exec_id: str = "",
                     timeout: float | None = None) -> pb.WaitProcessResponse:
        """Blocks until the process exits (no timeout by default)."""
        return self._call("WaitProcess", pb.ProcessRequest(
            container_id=container_id, exec_id=exec_id), pb.WaitProcessResponse, timeout)

    def signal_process(self, container_id: str, exec_id: str = "", signal: int = 15,
                       all: bool = False) -> None:
        self._call("SignalProcess", pb.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal, all=all), pb.Empty)

    def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        return self._call("WriteStdin", pb.WriteStdinRequest(
            container_id=container_id, exec_id=exec_id, data=data), pb.WriteStdinResponse).len

    def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        self._call("CloseStdin", pb.ProcessRequest(
            container_id=container_id, exec_id=exec_id), pb.Empty)

    def _read(self, method: str, container_id: str, exec_id: str, offset: int, wait_ms: int,
              max_bytes: int) -> pb.ReadStreamResponse:
        t = None if self.timeout is None else self.timeout + wait_ms / 1000
        return self._call(method, pb.ReadStreamRequest(
            container_id=container_id, exec_id=exec_id, offset=offset, max_bytes=max_bytes,
            wait_ms=wait_ms), pb.ReadStreamResponse, t)

    def read_stdout(self, container_id: str, exec_id: str = "", offset: int = 0,
                    wait_ms: int = 0, max_bytes: int = 0) -> pb.ReadStreamResponse:
        return self._read("ReadStdout", container_id, exec_id, offset, wait_ms, max_bytes)

    def read_stderr(self, container_id: str, exec_id: str = "", offset: int = 0,
                    wait_ms: int = 0, max_bytes: int = 0) -> pb.ReadStreamResponse:
        return self._read("ReadStderr", container_id, exec_id, offset, wait_ms, max_bytes)

    def iter_output(self, container_id: str, exec_id: str = "", stream: str = "stdout",
                    offset: int = 0, wait_ms: int = 1000, *, max_bytes: int = 0,
                    stop: Callable[[], bool] | None = None,
                    retry: Callable[[Exception], bool] | None = None) -> OutputReader:
        """A stream's chunks from offset until it ends (see ember.sandbox.output for
        which errors end it quietly and which are raised)."""
        method = read_method(stream)
        return OutputReader(
            lambda off, wait: self._read(method, container_id, exec_id, off, wait, max_bytes),
            wait_ms=wait_ms, offset=offset, closed=lambda: self.ttrpc.closed,
            stop=stop, retry=retry)

    def tty_resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        self._call("TtyWinResize", pb.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, rows=rows, cols=cols), pb.Empty)

    def remove_container(self, container_id: str, timeout_ms: int = 0) -> None:
        self._call("RemoveContainer", pb.RemoveContainerRequest(
            container_id=container_id, timeout_ms=timeout_ms), pb.Empty)

    def stats_container(self, container_id: str) -> pb.StatsContainerResponse:
        return self._call("StatsContainer", pb.ContainerRequest(container_id=container_id),
                          pb.StatsContainerResponse)

    def pause_container(self, container_id: str) -> None:
        self._call("PauseContainer", pb.ContainerRequest(container_id=container_id), pb.Empty)

    def resume_container(self, container_id: str) -> None:
        self._call("ResumeContainer", pb.ContainerRequest(container_id=container_id), pb.Empty)

    def update_container(self, container_id: str, resources: dict | bytes) -> None:
        self._call("UpdateContainer", pb.UpdateContainerRequest(
            container_id=container_id, resources=_json(resources)), pb.Empty)

    def list_pids(self, container_id: str) -> list[int]:
        return list(self._call("ListPids", pb.ContainerRequest(container_id=container_id),
                               pb.PidsResponse).pids)

    def list_processes(self) -> list[pb.ProcessInfo]:
        return list(self._call("ListProcesses", pb.Empty(), pb.ListProcessesResponse).processes)

    # -- guest ------------------------------------------------------------------

    def copy_file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0,
                  append: bool = False, make_dirs: bool = False) -> None:
        self._call("CopyFile", pb.CopyFileRequest(path=path, data=data, mode=mode, uid=uid,
                                                  gid=gid, append=append, make_dirs=make_dirs),
                   pb.Empty)

    def guest_details(self, timeout: float | None | str = "default") -> pb.GuestDetailsResponse:
        return self._call("GetGuestDetails", pb.Empty(), pb.GuestDetailsResponse, timeout)

    def guest_stats(self, timeout: float | None | str = "default") -> pb.GuestStatsResponse:
        return self._call("GuestStats", pb.Empty(), pb.GuestStatsResponse, timeout)

    def sync_guest(self, time_ns: int | None = None, entropy: bytes = b"") -> None:
        """Set the guest clock (default: the host's now) and feed its RNG."""
        self._call("SyncGuest", pb.SyncGuestRequest(
            time_ns=time.time_ns() if time_ns is None else time_ns, entropy=entropy), pb.Empty)

    def update_interface(self, name: str, mac: str, mtu: int, addresses: list[str],
                         routes: list[tuple[str, str]]) -> None:
        """Give the guest NIC the pod's eth0 identity (routes are (dest CIDR, gateway))."""
        self._call("UpdateInterface", pb.UpdateInterfaceRequest(
            name=name, mac=mac, mtu=mtu, addresses=addresses,
            routes=[pb.Route(dest=d, gateway=g) for d, g in routes]), pb.Empty)

    # -- pod volumes ------------------------------------------------------------

    def sync_tree(self, root: str, entries: list[pb.TreeEntry], remove: list[str] | None = None,
                  tmpfs: bool = False, tmpfs_size: int = 0) -> None:
        """Make guest directory root mirror a host tree (see SyncTreeRequest)."""
        self._call("SyncTree", pb.SyncTreeRequest(root=root, entries=entries,
                                                  remove=remove or [], tmpfs=tmpfs,
                                                  tmpfs_size=tmpfs_size), pb.Empty)

    def read_file(self, path: str, max_bytes: int = 0, offset: int = 0) -> bytes | None:
        """A guest file's content (at most max_bytes from offset), or None if it is absent."""
        r = self._call("ReadFile", pb.ReadFileRequest(path=path, max_bytes=max_bytes,
                                                      offset=offset), pb.ReadFileResponse)
        return r.data if r.exists else None

    def list_tree(self, root: str) -> list[pb.TreeEntry]:
        """A guest tree's entries (sizes and times, no data)."""
        return list(self._call("ListTree", pb.ListTreeRequest(root=root),
                               pb.ListTreeResponse).entries)

    def mount_volume(self, target: str, device: Any = None, tmpfs_size: int = 0) -> None:
        self._call("MountVolume", pb.MountVolumeRequest(
            target=target, device=_blockdev(device), tmpfs_size=tmpfs_size), pb.Empty)

    def unmount_volume(self, target: str) -> None:
        self._call("UnmountVolume", pb.UnmountVolumeRequest(target=target), pb.Empty)

    # -- port forwarding -------------------------------------------------------------

    def list_ports(self) -> list[int]:
        return list(self._call("ListPorts", pb.Empty(), pb.ListPortsResponse).ports)

    def port_connect(self, port: int) -> str:
        return self._call("PortConnect", pb.PortConnectRequest(port=port),
                          pb.PortConnectResponse).conn_id

    def port_write(self, conn_id: str, data: bytes, close_write: bool = False) -> None:
        self._call("PortWrite", pb.PortWriteRequest(conn_id=conn_id, data=data,
                                                    close_write=close_write), pb.Empty)

    def port_read(self, conn_id: str, wait_ms: int = 1000, max_bytes: int = 0
                  ) -> pb.PortReadResponse:
        t = None if self.timeout is None else self.timeout + wait_ms / 1000
        return self._call("PortRead", pb.PortReadRequest(conn_id=conn_id, max_bytes=max_bytes,
                                                         wait_ms=wait_ms), pb.PortReadResponse, t)

    def port_close(self, conn_id: str) -> None:
        self._call("PortClose", pb.PortCloseRequest(conn_id=conn_id), pb.Empty)

    def archive(self, container_id: str, exec_id: str, op: str, path: str) -> None:
        """Start a tar helper in the container's root (see ember.agent.archive)."""
        self._call("Archive", pb.ArchiveRequest(container_id=container_id, exec_id=exec_id,
                                                op=op, path=path), pb.Empty)

    def destroy_sandbox(self) -> None:
        self._call("DestroySandbox", pb.Empty(), pb.Empty)

    def wait_ready(self, timeout: float = 30.0) -> pb.GuestDetailsResponse:
        """Retry GetGuestDetails until the agent answers (the guest may be booting).

        Each try waits longer than the last (0.25 s, doubling up to 5 s), so a
        request that is never answered costs a short try, not one long
        deadline: an agent that reopened its virtio-serial port right after a
        restore dropped the first request (the agent now keeps the port open,
        ember.agent.channel) and that cost such starts 2 s. GetGuestDetails is
        harmless to repeat; a late answer is dropped.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        attempt = READY_FIRST_TRY_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"the guest agent did not answer within {timeout:g}s"
                                 + (f": {last}" if last else ""))
            try:
                return self.guest_details(timeout=min(left, attempt))
            except AgentError as e:
                last = e
                if self.ttrpc.closed:
                    raise
                attempt = min(attempt * 2, READY_MAX_TRY_S)
                time.sleep(0.05)
