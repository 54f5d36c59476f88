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
import fcntl
import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ember.errors import EmberError
from ember.util import run_tool

TAP_NAME = "tap0_ember"
T = TypeVar("T")
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
PRIO = 49152


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


def _run(args: list[str], what: str) -> str:
    """iproute2 (``ip`` or ``tc``) in the calling thread's namespace; its stdout.

    iproute2 rather than pyroute2: importing pyroute2 (225 modules) cost a
    pod's shim ~70 ms before its VM could start; a set-up is eight runs of
    ~1-2 ms. A failure raises with the tool's words after ``what``.
    """
    return run_tool(args, what, error=NetError,
                    missing="is not installed (pod networking needs iproute2)")


def _json(args: list[str], what: str) -> list[dict]:
    out = _run([args[0], "-j", *args[1:]], what)
    try:
        data = json.loads(out or "[]")
    except ValueError:
        raise NetError(f"{what}: {args[0]} -j printed no JSON") from None
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _read(path: str, ifname: str) -> NicConfig:
    """eth0's identity, read in the calling thread's namespace (the pod's)."""
    what = f"cannot read {ifname} in {path}"
    links = [ln for ln in _json(["ip", "link", "show"], what) if ln.get("ifname") == ifname]
    if not links:
        raise NetError(f"network namespace {path} has no interface {ifname}")
    cfg = NicConfig(ifname, str(links[0].get("address", "")), int(links[0].get("mtu") or 0))
    for entry in _json(["ip", "-4", "addr", "show", "dev", ifname], what):
        for a in entry.get("addr_info", []):
            if a.get("family") == "inet" and a.get("local"):
                cfg.addresses.append(f"{a['local']}/{a.get('prefixlen', 32)}")
    for r in _json(["ip", "-4", "route", "show", "dev", ifname, "table", "main"], what):
        dst = str(r.get("dst", ""))
        if r.get("protocol") == "kernel" or not dst:  # a connected route comes with its address
            continue
        if dst != "default" and "/" not in dst:
            dst += "/32"  # ip prints a host route without its length
        cfg.routes.append((dst, str(r.get("gateway", ""))))
    return cfg


def read_config(path: str, ifname: str = "eth0") -> NicConfig:
    """eth0's MAC, MTU, IPv4 addresses and IPv4 routes (connected routes come with the address)."""
    return in_netns(path, lambda: _read(path, ifname), f"cannot read {ifname}")


class NetnsUnusable(NetError):
    """The namespace is not there, or cannot be entered."""


def in_netns(path: str, fn: Callable[[], T], what: str) -> T:
    """fn() run inside the network namespace at ``path``; NetError if that fails.

    setns(CLONE_NEWNET) changes only the calling thread, so a short-lived
    thread does it and the rest of the process never leaves its namespace.
    Sockets and taps opened by fn(), and processes it starts, belong to that
    namespace. A NetError from fn() comes through as it is (it names the
    namespace); any other error is wrapped with ``what``.
    """
    if not os.path.exists(path):
        raise NetnsUnusable(f"network namespace {path} does not exist")
    result: list = []

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            try:
                nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if libc.setns(nsfd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err))
                finally:
                    os.close(nsfd)
            except OSError as exc:
                raise NetnsUnusable(f"cannot enter network namespace {path}: {exc}") from None
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result.append(exc)

    t = threading.Thread(target=work, name="netns")
    t.start()
    t.join()
    if isinstance(result[0], NetError):
        raise result[0]
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
    from pyroute2 import IPRoute  # the metrics collector loads it at start-up

    def read() -> dict[str, int]:
        with IPRoute() as ipr:
            links = ipr.link("get", ifname=ifname)
            stats = links[0].get_attr("IFLA_STATS64") or {}
            return {str(k): int(v) for k, v in dict(stats).items()}

    return in_netns(path, read, f"cannot read {ifname}'s counters")


def _redirect(a: str, b: str) -> list[list[str]]:
    """tc runs: every frame arriving on a leaves through b."""
    return [["tc", "qdisc", "add", "dev", a, "ingress"],
            ["tc", "filter", "add", "dev", a, "parent", "ffff:", "protocol", "all", "prio",
             str(PRIO), "u32", "match", "u32", "0", "0",
             "action", "mirred", "egress", "redirect", "dev", b]]


def setup(path: str, ifname: str = "eth0", tap: str = TAP_NAME) -> tuple[int, NicConfig]:
    """Create the tap and the two redirects; (tap fd for QEMU, eth0's config for the guest).

    On any failure everything made so far is removed again.
    """
    cfg = read_config(path, ifname)
    fd = _open_tap(path, tap)
    what = f"cannot set up tc redirect {ifname} <-> {tap} in {path}"

    def redirect() -> None:
        _run(["ip", "link", "set", "dev", tap, "mtu", str(cfg.mtu), "up"], what)
        for cmd in _redirect(ifname, tap) + _redirect(tap, ifname):
            _run(cmd, what)

    try:
        in_netns(path, redirect, what)
    except BaseException:
        os.close(fd)
        teardown(path, ifname, tap)
        raise
    return fd, cfg


def teardown(path: str, ifname: str = "eth0", tap: str = TAP_NAME) -> None:
    """Remove the redirect qdiscs and the tap; idempotent, quiet if the netns is gone."""
    if not path:
        return
    what = f"cannot remove the ingress qdiscs of {ifname} and {tap} in {path}"

    def ours() -> tuple[set[str], set[str]]:
        """(our devices that have an ingress qdisc, our devices present)."""
        qdiscs = [q for q in _json(["tc", "qdisc", "show"], what)
                  if q.get("dev") in (ifname, tap)]
        return ({str(q["dev"]) for q in qdiscs if q.get("kind") == "ingress"},
                {str(q["dev"]) for q in qdiscs})

    def undo() -> None:
        ingress, present = ours()
        for dev in sorted(ingress):
            try:
                _run(["tc", "qdisc", "del", "dev", dev, "ingress"], what)
            except NetError:
                if dev in ours()[0]:  # not one that vanished meanwhile (the tap, with QEMU)
                    raise
        if tap in present:
            try:
                _run(["ip", "link", "del", "dev", tap], what)
            except NetError:
                pass  # gone already when QEMU closed it

    try:
        in_netns(path, undo, what)
    except NetnsUnusable:
        return
