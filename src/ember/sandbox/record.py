"""The crash record of a VM, one format for `ember run` and for pods.

Whoever owns a VM (the sandbox monitor, or the shim serving a pod) writes
these fields before it makes the thing they name, and clears them once it is
gone, so that when the owner dies anything it left can be found and removed
by :func:`ember.sandbox.cleanup.release_vm` (``ember rm -f`` for a sandbox; ``containerd-shim-ember-v2
delete`` for a pod). ``state.json`` (:class:`ember.sandbox.state.SandboxState`)
and the shim's ``pod.json`` (:class:`PodRecord`) both extend it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ember.util import atomic_write_json


@dataclass(kw_only=True)
class VMRecord:
    """What a VM's owner leaves behind if it dies."""

    vmm_kind: str = ""  # the hypervisor (ember.vmm.base.VMM.kind) of the VM
    vmm_pid: int | None = None  # an unjailed VMM (a jailed one is found by its jail)
    jail: dict = field(default_factory=dict)  # the VMM's jail (ember.vmm.base.VMM.jail_record)
    netns: str = ""  # a network namespace whose eth0 was redirected to the VM
    vm_dir: str = ""  # the VM's work folder: an unjailed VMM's command line names it
    cgroup: str | None = None  # the pod cgroup the VMM's jail cgroup sits below
    cgroups_created: list[str] = field(default_factory=list)  # made for the pod; removed


@dataclass(kw_only=True)
class PodRecord(VMRecord):
    """``pod.json``: a pod's VM and the shim that owns it."""

    shim_pid: int | None = None
    group: str = ""  # the pod's sandbox id: the VM id its jail is named after

    def write(self, pod_dir: Path) -> None:
        atomic_write_json(pod_dir / "pod.json", asdict(self))

    @classmethod
    def read(cls, pod_dir: Path) -> PodRecord:
        """The record, or an empty one if it is missing or unreadable (cleanup
        then goes by the pod's id alone)."""
        try:
            data = json.loads((pod_dir / "pod.json").read_text())
        except (OSError, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known and v is not None})
        except TypeError:
            return cls()
