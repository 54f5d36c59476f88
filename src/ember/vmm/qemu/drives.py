"""Disks as QEMU sees them: blockdev nodes, and a qcow2 overlay's backing file
(which a jailed QEMU gets as a descriptor of its own, see QemuVMM._jail_drive)."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from ember.vmm.base import Drive


def blockdev(drive: Drive) -> dict:
    """The QMP blockdev node of a drive. A block device (an LVM thin LV from
    ember-snapshotter) needs QEMU's host_device protocol driver; "file" is for
    regular files."""
    proto = "host_device" if _is_block_device(drive.path) else "file"
    node: dict[str, object] = {
        "driver": drive.format,
        "node-name": f"n-{drive.drive_id}",
        "file": {"driver": proto, "filename": str(drive.path)},
    }
    if drive.readonly:
        node["read-only"] = True
    return node


def _is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def qcow2_backing(path: Path) -> Path | None:
    """The backing file a qcow2 header names (offset 8: u64 offset, 16: u32 size)."""
    with open(path, "rb") as f:
        header = f.read(20)
        if len(header) < 20 or header[:4] != b"QFI\xfb":
            return None
        offset, size = struct.unpack(">QI", header[8:20])
        if not offset or not size:
            return None
        f.seek(offset)
        name = f.read(size).decode()
    base = Path(name)
    return base if base.is_absolute() else Path(path).parent / base
