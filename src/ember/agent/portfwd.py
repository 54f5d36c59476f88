"""Port forwarding inside the guest: listening TCP ports, and byte streams to them.

containerd's CRI plugin serves ``kubectl port-forward`` by dialling
``localhost:PORT`` in the pod's network namespace on the host. In an Ember pod
the listener is in the guest, so the shim (``ember.shim.portforward``) asks the
agent which TCP ports listen here (ListPorts), serves each one on the host-side
namespace's loopback, and carries every accepted connection over the agent
channel (PortConnect, PortWrite, PortRead, PortClose).

The pod's containers share the guest's network namespace, so one look at
``/proc/net/tcp`` and ``/proc/net/tcp6`` sees every container's listeners.

A connection is a guest socket plus a reader thread that fills a bounded
buffer: the host drains it with long-polling PortRead calls, and a full buffer
stops the reader, which stops the guest program's sends (back-pressure, no
unbounded memory). The number of connections is capped, and connections the
host stopped using (a shim that died mid-stream) are closed after an idle
time, swept whenever the host calls in.

Guest-only code: stdlib and ember.ttrpc.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

from ember.ttrpc import Code, TTRPCError

log = logging.getLogger("ember.agent.portfwd")

PROC_TCP = ("/proc/net/tcp", "/proc/net/tcp6")
TCP_LISTEN = 0x0A
MAX_CONNS = 128
BUFFER_LIMIT = 1 << 20       # per connection, guest -> host, not yet read
READ_DEFAULT = 256 << 10
READ_MAX = 1 << 20           # well under the 4 MiB ttrpc frame limit
MAX_WAIT_MS = 60_000
IDLE_TIMEOUT = 300.0         # no PortRead/PortWrite for this long: the host is gone
CONNECT_TIMEOUT = 5.0
CHUNK = 64 << 10


# -- listening ports ----------------------------------------------------------------


def _address(hex_addr: str) -> str:
    """A /proc/net/tcp{,6} address: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    if len(raw) == 16:
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, words)
    raise ValueError(f"bad address {hex_addr!r}")


def parse_listeners(text: str) -> list[tuple[str, int]]:
    """(address, port) of every LISTEN socket in the text of /proc/net/tcp or tcp6.

    Lines that do not parse are skipped: the kernel's format has been stable
    for decades, but a bad line must not hide the good ones.
    """
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        try:
            if int(fields[3], 16) != TCP_LISTEN:
                continue
            addr, port = fields[1].rsplit(":", 1)
            found.append((_address(addr), int(port, 16)))
        except ValueError:
            continue
    return found


def listeners(paths: tuple[str, ...] = PROC_TCP) -> list[tuple[str, int]]:
    """Every listening TCP socket of the guest's network namespace."""
    out: list[tuple[str, int]] = []
    for path in paths:
        try:
            with open(path) as f:
                out += parse_listeners(f.read())
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
    return out


def listening_ports(paths: tuple[str, ...] = PROC_TCP) -> list[int]:
    """The guest's listening TCP ports, sorted, without port 0."""
    return sorted({port for _, port in listeners(paths) if 0 < port < 65536})


def connect_candidates(port: int, found: list[tuple[str, int]]) -> list[str]:
    """Addresses to try for PortConnect, in order.

    127.0.0.1 first, as containerd does with runc; then ::1, then any specific
    address a listener on this port is bound to (a server bound only to the
    pod IP is not reachable on loopback). Wildcard listeners need nothing more.
    """
    out = ["127.0.0.1", "::1"]
    for addr, p in found:
        if p != port or addr in ("0.0.0.0", "::"):
            continue
        if addr.startswith("fe80:"):
            continue  # link-local needs a scope id; not worth it
        if addr not in out:
            out.append(addr)
    return out


# -- connections --------------------------------------------------------------------


