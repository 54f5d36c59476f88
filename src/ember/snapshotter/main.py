"""``ember-snapshotter``: Ember's block snapshotter, a containerd proxy plugin.

    ember-snapshotter --root /var/lib/ember-snapshotter \\
                      --address /run/ember-snapshotter/snapshotter.sock

serves ``containerd.services.snapshots.v1.Snapshots`` on the socket until
SIGTERM/SIGINT. ``--release`` unmounts the pool Ember made under ``--root``
(for uninstalling; the server must be stopped and no snapshot in use).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from ember.errors import EmberError
from ember.snapshotter import pool as poolmod
from ember.snapshotter.backend import DEFAULT_IMAGE_SIZE, ReflinkBackend
from ember.snapshotter.core import DEFAULT_MIN_FREE, open_snapshotter
from ember.snapshotter.service import serve
from ember.util import parse_size

log = logging.getLogger("ember.snapshotter")


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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for snapshot images and metadata.")
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
@click.option("--release", is_flag=True, help="Unmount the pool under --root and exit.")
@click.option("--log-level", default="info",
              type=click.Choice(["debug", "info", "warning", "error"]))
def cli(root: Path, address: Path | None, image_size: int, pool_size: int | None,
        min_free: int, release: bool, log_level: str) -> None:
    """Block snapshotter for containerd: every snapshot an ext4 image, cloned by reflink."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if release:
        root.mkdir(parents=True, exist_ok=True)
        fd = _lock(root)
        try:
            done = poolmod.release(root)
        finally:
            os.close(fd)
        click.echo(f"released {root / poolmod.POOL_DIR}" if done else "nothing mounted")
        return
    if address is None:
        raise click.UsageError("--address is required to serve")
    root.mkdir(parents=True, exist_ok=True)
    lock = _lock(root.resolve())
    pool = poolmod.open_pool(root, pool_size)
    sn = open_snapshotter(pool.data_dir, ReflinkBackend(pool, image_size), min_free)
    server = serve(sn, address.absolute())
    log.info("serving %s (%s pool in %s)", address, pool.mode, pool.data_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass
    log.info("stopping")
    server.stop(grace=5).wait()
    sn.store.close()
    os.close(lock)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="ember-snapshotter", standalone_mode=False)
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
