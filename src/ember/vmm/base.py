"""The hypervisor interface every VMM driver implements.

Ember talks to hypervisors only through :class:`VMM`, so the sandbox layer,
the CLI and the containerd shim do not care whether QEMU or Firecracker runs
underneath. A driver owns one VM process: it builds the command line (or API
calls), starts it, attaches block devices, exposes the agent channel, and
pauses, snapshots, stops or kills the VM.
"""

from __future__ import annotations

import abc
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ember.config import DEFAULT_TCG_TB_MIB

if TYPE_CHECKING:
    from ember.config import Config
    from ember.jailer.api import JailSpec


@dataclass
class Drive:
    """A host file the guest sees as a block device."""

    drive_id: str
    path: Path
    format: str = "raw"  # "raw" | "qcow2"
    readonly: bool = False


@dataclass
class GuestDevice:
    """How the guest agent finds an attached drive (agent.proto BlockDevice)."""

    kind: str  # "scsi" | "serial" | "path"
    address: str


@dataclass
class VMSpec:
    """Everything needed to start one micro-VM."""

    vm_id: str
    kernel: Path
    initrd: Path
    rootfs: Path
    cmdline: str
    work_dir: Path  # sockets, console log, pid file live here
    vcpus: int = 1
    memory_mib: int = 512
    accel: str = "tcg"
    tcg_tb_mib: int = DEFAULT_TCG_TB_MIB  # TCG's translation cache (config vm.tcg_tb_size_mib)
    drives: list[Drive] = field(default_factory=list)  # attached at boot
    restore_from: Path | None = None  # a snapshot (template) to restore
    # This VM will be saved with save_snapshot(snapshot_to) as a template; a
    # driver may keep its guest memory in a file beside that path from the
    # start, so restores can map it copy-on-write instead of each copying it.
    snapshot_to: Path | None = None
    jailer: JailSpec | None = None  # ember.jailer settings when jailed
    # One virtio-net NIC (pod networking). net_fd: an open tap the VMM inherits;
    # None with nic=True means a placeholder backend (building a VM template).
    nic: bool = False
    net_fd: int | None = None
    nic_mac: str = ""

    @property
    def console_log(self) -> Path:
        return self.work_dir / "console.log"

    @property
    def agent_socket(self) -> Path:
        return self.work_dir / "agent.sock"

    @property
    def control_socket(self) -> Path:
        return self.work_dir / "qmp.sock"


def describe_exit(code: int, supervised: bool = False) -> str:
    """How a process ended, in words: ``killed by signal 9 (SIGKILL)`` or
    ``exited with code 1``. A negative code is a signal (subprocess); with
    ``supervised`` (a jailer waiter that reports its VMM), 128+N is signal N."""
    sig = -code if code < 0 else (code - 128 if supervised and 128 < code < 160 else 0)
    if sig:
        try:
            return f"killed by signal {sig} ({signal.Signals(sig).name})"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exited with code {code}"


def binary_key(name: str) -> str:
    """The ``[vm]`` key naming hypervisor ``name``'s binary: ``<name>_binary``."""
    return f"{name}_binary"


