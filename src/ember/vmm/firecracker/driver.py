"""Firecracker driver: the same VMM interface as QEMU, over Firecracker's REST API.

One ``firecracker --api-sock`` process per VM, configured entirely by HTTP
requests on that socket (see :mod:`ember.vmm.firecracker.api`), in an order Firecracker
accepts: logger and metrics first (the only things allowed before a snapshot
load), then machine, boot source, drives (read-only guest rootfs as the root
device, boot-time drives, the placeholder pool), vsock, entropy, optional
network, balloon and MMDS, and finally ``InstanceStart``.

* Agent channel: hybrid vsock (:mod:`ember.vmm.vsock`) on ``agent.sock``,
  guest port 1024, where the agent listens when there is no virtio-serial port.
* Container disks: placeholder drives patched onto the real image
  (:mod:`ember.vmm.firecracker.drives` explains how the guest finds them).
* Snapshots: ``PATCH /vm`` Paused + ``PUT /snapshot/create``; restore starts a
  fresh process whose first non-logging call is ``PUT /snapshot/load``.
* Stop: ``SendCtrlAltDel``, then SIGKILL after the timeout.

Files in ``work_dir``: ``firecracker.sock`` (API), ``agent.sock`` (vsock),
``console.log`` (guest serial, Firecracker's stdout), ``vmm.log`` (its
stderr), ``firecracker.log`` (its logger), ``metrics.json``, ``fc-drives/``.
Under ember-jailer (``VMSpec.jailer``) the sockets live in the jail and every
path Firecracker is given is a jail path (:mod:`ember.vmm.firecracker.jail`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ember.config import Config
from ember.errors import VMError
from ember.util import atomic_write_json
from ember.vmm import vsock
from ember.vmm.base import VMM, Drive, GuestDevice, VMSpec, describe_exit
from ember.vmm.firecracker import drives as fc_drives
from ember.vmm.firecracker import jail as fc_jail
from ember.vmm.firecracker import kernel as fc_kernel
from ember.vmm.firecracker.api import FirecrackerAPI, one_line

MAX_UNIX_PATH = 107
# Firecracker has no ACPI power-off on x86: a guest reboot is what ends the
# process, and reboot=k (keyboard-controller reset) makes that a clean exit
# (a triple fault, reboot=t, is reported as an error). No PCI bus to probe.
EXTRA_BOOT_ARGS = "reboot=k pci=off"
GUEST_CID = 3
START_TIMEOUT = 10.0
SNAPSHOT_META_SUFFIX = ".ember.json"


def _fc_id(text: str) -> str:
    """Firecracker resource ids (drives, interfaces): alphanumerics and underscores, <= 64."""
    return re.sub(r"[^A-Za-z0-9_]", "_", text)[:64]


def _instance_id(text: str) -> str:
    """Firecracker's ``--id``: alphanumerics and hyphens, at most 64."""
    return re.sub(r"[^A-Za-z0-9-]", "-", text)[:64]


def snapshot_files(path: Path) -> tuple[Path, Path, Path]:
    """(vm state, guest memory, Ember's metadata) of a snapshot saved at ``path``."""
    return path, path.with_name(path.name + ".mem"), path.with_name(path.name + SNAPSHOT_META_SUFFIX)


@dataclass
class FirecrackerOptions:
    """Devices beyond what VMSpec describes; all optional."""

    network_interfaces: list[dict] = field(default_factory=list)  # iface_id, host_dev_name, guest_mac
    balloon_mib: int | None = None
    mmds: dict | None = None  # metadata served to the guest over the first interface
    entropy: bool = True
    log_level: str = "Warning"


