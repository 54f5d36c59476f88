"""Storage backends: how a snapshot's block device is made, cloned and freed.

The snapshotter keeps metadata; a backend keeps bytes. Each snapshot is one
ext4 block device. :class:`ReflinkBackend` keeps it as an image file in a
reflink-capable directory; ``ember.snapshotter.lvm.LvmBackend`` as a thin LV
(``create``/``clone`` are ``lvcreate``, ``mounts`` return ``/dev/VG/LV``
without the ``loop`` option).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from ember.snapshotter import usage
from ember.snapshotter.pool import Pool
from ember.storage.ext4 import format_empty_rootfs
from ember.storage.reflink import clone_file

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 10 << 30


@dataclass
class MountSpec:
    """One containerd Mount (type, source, options)."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)


class Backend(ABC):
    """Block devices for snapshots, addressed by the snapshotter's integer ids."""

    name: str

    @abstractmethod
    def create(self, sid: int) -> None:
        """Make an empty ext4 device for a snapshot without parent."""

    @abstractmethod
    def clone(self, parent: int, sid: int) -> None:
        """Make ``sid`` a copy-on-write copy of ``parent``; O(1)."""

    @abstractmethod
    def remove(self, sid: int) -> None:
        """Free the device; a missing one is not an error."""

    @abstractmethod
    def seal(self, sid: int) -> None:
        """Make the device's content durable before its commit is recorded."""

    @abstractmethod
    def mounts(self, sid: int, readonly: bool) -> list[MountSpec]:
        """What containerd (and Ember's shim) mounts or attaches."""

    @abstractmethod
    def usage(self, sid: int, parent: int | None) -> tuple[int, int]:
        """(bytes, inodes) this snapshot adds on top of its parent."""

    @abstractmethod
    def stored_ids(self) -> set[int]:
        """Ids of every device present, to find orphans after a crash."""

    @abstractmethod
    def purge_partial(self) -> int:
        """Delete half-made devices (from a crash mid-create); returns how many."""

    @abstractmethod
    def free_bytes(self) -> tuple[int, str]:
        """Bytes still free for new data, and where (for error messages)."""

    def capacity_error(self) -> str | None:
        """Why a new snapshot must be refused now (storage nearly full), if it must."""
        return None

    def committed(self, sid: int) -> None:  # noqa: B027 - optional hook
        """Called once a commit is recorded (an LV becomes read-only)."""

    def reconcile(self, committed: set[int], active: set[int]) -> None:  # noqa: B027
        """At start-up: bring devices in line with the metadata after a crash."""

    def close(self) -> None:  # noqa: B027
        """At a clean stop: end helper processes (the LVM backend's lvm shell)."""


class ReflinkBackend(Backend):
    """Each snapshot is ``DATA/images/<id>.ext4``, a reflink clone of its parent.

    Empty snapshots are clones of a template ext4 image made once per size, so
    even a fresh layer costs one FICLONE rather than an mkfs.
    """

    name = "reflink"

    def __init__(self, pool: Pool, image_size: int = DEFAULT_IMAGE_SIZE) -> None:
        self.pool = pool
        self.image_size = image_size
        self.images = pool.data_dir / "images"
        self.templates = pool.data_dir / "templates"
        self.images.mkdir(parents=True, exist_ok=True)
        self.templates.mkdir(parents=True, exist_ok=True)

    def path(self, sid: int) -> Path:
        return self.images / f"{sid}.ext4"

    def _template(self) -> Path:
        """The empty ext4 image every base snapshot starts from."""
        tpl = self.templates / f"empty-{self.image_size}.ext4"
        if tpl.exists():
            return tpl
        fd, tmp = tempfile.mkstemp(prefix=".empty-", suffix=".tmp", dir=self.templates)
        try:
            os.ftruncate(fd, self.image_size)
            os.close(fd)
            # mke2fs punches holes to "discard" a file, so its inode tables count
            # as zeroed and the image stays sparse (no lazy init writes later).
            format_empty_rootfs(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, tpl)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tpl

    def create(self, sid: int) -> None:
        self._publish(self._template(), sid)

    def clone(self, parent: int, sid: int) -> None:
        self._publish(self.path(parent), sid)

    def _publish(self, src: Path, sid: int) -> None:
        # The id is fresh from the database, so a file already under its name
        # is an orphan of a crash. FICLONE is atomic and clone_file fsyncs, and
        # a crash before the caller's transaction commits leaves a file with no
        # row, which recovery deletes: no temporary name is needed.
        dst = self.path(sid)
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()
        clone_file(src, dst)

    def remove(self, sid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(sid).unlink()

    def seal(self, sid: int) -> None:
        with open(self.path(sid), "rb") as f:
            os.fsync(f.fileno())

    def mounts(self, sid: int, readonly: bool) -> list[MountSpec]:
        # containerd 1.6 turns the "loop" option into a loop device (autoclear)
        # when it mounts this on the host; Ember's shim sees an ext4 image file
        # and attaches it to the VM as a virtio-blk disk as it is.
        return [MountSpec("ext4", str(self.path(sid)), ["ro" if readonly else "rw", "loop"])]

    def usage(self, sid: int, parent: int | None) -> tuple[int, int]:
        img = self.path(sid)
        size = usage.exclusive_bytes(img)
        inodes = usage.used_inodes(img)
        base = usage.used_inodes(self.path(parent) if parent is not None else self._template())
        return size, max(0, inodes - base)

    def stored_ids(self) -> set[int]:
        ids = set()
        for entry in os.scandir(self.images):
            stem, _, ext = entry.name.partition(".")
            if ext == "ext4" and stem.isdigit():
                ids.add(int(stem))
        return ids

    def purge_partial(self) -> int:
        count = 0
        for d in (self.images, self.templates):
            for entry in os.scandir(d):
                if entry.name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    count += 1
        return count

    def free_bytes(self) -> tuple[int, str]:
        st = os.statvfs(self.pool.data_dir)
        free, where = st.f_bavail * st.f_frsize, str(self.pool.data_dir)
        if self.pool.mode == "loop-xfs":
            # The pool file is sparse: the host disk under it can fill first.
            host = os.statvfs(self.pool.root)
            host_free = host.f_bavail * host.f_frsize
            if host_free < free:
                free, where = host_free, str(self.pool.root)
        return free, where


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from a syscall, or SQLite's "disk is full"."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, subprocess.CalledProcessError):
        return "No space left" in str(exc.stderr or "")
    return "disk is full" in str(exc) or "No space left" in str(exc)
