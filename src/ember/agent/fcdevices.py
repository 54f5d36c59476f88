"""Guest side of Firecracker's placeholder drives: which /dev/vdX is this disk?

Under Firecracker a container disk arrives by ``PATCH /drives/{id}`` onto a
placeholder virtio-blk device that existed since boot, so nothing is
hot-plugged and no uevent says "here it is". The host sends a BlockDevice of
kind ``fcdisk`` with address ``SERIAL:SECTORS`` (see ember.vmm.firecracker.drives for
why): Firecracker answers the virtio GET_ID request with an id derived from
the backing file it opened, and the kernel asks again on every read of
``/sys/block/vdX/serial``. A device is the disk once its serial is that id
*and* its size is the image's size — until the guest has handled the
capacity-change interrupt it still has the placeholder's size and must not
be mounted.

The agent calls :func:`find_device` in its resolve poll loop; None means
"not there yet, ask again".
"""

from __future__ import annotations

import glob
import os

KINDS = ("fcdisk",)


def parse_address(address: str) -> tuple[str, int]:
    """``SERIAL:SECTORS`` → (serial, sectors); ValueError on anything else."""
    serial, sep, sectors = address.rpartition(":")
    if not sep or not serial or not sectors.isdigit():
        raise ValueError(f"bad fcdisk address {address!r} (want SERIAL:SECTORS)")
    return serial, int(sectors)


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().split(b"\0", 1)[0].decode("ascii", "replace").strip()
    except OSError:
        return None


def find_device(kind: str, address: str, sys_root: str = "/sys",
                dev_root: str = "/dev") -> str | None:
    """The /dev node of an ``fcdisk`` once the guest sees it; None until then.

    ValueError for a kind this module does not handle or a malformed address.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown block device kind {kind!r} for Firecracker drives")
    serial, sectors = parse_address(address)
    for entry in sorted(glob.glob(os.path.join(sys_root, "block", "vd*"))):
        name = os.path.basename(entry)
        if _read(os.path.join(entry, "serial")) != serial:
            continue
        if _read(os.path.join(entry, "size")) != str(sectors):
            continue  # right file, size change not processed yet
        dev = os.path.join(dev_root, name)
        if os.path.exists(dev):
            return dev
    return None
