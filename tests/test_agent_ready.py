"""AgentClient.wait_ready: a request the guest never answers costs a short try,
not a long deadline.

Right after a snapshot restore the guest side of the agent channel could drop
the host's first request (tests/test_agent_vm.py covers the agent's side). The
fake agent here reads ttrpc frames from a socket and answers only from the
second GetGuestDetails on; the host must be ready well before the 2 s that one
long deadline used to cost, and must not take the late or missing answer for
a failure.
"""

from __future__ import annotations

import socket
import threading
import time

from ember.agent.proto import agent_pb2 as pb
from ember.sandbox import agent_client
from ember.sandbox.agent_client import AgentClient
from ember.ttrpc import TYPE_REQUEST, TYPE_RESPONSE, Transport, read_frame, ttrpc_pb2, write_frame


def _fake_agent(sock: socket.socket, drop: int, seen: list[str]) -> None:
    tr = Transport(sock)
    try:
        while True:
            frame = read_frame(tr)
            if frame.type != TYPE_REQUEST:
                continue
            req = ttrpc_pb2.Request()
            req.ParseFromString(frame.payload)
            seen.append(req.method)
            if len(seen) <= drop:
                continue  # lost, as on a port the guest reopened
            details = pb.GuestDetailsResponse(kernel_release="6.1-fake", cpus=1)
            write_frame(tr, frame.stream_id, TYPE_RESPONSE,
                        ttrpc_pb2.Response(payload=details.SerializeToString())
                        .SerializeToString())
    except Exception:  # noqa: BLE001 - the host closed the connection
        return


def _ready_after_dropping(drop: int, timeout: float = 30.0) -> tuple[float, list[str]]:
    host, guest = socket.socketpair()
    seen: list[str] = []
    t = threading.Thread(target=_fake_agent, args=(guest, drop, seen), daemon=True)
    t.start()
    client = AgentClient(host)
    try:
        started = time.monotonic()
        details = client.wait_ready(timeout)
        took = time.monotonic() - started
        assert details.kernel_release == "6.1-fake"
        return took, seen
    finally:
        client.close()
        guest.close()


def test_a_dropped_first_request_costs_a_short_try():
    took, seen = _ready_after_dropping(1)
    assert seen == ["GetGuestDetails", "GetGuestDetails"]
    assert agent_client.READY_FIRST_TRY_S <= took < 1.0, took


def test_tries_grow_so_a_slow_guest_is_not_flooded():
    took, seen = _ready_after_dropping(4)
    # 0.25 + 0.5 + 1 + 2 s of tries (plus short pauses) before the fifth answers
    assert len(seen) == 5
    assert 3.75 <= took < 6.0, took


def test_no_answer_at_all_ends_at_the_deadline():
    host, guest = socket.socketpair()
    seen: list[str] = []
    threading.Thread(target=_fake_agent, args=(guest, 10**6, seen), daemon=True).start()
    client = AgentClient(host)
    try:
        started = time.monotonic()
        try:
            client.wait_ready(1.5)
        except agent_client.AgentError as exc:
            assert "did not answer within 1.5s" in str(exc)
        else:
            raise AssertionError("wait_ready answered without an agent")
        assert 1.4 <= time.monotonic() - started < 2.5
        assert 2 <= len(seen) <= 4
    finally:
        client.close()
        guest.close()
