"""One sandbox's VM, as seen from the host: boot or restore, agent, disks.

:class:`SandboxVM` is used in-process by the sandbox monitor (``ember run``)
and by the containerd shim. It picks the accelerator, restores the VM from a
template snapshot when one exists (cold-booting otherwise), connects to the
guest agent, resynchronises the guest clock and RNG, and attaches container
disks. Errors carry the last console lines so a VM that does not boot says why.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ember import trace
from ember.config import Config
from ember.errors import AgentError, EmberError, VMError
from ember.util import pause_for_test
from ember.vmm import configured, make_vmm, vmm_binaries
from ember.vmm.base import VMM, Drive, GuestDevice, VMSpec

if TYPE_CHECKING:
    from ember.sandbox.agent_client import AgentClient
    from ember.ttrpc import Client

__all__ = ["SandboxVM", "cleanup_jail", "make_vmm", "release_network", "vmm_binaries"]

log = logging.getLogger("ember.sandbox.vm")

CONSOLE_CHECK_S = 1.0  # how often the console log's size is checked


def prepare_launch(cfg: Config) -> None:
    """Ready this process to start jailed VMMs fast: the VMM's launcher settings
    (QEMU: no transparent huge pages) and, while it still has one thread, the
    pre-forked jailer helper that then needs no new interpreter
    (:mod:`ember.jailer.launch`). For a sandbox's monitor and a pod's shim."""
    if not cfg.jailer.enabled:
        return
    from ember.jailer import launch

    configured(cfg).prepare_launcher()  # before the fork: the helper passes it on
    launch.prefork()


def cleanup_jail(cfg: Config, vm_id: str, parent_cgroup: str | None = None) -> None:
    """Remove the jail (VMM, folder, cgroups) of VM ``vm_id`` if one is left.

    Worked out from the id and the configuration alone, never from a record:
    whatever a compromised VMM wrote cannot steer what root removes. Every
    configured VMM binary is tried, so a hypervisor switched in the config
    while sandboxes ran still finds their jails, and so is the jail of a VM
    template build made on the VM's behalf (its killed owner left it).
    """
    from ember.jailer.api import cleanup, spec_from_config
    from ember.sandbox.state import template_vm_id

    for jail_id in (vm_id[:64], template_vm_id(vm_id)):
        for binary in vmm_binaries(cfg):
            spec = spec_from_config(cfg, id=jail_id, exec_file=os.path.basename(binary),
                                    uid=0, gid=0)
            if parent_cgroup:
                spec.parent_cgroup = parent_cgroup.strip("/")
            cleanup(spec)


def release_network(netns: str | None) -> None:
    """Undo :meth:`SandboxVM.boot`'s redirect in ``netns``; quiet if it is gone."""
    if not netns:
        return
    from ember.net import podnet

    try:
        podnet.teardown(netns)
    except podnet.NetError as exc:
        log.warning("network teardown in %s: %s", netns, exc)


