"""Per-jail cgroups, v1 (one hierarchy per controller) and v2 (one unified tree).

Layout follows Firecracker's jailer: ``<mount>/<parent>/<id>`` — in v1 under
the hierarchy of each controller named by a ``--cgroup FILE=VALUE`` setting
(``memory.limit_in_bytes`` → the ``memory`` hierarchy), in v2 under the single
cgroup2 mount. Mount points are read from /proc/self/mounts rather than assumed,
because hosts differ (this project's machines mount v1 at /sys/fs/cgroup/<ctl>
and cgroup2 at /sys/fs/cgroup/unified).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ember.errors import EmberError
from ember.jailer.waiter import rmdir_cgroup


def cgroup_mounts() -> list[tuple[str, str, list[str]]]:
    """(fstype, mount point, options) of every cgroup and cgroup2 mount, as the
    kernel lists them; the shim places pod cgroups by the same list."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                out.append((parts[2], parts[1].replace("\\040", " "), parts[3].split(",")))
    return out


def v1_mount(controller: str) -> Path | None:
    """Where the v1 hierarchy carrying ``controller`` is mounted, if anywhere."""
    for fstype, target, opts in cgroup_mounts():
        if fstype == "cgroup" and controller in opts:
            return Path(target)
    return None


def v2_mount() -> Path | None:
    for fstype, target, _opts in cgroup_mounts():
        if fstype == "cgroup2":
            return Path(target)
    return None


def detect_version() -> int:
    """2 on a unified-only host (cgroup2 at /sys/fs/cgroup), else 1."""
    for fstype, target, _opts in cgroup_mounts():
        if target == "/sys/fs/cgroup" and fstype == "cgroup2":
            return 2
    return 1


def controller_of(file: str) -> str:
    """The controller a cgroup file belongs to: the part before the first dot."""
    return file.split(".", 1)[0]


@dataclass
class CgroupPlan:
    """The cgroups one jail will get, computed (and checked) before anything is made."""

    version: int
    parent: str
    jail_id: str
    settings: list[tuple[str, str]] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)

    def targets(self) -> list[Path]:
        """One leaf cgroup per v1 hierarchy involved, or the one v2 leaf."""
        if not self.settings:
            return []
        if self.version == 2:
            root = v2_mount()
            if root is None:
                raise EmberError("--cgroup-version 2: no cgroup2 file system is mounted")
            return [root / self.parent / self.jail_id]
        leaves: list[Path] = []
        for file, _ in self.settings:
            ctl = controller_of(file)
            root = v1_mount(ctl)
            if root is None:
                raise EmberError(f"--cgroup {file}: no cgroup v1 hierarchy for controller {ctl!r}")
            leaf = root / self.parent / self.jail_id
            if leaf not in leaves:
                leaves.append(leaf)
        return leaves

    def _leaf_for(self, file: str) -> Path:
        if self.version == 2:
            return self.targets()[0]
        root = v1_mount(controller_of(file))
        assert root is not None
        return root / self.parent / self.jail_id

    def create(self) -> None:
        """Make the cgroups and write the settings; on failure undo what was made."""
        try:
            for leaf in self.targets():
                if leaf.exists():
                    raise EmberError(f"cgroup {leaf} already exists")
                self._mkdirs(leaf)
            for file, value in self.settings:
                path = self._leaf_for(file) / file
                if not path.exists():
                    raise EmberError(f"--cgroup {file}: no such cgroup file (looked in {path.parent})")
                try:
                    path.write_text(value)
                except OSError as exc:
                    raise EmberError(f"--cgroup {file}={value}: {exc.strerror}") from None
        except BaseException:
            self.remove_created()
            raise

    def _mkdirs(self, leaf: Path) -> None:
        depth = len(Path(self.parent).parts)
        root = leaf.parents[depth]
        if self.version == 2:
            self._check_v2_controllers(root)
            self._enable_v2_controllers(root)
        current = root
        for part in (*Path(self.parent).parts, self.jail_id):
            current = current / part
            if not current.exists():
                os.mkdir(current)
                self.created.append(current)
                if self.version == 1 and (current / "cpuset.cpus").exists():
                    # A new v1 cpuset is empty and refuses tasks until it inherits these.
                    for name in ("cpuset.cpus", "cpuset.mems"):
                        if not (current / name).read_text().strip():
                            (current / name).write_text((current.parent / name).read_text())
            if self.version == 2 and current != leaf:
                self._enable_v2_controllers(current)

    def _wanted_v2(self) -> set[str]:
        return {controller_of(f) for f, _ in self.settings} - {"cgroup"}

    def _check_v2_controllers(self, root: Path) -> None:
        missing = self._wanted_v2() - set((root / "cgroup.controllers").read_text().split())
        if missing:
            raise EmberError(
                f"cgroup v2 controller(s) {', '.join(sorted(missing))} not available in {root}"
            )

    def _enable_v2_controllers(self, node: Path) -> None:
        """v2 only lets a child use the controllers its parent enabled for its subtree."""
        wanted = self._wanted_v2()
        if not wanted:
            return
        try:
            (node / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))
        except OSError as exc:
            raise EmberError(f"cannot enable {sorted(wanted)} in {node}: {exc.strerror}") from None

    def enter(self, pid: int) -> None:
        """Move ``pid`` into every leaf (called by the jailed child for itself)."""
        for leaf in self.targets():
            (leaf / "cgroup.procs").write_text(str(pid))

    def remove_created(self) -> None:
        """Undo create(): the leaf for sure, parents this run made if they are empty."""
        for path in reversed(self.created):
            if path.name == self.jail_id:
                rmdir_cgroup(path)
            else:
                try:
                    os.rmdir(path)
                except OSError:
                    pass  # another jail lives there now
        self.created.clear()


def jail_cgroup_dirs(parent: str, jail_id: str) -> list[Path]:
    """Every ``<mount>/<parent>/<id>`` that exists, whatever the hierarchy."""
    return [Path(target) / parent / jail_id for _f, target, _o in cgroup_mounts()
            if (Path(target) / parent / jail_id).is_dir()]


def remove_jail_cgroups(parent: str, jail_id: str) -> list[Path]:
    """Remove ``<parent>/<id>`` from every mounted hierarchy; idempotent.

    Scanning all hierarchies means cleanup needs no record of which controllers
    a jail used — it works after a crash of the jailer too.
    """
    removed = jail_cgroup_dirs(parent, jail_id)
    for leaf in removed:
        rmdir_cgroup(leaf)
    return removed
