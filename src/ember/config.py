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
    [logs]
    max_size = "10m"                # container.log is rotated at this size
    max_files = 3                   # container.log + container.log.1 + .2
    console_max_size = "1m"         # the guest console log's cap
"""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from ember.errors import EmberError
from ember.util import parse_size

DEFAULT_CONFIG_PATH = "/etc/ember/config.toml"


# TCG's translation cache per VM. An idle sandbox that ran a container fills
# ~40 MiB of a 64 MiB cache and keeps it resident; 32 MiB holds the guest's hot
# code (agent, crun, busybox) and caps that cost (issue 14: density). 24 MiB
# saved 9 MiB per idle sandbox but made a CRI pod's start ~45% slower (README).
DEFAULT_TCG_TB_MIB = 32
# A pod's VM runs more distinct code before its first app container runs (the
# pod's network set-up, the namespace holder, the shim's requests): with 32 MiB
# the cache filled and was flushed in the middle of the app's crun run, and a
# one-container CRI pod took ~2.2 s; with 64, ~1.45 s (issue 14, docs/containerd.md).
DEFAULT_POD_TCG_TB_MIB = 64


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
    tcg_tb_size_mib: int = DEFAULT_TCG_TB_MIB
    pod_tcg_tb_size_mib: int = DEFAULT_POD_TCG_TB_MIB  # VMs of the containerd shim


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
    # Jailed VMMs' uids/gids: 0x70000000.., high in the 32-bit space (and below 2^31):
    # clear of Debian's subuid ranges (100000, 165536, ...), systemd's regular,
    # dynamic and nspawn ranges (up to 0x6FFFFFFF) and its "foreign" 0x7FFE0000 range.
    # ember.jailer.uids skips any id passwd, group, subuid or subgid still names.
    uid_base: int = 0x70000000
    uid_count: int = 65536
    allow_root: bool = False
    seccomp: str = "kill"  # "kill" | "log" | "off"
    cgroup_version: int = 0  # 0 = detect
    parent_cgroup: str = "ember"


@dataclass
class LogsConfig:
    """Caps on a sandbox's logs, which live under ``state_dir`` (a tmpfs, /run).

    ``container.log`` is rotated the way Docker's json-file driver rotates:
    when the next record would take it past ``max_size`` it becomes
    ``container.log.1`` (``.1`` becomes ``.2``, ...), at most ``max_files``
    files are kept counting the current one, and the oldest is dropped.
    Docker's own defaults are no limit at all (max-size -1), which is what let
    20 MB of output fill RAM under /run; the defaults here are the values
    Docker's documentation gives in its example daemon.json (max-size "10m",
    max-file "3"), so a sandbox's container log takes at most 30 MiB.
    Sizes take Docker's units ("100k", "10m", "1g", binary multiples) or a
    byte count. ``console_max_size`` caps the guest console log
    (``console.log``): past it, its newest half moves to ``console.log.1``.
    """

    max_size: str | int = "10m"
    max_files: int = 3
    console_max_size: str | int = "1m"

    @property
    def max_bytes(self) -> int:
        return _log_size(self.max_size, "max_size")

    @property
    def console_max_bytes(self) -> int:
        return _log_size(self.console_max_size, "console_max_size")

    def check(self) -> None:
        """Raise a one-line EmberError naming the first bad key."""
        _log_size(self.max_size, "max_size")
        _log_size(self.console_max_size, "console_max_size")
        n = self.max_files
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_LOG_FILES:
            raise EmberError(f"config logs.max_files: must be a whole number from 1 to "
                             f"{MAX_LOG_FILES}, not {n!r}")


MIN_LOG_SIZE = 1024  # a record's JSON costs about 70 bytes besides the output
MAX_LOG_FILES = 100


def _log_size(value: object, key: str) -> int:
    bad = EmberError(f"config logs.{key}: expected a size such as \"10m\" or a byte count "
                     f"of at least {MIN_LOG_SIZE}, not {value!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise bad
    try:
        size = parse_size(value)
    except EmberError:
        raise bad from None
    if size < MIN_LOG_SIZE:
        raise bad
    return size


@dataclass
class Config:
    data_dir: Path = Path("/var/lib/ember")
    state_dir: Path = Path("/run/ember")
    vm: VMConfig = field(default_factory=VMConfig)
    guest: GuestConfig = field(default_factory=GuestConfig)
    jailer: JailerConfig = field(default_factory=JailerConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
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
        name = f"{where}.{key}" if where else key
        current = getattr(obj, key)
        if isinstance(value, dict):
            if not is_dataclass(current):
                raise EmberError(f"config {name}: expected a value, not a table")
            _apply(current, value, name)
            continue
        if is_dataclass(current):
            raise EmberError(f"config {name}: expected a table ([{name}])")
        if isinstance(current, Path):
            value = Path(value)
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise EmberError(f"config {name}: expected true or false")
        elif isinstance(current, (int, float)) and not isinstance(value, (int, float)):
            raise EmberError(f"config {name}: expected a number, got {value!r}")
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
    if os.environ.get("EMBER_TCG_TB_MIB"):  # a sandbox's creator's size, for its monitor
        raw = os.environ["EMBER_TCG_TB_MIB"]
        cfg.vm.tcg_tb_size_mib = int(raw) if raw.isdigit() else raw  # type: ignore[assignment]
    if cfg.vm.accel not in ("auto", "tcg", "kvm"):
        raise EmberError(f"config vm.accel: must be auto, tcg or kvm, not {cfg.vm.accel!r}")
    for key in ("tcg_tb_size_mib", "pod_tcg_tb_size_mib"):
        tb = getattr(cfg.vm, key)
        if isinstance(tb, bool) or not isinstance(tb, int) or not 1 <= tb <= 4096:
            raise EmberError(f"config vm.{key}: must be a whole number of MiB from 1 to "
                             f"4096, not {tb!r}")
    cfg.logs.check()
    return cfg


# ------------------------------------------------------- the default file

# What each key is for, shown above it in the default file. A key missing
# here is still written (the file is generated from the dataclasses above),
# just without its line of help; tests/test_deploy_config.py insists on one.
KEY_HELP = {
    "data_dir": "Guest assets, images, flattened rootfs, VM templates, writable disks.",
    "state_dir": "One folder per sandbox or pod (state.json, sockets, logs).",
    "vm.accel": '"auto" probes once whether KVM really boots the guest fast; "tcg" | "kvm".',
    "vm.vcpus": "vCPUs of a VM (for a pod, its CPU limit is added).",
    "vm.memory_mib": "Guest RAM in MiB (for a pod, its memory limit is added).",
    "vm.boot_timeout": "Seconds a VM may take to boot to a ready agent.",
    "vm.agent_timeout": "Seconds an agent request may take.",
    "vm.snapshot": "Start VMs by restoring a VM template snapshot instead of booting.",
    "vm.qemu_binary": "QEMU to run (a name on PATH or a path).",
    "vm.hypervisor": '"qemu" | "firecracker" (docs/firecracker.md).',
    "vm.firecracker_binary": "Firecracker to run (a name on PATH or a path).",
    "vm.fc_placeholder_drives": "Container disks a Firecracker VM can take.",
    "vm.tcg_tb_size_mib": ("Without KVM: QEMU's translated-code cache per VM, in MiB (small "
                           "keeps idle VMs cheap; a busy VM running much code wants more)."),
    "vm.pod_tcg_tb_size_mib": ("The same for the VMs of containerd's shim (pods): a pod runs "
                               "more code before its app starts (docs/containerd.md)."),
    "guest.kernel": "Your own bzImage instead of the built one (empty: built).",
    "guest.initrd": "Your own initrd instead of the built one (empty: built).",
    "guest.rootfs": "Your own guest rootfs image instead of the built one (empty: built).",
    "guest.kernel_package": "Debian package `ember guest build` takes the guest kernel from.",
    "guest.extra_cmdline": "Appended to the guest kernel command line.",
    "jailer.enabled": "Run every VMM through ember-jailer (docs/jailer.md).",
    "jailer.chroot_base_dir": "Where the jails are made.",
    "jailer.uid_base": "First uid (and gid) handed to jailed VMMs, one per sandbox.",
    "jailer.uid_count": "How many uids from uid_base.",
    "jailer.allow_root": "Let a VMM run as uid 0 (refused unless true).",
    "jailer.seccomp": 'The VMM\'s seccomp filter: "kill" | "log" | "off".',
    "jailer.cgroup_version": "1 or 2; 0 detects the host's.",
    "jailer.parent_cgroup": "The cgroup under which jails get theirs.",
    "logs.max_size": 'container.log is rotated past this size ("10m", "1g", or bytes).',
    "logs.max_files": "Container log files kept, counting the current one (Docker's max-file).",
    "logs.console_max_size": "The guest console log's cap; its newest half moves to console.log.1.",
}

_DEFAULT_FILE_HEAD = f"""\
# Ember's configuration ({DEFAULT_CONFIG_PATH}, or $EMBER_CONFIG, or the
# ConfigPath of a containerd runtime handler).
#
# Written by `ember config default` from Ember's own defaults: every key is
# here, commented out, with its default value. Uncomment a line to change it.
# EMBER_DATA_DIR, EMBER_STATE_DIR, EMBER_ACCEL and EMBER_TCG_TB_MIB (vm.tcg_tb_size_mib)
# override this file.
"""


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _key_lines(obj: object, prefix: str) -> list[str]:
    lines = []
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if f.name == "source" or is_dataclass(value):
            continue
        help_text = KEY_HELP.get(prefix + f.name)
        lines += [f"# {help_text}"] if help_text else []
        lines.append(f"# {f.name} = {_toml_value(value)}")
    return lines


def default_config_text() -> str:
    """The default configuration file: every key, commented out, at its default.

    Generated from the dataclasses, so it lists exactly the keys
    :func:`load_config` accepts with exactly the values it defaults to.
    """
    cfg = Config()
    parts = [_DEFAULT_FILE_HEAD, "\n".join(_key_lines(cfg, "")) + "\n"]
    for f in fields(cfg):
        table = getattr(cfg, f.name)
        if is_dataclass(table):
            parts.append(f"[{f.name}]\n" + "\n".join(_key_lines(table, f.name + ".")) + "\n")
    return "\n".join(parts)


def write_default_config(path: str | os.PathLike) -> bool:
    """Write :func:`default_config_text` to ``path`` unless something is there.

    Never overwrites, even racing another writer: the file is written under a
    temp name and hard-linked into place, which fails if ``path`` exists.
    Returns whether it wrote the file.
    """
    target = Path(path)
    if target.exists() or target.is_symlink():
        return False
    if target.parent.exists() and not target.parent.is_dir():
        raise EmberError(f"cannot write {target}: {target.parent} is not a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".config-", dir=target.parent)
    except OSError as exc:
        raise EmberError(f"cannot write {target}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(default_config_text())
        os.chmod(tmp, 0o644)
        os.link(tmp, target)
    except FileExistsError:
        return False
    except OSError as exc:
        raise EmberError(f"cannot write {target}: {exc.strerror}") from None
    finally:
        os.unlink(tmp)
    return True
