"""The guest root filesystem: Python 3.11, crun, busybox, kmod, the kernel's
modules (see modules.py) and the ember agent.

Built as a folder from unpacked Debian packages, then turned into a
read-only ext4 image with ``mkfs.ext4 -d`` (no mount, no loop device). Every
VM shares the one image read-only; all writable places are tmpfs (/init
mounts them), so the image needs no journal and never changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ember.errors import GuestError

# The ember package this file belongs to (its parent's parent), without importing
# `ember` itself, whose lazy re-exports reach the whole host side.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
PYTHONPATH = "/usr/lib/ember"  # where ember and google.protobuf live in the guest

# Python packages (relative to their import root) the agent needs, taken from
# the host so that the generated *_pb2 code matches the protobuf runtime.
EMBER_FILES = ("errors.py", "version.py", "agent", "ttrpc")
# The guest's `ember/__init__.py`: not the host's, whose lazy re-exports (ember.Sandbox,
# ember.Volume) name host modules the guest does not have.
GUEST_INIT = '"""Ember\'s guest side: the agent and what it needs."""\n\nfrom ember.version import __version__\n\n__all__ = ["__version__"]\n'
SITE_PACKAGES = ("google/protobuf", "google/_upb")

# Documentation, translations and package-manager leftovers: dead weight in a
# read-only image no one logs into.
_DROP = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/doc-base",
    "usr/share/bash-completion",
    "usr/share/gdb",
    "usr/share/initramfs-tools",
    "etc/init.d",
    "etc/cron.daily",
    "etc/logrotate.d",
    "etc/systemd",
)
_MOUNTPOINTS = ("proc", "sys", "dev", "run", "tmp", "var/tmp", "root", "mnt")

_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "etc/group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    "etc/hostname": "ember\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
    "etc/os-release": 'PRETTY_NAME="Ember guest (Debian 12 packages)"\nID=ember-guest\nID_LIKE=debian\n',
}


def merge_usr(tree: Path) -> None:
    """Make /bin, /sbin, /lib, /lib64 links into /usr, as Debian 12 hosts are.

    Packages still ship some files under /lib (the dynamic loader, libc); they
    are moved into /usr so both spellings of every path work.
    """
    for top in ("bin", "sbin", "lib", "lib64"):
        src, dest = tree / top, tree / "usr" / top
        if src.is_dir() and not src.is_symlink():
            for dirpath, _dirs, files in os.walk(src):
                rel = Path(dirpath).relative_to(src)
                (dest / rel).mkdir(parents=True, exist_ok=True)
                for name in files:
                    os.replace(Path(dirpath) / name, dest / rel / name)
            # Symlinks to directories show up in _dirs; move those too.
            for dirpath, dirs, _files in os.walk(src):
                for name in dirs:
                    p = Path(dirpath) / name
                    if p.is_symlink():
                        os.replace(p, dest / p.relative_to(src))
            shutil.rmtree(src)
        dest.mkdir(parents=True, exist_ok=True)
        if not src.is_symlink():
            src.symlink_to(f"usr/{top}")


def install_busybox(tree: Path) -> None:
    """Busybox applets (sh, mount, umount, ...) as links, never over real files."""
    busybox = tree / "usr/bin/busybox"
    if not busybox.is_file():
        raise GuestError("rootfs: busybox-static did not provide /bin/busybox")
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    for applet in out.stdout.split():
        link = tree / "usr/bin" / applet
        if not link.exists() and not (tree / "usr/sbin" / applet).exists():
            link.symlink_to("busybox")


def copy_python_packages(tree: Path) -> None:
    """The agent's code and its one dependency, google.protobuf, from the host."""
    dest = tree / PYTHONPATH.lstrip("/")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyi")
    src = PACKAGE_DIR
    (dest / "ember").mkdir(parents=True, exist_ok=True)
    (dest / "ember" / "__init__.py").write_text(GUEST_INIT)
    for name in EMBER_FILES:
        s = src / name
        if s.is_dir():
            shutil.copytree(s, dest / "ember" / name, ignore=ignore)
        else:
            (dest / "ember").mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, dest / "ember" / name)
    for rel in SITE_PACKAGES:
        s = site_packages_dir() / rel
        if s.is_dir():
            shutil.copytree(s, dest / rel, ignore=ignore)
    for info in site_packages_dir().glob("protobuf-*.dist-info"):
        shutil.copytree(info, dest / info.name)


def site_packages_dir() -> Path:
    import google.protobuf

    return Path(google.protobuf.__file__).parent.parent.parent


def compile_python(tree: Path) -> None:
    """Precompile every .py so the guest never compiles at start-up.

    The guest's own interpreter does it (same bytecode as the guest runs);
    unchecked-hash pycs skip the source-stat check, fine for a read-only image.
    """
    guest_python = tree / "usr/bin/python3.11"
    env = dict(os.environ, PYTHONHOME=str(tree / "usr"), PYTHONDONTWRITEBYTECODE="1")
    cmd = [str(guest_python)]
    if subprocess.run([*cmd, "-c", "pass"], env=env, capture_output=True).returncode != 0:
        if sys.version_info[:2] != (3, 11):
            raise GuestError("rootfs: cannot run the guest's python3.11 to precompile")
        cmd, env = [sys.executable], dict(os.environ)
    targets = [tree / "usr/lib/python3.11", tree / PYTHONPATH.lstrip("/")]
    proc = subprocess.run(
        [
            *cmd,
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            str(tree),
            "-p",
            "/",
            "-x",
            r"/(test|tests|idlelib|turtledemo)/",
            *map(str, targets),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise GuestError(f"rootfs: compileall failed: {(proc.stdout + proc.stderr).strip()[-300:]}")


def finish_tree(tree: Path) -> None:
    """Everything after unpacking: layout, config files, agent code, bytecode."""
    merge_usr(tree)
    for rel in _DROP:
        shutil.rmtree(tree / rel, ignore_errors=True)
    for rel in _MOUNTPOINTS:
        (tree / rel).mkdir(parents=True, exist_ok=True)
    os.chmod(tree / "tmp", 0o1777)
    os.chmod(tree / "var/tmp", 0o1777)
    os.chmod(tree / "root", 0o700)
    for rel, text in _ETC.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    for link, target in (("usr/bin/python3", "python3.11"), ("usr/bin/python", "python3.11")):
        if not (tree / link).exists():
            (tree / link).symlink_to(target)
    install_busybox(tree)
    copy_python_packages(tree)
    compile_python(tree)
    # A loader cache saves every program start a walk over the library dirs.
    # Needs chroot (root); without it the loader still finds everything.
    subprocess.run(["ldconfig", "-r", str(tree)], capture_output=True, check=False)


def tree_bytes(tree: Path) -> int:
    total = 0
    for dirpath, dirs, files in os.walk(tree):
        total += 4096 * (len(dirs) + 1)
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                total += (os.path.getsize(p) + 4095) // 4096 * 4096
    return total


def make_image(tree: Path, image: Path) -> None:
    """``mkfs.ext4 -d``: the folder becomes a journal-less ext4 image."""
    size_mib = tree_bytes(tree) * 5 // 4 // (1 << 20) + 32
    proc = subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "ember-guest",
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-E",
            "root_owner=0:0",
            "-d",
            str(tree),
            str(image),
            f"{size_mib}M",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise GuestError(f"mkfs.ext4: {proc.stderr.strip() or 'failed'}")
