"""Build small OCI image-layout tarballs for tests: ``ctr images import`` food.

    layers = [busybox_layer(), [Entry("/etc/motd", b"hi\\n"), Entry("/bin/ls", whiteout=True)]]
    build_oci_archive(tmp_path / "img.tar", "localhost/ember-test/busybox:1", layers)

Layers are gzip'd tars with OCI whiteouts (``.wh.NAME``) for deletions, the
config is linux/amd64, and index.json names the image with containerd's
``io.containerd.image.name`` annotation so ``ctr images import`` tags it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = "/bin/busybox"
APPLETS = ["sh", "cat", "ls", "echo", "true", "false", "sleep", "mkdir", "rm", "id",
           "uname", "env", "stat", "du", "df", "mount", "wc"]
OS_RELEASE = b'PRETTY_NAME="Ember test image (busybox)"\nNAME="ember-test"\nID=ember-test\n'


@dataclass
class Entry:
    """One path in a layer: a file (``data`` or ``source``), dir, symlink or whiteout."""

    path: str
    data: bytes | None = None
    mode: int = 0o644
    link: str | None = None
    dir: bool = False
    whiteout: bool = False
    source: Path | None = None


def busybox_layer() -> list[Entry]:
    """/bin/busybox from busybox-static, the usual applet links, /etc/os-release."""
    entries = [Entry("/bin", dir=True, mode=0o755), Entry("/etc", dir=True, mode=0o755),
               Entry("/tmp", dir=True, mode=0o1777),
               Entry("/bin/busybox", source=Path(BUSYBOX), mode=0o755),
               Entry("/etc/os-release", OS_RELEASE)]
    entries += [Entry(f"/bin/{a}", link="busybox") for a in APPLETS]
    return entries


def tree_layer(src: Path, dest: str) -> list[Entry]:
    """Every regular file, dir and symlink of host folder ``src``, placed at ``dest``."""
    entries = [Entry(dest, dir=True, mode=0o755)]
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        base = dest if rel == "." else f"{dest}/{rel}"
        for d in sorted(dirnames):
            p = Path(dirpath, d)
            if p.is_symlink():
                entries.append(Entry(f"{base}/{d}", link=os.readlink(p)))
            else:
                entries.append(Entry(f"{base}/{d}", dir=True, mode=0o755))
        for f in sorted(filenames):
            p = Path(dirpath, f)
            if p.is_symlink():
                entries.append(Entry(f"{base}/{f}", link=os.readlink(p)))
            elif p.is_file():
                entries.append(Entry(f"{base}/{f}", source=p, mode=p.stat().st_mode & 0o777))
    return entries


def _layer_tar(entries: list[Entry], out: io.BufferedIOBase) -> None:
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            name = e.path.strip("/")
            if e.whiteout:
                head, _, tail = name.rpartition("/")
                name = f"{head}/.wh.{tail}" if head else f".wh.{tail}"
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = e.mode, 0
            if e.dir:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.link is not None:
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, e.link, 0o777
                tar.addfile(info)
            elif e.source is not None:
                info.size = e.source.stat().st_size
                with open(e.source, "rb") as f:
                    tar.addfile(info, f)
            else:
                data = e.data or b""
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


class _Blobs:
    """Content-addressed blobs in a layout folder."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs" / "sha256"
        self.dir.mkdir(parents=True)

    def add_file(self, path: Path) -> tuple[str, int]:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        os.replace(path, self.dir / h.hexdigest())
        return f"sha256:{h.hexdigest()}", (self.dir / h.hexdigest()).stat().st_size

    def add_json(self, obj: dict) -> tuple[str, int]:
        data = json.dumps(obj, sort_keys=True).encode()
        digest = hashlib.sha256(data).hexdigest()
        (self.dir / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)


def build_oci_archive(out: str | os.PathLike, ref: str, layers: list[list[Entry]],
                      cmd: list[str] | None = None) -> Path:
    """Write an OCI image-layout tar for ``ref`` with ``layers`` (bottom first)."""
    out = Path(out)
    work = Path(tempfile.mkdtemp(prefix=".oci-", dir=out.parent))
    try:
        blobs = _Blobs(work)
        diff_ids, descs = [], []
        for entries in layers:
            raw = work / "layer.tar"
            with open(raw, "wb") as f:
                _layer_tar(entries, f)
            h = hashlib.sha256()
            with open(raw, "rb") as f, open(work / "layer.tgz", "wb") as gz_out:
                with gzip.GzipFile(fileobj=gz_out, mode="wb", compresslevel=1, mtime=0) as gz:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                        gz.write(chunk)
            raw.unlink()
            diff_ids.append(f"sha256:{h.hexdigest()}")
            digest, size = blobs.add_file(work / "layer.tgz")
            descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                          "digest": digest, "size": size})
        config = {"architecture": "amd64", "os": "linux",
                  "config": {"Cmd": cmd or ["/bin/sh"],
                             "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                     "/usr/bin:/sbin:/bin"]},
                  "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        cdigest, csize = blobs.add_json(config)
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": cdigest, "size": csize},
                    "layers": descs}
        mdigest, msize = blobs.add_json(manifest)
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest, "size": msize,
            "annotations": {"io.containerd.image.name": ref,
                            "org.opencontainers.image.ref.name": tag}}]}
        (work / "index.json").write_text(json.dumps(index))
        (work / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        tmp = out.with_name(f".{out.name}.tmp")
        with tarfile.open(tmp, "w") as tar:
            for name in ("oci-layout", "index.json", "blobs"):
                tar.add(work / name, arcname=name)
        os.replace(tmp, out)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
