"""A thread-safe ttrpc client: many concurrent calls over one connection.

Each call takes the next odd stream id and waits on its own slot; one reader
thread matches responses to slots by id, so a slow call (Wait) never holds up
a fast one. When the connection drops, every pending call fails at once with
ConnectionClosed.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time

from google.protobuf.message import DecodeError, Message

from ember.ttrpc import ttrpc_pb2
from ember.ttrpc.errors import Code, ConnectionClosed, FrameTooLarge, TTRPCError
from ember.ttrpc.framing import TYPE_REQUEST, TYPE_RESPONSE, Transport, read_frame, write_frame


class _Pending:
    __slots__ = ("event", "payload", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.payload: bytes | None = None
        self.error: BaseException | None = None


class Client:
    """ttrpc client over a socket, a raw fd or a Transport."""

    def __init__(self, transport: Transport | socket.socket | int) -> None:
        self._tr = Transport.of(transport)
        self._ids = itertools.count(1, 2)
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._closed: ConnectionClosed | None = None
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name="ttrpc-client-reader")
        self._reader.start()

    @classmethod
    def connect_unix(cls, path: str, timeout: float | None = 5.0) -> Client:
        """Connect to a Unix socket, retrying until it exists or timeout passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return cls(s)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if deadline is None or time.monotonic() >= deadline:
                    raise ConnectionClosed(f"cannot connect to ttrpc socket {path}: {e}") from e
                time.sleep(0.05)
            except OSError:
                s.close()
                raise

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def call(self, service: str, method: str, payload: bytes | Message = b"",
             response_type: type[Message] | None = None, timeout: float | None = None,
             metadata: dict[str, str | list[str]] | None = None):
        """Call service/method; returns bytes, or a response_type message.

        Raises TTRPCError for a non-OK status (DEADLINE_EXCEEDED when timeout
        passes first) and ConnectionClosed when the connection is lost.
        """
        if isinstance(payload, Message):
            payload = payload.SerializeToString()
        req = ttrpc_pb2.Request(service=service, method=method, payload=payload)
        if timeout is not None:
            req.timeout_nano = max(1, int(timeout * 1e9))
        for key, val in (metadata or {}).items():
            for v in [val] if isinstance(val, str) else val:
                req.metadata.add(key=key, value=v)
        slot = _Pending()
        with self._lock:
            if self._closed is not None:
                raise ConnectionClosed(str(self._closed))
            sid = next(self._ids)
            self._pending[sid] = slot
        try:
            try:
                write_frame(self._tr, sid, TYPE_REQUEST, req.SerializeToString())
            except FrameTooLarge:
                raise
            except OSError as e:
                self._fail_all(ConnectionClosed(f"ttrpc connection lost: {e}"))
                raise ConnectionClosed(f"ttrpc connection lost: {e}") from e
            if not slot.event.wait(timeout):
                raise TTRPCError(Code.DEADLINE_EXCEEDED,
                                 f"{service}/{method} timed out after {timeout:g}s")
        finally:
            with self._lock:
                self._pending.pop(sid, None)
        if slot.error is not None:
            raise slot.error
        return self._decode(service, method, slot.payload or b"", response_type)

    @staticmethod
    def _decode(service: str, method: str, data: bytes, response_type):
        resp = ttrpc_pb2.Response()
        try:
            resp.ParseFromString(data)
        except DecodeError as e:
            raise TTRPCError(Code.INTERNAL, f"{service}/{method}: bad ttrpc response: {e}") from e
        if resp.HasField("status") and resp.status.code != 0:
            raise TTRPCError(resp.status.code, resp.status.message)
        if response_type is None:
            return resp.payload
        msg = response_type()
        try:
            msg.ParseFromString(resp.payload)
        except DecodeError as e:
            raise TTRPCError(Code.INTERNAL, f"{service}/{method}: bad response message: {e}") from e
        return msg

    def close(self) -> None:
        self._fail_all(ConnectionClosed("ttrpc client closed"))
        self._tr.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fail_all(self, err: ConnectionClosed) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = err
            pending = list(self._pending.values())
        for slot in pending:
            if not slot.event.is_set():
                slot.error = ConnectionClosed(str(err))
                slot.event.set()

    def _read_loop(self) -> None:
        while True:
            try:
                frame = read_frame(self._tr)
            except FrameTooLarge as e:
                with self._lock:
                    slot = self._pending.get(e.stream_id)
                if slot is not None:
                    slot.error = TTRPCError(e.code, e.message)
                    slot.event.set()
                continue
            except ConnectionClosed as e:
                self._fail_all(e)
                return
            except OSError as e:
                self._fail_all(ConnectionClosed(f"ttrpc connection lost: {e}"))
                return
            if frame.type != TYPE_RESPONSE:
                continue
            with self._lock:
                slot = self._pending.get(frame.stream_id)
            if slot is not None:
                slot.payload = frame.payload
                slot.event.set()
