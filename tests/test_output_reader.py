"""The one guest-output reader (ember.sandbox.output): its loop and its error policy.

A fake ReadStream callable plays the agent: it answers from a script of
responses and errors, and records each call's offset and wait, so these tests
see what the reader asks for as well as what it gives back. Then the same over
a real ttrpc connection (a scripted agent service on a socketpair), through
AgentClient and through the raw client the monitor uses. The real agent is in
test_agent.py (with crun), and every caller has its own tests (run, logs,
exec, shim stdio).
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest

from ember import ttrpc
from ember.agent.proto import agent_pb2 as pb
from ember.errors import AgentError, NotFoundError
from ember.sandbox.agent_client import SERVICE, AgentClient
from ember.sandbox.monitor import PUMP_WAIT_MS, Monitor
from ember.sandbox.output import End, OutputReader, read_method
from ember.ttrpc import Code, ConnectionClosed, TTRPCError


class FakeAgent:
    """Answers ReadStream calls from a script: ReadStreamResponse or an exception."""

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.calls: list[tuple[int, int]] = []
        self.closed = False

    def read(self, offset: int, wait_ms: int) -> pb.ReadStreamResponse:
        self.calls.append((offset, wait_ms))
        if not self.script:
            raise AssertionError("read past the end of the script")
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


def chunk(data: bytes, offset: int, eof: bool = False) -> pb.ReadStreamResponse:
    return pb.ReadStreamResponse(data=data, offset=offset, eof=eof)


def test_reads_every_chunk_from_each_offset_until_eof():
    fake = FakeAgent(chunk(b"hel", 0), chunk(b"", 3), chunk(b"lo\n", 3), chunk(b"", 6, eof=True))
    reader = OutputReader(fake.read, wait_ms=1234)
    assert list(reader) == [b"hel", b"lo\n"]  # an idle poll yields nothing
    assert fake.calls == [(0, 1234), (3, 1234), (3, 1234), (6, 1234)]
    assert (reader.ended, reader.cause, reader.offset) == (End.EOF, None, 6)


def test_data_with_eof_and_a_starting_offset():
    fake = FakeAgent(chunk(b"tail", 100, eof=True))
    reader = OutputReader(fake.read, wait_ms=0, offset=100)
    assert list(reader) == [b"tail"] and fake.calls == [(100, 0)]
    assert reader.ended is End.EOF and reader.offset == 104


def test_the_agent_skipping_ahead_moves_the_offset():
    """Output the guest no longer keeps: the agent answers from its first kept byte."""
    fake = FakeAgent(chunk(b"late", 50), chunk(b"", 54, eof=True))
    assert list(OutputReader(fake.read, wait_ms=5)) == [b"late"]
    assert fake.calls == [(0, 5), (54, 5)]


@pytest.mark.parametrize("gone", [NotFoundError("process c/e not found"),
                                  TTRPCError(Code.NOT_FOUND, "container c not found")],
                         ids=["ember", "ttrpc"])
def test_process_gone_ends_quietly_after_what_was_read(gone):
    fake = FakeAgent(chunk(b"some", 0), gone)
    reader = OutputReader(fake.read, wait_ms=10)
    assert list(reader) == [b"some"]
    assert reader.ended is End.GONE and reader.cause is gone


def test_connection_closed_ends_quietly():
    lost = ConnectionClosed("ttrpc connection lost")
    fake = FakeAgent(chunk(b"x", 0), lost)
    reader = OutputReader(fake.read, wait_ms=10)
    assert list(reader) == [b"x"]
    assert reader.ended is End.CLOSED and reader.cause is lost


def test_an_error_on_a_closed_connection_ends_quietly_whatever_its_type():
    """AgentClient turns a lost connection into AgentError: closed() tells them apart."""
    fake = FakeAgent(AgentError("lost the connection to the guest agent: EOF"))
    fake_closed = FakeAgent(AgentError("lost the connection to the guest agent: EOF"))
    fake_closed.closed = True
    with pytest.raises(AgentError, match="lost the connection"):
        list(OutputReader(fake.read, wait_ms=10, closed=lambda: fake.closed))
    reader = OutputReader(fake_closed.read, wait_ms=10, closed=lambda: fake_closed.closed)
    assert list(reader) == [] and reader.ended is End.CLOSED


@pytest.mark.parametrize("error", [TTRPCError(Code.DEADLINE_EXCEEDED, "timed out"),
                                   AgentError("agent says no"), OSError(5, "EIO")],
                         ids=["timeout", "agent-status", "os"])
def test_other_errors_are_raised_after_the_chunks_before_them(error):
    fake = FakeAgent(chunk(b"before", 0), error)
    reader = OutputReader(fake.read, wait_ms=10)
    got = []
    with pytest.raises(type(error)) as caught:
        for data in reader:
            got.append(data)
    assert caught.value is error and got == [b"before"]
    assert reader.ended is None  # it did not end: it failed


def test_a_bug_in_the_read_callable_is_never_retried():
    fake = FakeAgent(ValueError("bad field"))
    with pytest.raises(ValueError, match="bad field"):
        list(OutputReader(fake.read, wait_ms=10, retry=lambda exc: True))
    assert len(fake.calls) == 1


def test_retry_asks_again_from_the_same_offset():
    """The shim's paused VM: calls time out until it is resumed."""
    timeout = TTRPCError(Code.DEADLINE_EXCEEDED, "timed out")
    fake = FakeAgent(chunk(b"ab", 0), timeout, timeout, chunk(b"c", 2, eof=True))
    seen: list[Exception] = []
    reader = OutputReader(fake.read, wait_ms=10, retry_delay=0,
                          retry=lambda exc: seen.append(exc) or True)
    assert list(reader) == [b"ab", b"c"] and seen == [timeout, timeout]
    assert [off for off, _ in fake.calls] == [0, 2, 2, 2]


