"""Build ext4 images from a folder with `mkfs.ext4 -d`: no mount, no loop device.

Used for container root filesystems (ember.storage.rootfs) and for the guest's
own rootfs (ember.guest). The image file is sparse: mke2fs writes only the
metadata and the files' data, so a 1 GiB filesystem holding 2 MiB of files
costs a few MiB of disk.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path

from ember.errors import EmberError

BLOCK = 4096
JOURNAL_MIB = 4  # the smallest journal mke2fs accepts; enough for a container's writes


def content_size(src: Path) -> int:
    """Bytes a folder's files really occupy (allocated blocks, not apparent size)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def make_ext4(
    src_dir: str | os.PathLike,
    dest: str | os.PathLike,
    size_bytes: int,
    label: str | None = None,
    journal: bool = False,
    inodes: int | None = None,
    error: type[EmberError] = EmberError,
) -> Path:
    """Create ``dest`` as an ext4 image of ``size_bytes`` holding a copy of ``src_dir``.

    Read-only images skip the journal (less to write, nothing to replay);
    ``journal=True`` adds a small one for images the guest will write to.
    Ownership, modes, xattrs, hard links, symlinks and device nodes are copied by
    mke2fs itself. The image is written to a temp file and renamed, so ``dest``
    is either complete or absent.
    """
    dest = Path(dest)
    size_bytes = max(int(size_bytes), 16 << 20)
    size_bytes -= size_bytes % BLOCK
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    cmd = ["mkfs.ext4", "-F", "-q", "-b", str(BLOCK), "-m", "0", "-I", "256"]
    cmd += ["-J", f"size={JOURNAL_MIB}"] if journal else ["-O", "^has_journal"]
    # Default discard on a fresh sparse file punches nothing yet lets mke2fs mark the
    # inode tables as zeroed, so the guest kernel never zeroes them in the background
    # (which would fill every container's overlay with writes).
    cmd += ["-E", "root_owner=0:0"]
    if label:
        cmd += ["-L", label[:16]]
    if inodes:
        cmd += ["-N", str(inodes)]
    cmd += ["-d", str(src_dir), tmp, str(size_bytes // 1024) + "k"]
    try:
        os.truncate(tmp, size_bytes)
        try:
            res = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            raise error("mkfs.ext4 not found (apt install e2fsprogs)") from None
        if res.returncode != 0:
            msg = (res.stderr or res.stdout).strip().splitlines()
            raise error(f"mkfs.ext4 failed for {dest.name}: {msg[-1] if msg else res.returncode}")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def format_empty_rootfs(target: str | os.PathLike, discard: bool = False,
                        error: type[EmberError] = EmberError) -> None:
    """Make ``target`` (a sized file or a block device) an empty container root
    file system, as ember-snapshotter's backends start every base layer: block
    and inode sizes as :func:`make_ext4`, no blocks reserved for root, a 16 MiB
    journal (the guest writes to it), no lost+found (a container's rootfs has
    none; e2fsck makes one if needed). ``discard``: tell the device that
    nothing is in use (a thin LV then maps no data for it); on a file, mke2fs
    punches holes, so it stays sparse either way."""
    opts = "root_owner=0:0,discard" if discard else "root_owner=0:0"
    _tool(["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-I", "256", "-m", "0", "-J", "size=16",
           "-E", opts, "-L", "ember-rootfs", str(target)], error)
    _tool(["debugfs", "-w", "-R", "rmdir lost+found", str(target)], error)


def _tool(cmd: list[str], error: type[EmberError]) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise error(f"{cmd[0]} not found (apt install e2fsprogs)") from None
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise error(f"{cmd[0]} failed for {cmd[-1]}: {msg[-1] if msg else res.returncode}")
