"""ember.net.podnet: the tap + tc redirect a pod's VM gets, in a netns this test makes.

The namespace stands in for CNI's: a veth pair, one end named eth0 inside with
an address, an MTU and a default route. Set-up must produce the tap and the
two mirred redirects, read eth0's identity correctly, undo itself on failure,
and teardown must remove everything it added (and nothing of CNI's).
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from ember.net import podnet
from ember.sandbox.spec import joined_netns
from ember.shim import guestspec

pytestmark = [pytest.mark.root]


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def in_ns(name: str, *args: str) -> str:
    return sh("ip", "netns", "exec", name, *args)


@pytest.fixture
def netns():
    """A netns with eth0 (veth to the root namespace), 10.201.x.2/24, gateway .1, MTU 1400."""
    name = f"embt-{uuid.uuid4().hex[:8]}"
    host = f"vh{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", name)
        in_ns(name, "ip", "link", "set", "eth0", "mtu", "1400", "up")
        in_ns(name, "ip", "addr", "add", "10.201.7.2/24", "dev", "eth0")
        in_ns(name, "ip", "route", "add", "default", "via", "10.201.7.1")
        yield name, f"/var/run/netns/{name}"
    finally:
        sh("ip", "link", "del", host, check=False)
        sh("ip", "netns", "del", name, check=False)


def test_setup_redirects_both_ways_and_teardown_removes_it(netns) -> None:
    name, path = netns
    fd, cfg = podnet.setup(path)
    try:
        assert cfg.name == "eth0" and cfg.mtu == 1400
        assert cfg.addresses == ["10.201.7.2/24"]
        assert cfg.routes == [("default", "10.201.7.1")]
        mac = in_ns(name, "cat", "/sys/class/net/eth0/address").strip()
        assert cfg.mac == mac
        links = in_ns(name, "ip", "-o", "link")
        assert podnet.TAP_NAME in links
        assert "mtu 1400" in in_ns(name, "ip", "-o", "link", "show", podnet.TAP_NAME)
        to_tap = in_ns(name, "tc", "filter", "show", "dev", "eth0", "ingress")
        to_eth = in_ns(name, "tc", "filter", "show", "dev", podnet.TAP_NAME, "ingress")
        assert f"Egress Redirect to device {podnet.TAP_NAME}" in to_tap
        assert "Egress Redirect to device eth0" in to_eth
    finally:
        os.close(fd)
        podnet.teardown(path)
    assert "ingress" not in in_ns(name, "tc", "qdisc", "show")
    assert podnet.TAP_NAME not in in_ns(name, "ip", "-o", "link")
    assert "10.201.7.2/24" in in_ns(name, "ip", "-o", "addr", "show", "eth0")  # CNI's stays
    podnet.teardown(path)  # idempotent


def test_setup_fails_cleanly_without_eth0_or_netns(netns) -> None:
    name, path = netns
    with pytest.raises(podnet.NetError, match="has no interface eth7"):
        podnet.setup(path, ifname="eth7")
    with pytest.raises(podnet.NetError, match="does not exist"):
        podnet.setup(f"/var/run/netns/{name}-missing")
    assert podnet.TAP_NAME not in in_ns(name, "ip", "-o", "link")
    assert "ingress" not in in_ns(name, "tc", "qdisc", "show")
    podnet.teardown(f"/var/run/netns/{name}-missing")  # gone netns: nothing to do, no error


def test_setup_twice_in_one_netns_is_refused_and_keeps_the_first(netns) -> None:
    name, path = netns
    fd, _ = podnet.setup(path)
    try:
        with pytest.raises(podnet.NetError):
            podnet.setup(path)
        assert "Egress Redirect" in in_ns(name, "tc", "filter", "show", "dev", "eth0", "ingress")
    finally:
        os.close(fd)
        podnet.teardown(path)


def test_routes_keep_their_length_and_connected_ones_are_left_out(netns) -> None:
    """A network route and a host route through eth0 reach the guest as CIDRs
    (ip prints a host route without /32); the connected route of eth0's address
    does not (the guest gets it with the address)."""
    name, path = netns
    in_ns(name, "ip", "route", "add", "10.99.0.0/16", "via", "10.201.7.1")
    in_ns(name, "ip", "route", "add", "10.98.1.1", "via", "10.201.7.1")
    cfg = podnet.read_config(path)
    assert sorted(cfg.routes) == [("10.98.1.1/32", "10.201.7.1"), ("10.99.0.0/16", "10.201.7.1"),
                                  ("default", "10.201.7.1")]
    assert cfg.addresses == ["10.201.7.2/24"]


def test_a_set_up_failing_halfway_leaves_nothing(netns, monkeypatch) -> None:
    """tc refuses the second redirect (after eth0's is in place): the error names
    the namespace and tc's words, and eth0's qdisc and the tap are gone again."""
    name, path = netns
    real = podnet._redirect

    def broken(a: str, b: str) -> list[list[str]]:
        runs = real(a, b)
        return runs if a == "eth0" else [runs[0], ["tc", "filter", "add", "dev", "nosuchdev"]]

    monkeypatch.setattr(podnet, "_redirect", broken)
    with pytest.raises(podnet.NetError, match=f"cannot set up tc redirect .* in {path}: .+"):
        podnet.setup(path)
    assert "ingress" not in in_ns(name, "tc", "qdisc", "show")
    assert podnet.TAP_NAME not in in_ns(name, "ip", "-o", "link")


def test_without_iproute2_the_error_says_so(netns, monkeypatch) -> None:
    _name, path = netns
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(podnet.NetError, match="ip is not installed .*needs iproute2"):
        podnet.setup(path)


def test_netns_path_and_guest_spec() -> None:
    spec = {"process": {"args": ["sh"]},
            "linux": {"namespaces": [{"type": "pid"},
                                     {"type": "network", "path": "/var/run/netns/cni-1"},
                                     {"type": "ipc", "path": "/run/ember-test/ns/ipc"}]}}
    assert joined_netns(spec) == "/var/run/netns/cni-1"
    assert joined_netns({"linux": {"namespaces": [{"type": "network"}]}}) is None
    guest, _ = guestspec.for_guest(spec, "c1")
    # The container shares the guest's network (the pod's); other namespaces stay, pathless.
    assert guest["linux"]["namespaces"] == [{"type": "pid"}, {"type": "ipc"}]
    lone, _ = guestspec.for_guest({"process": {"args": ["sh"]},
                                   "linux": {"namespaces": [{"type": "network"}]}}, "c2")
    assert lone["linux"]["namespaces"] == [{"type": "network"}]


@pytest.mark.parametrize("args, message", [
    (("eth0!", "", 0, [], []), "interface name"),
    (("eth0", "zz:00:00:00:00:00", 0, [], []), "MAC address"),
    (("eth0", "", 20, [], []), "MTU 20"),
    (("eth0", "", 1500, ["10.0.0.300/24"], []), "address '10.0.0.300/24'"),
    (("eth0", "", 1500, [], [("default", "gw")]), "route default via gw"),
])
def test_guest_side_refuses_bad_interface_requests(args, message) -> None:
    from ember.agent import netconf
    from ember.ttrpc import Code, TTRPCError

    with pytest.raises(TTRPCError, match=message) as err:
        netconf.validate(*args)
    assert err.value.code == Code.INVALID_ARGUMENT


def test_guest_nic_set_up_runs_ip_through_the_given_runner(tmp_path, monkeypatch) -> None:
    """The agent's reaper reaps every child of PID 1, so `ip` must run through
    it: through subprocess its failure could be reaped away and read as success."""
    from ember.agent import netconf
    from ember.ttrpc import Code, TTRPCError

    (tmp_path / "lo").mkdir()
    (tmp_path / "enp0s1").mkdir()
    (tmp_path / "enp0s1" / "device").mkdir()
    monkeypatch.setattr(netconf, "has_addresses", lambda name: False)
    calls: list[list[str]] = []

    def run(argv):
        calls.append(list(argv))
        if argv[1:3] == ["addr", "add"]:
            return 2, b"RTNETLINK answers: File exists\n"
        return 0, b""

    with pytest.raises(TTRPCError, match="ip addr add 10.0.0.5/24 dev eth0: RTNETLINK answers: "
                                         "File exists") as err:
        netconf.configure(run, "eth0", "", 1500, ["10.0.0.5/24"], [("default", "10.0.0.1")],
                          sys_net=str(tmp_path))
    assert err.value.code == Code.INTERNAL
    assert calls[0] == ["ip", "link", "set", "dev", "lo", "up"]
    assert ["ip", "link", "set", "dev", "enp0s1", "name", "eth0"] in calls
    assert not any(c[1] == "route" for c in calls)  # stopped at the failure


def _fake_nic(sys_net, name, flags, mac, mtu, device=True) -> None:
    d = sys_net / name
    (d / "device").mkdir(parents=True) if device else d.mkdir(parents=True)
    (d / "flags").write_text(f"{flags:#x}\n")
    (d / "address").write_text(mac + "\n")
    (d / "mtu").write_text(f"{mtu}\n")


@pytest.mark.parametrize("state, expected", [
    # A template's NIC: down, already named eth0 and sized 1500, no address;
    # loopback brought up by the guest's init. Only what changes is run.
    ({"lo": 0x9, "nic": ("eth0", 0x1002, "52:54:00:00:00:01"), "addrs": False},
     [["link", "set", "dev", "eth0", "address", "0a:58:0a:00:00:05"],
      ["addr", "add", "10.0.0.5/24", "dev", "eth0"],
      ["link", "set", "dev", "eth0", "up"],
      ["route", "replace", "10.0.0.1/32", "dev", "eth0"],
      ["route", "replace", "default", "via", "10.0.0.1", "dev", "eth0"]]),
    # The same request again: up, with its MAC and addresses; they are replaced.
    ({"lo": 0x9, "nic": ("eth0", 0x1003, "0a:58:0a:00:00:05"), "addrs": True},
     [["addr", "flush", "dev", "eth0"],
      ["addr", "add", "10.0.0.5/24", "dev", "eth0"],
      ["link", "set", "dev", "eth0", "up"],
      ["route", "replace", "10.0.0.1/32", "dev", "eth0"],
      ["route", "replace", "default", "via", "10.0.0.1", "dev", "eth0"]]),
    # Nothing done yet, on a NIC that is up under another name and size.
    ({"lo": 0x8, "nic": ("enp0s1", 0x1003, "52:54:00:00:00:01"), "addrs": True, "mtu": 9000},
     [["link", "set", "dev", "lo", "up"],
      ["link", "set", "dev", "enp0s1", "down"],
      ["link", "set", "dev", "enp0s1", "name", "eth0"],
      ["link", "set", "dev", "eth0", "down"],
      ["link", "set", "dev", "eth0", "address", "0a:58:0a:00:00:05"],
      ["link", "set", "dev", "eth0", "mtu", "1500"],
      ["addr", "flush", "dev", "eth0"],
      ["addr", "add", "10.0.0.5/24", "dev", "eth0"],
      ["link", "set", "dev", "eth0", "up"],
      ["route", "replace", "10.0.0.1/32", "dev", "eth0"],
      ["route", "replace", "default", "via", "10.0.0.1", "dev", "eth0"]]),
])
def test_guest_nic_set_up_runs_only_the_steps_not_done(tmp_path, monkeypatch, state,
                                                      expected) -> None:
    """Each `ip` is a process start in the guest (~35 ms under TCG): a step whose
    result sysfs already shows is skipped, and everything else still runs."""
    from ember.agent import netconf

    _fake_nic(tmp_path, "lo", state["lo"], "00:00:00:00:00:00", 65536, device=False)
    nic, flags, mac = state["nic"]
    _fake_nic(tmp_path, nic, flags, mac, state.get("mtu", 1500))
    monkeypatch.setattr(netconf, "has_addresses", lambda name: state["addrs"])
    calls: list[list[str]] = []

    def run(argv):
        calls.append(list(argv[1:]))
        if argv[1:5] == ["link", "set", "dev", "enp0s1"] and argv[5] == "name":
            (tmp_path / "enp0s1").rename(tmp_path / "eth0")  # what the kernel does
        return 0, b""

    netconf.configure(run, "eth0", "0A:58:0A:00:00:05", 1500, ["10.0.0.5/24"],
                      [("default", "10.0.0.1"), ("10.0.0.1/32", "")], sys_net=str(tmp_path))
    assert calls == expected


@pytest.mark.root
def test_has_addresses_reads_the_kernel(tmp_path) -> None:
    """The check the NIC set-up skips its flush on, against real interfaces."""
    from ember.agent import netconf

    assert netconf.has_addresses("lo")  # 127.0.0.1
    name = f"embt{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"],
                   check=True)
    try:
        assert not netconf.has_addresses(name)  # down, no address
        subprocess.run(["ip", "addr", "add", "192.0.2.7/32", "dev", name], check=True)
        assert netconf.has_addresses(name)
        subprocess.run(["ip", "addr", "flush", "dev", name], check=True)
        subprocess.run(["ip", "-6", "addr", "add", "2001:db8::7/128", "dev", name,
                        "nodad"], check=True)
        assert netconf.has_addresses(name)  # IPv6 only
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)
    assert netconf.has_addresses("no-such-nic0")  # unsure: the flush runs and says why


def test_qemu_nic_arguments_and_template_key(tmp_path) -> None:
    from ember.sandbox.template import template_key
    from ember.vmm.base import VMSpec
    from ember.vmm.qemu import QemuVMM

    def spec(**kw) -> VMSpec:
        return VMSpec(vm_id="t-nic", kernel=tmp_path / "k", initrd=tmp_path / "i",
                      rootfs=tmp_path / "r", cmdline="console=ttyS0", work_dir=tmp_path, **kw)

    plain = QemuVMM(spec()).argv()
    assert "-netdev" not in plain
    tap = QemuVMM(spec(nic=True, net_fd=7, nic_mac="02:00:00:00:00:01")).argv()
    assert tap[tap.index("-netdev") + 1] == "tap,id=net0,fd=7,vhost=off"
    assert "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01" in tap
    placeholder = QemuVMM(spec(nic=True)).argv()  # a template build: no tap yet
    assert placeholder[placeholder.index("-netdev") + 1].startswith("hubport,id=net0")
    # A VM with a NIC never restores a template saved without one, and vice versa.
    qemu = ["qemu-system-x86_64"]
    assert template_key(spec(nic=True), qemu) != template_key(spec(), qemu)
    assert template_key(spec(nic=True, net_fd=7), qemu) == template_key(spec(nic=True, net_fd=9), qemu)


def test_a_failed_vm_boot_undoes_the_redirect(netns, tmp_path, guest_assets) -> None:
    """SandboxVM.boot(netns=) sets up the redirect, then the VMM cannot start:
    the error comes out and the netns is as CNI left it (no tap, no qdisc)."""
    from ember.config import load_config
    from ember.errors import EmberError
    from ember.sandbox.vm import SandboxVM

    name, path = netns
    cfg = load_config()
    cfg.vm.qemu_binary = str(tmp_path / "no-such-qemu")
    cfg.vm.accel = "tcg"
    cfg.jailer.enabled = False
    vm = SandboxVM(cfg, uuid.uuid4().hex * 2, tmp_path / "vm", 1, 256, use_template=False,
                   nic=True)
    with pytest.raises(EmberError):
        vm.boot(netns=path)
    assert "ingress" not in in_ns(name, "tc", "qdisc", "show")
    assert podnet.TAP_NAME not in in_ns(name, "ip", "-o", "link")
    assert "10.201.7.2/24" in in_ns(name, "ip", "-o", "addr", "show", "eth0")
