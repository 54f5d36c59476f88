"""kubectl port-forward for Ember pods: the guest's TCP ports on the host-side netns loopback.

containerd 1.6's CRI plugin serves PortForward by entering the pod's network
namespace on the host and dialling ``localhost:PORT`` there. With runc the
pod's processes live in that namespace; with Ember they live in the VM, and
the namespace's eth0 is only a tc redirect to the VM's tap (ember.net.podnet),
so nothing would answer on its loopback.

The forwarder closes that gap, one per pod, while the VM runs:

* every POLL_INTERVAL it asks the agent which TCP ports listen in the guest
  (ListPorts) and keeps a listener on 127.0.0.1:PORT (and [::1]:PORT when the
  namespace has IPv6) inside the pod's namespace for each one; listeners of
  ports that disappeared are closed. The sockets are created by a short-lived
  thread that setns()-ed into the namespace (setns changes only the calling
  thread; a socket stays in the namespace it was made in), so the shim itself
  never leaves its own namespace;
* each accepted connection becomes a guest connection to 127.0.0.1:PORT
  (PortConnect) and two pumps: client -> guest (PortWrite; the client's EOF
  is passed on as a half-close) and guest -> client (long-polling PortRead;
  the guest's EOF becomes shutdown(SHUT_WR) on the client). A port nobody
  accepts in the guest closes the client connection at once.

A port already bound in the namespace (or one that cannot be bound) is logged
once and retried later, never fatal. stop() closes listeners and connections
and joins every thread it started.
"""

from __future__ import annotations

import ctypes
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("ember.shim.portforward")

CLONE_NEWNET = 0x40000000
POLL_INTERVAL = 0.75
RETRY_INTERVAL = 10.0       # a port that could not be bound is tried again after this
READ_WAIT_MS = 1000
CHUNK = 64 << 10
MAX_CONNS = 128
BACKLOG = 64
ADDRESSES = (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6))
JOIN_TIMEOUT = 5.0

