"""Import image archives: OCI image layouts (folder or tar) and `docker save` tars.

Both formats are read through one small "source" interface so that a folder and
a tar of the same layout behave alike. Every blob is verified before the image
is committed: OCI blobs against their file names/descriptors, docker-save
layers against the config's rootfs.diff_ids. Anything wrong aborts the whole
import and leaves the store untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

from ember.errors import ImageError
from ember.image import oci, schema
from ember.image.blobs import Pending, Staging, diff_id, sniff
from ember.image.oci import Image
from ember.image.reference import normalize, parse_reference

if TYPE_CHECKING:
    from ember.image.store import ImageStore

_TAG_ONLY_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_MANIFEST_LIMIT = 16 << 20


class _Source:
    """Read-only access to the files of an archive, folder or tar alike."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            return
        if not path.exists():
            raise ImageError(f"{path}: no such file or directory")
        try:
            self.tar = tarfile.open(path, "r:*")
            for member in self.tar.getmembers():
                self.members[_clean(member.name)] = member
        except (tarfile.TarError, EOFError, OSError) as exc:
            self.close()
            reason = " ".join(str(exc).split())
            if "could not be opened successfully" in reason:
                reason = "not a tar archive"
            raise ImageError(f"{path}: not a readable image archive ({reason})") from None

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def exists(self, name: str) -> bool:
        _check_name(self.path, name)
        if self.tar is None:
            try:
                fd = self._open_inside(name)
            except (FileNotFoundError, NotADirectoryError):
                return False
            try:
                return stat.S_ISREG(os.fstat(fd).st_mode)
            finally:
                os.close(fd)
        member = self.members.get(_clean(name))
        return member is not None and (member.isfile() or member.islnk() or member.issym())

    def _open_inside(self, name: str) -> int:
        """Open a regular file of the folder; refuse one that is (or leads) outside it.

        The check is made on the file actually opened (its /proc/self/fd link),
        so a symlink swapped in between a check and the open cannot lead out.
        """
        fd = os.open(self.path / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            real = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if not real.is_relative_to(self.path.resolve()):
                raise ImageError(f"{self.path}: {name} leads outside the folder (to {real})")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if not self.exists(name):
            raise ImageError(f"{self.path}: {name} is missing from the archive")
        if self.tar is None:
            with os.fdopen(self._open_inside(name), "rb") as f:
                yield f
            return
        member = self.members[_clean(name)]
        extracted = self.tar.extractfile(member)
        if extracted is None:
            raise ImageError(f"{self.path}: {name} is not a regular file")
        with extracted:
            yield extracted

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            data = f.read(_MANIFEST_LIMIT + 1)
        if len(data) > _MANIFEST_LIMIT:
            raise ImageError(f"{self.path}: {name} is too large to be metadata")
        return data


def _clean(name: str) -> str:
    return str(PurePosixPath("/", name))[1:]


def _check_name(archive: Path, name: object) -> None:
    """Names in manifest.json / index.json are relative paths inside the archive, nothing else."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ImageError(f"{archive}: invalid file name {name!r} in the archive's manifest")
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        raise ImageError(f"{archive}: refusing {name!r}: paths must stay inside the archive")


def import_archive(store: ImageStore, path: Path, name: str | None = None) -> list[Image]:
    source = _Source(path)
    try:
        with store.staging() as staging:
            try:
                if source.exists("oci-layout") or (
                    source.exists("index.json") and not source.exists("manifest.json")
                ):
                    pending = _import_oci(source, staging)
                elif source.exists("manifest.json"):
                    pending = _import_docker(source, staging)
                else:
                    raise ImageError(
                        f"{path}: neither an OCI image layout (index.json) nor a docker save archive (manifest.json)"
                    )
            except (tarfile.TarError, EOFError) as exc:
                raise ImageError(f"{path}: corrupt or truncated archive ({exc})") from None
            if not pending:
                raise ImageError(f"{path}: the archive holds no image")
            if name is not None:
                if len(pending) != 1:
                    raise ImageError(
                        f"{path}: holds {len(pending)} images; cannot give them all one name"
                    )
                pending[0].names = [normalize(name)]
            return store.commit(staging, pending)
    finally:
        source.close()


def _stage(source: _Source, staging: Staging, desc: dict) -> str:
    """Copy the blob a (validated) descriptor names into staging, verifying digest and size."""
    digest = oci.check_digest(desc.get("digest"), f"{source.path}: descriptor")
    if staging.has(digest):
        return digest
    member = f"blobs/sha256/{digest.split(':', 1)[1]}"
    with source.open(member) as f:
        staging.add_file(f, digest, f"{source.path}: blob {digest}", desc["size"])
    return digest


def _names_from_annotations(annotations: dict) -> list[str]:
    full = annotations.get("io.containerd.image.name")
    ref = annotations.get("org.opencontainers.image.ref.name")
    if full:
        return [normalize(full)]
    if ref and ("/" in ref or ":" in ref or not _TAG_ONLY_RE.match(ref)):
        return [normalize(ref)]
    return []  # a bare tag says nothing about the repository: leave it unnamed


def _import_oci(source: _Source, staging: Staging) -> list[Pending]:
    index = oci.parse_index(source.read("index.json"), f"{source.path}: index.json")
    pending: list[Pending] = []
    skipped: list[str] = []
    for entry in index["manifests"]:
        desc = entry
        if oci.media_type_of(entry) in oci.INDEX_TYPES:
            digest = _stage(source, staging, entry)
            what = f"{source.path}: index {digest}"
            desc = oci.select_platform(oci.parse_index(staging.read(digest), what), what)
        elif "platform" in entry and oci.platform_of(entry) != oci.PLATFORM:
            skipped.append("{}/{}".format(*oci.platform_of(entry)))
            continue
        mdigest = _stage(source, staging, desc)
        manifest = oci.parse_manifest(staging.read(mdigest), f"{source.path}: manifest {mdigest}")
        config = _stage(source, staging, manifest["config"])
        oci.parse_config(staging.read(config), f"{source.path}: config {config}")
        for layer in manifest["layers"]:
            _stage(source, staging, layer)
        pending.append(Pending(mdigest, _names_from_annotations(entry.get("annotations") or {})))
    if not pending and skipped:
        raise ImageError(f"{source.path}: no linux/amd64 image (has {', '.join(skipped)})")
    return pending


def _import_docker(source: _Source, staging: Staging) -> list[Pending]:
    what = f"{source.path}: manifest.json"
    try:
        entries = json.loads(source.read("manifest.json"))
    except RecursionError:
        raise ImageError(f"{what}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:
        raise ImageError(f"{what}: not valid JSON ({exc})") from None
    schema.validate(entries, schema.DOCKER_SAVE, what)
    pending: list[Pending] = []
    for entry in entries:
        config_name = entry["Config"]
        config_bytes = source.read(config_name)
        config_digest, config_size = staging.add_bytes(
            config_bytes, _digest_from_name(config_name), f"{source.path}: config {config_name}"
        )
        config = oci.parse_config(config_bytes, f"{source.path}: {config_name}")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        layer_names = entry.get("Layers") or []
        if len(diff_ids) != len(layer_names):
            raise ImageError(
                f"{source.path}: config lists {len(diff_ids)} layers but the archive has {len(layer_names)}"
            )
        layers: list[oci.Layer] = []
        for layer_name, expected in zip(layer_names, diff_ids, strict=True):
            what = f"{source.path}: layer {layer_name}"
            with source.open(layer_name) as f:
                digest, size = staging.add_file(f, None, what)
            blob = staging.path(digest)
            kind = sniff(blob)
            actual = digest if kind == "none" else diff_id(blob, what)
            if actual != expected:
                raise ImageError(f"{what}: digest mismatch (expected {expected}, got {actual})")
            media = {"none": oci.OCI_LAYER, "gzip": oci.OCI_LAYER_GZIP, "zstd": oci.OCI_LAYER_ZSTD}[
                kind
            ]
            layers.append(oci.Layer(digest, media, size))
        manifest = oci.make_manifest(config_digest, config_size, layers)
        mdigest, _ = staging.add_bytes(manifest, None, "manifest")
        names = []
        for tag in entry.get("RepoTags") or []:
            names.append(str(parse_reference(tag)))
        pending.append(Pending(mdigest, names))
    return pending


def _digest_from_name(name: str) -> str | None:
    """docker save names the config by its hash ("<hex>.json" or "blobs/sha256/<hex>")."""
    m = re.search(r"(?:^|/)([0-9a-f]{64})(?:\.json)?$", name)
    return f"sha256:{m.group(1)}" if m else None
