"""QEMU's snapshot support: a VM template is a migration stream written to a
descriptor (``migrate fd:``), restored with ``-incoming fd:N`` (QemuVMM.argv).
The VM is paused first, so the stream is the state at one instant."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ember.errors import VMError

if TYPE_CHECKING:
    from ember.vmm.qemu.driver import QemuVMM


def save_snapshot(vmm: QemuVMM, path: Path) -> None:
    """Pause ``vmm`` and write its whole state to ``path``; raises VMError."""
    vmm.qmp("stop")
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
            return
        if status in ("failed", "cancelled"):
            raise VMError(f"saving VM snapshot failed: {info.get('error-desc', status)}")
        time.sleep(0.02)
    raise VMError("saving VM snapshot timed out")
