"""OCI / Docker image data: media types, manifests, and the Image record.

Registries, OCI layouts and `docker save` archives spell the same things in two
dialects (Docker schema2 and OCI). Everything past this module sees one shape:
a manifest dict with ``config`` and ``layers`` descriptors, validated here so a
malformed document fails with one clear message instead of a KeyError later.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from ember.errors import ImageError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
PLATFORM = ("linux", "amd64")

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: object, what: str) -> str:
    """Accept only sha256 digests: they name files in the store, so nothing else may pass."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ImageError(f"{what}: invalid or unsupported digest {digest!r}")
    return digest


@dataclass(frozen=True)
class Layer:
    digest: str
    media_type: str
    size: int


@dataclass
class Image:
    """An image in the store; ``id`` is the config digest, as in Docker."""

    id: str
    manifest_digest: str
    names: list[str]
    config: dict
    layers: list[Layer]
    size: int
    repo_digests: list[str] = field(default_factory=list)

    @property
    def hex(self) -> str:
        return self.id.split(":", 1)[1]

    @property
    def short_id(self) -> str:
        return self.hex[:12]


def load_json(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageError(f"{what}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: expected a JSON object")
    return doc


def media_type_of(doc: dict, fallback: str | None = None) -> str:
    """A document's media type: its own field first, else what the transport said."""
    mt = doc.get("mediaType") or fallback or ""
    if not mt and "manifests" in doc:
        mt = OCI_INDEX
    elif not mt and "layers" in doc:
        mt = OCI_MANIFEST
    return mt.split(";")[0].strip()


def parse_manifest(data: bytes, what: str) -> dict:
    """Validate an image manifest (not an index) and return it."""
    doc = load_json(data, what)
    if doc.get("schemaVersion") == 1:
        raise ImageError(f"{what}: Docker schema 1 manifests are not supported")
    if doc.get("schemaVersion") != 2:
        raise ImageError(f"{what}: unsupported manifest schemaVersion {doc.get('schemaVersion')!r}")
    config = doc.get("config")
    layers = doc.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise ImageError(f"{what}: manifest lacks config or layers")
    check_digest(config.get("digest"), f"{what} config")
    for layer in layers:
        if not isinstance(layer, dict):
            raise ImageError(f"{what}: malformed layer descriptor")
        check_digest(layer.get("digest"), f"{what} layer")
    return doc


def manifest_layers(manifest: dict) -> list[Layer]:
    return [
        Layer(entry["digest"], entry.get("mediaType", OCI_LAYER), int(entry.get("size", 0)))
        for entry in manifest["layers"]
    ]


def select_platform(index: dict, what: str) -> dict:
    """Pick the linux/amd64 entry of a manifest list / OCI index (the only guest we run)."""
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"{what}: manifest list is empty")
    candidates = [e for e in entries if isinstance(e, dict)]
    for entry in candidates:
        platform = entry.get("platform") or {}
        if (platform.get("os"), platform.get("architecture")) == PLATFORM:
            check_digest(entry.get("digest"), what)
            return entry
    found = sorted(
        "{}/{}".format(
            (e.get("platform") or {}).get("os", "?"),
            (e.get("platform") or {}).get("architecture", "?"),
        )
        for e in candidates
    )
    raise ImageError(f"{what}: no linux/amd64 image in the manifest list (has {', '.join(found)})")


def make_manifest(config_digest: str, config_size: int, layers: list[Layer]) -> bytes:
    """An OCI manifest for images we assemble ourselves (docker save, rootfs import)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": la.media_type, "digest": la.digest, "size": la.size} for la in layers
        ],
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
