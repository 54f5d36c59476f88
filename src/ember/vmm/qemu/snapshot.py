"""QEMU's snapshot support: a VM template is a migration stream written to a
descriptor (``migrate fd:``), restored with ``-incoming``. The VM is paused
first, so the stream is the state at one instant.

Shared template memory (issue 14): where QEMU can back private guest RAM with
a file it opens read-only (``memory-backend-file`` ``readonly=on,rom=off``,
QEMU 8.2 and later), a template build keeps its guest RAM in a file beside
the snapshot (``vm.state.ram``, ``share=on``) and the stream leaves RAM out
(capability ``x-ignore-shared``). Every restore then maps that file
copy-on-write: sandboxes share the template's pages in the page cache until
they write them, and the jailed VMM holds only a read-only descriptor on a
read-only mount, so it cannot change what other sandboxes restore. Older
QEMU opens the file for writing even for private RAM; there the whole RAM
stays in the stream and every restore copies it, as before.
"""

from __future__ import annotations

import os
import subprocess
import time
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from ember.errors import VMError

if TYPE_CHECKING:
    from ember.vmm.qemu.driver import QemuVMM

RAM_ID = "ram0"
IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]


def ram_file(state: Path) -> Path:
    """Where the guest RAM of the snapshot saved at ``state`` lives, if it was shared."""
    return state.with_name(state.name + ".ram")


@cache
def can_share_ram(binary: str) -> bool:
    """Whether ``binary`` maps a read-only file as writable private RAM (``rom``)."""
    try:
        out = subprocess.run([binary, "-object", "memory-backend-file,help"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "rom=" in out.stdout


def create_ram_file(path: Path, size_mib: int) -> None:
    """A sparse file of the guest's RAM size for a template build to fill."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size_mib << 20)
        finally:
            os.close(fd)
    except OSError as exc:
        raise VMError(f"cannot create guest RAM file {path}: {exc.strerror}") from None


def memory_backend(path: str, size_mib: int, build: bool) -> list[str]:
    """QEMU options for guest RAM in ``path``: written through while a template is
    built, mapped copy-on-write from a read-only descriptor when restored."""
    opts = "share=on" if build else "share=off,readonly=on,rom=off"
    escaped = path.replace(",", ",,")
    return ["-object", f"memory-backend-file,id={RAM_ID},size={size_mib}M,"
                       f"mem-path={escaped},{opts}",
            "-machine", f"memory-backend={RAM_ID}"]


def seal_ram_file(path: Path) -> None:
    """After the save: the RAM file is root's, read-only, sparse and on disk.

    The guest zeroes every page it frees (init_on_free), so most of a
    booted guest's RAM is zeros that still take disk blocks; ``fallocate
    --dig-holes`` gives them back (a hole reads as zeros all the same).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o444)  # restoring VMMs run as their own uids; reached only via their jail
            subprocess.run(["fallocate", "--dig-holes", f"/proc/self/fd/{fd}"], pass_fds=(fd,),
                           capture_output=True, timeout=120, check=False)  # only saves disk
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        # A VMError: the template build fails cleanly and the sandbox cold-boots.
        raise VMError(f"cannot seal guest RAM file {path}: {exc}") from None


def save_snapshot(vmm: QemuVMM, path: Path, shared_ram: Path | None = None) -> None:
    """Pause ``vmm`` and write its state to ``path``; raises VMError.

    ``shared_ram``: the file the VM's RAM lives in (a template build on a
    QEMU that can share it); the stream then leaves RAM out and the file is
    sealed, to sit beside ``path`` as ``ram_file(path)``.
    """
    vmm.qmp("stop")
    if shared_ram is not None:
        vmm.qmp("migrate-set-capabilities", capabilities=IGNORE_SHARED)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        vmm.qmp_fds("getfd", [fd], fdname="snapshot")
    finally:
        os.close(fd)
    vmm.qmp("migrate", uri="fd:snapshot")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        info = vmm.qmp("query-migrate")
        if not isinstance(info, dict):
            info = {}
        status = info.get("status")
        if status == "completed":
            if shared_ram is not None:
                seal_ram_file(shared_ram)
                if shared_ram != ram_file(path):
                    os.replace(shared_ram, ram_file(path))
            return
        if status in ("failed", "cancelled"):
            raise VMError(f"saving VM snapshot failed: {info.get('error-desc', status)}")
        time.sleep(0.02)
    raise VMError("saving VM snapshot timed out")


def start_incoming(vmm: QemuVMM, uri: str) -> None:
    """Load a snapshot whose RAM is shared (QEMU was started with ``-incoming defer``)."""
    vmm.qmp("migrate-set-capabilities", capabilities=IGNORE_SHARED)
    vmm.qmp("migrate-incoming", uri=uri)
