"""The Mount contract between ember-snapshotter and its consumers.

The snapshotter returns one containerd Mount per snapshot:
``type="ext4"``, ``source=<absolute path of the image file>``,
``options=["rw"|"ro", "loop"]``. containerd mounts that on the host through a
loop device; Ember's shim instead attaches ``source`` to the VM as a disk.
:func:`block_image` is the shim's side of the contract, kept here next to the
code that produces the mounts so the two cannot drift apart.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockImage:
    """A rootfs that can be given to a VM as a block device, unconverted."""

    path: str
    fstype: str
    readonly: bool


def block_image(mount_type: str, source: str, options: list[str] | tuple[str, ...],
                ) -> BlockImage | None:
    """The disk image behind a Mount, or None if it is not a block image.

    Recognises what ember-snapshotter returns (an ext4 image file with the
    ``loop`` option) and, for other block snapshotters such as devmapper, a
    block device node as source.
    """
    if mount_type not in ("ext4", "xfs", "ext3", "ext2"):
        return None
    try:
        st = os.stat(source)
    except OSError:
        return None
    readonly = "ro" in options
    if stat.S_ISREG(st.st_mode) and "loop" in options:
        return BlockImage(source, mount_type, readonly)
    if stat.S_ISBLK(st.st_mode):
        return BlockImage(source, mount_type, readonly)
    return None
