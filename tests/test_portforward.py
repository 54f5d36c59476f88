"""kubectl port-forward into Ember pods (issue 10, point 6).

Unit tests (no VM): the /proc/net/tcp parser, the agent's connection table
(ember.agent.portfwd) against real sockets, and the shim's forwarder
(ember.shim.portforward) serving a "guest" port inside a network namespace the
test makes, with an in-process agent stand-in backed by the real table.

VM tests through containerd's CRI plugin: a pod runs busybox httpd; the page
is fetched from 127.0.0.1:PORT inside the pod's host-side network namespace
(where containerd's PortForward dials), then through the CRI PortForward RPC
itself with crictl; a port nobody listens on fails fast; after the pod is
removed no shim, VM or listener is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from ember.agent import portfwd
from ember.agent.proto import agent_pb2 as pb
from ember.shim import portforward
from ember.ttrpc import Code, TTRPCError

# -- the /proc/net/tcp parser ---------------------------------------------------------

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0
   1: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0
   2: 0500590A:C350 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0
   3: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0
   4: garbage
   5: 0100007F:0000 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5 1 0
"""

TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 0
   1: 00000000000000000000000001000000:1BB1 00000000000000000000000000000000:0000 0A 0
   2: 0000000000000000FFFF00000500590A:01BB 00000000000000000000000000000000:0000 0A 0
   3: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:9C40 01 0
"""


def test_parser_finds_listen_sockets_on_any_address() -> None:
    assert portfwd.parse_listeners(TCP) == [
        ("0.0.0.0", 8080), ("127.0.0.1", 53), ("10.89.0.5", 50000), ("127.0.0.1", 0)]
    assert portfwd.parse_listeners(TCP6) == [
        ("::", 80), ("::1", 7089), ("::ffff:10.89.0.5", 443)]
    assert portfwd.parse_listeners("") == []


def test_listening_ports_merges_files_and_drops_port_zero(tmp_path) -> None:
    (tmp_path / "tcp").write_text(TCP)
    (tmp_path / "tcp6").write_text(TCP6)
    paths = (str(tmp_path / "tcp"), str(tmp_path / "tcp6"), str(tmp_path / "missing"))
    assert portfwd.listening_ports(paths) == [53, 80, 443, 7089, 8080, 50000]


def test_listening_ports_sees_a_real_listener() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        assert port in portfwd.listening_ports()
    with socket.socket() as s:  # bound, not listening: not a port to forward
        s.bind(("127.0.0.1", 0))
        assert s.getsockname()[1] not in portfwd.listening_ports()


def test_connect_candidates() -> None:
    found = [("0.0.0.0", 80), ("10.0.0.5", 81), ("::", 81), ("fe80::1", 81), ("10.0.0.6", 82)]
    assert portfwd.connect_candidates(80, found) == ["127.0.0.1", "::1"]
    assert portfwd.connect_candidates(81, found) == ["127.0.0.1", "::1", "10.0.0.5"]


# -- the agent's connection table -----------------------------------------------------


@contextlib.contextmanager
def tcp_server(handler, host: str = "127.0.0.1"):
    """A one-connection-at-a-time server in a thread; yields its port."""
    srv = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host
                               else socket.AF_INET)
    stop = threading.Event()

    def loop() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(30)
                try:
                    handler(conn)
                except OSError:
                    pass

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()


def echo_until_eof(conn: socket.socket) -> None:
    """Echo everything, upper-cased, then close after the peer's half-close."""
    while data := conn.recv(65536):
        conn.sendall(data.upper())
    conn.sendall(b"BYE")


def read_all(table: portfwd.PortTable, cid: str, timeout: float = 10) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data, eof = table.read(cid, 0, 500)
        out += data
        if eof:
            return out
    raise AssertionError(f"no EOF; got {out!r}")


def portfwd_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("portfwd")]


