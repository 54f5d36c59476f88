"""The hypervisors Ember drives, each behind :class:`ember.vmm.base.VMM`.

:func:`backend` is the one place that maps a configured hypervisor name to its
driver class; everything else asks the class (binary, accelerator, snapshot
support, jail) instead of comparing names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.config import Config
    from ember.vmm.base import VMM, VMSpec

HYPERVISORS = ("qemu", "firecracker")


def backend(name: str) -> type[VMM]:
    """The driver class of hypervisor ``name`` (imported only when asked for)."""
    if name == "qemu":
        from ember.vmm.qemu import QemuVMM

        return QemuVMM
    if name == "firecracker":
        from ember.vmm.firecracker import FirecrackerVMM

        return FirecrackerVMM
    raise EmberError(f"config vm.hypervisor: unknown hypervisor {name!r} "
                     f"(one of {', '.join(HYPERVISORS)})")


def configured(cfg: Config) -> type[VMM]:
    """The driver class the configuration selects (`vm.hypervisor`)."""
    return backend(cfg.vm.hypervisor)


def make_vmm(cfg: Config, spec: VMSpec) -> VMM:
    """A driver for spec, of the configured hypervisor."""
    return configured(cfg).make(cfg, spec)


def process_kind(comm: str) -> str | None:
    """The hypervisor a process named ``comm`` (its /proc comm) runs, None if it
    is no VMM: readers that find a VMM by its pid (metrics) check it is one."""
    if comm.startswith("qemu"):
        return "qemu"
    if "firecracker" in comm:
        return "firecracker"
    return None


def vmm_binaries(cfg: Config) -> list[str]:
    """Every VMM binary a sandbox may run under, the configured hypervisor's first
    (a jail is named after its binary: cleanup tries each). Read from the
    configuration by name, so no other driver is imported for it (Firecracker's,
    with its HTTP client, cost every ``ember run`` ~16 ms)."""
    from ember.vmm.base import binary_key

    names = [cfg.vm.hypervisor, *HYPERVISORS]
    return list(dict.fromkeys(str(getattr(cfg.vm, binary_key(n))) for n in names))
