"""Choose the accelerator: KVM only if it really boots the guest quickly.

On nested hosts /dev/kvm can exist and still crawl or hang on a stock kernel,
so ``accel = "auto"`` boots the guest kernel once under each accelerator with
no init (``rdinit=`` and ``root=`` point nowhere, ``panic=-1`` plus
``-no-reboot`` make QEMU exit as soon as the kernel gives up) and keeps KVM
only if it finished and was faster than TCG. The verdict is cached per host
kernel, QEMU binary and guest kernel, so the probe runs once per machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

from ember.util import atomic_write_json
from ember.vmm.qemu.machine import FIRMWARE, machine

PROBE_TIMEOUT = 20.0


def _probe(binary: str, kernel: Path, accel: str, timeout: float, cmdline: str) -> float | None:
    cpu = "host" if accel == "kvm" else "max"
    argv = [
        binary, "-M", machine(cmdline), "-bios", FIRMWARE,
        "-accel", accel, "-cpu", cpu, "-m", "128", "-nodefaults", "-no-user-config",
        "-nographic", "-no-reboot", "-serial", "null", "-kernel", str(kernel),
        "-append", f"{cmdline} panic=-1 rdinit=/ember-none root=/dev/ember-none",
    ]
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None
    except FileNotFoundError:
        return None
    return time.monotonic() - start if proc.returncode == 0 else None


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def resolve_accel(setting: str, binary: str, kernel: Path, cache_dir: Path,
                  cmdline: str = "console=ttyS0 quiet") -> str:
    """Return "kvm" or "tcg" for setting "auto" | "kvm" | "tcg".

    cmdline is the guest's own kernel command line (its clock settings matter:
    without them a TCG guest can hang calibrating the TSC); the probe appends
    what makes the kernel give up at once.
    """
    if setting in ("kvm", "tcg"):
        return setting
    if not _kvm_usable():
        return "tcg"
    st = kernel.stat()
    key = hashlib.sha256(
        f"{os.uname().release}|{binary}|{kernel}|{st.st_size}|{st.st_mtime_ns}|{cmdline}".encode()
    ).hexdigest()[:16]
    cache = cache_dir / "accel-probe.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["accel"]
    except (OSError, ValueError, KeyError):
        pass
    tcg = _probe(binary, kernel, "tcg", PROBE_TIMEOUT * 3, cmdline)
    kvm = _probe(binary, kernel, "kvm", min(PROBE_TIMEOUT, (tcg or PROBE_TIMEOUT) * 1.5), cmdline)
    accel = "kvm" if kvm is not None and (tcg is None or kvm < tcg) else "tcg"
    atomic_write_json(cache, {"key": key, "accel": accel, "tcg_s": tcg, "kvm_s": kvm})
    return accel
