"""The guest kernel is complete: its modules load on demand, and none at boot.

Privileged containers (CRI "Privileged", "adding capability") expect a
bridge, netfilter, tun... The guest rootfs carries the kernel's module tree
and kmod's modprobe, so the kernel loads a module the first time something
needs it. Checked here: the selection of the tree (no VM), what the built
rootfs holds (read with debugfs, no mount), modprobe in the guest itself
(one diagnostic boot), and a privileged container in a VM run by the agent
making a bridge (one more boot).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from test_agent import base_image, base_spec, make_spec  # noqa: F401 - fixtures
from test_agent_vm import connect, vm  # noqa: F401 - fixture
from test_guest_boot import field, guest_factory  # noqa: F401 - fixture

from ember.guest import modules

# ----------------------------------------------------------------- no VM


def test_selection_keeps_what_kept_modules_need_and_drops_the_rest():
    deps = modules.parse_deps(
        "kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko\n"
        "kernel/net/802/stp.ko: kernel/net/llc/llc.ko\n"
        "kernel/net/llc/llc.ko:\n"
        "kernel/net/smc/smc.ko: kernel/drivers/infiniband/core/ib_core.ko\n"
        "kernel/drivers/infiniband/core/ib_core.ko:\n"
        "kernel/drivers/infiniband/hw/mlx5/mlx5_ib.ko: kernel/drivers/infiniband/core/ib_core.ko\n"
        "kernel/sound/core/snd.ko:\n"
    )
    kept = modules.select(deps)
    assert {"kernel/net/bridge/bridge.ko", "kernel/net/802/stp.ko", "kernel/net/llc/llc.ko"} <= kept
    # A dropped folder's module stays when a kept module needs it ...
    assert "kernel/drivers/infiniband/core/ib_core.ko" in kept
    # ... and goes otherwise.
    assert "kernel/drivers/infiniband/hw/mlx5/mlx5_ib.ko" not in kept
    assert "kernel/sound/core/snd.ko" not in kept


def test_the_trees_the_brief_needs_are_never_dropped():
    for folder in ("net/", "fs/", "drivers/net/", "drivers/block/", "drivers/md/", "crypto/",
                   "lib/"):
        assert not any(f"kernel/{folder}".startswith(d) for d in modules.DROPPED), folder


# ------------------------------------------------------- the built rootfs


def _debugfs(image: Path, request: str) -> str:
    proc = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          text=True, check=False)
    return proc.stdout


@pytest.mark.vm
def test_rootfs_holds_the_module_tree_and_kmod(guest_assets):
    release = guest_assets.kernel_release
    moddir = f"/usr/lib/modules/{release}"
    dep = _debugfs(guest_assets.rootfs, f"cat {moddir}/modules.dep")
    lines = dict(line.split(":", 1) for line in dep.splitlines() if ":" in line)
    assert "kernel/net/bridge/bridge.ko.zst" in lines, dep[:500]
    for wanted in ("drivers/net/tun.ko.zst", "net/netfilter/nf_tables.ko.zst",
                   "drivers/md/dm-thin-pool.ko.zst", "fs/overlayfs/overlay.ko.zst"):
        assert f"kernel/{wanted}" in lines, wanted
    assert not any(p.startswith("kernel/drivers/infiniband/hw/") for p in lines)
    # Every dependency named is shipped: modprobe never trips on a missing file.
    for needs in lines.values():
        assert all(d in lines for d in needs.split()), needs
    listing = _debugfs(guest_assets.rootfs, f"ls {moddir}")
    assert "modules.dep.bin" in listing and "modules.alias.bin" in listing
    # The kernel runs /sbin/modprobe (/sbin -> usr/sbin): kmod's, not busybox's.
    assert 'Fast link dest: "/bin/kmod"' in _debugfs(guest_assets.rootfs,
                                                     "stat /usr/sbin/modprobe")
    assert "Type: regular" in _debugfs(guest_assets.rootfs, "stat /usr/bin/kmod")
    manifest = json.loads((guest_assets.kernel.parent / "manifest.json").read_text())
    assert manifest["rootfs_modules"]["shipped"] == len(lines)


# ------------------------------------------------------------ in a guest

# Markers are computed ($((...))) so the console's echo of the command line
# never matches them. Busybox sh runs its own modprobe applet for a bare
# `modprobe`, so the kernel's helper path is named in full.
MODPROBE_CHECKS = (
    "echo HELPER=$(cat /proc/sys/kernel/modprobe);"
    "echo HELPER_IS=$(readlink -f $(cat /proc/sys/kernel/modprobe));"
    "echo BRIDGE_AT_BOOT=$(grep -c '^bridge ' /proc/modules);"
    "s=$(date +%s); /sbin/modprobe nosuchmod 2>&1 | sed 's/^/UNKNOWN=/'; e=$(date +%s);"
    "echo UNKNOWN_SECONDS=$((e-s));"
    "/sbin/modprobe tun && echo TUN=$(grep -c '^tun ' /proc/modules);"
    "echo DONE$((1+1))"
)


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(300)
def test_guest_modprobe_is_kmod_and_unknown_modules_fail_fast(guest_assets, guest_factory):  # noqa: F811
    g = guest_factory(guest_assets, f'-- /bin/sh -c "{MODPROBE_CHECKS}"')
    g.wait_for("DONE2", 240)
    out = g.text()
    helper = field(out, "HELPER")
    assert helper == "/sbin/modprobe"
    assert field(out, "HELPER_IS") == "/usr/bin/kmod"
    assert field(out, "BRIDGE_AT_BOOT") == "0"
    assert field(out, "UNKNOWN") == (
        f"modprobe: FATAL: Module nosuchmod not found in directory "
        f"/lib/modules/{guest_assets.kernel_release}")
    assert int(field(out, "UNKNOWN_SECONDS")) <= 2
    assert field(out, "TUN") == "1"


ALL_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]


def privileged(spec: dict) -> dict:
    """What containerd makes of a CRI ``privileged: true`` container: every
    capability, nothing masked or read-only in /proc and /sys."""
    spec["process"]["capabilities"] = {k: list(ALL_CAPS) for k in
                                       ("bounding", "effective", "permitted")}
    spec["linux"].pop("maskedPaths", None)
    spec["linux"].pop("readonlyPaths", None)
    return spec


CONTAINER_SCRIPT = (
    "cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' ' | sed 's/^/AT_START=/'; echo;"
    "brctl addbr br0 && echo BRCTL=ok;"
    "echo BR0=$(cat /sys/class/net/br0/type);"
    "grep -q '^bridge ' /proc/modules && echo LOADED=bridge;"
    "ip link add x0 type nosuchkind 2>&1 | sed 's/^/UNKNOWN_KIND=/'"
)


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.timeout(400)
def test_privileged_container_creates_a_bridge_loading_the_module_on_demand(
        vm, guest_assets, base_spec):  # noqa: F811
    _qemu, sock, console = vm
    agent = connect(sock)
    try:
        try:
            agent.wait_ready(240)
        except Exception:
            print(console.read_text(errors="replace")[-3000:])
            raise
        spec = privileged(make_spec(base_spec, ["sh", "-c", CONTAINER_SCRIPT]))
        agent.create_container("priv", spec, {"kind": "serial", "address": "ctr-blk"})
        started = time.monotonic()
        agent.start_container("priv")
        assert agent.wait_process("priv", timeout=120).exit_status == 0
        took = time.monotonic() - started
        out = b"".join(agent.iter_output("priv")).decode()
        agent.remove_container("priv")
    finally:
        agent.close()
    values = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", out, re.M))
    # Nothing was loaded eagerly: only the initrd's virtio/overlay modules are in.
    manifest = json.loads((guest_assets.kernel.parent / "manifest.json").read_text())
    initrd_modules = {m for names in manifest["modules"].values() for m in names}
    at_start = set(values["AT_START"].split())
    assert at_start <= initrd_modules, at_start - initrd_modules
    assert "bridge" not in at_start
    # brctl made the bridge: the kernel ran modprobe bridge (and stp, llc) on demand.
    assert values.get("BRCTL") == "ok", out
    assert values["BR0"] == "1"  # ARPHRD_ETHER: a real net device
    assert values.get("LOADED") == "bridge", out
    # An unknown link kind is refused at once with the kernel's answer, no hang.
    assert values["UNKNOWN_KIND"] == "ip: RTNETLINK answers: Operation not supported", out
    assert took < 60, f"the container took {took:.0f}s"
