"""Host side of Firecracker's hybrid vsock: reach a guest AF_VSOCK port.

Firecracker backs the guest's virtio-vsock device with a Unix socket on the
host (``uds_path``). To open a connection to guest port P, the host connects
to that socket, writes ``CONNECT P\\n`` and reads back ``OK <host port>\\n``;
from then on the socket is a plain byte stream to the guest listener. When
nothing listens on P yet (the guest is still booting, the agent not started),
Firecracker closes the connection instead of answering, so callers retry
until a deadline.

The reply line is read one byte at a time on purpose: whatever follows the
newline belongs to the protocol spoken next (ttrpc) and must stay in the
socket for its reader.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from ember.errors import VMError
from ember.vmm.peer import check_peer

AGENT_PORT = 1024
MAX_REPLY = 64


class HandshakeRefused(OSError):
    """The connection closed, or answered something other than ``OK``."""


def handshake(sock: socket.socket, port: int, timeout: float) -> int:
    """Run ``CONNECT port`` on a connected socket; the host-side port Firecracker reports."""
    sock.settimeout(timeout)
    sock.sendall(f"CONNECT {port}\n".encode())
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise HandshakeRefused(f"vsock port {port}: connection closed before OK")
        line += chunk
        if len(line) > MAX_REPLY:
            raise HandshakeRefused(f"vsock port {port}: reply too long: {bytes(line)[:32]!r}")
    text = line.decode("ascii", "replace").strip()
    parts = text.split()
    if len(parts) != 2 or parts[0] != "OK" or not parts[1].isdigit():
        raise HandshakeRefused(f"vsock port {port}: unexpected reply {text!r}")
    sock.settimeout(None)
    return int(parts[1])


def connect(uds_path: str, port: int, timeout: float,
            alive: Callable[[], None] | None = None, interval: float = 0.05,
            peer_uid: int | None = None) -> socket.socket:
    """A stream socket to guest ``port``, retrying until the guest listens.

    ``alive`` is called between attempts and should raise when the VMM has
    exited, so a dead VM fails fast instead of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    last = "the vsock socket does not exist yet"
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
            sock.connect(uds_path)
            check_peer(sock, peer_uid, f"vsock socket {uds_path}")
            handshake(sock, port, max(0.1, min(2.0, deadline - time.monotonic())))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        except (HandshakeRefused, TimeoutError, ConnectionResetError, BrokenPipeError) as exc:
            sock.close()
            last = str(exc) or type(exc).__name__
        except OSError as exc:
            sock.close()
            raise VMError(f"vsock socket {uds_path}: {exc}") from None
        if alive is not None:
            alive()
        if time.monotonic() >= deadline:
            raise VMError(f"nothing answered on guest vsock port {port} within {timeout:g}s "
                          f"({last})")
        time.sleep(interval)
