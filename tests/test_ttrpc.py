"""ember.ttrpc over real socket pairs: framing, concurrency, errors, limits."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from ember import ttrpc
from ember.ttrpc import ttrpc_pb2

SVC = "test.v1.Echo"


class _Echo:
    """A service with a slow and a fast method, to show calls do not queue."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Echo(self, req: ttrpc_pb2.KeyValue, ctx: ttrpc.Context) -> ttrpc_pb2.KeyValue:
        meta = ",".join(ctx.metadata.get("who", []))
        return ttrpc_pb2.KeyValue(key=req.key, value=f"{req.value}|{meta}|{ctx.stream_id}")

    def Slow(self, req: ttrpc_pb2.KeyValue, ctx: ttrpc.Context) -> ttrpc_pb2.KeyValue:
        self.release.wait(10)
        return ttrpc_pb2.KeyValue(key="slow")

    def Fail(self, req: ttrpc_pb2.KeyValue, ctx: ttrpc.Context) -> ttrpc_pb2.KeyValue:
        if req.key == "boom":
            raise RuntimeError("it broke")
        raise ttrpc.TTRPCError(ttrpc.Code.NOT_FOUND, f"no such thing: {req.key}")

    def Deadline(self, req: ttrpc_pb2.KeyValue, ctx: ttrpc.Context) -> ttrpc_pb2.KeyValue:
        return ttrpc_pb2.KeyValue(value=str(ctx.timeout_nano))


@pytest.fixture
def pair():
    """A served connection: (client, server, impl) over a socketpair."""
    a, b = socket.socketpair()
    server = ttrpc.Server()
    impl = _Echo()
    methods = {m: ttrpc_pb2.KeyValue for m in ("Echo", "Slow", "Fail", "Deadline")}
    server.register_service(SVC, impl, methods)
    server.register(SVC, "Raw", lambda data, ctx: data[::-1])
    t = threading.Thread(target=server.serve_transport, args=(b,), daemon=True)
    t.start()
    client = ttrpc.Client(a)
    try:
        yield client, server, impl
    finally:
        impl.release.set()
        client.close()
        server.shutdown()
        t.join(5)
        assert not t.is_alive(), "serve_transport did not return after shutdown"


def test_roundtrip_message_and_metadata(pair):
    client, _, _ = pair
    out = client.call(SVC, "Echo", ttrpc_pb2.KeyValue(key="k", value="v"),
                      ttrpc_pb2.KeyValue, metadata={"who": ["a", "b"]})
    assert out.key == "k"
    assert out.value == "v|a,b|1"
    assert client.call(SVC, "Raw", b"abc") == b"cba"
    # stream ids are odd and increasing
    out = client.call(SVC, "Echo", ttrpc_pb2.KeyValue(), ttrpc_pb2.KeyValue)
    assert out.value.endswith("|5")


def test_timeout_travels_as_timeout_nano(pair):
    client, _, _ = pair
    out = client.call(SVC, "Deadline", b"", ttrpc_pb2.KeyValue, timeout=2.5)
    assert int(out.value) == 2_500_000_000


def test_slow_call_does_not_block_fast_one(pair):
    client, _, impl = pair
    result = {}

    def slow():
        result["slow"] = client.call(SVC, "Slow", b"", ttrpc_pb2.KeyValue)
        result["slow_done"] = time.monotonic()

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.1)
    fast = client.call(SVC, "Echo", ttrpc_pb2.KeyValue(value="x"), ttrpc_pb2.KeyValue, timeout=2)
    fast_done = time.monotonic()
    assert fast.value.startswith("x|")
    assert "slow" not in result  # answered out of order, slow still pending
    impl.release.set()
    t.join(5)
    assert result["slow"].key == "slow"
    assert result["slow_done"] > fast_done


def test_many_concurrent_calls(pair):
    client, _, _ = pair
    errors = []

    def worker(n):
        try:
            for i in range(20):
                v = f"{n}-{i}"
                out = client.call(SVC, "Echo", ttrpc_pb2.KeyValue(value=v), ttrpc_pb2.KeyValue)
                assert out.value.split("|")[0] == v
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []


def test_unknown_method_and_service_are_unimplemented(pair):
    client, _, _ = pair
    with pytest.raises(ttrpc.TTRPCError) as e:
        client.call(SVC, "Nope", b"")
    assert e.value.code == 12 and "Nope" in e.value.message
    with pytest.raises(ttrpc.TTRPCError) as e:
        client.call("other.Service", "Echo", b"")
    assert e.value.code == 12 and "other.Service" in e.value.message


