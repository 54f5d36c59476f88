"""Ember configuration: one TOML file, defaults for everything.

The file is looked up as: an explicit path, else ``$EMBER_CONFIG``, else
``/etc/ember/config.toml``; a missing default file just means defaults.
Environment variables ``EMBER_DATA_DIR`` and ``EMBER_STATE_DIR`` override the
two directories so tests (and users) can run isolated instances side by side.

Example::

    data_dir = "/var/lib/ember"     # guest assets, images, VM templates
    state_dir = "/run/ember"        # one folder per sandbox
    [vm]
    accel = "auto"                  # "auto" | "tcg" | "kvm"
    vcpus = 1
    memory_mib = 512
    boot_timeout = 90
    snapshot = true                 # start from a VM template snapshot
    [guest]
    kernel = ""                     # your own bzImage instead of the built one
    initrd = ""
    rootfs = ""
    [jailer]
    enabled = true                  # run every VMM through ember-jailer
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from ember.errors import EmberError

DEFAULT_CONFIG_PATH = "/etc/ember/config.toml"


@dataclass
class VMConfig:
    accel: str = "auto"
    vcpus: int = 1
    memory_mib: int = 512
    boot_timeout: float = 90.0
    agent_timeout: float = 30.0
    snapshot: bool = True
    qemu_binary: str = "qemu-system-x86_64"
    hypervisor: str = "qemu"
    firecracker_binary: str = "firecracker"
    fc_placeholder_drives: int = 8  # container disks a Firecracker VM can take (docs/firecracker.md)


@dataclass
class GuestConfig:
    kernel: str = ""
    initrd: str = ""
    rootfs: str = ""
    kernel_package: str = "linux-image-cloud-amd64"
    extra_cmdline: str = ""


@dataclass
class JailerConfig:
    enabled: bool = True
    chroot_base_dir: str = "/srv/jailer"
    uid_base: int = 100000
    uid_count: int = 65536
    allow_root: bool = False
    seccomp: str = "kill"  # "kill" | "log" | "off"
    cgroup_version: int = 0  # 0 = detect
    parent_cgroup: str = "ember"


@dataclass
class Config:
    data_dir: Path = Path("/var/lib/ember")
    state_dir: Path = Path("/run/ember")
    vm: VMConfig = field(default_factory=VMConfig)
    guest: GuestConfig = field(default_factory=GuestConfig)
    jailer: JailerConfig = field(default_factory=JailerConfig)
    source: str = ""

    # Derived locations; every module asks here rather than joining paths itself.
    @property
    def guest_dir(self) -> Path:
        return self.data_dir / "guest"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def rootfs_dir(self) -> Path:
        return self.data_dir / "rootfs"

    @property
    def templates_dir(self) -> Path:
        return self.data_dir / "templates"

    @property
    def disks_dir(self) -> Path:
        return self.data_dir / "sandboxes"

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_dir / "sandboxes"


def _apply(obj: object, values: dict, where: str) -> None:
    known = {f.name: f for f in fields(obj)}  # type: ignore[arg-type]
    for key, value in values.items():
        if key == "jailer" and isinstance(value, bool):  # `jailer = true` shorthand
            value = {"enabled": value}
        if key not in known:
            raise EmberError(f"config {where}: unknown key {key!r}")
        current = getattr(obj, key)
        if isinstance(value, dict):
            _apply(current, value, f"{where}.{key}" if where else key)
            continue
        if isinstance(current, Path):
            value = Path(value)
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise EmberError(f"config {where}{key}: expected true or false")
        elif isinstance(current, (int, float)) and not isinstance(value, (int, float)):
            raise EmberError(f"config {where}{key}: expected a number, got {value!r}")
        elif isinstance(current, float):
            value = float(value)
        setattr(obj, key, value)


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Load the configuration, applying environment overrides last."""
    cfg = Config()
    explicit = path or os.environ.get("EMBER_CONFIG")
    file = Path(explicit) if explicit else Path(DEFAULT_CONFIG_PATH)
    if file.exists():
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise EmberError(f"config {file}: {exc}") from None
        _apply(cfg, data, "")
        cfg.source = str(file)
    elif explicit:
        raise EmberError(f"config file {file} does not exist")
    if os.environ.get("EMBER_DATA_DIR"):
        cfg.data_dir = Path(os.environ["EMBER_DATA_DIR"])
    if os.environ.get("EMBER_STATE_DIR"):
        cfg.state_dir = Path(os.environ["EMBER_STATE_DIR"])
    if os.environ.get("EMBER_FIRECRACKER_BIN"):
        cfg.vm.firecracker_binary = os.environ["EMBER_FIRECRACKER_BIN"]
    if os.environ.get("EMBER_ACCEL"):
        cfg.vm.accel = os.environ["EMBER_ACCEL"]
    if cfg.vm.accel not in ("auto", "tcg", "kvm"):
        raise EmberError(f"config vm.accel: must be auto, tcg or kvm, not {cfg.vm.accel!r}")
    return cfg