class SandboxVM:
    def __init__(self, cfg: Config, vm_id: str, work_dir: Path, vcpus: int, memory_mib: int,
                 use_template: bool | None = None, nic: bool = False,
                 cpus: float | None = None, snapshot_to: Path | None = None) -> None:
        self.cfg = cfg
        self.snapshot_to = snapshot_to  # a template build: where its snapshot will be saved
        self.nic = nic  # one virtio-net device (pod networking); part of the template key
        self.vm_id = vm_id
        self.work_dir = work_dir
        self.vcpus = vcpus
        self.memory_mib = memory_mib
        # CPU time the whole VMM may use (`--cpus`), enforced in its jail cgroup; None: no limit.
        if cpus is not None and not cpus > 0:
            raise EmberError(f"invalid cpu limit {cpus}: must be > 0")
        self.cpus = cpus
        self.use_template = cfg.vm.snapshot if use_template is None else use_template
        self.vmm: VMM | None = None
        self.agent: AgentClient | None = None  # once booted
        self.rpc: Client | None = None  # the raw ttrpc client under it (the monitor uses it)
        self.restored = False
        self._drive_seq = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ boot
    def base_spec(self, work_dir: Path | None = None) -> VMSpec:
        from ember.guest.build import current_assets

        assets = current_assets(self.cfg)
        cmdline = assets.cmdline  # init_on_free and [guest] extra_cmdline included
        accel = configured(self.cfg).choose_accel(self.cfg, assets.kernel, cmdline)
        return VMSpec(
            vm_id=self.vm_id, kernel=assets.kernel, initrd=assets.initrd, rootfs=assets.rootfs,
            cmdline=cmdline, work_dir=work_dir or self.work_dir, vcpus=self.vcpus,
            memory_mib=self.memory_mib, accel=accel, jailer=self.jail_spec(accel), nic=self.nic,
            tcg_tb_mib=self.cfg.vm.tcg_tb_size_mib, snapshot_to=self.snapshot_to,
        )

    def jail_spec(self, accel: str):
        """The jail for this VM's VMM when `[jailer] enabled` (a uid of its own)."""
        if not self.cfg.jailer.enabled:
            return None
        from ember.jailer import cgroups as cgroups_mod
        from ember.jailer.api import allocate_uid, spec_from_config

        uid = allocate_uid(self.cfg.jailer, self.vm_id)
        if uid == 0 and not self.cfg.jailer.allow_root:
            raise EmberError("jailer: refusing to run the VMM as uid 0 (jailer.allow_root)")
        # Cap the VMM's memory: guest RAM plus room for QEMU itself.
        limit = str((self.memory_mib + 256) << 20)
        v2 = (self.cfg.jailer.cgroup_version or cgroups_mod.detect_version()) == 2
        cgroups = {"memory.max" if v2 else "memory.limit_in_bytes": limit, "pids.max": "4096"}
        if self.cpus is not None:
            # All of the VMM (vCPU threads, I/O, emulation) shares the sandbox's CPU time.
            period = 100000
            quota = max(1000, math.ceil(self.cpus * period))  # the kernel's minimum is 1 ms
            if v2:
                cgroups["cpu.max"] = f"{quota} {period}"
            else:  # period first: the jailer writes the files in this order
                cgroups["cpu.cfs_period_us"] = str(period)
                cgroups["cpu.cfs_quota_us"] = str(quota)
        binary = configured(self.cfg).configured_binary(self.cfg)
        return spec_from_config(self.cfg, id=self.vm_id[:64], exec_file=binary,
                                uid=uid, gid=uid,
                                kvm=accel == "kvm", cgroups=cgroups)

    def jail_record(self) -> dict:
        """What `ember rm -f` needs to remove the jail if everything else died."""
        return self.vmm.jail_record() if self.vmm is not None else {}

    def template_for(self, spec: VMSpec, wait: bool = False,
                     owner: str | None = None) -> Path | None:
        """The VM template ``spec`` restores from, built now if need be; None when
        the hypervisor cannot snapshot or a template cannot be had now (another
        process builds it, or the build failed: the VM cold-boots)."""
        backend = configured(self.cfg)
        if not backend.supports_snapshots:
            return None
        from ember.sandbox.template import TemplateCache

        return TemplateCache(self.cfg).get_or_build(
            spec, backend.template_inputs(self.cfg), functools.partial(_snapshot_new_vm, self.cfg),
            wait=wait, owner=owner)

    def boot(self, netns: str | None = None) -> AgentClient:
        """Start the VM and return once the agent answers; its client (``self.agent``).

        The one boot sequence of the monitor (``ember run``) and the shim (pods).
        netns: a network namespace whose ``eth0`` the VM takes over
        (:mod:`ember.net.podnet`: a tc redirect to a tap the VMM gets as a
        descriptor, then the guest NIC gets eth0's MAC, addresses and routes).
        A failed boot kills the VMM and undoes the redirect.
        """
        if netns is None:
            return self._boot()
        from ember.net import podnet

        with trace.span("host network"):
            net_fd, nic = podnet.setup(netns)
        try:
            try:
                agent = self._boot(net_fd, nic.mac)
            finally:
                os.close(net_fd)  # the VMM has its own copy
            with trace.span("guest network"):
                agent.update_interface(nic.name, nic.mac, nic.mtu, nic.addresses, nic.routes)
            return agent
        except BaseException:
            self.kill()
            release_network(netns)
            raise

    def _boot(self, net_fd: int | None = None, nic_mac: str = "") -> AgentClient:
        spec = self.base_spec()
        spec.net_fd, spec.nic_mac = net_fd, nic_mac
        template = None
        if self.use_template:
            with trace.span("template lookup"):
                template = self.template_for(spec, owner=self.vm_id)
        if template is not None:
            spec.restore_from = template
        self.vmm = make_vmm(self.cfg, spec)
        try:
            self.vmm.start()
            pause_for_test("template-started" if self.vm_id.startswith(("tpl-", "template-"))
                           else "vmm-started")
            with trace.span("agent ready"):
                agent = self._connect_agent(self.cfg.vm.boot_timeout)
                self.restored = template is not None
                threading.Thread(target=self._cap_console, args=(self.vmm,), daemon=True,
                                 name="console-cap").start()
                agent.sync_guest(time.time_ns(), secrets.token_bytes(64))
                return agent
        except VMError:
            died = self._death_during_start()
            self.kill()
            if died:  # say that, not what failed to talk to it
                raise VMError(died) from None
            raise
        except BaseException:
            self.kill()
            raise

    def _death_during_start(self) -> str:
        """If the VMM has exited, how (signal or code, its last words, the guest's
        last console lines); "" while it still runs."""
        vmm = self.vmm
        if vmm is None or vmm.wait(1.0) is None:
            return ""
        how = vmm.exit_description()
        last = vmm.vmm_log_tail()
        if last.startswith("ember-jailer"):
            return f"{last} ({how})"  # the VMM never ran: the jailer said why
        return (f"{vmm.label} exited during start ({how}{': ' + last if last else ''})"
                f"{self._console_hint()}")

    def _cap_console(self, vmm: VMM) -> None:
        """Keep the guest console log under [logs] console_max_size while this VMM runs
        (for `ember run` and the shim alike: a chatty guest must not fill /run)."""
        from ember.sandbox.logfile import cap_console

        while not vmm.exited() and self.vmm is vmm:
            try:
                cap_console(vmm.spec.console_log, self.cfg.logs.console_max_bytes)
            except (OSError, EmberError):
                return  # not a regular file of ours: leave it, the VMM writes by descriptor
            time.sleep(CONSOLE_CHECK_S)

    def _connect_agent(self, timeout: float) -> AgentClient:
        """Wait for the guest agent to answer; the client, also kept as ``self.agent``."""
        from ember.sandbox.agent_client import AgentClient
        from ember.ttrpc import Client

        assert self.vmm is not None
        deadline = time.monotonic() + timeout
        try:
            sock = self.vmm.connect_agent(timeout)
        except VMError as exc:
            raise VMError(f"VM did not boot: {exc}{self._console_hint()}") from None
        rpc = self.rpc = Client(sock)
        client = AgentClient(rpc)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                client.close()
                raise VMError(f"VM did not boot within {timeout:.0f}s{self._console_hint()}")
            try:
                client.wait_ready(min(remaining, 2.0))
                self.agent = client
                return client
            except (AgentError, TimeoutError, OSError):
                if self.vmm.exited():
                    client.close()
                    raise VMError(f"VM exited during boot{self._console_hint()}") from None

    def _console_hint(self) -> str:
        if self.vmm is None:
            return ""
        tail = self.vmm.console_tail(6).replace("\n", " | ")
        return f"; guest console: {tail}" if tail else "; guest console is empty"

    # ----------------------------------------------------------------- disks
    def attach_disk(self, path: Path, fmt: str, readonly: bool = False,
                    drive_id: str | None = None) -> tuple[str, GuestDevice]:
        assert self.vmm is not None
        with self._lock:
            self._drive_seq += 1
            drive_id = drive_id or f"c{self._drive_seq}"
        dev = self.vmm.add_drive(Drive(drive_id, Path(path), fmt, readonly))
        return drive_id, dev

    def detach_disk(self, drive_id: str) -> None:
        if self.vmm is not None and not self.vmm.exited():
            self.vmm.remove_drive(drive_id)

    # ------------------------------------------------------------- shutdown
    def shutdown(self, timeout: float = 5.0, clean: bool = True) -> None:
        """Power the guest off cleanly (the agent syncs disks), else kill the VMM.

        clean=False: the disks are thrown away (``--rm``), so there is nothing to
        sync: the VMM quits at once instead of waiting for a guest power-off.
        """
        if self.vmm is None:
            return
        if clean and self.agent is not None and not self.vmm.exited():
            try:
                self.agent.destroy_sandbox()
            except (EmberError, OSError):
                pass
            self.vmm.wait(timeout)
        # Whether the guest powered off or not: the VMM goes, and so does its jail
        # (nobody else removes it when the jailed QEMU ran in place, with no waiter).
        self.vmm.stop(timeout=2.0)
        self._close()

    def kill(self) -> None:
        if self.vmm is not None:
            self.vmm.kill()
        self._close()

    def _close(self) -> None:
        if self.agent is not None:
            try:
                self.agent.close()
            except Exception:  # noqa: BLE001 - closing a dead channel must not mask the cause
                pass
            self.agent = None
        for name in ("agent.sock", "qmp.sock"):
            try:
                os.unlink(self.work_dir / name)
            except OSError:
                pass


def _snapshot_new_vm(cfg: Config, spec: VMSpec, vm_id: str, work_dir: Path, dest: Path) -> str:
    """Boot a fresh VM like ``spec`` (cold, never from a template), wait for its
    agent, save its snapshot to ``dest`` and kill it: a VM template's build
    (ember.sandbox.template.Builder). Returns the guest's kernel release."""
    vm = SandboxVM(cfg, vm_id, work_dir, spec.vcpus, spec.memory_mib,
                   use_template=False, nic=spec.nic, snapshot_to=dest)
    try:
        agent = vm.boot()
        details = agent.guest_details()
        assert vm.vmm is not None
        vm.vmm.save_snapshot(dest)
        return getattr(details, "kernel_release", "")
    finally:
        vm.kill()