def test_error_status_propagates(pair):
    client, _, _ = pair
    with pytest.raises(ttrpc.TTRPCError) as e:
        client.call(SVC, "Fail", ttrpc_pb2.KeyValue(key="cat"))
    assert e.value.code == ttrpc.Code.NOT_FOUND
    assert e.value.message == "no such thing: cat"
    with pytest.raises(ttrpc.TTRPCError) as e:
        client.call(SVC, "Fail", ttrpc_pb2.KeyValue(key="boom"))
    assert e.value.code == ttrpc.Code.UNKNOWN and e.value.message == "it broke"
    # a garbage request message is InvalidArgument, and the connection lives on
    with pytest.raises(ttrpc.TTRPCError) as e:
        client.call(SVC, "Echo", b"\xff\xff\xff")
    assert e.value.code == ttrpc.Code.INVALID_ARGUMENT
    assert client.call(SVC, "Raw", b"ok") == b"ko"


def test_large_payload_near_limit(pair):
    client, _, _ = pair
    blob = os.urandom(ttrpc.MAX_PAYLOAD - 64)  # leaves room for the Request envelope
    assert client.call(SVC, "Raw", blob) == blob[::-1]


def test_oversize_request_rejected_locally(pair):
    client, _, _ = pair
    with pytest.raises(ttrpc.FrameTooLarge) as e:
        client.call(SVC, "Raw", b"x" * ttrpc.MAX_PAYLOAD)
    assert e.value.code == ttrpc.Code.RESOURCE_EXHAUSTED
    assert client.call(SVC, "Raw", b"still") == b"llits"


def test_oversize_frame_from_peer_gets_resource_exhausted():
    """A peer that ignores the limit gets code 8 for that stream, not a dead link."""
    a, b = socket.socketpair()
    server = ttrpc.Server()
    server.register(SVC, "Raw", lambda data, ctx: data)
    t = threading.Thread(target=server.serve_transport, args=(b,), daemon=True)
    t.start()
    try:
        tr = ttrpc.Transport(sock=a)
        big = ttrpc.MAX_PAYLOAD + 1
        tr.write_all(struct.pack(">IIBB", big, 7, ttrpc.TYPE_REQUEST, 0) + b"\0" * big)
        frame = ttrpc.read_frame(tr)
        assert frame.stream_id == 7 and frame.type == ttrpc.TYPE_RESPONSE
        resp = ttrpc_pb2.Response.FromString(frame.payload)
        assert resp.status.code == 8
        req = ttrpc_pb2.Request(service=SVC, method="Raw", payload=b"after")
        ttrpc.write_frame(tr, 9, ttrpc.TYPE_REQUEST, req.SerializeToString())
        frame = ttrpc.read_frame(tr)
        assert frame.stream_id == 9
        assert ttrpc_pb2.Response.FromString(frame.payload).payload == b"after"
    finally:
        a.close()
        server.shutdown()
        t.join(5)


def test_peer_closing_fails_pending_calls():
    a, b = socket.socketpair()
    server = ttrpc.Server()
    gate = threading.Event()
    server.register(SVC, "Block", lambda data, ctx: gate.wait(10) and b"")
    t = threading.Thread(target=server.serve_transport, args=(b,), daemon=True)
    t.start()
    client = ttrpc.Client(a)
    errs = []

    def call():
        try:
            client.call(SVC, "Block", b"")
        except ConnectionError as e:
            errs.append(e)

    callers = [threading.Thread(target=call) for _ in range(3)]
    for c in callers:
        c.start()
    time.sleep(0.2)
    server.shutdown()  # drops the connection under the pending calls
    for c in callers:
        c.join(5)
    gate.set()
    assert len(errs) == 3 and all(isinstance(e, ttrpc.ConnectionClosed) for e in errs)
    with pytest.raises(ttrpc.ConnectionClosed):
        client.call(SVC, "Block", b"")
    client.close()
    t.join(5)


def test_peer_closing_mid_frame_is_clean():
    """A torn frame ends serve_transport quietly instead of raising."""
    a, b = socket.socketpair()
    server = ttrpc.Server()
    done = threading.Event()

    def serve():
        server.serve_transport(b)
        done.set()

    threading.Thread(target=serve, daemon=True).start()
    a.sendall(struct.pack(">IIBB", 100, 1, ttrpc.TYPE_REQUEST, 0) + b"partial")
    a.close()
    assert done.wait(5)
    with pytest.raises(ttrpc.ConnectionClosed) as e:
        c, d = socket.socketpair()
        c.sendall(b"\0\0\0")
        c.close()
        ttrpc.read_frame(ttrpc.Transport(sock=d))
    assert e.value.mid_frame


