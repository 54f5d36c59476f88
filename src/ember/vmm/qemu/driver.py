"""QEMU driver: a ``microvm`` machine with virtio-mmio devices.

Device layout (identical for a cold boot and a snapshot restore, which is what
lets a restored template serve any sandbox):

* virtio-blk ``root``: the read-only guest rootfs (Python + agent + crun);
* virtio-serial port ``agent.0``: the agent channel, a Unix socket on the host
  (this host has no vhost-vsock);
* virtio-scsi ``scsi0``: container disks are hot-plugged here as ``scsi-hd``
  (microvm has no PCI hotplug, but a SCSI bus takes hotplugged disks);
* virtio-rng, and the ISA serial console captured to ``console.log``;
* with ``VMSpec.nic``: a virtio-net NIC on a tap descriptor the caller opened
  (pod networking, ``ember.net.podnet``), or on an unconnected hub port while a
  template is built (the backend is not part of the migration stream).

Control goes through QMP on ``qmp.sock``.

The control plane opens every file and socket QEMU uses on the host side
(``qmp.sock`` and ``agent.sock`` as listening sockets, ``console.log`` for
appending, the snapshot, hot-plugged disks) and hands QEMU descriptors, so a
jailed QEMU needs no writable folder at all: a compromised VMM cannot create,
replace or link anything in the sandbox folder that root later reads or
connects to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ember import trace
from ember.config import Config
from ember.errors import VMError
from ember.vmm.base import VMM, Drive, GuestDevice, VMSpec, describe_exit
from ember.vmm.qemu import snapshot
from ember.vmm.qemu.drives import blockdev, qcow2_backing
from ember.vmm.qemu.machine import FIRMWARE, TEMPLATE_KEY, machine
from ember.vmm.qemu.qmp import QMPClient, QMPError

if TYPE_CHECKING:
    from ember.jailer.launch import Forked

PR_SET_THP_DISABLE = 41
MAX_UNIX_PATH = 107
CONSOLE_FDSET = 1  # -add-fd set of the console descriptor (QMP add-fd picks other ids)


def _listen(path: Path) -> socket.socket:
    """A listening Unix socket at path, made by us; QEMU gets only its descriptor."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        sock.listen(8)
    except OSError as exc:
        sock.close()
        raise VMError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def _no_huge_pages() -> None:
    """No transparent huge pages for the VMMs this process starts (inherited
    through fork and exec, jailer included).

    QEMU madvises guest RAM for huge pages, so a restored guest that touched
    4 KiB here and there holds whole 2 MiB pages: ~30 MiB more per idle
    sandbox, measured here (issue 14: density). The flag is per process; the
    caller (monitor, shim) loses nothing by having it too.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(ctypes.c_int(PR_SET_THP_DISABLE), ctypes.c_ulong(1), ctypes.c_ulong(0),
               ctypes.c_ulong(0), ctypes.c_ulong(0))  # best effort: old kernels lack it


def _running(pid: int) -> bool:
    """Whether pid is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


