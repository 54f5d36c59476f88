"""Block "hotplug" for Firecracker: a pool of placeholder drives.

Firecracker (before 1.16) cannot add a block device to a running VM, but it
can re-point an existing one: ``PATCH /drives/{id}`` with a new
``path_on_host`` swaps the backing file and tells the guest the new size. So
every VM boots with N small placeholder drives, and attaching a container
disk means patching a free placeholder onto the real image; detaching patches
the placeholder back.

How the guest finds the right device — the ``fcdisk`` GuestDevice kind.
Firecracker answers the virtio-blk GET_ID request with an id built from the
*backing file it opened*: the decimal ``st_dev``, ``st_rdev`` and ``st_ino``
run together, cut to 20 bytes, rebuilt on every PATCH. The guest kernel
re-asks on every read of ``/sys/block/vdX/serial``. The host stats the same
file, so it knows that id before the guest does, and the agent waits until a
``vdX`` shows that serial *and* the image's size in sectors. Why not the
alternatives:

* drive order → ``/dev/vdX``: the letter depends on probe order and on
  whatever other virtio-blk devices exist; it names the slot, and a slot
  holds different disks over time, so a stale mount could be mistaken for the
  new one;
* a magic header written into the image: needs write access to images that
  may be shared and read-only, and only works for file systems that leave
  their first sector alone (ext4 does, XFS does not).

The serial names the *file*, and the size check covers the moment after the
PATCH when the data path already reads the new file but the guest kernel has
not yet processed the capacity-change interrupt (mounting then would see the
placeholder's size).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ember.errors import VMError
from ember.vmm.base import GuestDevice

PLACEHOLDER_BYTES = 1 << 20  # sparse: costs one inode, no blocks
PLACEHOLDER_HEADER = b"EMBER-FC-PLACEHOLDER\n"
SERIAL_BYTES = 20  # VIRTIO_BLK_ID_BYTES
SECTOR = 512
KIND = "fcdisk"
SETTING = "vm.fc_placeholder_drives"


def disk_serial(path: Path) -> str:
    """The serial the guest will read for a drive backed by ``path``."""
    st = os.stat(path)
    return f"{st.st_dev}{st.st_rdev}{st.st_ino}"[:SERIAL_BYTES]


def guest_device(path: Path) -> GuestDevice:
    """``fcdisk`` address ``SERIAL:SECTORS`` for a drive backed by ``path``."""
    sectors = os.stat(path).st_size // SECTOR
    return GuestDevice(KIND, f"{disk_serial(path)}:{sectors}")


def write_placeholder(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(PLACEHOLDER_HEADER)
        f.truncate(PLACEHOLDER_BYTES)


@dataclass
class Slot:
    drive_id: str  # Firecracker's drive id, "ph0".."phN-1"
    placeholder: Path
    owner: str | None = None  # the Ember drive id patched in, if any
    path: Path | None = None
    api_path: str = ""  # the placeholder as Firecracker names it (host or jail path)
    drive_api: str = ""  # the attached disk as Firecracker names it


class PlaceholderPool:
    """The placeholder slots of one VM and which Ember drive each one holds."""

    def __init__(self, directory: Path, count: int) -> None:
        if count < 0:
            raise VMError(f"config {SETTING} must be 0 or more, not {count}")
        self.directory = directory
        self.slots = [Slot(f"ph{i}", directory / f"ph{i}.img") for i in range(count)]

    def create_files(self) -> None:
        """One sparse file per slot; the header only helps a human reading the disk."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for slot in self.slots:
            write_placeholder(slot.placeholder)

    def remove_files(self) -> None:
        for slot in self.slots:
            slot.placeholder.unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:
            pass

    def put_bodies(self) -> list[dict]:
        """``PUT /drives/phN`` bodies: read-write, so any image can be patched in later."""
        return [{"drive_id": s.drive_id, "path_on_host": s.api_path or str(s.placeholder),
                 "is_root_device": False, "is_read_only": False} for s in self.slots]

    def find(self, owner: str) -> Slot | None:
        return next((s for s in self.slots if s.owner == owner), None)

    def acquire(self, owner: str, path: Path) -> Slot:
        """Reserve a free slot for ``owner``; the caller PATCHes it and calls :meth:`release` on failure."""
        if self.find(owner) is not None:
            raise VMError(f"drive {owner!r} is already attached to this VM")
        real = Path(os.path.realpath(path))
        if any(s.path == real for s in self.slots):
            raise VMError(f"{path} is already attached to this VM (the guest could not "
                          "tell the two apart)")
        for slot in self.slots:
            if slot.owner is None:
                slot.owner, slot.path = owner, real
                return slot
        raise VMError(f"no free Firecracker placeholder drive for {owner!r}: all "
                      f"{len(self.slots)} are in use (raise {SETTING})")

    def release(self, owner: str) -> Slot | None:
        slot = self.find(owner)
        if slot is not None:
            slot.owner = slot.path = None
            slot.drive_api = ""
        return slot
