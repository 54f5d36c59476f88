"""`docker import` for Ember: one folder or tar becomes a one-layer image."""

from __future__ import annotations

import datetime as dt
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from ember.errors import ImageError
from ember.image import oci
from ember.image.blobs import Pending, diff_id, open_layer, sniff
from ember.image.oci import Image
from ember.image.reference import normalize

if TYPE_CHECKING:
    from ember.image.store import ImageStore

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MEDIA = {"none": oci.OCI_LAYER, "gzip": oci.OCI_LAYER_GZIP, "zstd": oci.OCI_LAYER_ZSTD}


def import_rootfs(
    store: ImageStore,
    path: Path,
    name: str,
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    workdir: str | None = None,
) -> Image:
    full_name = normalize(name)
    if not path.exists():
        raise ImageError(f"{path}: no such file or directory")
    with store.staging() as staging:
        what = f"rootfs {path}"
        if path.is_dir():
            tmp = staging.dir / ".rootfs.tar"
            try:
                with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                    # sorted walk, no dereferencing: symlinks, hard links, devices and
                    # numeric ownership go into the layer exactly as they are on disk.
                    tar.add(path, arcname=".", recursive=True)
            except OSError as exc:
                raise ImageError(f"{what}: cannot archive ({exc})") from None
            with open(tmp, "rb") as f:
                digest, size = staging.add_file(f, None, what)
            tmp.unlink()
        else:
            _check_tar(path, what)
            with open(path, "rb") as f:
                digest, size = staging.add_file(f, None, what)
        blob = staging.path(digest)
        kind = sniff(blob)
        layer = oci.Layer(digest, _MEDIA[kind], size)
        layer_diff_id = digest if kind == "none" else diff_id(blob, what)
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        run_config: dict = {"Env": list(env) if env is not None else [DEFAULT_PATH]}
        if cmd is not None:
            run_config["Cmd"] = list(cmd)
        if workdir:
            run_config["WorkingDir"] = workdir
        config = {
            "created": now,
            "architecture": "amd64",
            "os": "linux",
            "config": run_config,
            "rootfs": {"type": "layers", "diff_ids": [layer_diff_id]},
            "history": [{"created": now, "created_by": f"ember import-rootfs {path.name}"}],
        }
        config_bytes = oci.canonical_json(config)
        config_digest, config_size = staging.add_bytes(config_bytes, None, "config")
        manifest = oci.make_manifest(config_digest, config_size, [layer])
        mdigest, _ = staging.add_bytes(manifest, None, "manifest")
        return store.commit(staging, [Pending(mdigest, [full_name])])[0]


def _check_tar(path: Path, what: str) -> None:
    """Read the whole tar once so a corrupt one fails here, not inside a VM."""
    try:
        with open_layer(path, what) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for _ in tar:
                pass
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ImageError(f"{what}: not a valid tar archive ({exc})") from None