class QemuVMM(VMM):
    kind = "qemu"
    label = "QEMU"
    supports_snapshots = True  # migration to a file descriptor, restored with -incoming

    @classmethod
    def host_ready(cls, status_of: Callable[[str], str]) -> bool:
        """QEMU runs under TCG too: KVM only has to boot if the probe chose it."""
        return status_of("qemu") == "ok" and status_of("accel probe") != "error"

    @classmethod
    def prepare_launcher(cls) -> None:
        _no_huge_pages()

    @classmethod
    def template_inputs(cls, cfg: Config) -> list[str]:
        """The binary, and the machine: a snapshot restores only into the same one."""
        return [*super().template_inputs(cfg), TEMPLATE_KEY]

    @classmethod
    def choose_accel(cls, cfg: Config, kernel: Path, cmdline: str) -> str:
        """`vm.accel`; "auto" boots the guest kernel once under KVM (cached) and
        falls back to TCG when that does not work (nested KVM here)."""
        from ember.vmm.qemu.accel import resolve_accel

        return resolve_accel(cfg.vm.accel, cfg.vm.qemu_binary, kernel, cfg.data_dir, cmdline)

    def __init__(self, spec: VMSpec, binary: str = "qemu-system-x86_64") -> None:
        super().__init__(spec)
        self.binary = binary
        self._proc: subprocess.Popen | Forked | None = None
        self._jail_launch = ""  # how ember-jailer started: helper or exec
        self._pid: int | None = None
        self._qmp: QMPClient | None = None
        self._qmp_lock = threading.Lock()
        self._next_target = 1
        self._targets: dict[str, int] = {}
        self._restore_fd: int | None = None
        self._incoming = ""  # the -incoming URI of a restore
        self._ram_file: Path | None = None  # guest RAM in a file (shared template memory)
        self._channels: dict[str, int] = {}  # qmp, agent, console: descriptors QEMU inherits
        self._listeners: list[socket.socket] = []
        self.jail = None  # ember.jailer.api.JailSpec when the VMM runs jailed
        if spec.jailer is not None:
            import copy

            self.jail = copy.deepcopy(spec.jailer)

    # ---------------------------------------------------------------- argv
    def _accel_args(self) -> list[str]:
        if self.spec.accel == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", f"tcg,tb-size={self.spec.tcg_tb_mib}", "-cpu", "max"]

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

    def _path(self, host: Path, mode: str = "hardlink", writable: bool = False,
              jail_path: str | None = None) -> str:
        """The path QEMU must use for a host file: itself, or its place in the jail."""
        if self.jail is None:
            return str(host)
        return self.jail.place(host, mode, writable, jail_path)

    def _open_channels(self) -> dict[str, int]:
        """Open QMP and agent listening sockets and the console log, in the sandbox folder.

        The folder stays root-only; QEMU inherits the descriptors. The console
        is opened without following a symlink and appended to, so whoever caps
        it can truncate it under QEMU's feet.
        """
        if self._channels:
            return self._channels
        s = self.spec
        try:
            for name, path in (("qmp", s.control_socket), ("agent", s.agent_socket)):
                sock = _listen(path)
                self._listeners.append(sock)
                self._channels[name] = sock.fileno()
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                self._channels["console"] = os.open(s.console_log, flags, 0o600)
            except OSError as exc:
                raise VMError(f"cannot open {s.console_log}: {exc.strerror}") from None
        except BaseException:
            self._close_channels()
            raise
        return self._channels

    def _close_channels(self) -> None:
        """Our copies only: QEMU keeps its own (the paths stay connectable while it runs)."""
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        if "console" in self._channels:
            os.close(self._channels["console"])
        self._channels.clear()

    def argv(self) -> list[str]:
        """The full QEMU command line for this VM (inside the jail when jailed)."""
        s = self.spec
        for sock in (s.agent_socket, s.control_socket):
            if len(str(sock)) > MAX_UNIX_PATH:
                raise VMError(f"socket path too long for a Unix socket: {sock}")
        if self.jail is not None:
            self.jail.files.clear()
        ch = self._open_channels()
        rootfs = self._path(s.rootfs, "bind")
        args = [
            self.binary, "-name", f"ember-{s.vm_id[:12]}",
            "-M", machine(s.cmdline), "-bios", FIRMWARE, *self._accel_args(),
            "-m", str(s.memory_mib), "-smp", str(s.vcpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            *self._boot_args(),
            "-add-fd", f"fd={ch['console']},set={CONSOLE_FDSET},opaque=console",
            "-chardev", f"file,id=con,path=/dev/fdset/{CONSOLE_FDSET},append=on",
            "-serial", "chardev:con",
            "-chardev", f"socket,id=qmp,fd={ch['qmp']},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-drive", f"id=root,file={rootfs},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,fd={ch['agent']},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=agent.0",
            "-device", "virtio-scsi-device,id=scsi0",
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=rng0",
        ]
        args += self._nic_args()
        for drive in s.drives:
            target = self._alloc_target(drive.drive_id)
            node = blockdev(drive)
            if self.jail is not None:
                node["file"]["filename"] = self._path(drive.path, "bind", not drive.readonly)  # type: ignore[index]
            args += ["-blockdev", json.dumps(node)]
            args += ["-device", json.dumps(self._scsi_device(drive, target))]
        args += self._memory_args()
        if s.restore_from is not None:
            # An inherited descriptor works the same jailed or not (no shell, no host path).
            if self._restore_fd is None:
                try:
                    self._restore_fd = os.open(s.restore_from, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise VMError(f"cannot open VM snapshot {s.restore_from}: {exc}") from None
            self._incoming = f"fd:{self._restore_fd}"
            # Shared RAM needs a capability set first (start(): snapshot.start_incoming).
            args += ["-incoming", "defer" if self._ram_file else self._incoming]
        if self.jail is not None:
            self.jail.exec_file = shutil.which(args[0]) or args[0]
            self.jail.args = args[1:]
            self.jail.vmm_kind = self.kind
            self.jail.keep_fds = self._inherited_fds()
            from ember.jailer.api import build_argv

            return build_argv(self.jail)
        return args

    def _boot_args(self) -> list[str]:
        """The kernel, initrd and command line, for a boot only.

        QEMU reads -kernel and -initrd into its own memory for the firmware to
        copy into the guest, and keeps them there for the VM's life: the
        kernel alone was 13.9 MB of private memory per sandbox. A restored guest is past that point
        (its kernel is in the RAM the snapshot brings), so a restore gets none.
        """
        s = self.spec
        if s.restore_from is not None:
            return []
        return ["-kernel", self._path(s.kernel), "-initrd", self._path(s.initrd),
                "-append", s.cmdline]

    def _memory_args(self) -> list[str]:
        """Guest RAM in a file when the snapshot has one, or a template build can make one."""
        s = self.spec
        if s.restore_from is not None and snapshot.ram_file(s.restore_from).is_file():
            self._ram_file = snapshot.ram_file(s.restore_from)
            path = self._path(self._ram_file, "bind")  # a read-only mount in the jail
            return snapshot.memory_backend(path, s.memory_mib, build=False)
        if s.restore_from is None and s.snapshot_to is not None \
                and snapshot.can_share_ram(self.binary):
            self._ram_file = snapshot.ram_file(s.snapshot_to)
            snapshot.create_ram_file(self._ram_file, s.memory_mib)
            path = self._path(self._ram_file, "bind", True)
            return snapshot.memory_backend(path, s.memory_mib, build=True)
        self._ram_file = None
        return []

    def _inherited_fds(self) -> list[int]:
        fds = [self._restore_fd, self.spec.net_fd, *self._channels.values()]
        return [fd for fd in fds if fd is not None]

    def _nic_args(self) -> list[str]:
        s = self.spec
        if not s.nic:
            return []
        if s.net_fd is not None:
            netdev = f"tap,id=net0,fd={s.net_fd},vhost=off"
        else:
            netdev = "hubport,id=net0,hubid=0"
        device = "virtio-net-device,netdev=net0" + (f",mac={s.nic_mac}" if s.nic_mac else "")
        return ["-netdev", netdev, "-device", device]

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
        s.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if shutil.which(self.binary) is None:
            raise VMError(f"QEMU not found: {self.binary} (install qemu-system-x86)")
        spawned = time.time()
        _no_huge_pages()
        try:
            argv = self.argv()
            log = os.open(s.work_dir / "vmm.log",
                          os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600)
            try:
                if self.jail is not None:  # ember-jailer: from our pre-forked helper if it can be
                    from ember.jailer.launch import popen as start_jailer

                    self._proc = start_jailer(argv, stdout=log, stderr=log,
                                              pass_fds=self._inherited_fds())
                else:
                    self._proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                        start_new_session=True, close_fds=True,
                        pass_fds=tuple(self._inherited_fds()),
                    )
            except FileNotFoundError:
                raise VMError(f"cannot run {argv[0]}") from None
            finally:
                os.close(log)
        finally:
            self._close_channels()
            if self._restore_fd is not None:
                os.close(self._restore_fd)
                self._restore_fd = None
        self._pid = self._proc.pid
        if self.jail is not None:
            self._jail_launch = ("exec" if isinstance(self._proc, subprocess.Popen)
                                 else "in place" if self._proc.vmm else "helper")
            self._pid = self._wait_jailed_pid()
        trace.mark("jail" if self.jail is not None else "vmm spawn", spawned)
        if s.restore_from is not None:
            with trace.span("restore"):
                if self._ram_file is not None:
                    snapshot.start_incoming(self, self._incoming)
                self._wait_running(timeout=60)

    def jail_record(self) -> dict:
        record = super().jail_record()
        if record and self._jail_launch:
            record["launch"] = self._jail_launch  # for `ember inspect`: was an exec saved
        return record

    def _wait_jailed_pid(self) -> int:
        """QEMU's own pid, once it is in its jail: the jailer's child (the jailer
        stays as its waiter) or, in place, the process we started."""
        from ember.jailer.api import live_vmm

        assert self.jail is not None and self._proc is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pid = live_vmm(self.jail)
            if pid is not None:
                return pid
            if self._proc.poll() is not None:
                raise VMError(f"ember-jailer exited with code {self._proc.returncode}: "
                              f"{self.vmm_log_tail()}")
            time.sleep(0.005)
        raise VMError("ember-jailer did not start QEMU within 20s")

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

    @property
    def supervised(self) -> bool:
        """We wait on the jailer's waiter, which reports 128+N; not when QEMU
        runs in place (it is our own child then)."""
        return self.jail is not None and not getattr(self._proc, "vmm", False)

    def _check_alive(self) -> None:
        """Raise, saying how QEMU ended (and its last words), once it has exited."""
        code = self._proc.poll() if self._proc is not None else None
        if code is not None:
            how = describe_exit(code, self.supervised)
            tail = self.vmm_log_tail()
            raise VMError(f"QEMU {how}" + (f": {tail}" if tail else ""))

    def vmm_log_tail(self) -> str:
        try:
            text = (self.spec.work_dir / "vmm.log").read_text(errors="replace").strip()
        except OSError:
            return ""
        lines = text.splitlines()
        return lines[-1] if lines else ""

    def _client(self) -> QMPClient:
        with self._qmp_lock:
            if self._qmp is None:
                self._check_alive()
                self._qmp = QMPClient(self.spec.control_socket, timeout=15,
                                      alive=self._check_alive)
            return self._qmp

    def qmp(self, command: str, **args: object) -> object:
        return self._qmp_call(command, None, args)

    def qmp_fds(self, command: str, fds: list[int], **args: object) -> object:
        return self._qmp_call(command, fds, args)

    def _qmp_call(self, command: str, fds: list[int] | None, args: dict) -> object:
        try:
            return self._client().execute(command, fds=fds, **args)
        except QMPError:
            raise  # QEMU answered: it is alive
        except (VMError, OSError) as exc:
            # The connection broke: if QEMU died, say that rather than "connection closed".
            if self._proc is not None and self.wait(1.0) is not None:
                self._check_alive()
            if isinstance(exc, VMError):
                raise
            raise VMError(f"QMP {command}: {exc}") from None

    # --------------------------------------------------------------- drives
    def add_drive(self, drive: Drive) -> GuestDevice:
        target = self._alloc_target(drive.drive_id)
        node = blockdev(drive)
        if self.jail is not None:
            node = self._jail_drive(drive, node)
        self.qmp("blockdev-add", **node)
        try:
            self.qmp("device_add", **self._scsi_device(drive, target))
        except VMError:
            self.qmp("blockdev-del", **{"node-name": f"n-{drive.drive_id}"})
            raise
        return GuestDevice("scsi", f"{target}:0")

    def _jail_drive(self, drive: Drive, node: dict) -> dict:
        """A hot-plugged disk reaches the jailed QEMU as a descriptor (QMP add-fd).

        QEMU never sees a host path and the files stay root-only on the host:
        nothing is chowned to the VMM's uid. A qcow2 overlay names its base by
        host path, so the base is passed (read-only) and named explicitly too.
        """
        node["file"]["filename"] = self._pass_fd(drive.path, not drive.readonly)
        if drive.format == "qcow2":
            base = qcow2_backing(drive.path)
            if base is not None:
                node["backing"] = {
                    "driver": "raw", "read-only": True,
                    "file": {"driver": "file", "filename": self._pass_fd(base, False)},
                }
        return node

    def _pass_fd(self, path: Path, writable: bool) -> str:
        """Give QEMU an open descriptor for path (QMP add-fd); returns its /dev/fdset name."""
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise VMError(f"cannot open disk {path}: {exc.strerror}") from None
        try:
            info = self.qmp_fds("add-fd", [fd])
        finally:
            os.close(fd)
        fdset = info["fdset-id"] if isinstance(info, dict) else None
        if fdset is None:
            raise VMError(f"QEMU did not take a descriptor for {path}")
        return f"/dev/fdset/{fdset}"

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
        building = self.spec.restore_from is None and self._ram_file is not None
        snapshot.save_snapshot(self, path, self._ram_file if building else None)

    # ----------------------------------------------------------------- stop
    def stop(self, timeout: float = 5.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._close_qmp()
            if self._proc is not None:
                self.cleanup_jail()  # a SIGKILLed waiter removed nothing
            return
        try:
            self.qmp("quit")
        except VMError:
            pass
        if self.wait(timeout) is None:
            self.kill()
        self._close_qmp()
        self.cleanup_jail()

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.kill(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        self._close_qmp()
        self.cleanup_jail()

    def cleanup_jail(self) -> None:
        """Remove the jail: ours to do when QEMU ran in place; with a waiter, this
        covers a killed one."""
        if self.jail is not None:
            from ember.jailer.api import cleanup

            cleanup(self.jail)

    def wait(self, timeout: float | None = None) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def exited(self) -> bool:
        """QEMU is gone. Jailed with a waiter, the waiter may still be removing the
        jail, so QEMU's own pid is asked too (it is the waiter's child: reaped at
        once, never reused while the waiter lives)."""
        if self._proc is None:
            return False
        if self._proc.poll() is not None:
            return True
        return self.jail is not None and self._pid is not None and not _running(self._pid)

    def _close_qmp(self) -> None:
        with self._qmp_lock:
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None
