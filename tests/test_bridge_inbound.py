"""ember0 forwards into sandboxes only replies; new connections come in through -p only.

An "outside" client lives in a throwaway network namespace joined to the host
by a veth pair and routed through it (as a machine on the host's LAN would be).
Its new connection to a sandbox's bridge address is dropped, though the same
connection passes once a test rule lets it (so routing is not what stops it);
the sandbox still connects out to that client's namespace; the published port
answers both on the host's loopback and on the host address the client sees.
The rule set itself: the old broad inbound ACCEPT is removed on set-up and on
removal, and removal leaves no ember0 rule behind.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from test_run_network import bridge_left_as_found, fetch, free_port, inspect  # noqa: F401

from ember.net import bridge

pytestmark = [pytest.mark.root]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def forward_rules() -> list[str]:
    return sh("iptables", "-w", "-S", "FORWARD").stdout.splitlines()


def ember0_rules() -> list[str]:
    out = sh("iptables-save").stdout.splitlines()
    return [r for r in out if bridge.BRIDGE in r]


LEGACY = ["-o", bridge.BRIDGE, "-j", "ACCEPT"]


def test_setup_replaces_the_broad_inbound_accept_and_removal_leaves_nothing(ember_env):
    from ember.net import ipam

    cfg = ember_env.cfg()
    sh("iptables", "-w", "-A", "FORWARD", *LEGACY)  # what an older version left
    try:
        with ipam.lock(cfg):
            bridge.ensure_bridge()
            bridge.ensure_bridge()  # idempotent: no duplicate rules
        rules = forward_rules()
        assert "-A FORWARD -o ember0 -j ACCEPT" not in rules
        drop = ("-A FORWARD ! -i ember0 -o ember0 -m conntrack ! --ctstate RELATED,ESTABLISHED "
                "-j DROP")
        assert rules.count(drop) == 1 and rules[1] == drop  # first, before any host ACCEPT
        assert rules.count("-A FORWARD -i ember0 -j ACCEPT") == 1
        assert rules.count("-A FORWARD -o ember0 -m conntrack --ctstate RELATED,ESTABLISHED "
                           "-j ACCEPT") == 1
        if bridge.addresses_in_use():
            pytest.skip("ember0 is in use by other sandboxes: removal not tried")
        sh("iptables", "-w", "-A", "FORWARD", *LEGACY)  # left again (a downgrade, say)
        assert bridge.remove_bridge()
        assert ember0_rules() == []
        assert not Path(f"/sys/class/net/{bridge.BRIDGE}").exists()
    finally:
        while sh("iptables", "-w", "-C", "FORWARD", *LEGACY, check=False).returncode == 0:
            sh("iptables", "-w", "-D", "FORWARD", *LEGACY)


# ------------------------------------------------------------------ real VMs

CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.socket()
    s.settimeout(float(sys.argv[3]))
    try:
        s.connect((sys.argv[1], int(sys.argv[2])))
        s.sendall(b"GET /index.html HTTP/1.0\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        print("connected", data.split(b"\\r\\n\\r\\n", 1)[-1].decode().strip())
    except socket.timeout:
        print("timeout")
    except OSError as exc:
        print("error", exc)
""")


@pytest.fixture
def outside():
    """A netns "outside" the host: eth0 = 10.203.N.2/30, default route via the host's .1."""
    n = random.randrange(1, 250)
    name, host_if = f"embo-{uuid.uuid4().hex[:8]}", f"vo{uuid.uuid4().hex[:8]}"
    host_ip, client_ip = f"10.203.{n}.1", f"10.203.{n}.2"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        for cmd in (["addr", "add", f"{client_ip}/30", "dev", "eth0"],
                    ["link", "set", "lo", "up"], ["link", "set", "eth0", "up"],
                    ["route", "add", "default", "via", host_ip]):
            sh("ip", "-n", name, *cmd)
        yield {"netns": name, "host_ip": host_ip, "client_ip": client_ip}
    finally:
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", name, check=False)


def connect_from(ns: str, ip: str, port: int, timeout: float = 4) -> str:
    proc = sh("ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, ip, str(port),
              str(timeout))
    return proc.stdout.strip()


def wait_listening(ip: str, port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((ip, port), timeout=2).close()
            return
        except OSError:
            assert proc.poll() is None, "the outside server died"
            assert time.monotonic() < deadline, f"nothing listens on {ip}:{port}"
            time.sleep(0.2)


@pytest.mark.vm
@pytest.mark.timeout(600)
def test_new_connections_from_outside_are_dropped_but_p_and_outbound_work(
        ember_env, image, outside, tmp_path):
    ns, host_ip, client_ip = outside["netns"], outside["host_ip"], outside["client_ip"]
    lo_port, lan_port = free_port(), free_port()
    server = ("mkdir -p /www && echo hello-from-web > /www/index.html && "
              "exec busybox httpd -f -p 8080 -h /www")
    proc = ember_env.run("run", "-d", "--name", "web", "--network", "bridge",
                         "-p", f"127.0.0.1:{lo_port}:8080", "-p", f"{host_ip}:{lan_port}:8080",
                         image, "sh", "-c", server)
    assert proc.returncode == 0, proc.stderr
    web_ip = inspect(ember_env, "web")["ip_address"]
    assert "-A FORWARD -o ember0 -j ACCEPT" not in forward_rules()

    # -p: from the host (the proxy connects from the host itself: OUTPUT, not FORWARD) ...
    assert fetch(f"http://127.0.0.1:{lo_port}/index.html") == b"hello-from-web\n"
    # ... and from outside, through the host address the client sees.
    assert connect_from(ns, host_ip, lan_port) == "connected hello-from-web"

    # A new connection routed through the host to the sandbox's own address: dropped.
    assert connect_from(ns, web_ip, 8080) == "timeout"
    # The route is fine: let exactly this flow through and it connects.
    allow = ["-s", client_ip, "-d", web_ip, "-p", "tcp", "--dport", "8080", "-j", "ACCEPT"]
    sh("iptables", "-w", "-I", "FORWARD", "1", *allow)
    try:
        assert connect_from(ns, web_ip, 8080) == "connected hello-from-web"
    finally:
        sh("iptables", "-w", "-D", "FORWARD", *allow, check=False)
    assert connect_from(ns, web_ip, 8080) == "timeout"

    # Out of the sandbox to the outside namespace: allowed, and its replies come back in.
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello-from-outside\n")
    port = 18080
    srv = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "http.server",
                            "--bind", client_ip, "--directory", str(www), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(client_ip, port, srv)  # Python starts slowly on a busy host
        proc = ember_env.run(
            "run", "--rm", "--network", "bridge", image, "sh", "-c",
            f"for i in 1 2 3 4 5 6 7 8 9 10; do busybox wget -q -O - "
            f"http://{client_ip}:{port}/index.html && exit 0; sleep 1; done; exit 1")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode().splitlines()[-1] == "hello-from-outside"
    finally:
        srv.kill()
        srv.wait()

    assert ember_env.run("rm", "-f", "web").returncode == 0
    assert web_ip not in bridge.addresses_in_use()
