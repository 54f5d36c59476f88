"""A small synchronous QMP client.

QEMU's own ``qemu.qmp`` package is asyncio-only; Ember's sandbox monitor and
the shim are thread-based, and need only a handful of commands, so this
client speaks the JSON line protocol directly: greeting, ``qmp_capabilities``,
then one command at a time under a lock, skipping asynchronous events.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ember.errors import VMError


class QMPError(VMError):
    """QEMU answered a command with an error."""


class QMPClient:
    def __init__(self, path: Path, timeout: float = 10.0,
                 alive: Callable[[], None] | None = None) -> None:
        """``alive`` raises (VMError) once QEMU has exited: connecting stops
        waiting for a socket nobody will ever serve, and says why."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self._alive = alive
        self._sock = self._connect(timeout)
        self._file = self._sock.makefile("rwb", buffering=0)
        self.events: list[dict] = []
        self._sock.settimeout(timeout)
        self._read_message()  # greeting
        self.execute("qmp_capabilities")

    def _connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if self._alive is not None:
                    self._alive()
                if time.monotonic() > deadline:
                    raise VMError(f"QMP socket {self.path} did not come up: {exc}") from None
                time.sleep(0.01)

    def _read_message(self) -> dict:
        line = self._file.readline()
        if not line:
            raise VMError("QMP connection closed by QEMU")
        return json.loads(line)

    def execute(self, command: str, timeout: float = 30.0, fds: list[int] | None = None,
                **arguments: object) -> object:
        """Run one command and return its "return" value.

        ``fds`` are passed along with the command (SCM_RIGHTS), as ``getfd``
        needs: a jailed QEMU cannot open host paths itself.
        """
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        with self._lock:
            self._sock.settimeout(timeout)
            try:
                data = json.dumps(msg).encode() + b"\n"
                if fds:
                    socket.send_fds(self._sock, [data], fds)
                else:
                    self._file.write(data)
                while True:
                    reply = self._read_message()
                    if "event" in reply:
                        self.events.append(reply)
                        continue
                    break
            except (OSError, ValueError) as exc:
                raise VMError(f"QMP {command}: {exc}") from None
        if "error" in reply:
            err = reply["error"]
            raise QMPError(f"QMP {command}: {err.get('desc', err)}")
        return reply.get("return")

    def close(self) -> None:
        try:
            self._file.close()
            self._sock.close()
        except OSError:
            pass
