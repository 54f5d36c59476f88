"""QEMU driver: a ``microvm`` machine with virtio-mmio devices.

Device layout (identical for a cold boot and a snapshot restore, which is what
lets a restored template serve any sandbox):

* virtio-blk ``root``: the read-only guest rootfs (Python + agent + crun);
* virtio-serial port ``agent.0``: the agent channel, a Unix socket on the host
  (this host has no vhost-vsock);
* virtio-scsi ``scsi0``: container disks are hot-plugged here as ``scsi-hd``
  (microvm has no PCI hotplug, but a SCSI bus takes hotplugged disks);
* virtio-rng, and the ISA serial console captured to ``console.log``.

Control goes through QMP on ``qmp.sock``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from ember.errors import VMError
from ember.vmm.base import VMM, Drive, GuestDevice, VMSpec
from ember.vmm.qmp import QMPClient

MACHINE = "microvm,x-option-roms=off,isa-serial=on,rtc=off"
MAX_UNIX_PATH = 107


def _blockdev(drive: Drive) -> dict:
    node: dict[str, object] = {
        "driver": drive.format,
        "node-name": f"n-{drive.drive_id}",
        "file": {"driver": "file", "filename": str(drive.path)},
    }
    if drive.readonly:
        node["read-only"] = True
    return node


class QemuVMM(VMM):
    kind = "qemu"

    def __init__(self, spec: VMSpec, binary: str = "qemu-system-x86_64") -> None:
        super().__init__(spec)
        self.binary = binary
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None
        self._qmp: QMPClient | None = None
        self._qmp_lock = threading.Lock()
        self._next_target = 1
        self._targets: dict[str, int] = {}

    # ---------------------------------------------------------------- argv
    def _accel_args(self) -> list[str]:
        if self.spec.accel == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", "tcg,tb-size=64", "-cpu", "max"]

    def _scsi_device(self, drive: Drive, target: int) -> dict:
        return {
            "driver": "scsi-hd",
            "id": f"d-{drive.drive_id}",
            "bus": "scsi0.0",
            "channel": 0,
            "scsi-id": target,
            "lun": 0,
            "drive": f"n-{drive.drive_id}",
        }

    def argv(self) -> list[str]:
        """The full QEMU command line for this VM."""
        s = self.spec
        for sock in (s.agent_socket, s.control_socket):
            if len(str(sock)) > MAX_UNIX_PATH:
                raise VMError(f"socket path too long for a Unix socket: {sock}")
        args = [
            self.binary, "-name", f"ember-{s.vm_id[:12]}",
            "-M", MACHINE, *self._accel_args(),
            "-m", str(s.memory_mib), "-smp", str(s.vcpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(s.kernel), "-initrd", str(s.initrd), "-append", s.cmdline,
            "-chardev", f"file,id=con,path={s.console_log}", "-serial", "chardev:con",
            "-qmp", f"unix:{s.control_socket},server=on,wait=off",
            "-drive", f"id=root,file={s.rootfs},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,path={s.agent_socket},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=agent.0",
            "-device", "virtio-scsi-device,id=scsi0",
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=rng0",
        ]
        for drive in s.drives:
            target = self._alloc_target(drive.drive_id)
            args += ["-blockdev", json.dumps(_blockdev(drive))]
            args += ["-device", json.dumps(self._scsi_device(drive, target))]
        if s.restore_from is not None:
            args += ["-incoming", f"exec:cat {s.restore_from}"]
        return args

    def _alloc_target(self, drive_id: str) -> int:
        target = self._next_target
        self._next_target += 1
        self._targets[drive_id] = target
        return target

    # ------------------------------------------------------------ lifecycle
    @property
    def pid(self) -> int | None:
        return self._pid

    def start(self) -> None:
        s = self.spec
        s.work_dir.mkdir(parents=True, exist_ok=True)
        for stale in (s.agent_socket, s.control_socket):
            stale.unlink(missing_ok=True)
        argv = self.argv()
        log = open(s.work_dir / "vmm.log", "ab")
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True,
            )
        except FileNotFoundError:
            raise VMError(f"QEMU not found: {self.binary} (install qemu-system-x86)") from None
        finally:
            log.close()
        self._pid = self._proc.pid
        if s.restore_from is not None:
            self._wait_running(timeout=60)

    def _wait_running(self, timeout: float) -> None:
        """After -incoming, QEMU loads the snapshot and then runs the guest."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.qmp("query-status")
            state = status.get("status") if isinstance(status, dict) else None
            if state == "running":
                return
            if state in ("paused", "postmigrate", "prelaunch") and not self._incoming_active():
                self.qmp("cont")
                return
            self._check_alive()
            time.sleep(0.01)
        raise VMError(f"restoring VM snapshot {self.spec.restore_from} timed out")

    def _incoming_active(self) -> bool:
        info = self.qmp("query-migrate")
        return isinstance(info, dict) and info.get("status") in ("active", "setup")

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise VMError(f"QEMU exited with code {self._proc.returncode}: {self.vmm_log_tail()}")

    def vmm_log_tail(self) -> str:
        try:
            text = (self.spec.work_dir / "vmm.log").read_text(errors="replace").strip()
        except OSError:
            return ""
        lines = text.splitlines()
        return lines[-1] if lines else ""

    def qmp(self, command: str, **args: object) -> object:
        with self._qmp_lock:
            if self._qmp is None:
                self._check_alive()
                self._qmp = QMPClient(self.spec.control_socket, timeout=15)
            client = self._qmp
        return client.execute(command, **args)

    # --------------------------------------------------------------- drives
    def add_drive(self, drive: Drive) -> GuestDevice:
        target = self._alloc_target(drive.drive_id)
        self.qmp("blockdev-add", **_blockdev(drive))
        try:
            self.qmp("device_add", **self._scsi_device(drive, target))
        except VMError:
            self.qmp("blockdev-del", **{"node-name": f"n-{drive.drive_id}"})
            raise
        return GuestDevice("scsi", f"{target}:0")

    def guest_device(self, drive_id: str) -> GuestDevice:
        """Where a boot-time drive shows up in the guest."""
        return GuestDevice("scsi", f"{self._targets[drive_id]}:0")

    def remove_drive(self, drive_id: str) -> None:
        if drive_id not in self._targets:
            return
        try:
            self.qmp("device_del", id=f"d-{drive_id}")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                ids = {d.get("name") for d in self._qom_scsi_children()}
                if f"d-{drive_id}" not in ids:
                    break
                time.sleep(0.02)
            self.qmp("blockdev-del", **{"node-name": f"n-{drive_id}"})
        except VMError:
            pass
        self._targets.pop(drive_id, None)

    def _qom_scsi_children(self) -> list[dict]:
        try:
            out = self.qmp("qom-list", path="/machine/peripheral")
        except VMError:
            return []
        return out if isinstance(out, list) else []

    # --------------------------------------------------------------- agent
    def connect_agent(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.spec.agent_socket))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                self._check_alive()
                if time.monotonic() > deadline:
                    raise VMError("agent channel socket did not appear") from None
                time.sleep(0.01)

    # ---------------------------------------------------- pause / snapshot
    def pause(self) -> None:
        self.qmp("stop")

    def resume(self) -> None:
        self.qmp("cont")

    def save_snapshot(self, path: Path) -> None:
        self.qmp("stop")
        self.qmp("migrate", uri=f"exec:cat > {path}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = self.qmp("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise VMError(f"saving VM snapshot failed: {info.get('error-desc', status)}")
            time.sleep(0.02)
        raise VMError("saving VM snapshot timed out")

    # ----------------------------------------------------------------- stop
    def stop(self, timeout: float = 5.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._close_qmp()
            return
        try:
            self.qmp("quit")
        except VMError:
            pass
        if self.wait(timeout) is None:
            self.kill()
        self._close_qmp()

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.kill(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        self._close_qmp()

    def wait(self, timeout: float | None = None) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def exited(self) -> bool:
        return self._proc is not None and self._proc.poll() is not None

    def _close_qmp(self) -> None:
        with self._qmp_lock:
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None