def test_retry_that_declines_raises_and_gone_is_not_offered_to_retry():
    timeout = TTRPCError(Code.DEADLINE_EXCEEDED, "timed out")
    offered: list[Exception] = []
    with pytest.raises(TTRPCError):
        list(OutputReader(FakeAgent(timeout).read, wait_ms=10,
                          retry=lambda exc: offered.append(exc) or False))
    assert offered == [timeout]
    offered.clear()
    reader = OutputReader(FakeAgent(NotFoundError("gone")).read, wait_ms=10,
                          retry=lambda exc: offered.append(exc) or True)
    assert list(reader) == [] and reader.ended is End.GONE and offered == []


def test_stop_is_asked_before_every_call():
    fake = FakeAgent(chunk(b"1", 0), chunk(b"2", 1))
    stops = iter([False, False, True])
    reader = OutputReader(fake.read, wait_ms=10, stop=lambda: next(stops))
    assert list(reader) == [b"1", b"2"] and len(fake.calls) == 2
    assert reader.ended is End.STOPPED and reader.offset == 2


def test_read_method_names_the_agent_call():
    assert (read_method("stdout"), read_method("stderr")) == ("ReadStdout", "ReadStderr")
    with pytest.raises(ValueError, match="unknown output stream 'stdin'"):
        read_method("stdin")


