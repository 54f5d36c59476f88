"""`ember run -v`, `--mount` and `--tmpfs`: what a container mounts, carried
into its VM without filesystem sharing.

* ``-v NAME:/path[:ro]``, ``--mount type=volume,src=NAME,dst=/path[,readonly]``:
  a named volume (:mod:`ember.storage.volumes`), made on first use like
  Docker, attached as one more disk and mounted at the target. One read-write
  user at a time; read-only to many.
* ``-v /host/dir:/path:ro``, ``--mount type=bind,src=/host/dir,dst=/path,readonly``:
  the folder is copied in at start, packed (``mkfs.ext4 -d``, no host mount)
  into a read-only image of the sandbox's own that is attached as a disk:
  any size, and truly read-only inside (a copy in guest memory could not be).
* ``-v /host/path:/path:copy``: the file or folder is copied into the
  container's filesystem before it starts; its writes stay in the sandbox.
* ``-v /host/dir:/path`` read-write is refused: a VM cannot share the host's
  folder, and a copy whose writes vanish would lie about it. The error says
  what to use instead.
* ``--tmpfs /path[:size=64m,mode=1777,...]``, ``--mount type=tmpfs,dst=/path``:
  a tmpfs in the guest (OCI mount), ``noexec,nosuid,nodev`` unless told.

Everything is checked before anything is made (one line of error, exit 125).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ember.errors import EmberError
from ember.util import atomic_write_json, parse_size

DISKS_NAME = "disks.json"  # in the sandbox folder: the extra disks, for --restart
TMPFS_FLAGS = {"exec", "noexec", "suid", "nosuid", "dev", "nodev", "ro", "rw",
               "atime", "noatime", "relatime", "strictatime", "nodiratime"}


@dataclass
class Mount:
    """One mount of ``ember run``: kind volume, bind (read-only image), copy or tmpfs."""

    kind: str
    target: str
    source: str = ""  # volume name or host path
    readonly: bool = False
    options: list[str] = field(default_factory=list)  # tmpfs options

    def record(self) -> dict:
        return asdict(self)


def _target(text: str, what: str) -> str:
    if not text.startswith("/"):
        raise EmberError(f"{what}: the container path {text!r} must be absolute")
    norm = "/" + posixpath.normpath(text).lstrip("/")
    if norm == "/":
        raise EmberError(f"{what}: cannot mount over the container's root /")
    if any(norm == p or norm.startswith(p + "/") for p in ("/proc", "/sys", "/dev")):
        raise EmberError(f"{what}: cannot mount on {norm}, which the kernel provides")
    return norm


def _host(source: str, what: str) -> str:
    path = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(path):
        raise EmberError(f"{what}: host path {path} does not exist")
    return path


def _bind(source: str, target: str, readonly: bool, copy: bool, what: str) -> Mount:
    path = _host(source, what)
    if copy:
        return Mount("copy", target, path)
    if not readonly:
        raise EmberError(
            f"{what}: a host folder cannot be shared read-write with a micro-VM (no "
            f"filesystem sharing): use a named volume (-v NAME:{target}), add :ro to copy "
            f"it in read-only, or :copy to copy it in with the writes kept in the sandbox")
    if not os.path.isdir(path):
        raise EmberError(f"{what}: {path} is a file: a read-only copy is made of folders; "
                         f"use {source}:{target}:copy to copy a file in")
    return Mount("bind", target, path, readonly=True)


def _is_host_path(source: str) -> bool:
    return source.startswith(("/", ".", "~"))


def parse_volume(text: str) -> Mount:
    """``-v SOURCE:TARGET[:OPTIONS]`` (options: ro, rw, copy)."""
    what = f"-v {text}"
    parts = text.split(":")
    if len(parts) < 2 or len(parts) > 3 or not parts[0] or not parts[1]:
        raise EmberError(f"{what}: use NAME:/path[:ro] (a named volume) or "
                         "/host/path:/path:ro|copy")
    source, target = parts[0], _target(parts[1], what)
    opts = [o for o in (parts[2].split(",") if len(parts) == 3 else []) if o]
    unknown = [o for o in opts if o not in ("ro", "rw", "copy")]
    if unknown:
        raise EmberError(f"{what}: unknown option {unknown[0]!r} (ro, rw or copy)")
    readonly = "ro" in opts
    if _is_host_path(source):
        return _bind(source, target, readonly, "copy" in opts, what)
    if "copy" in opts:
        raise EmberError(f"{what}: copy is for host paths, not volumes")
    return _volume(source, target, readonly, what)


def _volume(name: str, target: str, readonly: bool, what: str) -> Mount:
    from ember.storage.volumes import check_name

    try:
        check_name(name)
    except EmberError as exc:
        raise EmberError(f"{what}: {exc}") from None
    return Mount("volume", target, name, readonly=readonly)


def parse_mount(text: str) -> Mount:
    """``--mount type=volume|bind|tmpfs,src=...,dst=...[,readonly][,tmpfs-size=..]``."""
    what = f"--mount {text}"
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not key:
            continue
        if key in ("readonly", "ro") and not eq:
            value = "true"
        elif not eq:
            raise EmberError(f"{what}: {item!r} is not KEY=VALUE")
        fields[key] = value.strip()
    kind = fields.pop("type", "volume")
    source = fields.pop("source", None) or fields.pop("src", None) or ""
    dest = fields.pop("target", None) or fields.pop("destination", None) or \
        fields.pop("dst", None)
    if not dest:
        raise EmberError(f"{what}: needs target= (or dst=)")
    target = _target(dest, what)
    ro_text = fields.pop("readonly", None) or fields.pop("ro", None) or "false"
    if ro_text.lower() not in ("true", "1", "false", "0"):
        raise EmberError(f"{what}: readonly takes true or false")
    readonly = ro_text.lower() in ("true", "1")
    if kind == "tmpfs":
        opts = []
        if "tmpfs-size" in fields:
            opts.append(f"size={_size(fields.pop('tmpfs-size'), what)}")
        if "tmpfs-mode" in fields:
            opts.append(f"mode={_mode(fields.pop('tmpfs-mode'), what)}")
        _no_more(fields, what)
        return _tmpfs(target, opts + (["ro"] if readonly else []))
    if kind not in ("volume", "bind"):
        raise EmberError(f"{what}: type must be volume, bind or tmpfs")
    if not source:
        raise EmberError(f"{what}: needs source= (or src=)")
    _no_more(fields, what)
    if kind == "bind":
        return _bind(source, target, readonly, False, what)
    return _volume(source, target, readonly, what)


def _no_more(fields: dict, what: str) -> None:
    if fields:
        raise EmberError(f"{what}: unknown option {next(iter(fields))!r}")


def _size(text: str, what: str) -> int:
    try:
        return parse_size(text)
    except EmberError:
        raise EmberError(f"{what}: invalid size {text!r} (use e.g. 64m)") from None


def _mode(text: str, what: str) -> str:
    try:
        mode = int(text, 8)
    except ValueError:
        raise EmberError(f"{what}: invalid mode {text!r} (octal, e.g. 1777)") from None
    if not 0 <= mode <= 0o7777:
        raise EmberError(f"{what}: invalid mode {text!r}")
    return f"{mode:o}"


def parse_tmpfs(text: str) -> Mount:
    """``--tmpfs /path[:size=64m,mode=1777,exec,...]``."""
    what = f"--tmpfs {text}"
    dest, _, opt_text = text.partition(":")
    target = _target(dest, what)
    opts = []
    for opt in (o.strip() for o in opt_text.split(",") if o.strip()):
        key, eq, value = opt.partition("=")
        if key == "size" and eq:
            opts.append(f"size={_size(value, what)}")
        elif key == "mode" and eq:
            opts.append(f"mode={_mode(value, what)}")
        elif opt in TMPFS_FLAGS:
            opts.append(opt)
        else:
            raise EmberError(f"{what}: unknown tmpfs option {opt!r}")
    return _tmpfs(target, opts)


def _tmpfs(target: str, opts: list[str]) -> Mount:
    base = ["nosuid", "nodev", "noexec"]  # Docker's default for --tmpfs
    if "exec" in opts:
        base.remove("noexec")
    return Mount("tmpfs", target, "tmpfs", readonly="ro" in opts,
                 options=[o for o in base + opts if o not in ("exec",)])


def plan(volumes: list[str] | None = None, mounts: list[str] | None = None,
         tmpfs: list[str] | None = None) -> list[Mount]:
    """Every mount of the flags, checked; none may share a target."""
    out = [parse_volume(v) for v in volumes or []]
    out += [parse_mount(m) for m in mounts or []]
    out += [parse_tmpfs(t) for t in tmpfs or []]
    seen: set[str] = set()
    for m in out:
        if m.target in seen:
            raise EmberError(f"two mounts on {m.target}")
        seen.add(m.target)
    return sorted(out, key=lambda m: m.target.count("/"))  # parents before children


# ------------------------------------------------------------- create
def reserve(cfg, states, wanted: list[Mount]) -> list[dict]:
    """Under the sandbox store's lock: check the named volumes are free for these
    uses, make the missing ones; the records for the new sandbox."""
    from ember.sandbox.volumes import check_available
    from ember.storage.volumes import VolumeStore

    store = VolumeStore(cfg)
    for m in wanted:
        if m.kind == "volume":
            check_available(states, m.source, m.readonly)
    for m in wanted:
        if m.kind == "volume":
            store.create(m.source)
    return [m.record() for m in wanted]


def attach(sandbox, wanted: list[Mount], spec: dict, disk_dir: Path) -> list[dict]:
    """Attach the disks (volumes, read-only images) and add every mount to the
    OCI spec; the extra disks for CreateContainer, in the spec's ember-disk order."""
    from ember.storage.ext4 import content_size, make_ext4
    from ember.storage.rootfs import rootfs_size
    from ember.storage.volumes import VolumeStore

    volumes = VolumeStore(sandbox.cfg)
    disks: list[dict] = []
    for n, m in enumerate(wanted):
        if m.kind == "tmpfs":
            spec["mounts"].append({"destination": m.target, "type": "tmpfs", "source": "tmpfs",
                                   "options": list(m.options)})
            continue
        if m.kind == "copy":
            continue  # copied into the container's filesystem after create
        if m.kind == "volume":
            image = volumes.get(m.source).path
        else:  # a read-only copy of a host folder, packed once for this sandbox
            image = make_ext4(m.source, disk_dir / f"bind{n}.img",
                              rootfs_size(content_size(Path(m.source))), label="ember-bind")
        dev = sandbox.monitor().attach_disk(str(image), "raw", readonly=m.readonly,
                                            drive_id=f"mnt{n}")
        # A read-only ext4 mount must not replay a journal (it cannot write it).
        disks.append({"kind": dev.kind, "address": dev.address, "fstype": "ext4",
                      "readonly": m.readonly, "options": ["noload"] if m.readonly else []})
        spec["mounts"].append({"destination": m.target, "type": "bind",
                               "source": f"ember-disk:{len(disks) - 1}",
                               "options": ["rbind"] + (["ro"] if m.readonly else [])})
    if disks:  # a restart creates the container again on the same, still attached disks
        atomic_write_json(sandbox.dir / DISKS_NAME, disks)
    return disks


def saved_disks(sandbox_dir: Path) -> list[dict]:
    """The extra disks attach() gave the container (none if it gave none)."""
    import json

    try:
        return json.loads((sandbox_dir / DISKS_NAME).read_text())
    except FileNotFoundError:
        return []


def has_copies(wanted: list[Mount]) -> bool:
    """Whether a ``:copy`` mount must go in between create and start."""
    return any(m.kind == "copy" for m in wanted)


def copy_in(sandbox, wanted: list[Mount]) -> None:
    """The ``:copy`` mounts, into the created (not yet started) container."""
    from ember.sandbox.files import Files

    for m in wanted:
        if m.kind == "copy":
            Files(sandbox, starting=True).copy_in(m.source, m.target, op="put-as")
