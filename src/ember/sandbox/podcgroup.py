"""Putting the shim and the VMM into the pod's cgroup.

Kubernetes adds a RuntimeClass's Pod Overhead to the pod's cgroup limits; the
overhead only means something if the VM (and the shim serving it) are charged
there. The pod cgroup is the parent of the sandbox's ``linux.cgroupsPath``:
``/kubepods/burstable/pod<uid>/<sandbox-id>`` with the cgroupfs driver,
``kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`` with systemd's.

The kubelet normally creates the pod cgroup; when it does not exist (``ctr
run`` gives ``/<namespace>/<id>``), it is created in every hierarchy and
recorded, so teardown removes exactly what was made.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ember.jailer.cgroups import cgroup_mounts, detect_version, v2_mount

log = logging.getLogger("ember.sandbox.podcgroup")

# v1 hierarchies a pod's processes are charged in (named hierarchies are skipped).
V1_CONTROLLERS = {"cpu", "cpuacct", "memory", "pids", "blkio", "cpuset", "devices",
                  "freezer", "hugetlb", "net_cls", "net_prio", "perf_event"}


def expand_systemd_slice(name: str) -> str:
    """``a-b-c.slice`` -> ``/a.slice/a-b.slice/a-b-c.slice`` (systemd's nesting rule)."""
    if not name.endswith(".slice") or name == "-.slice":
        return "/"
    stem = name[: -len(".slice")]
    parts = stem.split("-")
    path = ""
    for i in range(1, len(parts) + 1):
        path += "/" + "-".join(parts[:i]) + ".slice"
    return path


def pod_cgroup(cgroups_path: str) -> str | None:
    """The pod's cgroup (a path below each hierarchy root) from a sandbox's cgroupsPath."""
    if not cgroups_path:
        return None
    if ":" in cgroups_path and not cgroups_path.startswith("/"):
        slice_name = cgroups_path.split(":", 1)[0]
        return expand_systemd_slice(slice_name) if slice_name else None
    parent = os.path.dirname(cgroups_path.rstrip("/"))
    return parent if parent not in ("", "/") else None


def hierarchies() -> list[Path]:
    """Root of every hierarchy a pod cgroup lives in on this host."""
    if detect_version() == 2:
        root = v2_mount()
        return [root] if root else []
    roots = []
    for fstype, target, opts in cgroup_mounts():
        if fstype == "cgroup" and V1_CONTROLLERS & set(opts) and Path(target) not in roots:
            roots.append(Path(target))
    return roots


def enter(pod_path: str, pids: list[int]) -> list[str]:
    """Move ``pids`` into the pod cgroup in every hierarchy; returns the dirs created.

    Failures are logged, not raised: a pod must not fail to start because one
    hierarchy refused (the VM still runs, just charged elsewhere).
    """
    created: list[str] = []
    for root in hierarchies():
        target = root / pod_path.lstrip("/")
        try:
            _mkdirs(root, target, created)
            for pid in pids:
                (target / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            log.warning("cannot place pids %s in %s: %s", pids, target, exc)
    return created


def _mkdirs(root: Path, target: Path, created: list[str]) -> None:
    current = root
    for part in target.relative_to(root).parts:
        current = current / part
        if current.exists():
            continue
        os.mkdir(current)
        created.append(str(current))
        if (current / "cpuset.cpus").exists():
            # A new v1 cpuset is empty and refuses tasks until it inherits these.
            for name in ("cpuset.cpus", "cpuset.mems"):
                if not (current / name).read_text().strip():
                    (current / name).write_text((current.parent / name).read_text())


def leave(pid: int) -> None:
    """Move a process back to each hierarchy's root (so pod cgroups can be removed)."""
    for root in hierarchies():
        try:
            (root / "cgroup.procs").write_text(str(pid))
        except OSError:
            pass


def remove(created: list[str]) -> None:
    """Remove cgroup dirs this pod created, deepest first, if they are empty now."""
    for path in sorted(created, key=lambda p: p.count("/"), reverse=True):
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.info("leaving cgroup %s: %s", path, exc.strerror)
