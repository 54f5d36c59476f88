"""Configure the guest's network interface from what CNI gave the pod on the host.

The host redirects every frame between the pod's ``eth0`` and the VM's tap
with tc (Kata's "tcfilter" model), so the guest NIC must look exactly like
``eth0``: same MAC (the peer on the host sends to it), same addresses, MTU and
routes. The NIC comes from a VM template whose MAC differs, so the MAC is set
here too. Busybox's ``ip`` applet does the work: the rootfs links every
applet, and it keeps the agent free of hand-rolled netlink.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Sequence

from ember.ttrpc import Code, TTRPCError

SYS_NET = "/sys/class/net"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


def _bad(msg: str) -> TTRPCError:
    return TTRPCError(Code.INVALID_ARGUMENT, msg)


# Runs a helper to completion: (exit code, combined output). The agent's
# reaper reaps every child of PID 1, so helpers go through it (its
# run_command), never subprocess, whose wait() the reaper would race.
Runner = Callable[[Sequence[str]], tuple[int, bytes]]


def _ip(run: Runner, *args: str) -> None:
    rc, out = run(["ip", *args])
    if rc != 0:
        detail = out.decode(errors="replace").strip().splitlines()
        raise TTRPCError(Code.INTERNAL,
                         f"ip {' '.join(args)}: {detail[-1] if detail else rc}")


def guest_nic(sys_net: str = SYS_NET) -> str:
    """The guest's one virtio NIC (anything but loopback with a device behind it)."""
    names = sorted(n for n in os.listdir(sys_net)
                   if n != "lo" and os.path.exists(os.path.join(sys_net, n, "device")))
    if not names:
        raise TTRPCError(Code.FAILED_PRECONDITION, "the VM has no network device")
    return names[0]


def validate(name: str, mac: str, mtu: int, addresses: list[str],
             routes: list[tuple[str, str]]) -> None:
    """Refuse bad input with a message that names the bad field (before touching anything)."""
    if not _NAME.match(name):
        raise _bad(f"interface name {name!r} is not valid")
    if mac and not _MAC.match(mac):
        raise _bad(f"MAC address {mac!r} is not valid")
    if mtu and not 68 <= mtu <= 65535:
        raise _bad(f"MTU {mtu} is out of range (68-65535)")
    for cidr in addresses:
        try:
            ipaddress.ip_interface(cidr)
        except ValueError:
            raise _bad(f"address {cidr!r} is not an IP/prefix") from None
    for dest, gw in routes:
        try:
            if dest not in ("", "default"):
                ipaddress.ip_network(dest, strict=False)
            if gw:
                ipaddress.ip_address(gw)
        except ValueError as exc:
            raise _bad(f"route {dest or 'default'} via {gw or '-'}: {exc}") from None


def configure(run: Runner, name: str, mac: str, mtu: int, addresses: list[str],
              routes: list[tuple[str, str]]) -> None:
    """Rename, address and route the guest NIC; idempotent for the same request.

    Loopback comes up too: the pod's containers share the guest's network
    namespace, where the kernel leaves ``lo`` down, and Kubernetes promises
    them a working ``localhost`` (port-forward dials 127.0.0.1 in the guest).
    """
    validate(name, mac, mtu, addresses, routes)
    _ip(run, "link", "set", "dev", "lo", "up")
    nic = guest_nic()
    _ip(run, "link", "set", "dev", nic, "down")
    if nic != name:
        _ip(run, "link", "set", "dev", nic, "name", name)
    if mac:
        _ip(run, "link", "set", "dev", name, "address", mac.lower())
    if mtu:
        _ip(run, "link", "set", "dev", name, "mtu", str(mtu))
    _ip(run, "addr", "flush", "dev", name)
    for cidr in addresses:
        _ip(run, "addr", "add", cidr, "dev", name)
    _ip(run, "link", "set", "dev", name, "up")
    # On-link routes first: a gateway must be reachable before a route via it.
    for dest, gw in sorted(routes, key=lambda r: bool(r[1])):
        target = dest if dest not in ("", "default") else "default"
        args = ["route", "replace", target]
        args += ["via", gw] if gw else []
        _ip(run, *args, "dev", name)
