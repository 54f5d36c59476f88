"""The guest initrd: busybox, a handful of kernel modules and ``/init``.

The archive is written here rather than with ``cpio``: the kernel wants a
``/dev/console`` node in it (so /init starts with a console), and writing
the node straight into the archive needs neither root nor mknod, and gives
the same bytes for the same inputs.
"""

from __future__ import annotations

import gzip
import shlex
from importlib import resources
from pathlib import Path

# Applets /init calls; each becomes a symlink to /bin/busybox.
APPLETS = (
    "sh",
    "mount",
    "insmod",
    "sleep",
    "cat",
    "cut",
    "echo",
    "mkdir",
    "ln",
    "grep",
    "hostname",
    "ip",
    "switch_root",
    "poweroff",
    "reboot",
    "sync",
)

_S_IFDIR, _S_IFREG, _S_IFLNK, _S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


class NewcWriter:
    """Minimal writer for the kernel's initramfs format (cpio "newc")."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        blob = header + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4) + data
        self._parts.append(blob + b"\0" * (-len(blob) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, _S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, _S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, _S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, _S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def module_loading(groups: dict[str, list[str]]) -> str:
    """Shell lines that load the transport, then the drivers of the devices present."""
    lines = [
        f"load {' '.join(groups['transport'])}",
        "for dev in /sys/bus/virtio/devices/*/device; do",
        '\tcase "$(cat "$dev" 2>/dev/null)" in',
    ]
    for device_id, names in groups.items():
        if device_id.startswith("0x"):
            lines.append(f"\t{device_id}) load {' '.join(names)} ;;")
    lines += ["\tesac", "done"]
    if groups.get("always"):
        lines.append(f"load {' '.join(groups['always'])}")
    return "\n".join(lines)


def init_script(groups: dict[str, list[str]], pythonpath: str) -> str:
    template = resources.files("ember.guest").joinpath("init.sh").read_text()
    return template.replace("@MODULE_LOADING@", module_loading(groups)).replace(
        "@PYTHONPATH@", shlex.quote(pythonpath)
    )


def build_initrd(
    out: Path,
    busybox: Path,
    modules: list[Path],
    groups: dict[str, list[str]],
    pythonpath: str,
    compress: bool = False,
) -> None:
    """Write the initrd to ``out``: ``modules`` are the .ko files, ``groups``
    which of them to load for which virtio device (see kernel.DEVICE_MODULES)."""
    w = NewcWriter()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        w.dir(d)
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in APPLETS:
        w.symlink(f"bin/{applet}", "busybox")
    for ko in modules:
        w.file(f"lib/modules/{ko.name}", ko.read_bytes())
    w.file("init", init_script(groups, pythonpath).encode(), 0o755)
    data = w.finish()
    if compress:
        data = gzip.compress(data, compresslevel=6, mtime=0)
    out.write_bytes(data)
