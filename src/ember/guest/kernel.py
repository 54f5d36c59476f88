"""The guest kernel: Debian's cloud kernel image and the few modules we load.

Debian's cloud kernel has ext4, cgroups and namespaces built in but every
virtio driver as a module, so the initrd must carry those modules and load
them in dependency order. The package ships no ``modules.dep`` (its postinst
runs depmod), so we run ``depmod -b`` on the unpacked tree ourselves.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ember.errors import GuestError

# Modules by the virtio device that needs them, keyed by the device id as
# /sys/bus/virtio/devices/*/device shows it. /init loads the transport, looks
# at the devices the VMM gave this VM and loads only their drivers: under TCG
# every insmod costs tens of milliseconds, and most VMs have no NIC or vsock.
TRANSPORT = ("virtio_mmio",)  # microvm's and Firecracker's only transport
DEVICE_MODULES = {
    "0x0001": ("virtio_net",),  # sandbox networking
    "0x0002": ("virtio_blk",),  # the read-only rootfs (/dev/vda), block container disks
    "0x0003": ("virtio_console",),  # the agent channel (virtio-serial port agent.0)
    "0x0004": ("virtio_rng",),  # entropy, so getrandom() never blocks
    "0x0008": ("virtio_scsi", "sd_mod"),  # hot-plugged container disks as /dev/sdX
    "0x0013": ("vsock", "vmw_vsock_virtio_transport"),  # the agent channel under Firecracker
}
ALWAYS = ("overlay",)  # writable layers over read-only container images
MODULES = TRANSPORT + tuple(m for group in DEVICE_MODULES.values() for m in group) + ALWAYS

_COMPRESSORS = {".xz": ["xz", "-dc"], ".zst": ["zstd", "-dc"], ".gz": ["gzip", "-dc"]}


@dataclass
class KernelParts:
    vmlinuz: Path
    release: str
    modules: list[Path]  # uncompressed .ko files, in load order
    groups: dict[str, list[str]]  # "transport", device ids, "always" -> names in load order


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def load_order(modules_dep: str, wanted: tuple[str, ...], builtin: str = "") -> list[str]:
    """Module paths (relative, as in modules.dep) to insmod, dependencies first.

    Names built into the kernel (``modules.builtin``) need no loading; a name
    that is neither a module nor built in is an error, so a kernel flavour that
    lacks a driver fails the build rather than the boot.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    built_in = {_module_name(p) for p in builtin.split()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        name = name.replace("-", "_")
        if name in by_name:
            visit(by_name[name])
        elif name not in built_in:
            raise GuestError(f"guest kernel has no module {name}")
    return order


def prepare(tree: Path, out_dir: Path) -> KernelParts:
    """From an unpacked linux-image package in ``tree``, put the bzImage and
    the modules we use (uncompressed) into ``out_dir``."""
    images = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise GuestError(f"kernel package: expected one /boot/vmlinuz-*, found {len(images)}")
    release = images[0].name.removeprefix("vmlinuz-")
    moddir = tree / "lib" / "modules" / release
    if not moddir.is_dir():
        raise GuestError(f"kernel package: no /lib/modules/{release}")
    proc = subprocess.run(["depmod", "-b", str(tree), release], capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuestError(f"depmod: {proc.stderr.strip() or 'failed'}")
    builtin_file = moddir / "modules.builtin"
    dep = (moddir / "modules.dep").read_text()
    builtin = builtin_file.read_text() if builtin_file.exists() else ""
    order = load_order(dep, MODULES, builtin)
    wanted = {"transport": TRANSPORT, **DEVICE_MODULES, "always": ALWAYS}
    groups = {
        key: [_module_name(rel) for rel in load_order(dep, names, builtin)]
        for key, names in wanted.items()
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = []
    for rel in order:
        src = moddir / rel
        dest = out_dir / (_module_name(rel) + ".ko")
        compressor = _COMPRESSORS.get(src.suffix)
        if compressor:
            with dest.open("wb") as f:
                if subprocess.run([*compressor, str(src)], stdout=f).returncode != 0:
                    raise GuestError(f"cannot decompress kernel module {src.name}")
        else:
            shutil.copyfile(src, dest)
        modules.append(dest)
    vmlinuz = out_dir / "vmlinuz"
    shutil.copyfile(images[0], vmlinuz)
    return KernelParts(vmlinuz, release, modules, groups)


def bzimage_release(path: Path) -> str:
    """The release string a bzImage carries in its setup header (or "")."""
    try:
        with path.open("rb") as f:
            head = f.read(0x210)
            if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
                return ""
            offset = int.from_bytes(head[0x20E:0x210], "little")
            f.seek(offset + 0x200)
            text = f.read(256).split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return ""
    return text.split(" ", 1)[0]
