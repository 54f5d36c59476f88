"""``ember-snapshotter``: Ember's block snapshotter, a containerd proxy plugin.

    ember-snapshotter --root /var/lib/ember-snapshotter \\
                      --address /run/ember-snapshotter/snapshotter.sock

serves ``containerd.services.snapshots.v1.Snapshots`` on the socket until
SIGTERM/SIGINT. ``--release`` unmounts the pool Ember made under ``--root``
(for uninstalling; the server must be stopped and no snapshot in use).

``--backend lvm --volume-group VG --thin-pool POOL`` keeps snapshots as thin
LVs instead (``--root`` then holds only the metadata); ``ember-snapshotter
lvm-setup`` makes such a pool. ``--config FILE`` reads any option from a TOML
file (``volume_group = "ember"``); the command line wins.
"""

from __future__ import annotations

import faulthandler
import fcntl
import logging
import os
import sys
import tomllib
from pathlib import Path

import click

from ember.errors import EmberError
from ember.snapshotter import pool as poolmod
from ember.snapshotter.backend import DEFAULT_IMAGE_SIZE, Backend, ReflinkBackend
from ember.snapshotter.core import DEFAULT_MIN_FREE, open_snapshotter
from ember.snapshotter.service import serve
from ember.stopsignal import StopSignals
from ember.util import parse_size

log = logging.getLogger("ember.snapshotter")

STOP_GRACE_S = 5  # in-flight calls finish within this after SIGTERM, or are cancelled
STOP_DUMP_S = 15  # a stop slower than this dumps every thread's stack to the log


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_size(value)
    except EmberError as exc:
        raise click.BadParameter(exc.message) from None


def _lock(root: Path) -> int:
    """One snapshotter per root: a second one would corrupt the other's state."""
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EmberError(f"another ember-snapshotter is already serving {root}") from None
    return fd


def _config(ctx: click.Context, param, value):
    """Options from a TOML file, as defaults the command line overrides."""
    if value is None:
        return None
    try:
        with open(value, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{value} is not valid TOML: {exc}") from None
    known = {p.name for p in ctx.command.params} - {"config", "release"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise click.BadParameter(f"{value}: unknown key {unknown[0]!r} "
                                 f"(known: {', '.join(sorted(known))})")
    ctx.default_map = {**(ctx.default_map or {}),
                       **{k: str(v) if isinstance(v, int) else v for k, v in data.items()}}
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), callback=_config, is_eager=True,
              expose_value=False, help="TOML file with any of these options "
              "(keys as the long names with '_': volume_group = \"ember\").")
@click.option("--root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for snapshot metadata (and images, for the reflink backend).")
@click.option("--backend", type=click.Choice(["reflink", "lvm"]), default="reflink",
              show_default=True, help="reflink: ext4 image files; lvm: thin LVs in a thin pool.")
@click.option("--volume-group", help="LVM volume group of the thin pool (--backend lvm).")
@click.option("--thin-pool", help="LVM thin pool to make snapshots in (--backend lvm).")
@click.option("--address", type=click.Path(dir_okay=False, path_type=Path),
              help="Unix socket to serve gRPC on.")
@click.option("--image-size", default=f"{DEFAULT_IMAGE_SIZE >> 30}g", callback=_size,
              show_default=True, help="Size of each (sparse) ext4 image, e.g. 10g.")
@click.option("--pool-size", default=None, callback=_size,
              help="Size of the sparse XFS pool made when --root has no reflinks "
                   "(default: 90% of the free space).")
@click.option("--min-free", default=f"{DEFAULT_MIN_FREE >> 20}m", callback=_size,
              show_default=True,
              help="Refuse new snapshots when less than this is free.")
@click.option("--release", is_flag=True,
              help="Uninstall: unmount the pool under --root (file backend) or remove "
                   "its thin LVs (lvm backend), then exit.")
@click.option("--log-level", default="info",
              type=click.Choice(["debug", "info", "warning", "error"]))
def cli(root: Path, backend: str, volume_group: str | None, thin_pool: str | None,
        address: Path | None, image_size: int, pool_size: int | None,
        min_free: int, release: bool, log_level: str) -> None:
    """Block snapshotter for containerd: every snapshot an ext4 block device,
    an image file cloned by reflink or a thin LV (see also: lvm-setup)."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if backend == "lvm" and not (volume_group and thin_pool):
        raise click.UsageError("--backend lvm needs --volume-group and --thin-pool "
                               "(ember-snapshotter lvm-setup makes them)")
    if backend != "lvm" and (volume_group or thin_pool):
        raise click.UsageError("--volume-group and --thin-pool need --backend lvm")
    if release:
        root.mkdir(parents=True, exist_ok=True)
        fd = _lock(root)
        try:
            _release(root)
        finally:
            os.close(fd)
        return
    if address is None:
        raise click.UsageError("--address is required to serve")
    root.mkdir(parents=True, exist_ok=True)
    lock = _lock(root.resolve())
    # Before anything serves: a SIGTERM that comes as soon as the socket
    # accepts (a quick client) is a clean stop, not death by the default action.
    stop = StopSignals()
    storage: Backend
    if backend == "lvm":
        from ember.snapshotter.lvm import LvmBackend

        if pool_size:
            log.info("--pool-size is ignored with --backend lvm (the thin pool has its size)")
        data_dir = root.resolve()
        assert volume_group and thin_pool  # --backend lvm without them is refused above
        storage = LvmBackend(data_dir, volume_group, thin_pool, image_size)
        where = f"thin pool {volume_group}/{thin_pool}"
    else:
        pool = poolmod.open_pool(root, pool_size)
        data_dir, storage = pool.data_dir, ReflinkBackend(pool, image_size)
        where = f"{pool.mode} pool in {pool.data_dir}"
    sn = open_snapshotter(data_dir, storage, min_free)
    server = serve(sn, address.absolute())
    log.info("serving %s (%s)", address, where)
    stop.wait()
    log.info("stopping")
    # A supervisor waits a bounded time after SIGTERM (containerd's suite: 30
    # s). Should a step hang, every thread's stack goes to the log first, so
    # the next look shows where.
    faulthandler.dump_traceback_later(STOP_DUMP_S, exit=False)
    if not server.stop(grace=STOP_GRACE_S).wait(STOP_GRACE_S * 2):
        log.warning("the gRPC server did not stop within %ss", STOP_GRACE_S * 2)
    storage.close()
    sn.store.close()
    os.close(lock)
    log.info("stopped")


def _release(root: Path) -> None:
    """What this root holds outside of its folder: the file backend's mounted
    pool, or the LVM backend's thin LVs (a root that has ``lvm.json``)."""
    from ember.snapshotter.lvm import STATE_FILE, release_root

    if (root / STATE_FILE).exists():
        count, pool = release_root(root)
        click.echo(f"removed {count} thin LV(s) of {root} from {pool}")
    elif poolmod.release(root):
        click.echo(f"released {root / poolmod.POOL_DIR}")
    else:
        click.echo("nothing mounted")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    command, prog = cli, "ember-snapshotter"
    if args[:1] == ["lvm-setup"]:
        from ember.snapshotter.lvmsetup import lvm_setup

        command, prog, args = lvm_setup, "ember-snapshotter lvm-setup", args[1:]
    try:
        command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EmberError as exc:
        click.echo(f"ember-snapshotter: {exc.message}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
