"""Hybrid vsock handshake (ember.vmm.vsock) against real Unix-socket servers.

The server side plays Firecracker's part in the ways that matter to a client:
answering ``OK <port>``, dropping the connection while nothing listens in the
guest, answering garbage, and sending data right after the OK line.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from ember.errors import VMError
from ember.vmm import vsock


class Server:
    """A Unix listener whose per-connection behaviour a test chooses."""

    def __init__(self, path: str, behave) -> None:
        self.path = path
        self.behave = behave
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.count = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            threading.Thread(target=self._serve, args=(conn, self.count), daemon=True).start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(1)
            if not chunk:
                break
            line += chunk
        self.requests.append(line)
        self.behave(conn, n)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(tmp_path):
    made: list[Server] = []

    def make(behave) -> Server:
        s = Server(str(tmp_path / "v.sock"), behave)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_handshake_returns_a_stream_to_the_port_and_leaves_following_bytes(server):
    def ok(conn, n):
        conn.sendall(b"OK 1073741824\nfirst-ttrpc-bytes")
        conn.close()

    srv = server(ok)
    sock = vsock.connect(srv.path, 1024, timeout=2)
    try:
        assert srv.requests == [b"CONNECT 1024\n"]
        assert sock.recv(100) == b"first-ttrpc-bytes"  # not eaten by the handshake
        assert sock.gettimeout() is None
    finally:
        sock.close()


def test_retries_while_nothing_listens_in_the_guest(server):
    def late(conn, n):
        if n < 4:
            conn.close()  # Firecracker drops the connection: no guest listener yet
        else:
            conn.sendall(b"OK 7\n")

    srv = server(late)
    sock = vsock.connect(srv.path, 52, timeout=5, interval=0.01)
    sock.close()
    assert srv.count == 4
    assert set(srv.requests) == {b"CONNECT 52\n"}


def test_timeout_names_the_port_and_the_last_problem(server):
    srv = server(lambda conn, n: (conn.sendall(b"NOPE\n"), conn.close()))
    start = time.monotonic()
    with pytest.raises(VMError) as err:
        vsock.connect(srv.path, 1024, timeout=0.5, interval=0.02)
    assert 0.5 <= time.monotonic() - start < 3
    msg = str(err.value)
    assert "port 1024" in msg and "0.5s" in msg and "unexpected reply 'NOPE'" in msg
    assert "\n" not in msg


def test_missing_socket_times_out_clearly(tmp_path):
    with pytest.raises(VMError, match=r"nothing answered on guest vsock port 1024 within 0.3s"):
        vsock.connect(str(tmp_path / "absent.sock"), 1024, timeout=0.3)


def test_dead_vmm_fails_fast_instead_of_waiting(tmp_path):
    def alive():
        raise VMError("firecracker exited with code 1: boom")

    start = time.monotonic()
    with pytest.raises(VMError, match="exited with code 1: boom"):
        vsock.connect(str(tmp_path / "absent.sock"), 1024, timeout=30, alive=alive)
    assert time.monotonic() - start < 1


def test_overlong_reply_is_refused(server):
    srv = server(lambda conn, n: (conn.sendall(b"X" * 200), time.sleep(0.2), conn.close()))
    with pytest.raises(VMError, match="reply too long"):
        vsock.connect(srv.path, 1024, timeout=0.3, interval=0.05)
