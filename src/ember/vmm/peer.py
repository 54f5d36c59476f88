"""Check who serves a Unix socket before talking to it.

A jailed VMM creates its sockets (Firecracker's API and vsock sockets) in a
folder it owns, so it could replace one with a symlink to a host socket
(containerd's, the Docker API) and have root connect there. ``SO_PEERCRED``
names the uid that listens on the other end: anything but the jail's uid is
refused before a byte is sent.
"""

from __future__ import annotations

import socket
import struct

from ember.errors import VMError

_UCRED = struct.Struct("3i")  # pid, uid, gid


def check_peer(sock: socket.socket, uid: int | None, what: str) -> None:
    """Raise VMError unless the process listening behind sock runs as uid (None: any)."""
    if uid is None:
        return
    _pid, peer_uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    if peer_uid != uid:
        sock.close()
        raise VMError(f"{what} is served by uid {peer_uid}, not by the VMM's uid {uid}: "
                      "refusing to use it")
