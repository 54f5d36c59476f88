"""VM templates: a booted, agent-ready VM saved once and restored per sandbox.

Restoring a paused VM from its migration stream takes a fraction of a second
where a cold boot under TCG takes seconds. A template is keyed by everything
that must match between the saved VM and the restoring QEMU: guest assets,
kernel command line, vCPUs, memory, accelerator, what the hypervisor driver
says a snapshot depends on (its binary: VMM.template_inputs) and this
module's device-layout version, and whether the VM has a NIC (a VM with a
virtio-net device cannot restore a snapshot saved without one; such a
template is built on a placeholder backend and restored onto the pod's tap).
Templates are built under an exclusive lock in a hidden staging folder that is
renamed into place, so a crash mid-build leaves nothing a later restore could
pick up (the next build of that key removes the staging folder; any build
sweeps staging folders, templates and lock files a day old that nothing uses).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from ember.config import Config
from ember.errors import EmberError
from ember.util import atomic_write_json, private_dir
from ember.vmm.base import VMSpec

LAYOUT_VERSION = "1"

# Boots a fresh VM for spec as VM vm_id (work files in the given folder) and
# saves its snapshot to the given path; returns the guest's kernel release.
# ember.sandbox.vm provides it, so this module needs nothing of how VMs boot.
Builder = Callable[[VMSpec, str, Path, Path], str]

# What this process's last lookup for each owner found (hit, miss, busy: another
# process was building it, failed: the build failed), for the VM's boot event
# and the metrics' template cache counters.
_last_use: dict[str, str] = {}


def last_use(owner: str) -> str:
    """How the last :meth:`TemplateCache.get_or_build` for ``owner`` went ("" if none)."""
    return _last_use.get(owner, "")


def template_key(spec: VMSpec, inputs: list[str]) -> str:
    """The template's name: everything a restore must match (``inputs``: the
    hypervisor's own, VMM.template_inputs)."""
    parts = [
        LAYOUT_VERSION, *inputs, str(spec.kernel), str(spec.initrd), str(spec.rootfs),
        spec.cmdline, str(spec.vcpus), str(spec.memory_mib), spec.accel,
    ]
    if spec.nic:
        parts.append("nic")  # absent otherwise, so keys of NIC-less templates stay the same
    for p in (spec.kernel, spec.initrd, spec.rootfs):
        try:
            st = os.stat(p)
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append("missing")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def build_prefix(owner: str | None) -> str:
    """How the work folders of template builds for ``owner`` start (under the state dir)."""
    return f"tpl-{owner[:12]}-" if owner else "tpl-"


class TemplateCache:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.root = cfg.templates_dir
        private_dir(self.root)  # snapshots hold guest memory

    def path_for(self, key: str) -> Path:
        return self.root / key / "vm.state"

    def get_or_build(self, spec: VMSpec, inputs: list[str], build: Builder,
                     wait: bool = False, owner: str | None = None) -> Path | None:
        """The template for spec, building it if needed; None if it cannot be had now.

        ``owner``: the sandbox or pod the build is for; the build VM's id (its
        jail) and work folder are then named after it, so removing the owner
        also removes a build that was killed half-way.
        """
        key = template_key(spec, inputs)
        path = self.path_for(key)
        use = owner or ""
        if path.exists():
            _last_use[use] = "hit"
            return path
        lock = self._lock(key, wait)
        if lock is None:
            _last_use[use] = "busy"
            return None  # someone else is building it: cold-boot this time
        with lock:
            if path.exists():
                _last_use[use] = "hit"
                return path
            self._remove_stale_builds(key)
            try:
                self._build(spec, key, path, build, owner)
            except EmberError:
                _last_use[use] = "failed"
                return None
            _last_use[use] = "miss"
        self._gc(keep=key)
        return path

    def _lock(self, key: str, wait: bool) -> IO[str] | None:
        """The key's lock file, open and flocked; None if another process holds it.

        The sweep (``_gc``) unlinks the lock files of keys without a template
        while holding them, so a lock taken on a file that is no longer at its
        path locks nothing: take the one that is there now instead.
        """
        lock_path = self.root / f".{key}.lock"
        while True:
            f = open(lock_path, "a")  # noqa: SIM115 - returned open, closed by the caller
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                try:
                    same = os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino
                except FileNotFoundError:
                    same = False
            except BlockingIOError:
                f.close()
                return None
            except BaseException:
                f.close()
                raise
            if same:
                return f
            f.close()

    def _build(self, spec: VMSpec, key: str, path: Path, build: Builder,
               owner: str | None = None) -> None:
        """Build into a hidden folder and rename it into place: a snapshot may be
        several files (QEMU's RAM file, Firecracker's memory and metadata), all
        written beside the state file, and a crash leaves no half of them."""
        from ember.sandbox.state import template_vm_id

        # A short work dir: Unix socket paths are limited to 107 bytes.
        work = Path(tempfile.mkdtemp(prefix=build_prefix(owner), dir=self._tmp_base()))
        staging = self.root / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        vm_id = template_vm_id(owner) if owner else f"template-{key}"
        started = time.monotonic()
        try:
            staging.mkdir(mode=0o700)
            kernel_release = build(spec, vm_id, work, staging / path.name)
            atomic_write_json(staging / "meta.json", {
                "key": key, "created": time.time(), "build_seconds": time.monotonic() - started,
                "spec": {k: str(v) for k, v in dataclasses.asdict(spec).items()
                         if k in ("kernel", "initrd", "rootfs", "cmdline", "vcpus",
                                  "memory_mib", "accel", "nic")},
                "kernel_release": kernel_release,
            })
            shutil.rmtree(path.parent, ignore_errors=True)  # a folder without a state is nothing
            os.rename(staging, path.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)

    def _remove_stale_builds(self, key: str) -> None:
        """Staging folders of builds of ``key`` that died (we hold its lock)."""
        for entry in self.root.glob(f".{key}.*.tmp"):
            shutil.rmtree(entry, ignore_errors=True)

    def _tmp_base(self) -> Path:
        base = self.cfg.state_dir
        base.mkdir(parents=True, exist_ok=True)
        return base

    def _gc(self, keep: str) -> None:
        """Drop templates nobody can use any more (older than a day and not current),
        staging folders of builds killed that long ago, and the lock files of
        keys left without a template."""
        cutoff = time.time() - 86400
        for entry in self.root.iterdir():
            if entry.is_dir() and entry.name != keep:
                try:
                    if entry.stat().st_mtime < cutoff:
                        shutil.rmtree(entry, ignore_errors=True)
                except OSError:
                    pass
        for entry in self.root.glob(".*.lock"):
            key = entry.name[1:-len(".lock")]
            if key == keep or (self.root / key).exists():
                continue
            try:
                if entry.stat().st_mtime >= cutoff:
                    continue
            except OSError:
                continue
            lock = self._lock(key, wait=False)
            if lock is None:  # being built right now
                continue
            with lock:
                if not (self.root / key).exists():
                    entry.unlink(missing_ok=True)