def test_table_round_trip_with_half_close() -> None:
    table = portfwd.PortTable()
    with tcp_server(echo_until_eof) as port:
        cid = table.connect(port)
        assert cid.startswith(f"{port}-")
        table.write(cid, b"hello ")
        table.write(cid, b"guest", close_write=True)  # the server sees EOF, answers, closes
        assert read_all(table, cid) == b"HELLO GUESTBYE"
        data, eof = table.read(cid, 0, 0)
        assert (data, eof) == (b"", True)
        table.close(cid)
        table.close(cid)  # idempotent
    with pytest.raises(TTRPCError) as e:
        table.read(cid, 0, 0)
    assert e.value.code == Code.NOT_FOUND
    assert len(table) == 0 and not portfwd_threads()


def test_table_reaches_an_ipv6_only_listener() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        srv = tcp_server(lambda c: c.sendall(b"six"), host="::1")
        port = srv.__enter__()
    except OSError:
        pytest.skip("no ::1 here")
    try:
        table = portfwd.PortTable()
        cid = table.connect(port)
        assert read_all(table, cid) == b"six"
        table.close(cid)
    finally:
        srv.__exit__(None, None, None)


def test_refused_port_is_a_clear_error_at_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, nobody listens
        table = portfwd.PortTable()
        t0 = time.monotonic()
        with pytest.raises(TTRPCError) as e:
            table.connect(port)
    assert time.monotonic() - t0 < 2
    assert e.value.code == Code.UNAVAILABLE
    assert f"port {port}" in e.value.message and "refused" in e.value.message
    for bad in (0, 70000):
        with pytest.raises(TTRPCError) as e:
            table.connect(bad)
        assert e.value.code == Code.INVALID_ARGUMENT
    assert len(table) == 0


def test_buffer_is_bounded_and_drains() -> None:
    blob = os.urandom(3 << 20)
    table = portfwd.PortTable(buffer_limit=256 << 10)
    with tcp_server(lambda c: c.sendall(blob)) as port:
        cid = table.connect(port)
        conn = table._get(cid)
        time.sleep(0.5)  # the reader fills the buffer, then must wait
        with conn.cond:
            assert 0 < len(conn.buf) <= 256 << 10
        got = bytearray()
        while True:
            data, eof = table.read(cid, 100_000, 2000)
            assert len(data) <= 100_000
            got += data
            if eof:
                break
        assert bytes(got) == blob
        table.close(cid)
    assert not portfwd_threads()


def test_read_waits_then_times_out_and_close_wakes_it() -> None:
    hold = threading.Event()
    table = portfwd.PortTable()
    with tcp_server(lambda c: hold.wait(10)) as port:
        cid = table.connect(port)
        t0 = time.monotonic()
        assert table.read(cid, 0, 300) == (b"", False)
        assert 0.25 < time.monotonic() - t0 < 2
        result: list = []
        reader = threading.Thread(target=lambda: result.append(table.read(cid, 0, 20_000)))
        reader.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        table.close(cid)
        reader.join(5)
        assert result == [(b"", True)] and time.monotonic() - t0 < 2
        hold.set()
    assert not portfwd_threads()


def test_connection_limit_and_idle_sweep() -> None:
    table = portfwd.PortTable(max_conns=2, idle_timeout=0.5)
    with socket.create_server(("127.0.0.1", 0), backlog=8) as srv:
        port = srv.getsockname()[1]  # the backlog accepts; nobody needs to call accept()
        a, b = table.connect(port), table.connect(port)
        with pytest.raises(TTRPCError) as e:
            table.connect(port)
        assert e.value.code == Code.RESOURCE_EXHAUSTED and f"port {port}" in e.value.message
        time.sleep(0.7)
        table.read(a, 0, 0)  # a is in use, b is idle
        assert table.list_ports()  # any call sweeps
        assert len(table) == 1
        with pytest.raises(TTRPCError):
            table.write(b, b"x")
        table.connect(port)  # room again
        table.close_all()
        assert len(table) == 0
    assert not portfwd_threads()


def test_write_after_guest_close_is_an_error() -> None:
    table = portfwd.PortTable()
    with tcp_server(lambda c: None) as port:  # accepts and closes at once
        cid = table.connect(port)
        assert read_all(table, cid) == b""
        with pytest.raises(TTRPCError) as e:
            for _ in range(50):  # the first writes may still land in the socket buffer
                table.write(cid, b"x" * 65536)
                time.sleep(0.02)
        assert e.value.code == Code.UNAVAILABLE
        table.close(cid)


