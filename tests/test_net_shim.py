"""Pod networking through containerd without CRI: `ctr run --with-ns network:PATH`.

A container that joins a network namespace with an ``eth0`` gets a NIC in its
VM with eth0's identity and reaches the other end of eth0's veth pair in the
root namespace. A namespace without eth0 is refused with a clear error, and
nothing is left behind: no VM, no shim, no tap or qdisc in the namespace.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
from shimtools import BUSYBOX, RUNTIME, leftovers, private_containerd

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.containerd,
              pytest.mark.timeout(600)]


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def ctrd(guest_assets):
    with private_containerd() as env:
        yield env


@pytest.fixture
def netns():
    """(name, path, host end address): eth0 = 10.202.x.2/24 inside, default via .1."""
    name = f"embt-{uuid.uuid4().hex[:8]}"
    host = f"vh{uuid.uuid4().hex[:8]}"
    octet = int(uuid.uuid4().hex[:2], 16) % 200 + 20
    sh("ip", "netns", "add", name)
    try:
        yield name, f"/var/run/netns/{name}", host, f"10.202.{octet}"
    finally:
        sh("ip", "link", "del", host, check=False)
        sh("ip", "netns", "del", name, check=False)


def _clean(work) -> bool:
    deadline = time.monotonic() + 30
    while leftovers(work) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not leftovers(work)


def test_container_in_a_netns_gets_eth0_and_reaches_the_host(ctrd, netns) -> None:
    c, work = ctrd
    name, path, host, net = netns
    sh("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", name)
    sh("ip", "addr", "add", f"{net}.1/24", "dev", host)
    sh("ip", "link", "set", host, "up")
    sh("ip", "netns", "exec", name, "ip", "addr", "add", f"{net}.2/24", "dev", "eth0")
    sh("ip", "netns", "exec", name, "ip", "link", "set", "eth0", "up")
    sh("ip", "netns", "exec", name, "ip", "route", "add", "default", "via", f"{net}.1")
    mac = sh("ip", "netns", "exec", name, "cat", "/sys/class/net/eth0/address").strip()
    res = c.ctr("run", "--rm", "--runtime", RUNTIME, "--with-ns", f"network:{path}", BUSYBOX,
                f"t-net-{name}", "sh", "-c",
                f"busybox ip -o link show eth0; busybox ip -o -4 addr show eth0; "
                f"busybox ping -c 1 -W 5 {net}.1", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{net}.2/24" in res.stdout and mac in res.stdout, res.stdout
    assert "1 packets received" in res.stdout
    assert _clean(work), leftovers(work)
    qdiscs = sh("ip", "netns", "exec", name, "tc", "qdisc", "show")
    assert "ingress" not in qdiscs and "tap0_ember" not in sh("ip", "netns", "exec", name,
                                                              "ip", "-o", "link")


def test_netns_without_eth0_is_refused_and_nothing_is_left(ctrd, netns) -> None:
    c, work = ctrd
    name, path, _, _ = netns
    res = c.ctr("run", "--rm", "--runtime", RUNTIME, "--with-ns", f"network:{path}", BUSYBOX,
                f"t-nonet-{name}", "true", check=False)
    assert res.returncode != 0
    assert f"network namespace {path} has no interface eth0" in res.stderr, res.stderr
    c.ctr("container", "rm", f"t-nonet-{name}", check=False)
    assert _clean(work), leftovers(work)
    assert "tap0_ember" not in sh("ip", "netns", "exec", name, "ip", "-o", "link")
    assert "ingress" not in sh("ip", "netns", "exec", name, "tc", "qdisc", "show")
