"""One pod = one micro-VM, owned by the shim that serves the pod.

The sandbox container (CRI's ``container-type=sandbox``, or a lone container
from ``ctr run``) boots the VM; the pod's other containers get their disks
hot-plugged into it. The VM is sized from the pod's resource annotations on
top of the configured base (``[vm] vcpus`` / ``memory_mib``), and the shim
and the VMM are moved into the pod's cgroup first so Pod Overhead pays for
them.

When the sandbox container joins a network namespace (CRI: the one CNI set
up, with ``eth0``), the VM gets a NIC: ``ember.net.podnet`` redirects eth0 to
a tap with tc, QEMU gets the tap, and the agent gives the guest NIC eth0's
MAC, addresses, MTU and routes; while the VM runs, ``ember.shim.portforward``
serves the guest's listening TCP ports on that namespace's loopback, where
containerd's PortForward dials. ``EMBER_POD_NETWORK=0`` in the shim's
environment turns this off (the VM then has no NIC, as before).

``pod.json`` in the pod folder (:class:`ember.sandbox.record.PodRecord`) records
what a crashed shim leaves behind (the VMM pid, cgroups it created, the netns it changed) so that ``containerd-shim-ember-v2 delete`` can
clean up without the shim.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import time
from pathlib import Path

from ember import trace
from ember.config import Config
from ember.sandbox import events
from ember.sandbox import podcgroup as cgroups
from ember.sandbox.events import PodEvents
from ember.sandbox.record import PodRecord
from ember.sandbox.spec import joined_netns
from ember.sandbox.vm import SandboxVM, release_network
from ember.shim import portforward
from ember.shim.layout import pod_identity

log = logging.getLogger("ember.shim.pod")

ANN_MEMORY = "io.kubernetes.cri.sandbox-memory"
ANN_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
ANN_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
MIB = 1 << 20


class SizeError(ValueError):
    """A resource annotation that is not a number."""


def _int_annotation(annotations: dict, key: str) -> int:
    raw = annotations.get(key, "")
    if raw in ("", None):
        return 0
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise SizeError(f"annotation {key}={raw!r} is not an integer") from None


def vm_size(cfg: Config, spec: dict, annotations: dict) -> tuple[int, int]:
    """(vcpus, memory MiB): the configured base plus what the pod asks for.

    A CRI pod says it in the sandbox-memory / sandbox-cpu-* annotations; a lone
    container (``ctr run --memory-limit``) in its own linux.resources.
    """
    mem = _int_annotation(annotations, ANN_MEMORY)
    quota = _int_annotation(annotations, ANN_CPU_QUOTA)
    period = _int_annotation(annotations, ANN_CPU_PERIOD)
    if not pod_identity(annotations)[1]:
        res = ((spec.get("linux") or {}).get("resources") or {})
        mem = mem or int((res.get("memory") or {}).get("limit") or 0)
        quota = quota or int((res.get("cpu") or {}).get("quota") or 0)
        period = period or int((res.get("cpu") or {}).get("period") or 0)
    extra_cpus = math.ceil(quota / (period or 100000)) if quota > 0 else 0
    vcpus = max(1, min(cfg.vm.vcpus + extra_cpus, max(os.cpu_count() or 1, cfg.vm.vcpus)))
    memory = cfg.vm.memory_mib + (max(mem, 0) + MIB - 1) // MIB
    return vcpus, memory


def vmm_cpu_limit(spec: dict, annotations: dict) -> float | None:
    """The CPUs the whole VMM may use (its jail cgroup), for a lone container only.

    A CRI pod's VMM already runs below the pod cgroup, which the kubelet caps at
    the pod's limit plus its Pod Overhead; the sandbox-cpu-* annotations leave
    the overhead out (they are for sizing the VM), so a jail limit taken from
    them would starve the VMM of the overhead the pod pays for. A lone container
    (``ctr run --cpus``) has no such cgroup: its own limit goes on the VMM, as
    ``ember run --cpus`` does.
    """
    if pod_identity(annotations)[1]:
        return None
    cpu = (((spec.get("linux") or {}).get("resources") or {}).get("cpu") or {})
    quota, period = int(cpu.get("quota") or 0), int(cpu.get("period") or 0)
    return quota / (period or 100000) if quota > 0 else None


class Pod:
    """The VM of one pod and the host resources around it."""

    def __init__(self, cfg: Config, pod_dir: Path, group_id: str) -> None:
        self.cfg = cfg
        self.dir = pod_dir
        self.group_id = group_id
        self.vm: SandboxVM | None = None
        self.events: PodEvents | None = None  # the node's event log (set by the shim)
        self.vmm_died = False  # the VMM was gone before the pod was stopped: a crash
        self.cgroups_created: list[str] = []
        self.cgroup: str | None = None
        self.netns: str | None = None  # the pod netns whose eth0 is redirected to the VM
        self.ports: portforward.PortForwarder | None = None  # guest ports on netns's loopback
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self.vm is not None and self.vm.agent is not None

    @property
    def agent(self):
        if self.vm is None or self.vm.agent is None:
            return None
        return self.vm.agent

    @property
    def vmm_pid(self) -> int | None:
        return self.vm.vmm.pid if self.vm is not None and self.vm.vmm is not None else None

    @property
    def jailed(self) -> bool:
        vmm = self.vm.vmm if self.vm is not None else None
        return vmm is not None and vmm.jail is not None

    def record(self) -> None:
        vmm = self.vm.vmm if self.vm is not None else None
        PodRecord(shim_pid=os.getpid(), group=self.group_id, vmm_pid=self.vmm_pid,
                  vmm_kind=vmm.kind if vmm is not None else "",
                  vm_dir=str(self.dir / "vm"),
                  jail=self.vm.jail_record() if self.vm is not None else {},
                  cgroup=self.cgroup, cgroups_created=list(self.cgroups_created),
                  netns=self.netns or "").write(self.dir)

    def _vm_config(self) -> Config:
        """The pod's translation cache size (``[vm] pod_tcg_tb_size_mib``), and with
        the jailer on, the VMM's jail cgroup below the pod's cgroup."""
        cfg = copy.deepcopy(self.cfg)
        cfg.vm.tcg_tb_size_mib = cfg.vm.pod_tcg_tb_size_mib
        if cfg.jailer.enabled and self.cgroup:
            cfg.jailer.parent_cgroup = self.cgroup.strip("/")
        return cfg

    def boot(self, spec: dict, annotations: dict) -> None:
        """Size, place in the pod cgroup, and boot the VM; returns once the agent answers."""
        vcpus, memory = vm_size(self.cfg, spec, annotations)
        self.cgroup = cgroups.pod_cgroup((spec.get("linux") or {}).get("cgroupsPath") or "")
        if self.cgroup:
            # The VMM inherits the shim's cgroups when it is forked.
            self.cgroups_created = cgroups.enter(self.cgroup, [os.getpid()])
        netns = joined_netns(spec) if network_enabled() else None
        self.netns = netns
        self.record()  # before the tc set-up, so `delete` after a crash can undo it
        vm = SandboxVM(self._vm_config(), self.group_id, self.dir / "vm", vcpus, memory,
                       nic=netns is not None, cpus=vmm_cpu_limit(spec, annotations))
        self.vm = vm
        began = time.monotonic()
        if self.events is not None:  # the pod's names, before its first event
            self.events.annotate(self.group_id, annotations)
        try:
            vm.boot(netns=netns)  # undoes the netns redirect itself if it fails
        except BaseException as exc:
            if self.events is not None and isinstance(exc, Exception):
                events.vm_boot_failed(self.events, vm, str(exc))
            self.vm = None
            vm.kill()
            self.netns = None
            self._release_cgroups()
            self.record()
            raise
        if self.cgroup and vm.vmm is not None and vm.vmm.pid and not self.jailed:
            cgroups.enter(self.cgroup, [vm.vmm.pid])  # a jailed VMM is in <pod>/<id> already
        self.record()
        if self.events is not None:
            events.vm_booted(self.events, vm, time.monotonic() - began)
            threading.Thread(target=events.watch_vmm, args=(self.events, vm,
                             lambda: self.vm is vm or self.vmm_died),
                             name="vmm-watch", daemon=True).start()
        if self.netns is not None:
            with trace.span("port forward"):
                self.ports = portforward.start(vm.agent, self.netns)
        log.info("pod VM %s up: %d vCPU, %d MiB, vmm pid %s, restored=%s", self.group_id[:12],
                 vcpus, memory, self.vmm_pid, vm.restored)

    def shutdown(self) -> None:
        with self._lock:
            # Stopped after its VMM died (containerd deletes the tasks the crash ended).
            # Known before self.vm goes: the VMM watcher asks "self.vm is vm or
            # vmm_died", and in between it read neither and published no crash.
            vm = self.vm
            self.vmm_died = vm is not None and vm.vmm is not None and vm.vmm.exited()
            self.vm = None
            ports, self.ports = self.ports, None
        if ports is not None:
            ports.stop()  # while the agent still answers: it closes the guest ends
        if vm is not None:
            try:
                vm.shutdown(timeout=3.0)
            except Exception:  # noqa: BLE001 - make sure the VMM is gone whatever happened
                log.exception("VM shutdown failed; killing it")
                vm.kill()
        self._release_network()
        self._release_cgroups()
        self.record()

    def _release_network(self) -> None:
        release_network(self.netns)
        self.netns = None

    def _release_cgroups(self) -> None:
        if self.cgroups_created:
            cgroups.leave(os.getpid())
            cgroups.remove(self.cgroups_created)
            self.cgroups_created = []


def network_enabled() -> bool:
    """Pod networking is on unless the shim's environment says EMBER_POD_NETWORK=0."""
    return os.environ.get("EMBER_POD_NETWORK", "1").strip().lower() not in ("0", "off", "false")


def read_record(pod_dir: Path) -> PodRecord:
    return PodRecord.read(pod_dir)
