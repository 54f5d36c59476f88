"""Docker-style bridge networking for ``ember run --network bridge``.

The host has one bridge, ``ember0`` (10.88.0.1/16), with MASQUERADE for the subnet so containers
reach the outside. Each sandbox gets a network namespace ``ember-<id12>`` and
a veth pair: the host end (``veth<id11>``) is a port of the bridge, the other
end is ``eth0`` in the namespace with an address from :mod:`ember.net.ipam`
and a default route via the bridge. The VM then takes that eth0 over exactly
as a CRI pod's VM does (:func:`ember.net.podnet.setup`, tc redirect), so the
guest NIC owns the container's address and MAC.

Everything per sandbox can be derived from its id, so :func:`disconnect`
works from ``state.json`` alone even after the monitor was SIGKILLed:
deleting the namespace destroys eth0 and with it the veth pair.

The bridge lives exactly as long as a sandbox is on it: the first
:func:`connect` creates it and the :func:`disconnect` that leaves it without
a port removes it with its rules, so no run, crashed test or bench leaves an
idle ``ember0`` behind (docker0 stays; a host that never runs a bridged
sandbox again should not keep one). Both happen under one host-wide lock
(:data:`BRIDGE_LOCK`, not the per-state-dir address lock), so a sandbox of
another state dir never loses the bridge between its creation and its port.

Forwarding is one-way: sandboxes may open connections to anywhere, but into
ember0 the host forwards only replies (conntrack ESTABLISHED, plus the ICMP
errors RELATED to a flow) and drops every new connection routed in from
elsewhere, whatever the FORWARD policy. Inbound connections come only through
``-p``, whose proxy (:mod:`ember.net.proxy`) connects from the host itself,
which is the OUTPUT path, not FORWARD.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import AbstractContextManager

from ember.config import Config
from ember.net import ipam
from ember.net.podnet import NetError
from ember.util import file_lock

BRIDGE = "ember0"
# Host-wide, as the bridge is one for all state dirs; in /run itself (root-only),
# not the world-writable /run/lock, where any user could hold it and stall us.
BRIDGE_LOCK = "/run/ember0.lock"


def bridge_lock() -> AbstractContextManager[None]:
    """Held while the bridge is created, given a port, or removed."""
    return file_lock(BRIDGE_LOCK)


def netns_name(sandbox_id: str) -> str:
    return f"ember-{sandbox_id[:12]}"


def netns_path(sandbox_id: str) -> str:
    return f"/run/netns/{netns_name(sandbox_id)}"


def veth_name(sandbox_id: str) -> str:
    return f"veth{sandbox_id[:11]}"  # interface names are at most 15 bytes


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise NetError(f"{args[0]} not found: --network bridge needs iproute2 and iptables") \
            from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise NetError(f"{' '.join(args)}: {msg[-1] if msg else f'exit {proc.returncode}'}")
    return proc


def _iptables_ensure(table: str, chain: str, rule: list[str], first: bool = False) -> None:
    if _run("iptables", "-w", "-t", table, "-C", chain, *rule, check=False).returncode != 0:
        _run("iptables", "-w", "-t", table, *(("-I", chain, "1") if first else ("-A", chain)),
             *rule)


def _iptables_delete(table: str, chain: str, rule: list[str]) -> None:
    while _run("iptables", "-w", "-t", table, "-C", chain, *rule, check=False).returncode == 0:
        _run("iptables", "-w", "-t", table, "-D", chain, *rule)


_REPLIES = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"]
# Sandboxes' own traffic (out, and sandbox to sandbox across the bridge).
FORWARD_OUT = ["-i", BRIDGE, "-j", "ACCEPT"]
# Replies into sandboxes: a host whose FORWARD policy is DROP (Docker's) must pass them.
FORWARD_REPLIES = ["-o", BRIDGE, *_REPLIES, "-j", "ACCEPT"]
# Anything else routed into ember0 from outside it: new connections, INVALID. It names
# neither of the rules above, so it works wherever it sits; it goes first so that no
# ACCEPT of the host's (or a policy of ACCEPT) lets a new connection in.
FORWARD_NEW_IN = ["!", "-i", BRIDGE, "-o", BRIDGE, "-m", "conntrack", "!", "--ctstate",
                  "RELATED,ESTABLISHED", "-j", "DROP"]
# Versions before issue 11 forwarded every new connection in; removed on sight.
FORWARD_LEGACY_IN = ["-o", BRIDGE, "-j", "ACCEPT"]


def _masquerade() -> list[str]:
    return ["-s", str(ipam.SUBNET), "!", "-o", BRIDGE, "-j", "MASQUERADE"]


def ensure_bridge() -> None:
    """Create ember0, its address, forwarding and NAT if missing (hold :func:`bridge_lock`)."""
    if not os.path.exists(f"/sys/class/net/{BRIDGE}"):
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "replace", f"{ipam.GATEWAY}/{ipam.SUBNET.prefixlen}", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    # The drop before ip_forward: no moment in which new connections are forwarded in.
    _iptables_ensure("filter", "FORWARD", FORWARD_NEW_IN, first=True)
    _iptables_delete("filter", "FORWARD", FORWARD_LEGACY_IN)
    _iptables_ensure("filter", "FORWARD", FORWARD_OUT)
    _iptables_ensure("filter", "FORWARD", FORWARD_REPLIES)
    _iptables_ensure("nat", "POSTROUTING", _masquerade())
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")


def remove_bridge() -> bool:
    """Remove ember0 and its NAT/forward rules when no sandbox uses it; True if removed.

    :func:`disconnect` removes it with its last port; this is for uninstalling
    and for a bridge an older version left. The broad inbound ACCEPT of older
    versions goes too.
    """
    if addresses_in_use():
        return False
    with bridge_lock():
        _remove_rules_and_link()
    return True


def _remove_rules_and_link() -> None:
    """The bridge, then its NAT and forward rules (hold :func:`bridge_lock`).

    The link first: a set-up that failed for want of iptables made the bridge
    but no rule, and must still not leave the bridge behind."""
    if os.path.exists(f"/sys/class/net/{BRIDGE}"):
        _run("ip", "link", "del", BRIDGE)
    for table, chain, rule in (
        ("nat", "POSTROUTING", _masquerade()),
        ("filter", "FORWARD", FORWARD_OUT),
        ("filter", "FORWARD", FORWARD_REPLIES),
        ("filter", "FORWARD", FORWARD_LEGACY_IN),
        ("filter", "FORWARD", FORWARD_NEW_IN),
    ):
        _iptables_delete(table, chain, rule)


def addresses_in_use() -> set[str]:
    """Addresses on eth0 of every ember-* namespace on the host.

    Records are per state dir; this keeps a second state dir (a test run
    beside a real installation) from handing out an address that is live.
    """
    used: set[str] = set()
    try:
        names = [n for n in os.listdir("/run/netns") if n.startswith("ember-")]
    except OSError:
        return used
    for name in names:
        out = _run("ip", "-n", name, "-4", "-o", "addr", "show", "dev", "eth0", check=False)
        for line in out.stdout.splitlines():
            fields = line.split()
            if "inet" in fields:
                used.add(fields[fields.index("inet") + 1].split("/")[0])
    return used


def connect(cfg: Config, sandbox_id: str, record) -> tuple[str, str]:
    """Allocate an address and build the namespace; (address, netns path).

    ``record(ip, netns)`` is called before anything is created on the host,
    so a crash at any later point leaves state that :func:`disconnect` undoes.
    """
    with ipam.lock(cfg):
        ip = ipam.allocate(cfg, sandbox_id, exclude=addresses_in_use())
        record(ip, netns_path(sandbox_id))
    ns, veth = netns_name(sandbox_id), veth_name(sandbox_id)
    try:
        with bridge_lock():  # from here the bridge has our port: nobody removes it
            ensure_bridge()
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "link", "set", veth, "master", BRIDGE, "up")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/{ipam.SUBNET.prefixlen}", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "route", "add", "default", "via", str(ipam.GATEWAY))
    except BaseException:
        disconnect(cfg, sandbox_id)
        raise
    return ip, netns_path(sandbox_id)


def disconnect(cfg: Config, sandbox_id: str) -> None:
    """Remove the namespace, the veth pair and the address record, then the
    bridge if that was its last port; idempotent."""
    if os.path.exists(netns_path(sandbox_id)):
        _run("ip", "netns", "del", netns_name(sandbox_id), check=False)
    if os.path.exists(f"/sys/class/net/{veth_name(sandbox_id)}"):
        _run("ip", "link", "del", veth_name(sandbox_id), check=False)
    ipam.release(cfg, sandbox_id)
    with bridge_lock():
        if os.path.isdir(f"/sys/class/net/{BRIDGE}") and not _ports():
            try:
                _remove_rules_and_link()
            except NetError:
                pass  # no iptables (the set-up failed on it): no rule of ours to find


def _ports() -> list[str]:
    """The bridge's ports: one host veth per sandbox on it."""
    try:
        return os.listdir(f"/sys/class/net/{BRIDGE}/brif")
    except OSError:
        return []
