"""The local image store: content-addressed blobs plus a small name index.

Layout under ``cfg.images_dir``::

    blobs/sha256/<hex>   manifests, configs and layers, named by their digest
    index.json           {"images": {<config digest>: {manifest, names, repo_digests}}}
    lock                 flock()ed by every writer (several CLI processes may run)
    tmp/stage-*          per-import staging folders (see ember.image.blobs)

Readers load index.json without the lock: it is only ever replaced by rename.
A name belongs to one image; when a new image takes the last name of an old
one the old one is dropped, so the store never fills with nameless leftovers.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from ember.config import Config
from ember.errors import ImageError
from ember.image import oci
from ember.image.blobs import Pending, Staging, blob_path
from ember.image.oci import Image
from ember.image.reference import familiar_name, parse_reference
from ember.util import atomic_write_json, private_dir

_HEX_PREFIX_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{4,64})$")  # shorter prefixes match too easily


class ImageStore:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.root = Path(cfg.images_dir)
        self.index_path = self.root / "index.json"

    # ---- reading -------------------------------------------------------------------

    def _index(self) -> dict:
        try:
            data = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {"version": 1, "images": {}}
        except (OSError, json.JSONDecodeError) as exc:
            raise ImageError(f"image index {self.index_path} is unreadable: {exc}") from None
        data.setdefault("images", {})
        return data

    def blob_path(self, digest: str) -> Path:
        return blob_path(self.root, digest)

    def _load(self, image_id: str, entry: dict) -> Image:
        mdigest = entry["manifest"]
        try:
            manifest = oci.read_manifest(
                self.blob_path(mdigest).read_bytes(), f"manifest {mdigest}"
            )
            config = oci.load_json(self.blob_path(image_id).read_bytes(), f"config {image_id}")
        except FileNotFoundError as exc:
            raise ImageError(f"image {image_id}: store is missing blob {exc.filename}") from None
        layers = oci.manifest_layers(manifest)
        return Image(
            id=image_id,
            manifest_digest=mdigest,
            names=list(entry.get("names", [])),
            config=config,
            layers=layers,
            size=sum(la.size for la in layers),
            repo_digests=list(entry.get("repo_digests", [])),
        )

    def list(self) -> builtins.list[Image]:
        images = self._index()["images"]
        return [self._load(i, e) for i, e in sorted(images.items())]

    def _find_id(self, ref: str, images: dict) -> str:
        if ref in images:
            return ref
        bad_ref: ImageError | None = None
        try:
            parsed = parse_reference(ref)
        except ImageError as exc:
            parsed, bad_ref = None, exc
        if parsed is not None:
            full = str(parsed)
            for image_id, entry in images.items():
                if full in entry.get("names", []) or full in entry.get("repo_digests", []):
                    return image_id
            if parsed.digest:
                by_name = f"{parsed.name}@{parsed.digest}"
                for image_id, entry in images.items():
                    if by_name in entry.get("repo_digests", []) or (
                        entry.get("manifest") == parsed.digest
                        and any(n.startswith(parsed.name + ":") for n in entry.get("names", []))
                    ):
                        return image_id
        m = _HEX_PREFIX_RE.match(ref)
        if m:
            matches = [i for i in images if i.split(":", 1)[1].startswith(m.group(1))]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise ImageError(f"image id prefix {ref!r} is ambiguous ({len(matches)} images)")
        if bad_ref is not None and not m:
            raise bad_ref
        raise ImageError(f"image not found: {ref}")

    def resolve(self, ref: str) -> Image:
        """Find an image by name (normalized), name@digest, full id or id prefix."""
        images = self._index()["images"]
        image_id = self._find_id(ref, images)
        return self._load(image_id, images[image_id])

    def inspect(self, ref: str) -> dict:
        """A docker-inspect-like summary of one image."""
        image = self.resolve(ref)
        cfg = image.config.get("config") or {}
        return {
            "Id": image.id,
            "RepoTags": [familiar_name(n) for n in image.names],
            "RepoDigests": [familiar_name(d) for d in image.repo_digests],
            "Created": image.config.get("created", ""),
            "Architecture": image.config.get("architecture", ""),
            "Os": image.config.get("os", ""),
            "Size": image.size,
            "ManifestDigest": image.manifest_digest,
            "Layers": [la.digest for la in image.layers],
            "Config": {
                "Entrypoint": cfg.get("Entrypoint"),
                "Cmd": cfg.get("Cmd"),
                "Env": cfg.get("Env") or [],
                "WorkingDir": cfg.get("WorkingDir") or "",
                "User": cfg.get("User") or "",
            },
        }

    def rootfs_path(self, image_id: str) -> Path:
        """Where ember.storage.rootfs caches the flattened ext4 of an image."""
        return Path(self.cfg.rootfs_dir) / f"{image_id.split(':', 1)[-1]}.ext4"

    # ---- writing -------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """Hold the store lock and yield the current index for modification."""
        private_dir(self.root)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._index()
        finally:
            os.close(fd)

    def staging(self) -> Staging:
        return Staging(self.root)

    def commit(self, staging: Staging, pending: builtins.list[Pending]) -> builtins.list[Image]:
        """Move verified blobs into the store and record the images, atomically per call."""
        checked = [self._checked_manifest(staging, p) for p in pending]  # before the lock
        with self._locked() as index:
            images = index["images"]
            entries: builtins.list[tuple[str, dict]] = []
            for p, manifest in zip(pending, checked, strict=True):
                wanted = [p.manifest_digest, manifest["config"]["digest"]]
                wanted += [la.digest for la in oci.manifest_layers(manifest)]
                for digest in wanted:
                    if not staging.has(digest):
                        raise ImageError(
                            f"blob {digest} vanished from the store during import; retry"
                        )
                entries.append((manifest["config"]["digest"], {"p": p, "blobs": wanted}))
            for image_id, item in entries:
                for digest in item["blobs"]:
                    staged = staging.dir / digest.split(":", 1)[1]
                    if staged.exists():
                        dest = self.blob_path(digest)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(staged, dest)
                p = item["p"]
                for other_id, other in list(images.items()):
                    if other_id == image_id:
                        continue
                    other["names"] = [n for n in other.get("names", []) if n not in p.names]
                    if not other["names"] and p.names:
                        # Its last name moved to the new image: drop it, as a re-tag would.
                        del images[other_id]
                        self._drop_rootfs(other_id)
                entry = images.setdefault(image_id, {"names": [], "repo_digests": []})
                entry["manifest"] = p.manifest_digest
                entry["names"] = sorted(set(entry.get("names", [])) | set(p.names))
                entry["repo_digests"] = sorted(
                    set(entry.get("repo_digests", [])) | set(p.repo_digests)
                )
            self._gc(images)
            atomic_write_json(self.index_path, index)
            return [self._load(image_id, images[image_id]) for image_id, _ in entries]

    @staticmethod
    def _checked_manifest(staging: Staging, p: Pending) -> dict:
        """Validate what an image's readers will parse, so nothing malformed is committed.

        The manifest and config are checked against the OCI spec's types (a config
        that is a JSON array would otherwise break ``ember images`` for everyone).
        """
        manifest = oci.parse_manifest(staging.read(p.manifest_digest), p.manifest_digest)
        config_digest = manifest["config"]["digest"]
        try:
            config = staging.read(config_digest)
        except FileNotFoundError:
            raise ImageError(f"config {config_digest} is missing from the import") from None
        oci.parse_config(config, f"config {config_digest}")
        return manifest

    def remove(self, ref: str) -> builtins.list[str]:
        """Untag a name, or delete an image given by id; collect unreferenced blobs.

        Returns the ids of images that were deleted (empty when only a name went).
        """
        with self._locked() as index:
            images = index["images"]
            image_id = self._find_id(ref, images)
            entry = images[image_id]
            removed: builtins.list[str] = []
            try:
                full = str(parse_reference(ref))
            except ImageError:
                full = ""
            if full in entry.get("names", []) and len(entry["names"]) > 1:
                entry["names"].remove(full)
            else:
                del images[image_id]
                self._drop_rootfs(image_id)
                removed.append(image_id)
            self._gc(images)
            atomic_write_json(self.index_path, index)
            return removed

    def _drop_rootfs(self, image_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.rootfs_path(image_id).unlink()

    def _gc(self, images: dict) -> None:
        """Delete every blob that no remaining image references. Caller holds the lock."""
        keep: set[str] = set()
        for image_id, entry in images.items():
            keep.add(image_id.split(":", 1)[1])
            keep.add(entry["manifest"].split(":", 1)[1])
            try:
                manifest = oci.read_manifest(
                    self.blob_path(entry["manifest"]).read_bytes(), "manifest"
                )
            except (OSError, ImageError):
                return  # a damaged store: better keep garbage than lose a layer
            keep.update(la.digest.split(":", 1)[1] for la in oci.manifest_layers(manifest))
        self._drop_stale_staging()
        blob_dir = self.root / "blobs" / "sha256"
        if not blob_dir.is_dir():
            return
        for path in blob_dir.iterdir():
            if path.name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _drop_stale_staging(self, max_age: float = 86400.0) -> None:
        """Staging folders of processes killed mid-import; live ones are young."""
        now = time.time()
        for stage in (self.root / "tmp").glob("stage-*"):
            with contextlib.suppress(OSError):
                if now - stage.stat().st_mtime > max_age:
                    shutil.rmtree(stage, ignore_errors=True)

    # ---- adding images (implemented in sibling modules) ------------------------------

    def import_archive(self, path: str | os.PathLike, name: str | None = None) -> builtins.list[Image]:
        """Import an OCI image layout (dir or tar) or a `docker save` tar."""
        from ember.image.archive import import_archive

        return import_archive(self, Path(path), name)

    def import_rootfs(
        self,
        path: str | os.PathLike,
        name: str,
        cmd: builtins.list[str] | None = None,
        env: builtins.list[str] | None = None,
        workdir: str | None = None,
    ) -> Image:
        """Make a one-layer image from a directory or tar, like `docker import`."""
        from ember.image.rootfs_import import import_rootfs

        return import_rootfs(self, Path(path), name, cmd=cmd, env=env, workdir=workdir)

    def pull(self, ref: str, progress: bool = False) -> Image:
        """Pull ``ref`` (linux/amd64) from its OCI distribution registry."""
        from ember.image.registry import pull

        return pull(self, ref, progress=progress)


__all__ = ["Image", "ImageStore", "Pending"]
