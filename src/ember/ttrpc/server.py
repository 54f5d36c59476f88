"""A synchronous, thread-based ttrpc server (stdlib + protobuf only).

It runs inside the guest, where grpcio does not exist, and in the containerd
shim. Requests on one connection are served concurrently, one thread each,
because some calls (WaitProcess, containerd's Wait) block for as long as a
container runs; answers go back under a write lock, in whatever order they
finish.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from ember.ttrpc import ttrpc_pb2
from ember.ttrpc.errors import Code, ConnectionClosed, FrameTooLarge, TTRPCError
from ember.ttrpc.framing import (
    MAX_PAYLOAD,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    Transport,
    read_frame,
    write_frame,
)

log = logging.getLogger("ember.ttrpc.server")

Handler = Callable[[bytes, "Context"], bytes]


@dataclass
class Context:
    """What a handler may want to know about the call it serves."""

    service: str
    method: str
    stream_id: int
    metadata: dict[str, list[str]] = field(default_factory=dict)
    timeout_nano: int = 0
    received_at: float = field(default_factory=time.monotonic)
    transport: Transport | None = None
    after_response: list[Callable[[], None]] = field(default_factory=list)

    def call_after_response(self, fn: Callable[[], None]) -> None:
        """Run fn once the answer is on the wire (e.g. power off after replying)."""
        self.after_response.append(fn)

    @property
    def deadline(self) -> float | None:
        """time.monotonic() value by which the caller gives up, or None."""
        if self.timeout_nano <= 0:
            return None
        return self.received_at + self.timeout_nano / 1e9

    def time_left(self) -> float | None:
        d = self.deadline
        return None if d is None else max(0.0, d - time.monotonic())


def status_response(code: int, message: str) -> bytes:
    resp = ttrpc_pb2.Response()
    resp.status.code = int(code)
    resp.status.message = message
    return resp.SerializeToString()


class Server:
    """Dispatches ttrpc requests to registered handlers."""

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str], Handler] = {}
        self._lock = threading.Lock()
        self._transports: set[Transport] = set()
        self._listeners: list[socket.socket] = []
        self._stopped = threading.Event()

    # -- registration -------------------------------------------------------

    def register(self, service: str, method: str, handler: Handler) -> None:
        """handler(request_bytes, ctx) -> response_bytes."""
        self._handlers[(service, method)] = handler

    def register_proto_service(self, service: ServiceDescriptor, impl: object) -> None:
        """Serve every method of a .proto service on impl (request types from the descriptor)."""
        methods = {m.name: message_factory.GetMessageClass(m.input_type) for m in service.methods}
        self.register_service(service.full_name, impl, methods)

    def register_service(self, name: str, impl: object,
                         methods: dict[str, type[Message]]) -> None:
        """Serve impl.<Method>(request_message, ctx) -> message for each method.

        ``methods`` maps a method name to its request message type.
        """
        for method, req_type in methods.items():
            fn = getattr(impl, method)
            self.register(name, method, _message_handler(fn, req_type, name, method))

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    # -- serving ------------------------------------------------------------

    def serve_transport(self, transport: Transport | socket.socket | int) -> None:
        """Serve one connection until EOF (or shutdown), then close it."""
        tr = Transport.of(transport)
        with self._lock:
            if self._stopped.is_set():
                tr.close()
                return
            self._transports.add(tr)
        try:
            while True:
                try:
                    frame = read_frame(tr, MAX_PAYLOAD)
                except FrameTooLarge as e:
                    if e.frame_type == TYPE_REQUEST:
                        self._answer(tr, e.stream_id, status_response(e.code, e.message))
                    continue
                except ConnectionClosed as e:
                    if e.mid_frame:
                        log.warning("ttrpc: %s", e)
                    return
                except OSError as e:
                    if not tr.closed and not self._stopped.is_set():
                        log.warning("ttrpc: read failed: %s", e)
                    return
                if frame.type != TYPE_REQUEST:
                    log.debug("ttrpc: ignoring frame type %d on stream %d",
                              frame.type, frame.stream_id)
                    continue
                threading.Thread(target=self._serve_request, args=(tr, frame.stream_id,
                                 frame.payload), daemon=True,
                                 name=f"ttrpc-req-{frame.stream_id}").start()
        finally:
            with self._lock:
                self._transports.discard(tr)
            tr.close()  # late answers to this connection are dropped, never misdelivered

    def serve_listener(self, listener: socket.socket) -> None:
        """Accept loop on a listening socket (unix or vsock); a thread per peer."""
        with self._lock:
            if self._stopped.is_set():
                listener.close()
                return
            self._listeners.append(listener)
        while not self._stopped.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                if self._stopped.is_set():
                    return
                raise
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True,
                             name="ttrpc-conn").start()

    def serve_unix(self, path: str, ready: threading.Event | None = None) -> None:
        """Listen on a Unix socket at path and serve until shutdown()."""
        listener = bind_unix(path)
        if ready is not None:
            ready.set()
        try:
            self.serve_listener(listener)
        finally:
            listener.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def shutdown(self) -> None:
        """Stop accepting, drop every connection; serve_* calls return."""
        with self._lock:
            self._stopped.set()
            listeners, self._listeners = self._listeners, []
            transports = list(self._transports)
        for lst in listeners:
            try:
                lst.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            lst.close()
        for tr in transports:
            tr.close()

    # -- internals ----------------------------------------------------------

    def _serve_conn(self, conn: socket.socket) -> None:
        self.serve_transport(Transport(sock=conn))

    def _serve_request(self, tr: Transport, stream_id: int, payload: bytes) -> None:
        after: list[Callable[[], None]] = []
        self._answer(tr, stream_id, self.dispatch(payload, stream_id, tr, after))
        for fn in after:
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("ttrpc: after-response hook failed")

    def dispatch(self, payload: bytes, stream_id: int = 0, tr: Transport | None = None,
                 after: list[Callable[[], None]] | None = None) -> bytes:
        """Decode a Request, run its handler, return the encoded Response.

        Hooks the handler registers with ctx.call_after_response are appended
        to ``after`` for the caller to run once the response is sent.
        """
        req = ttrpc_pb2.Request()
        try:
            req.ParseFromString(payload)
        except DecodeError as e:
            return status_response(Code.INVALID_ARGUMENT, f"bad ttrpc request: {e}")
        handler = self._handlers.get((req.service, req.method))
        if handler is None:
            known = any(s == req.service for s, _ in self._handlers)
            what = (f"method {req.method} of service {req.service}" if known
                    else f"service {req.service}")
            return status_response(Code.UNIMPLEMENTED, f"{what} is not implemented")
        md: dict[str, list[str]] = {}
        for kv in req.metadata:
            md.setdefault(kv.key, []).append(kv.value)
        ctx = Context(req.service, req.method, stream_id, md, req.timeout_nano, transport=tr,
                      after_response=after if after is not None else [])
        log.debug("ttrpc: %s/%s (stream %d)", req.service, req.method, stream_id)
        try:
            out = handler(req.payload, ctx)
        except TTRPCError as e:
            return status_response(e.code, e.message)
        except Exception as e:  # noqa: BLE001 - every failure must reach the caller
            log.exception("ttrpc: %s/%s failed", req.service, req.method)
            return status_response(Code.UNKNOWN, str(e) or type(e).__name__)
        resp = ttrpc_pb2.Response(payload=out or b"")
        return resp.SerializeToString()

    def _answer(self, tr: Transport, stream_id: int, data: bytes) -> None:
        try:
            write_frame(tr, stream_id, TYPE_RESPONSE, data)
        except FrameTooLarge as e:
            write_frame(tr, stream_id, TYPE_RESPONSE, status_response(e.code, e.message))
        except (ConnectionClosed, OSError) as e:
            log.debug("ttrpc: cannot answer stream %d: %s", stream_id, e)


def _message_handler(fn: Callable, req_type: type[Message], service: str,
                     method: str) -> Handler:
    def handle(data: bytes, ctx: Context) -> bytes:
        req = req_type()
        try:
            req.ParseFromString(data)
        except DecodeError as e:
            raise TTRPCError(Code.INVALID_ARGUMENT,
                             f"{service}/{method}: bad request message: {e}") from e
        out = fn(req, ctx)
        return b"" if out is None else out.SerializeToString()

    return handle


def bind_unix(path: str) -> socket.socket:
    """A listening Unix socket at path (a stale socket file is replaced)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        s.listen(64)
    except OSError:
        s.close()
        raise
    return s
