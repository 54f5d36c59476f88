"""Choose the accelerator: KVM only if it really boots the guest quickly.

On nested hosts /dev/kvm can exist and still crawl or hang on a stock kernel,
so ``accel = "auto"`` boots the guest kernel once under each accelerator with
no init (``rdinit=`` and ``root=`` point nowhere, ``panic=-1`` plus
``-no-reboot`` make QEMU exit as soon as the kernel gives up) and keeps KVM
only if it finished and was faster than TCG. The verdict is cached per host
kernel, QEMU binary, guest kernel and command line, so the probe runs once per
machine and set-up. Several verdicts are kept: two configs sharing a data dir
(two containerd runtime handlers, say) with different command lines or QEMU
binaries would otherwise each evict the other's, and every start would boot
the probe again (~6 s under TCG here).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

from ember.util import atomic_write_json, file_lock
from ember.vmm.qemu.machine import FIRMWARE, machine

PROBE_TIMEOUT = 20.0
KEEP_VERDICTS = 8  # newest first; more set-ups than this on one host re-probe


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
    found = _cached(cache, key)
    if found is not None:
        return found
    # One prober at a time: monitors starting together would each boot both
    # accelerators, and on a small host slow each other's probe into a wrong verdict.
    with file_lock(cache_dir / ".accel-probe.lock"):
        found = _cached(cache, key)
        if found is not None:
            return found
        tcg = _probe(binary, kernel, "tcg", PROBE_TIMEOUT * 3, cmdline)
        kvm = _probe(binary, kernel, "kvm", min(PROBE_TIMEOUT, (tcg or PROBE_TIMEOUT) * 1.5),
                     cmdline)
        accel = "kvm" if kvm is not None and (tcg is None or kvm < tcg) else "tcg"
        record = {"key": key, "accel": accel, "tcg_s": tcg, "kvm_s": kvm}
        # The newest verdict stays at the top level too: `ember check` reads it there.
        older = [v for v in _verdicts(_read(cache)) if v.get("key") != key]
        atomic_write_json(cache, {**record, "verdicts": [record, *older][:KEEP_VERDICTS]})
    return accel


def _read(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _verdicts(data: dict) -> list[dict]:
    """Every verdict in the file, newest first (a file from before the list has one)."""
    listed = data.get("verdicts")
    if isinstance(listed, list):
        return [v for v in listed if isinstance(v, dict)]
    return [data] if data.get("key") else []


def _cached(cache: Path, key: str) -> str | None:
    for verdict in _verdicts(_read(cache)):
        if verdict.get("key") == key and verdict.get("accel") in ("kvm", "tcg"):
            return str(verdict["accel"])
    return None
