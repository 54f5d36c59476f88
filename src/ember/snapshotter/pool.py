"""Where snapshot images live: a reflink-capable directory, made if need be.

Copy-on-write block snapshots need a filesystem with reflinks (XFS, btrfs).
Users of Kata with Firecracker must build a devicemapper thin pool by hand
before anything works; Ember instead probes ``--root`` and, when it cannot
clone files (ext4, tmpfs...), makes its own XFS filesystem in a sparse file
``ROOT/pool.img`` on a loop device, mounted at ``ROOT/pool``. The first start
creates it, later starts remount it, and the user does nothing.

The pool stays mounted when the snapshotter exits: containerd and running VMs
use the images inside it by path. :func:`release` unmounts it on request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError
from ember.storage.reflink import clone_file, unsupported
from ember.util import atomic_write_json, run_tool

log = logging.getLogger(__name__)

POOL_IMAGE = "pool.img"
POOL_DIR = "pool"
STATE_FILE = "ember-snapshotter.json"
MIN_POOL = 1 << 30
# mkfs.xfs refuses filesystems under 300 MiB.
XFS_MIN = 300 << 20


def run(cmd: list[str], what: str) -> str:
    """Run a system tool; a failure becomes one line naming what failed."""
    return run_tool(cmd, what)


def supports_reflink(directory: Path) -> bool:
    """Probe (rather than guess from the fs type) whether files clone here."""
    a, b = directory / ".reflink-probe-a", directory / ".reflink-probe-b"
    for p in (a, b):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    try:
        a.write_bytes(b"ember")
        clone_file(a, b)
        return True
    except OSError as exc:
        if unsupported(exc):
            return False
        raise
    finally:
        for p in (a, b):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


@dataclass
class Pool:
    """The reflink-capable directory snapshot data goes in."""

    root: Path
    data_dir: Path
    mode: str  # "native" (root itself clones) or "loop-xfs" (our own XFS)

    @property
    def image(self) -> Path:
        return self.root / POOL_IMAGE


def _mount_source(mountpoint: Path) -> str | None:
    """The device mounted at ``mountpoint``, from /proc/self/mountinfo."""
    target = str(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mp = fields[4].encode().decode("unicode_escape")
            if mp == target:
                sep = fields.index("-")
                found = fields[sep + 2]
    return found


def loop_backing_file(device: str) -> str | None:
    """The file behind a loop device, or None if it is not a loop device."""
    name = os.path.basename(device)
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def default_pool_size(root: Path) -> int:
    """90% of the free space where the sparse pool file lives.

    The file is sparse, so this costs nothing up front; staying under the
    free space keeps XFS from promising blocks the host disk cannot give.
    """
    st = os.statvfs(root)
    return max(MIN_POOL, int(st.f_bavail * st.f_frsize * 0.9))


def open_pool(root: Path, pool_size: int | None = None) -> Pool:
    """Find or make the pool under ``root``, mounting it if needed."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    state_file = root / STATE_FILE
    state: dict = {}
    if state_file.exists():
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as exc:
            raise EmberError(f"snapshotter state {state_file} is unreadable: {exc}") from None
    mode = state.get("mode")
    if mode is None:
        mode = "native" if supports_reflink(root) else "loop-xfs"
    if mode == "native":
        pool = Pool(root, root, "native")
    elif mode == "loop-xfs":
        pool = Pool(root, root / POOL_DIR, "loop-xfs")
        _ensure_loop_xfs(pool, pool_size)
        if not supports_reflink(pool.data_dir):
            raise EmberError(f"{pool.data_dir}: the pool filesystem does not support reflinks")
    else:
        raise EmberError(f"snapshotter state {state_file}: unknown mode {mode!r}")
    if state.get("mode") != mode:
        atomic_write_json(state_file, {"mode": mode, "version": 1})
    return pool


def _ensure_loop_xfs(pool: Pool, pool_size: int | None) -> None:
    mnt = pool.data_dir
    mnt.mkdir(exist_ok=True)
    source = _mount_source(mnt)
    if source is not None:
        backing = loop_backing_file(source)
        if backing and Path(backing.removesuffix(" (deleted)")) == pool.image:
            if pool_size:
                _grow(pool, pool_size)
            return
        raise EmberError(f"{mnt} is already a mount of {source}, not of {pool.image}")
    if not pool.image.exists():
        size = pool_size or default_pool_size(pool.root)
        if size < XFS_MIN:
            raise EmberError(f"pool size {size} bytes is too small (XFS needs at least 300 MiB)")
        log.info("creating a %d MiB XFS pool in %s (no reflinks on %s)",
                 size >> 20, pool.image, pool.root)
        tmp = pool.image.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            with open(tmp, "wb") as f:
                f.truncate(size)
            run(["mkfs.xfs", "-q", "-m", "reflink=1", str(tmp)], f"mkfs.xfs {tmp}")
            os.replace(tmp, pool.image)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    run(["mount", "-t", "xfs", "-o", "loop", str(pool.image), str(mnt)],
        f"mounting the snapshot pool {pool.image}")
    if pool_size:
        _grow(pool, pool_size)


def _grow(pool: Pool, size: int) -> None:
    """Enlarge the pool online to ``size`` if asked for more than it has.

    XFS grows but never shrinks, so a smaller ``--pool-size`` is ignored.
    """
    current = pool.image.stat().st_size
    if size <= current:
        if size < current:
            log.info("pool %s stays %d MiB (XFS cannot shrink)", pool.image, current >> 20)
        return
    device = _mount_source(pool.data_dir)
    if device is None:
        raise EmberError(f"cannot grow {pool.image}: it is not mounted")
    os.truncate(pool.image, size)
    run(["losetup", "-c", device], f"resizing {device}")
    run(["xfs_growfs", str(pool.data_dir)], f"growing the snapshot pool {pool.data_dir}")
    log.info("grew the pool %s from %d to %d MiB", pool.image, current >> 20, size >> 20)


def release(root: Path) -> bool:
    """Unmount the pool under ``root`` (its loop device goes with it).

    Returns False if there was nothing mounted. Fails if snapshots inside are
    still in use, rather than detaching them lazily under a running VM.
    """
    mnt = root.resolve() / POOL_DIR
    if _mount_source(mnt) is None:
        return False
    run(["umount", str(mnt)], f"unmounting the snapshot pool {mnt}")
    return True


def remove_pool_files(root: Path) -> None:
    """Delete everything under ``root`` after :func:`release` (tests, uninstall)."""
    release(root)
    shutil.rmtree(root, ignore_errors=True)
