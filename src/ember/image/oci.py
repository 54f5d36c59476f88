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
from ember.image import schema

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
    """Parse a JSON object; any failure (nesting too deep included) is one ImageError."""
    try:
        doc = json.loads(data)
    except RecursionError:
        raise ImageError(f"{what}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise ImageError(f"{what}: not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: expected a JSON object, not {type(doc).__name__}")
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
    """Validate an untrusted image manifest (not an index) against the spec's types."""
    doc = load_json(data, what)
    schema.validate(doc, schema.MANIFEST, what)
    return doc


def read_manifest(data: bytes, what: str) -> dict:
    """A manifest already in the store (validated when it came in): check only its shape.

    Kept lenient so that images committed by an older Ember still load.
    """
    doc = load_json(data, what)
    config, layers = doc.get("config"), doc.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise ImageError(f"{what}: manifest lacks config or layers")
    check_digest(config.get("digest"), f"{what} config")
    for layer in layers:
        if not isinstance(layer, dict):
            raise ImageError(f"{what}: malformed layer descriptor")
        check_digest(layer.get("digest"), f"{what} layer")
    return doc


def parse_index(data: bytes, what: str) -> dict:
    """Validate an untrusted image index / manifest list against the spec's types."""
    doc = load_json(data, what)
    schema.validate(doc, schema.INDEX, what)
    return doc


def parse_config(data: bytes, what: str) -> dict:
    """Validate an untrusted image config: what Ember and ``ember images`` read is typed."""
    doc = load_json(data, what)
    schema.validate(doc, schema.CONFIG, what)
    return doc


def manifest_layers(manifest: dict) -> list[Layer]:
    return [
        Layer(entry["digest"], entry.get("mediaType", OCI_LAYER), _size_or_zero(entry))
        for entry in manifest["layers"]
    ]


def _size_or_zero(entry: dict) -> int:
    size = entry.get("size", 0)
    return size if isinstance(size, int) and not isinstance(size, bool) else 0


def select_platform(index: dict, what: str) -> dict:
    """Pick the linux/amd64 entry of a validated manifest list / OCI index (the only guest we run)."""
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"{what}: manifest list is empty")
    candidates = [e for e in entries if isinstance(e, dict)]
    for entry in candidates:
        if platform_of(entry) == PLATFORM:
            check_digest(entry.get("digest"), what)
            return entry
    found = sorted("{}/{}".format(*platform_of(e)) for e in candidates)
    raise ImageError(f"{what}: no linux/amd64 image in the manifest list (has {', '.join(found)})")


def platform_of(entry: dict) -> tuple[str, str]:
    """(os, architecture) of a descriptor; "?" for what it does not say."""
    platform = entry.get("platform")
    if not isinstance(platform, dict):
        return "?", "?"
    os_name, arch = platform.get("os"), platform.get("architecture")
    return (os_name if isinstance(os_name, str) else "?", arch if isinstance(arch, str) else "?")


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