# -- the shim's forwarder, in a namespace the test makes ------------------------------


class TableAgent:
    """The AgentClient calls the forwarder makes, answered by a real PortTable in this
    process (this network namespace plays the guest's)."""

    def __init__(self) -> None:
        self.table = portfwd.PortTable()
        self.ports: list[int] = []
        self.calls = 0

    def list_ports(self) -> list[int]:
        self.calls += 1
        return list(self.ports)

    def port_connect(self, port: int) -> str:
        return self.table.connect(port)

    def port_write(self, conn_id: str, data: bytes, close_write: bool = False) -> None:
        self.table.write(conn_id, data, close_write)

    def port_read(self, conn_id: str, wait_ms: int = 1000, max_bytes: int = 0):
        data, eof = self.table.read(conn_id, max_bytes, wait_ms)
        return pb.PortReadResponse(data=data, eof=eof)

    def port_close(self, conn_id: str) -> None:
        self.table.close(conn_id)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


@pytest.fixture
def netns():
    name = f"emb-pf-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def dial(netns: str, port: int, host: str = "127.0.0.1") -> socket.socket:
    """A client socket connected from inside netns (as containerd's PortForward dials)."""
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            s.settimeout(5)
            s.connect((host, port))
        except OSError:
            s.close()
            raise
        return s

    return portforward.in_netns(netns, connect)


def recv_all(s: socket.socket, timeout: float = 10) -> bytes:
    s.settimeout(timeout)
    out = b""
    while data := s.recv(65536):
        out += data
    return out


