"""What goes into a jail: the VMM binary, its shared libraries, its data files.

QEMU is dynamically linked and loads its TCG accelerator as a module, so its
jail gets hard links to exactly the libraries ``ldd`` names (plus those of the
accelerator modules) at their usual paths, and a read-only bind of its firmware
directory; Firecracker is static and gets only itself. Hard links cost nothing
and share the root-owned, read-only host inode; across file systems the binary
and libraries are copied instead.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from ember.errors import EmberError
from ember.util import atomic_write

_LDD_PATH = re.compile(r"(/\S+)\s+\(0x[0-9a-f]+\)")
QEMU_DATA_DIRS = ("/usr/share/qemu", "/usr/share/seabios")


def _ldd(binaries: tuple[str, ...]) -> list[str]:
    try:
        procs = [subprocess.Popen(["/usr/bin/ldd", b], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True,
                                  env={"PATH": "/usr/bin:/bin"}) for b in binaries]
    except OSError as exc:
        raise EmberError(f"cannot list shared libraries: {exc}") from None
    found: set[str] = set()
    for proc in procs:
        out, _ = proc.communicate(timeout=30)
        if proc.returncode == 0:  # else "not a dynamic executable"
            found.update(m.group(1) for m in _LDD_PATH.finditer(out))
    return sorted(found)


def _fingerprint(paths: list[str] | tuple[str, ...]) -> list[list]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([p, st.st_ino, st.st_size, st.st_mtime_ns])
    return out


class LibraryCache:
    """The libraries ``ldd`` listed for a set of binaries, kept between VM starts.

    ``ldd`` on QEMU costs ~100 ms on every start, so the answer is kept in a
    root-owned JSON file and reused while neither the binaries nor any listed
    library has changed (an upgrade changes inode or mtime). ``save()`` is
    called only once the VMM runs, so a refused start creates nothing.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.pending: str | None = None

    def libraries(self, *binaries: str) -> list[str]:
        if self.path is not None:
            try:
                saved = json.loads(self.path.read_text())
                if saved["binaries"] == _fingerprint(binaries) and \
                        saved["libraries"] == _fingerprint(saved["paths"]):
                    return saved["paths"]
            except (OSError, ValueError, KeyError, TypeError):
                pass
        paths = _ldd(binaries)
        self.pending = json.dumps({"binaries": _fingerprint(binaries), "paths": paths,
                                   "libraries": _fingerprint(paths)})
        return paths

    def save(self) -> None:
        if self.path is not None and self.pending is not None:
            try:
                atomic_write(self.path, self.pending, mode=0o600)
            except OSError:
                pass  # a cache, nothing more


def qemu_modules(exec_file: str) -> list[str]:
    """The TCG accelerator module for this QEMU's target (Debian builds it as a module)."""
    target = os.path.basename(exec_file).removeprefix("qemu-system-")
    for pattern in ("/usr/lib/*/qemu", "/usr/lib/qemu", "/usr/lib64/qemu"):
        found = sorted(glob.glob(f"{pattern}/accel-*-{target}.so"))
        if found:
            return found
    return []


def under(root: Path, jail_path: str) -> Path:
    """The host path of ``jail_path`` inside ``root``; refuses anything that escapes."""
    if not jail_path.startswith("/"):
        raise EmberError(f"jail path {jail_path!r} must be absolute")
    parts = Path(jail_path).parts[1:]
    if ".." in parts or not parts:
        raise EmberError(f"jail path {jail_path!r} must name a file below / without '..'")
    if parts[0] == "dev":
        raise EmberError(f"jail path {jail_path!r}: /dev is the jailer's own (device nodes)")
    return root.joinpath(*parts)


def make_parents(root: Path, target: Path) -> None:
    """Create target's parent directories inside root: real dirs, root-owned, 0755."""
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)


def link_or_copy(src: str, dst: Path, allow_copy: bool = True) -> None:
    """Hard-link src (its final target, not a symlink) to dst, else copy it."""
    real = os.path.realpath(src)
    try:
        os.link(real, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK) or not allow_copy:
            raise EmberError(f"cannot hard link {src} into the jail: {exc.strerror} "
                             "(use copy or bind)") from None
        shutil.copy2(real, dst)


def copy_into(src: str, dst: Path) -> None:
    if os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst)


def make_stub(src: str, dst: Path) -> None:
    """An empty file or directory for a bind mount to land on."""
    if os.path.isdir(src):
        dst.mkdir(mode=0o755, exist_ok=True)
    else:
        dst.touch(mode=0o644, exist_ok=True)