def test_fd_transport_with_partial_reads():
    """Raw fds (virtio-serial style) work, even when bytes dribble in."""
    r1, w1 = os.pipe()  # client -> server
    r2, w2 = os.pipe()  # server -> client
    req = ttrpc_pb2.Request(service=SVC, method="Raw", payload=b"hello").SerializeToString()
    frame = ttrpc.encode_frame(1, ttrpc.TYPE_REQUEST, req)

    class Split(ttrpc.Transport):
        def read_some(self, n):
            return super().read_some(1)

        def write_all(self, data):
            os.write(w2, data)

    server = ttrpc.Server()
    server.register(SVC, "Raw", lambda data, ctx: data.upper())
    t = threading.Thread(target=server.serve_transport, args=(Split(fd=r1),), daemon=True)
    t.start()
    for i in range(0, len(frame), 3):
        os.write(w1, frame[i:i + 3])
        time.sleep(0.001)
    got = ttrpc.read_frame(ttrpc.Transport(fd=r2))
    assert ttrpc_pb2.Response.FromString(got.payload).payload == b"HELLO"
    os.close(w1)
    t.join(5)
    assert not t.is_alive()
    os.close(r2)
    os.close(w2)


def test_serve_unix_and_connect(tmp_path):
    path = str(tmp_path / "s.sock")
    server = ttrpc.Server()
    server.register(SVC, "Raw", lambda data, ctx: data * 2)
    ready = threading.Event()
    t = threading.Thread(target=server.serve_unix, args=(path, ready), daemon=True)
    t.start()
    assert ready.wait(5)
    with ttrpc.Client.connect_unix(path, timeout=2) as c1, \
            ttrpc.Client.connect_unix(path, timeout=2) as c2:
        assert c1.call(SVC, "Raw", b"a") == b"aa"
        assert c2.call(SVC, "Raw", b"b") == b"bb"
    server.shutdown()
    t.join(5)
    assert not t.is_alive() and not os.path.exists(path)
    with pytest.raises(ConnectionError, match="s.sock"):
        ttrpc.Client.connect_unix(path, timeout=0.2)


def test_client_call_timeout(pair):
    client, _, impl = pair
    start = time.monotonic()
    with pytest.raises(ttrpc.TTRPCError) as e:
        client.call(SVC, "Slow", b"", timeout=0.3)
    assert e.value.code == ttrpc.Code.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 2
    impl.release.set()
    assert client.call(SVC, "Raw", b"x", timeout=2) == b"x"


def test_close_releases_a_writer_stuck_on_a_full_fd():
    """A virtio-serial write blocks while the host is away; close must still work."""
    r, w = os.pipe()
    tr = ttrpc.Transport(fd=w)
    errors = []

    def writer():
        try:
            ttrpc.write_frame(tr, 1, ttrpc.TYPE_REQUEST, b"x" * (1 << 20))  # > pipe buffer
        except ConnectionError as e:
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()  # stuck: nobody reads
    start = time.monotonic()
    tr.close()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - start < 2
    assert isinstance(errors[0], ttrpc.ConnectionClosed)
    os.close(r)
    with pytest.raises(ttrpc.ConnectionClosed):
        ttrpc.write_frame(tr, 3, ttrpc.TYPE_REQUEST, b"late")


def test_client_close_wakes_fd_reader():
    r, w = os.pipe()
    client = ttrpc.Client(ttrpc.Transport(fd=r))
    start = time.monotonic()
    client.close()
    client._reader.join(5)
    assert not client._reader.is_alive() and time.monotonic() - start < 2
    with pytest.raises(ttrpc.ConnectionClosed):
        client.call(SVC, "Raw", b"x")
    os.close(w)


def _switches(tid: int) -> int:
    """How often a thread of ours went to sleep and was woken (voluntary switches)."""
    with open(f"/proc/self/task/{tid}/status") as f:
        return next(int(line.split()[1]) for line in f
                    if line.startswith("voluntary_ctxt_switches:"))


def test_idle_fd_reader_sleeps_until_data_or_close():
    """The guest agent reads its channel this way: idle, it must not wake up on
    its own (under TCG each wake-up of an idle VM is host CPU), yet a frame or
    a close must still reach it at once."""
    r, w = os.pipe()
    tr = ttrpc.Transport(fd=r)
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(tr.read_some(10)))
    t.start()
    time.sleep(0.2)
    before = _switches(t.native_id)
    time.sleep(1.2)
    assert _switches(t.native_id) - before <= 1  # a 200 ms poll slice made 6
    os.write(w, b"hello")
    t.join(5)
    assert got == [b"hello"]
    t = threading.Thread(target=lambda: got.append(tr.read_some(10)))
    t.start()
    time.sleep(0.2)
    start = time.monotonic()
    tr.close()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - start < 1
    assert got[-1] == b""
    os.close(w)


