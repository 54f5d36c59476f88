"""The monitor's API is monitor.proto, served over ttrpc like the agent's (issue 12, point 3).

* What the monitor registers on api.sock is exactly what the .proto files
  declare: every method of ember.sandbox.v1.Monitor and of the forwarded
  ember.agent.v1.Agent, nothing else (read from the descriptors).
* Over a real ttrpc connection, each client call reaches the monitor's
  method with its typed arguments and brings its typed answer back; a refusal
  is the same one-line EmberError as with the JSON protocol ("Watch: the
  sandbox is stopping ..."), a lost monitor says so, a malformed request is
  INVALID_ARGUMENT.
* Wait is a long poll: "not yet" after the time asked (capped at the
  monitor's limit), the outcome once the sandbox has stopped, and every
  answer counted until it is on the wire (nothing is removed before).
* The committed generated code of every .proto (monitor_pb2 among them) is
  what scripts/gen-protos.sh makes from it now.

The real monitor over a real VM is exercised by tests/test_run.py,
tests/test_lifecycle_monitor.py and the rest of the `ember run` tests.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ember.agent.proto import AGENT_SERVICE, agent_pb2
from ember.errors import EmberError
from ember.sandbox import monitor_pb2 as pb
from ember.sandbox.monitor import WAIT_MAX_S, Monitor
from ember.sandbox.monitor_rpc import SERVICE, SERVICE_NAME, MonitorClient, MonitorService
from ember.sandbox.status import Status
from ember.ttrpc import Client, Code, Server, TTRPCError

SRC = Path(__file__).resolve().parent.parent / "src"


class RecordingServer(Server):
    """A ttrpc server that remembers what was registered on it."""

    def __init__(self) -> None:
        super().__init__()
        self.registered: list[tuple[str, str]] = []

    def register(self, service, method, handler) -> None:
        self.registered.append((service, method))
        super().register(service, method, handler)


def _bare_monitor() -> Monitor:
    """A Monitor with only what serving needs (no sandbox record, no VM)."""
    m = Monitor.__new__(Monitor)
    m.server = RecordingServer()
    m.finished = threading.Event()
    m.result = {}
    m._waits = 0
    m._waits_cv = threading.Condition()
    return m


def test_monitor_serves_exactly_what_the_protos_declare():
    m = _bare_monitor()
    m.register()
    served: dict[str, list[str]] = {}
    for service, method in m.server.registered:
        served.setdefault(service, []).append(method)
    assert SERVICE_NAME == "ember.sandbox.v1.Monitor"  # the name on the wire stays
    assert AGENT_SERVICE == "ember.agent.v1.Agent"
    declared = [meth.name for meth in SERVICE.methods]
    assert sorted(served) == sorted([SERVICE_NAME, AGENT_SERVICE])
    assert sorted(served[SERVICE_NAME]) == sorted(declared)
    assert set(declared) >= {"Status", "AttachDisk", "DetachDisk", "Watch", "Pause", "Resume",
                             "Shutdown", "Release", "Wait"}  # what the JSON protocol had
    agent = agent_pb2.DESCRIPTOR.services_by_name["Agent"]
    assert sorted(served[AGENT_SERVICE]) == sorted(meth.name for meth in agent.methods)
    # Each served method is the adapter's, with the request type the .proto names.
    for meth in SERVICE.methods:
        assert callable(getattr(MonitorService, meth.name))
        assert hasattr(pb, meth.input_type.name) and hasattr(pb, meth.output_type.name)


class FakeMonitor:
    """The monitor's Python methods, recording their calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.refuse: Exception | None = None
        self.outcome: dict | None = None
        self.hooks: list = []

    def _call(self, *call):
        self.calls.append(call)
        if self.refuse is not None:
            raise self.refuse

    def status(self):
        self._call("status")
        return 4242, True

    def attach_disk(self, path, format="raw", readonly=False, drive_id=None):
        self._call("attach_disk", path, format, readonly, drive_id)
        return drive_id or "c1", "scsi", "0:0"

    def detach_disk(self, drive_id):
        self._call("detach_disk", drive_id)

    def watch(self, container_id, auto_stop=True):
        self._call("watch", container_id, auto_stop)

    def pause(self):
        self._call("pause")

    def resume(self):
        self._call("resume")

    def shutdown(self):
        self._call("shutdown")

    def release(self):
        self._call("release")

    def wait(self, timeout, after_response):
        self._call("wait", timeout)
        after_response(lambda: self.hooks.append("answered"))
        return self.outcome


@pytest.fixture
def served():
    """(fake monitor, MonitorClient) over a real ttrpc connection (a socketpair)."""
    fake = FakeMonitor()
    server = Server()
    MonitorService(fake).register(server)
    ours, theirs = socket.socketpair()
    t = threading.Thread(target=server.serve_transport, args=(theirs,), daemon=True)
    t.start()
    rpc = Client(ours)
    yield fake, MonitorClient(rpc), rpc
    rpc.close()
    server.shutdown()
    t.join(5)