def wait_for(cond, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def netns_listeners(netns: str) -> str:
    return subprocess.run(["nsenter", f"--net={netns}", "ss", "-Htln"], capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.root
@needs_root
def test_forwarder_serves_guest_ports_in_the_netns(netns) -> None:
    agent = TableAgent()
    fwd = portforward.PortForwarder(agent, netns, poll_interval=0.1)
    with tcp_server(echo_until_eof) as port, socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]  # listed, but nothing accepts it "in the guest"
        # A port already taken in the netns: logged and skipped, nothing breaks.
        taken = portforward.in_netns(netns, lambda: socket.create_server(("127.0.0.1", 0)))
        taken_port = taken.getsockname()[1]
        agent.ports = [0, port, dead_port, taken_port, 70000]
        fwd.start()
        try:
            assert wait_for(lambda: fwd.ports == sorted([port, dead_port])), fwd.ports
            time.sleep(0.3)
            assert taken_port not in fwd.ports  # not even on ::1: 127.0.0.1 is what CRI dials

            with dial(netns, port) as c:
                c.sendall(b"through the forwarder")
                c.shutdown(socket.SHUT_WR)  # half-close reaches the guest side
                assert recv_all(c) == b"THROUGH THE FORWARDERBYE"
            # ::1 too, when the namespace has IPv6
            if "[::1]" in netns_listeners(netns):
                with dial(netns, port, "::1") as c:
                    c.sendall(b"six")
                    c.shutdown(socket.SHUT_WR)
                    assert recv_all(c) == b"SIXBYE"
            # several at once, big payloads both ways
            blob = os.urandom(2 << 20)
            results: list[bytes] = []

            def big() -> None:
                with dial(netns, port) as c:
                    sender = threading.Thread(target=lambda: (c.sendall(blob),
                                                              c.shutdown(socket.SHUT_WR)))
                    sender.start()
                    results.append(recv_all(c, 60))
                    sender.join()

            workers = [threading.Thread(target=big) for _ in range(3)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(90)
            assert results == [blob.upper() + b"BYE"] * 3

            # Nothing accepts in the "guest": the client sees a closed connection, quickly.
            t0 = time.monotonic()
            with dial(netns, dead_port) as c:
                assert recv_all(c, 5) == b""
            assert time.monotonic() - t0 < 3

            # A port that stops listening in the guest loses its listener.
            agent.ports = [port]
            assert wait_for(lambda: fwd.ports == [port])
            assert f"127.0.0.1:{dead_port}" not in netns_listeners(netns)
        finally:
            fwd.stop()
            taken.close()
    assert f":{port}" not in netns_listeners(netns)
    assert not portfwd_threads(), portfwd_threads()
    assert len(agent.table) == 0
    calls = agent.calls
    time.sleep(0.3)
    assert agent.calls == calls, "still polling after stop()"


@pytest.mark.root
@needs_root
def test_forwarder_stop_ends_open_connections(netns) -> None:
    agent = TableAgent()
    hold = threading.Event()
    with tcp_server(lambda c: (c.sendall(b"hi"), hold.wait(30))) as port:
        agent.ports = [port]
        fwd = portforward.PortForwarder(agent, netns, poll_interval=0.1).start()
        try:
            assert wait_for(lambda: fwd.ports == [port])
            c = dial(netns, port)
            c.settimeout(5)
            assert c.recv(2) == b"hi"
        finally:
            t0 = time.monotonic()
            fwd.stop()
            stopped = time.monotonic() - t0
        with c:
            assert c.recv(10) == b""  # closed by stop()
        hold.set()
    assert stopped < 3, stopped
    assert not portfwd_threads() and len(agent.table) == 0


@pytest.mark.root
@needs_root
def test_forwarder_survives_an_agent_without_ports_and_a_missing_netns(netns) -> None:
    class Old(TableAgent):
        def list_ports(self) -> list[int]:
            self.calls += 1
            raise type("E", (Exception,), {"code": Code.UNIMPLEMENTED})("no ListPorts")

    old = Old()
    fwd = portforward.PortForwarder(old, netns, poll_interval=0.05).start()
    time.sleep(0.3)
    fwd.stop()
    assert old.calls == 1  # gave up after the first UNIMPLEMENTED

    agent = TableAgent()
    with tcp_server(echo_until_eof) as port:
        agent.ports = [port]
        fwd = portforward.PortForwarder(agent, "/run/netns/does-not-exist", 0.05).start()
        time.sleep(0.3)
        assert fwd.ports == []
        fwd.stop()
    assert not portfwd_threads()


# -- through containerd's CRI plugin, with a real pod VM -------------------------------

CRICTL = "/work/shared/conformance/critest/crictl"
POD_SUBNET = "10.77.9.0/24"  # not test_cri's: both may run at once on one machine
HTTP_PORT = 8080
PAGE = "hello from the guest"


@pytest.fixture(scope="module")
def cri(guest_assets):
    from shimtools import discard_pod, private_containerd

    from ember.cri import api_pb2 as api
    from ember.cri.client import CRIClient

    with private_containerd(cri=True) as (c, work), CRIClient(c.address) as client:
        conflist = next((work / "cni-conf").glob("*.conflist"))
        conf = json.loads(conflist.read_text())
        conf["plugins"][0]["ipam"]["subnet"] = POD_SUBNET
        tmp = conflist.with_suffix(".tmp")
        tmp.write_text(json.dumps(conf))
        os.replace(tmp, conflist)
        try:
            yield c, work, client
        finally:
            try:
                pods = client.runtime.ListPodSandbox(api.ListPodSandboxRequest()).items
            except Exception:  # noqa: BLE001 - containerd is stopped below anyway
                pods = []
            for pod in pods:
                discard_pod(client, pod.id)


def _pod_netns(client, pod: str) -> str:
    from ember.cri import api_pb2 as api

    resp = client.runtime.PodSandboxStatus(
        api.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=30)
    spec = json.loads(resp.info["info"])["runtimeSpec"]
    return next(ns["path"] for ns in spec["linux"]["namespaces"] if ns["type"] == "network")


def _http_get(s: socket.socket, path: str = "/index.html") -> str:
    s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    return recv_all(s, 30).decode(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.containerd
@pytest.mark.timeout(900)
def test_cri_port_forward_reaches_the_guest(cri) -> None:
    from shimtools import BUSYBOX, discard_pod, leftovers, shims, vmms

    c, work, client = cri
    pod = client.run_pod("ember-pf", runtime_handler="ember")
    netns = ""
    try:
        netns = _pod_netns(client, pod)
        assert client.pod_status(pod).network.ip.startswith("10.77.9."), "CNI subnet"
        cid = client.create_container(pod, "web", BUSYBOX, [
            "sh", "-c", f"mkdir -p /www && echo '{PAGE}' > /www/index.html && "
                        "seq 1 300000 > /www/big.txt && "
                        f"exec busybox httpd -f -p {HTTP_PORT} -h /www"])
        client.start_container(cid)
        # Before the forwarder picks the port up nothing listens; it polls about every 0.75 s.
        assert wait_for(lambda: f"127.0.0.1:{HTTP_PORT}" in netns_listeners(netns), 60), \
            netns_listeners(netns)

        # 1. Where containerd's PortForward dials: localhost:PORT in the pod's netns.
        with dial(netns, HTTP_PORT) as s:
            try:
                reply = _http_get(s)
            except OSError as exc:
                raise AssertionError(f"{exc}\n{_shim_logs(work)}") from exc
        assert reply.startswith("HTTP/1.") and " 200 " in reply.splitlines()[0], reply
        assert reply.endswith(PAGE + "\n"), reply
        with dial(netns, HTTP_PORT) as s:  # about 2 MB, many PortRead round trips
            reply = _http_get(s, "/big.txt")
        body = "".join(f"{i}\n" for i in range(1, 300001))
        assert reply.endswith("\r\n\r\n" + body), reply[:300]
        if f"[::1]:{HTTP_PORT}" in netns_listeners(netns):  # the namespace has IPv6
            with dial(netns, HTTP_PORT, "::1") as s:
                assert _http_get(s).endswith(PAGE + "\n")

        # 2. A port nobody listens on in the guest: refused at once, no hang.
        t0 = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            dial(netns, 9)
        assert time.monotonic() - t0 < 3

        # 3. The CRI PortForward RPC itself, through containerd's streaming server (crictl).
        local = _free_port()
        endpoint = f"unix://{c.address}"
        fwd = subprocess.Popen([CRICTL, "--runtime-endpoint", endpoint, "--image-endpoint",
                                endpoint, "port-forward", pod, f"{local}:{HTTP_PORT}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            def fetch() -> str:
                try:
                    with socket.create_connection(("127.0.0.1", local), 5) as s:
                        return _http_get(s)
                except OSError:
                    return ""

            assert wait_for(lambda: PAGE in fetch(), 30), "crictl port-forward never served"
            reply = fetch()
            assert " 200 " in reply.splitlines()[0] and reply.endswith(PAGE + "\n"), reply
        finally:
            fwd.terminate()
            out = fwd.communicate(timeout=10)[0]
        assert "Forwarding from" in out, out

        # 4. crictl port-forward to a port nothing listens on: the connection closes quickly.
        local = _free_port()
        fwd = subprocess.Popen([CRICTL, "--runtime-endpoint", endpoint, "--image-endpoint",
                                endpoint, "port-forward", pod, f"{local}:9"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert wait_for(lambda: _connects("127.0.0.1", local), 30)
            t0 = time.monotonic()
            with socket.create_connection(("127.0.0.1", local), 5) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                try:
                    assert recv_all(s, 10) == b""
                except ConnectionResetError:
                    pass
            assert time.monotonic() - t0 < 5
        finally:
            fwd.terminate()
            fwd.communicate(timeout=10)

        shim_pid = shims(work)[0].pid
        assert len(vmms(work)) == 1
        client.stop_pod(pod)
        client.remove_pod(pod)
        assert wait_for(lambda: not Path(f"/proc/{shim_pid}").exists(), 30), "shim still runs"
    finally:
        discard_pod(client, pod)
    assert wait_for(lambda: not leftovers(work), 30), leftovers(work)
    if os.path.exists(netns):  # CNI removes it; if not, nothing may listen in it any more
        assert f":{HTTP_PORT}" not in netns_listeners(netns)


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 2):
            return True
    except OSError:
        return False


def _shim_logs(work: Path) -> str:
    """The pod shims' logs, for failure messages."""
    return "\n".join(f"--- {p}\n{p.read_text()[-6000:]}"
                     for p in (work / "st" / "shim").glob("*/shim.log"))
