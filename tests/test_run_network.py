"""`ember run --network bridge` and `-p`: real VMs on the real ember0 bridge.

Two sandboxes get distinct addresses from 10.88.0.0/16 and one fetches a
page from the other; a published port is fetched from the host; a sandbox
whose monitor was SIGKILLed is still cleaned up by `ember rm -f` (namespace,
veth, address record, no iptables rule naming its address); bad input fails
with one line and leaves nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(600)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def netns_exists(sid: str) -> bool:
    return Path(f"/run/netns/ember-{sid[:12]}").exists()


def veth_exists(sid: str) -> bool:
    return Path(f"/sys/class/net/veth{sid[:11]}").exists()


def ip_records(state_dir: Path) -> list[str]:
    d = state_dir / "net" / "ips"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def iptables_rules() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout


def inspect(env, ref: str) -> dict:
    proc = env.run("inspect", ref, check=True)
    data = json.loads(proc.stdout)
    return data[0] if isinstance(data, list) else data


def fetch(url: str, timeout: float = 60) -> bytes:
    """The page, retrying while httpd in the guest is still starting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module", autouse=True)
def bridge_left_as_found():
    """Tests must leave the host as they found it: no ember0, ip_forward unchanged."""
    from ember.net.bridge import BRIDGE, remove_bridge

    had_bridge = Path(f"/sys/class/net/{BRIDGE}").exists()
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    yield
    if not had_bridge:
        assert remove_bridge(), "ember0 still in use after the tests"
        assert not Path(f"/sys/class/net/{BRIDGE}").exists()
    Path("/proc/sys/net/ipv4/ip_forward").write_text(forward)