def test_every_call_is_typed_end_to_end(served):
    fake, client, _ = served
    st = client.status()
    assert (st.vmm_pid, st.restored) == (4242, True)
    dev = client.attach_disk("/x/rootfs.img", "qcow2", drive_id="rootfs")
    assert (dev.drive_id, dev.kind, dev.address) == ("rootfs", "scsi", "0:0")
    dev = client.attach_disk("/x/bind0.img", readonly=True)
    assert dev.drive_id == "c1"  # no id asked: the monitor picks one
    client.detach_disk("c1")
    client.watch("cid")
    client.watch("cid", auto_stop=False)
    client.pause()
    client.resume()
    client.release()
    client.shutdown(timeout=10)
    assert fake.calls == [
        ("status",),
        ("attach_disk", "/x/rootfs.img", "qcow2", False, "rootfs"),
        ("attach_disk", "/x/bind0.img", "raw", True, None),
        ("detach_disk", "c1"),
        ("watch", "cid", True), ("watch", "cid", False),
        ("pause",), ("resume",), ("release",), ("shutdown",),
    ]


def test_a_watch_without_auto_stop_field_stops_the_vm(served):
    fake, _, rpc = served
    rpc.call(SERVICE_NAME, "Watch", pb.WatchRequest(container_id="c"), pb.Empty, timeout=5)
    assert fake.calls == [("watch", "c", True)]


def test_wait_answers_not_yet_or_the_outcome(served):
    fake, client, _ = served
    out = client.wait(0.5)
    assert not out.exited and not out.HasField("exit_code")
    fake.outcome = {"status": Status.EXITED, "exit_code": 3, "oom_killed": True, "error": ""}
    out = client.wait(30)
    assert (out.exited, out.status, out.exit_code, out.oom_killed) == (True, "exited", 3, True)
    fake.outcome = {"status": Status.DEAD, "exit_code": None, "oom_killed": False,
                    "error": "VMM exited unexpectedly"}
    out = client.wait(30)
    assert out.exited and not out.HasField("exit_code")  # api.Sandbox.wait: 137
    assert (out.status, out.error) == ("dead", "VMM exited unexpectedly")
    assert [c[1] for c in fake.calls] == [0.5, 30, 30]
    deadline = time.monotonic() + 5
    while len(fake.hooks) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.hooks == ["answered"] * 3  # each after its answer went out


def test_refusals_are_one_line_ember_errors(served):
    fake, client, rpc = served
    fake.refuse = EmberError("the sandbox is stopping: start abandoned: its creator ended")
    with pytest.raises(EmberError) as exc:
        client.watch("cid")
    assert str(exc.value) == ("Watch: the sandbox is stopping: start abandoned: "
                              "its creator ended")
    assert exc.value.exit_code == 125
    with pytest.raises(TTRPCError) as raw:
        rpc.call(SERVICE_NAME, "Watch", pb.WatchRequest(container_id="c"), timeout=5)
    assert raw.value.code == Code.FAILED_PRECONDITION  # as with the JSON protocol
    fake.refuse = ValueError("no such format 'vhd'")
    with pytest.raises(EmberError, match=r"^AttachDisk: bad request: no such format 'vhd'$"):
        client.attach_disk("/x", "vhd")
    fake.refuse = None
    with pytest.raises(TTRPCError) as raw:  # not a WaitRequest at all
        rpc.call(SERVICE_NAME, "Wait", b"\xff\xff\xff", timeout=5)
    assert raw.value.code == Code.INVALID_ARGUMENT
    with pytest.raises(TTRPCError) as raw:
        rpc.call(SERVICE_NAME, "Frobnicate", b"", timeout=5)
    assert raw.value.code == Code.UNIMPLEMENTED


def test_a_lost_monitor_says_so():
    ours, theirs = socket.socketpair()
    rpc = Client(ours)
    theirs.close()
    with pytest.raises(EmberError, match=r"^Release: lost the sandbox monitor: "):
        MonitorClient(rpc).release()
    rpc.close()


def test_monitor_wait_long_polls_and_counts_answers():
    m = _bare_monitor()
    hooks: list = []
    began = time.monotonic()
    assert m.wait(0.3, hooks.append) is None
    assert 0.25 < time.monotonic() - began < 5
    assert m._waits == 1 and len(hooks) == 1  # answered only once the hook has run
    hooks.pop()()
    assert m._waits == 0
    m.result = {"status": Status.EXITED, "exit_code": 0, "oom_killed": False, "error": ""}
    m.finished.set()
    assert m.wait(None, hooks.append) == m.result
    assert m.wait(-5, hooks.append) == m.result  # a negative time-out: no wait at all
    m.finished.clear()
    began = time.monotonic()
    assert m.wait(-5, hooks.append) is None
    assert time.monotonic() - began < 1
    assert WAIT_MAX_S == 60.0  # what a client asking for more gets at most


@pytest.mark.parametrize("proto", sorted(str(p.relative_to(SRC)) for p in
                                         (SRC / "ember").rglob("*.proto")))
def test_generated_code_matches_its_proto(proto, tmp_path):
    """scripts/gen-protos.sh was run after the .proto last changed."""
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{SRC}",
                    f"--python_out={tmp_path}", proto], check=True, cwd=SRC)
    name = proto.removesuffix(".proto") + "_pb2.py"
    assert (tmp_path / name).read_bytes() == (SRC / name).read_bytes(), \
        f"{name} is stale: run scripts/gen-protos.sh"
