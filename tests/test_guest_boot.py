"""Boot the built guest in a real QEMU microvm (TCG) and look at what it does.

One boot runs a diagnostic command instead of the agent (``-- CMD`` on the
kernel command line) to check the mounts /init makes, Python and SCSI disk
hot-plug; one boot reaches the real agent over virtio-serial; one boots a
rootfs that is not ours and must fail fast with EMBER-INIT-ERROR.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ember.vmm.qemu.machine import FIRMWARE, MACHINE

pytestmark = [pytest.mark.vm, pytest.mark.root]



class Guest:
    """One QEMU process with the devices Ember gives every sandbox."""

    def __init__(self, assets, append: str = "", rootfs: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="eg-", dir="/tmp"))  # short socket paths
        self.console = self.dir / "console.log"
        self.agent_sock = self.dir / "agent.sock"
        self.qmp_sock = self.dir / "qmp.sock"
        cmdline = f"{assets.cmdline} {append}".strip()
        self.argv = [
            "qemu-system-x86_64", "-M", MACHINE, "-bios", FIRMWARE, "-accel", "tcg", "-cpu", "max", "-m", "512",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(assets.kernel), "-initrd", str(assets.initrd), "-append", cmdline,
            "-drive", f"id=root,file={rootfs or assets.rootfs},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,path={self.agent_sock},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=agent.0",
            "-device", "virtio-scsi-device,id=scsi0",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-serial", f"file:{self.console}",
        ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

    def text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, marker: str, timeout: float) -> float:
        """Seconds since QEMU started when ``marker`` appeared on the console."""
        deadline = time.monotonic() + timeout
        while marker not in self.text():
            if self.proc.poll() is not None and marker not in self.text():
                pytest.fail(f"QEMU exited before {marker!r}; console:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {marker!r} within {timeout}s; console:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        return time.monotonic() - self.started

    def qmp(self) -> QMP:
        deadline = time.monotonic() + 30
        while not self.qmp_sock.exists():
            assert time.monotonic() < deadline, "QMP socket never appeared"
            time.sleep(0.02)
        return QMP(self.qmp_sock)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class QMP:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rw")
        json.loads(self.f.readline())  # greeting
        assert "return" in self.call("qmp_capabilities")

    def call(self, command: str, **arguments) -> dict:
        self.f.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "return" in reply or "error" in reply:
                return reply

    def close(self) -> None:
        self.f.close()
        self.sock.close()


@pytest.fixture
def guest_factory():
    guests: list[Guest] = []

    def make(*args, **kwargs) -> Guest:
        guests.append(Guest(*args, **kwargs))
        return guests[-1]

    try:
        yield make
    finally:
        for g in guests:
            g.close()


# The diagnostic command. Markers are computed ($((...))) so that the echo of
# the command line by `ember.debug=1` never matches them.
CHECKS = (
    "echo PY=$(python3.11 -c 'import sys,google.protobuf,ember.agent;print(sys.version.split()[0])');"
    "echo CG=$(cat /sys/fs/cgroup/cgroup.subtree_control);"
    "echo HOST=$(hostname);"
    "echo PORT=$(readlink /dev/virtio-ports/agent.0);"
    "grep -E ' / | /run | /tmp | /var/tmp | /dev/pts | /dev/shm | /sys/fs/cgroup ' /proc/mounts"
    " | sed 's/^/MNT /';"
    "echo READY$((1+1));"
    "while [ ! -b /dev/sda ]; do sleep 0.1; done;"
    "echo SDA=$(readlink /sys/block/sda/device) $(cat /sys/block/sda/size)"
)


def field(console: str, name: str) -> str:
    """The value of a ``NAME=value`` line the diagnostic command printed."""
    for line in console.splitlines():
        if line.startswith(name + "="):
            return line[len(name) + 1 :].strip()
    raise AssertionError(f"no {name}= line on the console:\n{console[-3000:]}")


@pytest.mark.timeout(240)
def test_init_prepares_the_guest_and_scsi_disks_hotplug(guest_assets, guest_factory, tmp_path):
    g = guest_factory(guest_assets, f'ember.debug=1 ember.hostname=gtest -- /bin/sh -c "{CHECKS}"')
    ready = g.wait_for("READY2", 180)
    out = g.text()
    # /init's stages, in order, with timestamps (ember.debug=1).
    stages = ["init started", "modules loaded", "rootfs mounted", "mounts ready", "running"]
    positions = [out.index(f"{s}") for s in stages]
    assert positions == sorted(positions)
    assert re.search(r"EMBER-INIT: \d+\.\d+ init started", out)
    assert field(out, "PY").startswith("3.11.")
    assert set(field(out, "CG").split()) >= {"cpu", "memory", "pids", "io"}
    assert field(out, "HOST") == "gtest"
    assert field(out, "PORT").startswith("../vport")  # the virtio-serial port named agent.0
    mounts = {line.split()[2]: line.split() for line in out.splitlines() if line.startswith("MNT ")}
    assert mounts["/"][3] == "ext4" and mounts["/"][4].startswith("ro")
    assert mounts["/sys/fs/cgroup"][3] == "cgroup2"
    for tmpfs in ("/run", "/tmp", "/var/tmp", "/dev/shm"):
        assert mounts[tmpfs][3] == "tmpfs", tmpfs
    assert mounts["/dev/pts"][3] == "devpts"

    # Hot-plug a SCSI disk the way the sandbox attaches container disks.
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(64 << 20)
    qmp = g.qmp()
    try:
        node = {"driver": "raw", "node-name": "d1",
                "file": {"driver": "file", "filename": str(disk)}}
        assert "return" in qmp.call("blockdev-add", **node)
        plugged = time.monotonic()
        reply = qmp.call("device_add", driver="scsi-hd", bus="scsi0.0", drive="d1", id="disk1",
                         channel=0, lun=1, **{"scsi-id": 0})
        assert "return" in reply, reply
        g.wait_for("\nSDA=", 60)
        seen = time.monotonic() - plugged
    finally:
        qmp.close()
    line = field(g.text(), "SDA")
    assert line.split()[0].endswith("/0:0:0:1") and line.split()[1] == str((64 << 20) // 512)
    # The command finished: the guest powers itself off, QEMU exits cleanly.
    assert g.proc.wait(timeout=60) == 0
    assert "command exited with status 0" in g.text()
    print(f"\ndiagnostics ready {ready:.1f}s after QEMU start; /dev/sda {seen:.2f}s after device_add")


@pytest.mark.timeout(240)
def test_guest_boots_to_the_agent(guest_assets, guest_factory):
    from ember.sandbox.agent_client import AgentClient

    g = guest_factory(guest_assets)
    deadline = time.monotonic() + 30
    while not g.agent_sock.exists():
        assert time.monotonic() < deadline and g.proc.poll() is None, g.text()
        time.sleep(0.01)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(g.agent_sock))
    client = AgentClient(sock)
    try:
        details = client.wait_ready(180)
        booted = time.monotonic() - g.started
    finally:
        client.close()
    assert details.kernel_release == guest_assets.kernel_release
    assert details.crun_version.startswith("crun version")
    out = g.text()
    assert "EMBER-INIT" not in out  # quiet unless ember.debug=1
    assert "Kernel panic" not in out
    print(f"\ncold boot to agent ready: {booted:.1f}s")


@pytest.mark.timeout(180)
def test_foreign_rootfs_fails_fast_with_an_init_error(guest_assets, guest_factory, tmp_path):
    foreign = tmp_path / "foreign.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(foreign), "8M"], check=True)
    g = guest_factory(guest_assets, rootfs=foreign)
    assert g.proc.wait(timeout=150) == 0, "the guest should power off by itself"
    out = g.text()
    assert "EMBER-INIT-ERROR: /dev/vda is not an ember guest rootfs (no /usr/bin/python3.11)" in out
    assert "Kernel panic" not in out
