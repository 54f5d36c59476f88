"""The QEMU backend: the ``microvm`` driver, its QMP client, the accelerator
probe (KVM only where it really boots faster than TCG). Everything
QEMU-specific lives in this package; the rest of Ember sees :class:`QemuVMM`
through :class:`ember.vmm.base.VMM`."""

from ember.vmm.qemu.driver import QemuVMM

__all__ = ["QemuVMM"]
