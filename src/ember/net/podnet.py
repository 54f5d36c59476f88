"""Join a pod's CNI network to its VM the way Kata does it ("tcfilter").

CNI configures ``eth0`` in the pod's network namespace on the host. Inside
that namespace we create a tap device and add an ingress qdisc with a
match-all u32 filter on each side whose action is *mirred egress redirect* to
the other: every frame that arrives on eth0 leaves through the tap into the
VM and vice versa. Nothing is bridged or routed on the host, and CNI's view of
the pod (addresses, routes) stays true: the guest's NIC takes over eth0's MAC,
addresses, MTU and routes (``read_config`` -> the agent's UpdateInterface).

The tap is opened here and its descriptor handed to QEMU (``-netdev
tap,fd=N``), so the jailed VMM needs neither /dev/net/tun nor any capability.
It is opened without IFF_VNET_HDR on purpose: pod VMs restore a template built
on a placeholder backend that has no vnet header, and a tap with one would
offer the guest offloads the restored virtio-net state never negotiated.
The tap is not persistent: it disappears when the last descriptor closes
(QEMU exits). ``teardown`` removes the qdiscs (the namespace itself belongs to
CNI) and tolerates a namespace that is already gone.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ember.errors import EmberError

TAP_NAME = "tap0_ember"
T = TypeVar("T")
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
INGRESS = 0xFFFF0000  # "ffff:"
ETH_P_ALL = 0x0003
PRIO = 49152
RT_MAIN = 254
RTPROT_KERNEL = 2


class NetError(EmberError):
    """Pod networking could not be set up (the message names the namespace and device)."""


@dataclass
class NicConfig:
    """What the guest NIC must look like: eth0's identity as CNI left it."""

    name: str
    mac: str
    mtu: int
    addresses: list[str] = field(default_factory=list)  # CIDRs
    routes: list[tuple[str, str]] = field(default_factory=list)  # (dest CIDR | "default", gw)


def _ns(path: str):
    from pyroute2 import NetNS

    if not os.path.exists(path):
        raise NetError(f"network namespace {path} does not exist")
    try:
        return NetNS(path)
    except OSError as exc:
        raise NetError(f"cannot enter network namespace {path}: {exc}") from None


def _index(ns, path: str, ifname: str) -> int:
    found = ns.link_lookup(ifname=ifname)
    if not found:
        raise NetError(f"network namespace {path} has no interface {ifname}")
    return found[0]


def read_config(path: str, ifname: str = "eth0") -> NicConfig:
    """eth0's MAC, MTU, IPv4 addresses and IPv4 routes (connected routes come with the address)."""
    ns = _ns(path)
    try:
        idx = _index(ns, path, ifname)
        link = ns.get_links(idx)[0]
        cfg = NicConfig(ifname, link.get_attr("IFLA_ADDRESS"), link.get_attr("IFLA_MTU") or 0)
        for a in ns.get_addr(index=idx, family=socket.AF_INET):
            cfg.addresses.append(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        for r in ns.get_routes(oif=idx, family=socket.AF_INET, table=RT_MAIN):
            if r["proto"] == RTPROT_KERNEL:
                continue
            dst = r.get_attr("RTA_DST")
            dest = f"{dst}/{r['dst_len']}" if dst else "default"
            cfg.routes.append((dest, r.get_attr("RTA_GATEWAY") or ""))
        return cfg
    finally:
        ns.close()


def in_netns(path: str, fn: Callable[[], T], what: str) -> T:
    """fn() run inside the network namespace at ``path``; NetError if that fails.

    setns(CLONE_NEWNET) changes only the calling thread, so a short-lived
    thread does it and the rest of the process never leaves its namespace.
    Sockets and taps opened by fn() stay bound to that namespace.
    """
    result: list = []

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(nsfd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(nsfd)
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result.append(exc)

    t = threading.Thread(target=work, name="netns")
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise NetError(f"{what} in {path}: {result[0]}")
    return result[0]


def _open_tap(path: str, name: str) -> int:
    """Open a tap device created inside the namespace (tun binds it to the opener's netns)."""

    def open_tap() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        except OSError:
            os.close(fd)
            raise
        return fd

    return in_netns(path, open_tap, f"cannot create tap {name}")


def link_stats(path: str, ifname: str = TAP_NAME) -> dict[str, int]:
    """The kernel's counters of ``ifname`` in the namespace at ``path`` (rx_bytes,
    tx_bytes, rx_packets, ...), read over netlink from a thread inside it."""
    from pyroute2 import IPRoute

    def read() -> dict[str, int]:
        with IPRoute() as ipr:
            links = ipr.link("get", ifname=ifname)
            stats = links[0].get_attr("IFLA_STATS64") or {}
            return {str(k): int(v) for k, v in dict(stats).items()}

    return in_netns(path, read, f"cannot read {ifname}'s counters")


def setup(path: str, ifname: str = "eth0", tap: str = TAP_NAME) -> tuple[int, NicConfig]:
    """Create the tap and the two redirects; (tap fd for QEMU, eth0's config for the guest).

    On any failure everything made so far is removed again.
    """
    cfg = read_config(path, ifname)
    fd = _open_tap(path, tap)
    try:
        ns = _ns(path)
        try:
            eth = _index(ns, path, ifname)
            tap_idx = _index(ns, path, tap)
            ns.link("set", index=tap_idx, mtu=cfg.mtu, state="up")
            for src, dst in ((eth, tap_idx), (tap_idx, eth)):
                ns.tc("add", "ingress", src, "ffff:")
                ns.tc("add-filter", "u32", src, parent=INGRESS, protocol=ETH_P_ALL, prio=PRIO,
                      target=0x10001, keys=["0x0/0x0+0"],
                      action=[{"kind": "mirred", "direction": "egress", "action": "redirect",
                               "ifindex": dst}])
        finally:
            ns.close()
    except Exception as exc:
        os.close(fd)
        teardown(path, ifname, tap)
        if isinstance(exc, NetError):
            raise
        raise NetError(f"cannot set up tc redirect {ifname} <-> {tap} in {path}: {exc}") from None
    return fd, cfg


def teardown(path: str, ifname: str = "eth0", tap: str = TAP_NAME) -> None:
    """Remove the redirect qdiscs and the tap; idempotent, quiet if the netns is gone."""
    if not path or not os.path.exists(path):
        return
    try:
        ns = _ns(path)
    except NetError:
        return
    try:
        for name in (ifname, tap):
            found = ns.link_lookup(ifname=name)
            if not found:
                continue
            try:
                ns.tc("del", "ingress", found[0], "ffff:")
            except Exception as exc:  # noqa: BLE001 - pyroute2 raises NetlinkError
                if getattr(exc, "code", None) not in (errno.ENOENT, errno.EINVAL):
                    raise NetError(f"cannot remove ingress qdisc of {name} in {path}: {exc}") \
                        from None
            if name == tap:
                try:
                    ns.link("del", index=found[0])
                except Exception:  # noqa: BLE001 - gone already when QEMU closed it
                    pass
    finally:
        ns.close()
