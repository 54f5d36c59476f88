"""The one QEMU machine Ember runs, for VMs and for the accelerator probe alike.

``microvm`` with no option ROMs, the ISA serial console and no RTC, booted by
qboot (``qboot.rom``), which loads the kernel and initrd straight from
fw_cfg. Named explicitly: Debian's QEMU 7.2 pointed ``bios-microvm.bin`` at
qboot, but 10.0 (bookworm-backports) finds SeaBIOS's build of that name
first, which cannot boot a kernel without the option ROMs we turn off.

No PIT either, when the guest is told its TSC rate (``tsc_early_khz=`` on
its command line, which the guest build adds on hosts with a constant TSC):
the PIT is then only a timer interrupt that wakes an idle guest. Measured
2026-12-07 under TCG, 4 idle sandboxes for 30 s: their QEMUs used 116-128 CPU
ticks without the PIT against 176-183 with it, a third less. With many idle
sandboxes on few cores that CPU is what slows the next start (the 40th start
of ``bench/density.py`` still took 1.17-1.66x the first in two runs). A guest
not told the rate calibrates its TSC against the PIT, so it keeps one.
"""

MACHINE = "microvm,x-option-roms=off,isa-serial=on,rtc=off"
FIRMWARE = "qboot.rom"
NO_PIT = ",pit=off"

# What a VM template's key holds of the machine (``QemuVMM.template_inputs``):
# a snapshot restores only into the machine it was saved from. The command
# line, which decides the PIT, is in the key already.
TEMPLATE_KEY = f"{MACHINE}|{NO_PIT} with tsc_early_khz"


def machine(cmdline: str) -> str:
    """The ``-M`` value for a guest booted with ``cmdline``."""
    told_tsc = any(word.startswith("tsc_early_khz=") for word in cmdline.split())
    return MACHINE + (NO_PIT if told_tsc else "")
