"""The guest's device nodes for a privileged container.

Docker's ``--privileged`` (and containerd's for a CRI privileged container)
gives the container every device node of the host, with an allow-all device
cgroup rule. Here the "host" is the guest: the shim and ``ember run`` send the
allow-all rule and no host devices, and the agent lists the guest's own nodes
(``/dev``, without the per-container pseudo filesystems). Nodes for modules
not loaded yet come from the kernel's ``modules.devname`` (as systemd's
kmod-static-nodes makes them on a host): ``/dev/loop-control``,
``/dev/mapper/control``, ``/dev/net/tun``... opening one loads its module.
"""

from __future__ import annotations

import os
import stat

_SKIP_DIRS = {"pts", "shm", "mqueue", "fd", "hugepages"}
# The guest's own console and the agent's channel stay the agent's.
_SKIP = {"console", "ptmx", "kmsg", "initctl"}


def allows_all(spec: dict) -> bool:
    """Whether the spec carries an allow-all device rule (a privileged container)."""
    rules = ((spec.get("linux") or {}).get("resources") or {}).get("devices") or []
    return any(isinstance(r, dict) and r.get("allow") and r.get("type", "a") in ("a", "")
               and r.get("major") is None and r.get("minor") is None for r in rules)


def _entry(path: str, kind: str, major: int, minor: int, mode: int) -> dict:
    return {"path": path, "type": kind, "major": major, "minor": minor,
            "fileMode": mode, "uid": 0, "gid": 0}


def guest_devices(dev: str = "/dev", release: str | None = None) -> list[dict]:
    """OCI ``linux.devices`` entries for every char/block node of the guest."""
    found: dict[str, dict] = {}
    for dirpath, dirs, files in os.walk(dev):
        if dirpath == dev:
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, dev)
            if rel in _SKIP or name.startswith("vport"):
                continue
            try:
                st = os.lstat(full)
            except OSError:
                continue
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b" if stat.S_ISBLK(st.st_mode) else None
            if kind:
                found[rel] = _entry(f"/dev/{rel}", kind, os.major(st.st_rdev),
                                    os.minor(st.st_rdev), stat.S_IMODE(st.st_mode))
    for rel, kind, major, minor in static_nodes(release or os.uname().release):
        found.setdefault(rel, _entry(f"/dev/{rel}", kind, major, minor, 0o600))
    return [found[k] for k in sorted(found)]


def static_nodes(release: str, modules: str = "/lib/modules") -> list[tuple[str, str, int, int]]:
    """(name, c|b, major, minor) from ``modules.devname``: nodes whose module loads on open."""
    out: list[tuple[str, str, int, int]] = []
    try:
        with open(os.path.join(modules, release, "modules.devname")) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or line.startswith("#"):
            continue
        _mod, name, node = parts
        kind, numbers = node[0], node[1:]
        major, _, minor = numbers.partition(":")
        if kind in "cb" and major.isdigit() and minor.isdigit() and ".." not in name:
            out.append((name, kind, int(major), int(minor)))
    return out