class FirecrackerVMM(VMM):
    kind = "firecracker"
    label = "Firecracker"
    supports_snapshots = True  # PUT /snapshot/create, /snapshot/load

    @classmethod
    def host_ready(cls, status_of: Callable[[str], str]) -> bool:
        """Firecracker has no emulator: it needs a KVM that boots."""
        return status_of("firecracker") == "ok" and status_of("kvm") == "ok"

    @classmethod
    def choose_accel(cls, cfg: Config, kernel: Path, cmdline: str) -> str:
        return "kvm"  # Firecracker has no other: its jail needs /dev/kvm

    def __init__(self, spec: VMSpec, binary: str = "firecracker",
                 placeholder_drives: int | None = None, api_timeout: float = 10.0,
                 options: FirecrackerOptions | None = None) -> None:
        super().__init__(spec)
        self.binary = binary
        if placeholder_drives is None:
            from ember.config import load_config

            placeholder_drives = load_config().vm.fc_placeholder_drives
        self.options = options or FirecrackerOptions()
        self.layout = (fc_jail.JailLayout(binary, spec.work_dir, spec.jailer, spec.vm_id,
                                          tun=bool(self.options.network_interfaces))
                       if spec.jailer is not None else fc_jail.DirectLayout(binary, spec.work_dir))
        if isinstance(self.layout, fc_jail.JailLayout):
            self.jail = self.layout.spec
        self.api_socket = self.layout.api_socket
        self.vsock_api, self.vsock_host = self.layout.vsock(spec.agent_socket)
        self.api = FirecrackerAPI(str(self.api_socket), api_timeout, alive=self._check_alive,
                                  peer_uid=self.layout.peer_uid)
        self.pool = fc_drives.PlaceholderPool(spec.work_dir / "fc-drives", placeholder_drives)
        self._proc: subprocess.Popen | None = None
        self._paths: dict[str, str] = {}  # what Firecracker opens, by role, as it names them
        self._boot_drives: list[dict] = []
        self._boot_devices: dict[str, GuestDevice] = {}
        self._meta: dict = {}
        self._started = False
        self._paused = False

    # ------------------------------------------------------------ lifecycle
    @property
    def pid(self) -> int | None:
        return self.layout.vmm_pid(self._proc) if self._proc is not None else None

    def argv(self) -> list[str]:
        return self.layout.argv(_instance_id(self.spec.vm_id))

    def start(self) -> None:
        s = self.spec
        for sock in (self.api_socket, self.vsock_host):
            if len(str(sock)) > MAX_UNIX_PATH:
                raise VMError(f"socket path too long for a Unix socket: {sock}")
        s.work_dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.api_socket, self.vsock_host):
            stale.unlink(missing_ok=True)
        for name in ("firecracker.log", "metrics.json"):
            (s.work_dir / name).touch()  # Firecracker opens them, it does not create them
        try:
            self._plan()
        except BaseException:
            self._cleanup()
            raise
        argv = self.argv()
        console = open(s.console_log, "ab")
        errlog = open(s.work_dir / "vmm.log", "ab")
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=console, stderr=errlog,
                start_new_session=True, close_fds=True,
            )
        except (FileNotFoundError, PermissionError) as exc:
            self._cleanup()
            raise VMError(f"{'ember-jailer' if self.layout.jailed else 'Firecracker binary'} "
                          f"{argv[0]!r} cannot be run ({exc.strerror}); set "
                          "vm.firecracker_binary or EMBER_FIRECRACKER_BIN") from None
        finally:
            console.close()
            errlog.close()
        try:
            self.api.wait_ready(START_TIMEOUT)
            if s.restore_from is not None:
                self._restore()
            else:
                self._configure()
                self.api.put("/actions", {"action_type": "InstanceStart"})
            self._started = True
        except BaseException:
            self.kill()
            raise

    def _plan(self) -> None:
        """Decide every file Firecracker will open, and put it where it can (before exec)."""
        s, place, w = self.spec, self.layout.place, self.spec.work_dir
        p = {"log": place(w / "firecracker.log", "/firecracker.log", True),
             "metrics": place(w / "metrics.json", "/metrics.json", True)}
        if s.restore_from is None:
            kernel = fc_kernel.loadable_kernel(s.kernel, w)
            p["kernel"] = place(kernel, "/boot/vmlinux")
            p["initrd"] = place(s.initrd, "/boot/initrd.img")
            p["rootfs"] = place(s.rootfs, "/rootfs.ext4")
            for i, drive in enumerate(s.drives):
                _check_raw(drive)
                api = place(drive.path, f"/boot-drives/boot{i}", not drive.readonly)
                self._boot_drives.append({"drive_id": f"boot{i}", "path": str(drive.path),
                                          "api_path": api, "readonly": drive.readonly})
                self._boot_devices[drive.drive_id] = fc_drives.guest_device(drive.path)
        else:
            self._plan_restore(p)
        self.pool.create_files()
        for slot in self.pool.slots:
            slot.api_path = place(slot.placeholder, f"/drives/{slot.drive_id}.img", True)
        self._paths = p

    def _plan_restore(self, p: dict[str, str]) -> None:
        s, place = self.spec, self.layout.place
        if s.restore_from is None:
            raise VMError("no snapshot to restore from")
        state, mem, meta_path = snapshot_files(Path(s.restore_from))
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta.get("placeholders"), list):
                raise ValueError("no placeholder layout")
        except (OSError, ValueError, AttributeError):
            raise VMError(f"{s.restore_from} is not an Ember Firecracker snapshot "
                          f"({meta_path.name} is missing or unreadable)") from None
        if meta.get("jailed", False) != self.layout.jailed:
            raise VMError(f"snapshot {state} was taken {'in' if meta.get('jailed') else 'outside'}"
                          " a jail and must be restored the same way")
        stage, _ = self.layout.stage_dir(state.parent)
        p["state"] = place(state, f"{stage}/{state.name}")
        p["mem"] = place(mem, f"{stage}/{mem.name}")
        place(s.rootfs, "/rootfs.ext4")  # the snapshot's devices name these paths
        for drive in meta.get("boot_drives", []):
            place(Path(drive["path"]), drive["api_path"], not drive["readonly"])
        self.pool = fc_drives.PlaceholderPool(self.pool.directory, len(meta["placeholders"]))
        for slot, saved in zip(self.pool.slots, meta["placeholders"], strict=True):
            if saved.get("owner"):
                place(Path(saved["path"]), saved["api_path"], True)
                slot.owner, slot.path = saved["owner"], Path(saved["path"])
                slot.drive_api = saved["api_path"]
            else:
                beside = state.with_name(f"{state.name}.{slot.drive_id}")
                place(beside, saved["api_path"], True)
        self._boot_devices = {k: GuestDevice(*v) for k, v in meta.get("boot_devices", {}).items()}
        self._meta = meta

    def _configure(self) -> None:
        s, o, api, p = self.spec, self.options, self.api, self._paths
        self._put_logging()
        api.put("/machine-config", {"vcpu_count": s.vcpus, "mem_size_mib": s.memory_mib,
                                    "smt": False})
        api.put("/boot-source", {"kernel_image_path": p["kernel"], "initrd_path": p["initrd"],
                                 "boot_args": f"{s.cmdline} {EXTRA_BOOT_ARGS}".strip()})
        api.put("/drives/root", {"drive_id": "root", "path_on_host": p["rootfs"],
                                 "is_root_device": True, "is_read_only": True})
        for drive in self._boot_drives:
            api.put(f"/drives/{drive['drive_id']}", {
                "drive_id": drive["drive_id"], "path_on_host": drive["api_path"],
                "is_root_device": False, "is_read_only": drive["readonly"]})
        for body in self.pool.put_bodies():
            api.put(f"/drives/{body['drive_id']}", body)
        api.put("/vsock", {"guest_cid": GUEST_CID, "uds_path": self.vsock_api})
        if o.entropy:
            api.put("/entropy", {})
        for iface in o.network_interfaces:
            iface_id = _fc_id(iface["iface_id"])
            api.put(f"/network-interfaces/{iface_id}", {**iface, "iface_id": iface_id})
        if o.balloon_mib is not None:
            api.put("/balloon", {"amount_mib": o.balloon_mib, "deflate_on_oom": True})
        if o.mmds is not None:
            if not o.network_interfaces:
                raise VMError("MMDS needs a network interface to be served on")
            first = _fc_id(o.network_interfaces[0]["iface_id"])
            api.put("/mmds/config", {"version": "V2", "network_interfaces": [first]})
            api.put("/mmds", o.mmds)

    def _put_logging(self) -> None:
        self.api.put("/logger", {"log_path": self._paths["log"],
                                 "level": self.options.log_level, "show_level": True})
        self.api.put("/metrics", {"metrics_path": self._paths["metrics"]})

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise VMError(f"firecracker {describe_exit(self._proc.returncode)}: "
                          f"{self.vmm_log_tail() or 'no log output'}")

    def vmm_log_tail(self) -> str:
        """Firecracker's last log line: its logger file, else what it printed to stderr."""
        for name in ("firecracker.log", "vmm.log"):
            try:
                lines = (self.spec.work_dir / name).read_text(errors="replace").splitlines()
            except OSError:
                continue
            lines = [ln for ln in lines if ln.strip()]
            if lines:
                return one_line(lines[-1])
        return ""

    # --------------------------------------------------------------- drives
    def add_drive(self, drive: Drive) -> GuestDevice:
        _check_raw(drive)
        if not self._started or self.exited():
            raise VMError(f"cannot attach {drive.path}: the VM is not running")
        if not drive.path.is_file():
            raise VMError(f"cannot attach {drive.path}: no such image file")
        slot = self.pool.acquire(drive.drive_id, drive.path)
        try:
            dev = fc_drives.guest_device(drive.path)
            slot.drive_api = self.layout.attach(drive.path)
            self.api.patch(f"/drives/{slot.drive_id}",
                           {"drive_id": slot.drive_id, "path_on_host": slot.drive_api})
        except BaseException:
            if slot.drive_api:
                self.layout.detach(slot.drive_api)
            self.pool.release(drive.drive_id)
            raise
        return dev

    def guest_device(self, drive_id: str) -> GuestDevice:
        """Where a boot-time drive (VMSpec.drives) shows up in the guest."""
        return self._boot_devices[drive_id]

    def remove_drive(self, drive_id: str) -> None:
        slot = self.pool.find(drive_id)
        if slot is None:
            return
        try:
            if not self.exited():
                self.api.patch(f"/drives/{slot.drive_id}",
                               {"drive_id": slot.drive_id, "path_on_host": slot.api_path})
        finally:
            self.layout.detach(slot.drive_api)
            self.pool.release(drive_id)

    # --------------------------------------------------------------- agent
    def connect_agent(self, timeout: float) -> socket.socket:
        return vsock.connect(str(self.vsock_host), vsock.AGENT_PORT, timeout,
                             alive=self._check_alive, peer_uid=self.layout.peer_uid)

    # ---------------------------------------------------- pause / snapshot
    def pause(self) -> None:
        self.api.patch("/vm", {"state": "Paused"})
        self._paused = True

    def resume(self) -> None:
        self.api.patch("/vm", {"state": "Resumed"})
        self._paused = False

    def save_snapshot(self, path: Path) -> None:
        """Full snapshot of the paused VM: ``path``, ``path.mem``, ``path.ember.json``, ``path.phN``.

        Free placeholder slots are first re-pointed at placeholder files kept
        beside the snapshot, so loading it never depends on this VM's files.
        """
        state, mem, meta = snapshot_files(Path(path))
        state.parent.mkdir(parents=True, exist_ok=True)
        stage_api, stage_host = self.layout.stage_dir(state.parent)
        if not self._paused:
            self.pause()
        slots: list[dict[str, str | None]] = []
        for slot in self.pool.slots:
            if slot.owner is not None:
                slots.append({"drive_id": slot.drive_id, "owner": slot.owner,
                              "path": str(slot.path), "api_path": slot.drive_api})
                continue
            name = f"{state.name}.{slot.drive_id}"
            fc_drives.write_placeholder(stage_host / name)
            self.layout.own(stage_host / name)
            if stage_host != state.parent:
                fc_drives.write_placeholder(state.parent / name)
            api_path = f"{stage_api}/{name}"
            self.api.patch(f"/drives/{slot.drive_id}",
                           {"drive_id": slot.drive_id, "path_on_host": api_path})
            slots.append({"drive_id": slot.drive_id, "owner": None, "api_path": api_path})
        tmp_state, tmp_mem = f".{state.name}.tmp", f".{mem.name}.tmp"
        try:
            self.api.request("PUT", "/snapshot/create",
                             {"snapshot_type": "Full",
                              "snapshot_path": f"{stage_api}/{tmp_state}",
                              "mem_file_path": f"{stage_api}/{tmp_mem}"}, timeout=120)
            self.layout.collect(stage_host / tmp_mem, mem)
            self.layout.collect(stage_host / tmp_state, state)
        finally:
            (stage_host / tmp_state).unlink(missing_ok=True)
            (stage_host / tmp_mem).unlink(missing_ok=True)
        atomic_write_json(meta, {"hypervisor": "firecracker", "jailed": self.layout.jailed,
                                 "placeholders": slots, "boot_drives": self._boot_drives,
                                 "boot_devices": {k: [v.kind, v.address]
                                                  for k, v in self._boot_devices.items()}})

    def _restore(self) -> None:
        self._put_logging()
        self.api.request("PUT", "/snapshot/load", {
            "snapshot_path": self._paths["state"],
            "mem_backend": {"backend_type": "File", "backend_path": self._paths["mem"]},
            "resume_vm": False,
            "vsock_override": {"uds_path": self.vsock_api},
        }, timeout=120)
        for slot in self.pool.slots:
            if slot.owner is None:
                self.api.patch(f"/drives/{slot.drive_id}",
                               {"drive_id": slot.drive_id, "path_on_host": slot.api_path})
        self.resume()

    # ----------------------------------------------------------------- stop
    def stop(self, timeout: float = 5.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                self.api.request("PUT", "/actions", {"action_type": "SendCtrlAltDel"},
                                 timeout=min(timeout, 2.0))
            except VMError:
                pass
            if self.wait(timeout) is None:
                self.kill()
        self._cleanup()

    def kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if isinstance(self.layout, fc_jail.JailLayout):  # its waiter removes the jail
                self.layout.kill_vmm()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
            proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        """Remove what this driver created; only once the process is gone."""
        if self._proc is not None and self._proc.poll() is None:
            return
        for path in (self.api_socket, self.vsock_host):
            path.unlink(missing_ok=True)
        self.layout.cleanup()
        self.pool.remove_files()

    def wait(self, timeout: float | None = None) -> int | None:
        if self._proc is None:
            return None
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._cleanup()
        return code

    def exited(self) -> bool:
        return self._proc is not None and self._proc.poll() is not None


def _check_raw(drive: Drive) -> None:
    if drive.format != "raw":
        raise VMError(f"Firecracker drives must be raw images; {drive.path} is {drive.format}")
