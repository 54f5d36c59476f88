"""How much a container wrote to its disk, for `ember ps -s` (Docker's SIZE column).

The writable disk is a qcow2 overlay on the flattened image (or, on a file
system that clones, a reflinked copy): an overlay holds only what the
container wrote, so its allocated size is the number; a clone shares the
image's blocks, so only extents it no longer shares count (``filefrag``'s
FIEMAP flags).
"""

from __future__ import annotations

import os
import subprocess

from ember.errors import EmberError


def _unshared_bytes(path: str) -> int | None:
    """Bytes in extents of ``path`` not shared with another file (a reflinked clone)."""
    try:
        out = subprocess.run(["filefrag", "-v", "-b1", path], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(":")]
        if len(parts) < 5 or not parts[0].isdigit():
            continue
        length = parts[3].split()[0] if parts[3] else ""
        if length.isdigit() and "shared" not in line:
            total += int(length)
    return total


def written_bytes(st) -> tuple[int | None, int]:
    """(bytes the container wrote, or None when its disk is gone; its image's size)."""
    from ember.config import load_config
    from ember.image.store import ImageStore

    image = 0
    try:
        image = ImageStore(load_config()).resolve(st.image_id).size
    except EmberError:
        pass
    if not st.disk:
        return None, image
    try:
        with open(st.disk, "rb") as f:
            magic = f.read(4)
            blocks = os.fstat(f.fileno()).st_blocks * 512
    except OSError:
        return None, image
    if magic == b"QFI\xfb":  # qcow2: the overlay holds only what was written
        return blocks, image
    return _unshared_bytes(st.disk), image
