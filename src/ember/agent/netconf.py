"""Configure the guest's network interface from what CNI gave the pod on the host.

The host redirects every frame between the pod's ``eth0`` and the VM's tap
with tc (Kata's "tcfilter" model), so the guest NIC must look exactly like
``eth0``: same MAC (the peer on the host sends to it), same addresses, MTU and
routes. The NIC comes from a VM template whose MAC differs, so the MAC is set
here too. Busybox's ``ip`` applet does the work: the rootfs links every
applet, and it keeps the agent free of hand-rolled netlink.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import re
import socket
import struct
from collections.abc import Callable, Sequence

from ember.ttrpc import Code, TTRPCError

SYS_NET = "/sys/class/net"
PROC_IF_INET6 = "/proc/net/if_inet6"
IFF_UP = 0x1
SIOCGIFADDR = 0x8915
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


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _is_up(name: str, sys_net: str) -> bool:
    try:
        return bool(int(_read(os.path.join(sys_net, name, "flags")) or "0", 16) & IFF_UP)
    except ValueError:
        return False


def _mtu(name: str, sys_net: str) -> int:
    value = _read(os.path.join(sys_net, name, "mtu"))
    return int(value) if value.isdigit() else 0


def has_addresses(name: str) -> bool:
    """Whether the interface holds any IPv4 or IPv6 address (when unsure: yes)."""
    try:
        with open(PROC_IF_INET6) as f:
            if any(line.split()[-1:] == [name] for line in f):
                return True
    except OSError:
        pass  # no IPv6 in this kernel: only IPv4 to ask about
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError as e:
            return e.errno != errno.EADDRNOTAVAIL
    return True


def configure(run: Runner, name: str, mac: str, mtu: int, addresses: list[str],
              routes: list[tuple[str, str]], sys_net: str = SYS_NET) -> None:
    """Rename, address and route the guest NIC; idempotent for the same request.

    Loopback comes up too: the pod's containers share the guest's network
    namespace, and Kubernetes promises them a working ``localhost``
    (port-forward dials 127.0.0.1 in the guest). The guest's init brings it up
    at boot already, so from a template this is only a check.

    Each ``ip`` run is a process start in the guest, so a step whose result is
    already there (read from sysfs: the template's NIC is down, named and sized
    as asked, with no address; a repeated request finds its MAC) is not run;
    the addresses, the link and the routes always are. (Under TCG that saved
    ~20 ms of ~300: the first process start after a restore is the dear one.)
    """
    validate(name, mac, mtu, addresses, routes)
    if not _is_up("lo", sys_net):
        _ip(run, "link", "set", "dev", "lo", "up")
    nic = guest_nic(sys_net)
    if nic != name:
        if _is_up(nic, sys_net):
            _ip(run, "link", "set", "dev", nic, "down")  # a NIC is renamed only while down
        _ip(run, "link", "set", "dev", nic, "name", name)
    if mac and mac.lower() != _read(os.path.join(sys_net, name, "address")).lower():
        if _is_up(name, sys_net):
            _ip(run, "link", "set", "dev", name, "down")
        _ip(run, "link", "set", "dev", name, "address", mac.lower())
    if mtu and mtu != _mtu(name, sys_net):
        _ip(run, "link", "set", "dev", name, "mtu", str(mtu))
    if has_addresses(name):
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
