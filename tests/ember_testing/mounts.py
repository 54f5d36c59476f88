"""Find and undo the mounts and loop devices a test left under a directory.

Tests that mount block images must leave the host as they found it even when
they fail halfway; these helpers look at the kernel's own tables
(/proc/self/mountinfo, /sys/block/loop*/loop/backing_file), so they catch what
containerd or a crashed snapshotter mounted, not only what the test did.
"""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def _inside(path: str, base: Path) -> bool:
    base_s = str(base.resolve())
    return path == base_s or path.startswith(base_s.rstrip("/") + "/")


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below ``base``, deepest first (the order to unmount)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape(line.split()[4])
            if _inside(mp, base):
                found.append(mp)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def loops_under(base: Path) -> dict[str, str]:
    """Loop devices whose backing file lies below ``base``: {device: file}."""
    found = {}
    for bf in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            backing = Path(bf).read_text().strip().removesuffix(" (deleted)")
        except OSError:
            continue
        if _inside(backing, base):
            found["/dev/" + bf.split("/")[3]] = backing
    return found


def wait_loops_gone(base: Path, timeout: float = 3.0) -> dict[str, str]:
    """Loop devices still backed below ``base`` after up to ``timeout`` s.

    Since Linux 5.18 an autoclear loop device (``mount -o loop``) is detached
    asynchronously after the unmount, so give it a moment before judging.
    """
    deadline = time.monotonic() + timeout
    while True:
        loops = loops_under(base)
        if not loops or time.monotonic() >= deadline:
            return loops
        time.sleep(0.05)


def cleanup_under(base: Path) -> list[str]:
    """Unmount everything below ``base`` and detach its loop devices.

    Returns what had to be cleaned, so a test can also assert that nothing was
    left behind by the code under test.
    """
    cleaned = []
    for _ in range(3):  # a loop-mounted pool holds loop-mounted images
        mps = mounts_under(base)
        for mp in mps:
            if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", mp], capture_output=True)
            cleaned.append(f"mount {mp}")
        loops = wait_loops_gone(base, 3.0 if mps else 0.0)
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
            cleaned.append(f"loop {dev}")
        if not mps and not loops:
            break
    return cleaned


@contextlib.contextmanager
def mounted(mounts: Sequence, target: str | os.PathLike) -> Iterator[Path]:
    """Mount containerd Mounts (protobuf or anything with type/source/options)
    at ``target`` the way containerd does (util-linux turns "loop" into an
    autoclear loop device), and unmount on exit even if the body fails."""
    if len(mounts) != 1:
        raise ValueError(f"expected one mount, got {len(mounts)}")
    m = mounts[0]
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, str(target)],
                   check=True, capture_output=True)
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
