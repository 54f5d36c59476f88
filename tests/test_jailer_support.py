"""Helpers shared by the jailer tests and bench/jailer.py (no tests in here).

A busybox initrd whose /init runs a given script, a guest kernel, and probes
of what a jailed process looks like from the host (/proc/PID/...).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import time
from pathlib import Path

from ember.guest.build import host_tsc_khz
from ember.vmm.qemu.machine import FIRMWARE, MACHINE

BUSYBOX = "/bin/busybox"
MICROVM = ["-M", MACHINE, "-bios", FIRMWARE, "-accel", "tcg",
           "-cpu", "max", "-m", "256", "-nodefaults", "-no-user-config", "-nographic",
           "-serial", "stdio", "-no-reboot"]


def cmdline() -> str:
    """Busybox guest command line; tsc_early_khz spares a loaded host the hang
    that the guest's own TSC calibration meets (see ember.guest.build)."""
    khz = host_tsc_khz()
    return "console=ttyS0 quiet panic=-1" + (f" tsc_early_khz={khz}" if khz else "")


def busybox_initrd(dest: Path, script: str) -> Path:
    """A gzip'd newc initrd: static busybox, /bin/sh, and ``script`` as /init."""
    stage = dest.with_suffix(".d")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev"):
        (stage / d).mkdir()
    shutil.copy(BUSYBOX, stage / "bin" / "busybox")
    os.symlink("busybox", stage / "bin" / "sh")
    (stage / "init").write_text("#!/bin/sh\n" + script)
    (stage / "init").chmod(0o755)
    names = "\n".join(str(p.relative_to(stage)) for p in sorted(stage.rglob("*"))) + "\n"
    archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=stage, input=names.encode(),
                             capture_output=True, check=True).stdout
    dest.write_bytes(gzip.compress(archive, compresslevel=1))
    shutil.rmtree(stage)
    return dest


def guest_kernel() -> Path | None:
    """$EMBER_TEST_KERNEL if set (handy before the guest cache exists), else None."""
    path = os.environ.get("EMBER_TEST_KERNEL")
    return Path(path) if path else None


def qemu_args(kernel: str, initrd: str, *extra: str) -> list[str]:
    return [*MICROVM, "-kernel", kernel, "-initrd", initrd, "-append", cmdline(), *extra]


def status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")


def cgroup_leaves(parent: str, jail_id: str) -> list[Path]:
    """Every ``<mount>/<parent>/<id>`` that exists, in any hierarchy."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[2] in ("cgroup", "cgroup2"):
                leaf = Path(fields[1]) / parent / jail_id
                if leaf.exists():
                    out.append(leaf)
    return out


def remove_cgroup_parent(parent: str) -> None:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[2] in ("cgroup", "cgroup2"):
                try:
                    os.rmdir(Path(fields[1]) / parent)
                except OSError:
                    pass