class VMM(abc.ABC):
    """One VM process. Methods raise ember.errors.VMError on failure.

    Besides the VM's life, a driver class answers what the sandbox core must
    know of its hypervisor before a VM exists (which binary, which
    accelerator, whether VM templates can be made, what a template depends
    on), so no code outside ``vmm/`` asks which hypervisor it is.
    """

    kind = "abstract"
    label = "the VMM"  # how error messages name it
    # save_snapshot() and VMSpec.restore_from work: sandboxes start from VM templates.
    supports_snapshots: ClassVar[bool] = False

    def __init__(self, spec: VMSpec) -> None:
        self.spec = spec
        # The jail the VMM runs in (a copy of spec.jailer as the driver uses it), or None.
        self.jail: JailSpec | None = None

    # ------------------------------------------------- before a VM exists
    @classmethod
    def configured_binary(cls, cfg: Config) -> str:
        """The hypervisor binary the configuration names (what the jail runs):
        ``[vm] <kind>_binary`` (:func:`binary_key`)."""
        return str(getattr(cfg.vm, binary_key(cls.kind)))

    @classmethod
    @abc.abstractmethod
    def choose_accel(cls, cfg: Config, kernel: Path, cmdline: str) -> str:
        """The accelerator a VM of this hypervisor will use ("kvm" or "tcg")."""

    @classmethod
    def template_inputs(cls, cfg: Config) -> list[str]:
        """What a VM template of this hypervisor depends on besides the VMSpec:
        the binary, by path, size and modification time (another build of it
        may not load the snapshot)."""
        import shutil

        binary = cls.configured_binary(cfg)
        found = shutil.which(binary) or binary
        try:
            st = os.stat(found)
        except OSError:
            return [found]
        return [f"{found}:{st.st_size}:{st.st_mtime_ns}"]

    @classmethod
    def prepare_launcher(cls) -> None:
        """Set what this process must pass on to the VMMs it will start, before it
        forks anything that starts them (the monitor's pre-forked jailer helper):
        such settings are inherited at fork, not asked for later. None by default."""
        return None

    @classmethod
    def host_ready(cls, status_of: Callable[[str], str]) -> bool:
        """Whether this host can run this hypervisor, from ``ember check``'s
        findings (``status_of(check name)`` is "ok", "warn", "missing"...)."""
        return status_of(cls.kind) == "ok"

    @classmethod
    def make(cls, cfg: Config, spec: VMSpec) -> VMM:
        """A driver for spec with the configuration's settings for this hypervisor."""
        return cls(spec, binary=cls.configured_binary(cfg))  # type: ignore[call-arg]

    # ------------------------------------------------------------ the VM
    def jail_record(self) -> dict:
        """What `ember rm -f` needs to remove the jail if everything else died
        (kept in the crash record; cleanup re-derives it from the id anyway)."""
        jail = self.jail
        if jail is None:
            return {}
        return {"id": jail.id, "exec_file": jail.exec_file, "uid": jail.uid,
                "chroot_base_dir": jail.chroot_base_dir, "parent_cgroup": jail.parent_cgroup}

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """Host pid of the VMM process, once started."""

    @abc.abstractmethod
    def start(self) -> None:
        """Launch the VMM (and boot, or restore, the guest) without waiting for the agent."""

    @abc.abstractmethod
    def add_drive(self, drive: Drive) -> GuestDevice:
        """Attach a drive to the running VM and say where the guest will see it."""

    @abc.abstractmethod
    def remove_drive(self, drive_id: str) -> None:
        """Detach a drive added with add_drive (idempotent)."""

    @abc.abstractmethod
    def connect_agent(self, timeout: float) -> socket.socket:
        """A connected stream socket to the guest agent's channel."""

    @abc.abstractmethod
    def pause(self) -> None: ...

    @abc.abstractmethod
    def resume(self) -> None: ...

    @abc.abstractmethod
    def save_snapshot(self, path: Path) -> None:
        """Pause and write the VM's full state to path (the VM stays paused)."""

    @abc.abstractmethod
    def stop(self, timeout: float = 5.0) -> None:
        """Ask the VMM to quit; kill it if it does not within timeout."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Kill the VMM process at once."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the VMM to exit; its exit code, or None on time-out."""

    @abc.abstractmethod
    def exited(self) -> bool:
        """True once the VM process is gone (False before start)."""

    def exit_description(self) -> str:
        """How the VMM process ended (see :func:`describe_exit`); "" while it runs."""
        code = self.wait(0)
        return "" if code is None else describe_exit(code, self.supervised)

    @property
    def supervised(self) -> bool:
        """True when the process we wait on is a jailer waiter (128+N for signal N)."""
        return False

    def vmm_log_tail(self) -> str:
        """The VMM's own last words (its stderr), for error messages."""
        return ""

    def console_tail(self, lines: int = 15) -> str:
        """The last lines the guest printed, for error messages."""
        try:  # never through a symlink: the tail ends up in records and error messages
            fd = os.open(self.spec.console_log, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return ""
        with os.fdopen(fd, "rb") as f:
            f.seek(max(0, os.fstat(fd).st_size - 16384))
            data = f.read(16384)
        text = data.decode("utf-8", "replace").replace("\r", "")
        return "\n".join(text.strip().splitlines()[-lines:])
