"""Block root filesystems for containers: flatten an image once, clone it per container.

The guest sees a container's rootfs as a virtio block device, so an image is
turned into one ext4 file: its layers are applied into a staging folder and
`mkfs.ext4 -d` copies that into a sparse image (no mount, no loop device). The
result is cached per image id and treated as read-only; every container gets a
writable disk made from it in O(1): a reflink clone where the filesystem can
(XFS, btrfs) or a qcow2 overlay backed by the base everywhere else.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ImageError
from ember.image.store import Image, ImageStore
from ember.storage.ext4 import content_size, make_ext4
from ember.storage.layers import apply_layer
from ember.storage.reflink import clone_file, unsupported
from ember.util import private_dir

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class WritableDisk:
    path: Path
    format: str  # "raw" (reflink clone) or "qcow2" (overlay over the raw base)


def rootfs_size(content: int) -> int:
    """Filesystem size for an image: room for the container to write, rounded to MiB."""
    size = max(content * 2, content + GIB)
    return (size + MIB - 1) // MIB * MIB


def flatten(store: ImageStore, image: Image) -> Path:
    """Return the cached read-only ext4 image of ``image``, building it on first use."""
    dest = store.rootfs_path(image.id)
    if dest.exists():
        return dest
    private_dir(dest.parent)
    lock_fd = os.open(dest.parent / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # two `ember run`s of a new image build it once
        if dest.exists():
            return dest
        _drop_leftovers(dest.parent)
        # mkdtemp makes the outer folder 0700: no other user may reach (or run) an
        # image's setuid files while they are unpacked. The inner folder becomes
        # the image's "/", so it keeps the usual 0755.
        outer = Path(tempfile.mkdtemp(prefix=f".staging-{image.short_id}-", dir=dest.parent))
        staging = outer / "root"
        staging.mkdir(mode=0o755)
        os.chmod(staging, 0o755)
        try:
            for n, layer in enumerate(image.layers, 1):
                what = f"image {image.short_id} layer {n}/{len(image.layers)} ({layer.digest[:19]})"
                blob = store.blob_path(layer.digest)
                if not blob.exists():
                    raise ImageError(f"{what}: blob missing from the store")
                apply_layer(staging, blob, what)
            content, entries = content_size(staging), _count_entries(staging)
            size = rootfs_size(content)
            make_ext4(
                staging,
                dest,
                size,
                label="ember-rootfs",
                journal=True,
                inodes=max(entries * 2 + 4096, size // 16384),
                error=ImageError,
            )
            os.chmod(dest, 0o400)  # root-only; a jailed VMM gets a descriptor
        finally:
            shutil.rmtree(outer, ignore_errors=True)
        return dest
    finally:
        os.close(lock_fd)


def _drop_leftovers(rootfs_dir: Path) -> None:
    """Remove what a killed flatten left behind; safe because we hold the flatten lock."""
    for path in rootfs_dir.iterdir():
        if path.name.startswith(".staging-"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".") and path.name.endswith(".tmp") and ".ext4." in path.name:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _count_entries(root: Path) -> int:
    return sum(len(d) + len(f) for _, d, f in os.walk(root))


def prepare_writable(base: Path, dest: Path) -> WritableDisk:
    """Make a container's private writable disk from a base image, in constant time.

    ``dest`` must not exist. The base is never modified.
    """
    base, dest = Path(base).resolve(), Path(dest)
    if not base.is_file():
        raise ImageError(f"base image {base} does not exist")
    if dest.exists() or dest.is_symlink():
        raise ImageError(f"writable disk {dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _reflink(base, dest):
        return WritableDisk(dest, "raw")
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(dest)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise ImageError("qemu-img not found (apt install qemu-utils)") from None
    if res.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        lines = res.stderr.strip().splitlines()
        raise ImageError(
            f"qemu-img create failed for {dest}: {lines[-1] if lines else res.returncode}"
        )
    return WritableDisk(dest, "qcow2")


def _reflink(base: Path, dest: Path) -> bool:
    """Clone ``base`` into ``dest`` sharing all blocks; False if the filesystem cannot."""
    try:
        clone_file(base, dest, mode=0o644, sync=False)
        return True
    except OSError as exc:
        if unsupported(exc):
            return False
        raise ImageError(f"cannot clone {base} to {dest}: {exc.strerror}") from None
