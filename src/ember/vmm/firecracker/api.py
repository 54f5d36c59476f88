"""Firecracker's REST API, spoken over its Unix socket.

Firecracker is configured only through HTTP/1.1 requests with JSON bodies on
the ``--api-sock`` socket. The stdlib ``http.client`` does the HTTP; this
module only swaps its TCP connect for a Unix-socket connect and turns
Firecracker's answers into Ember's errors: a refused request carries a
``fault_message`` that can span lines, and the user should see one line that
says which call failed and why.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable

from ember.errors import VMError
from ember.vmm.peer import check_peer

DEFAULT_TIMEOUT = 10.0


class FirecrackerAPIError(VMError):
    """Firecracker answered a request with an error status."""

    def __init__(self, method: str, path: str, status: int, fault: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.fault = fault
        super().__init__(f"firecracker refused {method} {path}: {fault}")


def one_line(text: str) -> str:
    """Collapse Firecracker's multi-line fault messages for a one-line error."""
    return " ".join(text.split()) or "no fault message"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float, peer_uid: int | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path
        self._peer_uid = peer_uid

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._unix_path)
        except OSError:
            sock.close()
            raise
        check_peer(sock, self._peer_uid, f"Firecracker API socket {self._unix_path}")
        self.sock = sock


class FirecrackerAPI:
    """A client for one Firecracker process's API socket.

    ``alive`` is called when the socket fails, so an error says "firecracker
    exited: <its last log line>" instead of a bare "connection refused".
    """

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT,
                 alive: Callable[[], None] | None = None, peer_uid: int | None = None) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._alive = alive or (lambda: None)
        self.peer_uid = peer_uid  # a jailed Firecracker's uid: nobody else may answer

    def request(self, method: str, path: str, body: dict | None = None,
                timeout: float | None = None) -> dict | None:
        """Send one request; the decoded JSON answer, or None for 204."""
        limit = self.timeout if timeout is None else timeout
        conn = _UnixHTTPConnection(self.socket_path, limit, self.peer_uid)
        payload = None if body is None else json.dumps(body)
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except TimeoutError:
            self._alive()
            raise VMError(f"firecracker did not answer {method} {path} "
                          f"within {limit:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            self._alive()
            raise VMError(f"firecracker API socket {self.socket_path}: "
                          f"{method} {path} failed: {exc}") from None
        finally:
            conn.close()
        if resp.status >= 300:
            raise FirecrackerAPIError(method, path, resp.status, _fault(data, resp.status))
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise VMError(f"firecracker answered {method} {path} with bad JSON") from None

    def put(self, path: str, body: dict) -> None:
        self.request("PUT", path, body)

    def patch(self, path: str, body: dict) -> None:
        self.request("PATCH", path, body)

    def get(self, path: str) -> dict | None:
        return self.request("GET", path)

    def wait_ready(self, timeout: float) -> dict:
        """Poll ``GET /`` until the API answers: the socket appears a moment after exec."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = self.request("GET", "/", timeout=max(0.2, deadline - time.monotonic()))
                return info or {}
            except FirecrackerAPIError:
                raise
            except VMError:
                self._alive()
                if time.monotonic() >= deadline:
                    raise VMError(f"firecracker API socket {self.socket_path} did not come up "
                                  f"within {timeout:g}s") from None
                time.sleep(0.01)


def _fault(data: bytes, status: int) -> str:
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("fault_message"), str):
        return one_line(doc["fault_message"])
    text = data.decode("utf-8", "replace").strip()
    return one_line(text) if text else f"HTTP status {status}"