T = TypeVar("T")


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run fn in a thread that joined the network namespace at path; its result or error."""
    result: list[Any] = []

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result.append((False, exc))

    t = threading.Thread(target=work, name="portfwd-netns")
    t.start()
    t.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def bind_listeners(ports: list[int], addresses=ADDRESSES
                   ) -> dict[int, tuple[list[socket.socket], list[str]]]:
    """For each port: the listening sockets that could be made, and why the others failed.

    The first address (127.0.0.1, what containerd dials) is required: when it
    fails the port gets no listener at all. Runs in the caller's network
    namespace (in_netns puts it in the pod's).
    """
    out: dict[int, tuple[list[socket.socket], list[str]]] = {}
    for port in ports:
        socks: list[socket.socket] = []
        errors: list[str] = []
        for i, (addr, family) in enumerate(addresses):
            s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((addr, port))
                s.listen(BACKLOG)
                s.setblocking(False)
                socks.append(s)
            except OSError as exc:
                s.close()
                errors.append(f"{addr}: {exc.strerror or exc}")
                if i == 0:
                    break
        out[port] = (socks, errors)
    return out


class _Connection:
    """One accepted client and its guest connection; two pump threads."""

    def __init__(self, fwd: PortForwarder, client: socket.socket, port: int) -> None:
        self.fwd = fwd
        self.agent = fwd.agent
        self.client = client
        self.port = port
        self.conn_id = ""
        self.aborted = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"portfwd-{port}", daemon=True)
        self.reader: threading.Thread | None = None

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        """Connect in the guest, pump client -> guest, then wait for the other pump; clean up."""
        try:
            try:
                self.conn_id = self.agent.port_connect(self.port)
            except Exception as exc:  # noqa: BLE001 - refuse this client, nothing else
                log.info("port-forward %d: %s", self.port, exc)
                return
            self.reader = threading.Thread(target=self._guest_to_client, daemon=True,
                                           name=f"portfwd-{self.port}-r")
            self.reader.start()
            self._client_to_guest()
            self.reader.join()
        finally:
            if self.conn_id:
                try:
                    self.agent.port_close(self.conn_id)
                except Exception:  # noqa: BLE001 - the VM may be going away
                    pass
            self.client.close()
            self.fwd._forget(self)

    def _client_to_guest(self) -> None:
        try:
            while not self.aborted.is_set():
                data = self.client.recv(CHUNK)
                if self.aborted.is_set():
                    return
                self.agent.port_write(self.conn_id, data, close_write=not data)
                if not data:
                    return
        except Exception as exc:  # noqa: BLE001 - any failure ends this connection
            if not self.aborted.is_set():
                log.debug("port-forward %d client -> guest: %s", self.port, exc)
            self.abort()

    def _guest_to_client(self) -> None:
        try:
            while not self.aborted.is_set():
                r = self.agent.port_read(self.conn_id, wait_ms=READ_WAIT_MS, max_bytes=CHUNK)
                if r.data:
                    self.client.sendall(r.data)
                if r.eof:
                    self.client.shutdown(socket.SHUT_WR)
                    return
        except Exception as exc:  # noqa: BLE001 - any failure ends this connection
            if not self.aborted.is_set():
                log.debug("port-forward %d guest -> client: %s", self.port, exc)
            self.abort()

    def abort(self) -> None:
        """End both pumps: wake the client recv(); the guest read returns within READ_WAIT_MS."""
        self.aborted.set()
        try:
            self.client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class PortForwarder:
    """Serves a pod's guest TCP ports inside the pod's host-side network namespace."""

    def __init__(self, agent, netns: str, poll_interval: float = POLL_INTERVAL,
                 addresses=ADDRESSES, max_conns: int = MAX_CONNS) -> None:
        self.agent = agent
        self.netns = netns
        self.poll_interval = poll_interval
        self.addresses = addresses
        self.max_conns = max_conns
        self._listeners: dict[int, list[socket.socket]] = {}
        self._failed: dict[int, float] = {}  # port -> when to try binding it again
        self._conns: set[_Connection] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, name="portfwd", daemon=True)
        self._disabled = False

    @property
    def ports(self) -> list[int]:
        """The ports currently served (for tests and logs)."""
        with self._lock:
            return sorted(self._listeners)

    def start(self) -> PortForwarder:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every listener and connection and join every thread (idempotent)."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.abort()
            if c.conn_id:
                try:
                    self.agent.port_close(c.conn_id)  # wakes the guest read's long poll
                except Exception:  # noqa: BLE001 - the VM may be gone already
                    pass
        deadline = time.monotonic() + JOIN_TIMEOUT
        for c in conns:
            c.thread.join(max(0.0, deadline - time.monotonic()))
        for port in list(self._listeners):
            self._close_port(port)
        if not self._thread.is_alive():
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    # -- the poll/accept loop ---------------------------------------------------------

    def _loop(self) -> None:
        next_poll = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_poll:
                self._refresh()
                next_poll = time.monotonic() + self.poll_interval
            try:
                events = self._sel.select(max(0.0, next_poll - time.monotonic()))
            except OSError:
                continue
            for key, _ in events:
                if key.fileobj is self._wake_r:
                    self._wake_r.recv(64)
                    continue
                self._accept(key.fileobj, key.data)  # type: ignore[arg-type]  # we register sockets

    def _refresh(self) -> None:
        if self._disabled:
            return
        try:
            wanted = {p for p in self.agent.list_ports() if 0 < p < 65536}
        except Exception as exc:  # noqa: BLE001 - the guest may be rebooting or gone
            if getattr(exc, "code", None) == 12:  # UNIMPLEMENTED: an older agent
                log.warning("port-forward off: the guest agent has no ListPorts")
                self._disabled = True
            else:
                log.debug("port-forward: ListPorts: %s", exc)
            return
        for port in set(self._listeners) - wanted:
            log.info("port-forward: guest port %d closed; listener removed", port)
            self._close_port(port)
        now = time.monotonic()
        self._failed = {p: t for p, t in self._failed.items() if p in wanted}
        new = sorted(p for p in wanted - set(self._listeners) if self._failed.get(p, 0) <= now)
        if not new:
            return
        try:
            bound = in_netns(self.netns, lambda: bind_listeners(new, self.addresses))
        except OSError as exc:
            log.warning("port-forward: cannot enter %s: %s", self.netns, exc)
            for p in new:
                self._failed[p] = now + RETRY_INTERVAL
            return
        for port, (socks, errors) in bound.items():
            if not socks:
                if port not in self._failed:
                    log.warning("port-forward: cannot listen on port %d in %s: %s", port,
                                self.netns, "; ".join(errors))
                self._failed[port] = now + RETRY_INTERVAL
                continue
            if errors:
                log.debug("port-forward: port %d: %s", port, "; ".join(errors))
            with self._lock:
                if self._stop.is_set():  # stop() gave up waiting for this thread
                    for s in socks:
                        s.close()
                    continue
                for s in socks:
                    self._sel.register(s, selectors.EVENT_READ, port)
                self._listeners[port] = socks
            log.info("port-forward: guest port %d served in %s", port, self.netns)

    def _close_port(self, port: int) -> None:
        with self._lock:
            socks = self._listeners.pop(port, [])
        for s in socks:
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError, OSError):
                pass
            s.close()

    def _accept(self, lsock: socket.socket, port: int) -> None:
        try:
            client, _ = lsock.accept()
        except OSError:
            return  # BlockingIOError (another wake-up took it), or the listener closed
        client.setblocking(True)
        conn: _Connection | None = None
        with self._lock:
            if len(self._conns) < self.max_conns and not self._stop.is_set():
                conn = _Connection(self, client, port)
                self._conns.add(conn)
                conn.start()  # under the lock: stop() sees it started or never
        if conn is None:
            log.warning("port-forward %d: refusing a connection (%d open, or stopping)",
                        port, self.max_conns)
            client.close()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)


def start(agent, netns: str) -> PortForwarder:
    """A running forwarder for the pod whose host-side network namespace is netns."""
    return PortForwarder(agent, netns).start()
