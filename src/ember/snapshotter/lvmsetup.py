"""``ember-snapshotter lvm-setup``: a thin pool for ``--backend lvm`` without hand work.

    ember-snapshotter lvm-setup --device /dev/sdb
    ember-snapshotter lvm-setup --file /var/lib/ember-lvm.img --size 20g

makes the physical volume, the volume group and the thin pool, then prints the
options (and config file lines) to serve it. A device (or an existing file)
that holds a filesystem, partition table or LVM signature is refused unless
``--force``: the command would destroy it. On any failure what this run made
is undone (pool, VG, PV, loop device, file), so a second try starts clean.

Metadata size follows the kernel's thin-provisioning guide, which containerd's
devmapper snapshotter docs point to: 48 bytes per data chunk
(``48 * data / chunk``), at least 2 MiB, at most LVM's 16 GiB, rounded up to
whole extents. LVM keeps a spare metadata area of the same size for repairs,
so data gets what remains after two of them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import click

from ember.errors import EmberError
from ember.snapshotter.lvm import check_name
from ember.snapshotter.lvmshell import lvm
from ember.util import parse_size

MIB = 1 << 20
CHUNK = 64 << 10  # thin pool chunk size (LVM's default for small pools)
EXTENT = 4 * MIB  # vgcreate's default physical extent size
META_MIN, META_MAX = 2 * MIB, 16 << 30
MIN_SIZE = 64 * MIB


def metadata_size(data: int, chunk: int = CHUNK) -> int:
    """Thin pool metadata for ``data`` bytes: 48 bytes a chunk, 2 MiB..16 GiB, whole extents."""
    size = min(META_MAX, max(META_MIN, 48 * data // chunk))
    return -(-size // EXTENT) * EXTENT


def split_pool(vg_bytes: int) -> tuple[int, int]:
    """(data, metadata) for a thin pool filling a VG of ``vg_bytes``.

    The metadata is sized for the whole VG (an upper bound of the data), and
    counted twice: LVM keeps a spare of the same size (``pmspare``).
    """
    meta = metadata_size(vg_bytes)
    data = (vg_bytes - 2 * meta) // EXTENT * EXTENT
    return data, meta


def signature(device: str) -> str | None:
    """What ``device`` holds (a filesystem, partition table, LVM), per blkid, or None."""
    proc = subprocess.run(["blkid", "-p", "-o", "export", device], capture_output=True,
                          text=True, check=False)
    if proc.returncode == 2:  # nothing found
        return None
    if proc.returncode != 0:
        raise EmberError(f"cannot probe {device}: {proc.stderr.strip() or 'blkid failed'}")
    fields = dict(ln.split("=", 1) for ln in proc.stdout.splitlines() if "=" in ln)
    return fields.get("TYPE") or fields.get("PTTYPE") or "a signature"


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise EmberError(f"{what}: {lines[-1].strip() if lines else f'exit {proc.returncode}'}")
    return proc.stdout


def config_lines(vg: str, pool: str) -> str:
    return (f"ember-snapshotter --backend lvm --volume-group {vg} --thin-pool {pool} "
            "--root ROOT --address SOCKET\n"
            "# or, in the file given with --config:\n"
            f'backend = "lvm"\nvolume_group = "{vg}"\nthin_pool = "{pool}"\n')


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--device", help="Block device to turn into the pool's physical volume.")
@click.option("--file", "file_", type=click.Path(dir_okay=False, path_type=Path),
              help="Sparse file to make and use through a loop device (tests, trials).")
@click.option("--size", help="Size of --file, e.g. 20g.")
@click.option("--volume-group", default="ember", show_default=True)
@click.option("--thin-pool", default="snapshots", show_default=True)
@click.option("--force", is_flag=True, help="Use a device that holds a filesystem or LVM.")
def lvm_setup(device: str | None, file_: Path | None, size: str | None, volume_group: str,
              thin_pool: str, force: bool) -> None:
    """Make an LVM thin pool for `ember-snapshotter --backend lvm` and print its options."""
    if (device is None) == (file_ is None):
        raise click.UsageError("give one of --device DEV or --file PATH --size SIZE")
    if file_ is not None and size is None:
        raise click.UsageError("--file needs --size")
    if device is not None and size is not None:
        raise click.UsageError("--size goes with --file (a device has its size)")
    vg, pool = check_name("volume group", volume_group), check_name("thin pool", thin_pool)
    undo: list[Callable[[], object]] = []
    try:
        if file_ is not None:
            assert size is not None  # --file without --size is refused above
            device = _loop_file(file_, parse_size(size), force, undo)
        assert device is not None
        _make_pool(device, vg, pool, force, undo)
    except BaseException:
        for step in reversed(undo):
            with contextlib.suppress(Exception):
                step()
        raise
    click.echo(f"thin pool {vg}/{pool} ready on {device}")
    if file_ is not None:
        click.echo(f"# {device} does not survive a reboot: `losetup -f {file_}` and "
                   "`vgchange -ay` bring it back", err=True)
    click.echo(config_lines(vg, pool), nl=False)


def _loop_file(path: Path, size: int, force: bool, undo: list) -> str:
    if size < MIN_SIZE:
        raise EmberError(f"size {size >> 20} MiB is too small: a thin pool needs at least "
                         f"{MIN_SIZE >> 20} MiB")
    if path.exists():
        if not force and path.stat().st_size and signature(str(path)):
            raise EmberError(f"{path} holds {signature(str(path))}; use --force to overwrite it")
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        undo.append(lambda: path.unlink())
        os.close(fd)
    os.truncate(path, size)
    dev = _run(["losetup", "-f", "--show", str(path)], f"attaching {path}").strip()
    undo.append(lambda: _run(["losetup", "-d", dev], f"detaching {dev}"))
    return dev


def _make_pool(device: str, vg: str, pool: str, force: bool, undo: list) -> None:
    if not os.path.exists(device):
        raise EmberError(f"{device} does not exist")
    found = signature(device)
    if found and not force:
        raise EmberError(f"{device} holds {found}; refusing to overwrite it (use --force)")
    if found:
        _run(["wipefs", "-a", device], f"wiping {device}")
    lvm("pvcreate", "-q", "-y", "-ff", device, what=f"pvcreate {device}")
    undo.append(lambda: lvm("pvremove", "-q", "-y", "-ff", device, what="pvremove"))
    lvm("vgcreate", "-q", "-s", f"{EXTENT >> 20}m", vg, device, what=f"vgcreate {vg}")
    undo.append(lambda: lvm("vgremove", "-q", "-f", vg, what="vgremove"))
    out = lvm("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", vg,
              what=f"reading the size of {vg}")
    data, meta = split_pool(int(out.strip()))
    if data < EXTENT * 4:
        raise EmberError(f"{device} is too small for a thin pool")
    # -Zn: no zeroing of new chunks; every snapshot is a filesystem that only
    # reads blocks it wrote (containerd's devmapper docs turn it off too).
    lvm("lvcreate", "-q", "--type", "thin-pool", "-L", f"{data}b", "--poolmetadatasize",
        f"{meta}b", "-c", f"{CHUNK >> 10}k", "-Zn", "-n", pool, vg,
        what=f"creating thin pool {vg}/{pool}")