@pytest.fixture
def foreign_netns():
    """An ember-* namespace from "another state dir" whose eth0 holds 10.88.0.2."""
    name = f"ember-t{os.getpid():011d}"[:18]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                    ["addr", "add", "10.88.0.2/16", "dev", "eth0"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield "10.88.0.2"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_bridge_reach_publish_and_cleanup_after_crash(ember_env, image, foreign_netns):
    port = free_port()
    server = ("mkdir -p /www && echo hello-from-web > /www/index.html && "
              "exec busybox httpd -f -p 8080 -h /www")
    proc = ember_env.run("run", "-d", "--name", "web", "--network", "bridge",
                         "-p", f"127.0.0.1:{port}:8080", image, "sh", "-c", server)
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.decode().strip()
    web = inspect(ember_env, "web")
    web_ip = web["ip_address"]
    assert web_ip.startswith("10.88.") and web["network"] == "bridge"
    assert web_ip != foreign_netns  # live in another state dir's namespace: skipped
    assert netns_exists(sid) and veth_exists(sid)
    assert ip_records(ember_env.state_dir) == [web_ip]

    # From the host through the published port (userland proxy in the monitor).
    assert fetch(f"http://127.0.0.1:{port}/index.html") == b"hello-from-web\n"

    # A second sandbox on the bridge: its own address, and it reaches the first.
    proc = ember_env.run(
        "run", "--rm", "--network", "bridge", image, "sh", "-c",
        f"busybox ip -o -4 addr show eth0; "
        f"for i in 1 2 3 4 5; do busybox wget -q -O - http://{web_ip}:8080/index.html "
        f"&& exit 0; sleep 1; done; exit 1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    other_ip = lines[0].split()[3].split("/")[0]
    assert other_ip.startswith("10.88.") and other_ip != web_ip
    assert lines[-1] == "hello-from-web"
    assert ip_records(ember_env.state_dir) == [web_ip]  # --rm released the other one
    assert Path("/sys/class/net/ember0/brif").is_dir()  # web is still on the bridge

    # The monitor dies hard: `rm -f` must still remove everything it made.
    os.kill(web["monitor_pid"], signal.SIGKILL)
    proc = ember_env.run("rm", "-f", "web")
    assert proc.returncode == 0, proc.stderr
    assert not netns_exists(sid) and not veth_exists(sid)
    assert ip_records(ember_env.state_dir) == []
    assert web_ip not in iptables_rules()
    # Its last sandbox gone, the bridge goes too, with its rules: nothing idle stays.
    assert not Path("/sys/class/net/ember0").exists()
    assert "ember0" not in iptables_rules()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_bridged_start_traces_its_host_and_guest_network(ember_env, image):
    """`ember --debug run --network bridge`: the sandbox's tap and redirects
    (`host network`) are made before the template lookup, the guest's NIC is
    set up (`guest network`) after the agent answers, each printed once."""
    from test_trace import _phases

    proc = ember_env.run("--debug", "run", "--rm", "--network", "bridge", image, "true")
    assert proc.returncode == 0, proc.stderr
    ph = _phases(proc.stderr.decode())
    order = ["host network", "template lookup", "jail", "restore", "agent ready",
             "guest network", "container create+start"]
    assert set(order) <= set(ph), sorted(set(order) - set(ph))
    for before, after in zip(order, order[1:], strict=False):
        assert ph[before][1] <= ph[after][0] + 1.0, (before, ph[before], after, ph[after])


def test_no_network_still_has_a_working_loopback(ember_env, image):
    """`--network none` (the default) is "loopback only", as Docker's: lo is up,
    and a server on 127.0.0.1 answers a client in the same container."""
    script = ("ls /sys/class/net; mkdir -p /www && echo hello-from-lo > /www/index.html && "
              "busybox httpd -p 127.0.0.1:8080 -h /www && "
              "for i in 1 2 3 4 5; do busybox wget -q -O - http://127.0.0.1:8080/index.html "
              "&& exit 0; sleep 1; done; exit 1")
    proc = ember_env.run("run", "--rm", image, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["lo", "hello-from-lo"]


@pytest.mark.parametrize("args, message", [
    (["-p", "8080:80"], "--publish needs --network bridge"),
    (["--network", "host"], "invalid --network 'host'"),
    (["--network", "bridge", "-p", "80"], "invalid --publish '80'"),
    (["--network", "bridge", "-p", "1:2/udp"], "only tcp"),
    (["--network", "bridge", "-p", "70000:80"], "ports must be 1-65535"),
])
def test_bad_network_input(ember_env, image, args, message):
    proc = ember_env.run("run", "--rm", *args, image, "true")
    assert proc.returncode == 125
    err = proc.stderr.decode().strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert ember_env.run("ps", "-a", "-q").stdout.strip() == b""
    assert ip_records(ember_env.state_dir) == []


def test_published_port_in_use_leaves_nothing(ember_env, image):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
        proc = ember_env.run("run", "-d", "--network", "bridge", "-p", f"127.0.0.1:{port}:80",
                             image, "true")
    assert proc.returncode == 125
    err = proc.stderr.decode().strip()
    assert f"127.0.0.1:{port} is already in use" in err and len(err.splitlines()) == 1, err
    assert ember_env.run("ps", "-a", "-q").stdout.strip() == b""
    assert ip_records(ember_env.state_dir) == []
    after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert not [n for n in after - before if n.startswith("ember-")]


def test_missing_iptables_fails_cleanly(ember_env, image):
    """Without iptables on PATH the bridge cannot be set up: one line, nothing left."""
    dirs = [d for d in ember_env.env["PATH"].split(":") if d and not os.path.exists(f"{d}/iptables")]
    ember_env.env["PATH"] = ":".join(dirs)
    before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    proc = ember_env.run("run", "--rm", "--network", "bridge", image, "true")
    assert proc.returncode == 125
    err = proc.stderr.decode().strip()
    assert "iptables not found" in err and len(err.splitlines()) == 1, err
    assert ember_env.run("ps", "-a", "-q").stdout.strip() == b""
    assert ip_records(ember_env.state_dir) == []
    after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert not [n for n in after - before if n.startswith("ember-")]
    assert not Path("/sys/class/net/ember0").exists()  # made before iptables failed: gone
