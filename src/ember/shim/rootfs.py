"""containerd's rootfs mounts -> one block device for the guest.

The guest never shares a filesystem with the host: every container root is a
disk. What containerd hands the shim decides how that disk is made:

* a block snapshotter's mount (``type: ext4``, an image file with the ``loop``
  option, or a ``/dev/loopN`` device): the file itself is attached, no copy;
  the container's writes land in that snapshot, its own writable layer;
* a block device that is not a loop device (``ember-snapshotter --backend
  lvm``'s ``/dev/VG/LV``, devmapper's ``/dev/mapper/...``): the device itself
  is attached, no copy and no loop device;
* the default overlayfs snapshotter (``type: overlay`` with ``lowerdir``,
  ``upperdir``, ``workdir``): the read-only lower layers are flattened once
  into a cached ext4 image (keyed by the layers' identity) and the container
  gets a qcow2 overlay over it, its own writable layer; if the upper dir is
  not empty (containerd copied image volumes into it), the merged view is
  flattened instead, uncached;
* a ``bind`` mount or no mount at all (``ctr run --rootfs DIR``): the directory
  is flattened.

Flattening mounts the overlay read-only for a moment and copies it with
``mkfs.ext4 -d``; nothing stays mounted on the host afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError
from ember.storage.ext4 import content_size, make_ext4
from ember.storage.rootfs import prepare_writable, rootfs_size
from ember.util import private_dir

log = logging.getLogger("ember.shim.rootfs")


class RootfsError(EmberError):
    """The rootfs mounts cannot be turned into a disk (bad or unsupported input)."""


@dataclass
class MountSpec:
    type: str
    source: str
    options: list[str]


@dataclass
class Disk:
    """A host file to attach as the container's root disk."""

    path: Path
    format: str  # "raw" | "qcow2"
    readonly: bool
    owned: bool  # the shim made it (and deletes it); False for snapshotter images


def is_loop_device(device: str) -> bool:
    """Whether ``device`` is a loop device (its file is attached instead of it)."""
    name = os.path.basename(os.path.realpath(device))
    return (Path("/sys/block") / name / "loop").is_dir()


def loop_backing_file(device: str) -> Path:
    """The file behind /dev/loopN (offset 0 only: the guest sees the whole file)."""
    name = os.path.basename(os.path.realpath(device))
    sys_dir = Path("/sys/block") / name / "loop"
    try:
        backing = (sys_dir / "backing_file").read_text().strip()
        offset = int((sys_dir / "offset").read_text().strip() or 0)
    except OSError:
        raise RootfsError(f"rootfs device {device} is not a loop device with a backing file; "
                          "only ext4 image files and loop devices can be attached") from None
    if offset:
        raise RootfsError(f"rootfs loop device {device} has offset {offset}; only 0 is supported")
    return Path(backing.removesuffix(" (deleted)"))


def parse_overlay(options: list[str]) -> tuple[list[str], str, str]:
    lower: list[str] = []
    upper = work = ""
    for opt in options:
        key, _, value = opt.partition("=")
        if key == "lowerdir":
            lower = [p for p in value.split(":") if p]
        elif key == "upperdir":
            upper = value
        elif key == "workdir":
            work = value
    if not lower:
        raise RootfsError("overlay rootfs mount has no lowerdir option")
    return lower, upper, work


