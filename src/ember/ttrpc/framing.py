"""ttrpc framing: the 10-byte header and a transport over sockets or raw fds.

Frames are public on purpose: the host-side sandbox monitor forwards raw
frames between CLI clients and the guest agent without decoding them.

Header: uint32 BE payload length, uint32 BE stream id, uint8 type, uint8 flags.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from typing import NamedTuple

from ember.ttrpc.errors import Code, ConnectionClosed, FrameTooLarge

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_PAYLOAD = 4 << 20

TYPE_REQUEST = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3


class Frame(NamedTuple):
    stream_id: int
    type: int
    flags: int
    payload: bytes


class Transport:
    """A byte pipe to one ttrpc peer: a connected socket or a raw fd.

    A virtio-serial port is a character device read with os.read/os.write, so
    the fd flavour exists for the guest agent. Writes are serialised with a
    lock (concurrent handlers answer on one connection) and refused once the
    transport is closed, so a late answer can never land on a reused fd.

    close() must work while another thread is stuck reading or writing (a
    virtio-serial write blocks for as long as the host end is away). So fds
    are switched to non-blocking and polled together with an eventfd that
    close() signals, and sockets are shut down, which wakes their blocked
    calls. The poll has no timeout: an idle guest agent must not wake up on
    its own (issue 14: under TCG each wake-up of an idle VM costs host CPU,
    and 5 a second made an idle sandbox's QEMU use half as much again).
    """

    def __init__(self, sock: socket.socket | None = None, fd: int | None = None,
                 close_fd: bool = True) -> None:
        if (sock is None) == (fd is None):
            raise ValueError("Transport needs exactly one of sock or fd")
        self.sock = sock
        self.fd = fd
        self._close_fd = close_fd
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closed = False
        self._wake = -1
        if fd is not None:
            os.set_blocking(fd, False)
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def _poller(self, events: int) -> select.poll:
        """A poll set of the fd (for events) and the close signal."""
        poller = select.poll()
        poller.register(self.fd, events)  # type: ignore[arg-type]
        poller.register(self._wake, select.POLLIN)
        return poller

    @classmethod
    def of(cls, obj: Transport | socket.socket | int) -> Transport:
        """Wrap whatever the caller has (transport, socket or fd)."""
        if isinstance(obj, Transport):
            return obj
        if isinstance(obj, socket.socket):
            return cls(sock=obj)
        if isinstance(obj, int):
            return cls(fd=obj)
        raise TypeError(f"cannot make a ttrpc transport from {type(obj).__name__}")

    @property
    def closed(self) -> bool:
        return self._closed

    def read_some(self, n: int) -> bytes:
        """Read up to n bytes; b'' means the peer is gone (or we closed)."""
        if self._closed:
            return b""
        if self.sock is not None:
            try:
                return self.sock.recv(n)
            except OSError:
                if self._closed:
                    return b""
                raise
        poller = self._poller(select.POLLIN)
        while True:
            # The read lock keeps close() from recycling the fd under us.
            with self._rlock:
                if self._closed:
                    return b""
                try:
                    return os.read(self.fd, n)  # type: ignore[arg-type]
                except BlockingIOError:
                    poller.poll()

    def read_exactly(self, n: int) -> bytes:
        """Read n bytes, looping over partial reads (sockets and char devices)."""
        chunks = []
        left = n
        while left:
            chunk = self.read_some(min(left, 1 << 20))
            if not chunk:
                got = n - left
                raise ConnectionClosed(
                    "ttrpc peer closed the connection" if got == 0 and n == HEADER_SIZE
                    else f"ttrpc peer closed the connection mid-frame ({got} of {n} bytes)",
                    mid_frame=bool(got) or n != HEADER_SIZE)
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def write_all(self, data: bytes) -> None:
        with self._wlock:
            if self._closed:
                raise ConnectionClosed("ttrpc transport is closed")
            view = memoryview(data)
            if self.sock is not None:
                self.sock.sendall(view)
                return
            poller = self._poller(select.POLLOUT)
            while view:
                try:
                    view = view[os.write(self.fd, view):]  # type: ignore[arg-type]
                except BlockingIOError:
                    poller.poll()
                    if self._closed:
                        raise ConnectionClosed("ttrpc transport closed during a write") from None

    def close(self) -> None:
        """Close the transport; blocked readers and writers return promptly.

        Once only, even when two threads close at once (the server's shutdown
        and a connection's own end): a second pass would signal and close
        descriptor numbers that may already belong to someone else."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            with self._wlock:
                self.sock.close()
            return
        os.eventfd_write(self._wake, 1)  # wakes a reader or writer, which then lets go
        with self._rlock, self._wlock:
            os.close(self._wake)
            if self._close_fd:
                try:
                    os.close(self.fd)  # type: ignore[arg-type]
                except OSError:
                    pass


def read_frame(transport: Transport, max_payload: int = MAX_PAYLOAD) -> Frame:
    """Read one frame.

    Raises ConnectionClosed at EOF (``mid_frame`` tells a torn frame from a
    clean close) and FrameTooLarge for an oversize frame, after skipping its
    payload so the stream stays in step and the caller can answer that id.
    """
    length, stream_id, ftype, flags = HEADER.unpack(transport.read_exactly(HEADER_SIZE))
    if length > max_payload:
        left = length
        while left:
            left -= len(transport.read_exactly(min(left, 1 << 20)))
        raise FrameTooLarge(
            Code.RESOURCE_EXHAUSTED,
            f"ttrpc frame of {length} bytes exceeds the {max_payload}-byte limit",
            stream_id=stream_id, frame_type=ftype)
    payload = transport.read_exactly(length) if length else b""
    return Frame(stream_id, ftype, flags, payload)


def encode_frame(stream_id: int, ftype: int, payload: bytes, flags: int = 0,
                 max_payload: int = MAX_PAYLOAD) -> bytes:
    if len(payload) > max_payload:
        raise FrameTooLarge(
            Code.RESOURCE_EXHAUSTED,
            f"ttrpc message of {len(payload)} bytes exceeds the {max_payload}-byte limit",
            stream_id=stream_id, frame_type=ftype)
    return HEADER.pack(len(payload), stream_id, ftype, flags) + payload


def write_frame(transport: Transport, stream_id: int, ftype: int, payload: bytes,
                flags: int = 0, max_payload: int = MAX_PAYLOAD) -> None:
    """Write one frame atomically with respect to other writers."""
    transport.write_all(encode_frame(stream_id, ftype, payload, flags, max_payload))
