"""Published ports (``-p``): a userland TCP proxy, as docker-proxy does it.

The sandbox monitor binds each host port before the VM boots (so a port in
use fails ``ember run`` at once) and forwards every accepted connection to
CONTAINER_IP:PORT on the bridge. No iptables rule is involved, so there is
nothing to clean up when the monitor dies: the kernel closes its sockets.
"""

from __future__ import annotations

import errno
import re
import socket
import threading
from dataclasses import dataclass

from ember.errors import EmberError

_SPEC = re.compile(r"^(?:(?P<ip>[0-9.]+):)?(?P<host>\d+):(?P<cont>\d+)(?:/(?P<proto>[a-z]+))?$")


@dataclass(frozen=True)
class PortMapping:
    host_ip: str
    host_port: int
    container_port: int

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}:{self.container_port}/tcp"


def parse_publish(value: str) -> PortMapping:
    """``[IP:]HOSTPORT:CONTAINERPORT[/tcp]``; a clear error for anything else."""
    m = _SPEC.match(value.strip())
    bad = f"invalid --publish {value!r}: expected [IP:]HOSTPORT:CONTAINERPORT[/tcp]"
    if not m:
        raise EmberError(bad)
    if m["proto"] not in (None, "tcp"):
        raise EmberError(f"invalid --publish {value!r}: only tcp is supported")
    host, cont = int(m["host"]), int(m["cont"])
    if not (0 < host < 65536 and 0 < cont < 65536):
        raise EmberError(f"invalid --publish {value!r}: ports must be 1-65535")
    ip = m["ip"] or "0.0.0.0"
    try:
        socket.inet_aton(ip)
    except OSError:
        raise EmberError(bad) from None
    return PortMapping(ip, host, cont)


class TCPProxy:
    """Listens on the host port now; forwards once :meth:`start` names the target."""

    def __init__(self, mapping: PortMapping) -> None:
        self.mapping = mapping
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((mapping.host_ip, mapping.host_port))
            self.sock.listen(64)
        except OSError as exc:
            self.sock.close()
            what = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc.strerror}"
            raise EmberError(f"published port {mapping.host_ip}:{mapping.host_port} {what}") from None
        self.target: tuple[str, int] | None = None

    def start(self, container_ip: str) -> None:
        self.target = (container_ip, self.mapping.container_port)
        threading.Thread(target=self._accept, daemon=True,
                         name=f"proxy-{self.mapping.host_port}").start()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        assert self.target is not None
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()  # the container does not listen: the client sees a reset/EOF
            return
        upstream.settimeout(None)
        t = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
        t.start()
        _pipe(client, upstream)
        t.join()
        client.close()
        upstream.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy until EOF, then pass the half-close on (HTTP/1.0 clients rely on it)."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
