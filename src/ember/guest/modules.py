"""The guest kernel's module tree in the rootfs, for loading on demand.

Privileged containers (and those with added capabilities) expect what the
kernel offers as modules: a bridge, netfilter, tun, overlay, device-mapper.
Debian's cloud kernel builds all of those as modules, so the rootfs carries
the kernel package's own ``/lib/modules/<release>`` tree, with kmod's
``modprobe`` at the path the kernel calls (``/sbin/modprobe``,
``/proc/sys/kernel/modprobe``). The kernel then loads a module when it is
first needed (``ip link add br0 type bridge`` → ``request_module``), and
nothing is loaded at boot: /init still loads only the virtio drivers from
the initrd, so boot time does not change.

Drivers for hardware a micro-VM never has are left out, except where a kept
module needs them. The rest is compressed with zstd (kmod reads ``.ko.zst``;
the guest already has libzstd), which shrinks the tree from about 90 MB to
about 25 MB; a module is decompressed only when it is loaded.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ember.errors import GuestError

# Folders (relative to /lib/modules/<release>) of drivers for devices no
# Ember VM has: QEMU microvm and Firecracker give only virtio-mmio devices.
DROPPED = tuple(
    f"kernel/{d}/"
    for d in (
        "sound",
        "drivers/gpu",
        "drivers/media",
        "drivers/net/wireless",
        "drivers/ata",
        "drivers/comedi",
        "drivers/cpufreq",
        "drivers/hid",
        "drivers/hv",
        "drivers/infiniband",
        "drivers/input",
        "drivers/leds",
        "drivers/nvme",
        "drivers/platform",
        "drivers/soundwire",
        "drivers/thermal",
        "drivers/usb",
        "drivers/watchdog",
        "drivers/xen",
    )
)

# depmod's inputs shipped by the package; depmod writes the modules.*.bin indexes.
_METADATA = ("modules.builtin", "modules.builtin.modinfo", "modules.order")

ZSTD_LEVEL = 9  # about 2 s for the whole tree; level 19 saves 2 MB more in 30 s


@dataclass(frozen=True)
class ModuleTree:
    release: str
    modules: int  # .ko files shipped
    dropped: int  # .ko files left out


def parse_deps(modules_dep: str) -> dict[str, list[str]]:
    """``modules.dep`` as {module path: [paths it needs]}."""
    deps: dict[str, list[str]] = {}
    for line in modules_dep.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            deps[path] = rest.split()
    return deps


def select(deps: dict[str, list[str]], dropped: tuple[str, ...] = DROPPED) -> set[str]:
    """The module paths to ship: every module outside ``dropped``, plus
    whatever those need (a kept module must never fail for a missing dependency)."""
    keep: set[str] = set()
    todo = [p for p in deps if not p.startswith(dropped)]
    while todo:
        path = todo.pop()
        if path not in keep:
            keep.add(path)
            todo.extend(deps.get(path, []))
    return keep


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise GuestError(f"{what}: {cmd[0]} not found (apt install {cmd[0]})") from None
    if proc.returncode != 0:
        raise GuestError(f"{what}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")


def install(kernel_tree: Path, release: str, usr: Path) -> ModuleTree:
    """Put the kernel package's modules (``kernel_tree``, unpacked, depmod
    already run on it) into ``usr/lib/modules/<release>``, zstd-compressed,
    and index them with depmod so modprobe resolves names and dependencies."""
    src = kernel_tree / "lib" / "modules" / release
    dest = usr / "lib" / "modules" / release
    deps = parse_deps((src / "modules.dep").read_text())
    keep = sorted(select(deps))
    if any(not p.endswith(".ko") for p in keep):
        raise GuestError("kernel package: modules are already compressed; expected plain .ko")
    dest.mkdir(parents=True, exist_ok=True)
    for name in _METADATA:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    # src/P -> dest/P.zst for every P, in one zstd run.
    _run(["zstd", "-q", f"-{ZSTD_LEVEL}", "--output-dir-mirror", str(dest), *keep],
         "compressing kernel modules", cwd=src)
    # depmod -b BASE reads BASE/lib/modules/<release>: BASE is the rootfs's /usr.
    _run(["depmod", "-b", str(usr), release], "depmod (guest module tree)")
    return ModuleTree(release, len(keep), len(deps) - len(keep))
