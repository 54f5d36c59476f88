"""Rewriting containerd's OCI spec for a container that runs inside the VM.

containerd and the CRI plugin write the spec for a host container: namespace
paths under /proc of host processes, bind mounts of host files (/etc/hosts,
/etc/resolv.conf, /dev/termination-log, volumes), host cgroup paths, hooks
that are host binaries, an AppArmor profile. In the guest none of these exist.
So:

* namespaces keep their type but lose their path (the guest makes new ones),
  except a network namespace with a path (the pod's, made by CNI on the
  host): that entry goes, so the container shares the guest's network, which
  is the pod's (its NIC carries eth0's identity, see ember.net.podnet);
* bind mounts of host files and small directories are *copied* into the
  guest (under /run/ember/files/<id>/) and the mount points there; the pod's
  /dev/shm becomes a tmpfs; anything else that cannot be carried is dropped
  with a warning. There is no filesystem sharing: writes stay in the guest;
* the cgroup path becomes ``/ember/<id>`` inside the guest;
* hooks, AppArmor and SELinux labels are removed.
"""

from __future__ import annotations

import copy
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ember.shim.guestspec")

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


def for_guest(spec: dict, container_id: str) -> tuple[dict, list[GuestFile]]:
    """The spec to hand to the guest agent, and the host files it needs copied in."""
    out = copy.deepcopy(spec)
    files: list[GuestFile] = []
    process = out.get("process") or {}
    for key in ("apparmorProfile", "selinuxLabel"):
        process.pop(key, None)
    out.pop("hooks", None)
    linux = out.setdefault("linux", {})
    linux.pop("mountLabel", None)
    linux["namespaces"] = [
        {k: v for k, v in ns.items() if k != "path"}
        for ns in linux.get("namespaces") or []
        if isinstance(ns, dict) and ns.get("type") != "user"
        and not (ns.get("type") == "network" and ns.get("path"))]
    linux["cgroupsPath"] = f"/ember/{container_id}"
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
    return out, files
