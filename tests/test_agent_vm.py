"""The agent as PID 1 in a real micro-VM: virtio-serial, SCSI and virtio-blk disks, cgroup v2.

One boot covers what only a guest has: finding disks by virtio-blk serial and
by SCSI address, cgroup v2 stats, a host that disconnects and comes back on
the virtio-serial port, and DestroySandbox powering the VM off.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
from test_agent import base_image, base_spec, make_spec  # noqa: F401 - fixtures

from ember.errors import CommandNotFound
from ember.sandbox.agent_client import AgentClient
from ember.vmm.qemu.machine import FIRMWARE, MACHINE

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(400),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


@pytest.fixture
def vm(guest_assets, base_image, tmp_path):  # noqa: F811
    disks = {}
    for name in ("blk", "scsi"):
        disks[name] = tmp_path / f"{name}.ext4"
        shutil.copy(base_image, disks[name])
    sock = tmp_path / "agent.sock"
    cmd = [
        "qemu-system-x86_64", "-name", f"ember-agenttest-{os.getpid()}",
        "-M", MACHINE, "-bios", FIRMWARE, "-accel", "tcg", "-cpu", "max",
        "-m", "512", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(guest_assets.kernel), "-initrd", str(guest_assets.initrd),
        "-append", guest_assets.cmdline,
        "-chardev", f"file,id=con,path={tmp_path / 'console.log'}", "-serial", "chardev:con",
        "-drive", f"id=root,file={guest_assets.rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=agent.0",
        "-device", "virtio-scsi-device,id=scsi0",
        "-drive", f"id=s1,file={disks['scsi']},format=raw,if=none",
        "-device", "scsi-hd,drive=s1,bus=scsi0.0,scsi-id=1,lun=0",
        "-drive", f"id=b1,file={disks['blk']},format=raw,if=none",
        "-device", "virtio-blk-device,drive=b1,serial=ctr-blk",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc, sock, tmp_path / "console.log"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def connect(sock) -> AgentClient:
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert time.monotonic() < deadline, "QEMU did not create the agent socket"
        time.sleep(0.05)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    return AgentClient(s, timeout=60)


def test_agent_in_guest(vm, guest_assets, base_spec):  # noqa: F811
    qemu, sock, console = vm
    agent = connect(sock)
    try:
        details = agent.wait_ready(240)
    except Exception:
        print(console.read_text(errors="replace")[-3000:])
        raise
    assert details.kernel_release == guest_assets.kernel_release
    agent.sync_guest(entropy=os.urandom(32))

    # virtio-blk disk found by serial; the container gets its own v2 cgroup
    spec = make_spec(base_spec, ["sh", "-c", "echo hi; cat /proc/self/cgroup; exit 3"])
    agent.create_container("c1", spec, {"kind": "serial", "address": "ctr-blk"})
    agent.start_container("c1")
    assert agent.wait_process("c1").exit_status == 3
    assert b"".join(agent.iter_output("c1")) == b"hi\n0::/ember/c1\n"
    agent.remove_container("c1")

    # SCSI disk found by target:lun; stats from cgroup v2
    agent.create_container("c2", make_spec(base_spec, ["sleep", "60"]),
                           {"kind": "scsi", "address": "1:0"})
    agent.start_container("c2")
    st = agent.stats_container("c2")
    assert st.memory_usage > 0 and st.pids_current == 1 and "anon" in st.memory_stat
    agent.update_container("c2", {"memory": {"limit": 64 << 20}})
    assert agent.stats_container("c2").memory_limit == 64 << 20
    with pytest.raises(CommandNotFound):
        agent.exec_process("c2", "e1", {"args": ["nosuch"], "cwd": "/", "env": ["PATH=/bin"]})

    # the host end goes away and comes back: the agent serves the port again
    agent.close()
    time.sleep(0.5)
    agent = connect(sock)
    agent.wait_ready(60)
    assert [(p.container_id, p.running) for p in agent.list_processes()] == [("c2", True)]

    # DestroySandbox kills the containers and powers the VM off (agent is PID 1)
    agent.destroy_sandbox()
    assert qemu.wait(60) == 0
    agent.close()