def test_concurrent_closes_of_an_fd_transport_close_once():
    """The agent's server shutdown and a connection's own end can close one
    transport at the same time: neither may fail or close a descriptor twice."""
    for _ in range(50):
        r, w = os.pipe()
        tr = ttrpc.Transport(fd=r)
        wake = tr._wake
        errors: list[BaseException] = []
        go = threading.Barrier(4)

        def close(tr=tr, go=go, errors=errors):
            go.wait()
            try:
                tr.close()
            except BaseException as e:  # noqa: BLE001 - any failure is the finding
                errors.append(e)

        threads = [threading.Thread(target=close) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        assert errors == []
        for fd in (r, wake):
            with pytest.raises(OSError):
                os.fstat(fd)
        os.close(w)


def _pb_string(field: int, value: str) -> bytes:
    data = value.encode()
    return bytes([field << 3 | 2, len(data)]) + data


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("containerd-shim-runc-v2"),
                    reason="needs root and containerd-shim-runc-v2")
@pytest.mark.timeout(60)
def test_interop_with_containerd_go_ttrpc(tmp_path):
    """Our client against containerd's own ttrpc server (the runc shim)."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    os.mkfifo(bundle / "log")  # the shim writes its log here and waits for a reader
    log_reader = threading.Thread(target=lambda: (bundle / "log").read_bytes(), daemon=True)
    log_reader.start()
    shim_id = f"ember-interop-{os.getpid()}"
    out = subprocess.run(
        ["containerd-shim-runc-v2", "-namespace", "embertest", "-address",
         str(tmp_path / "containerd.sock"), "-publish-binary", "/bin/true", "-id", shim_id,
         "start"], cwd=bundle, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    address = out.stdout.strip().removeprefix("unix://")
    client = ttrpc.Client.connect_unix(address, timeout=5)
    shim_pid = 0
    try:
        resp = client.call("containerd.task.v2.Task", "Connect", _pb_string(1, shim_id),
                           timeout=5)
        assert resp[0] == 0x08  # ConnectResponse.shim_pid, a varint
        shim_pid, shift = 0, 0
        for byte in resp[1:]:
            shim_pid |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        assert os.path.exists(f"/proc/{shim_pid}")
        with pytest.raises(ttrpc.TTRPCError) as e:
            client.call("containerd.task.v2.Task", "NoSuch", b"", timeout=5)
        assert e.value.code == ttrpc.Code.UNIMPLEMENTED
        with pytest.raises(ttrpc.TTRPCError) as e:
            client.call("containerd.task.v2.Task", "State", _pb_string(1, "nope"), timeout=5)
        assert e.value.code == ttrpc.Code.NOT_FOUND
        # ShutdownRequest{id, now: true}: the shim exits and drops the connection
        try:
            client.call("containerd.task.v2.Task", "Shutdown",
                        _pb_string(1, shim_id) + b"\x10\x01", timeout=5)
        except ttrpc.ConnectionClosed:
            pass
    finally:
        client.close()
        deadline = time.monotonic() + 5
        while shim_pid and os.path.exists(f"/proc/{shim_pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        if shim_pid and os.path.exists(f"/proc/{shim_pid}"):
            os.kill(shim_pid, signal.SIGKILL)
        if os.path.exists(address):
            os.unlink(address)


def test_after_response_hook_runs_once_the_answer_is_sent(pair):
    client, server, _ = pair
    seen = []

    def handler(data, ctx):
        ctx.call_after_response(lambda: seen.append("after"))
        seen.append("handler")
        return b"ok"

    server.register(SVC, "Hook", handler)
    assert client.call(SVC, "Hook", b"") == b"ok"
    deadline = time.monotonic() + 2
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == ["handler", "after"]


def test_concurrent_large_answers_do_not_interleave(pair):
    client, server, _ = pair
    server.register(SVC, "Blob", lambda data, ctx: data * (1 << 20))
    results = {}

    def call(c: bytes):
        results[c] = client.call(SVC, "Blob", c, timeout=30)

    threads = [threading.Thread(target=call, args=(bytes([65 + i]),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert {k: v == k * (1 << 20) for k, v in results.items()} == {bytes([65 + i]): True
                                                                  for i in range(4)}
