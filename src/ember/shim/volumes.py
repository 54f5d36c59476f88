"""Volumes: the host bind mounts of a container's spec, carried into the guest.

There is no filesystem sharing into the guest, so each bind mount of a host
file or directory is carried by copy (see ember.shim.guestspec for the rest of
the spec rewrite).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ember.shim.volumes")

GUEST_FILES = "/run/ember/files"
MAX_COPY_BYTES = 16 << 20  # per bind mount; larger volumes cannot be carried without sharing


@dataclass
class GuestFile:
    path: str
    data: bytes
    mode: int


def _copy_tree(src: Path, dest: str, files: list[GuestFile], budget: list[int]) -> bool:
    """Queue src (a file or a directory tree) for copying to dest; False if too big."""
    st = os.stat(src)
    if stat.S_ISREG(st.st_mode):
        if st.st_size > budget[0]:
            return False
        budget[0] -= st.st_size
        files.append(GuestFile(dest, src.read_bytes(), stat.S_IMODE(st.st_mode)))
        return True
    if not stat.S_ISDIR(st.st_mode):
        return False
    entries = sorted(src.iterdir())
    if not entries:
        files.append(GuestFile(dest + "/.ember-keep", b"", 0o644))
    for child in entries:
        if child.is_symlink() or not (child.is_file() or child.is_dir()):
            continue
        if not _copy_tree(child, f"{dest}/{child.name}", files, budget):
            return False
    return True



def carry_mounts(out: dict, container_id: str) -> list[GuestFile]:
    """Rewrite out["mounts"] for the guest; the host files to copy in."""
    files: list[GuestFile] = []
    mounts = []
    for n, m in enumerate(out.get("mounts") or []):
        if not isinstance(m, dict):
            continue
        opts = m.get("options") or []
        is_bind = m.get("type") == "bind" or "bind" in opts or "rbind" in opts
        src = m.get("source", "")
        if not is_bind or not src.startswith("/"):
            mounts.append(m)
            continue
        dest = m.get("destination", "")
        if dest == "/dev/shm":
            mounts.append({"destination": dest, "type": "tmpfs", "source": "shm",
                           "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})
            continue
        guest_src = f"{GUEST_FILES}/{container_id}/{n}-{os.path.basename(src) or 'root'}"
        try:
            ok = _copy_tree(Path(src), guest_src, files, [MAX_COPY_BYTES])
        except OSError as exc:
            log.warning("bind mount %s -> %s dropped: %s", src, dest, exc)
            continue
        if not ok:
            files[:] = [f for f in files if not f.path.startswith(guest_src)]
            log.warning("bind mount %s -> %s dropped: too large to copy into the VM", src, dest)
            continue
        mounts.append({**m, "source": guest_src})
    out["mounts"] = mounts
    return files
