"""A real QEMU microvm (TCG) booted through ember-jailer, checked from the host."""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from test_jailer_support import (
    busybox_initrd,
    cgroup_leaves,
    guest_kernel,
    qemu_args,
    remove_cgroup_parent,
    status,
    wait_for,
)

from ember.jailer import cgroups
from ember.jailer.api import JailSpec, Placement, build_argv, cleanup, jail_dir, jail_root, vmm_pid
from ember.vmm.qemu.machine import FIRMWARE, MACHINE

QEMU = "/usr/bin/qemu-system-x86_64"


@pytest.fixture(scope="module")
def kernel(request) -> Path:
    return guest_kernel() or request.getfixturevalue("guest_assets").kernel


class _QMP:
    """Just enough QMP for these tests, including passing an fd (``getfd``)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.file.readline()  # greeting
        self("qmp_capabilities")

    def __call__(self, cmd: str, fd: int | None = None, **args) -> dict:
        data = json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n"
        if fd is None:
            self.sock.sendall(data)
        else:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", [fd]))])
        while "event" in (reply := json.loads(self.file.readline())):
            pass
        assert "error" not in reply, reply
        return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _qmp(path: Path, *commands: str) -> list[dict]:
    qmp = _QMP(path)
    try:
        return [qmp(cmd) for cmd in commands]
    finally:
        qmp.close()


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(180)
@pytest.mark.skipif(cgroups.v1_mount("memory") is None, reason="needs cgroup v1 (this host)")
def test_qemu_boots_confined_and_leaves_nothing(kernel, tmp_path):
    initrd = busybox_initrd(tmp_path / "initrd.img",
                            "/bin/busybox echo EMBER-JAIL-UP\n/bin/busybox sleep 2\n"
                            "/bin/busybox poweroff -f\n")
    run = Path(tempfile.mkdtemp(prefix="jq-", dir="/tmp"))
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    base = Path(tempfile.mkdtemp(prefix="jb-", dir="/tmp"))
    parent = f"ember-test-{uuid.uuid4().hex[:8]}"
    spec = JailSpec(
        id=f"vm-{uuid.uuid4().hex[:8]}", exec_file=QEMU, uid=31337, gid=31337,
        chroot_base_dir=str(base), vmm_kind="qemu", new_pid_ns=True, parent_cgroup=parent,
        cgroup_version=1,
        cgroups={"memory.limit_in_bytes": str(1 << 30), "pids.max": "200", "cpu.shares": "512"},
        files=[Placement(str(kernel), "/vmlinuz", "hardlink"),
               Placement(str(initrd), "/initrd.img", "copy"),
               Placement(str(disk), "/disk.img", "bind", writable=True),
               Placement(str(run), "/run", "bind", writable=True)],
        args=qemu_args("/vmlinuz", "/initrd.img",
                       "-qmp", "unix:/run/qmp.sock,server=on,wait=off",
                       "-chardev", "socket,id=agent,path=/run/agent.sock,server=on,wait=off",
                       "-device", "virtio-serial-device",
                       "-device", "virtserialport,chardev=agent,name=agent.0",
                       "-drive", "file=/disk.img,if=none,id=d0,format=raw",
                       "-device", "virtio-blk-device,drive=d0"),
    )
    console = tmp_path / "console.log"
    with open(console, "wb") as out:
        proc = subprocess.Popen(build_argv(spec), stdout=out, stderr=subprocess.STDOUT)
    try:
        pid = wait_for(lambda: vmm_pid(spec), timeout=30)
        st = status(pid)
        assert st["Name"].startswith("qemu-system")
        assert st["Uid"].split() == ["31337"] * 4 and st["Gid"].split() == ["31337"] * 4
        assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == int(st["CapBnd"], 16) == 0
        assert (st["NoNewPrivs"], st["Seccomp"]) == ("1", "2")
        assert os.readlink(f"/proc/{pid}/root") == str(jail_root(spec))
        for ns in ("mnt", "pid"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        own = Path(f"/proc/{pid}/cgroup").read_text()
        for ctl in ("memory", "pids", "cpu"):
            assert f":{ctl}:/{parent}/{spec.id}\n" in own
        leaf = cgroups.v1_mount("memory") / parent / spec.id
        assert (leaf / "memory.limit_in_bytes").read_text() == f"{1 << 30}\n"
        assert (cgroups.v1_mount("cpu") / parent / spec.id / "cpu.shares").read_text() == "512\n"
        # The sockets QEMU made in its /run are reachable from the host.
        wait_for(lambda: (run / "qmp.sock").exists(), timeout=20)
        assert _qmp(run / "qmp.sock", "query-status")[0]["status"] == "running"
        assert (run / "agent.sock").stat().st_uid == 31337
        assert proc.wait(timeout=120) == 0, console.read_text()[-2000:]
        assert "EMBER-JAIL-UP" in console.read_text()
        assert not jail_dir(spec).exists()
        assert cgroup_leaves(parent, spec.id) == []
        assert disk.exists() and kernel.exists()
    finally:
        proc.kill()
        proc.wait()
        cleanup(spec)
        remove_cgroup_parent(parent)
        subprocess.run(["rm", "-rf", str(base), str(run)], check=False)


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(240)
def test_ember_guest_agent_answers_from_a_jailed_qemu(guest_assets, tmp_path):
    """The project's own guest (rootfs, agent over virtio-serial, virtio-scsi,
    virtio-rng, console file) under the QEMU allow-list in kill mode."""
    from ember.sandbox.agent_client import AgentClient

    run = Path(tempfile.mkdtemp(prefix="jg-", dir="/tmp"))
    base = Path(tempfile.mkdtemp(prefix="jb-", dir="/tmp"))
    spec = JailSpec(id=f"vm-{uuid.uuid4().hex[:8]}", exec_file=QEMU, uid=31338, gid=31338,
                    chroot_base_dir=str(base), vmm_kind="qemu", new_pid_ns=True)
    spec.place(str(run), "bind", writable=True, jail_path="/run")
    spec.args = [
        "-M", MACHINE, "-bios", FIRMWARE, "-accel", "tcg", "-cpu", "max",
        "-m", "512", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", spec.place(guest_assets.kernel), "-initrd", spec.place(guest_assets.initrd),
        "-append", guest_assets.cmdline,
        "-chardev", "file,id=con,path=/run/console.log", "-serial", "chardev:con",
        "-qmp", "unix:/run/qmp.sock,server=on,wait=off",
        "-drive", f"id=root,file={spec.place(guest_assets.rootfs, 'bind')},format=raw,"
                  "if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device",
        "-chardev", "socket,id=agent,path=/run/agent.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=agent.0",
        "-device", "virtio-scsi-device,id=scsi0",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng0",
    ]
    proc = subprocess.Popen(build_argv(spec), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (run / "agent.sock").exists(), timeout=30)
        assert status(vmm_pid(spec))["Seccomp"] == "2"
        with AgentClient.connect_unix(str(run / "agent.sock")) as agent:
            agent.wait_ready(timeout=150)
            qmp = _QMP(run / "qmp.sock")
            try:
                # Hot-plug: a disk made visible in the running jail by a hard link.
                disk = tmp_path / "hot.img"
                disk.write_bytes(b"\0" * (4 << 20))
                os.chown(disk, 31338, 31338)
                os.link(disk, jail_root(spec) / "hot.img")
                qmp("blockdev-add", **{"driver": "raw", "node-name": "n-hot",
                                       "file": {"driver": "file", "filename": "/hot.img"}})
                qmp("device_add", driver="scsi-hd", id="d-hot", bus="scsi0.0", drive="n-hot")
                # Snapshot: migrate to a file descriptor passed over QMP.
                qmp("stop")
                with open(tmp_path / "snap.bin", "wb") as snap:
                    qmp("getfd", fd=snap.fileno(), fdname="snap")
                qmp("migrate", uri="fd:snap")
                wait_for(lambda: qmp("query-migrate").get("status") in ("completed", "failed"),
                         timeout=60, interval=0.1)
                assert qmp("query-migrate")["status"] == "completed"
                assert (tmp_path / "snap.bin").stat().st_size > 1 << 20
                qmp("cont")
                assert qmp("query-status")["status"] == "running"
            finally:
                qmp.close()
            agent.guest_details()
            agent.destroy_sandbox()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out.decode(errors="replace")[-1500:]
        assert (run / "console.log").stat().st_size > 0
        assert not jail_dir(spec).exists()
    finally:
        proc.kill()
        proc.wait()
        cleanup(spec)
        subprocess.run(["rm", "-rf", str(base), str(run)], check=False)
