"""Find a container's disk in the guest and mount it.

The host says how it attached the disk (virtio-scsi address, virtio-blk
serial, or a plain path in tests); the disk may have been hot-plugged a moment
before the request, so resolution polls. mount(2) is called through libc
because the guest image carries no mount binary; only the host-test path
(a regular image file) needs util-linux's losetup.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable

from ember.agent import fcdevices
from ember.ttrpc import Code, TTRPCError

log = logging.getLogger("ember.agent.storage")

BLKFLSBUF = 0x1261
RESOLVE_TIMEOUT = 10.0

MS_RDONLY = 1
_FLAGS = {
    "ro": MS_RDONLY, "rw": 0, "nosuid": 2, "nodev": 4, "noexec": 8, "sync": 16,
    "dirsync": 128, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21,
    "strictatime": 1 << 24, "lazytime": 1 << 25,
}
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _poll(fn: Callable[[], str | None], timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while True:
        found = fn()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise TTRPCError(Code.NOT_FOUND, f"{what} did not appear within {timeout:g}s")
        time.sleep(0.05)


def _scsi_device(address: str) -> str | None:
    parts = address.split(":")
    if len(parts) == 2:
        pattern = f"/sys/bus/scsi/devices/*:0:{parts[0]}:{parts[1]}/block/*"
    else:
        pattern = f"/sys/bus/scsi/devices/{address}/block/*"
    for entry in sorted(glob.glob(pattern)):
        dev = "/dev/" + os.path.basename(entry)
        if os.path.exists(dev) and _has_capacity(entry):
            return dev
    return None


def _has_capacity(sys_block: str) -> bool:
    """A hot-plugged disk's node appears before the SCSI scan has read its size."""
    try:
        with open(os.path.join(sys_block, "size")) as f:
            return int(f.read().strip() or 0) > 0
    except (OSError, ValueError):
        return False


def _scan_scsi_hosts() -> None:
    for scan in glob.glob("/sys/class/scsi_host/host*/scan"):
        try:
            with open(scan, "w") as f:
                f.write("- - -")
        except OSError as e:
            log.debug("scanning %s: %s", scan, e)


def _serial_device(serial: str) -> str | None:
    for path in sorted(glob.glob("/sys/block/vd*/serial")):
        try:
            with open(path) as f:
                if f.read().strip() == serial:
                    dev = "/dev/" + path.split("/")[3]
                    if os.path.exists(dev):
                        return dev
        except OSError:
            continue
    return None


def resolve(kind: str, address: str, timeout: float = RESOLVE_TIMEOUT) -> str:
    """The /dev node (or image file) a BlockDevice names."""
    if not address:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"block device of kind {kind!r} has no address")
    if kind == "scsi":
        if not all(p.isdigit() for p in address.split(":")) or address.count(":") not in (1, 3):
            raise TTRPCError(Code.INVALID_ARGUMENT,
                             f"bad SCSI address {address!r} (want T:L or H:C:T:L)")
        started = time.monotonic()
        scanned = False

        def find() -> str | None:
            nonlocal scanned
            dev = _scsi_device(address)
            if dev is None and not scanned and time.monotonic() - started > 1.0:
                scanned = True  # a hot-plug event may have been missed: ask once
                _scan_scsi_hosts()
            return dev

        return _poll(find, timeout, f"SCSI disk {address}")
    if kind == "serial":
        return _poll(lambda: _serial_device(address), timeout, f"virtio-blk disk {address!r}")
    if kind in fcdevices.KINDS:
        try:
            fcdevices.parse_address(address)
        except ValueError as e:
            raise TTRPCError(Code.INVALID_ARGUMENT, str(e)) from e
        return _poll(lambda: fcdevices.find_device(kind, address), timeout,
                     f"Firecracker disk {address}")
    if kind == "path":
        return _poll(lambda: address if os.path.exists(address) else None, timeout,
                     f"disk {address}")
    raise TTRPCError(Code.INVALID_ARGUMENT,
                     f"unknown block device kind {kind!r} (want scsi, serial, fcdisk or path)")


def flush_buffers(dev: str) -> None:
    """Drop cached blocks: after a snapshot restore another disk may have been here."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    finally:
        os.close(fd)


def _split_options(options: list[str], readonly: bool) -> tuple[int, str]:
    flags = MS_RDONLY if readonly else 0
    data = []
    for opt in options:
        if opt in _FLAGS:
            flags |= _FLAGS[opt]
        elif opt:
            data.append(opt)
    return flags, ",".join(data)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                     data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype}): {os.strerror(err)}")


def umount(target: str, lazy_fallback: bool = True) -> None:
    """Unmount target; not mounted is fine. Falls back to a lazy unmount if busy."""
    if _libc.umount2(target.encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
        return
    if lazy_fallback and _libc.umount2(target.encode(), MNT_DETACH) == 0:
        log.warning("%s was busy; detached it lazily", target)
        return
    err = ctypes.get_errno()
    raise OSError(err, f"umount {target}: {os.strerror(err)}")


def _flush_and_mount(src: str, target: str, fstype: str, flags: int, data: str) -> None:
    """Mount a device, retrying while a just-hot-plugged disk still answers ENXIO."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            if stat.S_ISBLK(os.stat(src).st_mode):
                flush_buffers(src)
            mount(src, target, fstype, flags, data)
            return
        except OSError as e:
            if e.errno not in (errno.ENXIO, errno.ENODEV) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def mount_disk(kind: str, address: str, target: str, fstype: str = "", readonly: bool = False,
               options: list[str] | None = None, run: Callable | None = None,
               timeout: float = RESOLVE_TIMEOUT) -> None:
    """Resolve, flush and mount one disk at target (created if missing).

    ``run`` runs a helper command (the reaper's run_command); it is only
    needed for an image file, which is attached to a loop device first.
    """
    src = resolve(kind, address, timeout)
    os.makedirs(target, exist_ok=True)
    flags, data = _split_options(list(options or []), readonly)
    loopdev = None
    if stat.S_ISREG(os.stat(src).st_mode):
        if run is None:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"{src} is a file, not a block device")
        args = ["losetup", "--find", "--show"] + (["--read-only"] if readonly else []) + [src]
        rc, out = run(args)
        if rc != 0:
            raise TTRPCError(Code.INTERNAL, f"losetup {src}: {out.decode(errors='replace').strip()}")
        loopdev = src = out.decode().strip().splitlines()[-1]
    try:
        _flush_and_mount(src, target, fstype or "ext4", flags, data)
    except OSError as e:
        raise TTRPCError(Code.INTERNAL, str(e)) from e
    finally:
        if loopdev is not None and run is not None:
            # Detaching a mounted loop device only marks it auto-clear, so it
            # goes away by itself at umount; if the mount failed it goes now.
            run(["losetup", "--detach", loopdev])


def mounts_under(path: str) -> list[str]:
    """Mount points at or below path, deepest first."""
    path = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].replace("\\040", " ")
                if point == path or point.startswith(path + "/"):
                    found.append(point)
    except OSError:
        pass
    return sorted(set(found), key=len, reverse=True)


def remove_tree(path: str) -> bool:
    """rm -rf path, but never through a mount: a stale mount is unmounted first,
    and if one cannot be, the tree stays (deleting it would wipe a disk)."""
    for point in mounts_under(path):
        try:
            umount(point)
        except OSError as e:
            log.warning("%s", e)
    left = mounts_under(path)
    if left:
        log.error("not removing %s: %s still mounted", path, ", ".join(left))
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True
