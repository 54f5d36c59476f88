"""The monitor's API, ``ember.sandbox.v1.Monitor`` (monitor.proto), both ends.

Like the agent's, the protocol is the .proto file: typed request and response
messages, the service name taken from the generated descriptor, served over
the monitor's ttrpc server with ``register_proto_service``. The server side
(:class:`MonitorService`) only translates between messages and the monitor's
Python methods, so :mod:`ember.sandbox.monitor` keeps the lifecycle and this
module the wire; the client (:class:`MonitorClient`) is what ``ember.api``
and the mounts use.

Errors keep one shape from end to end: the monitor refusing (an EmberError)
travels as FAILED_PRECONDITION with its one-line message, a request the
monitor cannot use as INVALID_ARGUMENT ("bad request: ..."); the client turns
any failure into ``EmberError("<Method>: <message>")`` and a connection lost
mid-call into ``EmberError("<Method>: lost the sandbox monitor: ...")``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import Message

from ember.errors import EmberError
from ember.sandbox import monitor_pb2 as pb
from ember.ttrpc import Client, Code, Context, Server, TTRPCError

if TYPE_CHECKING:
    from ember.sandbox.monitor import Monitor

SERVICE = pb.DESCRIPTOR.services_by_name["Monitor"]
SERVICE_NAME = SERVICE.full_name  # "ember.sandbox.v1.Monitor" on the wire
CALL_TIMEOUT_S = 120.0  # a hot-plug under TCG on a busy host can take a while
EMPTY = pb.Empty()

R = TypeVar("R", bound=Message)


def _served(fn: Callable[[MonitorService, R, Context], Message]) -> Callable:
    """A refusal of the monitor becomes a status with its message."""
    @functools.wraps(fn)
    def handle(self: MonitorService, req: R, ctx: Context) -> Message:
        try:
            return fn(self, req, ctx)
        except EmberError as exc:
            raise TTRPCError(Code.FAILED_PRECONDITION, exc.message) from None
        except (TypeError, ValueError) as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"bad request: {exc}") from None
    return handle


class MonitorService:
    """Serves every method of monitor.proto from a :class:`Monitor`."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def register(self, server: Server) -> None:
        server.register_proto_service(SERVICE, self)

    @_served
    def Status(self, req: pb.Empty, ctx: Context) -> pb.StatusResponse:
        vmm_pid, restored = self.monitor.status()
        return pb.StatusResponse(vmm_pid=vmm_pid, restored=restored)

    @_served
    def AttachDisk(self, req: pb.AttachDiskRequest, ctx: Context) -> pb.AttachDiskResponse:
        drive_id, kind, address = self.monitor.attach_disk(
            req.path, req.format or "raw", req.readonly, req.drive_id or None)
        return pb.AttachDiskResponse(drive_id=drive_id, kind=kind, address=address)

    @_served
    def DetachDisk(self, req: pb.DetachDiskRequest, ctx: Context) -> pb.Empty:
        self.monitor.detach_disk(req.drive_id)
        return EMPTY

    @_served
    def Watch(self, req: pb.WatchRequest, ctx: Context) -> pb.Empty:
        auto_stop = req.auto_stop if req.HasField("auto_stop") else True
        self.monitor.watch(req.container_id, auto_stop)
        return EMPTY

    @_served
    def Pause(self, req: pb.Empty, ctx: Context) -> pb.Empty:
        self.monitor.pause()
        return EMPTY

    @_served
    def Resume(self, req: pb.Empty, ctx: Context) -> pb.Empty:
        self.monitor.resume()
        return EMPTY

    @_served
    def Shutdown(self, req: pb.Empty, ctx: Context) -> pb.Empty:
        self.monitor.shutdown()
        return EMPTY

    @_served
    def Release(self, req: pb.Empty, ctx: Context) -> pb.Empty:
        self.monitor.release()
        return EMPTY

    @_served
    def Wait(self, req: pb.WaitRequest, ctx: Context) -> pb.WaitResponse:
        timeout = req.timeout_s if req.HasField("timeout_s") else None
        result = self.monitor.wait(timeout, ctx.call_after_response)
        if result is None:
            return pb.WaitResponse(exited=False)
        code = result.get("exit_code")
        return pb.WaitResponse(exited=True, status=str(result.get("status") or ""),
                               exit_code=code if isinstance(code, int) else None,
                               oom_killed=bool(result.get("oom_killed")),
                               error=str(result.get("error") or ""))


class MonitorClient:
    """Typed calls to one sandbox's monitor, over a connection to its ``api.sock``."""

    def __init__(self, rpc: Client) -> None:
        self.rpc = rpc

    def _call(self, method: str, req: Message, resp_type: type[R],
              timeout: float = CALL_TIMEOUT_S) -> R:
        try:
            return self.rpc.call(SERVICE_NAME, method, req, resp_type, timeout=timeout)
        except TTRPCError as exc:
            raise EmberError(f"{method}: {exc.message}") from None
        except OSError as exc:  # the monitor went away mid-call (ConnectionClosed)
            raise EmberError(f"{method}: lost the sandbox monitor: {exc}") from None

    def status(self) -> pb.StatusResponse:
        return self._call("Status", EMPTY, pb.StatusResponse)

    def attach_disk(self, path: str, format: str = "raw", readonly: bool = False,
                    drive_id: str = "") -> pb.AttachDiskResponse:
        req = pb.AttachDiskRequest(path=path, format=format, readonly=readonly,
                                   drive_id=drive_id)
        return self._call("AttachDisk", req, pb.AttachDiskResponse)

    def detach_disk(self, drive_id: str) -> None:
        self._call("DetachDisk", pb.DetachDiskRequest(drive_id=drive_id), pb.Empty)

    def watch(self, container_id: str, auto_stop: bool = True) -> None:
        self._call("Watch", pb.WatchRequest(container_id=container_id, auto_stop=auto_stop),
                   pb.Empty)

    def pause(self) -> None:
        self._call("Pause", EMPTY, pb.Empty)

    def resume(self) -> None:
        self._call("Resume", EMPTY, pb.Empty)

    def shutdown(self, timeout: float = CALL_TIMEOUT_S) -> None:
        self._call("Shutdown", EMPTY, pb.Empty, timeout)

    def release(self) -> None:
        self._call("Release", EMPTY, pb.Empty)

    def wait(self, timeout: float) -> pb.WaitResponse:
        """A long poll: the outcome once the sandbox has stopped, else ``exited``
        false after ``timeout`` seconds (at most the monitor's own limit)."""
        return self._call("Wait", pb.WaitRequest(timeout_s=timeout), pb.WaitResponse)