class ScriptedAgentServer:
    """A real ttrpc server (over a socketpair) whose ReadStdout/ReadStderr answer from a
    script; "hang up" closes the connection instead of answering."""

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.requests: list[tuple[str, pb.ReadStreamRequest]] = []
        self.server = ttrpc.Server()
        methods = {m: pb.ReadStreamRequest for m in ("ReadStdout", "ReadStderr")}
        self.server.register_service(SERVICE, self, methods)
        self.host_end, self.guest_end = socket.socketpair()
        threading.Thread(target=self.server.serve_transport, args=(self.guest_end,),
                         daemon=True).start()

    def _answer(self, method: str, req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        self.requests.append((method, req))
        step = self.script.pop(0)
        if step == "hang up":
            self.guest_end.shutdown(socket.SHUT_RDWR)
            time.sleep(2)  # the client sees the connection go, not an answer
        if step == "too slow":
            time.sleep(1)
            step = chunk(b"late", 0)
        if isinstance(step, BaseException):
            raise step
        return step

    def ReadStdout(self, req, ctx):
        return self._answer("ReadStdout", req)

    def ReadStderr(self, req, ctx):
        return self._answer("ReadStderr", req)


def test_agent_client_over_ttrpc_process_gone():
    """iter_output: the stream's method, the long poll, max_bytes, its timeout; a NOT_FOUND
    status from the agent arrives as NotFoundError and ends the stream quietly."""
    agent = ScriptedAgentServer(chunk(b"e", 7), TTRPCError(Code.NOT_FOUND, "exec e1 not found"))
    client = AgentClient(ttrpc.Client(agent.host_end), timeout=5)
    reader = client.iter_output("c", "e1", "stderr", offset=7, wait_ms=250, max_bytes=99)
    assert list(reader) == [b"e"] and reader.ended is End.GONE
    assert isinstance(reader.cause, NotFoundError)
    (method, req), second = agent.requests
    assert (method, req.container_id, req.exec_id, req.offset, req.wait_ms, req.max_bytes
            ) == ("ReadStderr", "c", "e1", 7, 250, 99)
    assert second[1].offset == 8
    with pytest.raises(ValueError, match="unknown output stream"):
        client.iter_output("c", stream="out")
    client.close()


def test_agent_client_over_ttrpc_connection_lost_and_real_errors():
    """The client turns a lost connection into AgentError; the reader still sees it closed.
    An agent error status is raised."""
    agent = ScriptedAgentServer(chunk(b"out", 0), "hang up")
    client = AgentClient(ttrpc.Client(agent.host_end), timeout=5)
    reader = client.iter_output("c")
    assert list(reader) == [b"out"] and reader.ended is End.CLOSED
    assert isinstance(reader.cause, AgentError) and "lost the connection" in str(reader.cause)

    agent = ScriptedAgentServer(TTRPCError(Code.INTERNAL, "buffer broke"))
    client = AgentClient(ttrpc.Client(agent.host_end), timeout=5)
    with pytest.raises(AgentError, match="buffer broke"):
        list(client.iter_output("c"))
    client.close()


def test_raw_ttrpc_reader_as_the_monitor_uses_it():
    """The monitor calls the agent through the raw ttrpc client: a NOT_FOUND status and a
    closed connection mean the same there; a timed-out call is raised."""
    agent = ScriptedAgentServer(chunk(b"a", 0), TTRPCError(Code.NOT_FOUND, "gone"))
    rpc = ttrpc.Client(agent.host_end)

    def read(offset: int, wait_ms: int) -> pb.ReadStreamResponse:
        return rpc.call(SERVICE, read_method("stdout"), pb.ReadStreamRequest(
            container_id="c", offset=offset, wait_ms=wait_ms), pb.ReadStreamResponse,
            timeout=2)

    reader = OutputReader(read, wait_ms=30_000, closed=lambda: rpc.closed)
    assert list(reader) == [b"a"] and reader.ended is End.GONE
    assert agent.requests[0][1].wait_ms == 30_000

    agent.script = ["hang up"]
    reader = OutputReader(read, wait_ms=0, closed=lambda: rpc.closed)
    assert list(reader) == [] and reader.ended is End.CLOSED
    assert isinstance(reader.cause, ConnectionClosed)

    agent = ScriptedAgentServer("too slow")
    rpc = ttrpc.Client(agent.host_end)
    reader = OutputReader(lambda off, wait: rpc.call(
        SERVICE, "ReadStdout", pb.ReadStreamRequest(container_id="c", offset=off),
        pb.ReadStreamResponse, timeout=0.3), wait_ms=0, closed=lambda: rpc.closed)
    with pytest.raises(TTRPCError) as caught:
        list(reader)
    assert caught.value.code == Code.DEADLINE_EXCEEDED and reader.ended is None
    rpc.close()


class ListLog:
    """Stands for the monitor's RotatingLog: keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []

    def write(self, stream: str, data: bytes) -> None:
        self.records.append((stream, data))


def bare_monitor(rpc) -> Monitor:
    """A Monitor with only what its output pump uses (no sandbox, no VM)."""
    mon = Monitor.__new__(Monitor)
    mon.vm = SimpleNamespace(rpc=rpc)  # type: ignore[assignment]
    mon.done = threading.Event()
    mon.id = "0123456789abcdef"
    mon._complained = set()
    return mon


def test_monitor_pump_long_polls_into_the_log_until_the_process_is_gone(capsys):
    """The monitor's pump: its 30 s long poll (timeout 30 s past it) on the raw client,
    every chunk into the log; a process gone ends it without a word."""
    agent = ScriptedAgentServer(chunk(b"one\n", 0), chunk(b"", 4),
                                TTRPCError(Code.NOT_FOUND, "container c not found"))
    rpc = ttrpc.Client(agent.host_end)
    log = ListLog()
    bare_monitor(rpc)._pump("c", "stderr", log)  # type: ignore[arg-type]
    assert log.records == [("stderr", b"one\n")]
    assert [(m, r.container_id, r.offset, r.wait_ms) for m, r in agent.requests] == [
        ("ReadStderr", "c", 0, PUMP_WAIT_MS), ("ReadStderr", "c", 4, PUMP_WAIT_MS),
        ("ReadStderr", "c", 4, PUMP_WAIT_MS)]
    assert capsys.readouterr().err == ""
    rpc.close()


def test_monitor_pump_notes_a_failed_read_once_and_stops_with_the_monitor(capsys):
    agent = ScriptedAgentServer(chunk(b"x", 0), TTRPCError(Code.INTERNAL, "buffer broke"))
    rpc = ttrpc.Client(agent.host_end)
    log = ListLog()
    bare_monitor(rpc)._pump("c", "stdout", log)  # type: ignore[arg-type]
    assert log.records == [("stdout", b"x")]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "container stdout no longer copied" in err
    assert "buffer broke" in err

    mon = bare_monitor(rpc)
    mon.done.set()  # the monitor is stopping: no call at all
    mon._pump("c", "stdout", log)  # type: ignore[arg-type]
    assert len(agent.requests) == 2
    rpc.close()