def prepare(mounts: list[MountSpec], bundle: Path, work_dir: Path, cache_dir: Path) -> Disk:
    """Make (or find) the container's root disk; work_dir is the container's own folder."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if len(mounts) > 1:
        raise RootfsError(f"rootfs: {len(mounts)} mounts given; one mount (or none) is supported")
    if not mounts:
        src = bundle / "rootfs"
        if not src.is_dir() or not any(src.iterdir()):
            raise RootfsError(f"no rootfs mounts and {src} is empty or missing")
        return _flatten_dir(src, work_dir / "rootfs.img")
    m = mounts[0]
    readonly = "ro" in m.options
    if m.type in ("ext4", "xfs") or m.type.startswith("ext"):
        path = Path(m.source)
        if path.is_block_device() and not is_loop_device(m.source):
            # A block snapshotter's device (ember-snapshotter --backend lvm:
            # /dev/VG/LV; devmapper): the guest gets the device itself.
            return Disk(Path(os.path.realpath(m.source)), "raw", readonly, owned=False)
        if path.is_block_device() or m.source.startswith("/dev/"):
            path = loop_backing_file(m.source)
        if not path.is_file():
            raise RootfsError(f"rootfs image {path} does not exist")
        return Disk(path, "raw", readonly, owned=False)
    if m.type == "bind" or (m.type == "" and Path(m.source).is_dir()):
        return _flatten_dir(Path(m.source), work_dir / "rootfs.img")
    if m.type == "overlay":
        lower, upper, _ = parse_overlay(m.options)
        for d in lower:
            if not os.path.isdir(d):
                raise RootfsError(f"overlay lowerdir {d} does not exist")
        if upper and _non_empty(Path(upper)):
            with _mounted_overlay(m.options, work_dir / "mnt") as merged:
                return _flatten_dir(merged, work_dir / "rootfs.img")
        base = cached_base(lower, cache_dir, work_dir / "mnt")
        disk = prepare_writable(base, work_dir / "rootfs.qcow2")
        return Disk(disk.path, disk.format, readonly, owned=True)
    raise RootfsError(f"rootfs mount type {m.type!r} is not supported "
                      "(use overlay, bind, or an ext4 image/loop device)")


def _non_empty(path: Path) -> bool:
    try:
        return any(path.iterdir())
    except FileNotFoundError:
        return False


def _flatten_dir(src: Path, dest: Path) -> Disk:
    size = rootfs_size(content_size(src))
    make_ext4(src, dest, size, label="ember-rootfs", journal=True, error=RootfsError)
    return Disk(dest, "raw", False, owned=True)


@contextlib.contextmanager
def _mounted_overlay(options: list[str], target: Path):
    """Mount the overlay read-only at target for the duration of the block."""
    target.mkdir(parents=True, exist_ok=True)
    opts = ",".join([o for o in options if o not in ("rw", "ro")] + ["ro"])
    res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RootfsError(f"mounting the overlay rootfs failed: {res.stderr.strip()}")
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
        with contextlib.suppress(OSError):
            target.rmdir()


def _layer_key(lower: list[str]) -> str:
    """Identity of a layer stack: paths plus inode and ctime (a reused path is a new key)."""
    h = hashlib.sha256()
    for d in lower:
        st = os.stat(d)
        h.update(f"{d}\0{st.st_dev}\0{st.st_ino}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()[:32]


def cached_base(lower: list[str], cache_dir: Path, mnt: Path) -> Path:
    """The read-only ext4 image of a layer stack, built once and shared by containers."""
    private_dir(cache_dir)
    key = _layer_key(lower)
    dest = cache_dir / f"{key}.ext4"
    if dest.exists():
        return dest
    lock_fd = os.open(cache_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if dest.exists():
            return dest
        _evict_stale(cache_dir)
        if len(lower) == 1:
            _build_base(Path(lower[0]), dest)
        else:
            # Read-only overlay of the lower dirs alone: whiteouts are applied by the kernel.
            with _mounted_overlay([f"lowerdir={':'.join(lower)}"], mnt) as merged:
                _build_base(merged, dest)
        meta = cache_dir / f"{key}.json"
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"lowerdirs": lower}, f)
        os.replace(tmp, meta)
        return dest
    finally:
        os.close(lock_fd)


def _build_base(src: Path, dest: Path) -> None:
    size = rootfs_size(content_size(src))
    make_ext4(src, dest, size, label="ember-rootfs", journal=True, error=RootfsError)
    os.chmod(dest, 0o400)  # root-only; a jailed VMM gets a descriptor


def _evict_stale(cache_dir: Path) -> None:
    """Drop cached bases whose layers containerd has removed (their key can never match)."""
    for meta in cache_dir.glob("*.json"):
        try:
            lower = json.loads(meta.read_text()).get("lowerdirs", [])
        except (OSError, ValueError):
            lower = []
        if lower and all(os.path.isdir(d) for d in lower):
            continue
        for p in (meta.with_suffix(".ext4"), meta):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
