"""``ember info``: what this Ember installation is and holds, like ``docker info``.

Versions (Ember, Python, QEMU, Firecracker when set up), the hypervisor and
accelerator configured and chosen, the jailer, guest assets, the VM template
cache, sandboxes by status (read from their records, never changed), images,
and how much the data and state directories take on disk. Nothing is started
or written. ``--json`` prints one document with stable keys: sizes in bytes,
null for what is unknown or absent.
"""

from __future__ import annotations

import json
import os
import platform
import stat
import sys
from pathlib import Path

import click

from ember.cli.check import (
    check_kvm,
    chosen_accel,
    guest_state,
    probe_binary,
    read_probe,
    seconds,
)
from ember.cli.common import human_size
from ember.config import Config, load_config
from ember.errors import EmberError
from ember.sandbox.status import Status

STATUSES = tuple(Status)


def disk_usage(root: Path, what: str, required: bool = False) -> int | None:
    """Bytes taken on disk below root (hard links once, one file system), None
    when root does not exist; EmberError if it is not a readable directory."""
    try:
        top = os.lstat(root)
    except FileNotFoundError:
        if required:
            raise EmberError(f"{what} {root} does not exist") from None
        return None
    except OSError as exc:
        raise EmberError(f"{what} {root} cannot be read: {exc.strerror}") from None
    if not stat.S_ISDIR(top.st_mode):
        raise EmberError(f"{what} {root} is not a directory")
    try:
        os.listdir(root)
    except OSError as exc:
        raise EmberError(f"{what} {root} cannot be read: {exc.strerror}") from None
    total, seen, stack = top.st_blocks * 512, set(), [str(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue  # removed meanwhile, or a folder we may not read
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != top.st_dev or (st.st_nlink > 1 and (st.st_ino in seen)):
                continue  # another file system (a mount), or a hard link counted already
            if st.st_nlink > 1:
                seen.add(st.st_ino)
            total += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
    return total


def _ember_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ember")
    except PackageNotFoundError:
        import ember

        return ember.__version__


def _binary(binary: str) -> dict:
    found = probe_binary(binary)
    return {"path": found.path, "version": found.version,
            "error": None if found.path else found.line}


def templates_state(cfg: Config) -> dict:
    root = cfg.templates_dir
    try:
        count = sum(1 for d in root.iterdir() if (d / "vm.state").is_file())
    except FileNotFoundError:
        count = 0
    except OSError:
        count = None
    return {"count": count, "bytes": disk_usage(root, "template cache") or 0}


def sandboxes_state(cfg: Config) -> dict:
    from ember.sandbox.state import StateStore

    by_status = dict.fromkeys(STATUSES, 0)
    for st in StateStore(cfg).all():
        by_status[st.status] = by_status.get(st.status, 0) + 1
    return {"total": sum(by_status.values()), "by_status": by_status}


def images_state(cfg: Config) -> dict:
    from ember.image.store import ImageStore

    try:
        return {"count": len(ImageStore(cfg).list()), "error": None}
    except EmberError as exc:
        return {"count": None, "error": exc.message}


def gather(cfg: Config) -> dict:
    data_bytes = disk_usage(cfg.data_dir, "data dir")
    state_bytes = disk_usage(cfg.state_dir, "state dir")
    probe = read_probe(cfg)
    kvm_ok = cfg.vm.accel == "tcg" or check_kvm().status == "ok"
    probed = cfg.vm.accel == "auto" and kvm_ok and probe["chosen"] is not None
    firecracker = _binary(cfg.vm.firecracker_binary)
    return {
        "ember_version": _ember_version(),
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "qemu": _binary(cfg.vm.qemu_binary),
        "firecracker": {**firecracker, "configured": cfg.vm.hypervisor == "firecracker"},
        "hypervisor": cfg.vm.hypervisor,
        "accel": {"configured": cfg.vm.accel, "chosen": chosen_accel(cfg, kvm_ok, probe),
                  "probed": probed,  # chosen by the boot probe, whose times follow
                  "kvm_boot_s": probe["kvm_boot_s"] if probed else None,
                  "tcg_boot_s": probe["tcg_boot_s"] if probed else None},
        "jailer": {"enabled": cfg.jailer.enabled,
                   "seccomp": cfg.jailer.seccomp if cfg.jailer.enabled else None},
        "guest_assets": guest_state(cfg),
        "templates": templates_state(cfg),
        "sandboxes": sandboxes_state(cfg),
        "images": images_state(cfg),
        "data_dir": {"path": str(cfg.data_dir), "bytes": data_bytes},
        "state_dir": {"path": str(cfg.state_dir), "bytes": state_bytes},
        "config_file": cfg.source or None,
    }


def _size(n: int | None) -> str:
    return "absent" if n is None else f"{human_size(n)} ({n} bytes)"


def render(info: dict) -> list[str]:
    def binary(b: dict) -> str:
        if b["path"] is None:
            return f"absent ({b['error']})"
        return f"{b['version'] or 'version unknown'} ({b['path']})"

    accel = info["accel"]
    chosen = f"{accel['chosen']} (chosen" if accel["chosen"] else \
        "not measured yet (chosen at the first VM start"
    if accel["probed"]:
        times = [f"{a} {seconds(accel[f'{a}_boot_s'])}" if accel[f"{a}_boot_s"] is not None
                 else f"{a} does not boot" for a in ("kvm", "tcg")]
        chosen += f"; boot probe: {', '.join(times)}"
    guest = info["guest_assets"]
    if guest["built"]:
        fresh = {True: "up to date", False: "out of date (run `ember guest build`)",
                 None: "freshness unknown"}[guest["up_to_date"]]
        guest_line = f"built, {fresh}, key {guest['key']}, " \
                     f"kernel {guest['kernel_release'] or 'unknown'}"
    else:
        guest_line = "not built (run `ember guest build`)"
    tpl = info["templates"]
    sbx = info["sandboxes"]
    counts = ", ".join(f"{n} {s}" for s, n in sbx["by_status"].items() if n)
    images = info["images"]
    jailer = info["jailer"]
    fc = info["firecracker"]
    lines = [
        ("Ember version", info["ember_version"]),
        ("Python", f"{info['python']['version']} ({info['python']['executable']})"),
        ("QEMU", binary(info["qemu"])),
    ]
    if fc["configured"] or fc["path"] is not None:
        lines.append(("Firecracker", binary(fc)))
    lines += [
        ("Hypervisor", info["hypervisor"]),
        ("Accelerator", f"{accel['configured']} (configured), {chosen})"),
        ("Jailer", f"on, seccomp {jailer['seccomp']}" if jailer["enabled"] else "off"),
        ("Guest assets", guest_line),
        ("VM templates", "unreadable" if tpl["count"] is None else
         f"{tpl['count']}, {human_size(tpl['bytes'])}"),
        ("Sandboxes", f"{sbx['total']}" + (f" ({counts})" if counts else "")),
        ("Images", f"unreadable ({images['error']})" if images["count"] is None
         else str(images["count"])),
        ("Data dir", f"{info['data_dir']['path']}: {_size(info['data_dir']['bytes'])}"),
        ("State dir", f"{info['state_dir']['path']}: {_size(info['state_dir']['bytes'])}"),
        ("Config file", info["config_file"] or "none (built-in defaults)"),
    ]
    return [f"{label + ':':15}{value}" for label, value in lines]


@click.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def info_cmd(as_json: bool) -> None:
    """Show versions, backend, templates, sandbox and image counts, disk usage."""
    try:
        info = gather(load_config())
    except EmberError as exc:
        click.echo(f"ember: error: {exc.message}", err=True)
        raise SystemExit(exc.exit_code) from None
    click.echo(json.dumps(info, indent=2) if as_json else "\n".join(render(info)))