@dataclass(eq=False)
class Conn:
    """One guest-side connection and the buffer its reader thread fills."""

    id: str
    port: int
    sock: socket.socket
    limit: int = BUFFER_LIMIT
    buf: bytearray = field(default_factory=bytearray)
    eof: bool = False
    closed: bool = False
    last_used: float = field(default_factory=time.monotonic)
    cond: threading.Condition = field(default_factory=threading.Condition)
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._reader, name=f"portfwd-{self.id}",
                                       daemon=True)
        self.thread.start()

    def _reader(self) -> None:
        """Copy the socket into the buffer until EOF, an error or close; wait while it is full."""
        while True:
            with self.cond:
                while len(self.buf) >= self.limit and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                room = self.limit - len(self.buf)
            try:
                data = self.sock.recv(min(room, CHUNK))
            except OSError as exc:
                if not self.closed:
                    log.debug("port %d conn %s: %s", self.port, self.id, exc)
                data = b""
            with self.cond:
                if data:
                    self.buf += data
                else:
                    self.eof = True
                self.cond.notify_all()
            if not data:
                return

    def read(self, max_bytes: int, wait_ms: int) -> tuple[bytes, bool]:
        """Up to max_bytes, waiting up to wait_ms for some; (data, eof once all is read)."""
        deadline = time.monotonic() + wait_ms / 1000
        with self.cond:
            self.last_used = time.monotonic()
            while not self.buf and not self.eof and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            data = bytes(self.buf[:max_bytes])
            del self.buf[:max_bytes]
            self.cond.notify_all()  # room again for the reader
            return data, (self.eof or self.closed) and not self.buf

    def write(self, data: bytes, close_write: bool) -> None:
        self.last_used = time.monotonic()
        with self.write_lock:
            if self.closed:
                raise OSError(errno.EBADF, "connection closed")
            if data:
                self.sock.sendall(data)
            if close_write:
                self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Wake the reader and any waiting PortRead, then release the socket.

        shutdown() first: it wakes a recv() or sendall() blocked in another
        thread; closing the descriptor under them could hit a reused fd.
        """
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(5.0)
        with self.write_lock:
            self.sock.close()


class PortTable:
    """The agent's port-forwarding state: conn_id -> Conn, with limits."""

    def __init__(self, max_conns: int = MAX_CONNS, buffer_limit: int = BUFFER_LIMIT,
                 idle_timeout: float = IDLE_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT,
                 proc_paths: tuple[str, ...] = PROC_TCP) -> None:
        self.max_conns = max_conns
        self.buffer_limit = buffer_limit
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.proc_paths = proc_paths
        self._lock = threading.Lock()
        self._conns: dict[str, Conn] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        with self._lock:
            return len(self._conns)

    def list_ports(self) -> list[int]:
        self.sweep()
        return listening_ports(self.proc_paths)

    def connect(self, port: int) -> str:
        if not 0 < port < 65536:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"port {port} is not a TCP port")
        self.sweep()
        with self._lock:
            if len(self._conns) >= self.max_conns:
                raise TTRPCError(Code.RESOURCE_EXHAUSTED,
                                 f"port {port}: {self.max_conns} forwarded connections "
                                 "are open already")
        sock = self._dial(port)
        with self._lock:
            if len(self._conns) >= self.max_conns:  # lost a race while dialling
                sock.close()
                raise TTRPCError(Code.RESOURCE_EXHAUSTED,
                                 f"port {port}: {self.max_conns} forwarded connections "
                                 "are open already")
            conn = Conn(f"{port}-{next(self._ids)}", port, sock, self.buffer_limit)
            self._conns[conn.id] = conn
        conn.start()
        log.debug("port %d: connection %s", port, conn.id)
        return conn.id

    def _dial(self, port: int) -> socket.socket:
        """A connected socket to the first candidate address that accepts."""
        errors = []
        for addr in connect_candidates(port, listeners(self.proc_paths)):
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(self.connect_timeout)
                sock.connect((addr, port))
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                errors.append(f"{addr}: {exc.strerror or exc}")
        raise TTRPCError(Code.UNAVAILABLE,
                         f"nothing accepts connections on port {port} in the guest "
                         f"({'; '.join(errors)})")

    def _get(self, conn_id: str) -> Conn:
        with self._lock:
            conn = self._conns.get(conn_id)
        if conn is None:
            raise TTRPCError(Code.NOT_FOUND, f"port connection {conn_id!r} not found")
        return conn

    def write(self, conn_id: str, data: bytes, close_write: bool = False) -> None:
        conn = self._get(conn_id)
        try:
            conn.write(data, close_write)
        except OSError as exc:
            raise TTRPCError(Code.UNAVAILABLE, f"port {conn.port}: write to the guest "
                             f"connection failed: {exc.strerror or exc}") from None

    def read(self, conn_id: str, max_bytes: int = 0, wait_ms: int = 0) -> tuple[bytes, bool]:
        conn = self._get(conn_id)
        n = min(max_bytes or READ_DEFAULT, READ_MAX)
        return conn.read(n, min(wait_ms, MAX_WAIT_MS))

    def close(self, conn_id: str) -> None:
        """Idempotent: the host closes whatever it opened, even after an idle sweep."""
        with self._lock:
            conn = self._conns.pop(conn_id, None)
        if conn is not None:
            conn.close()

    def close_all(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()

    def sweep(self) -> None:
        """Close connections the host has not touched for idle_timeout seconds."""
        now = time.monotonic()
        with self._lock:
            idle = [c for c in self._conns.values() if now - c.last_used > self.idle_timeout]
            for c in idle:
                del self._conns[c.id]
        for c in idle:
            log.info("port %d: closing idle connection %s", c.port, c.id)
            c.close()
