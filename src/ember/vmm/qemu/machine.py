"""The one QEMU machine Ember runs, for VMs and for the accelerator probe alike.

``microvm`` with no option ROMs, the ISA serial console and no RTC, booted by
qboot (``qboot.rom``), which loads the kernel and initrd straight from
fw_cfg. Named explicitly: Debian's QEMU 7.2 pointed ``bios-microvm.bin`` at
qboot, but 10.0 (bookworm-backports) finds SeaBIOS's build of that name
first, which cannot boot a kernel without the option ROMs we turn off.
"""

MACHINE = "microvm,x-option-roms=off,isa-serial=on,rtc=off"
FIRMWARE = "qboot.rom"
