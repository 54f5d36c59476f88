"""Reflink copies (FICLONE): a new file sharing every block of another, O(1)
whatever the size, on XFS (reflink=1), btrfs and the like.

One home for the ioctl, used for container disks (ember.storage.rootfs) and by
ember-snapshotter's file backend (ember.snapshotter.pool).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

FICLONE = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h
# What FICLONE answers where the file system (or the pair of files) cannot share
# blocks: another file system, no reflink support, a file type it does not clone.
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY,
                         errno.EBADF, errno.EPERM})


def clone_file(src: Path, dst: Path, mode: int = 0o600, sync: bool = True) -> None:
    """Make ``dst`` (which must not exist) a reflink of ``src``; OSError if that
    cannot be done, and then no ``dst`` is left. ``sync``: fsync it, so a crash
    right after never leaves a file that looks whole and is not."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
            if sync:
                os.fsync(dfd)
        except BaseException:
            os.close(dfd)
            dfd = -1
            os.unlink(dst)
            raise
        finally:
            if dfd >= 0:
                os.close(dfd)
    finally:
        os.close(sfd)


def unsupported(exc: OSError) -> bool:
    """True when ``exc`` (from :func:`clone_file`) means: no reflinks here."""
    return exc.errno in UNSUPPORTED
