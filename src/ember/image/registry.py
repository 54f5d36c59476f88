"""Pull images from an OCI distribution (Docker registry v2) endpoint.

Only linux/amd64 is fetched (the only guest Ember runs). Manifests are verified
against the digest we asked for or the registry's Docker-Content-Digest, blobs
against their descriptors, and the image is committed to the store only once
everything is verified. Blobs the store already has are not downloaded again.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
from collections.abc import Iterator
from typing import TYPE_CHECKING

import requests
import urllib3
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)

from ember.errors import ImageError
from ember.image import oci
from ember.image.auth import Authorizer, make_session, registry_error, short_reason
from ember.image.blobs import Pending, bounded_chunks
from ember.image.oci import Image
from ember.image.reference import Reference, parse_reference

if TYPE_CHECKING:
    from ember.image.store import ImageStore

MANIFEST_ACCEPT = ", ".join([oci.OCI_INDEX, oci.DOCKER_LIST, oci.OCI_MANIFEST, oci.DOCKER_MANIFEST])
MANIFEST_LIMIT = 4 << 20
TIMEOUT = (15, 120)  # connect, read (seconds)


def is_local(registry: str) -> bool:
    """Registries on the loopback name/addresses speak plain HTTP, like Docker's default."""
    host = (
        registry.rsplit(":", 1)[0] if not registry.startswith("[") else registry[1:].split("]")[0]
    )
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host)) in ("127.0.0.1", "::1")
    return False


def endpoint(ref: Reference) -> str:
    host = "registry-1.docker.io" if ref.registry == "docker.io" else ref.registry
    scheme = "http" if is_local(ref.registry) else "https"
    return f"{scheme}://{host}/v2/{ref.repository}"


class RegistryClient:
    def __init__(self, ref: Reference) -> None:
        self.ref = ref
        self.base = endpoint(ref)
        self.session = make_session()
        self.auth = Authorizer(self.session, ref.registry, ref.repository)

    def close(self) -> None:
        self.session.close()

    def _get(self, url: str, headers: dict[str, str], stream: bool = False) -> requests.Response:
        for attempt in range(2):
            hdrs = dict(headers)
            if self.auth.header:
                hdrs["Authorization"] = self.auth.header
            try:
                resp = self.session.get(url, headers=hdrs, stream=stream, timeout=TIMEOUT)
            except requests.exceptions.SSLError as exc:
                raise ImageError(
                    f"TLS error talking to registry {self.ref.registry}: {short_reason(exc)}"
                    " (set EMBER_REGISTRY_CA to trust a private CA)"
                ) from None
            except requests.RequestException as exc:
                raise ImageError(
                    f"cannot reach registry {self.ref.registry}: {short_reason(exc)}"
                ) from None
            if resp.status_code != 401:
                return resp
            resp.close()
            if attempt:
                raise self.auth.denied()
            self.auth.challenge(resp)
        raise AssertionError("unreachable")

    def manifest(self, reference: str, expected: str | None) -> tuple[bytes, str, str]:
        """Fetch a manifest or index; return (body, media type, digest)."""
        resp = self._get(
            f"{self.base}/manifests/{reference}", {"Accept": MANIFEST_ACCEPT}, stream=True
        )
        with resp:
            if resp.status_code == 404:
                raise ImageError(f"{self.ref}: manifest unknown ({registry_error(resp)})")
            if resp.status_code != 200:
                raise ImageError(
                    f"{self.ref}: registry refused the manifest: {registry_error(resp)}"
                )
            body = resp.raw.read(MANIFEST_LIMIT + 1, decode_content=True)
        if len(body) > MANIFEST_LIMIT:
            raise ImageError(f"{self.ref}: manifest larger than {MANIFEST_LIMIT} bytes")
        digest = oci.sha256_digest(body)
        claimed = expected or resp.headers.get("Docker-Content-Digest", "")
        if claimed.startswith("sha256:") and claimed != digest:
            raise ImageError(
                f"{self.ref}: manifest digest mismatch (expected {claimed}, got {digest})"
            )
        doc = oci.load_json(body, f"{self.ref} manifest")
        return body, oci.media_type_of(doc, resp.headers.get("Content-Type")), digest

    def blob(self, digest: str, size: int, progress: Progress | None) -> Iterator[bytes]:
        """Stream a blob, never reading past its descriptor's ``size``; the caller verifies it.

        A registry that announces or sends more is cut off at once: a hostile
        one cannot make us download (or store) more than the manifest declared.
        """
        resp = self._get(f"{self.base}/blobs/{digest}", {"Accept-Encoding": "identity"}, stream=True)
        with resp:
            if resp.status_code != 200:
                raise ImageError(f"{self.ref}: cannot fetch blob {digest}: {registry_error(resp)}")
            announced = resp.headers.get("Content-Length", "")
            if announced.isdigit() and int(announced) > size:
                raise ImageError(
                    f"{self.ref}: blob {digest} is {announced} bytes, larger than the"
                    f" {size} bytes its descriptor says"
                )
            task = progress.add_task(digest[7:19], total=size or None) if progress else None
            try:
                read = functools.partial(resp.raw.read, decode_content=True)
                for chunk in bounded_chunks(read, size):
                    if progress is not None and task is not None:
                        progress.update(task, advance=len(chunk))
                    yield chunk
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise ImageError(
                    f"{self.ref}: download of blob {digest} failed: {short_reason(exc)}"
                ) from None


def pull(store: ImageStore, ref_text: str, progress: bool = False) -> Image:
    ref = parse_reference(ref_text)
    client = RegistryClient(ref)
    try:
        body, media_type, top_digest = client.manifest(
            ref.digest or ref.tag or "latest", ref.digest
        )
        if media_type in oci.INDEX_TYPES:
            entry = oci.select_platform(oci.parse_index(body, f"{ref} index"), f"{ref}")
            body, media_type, _ = client.manifest(entry["digest"], entry["digest"])
        if media_type and media_type not in oci.MANIFEST_TYPES:
            raise ImageError(f"{ref}: unsupported manifest type {media_type}")
        manifest = oci.parse_manifest(body, f"{ref} manifest")
        with store.staging() as staging:
            mdigest, _ = staging.add_bytes(body, None, "manifest")
            # parse_manifest made every size a required int64, so each blob is bounded.
            blobs = [(manifest["config"]["digest"], manifest["config"]["size"])]
            blobs += [(la.digest, la.size) for la in oci.manifest_layers(manifest)]
            bar = _progress() if progress else None
            with bar or contextlib.nullcontext():
                for digest, size in blobs:
                    if not staging.has(digest):
                        staging.add_chunks(
                            client.blob(digest, size, bar), digest, f"{ref}: blob {digest}", size
                        )
                    if digest == blobs[0][0]:  # the config: refuse a bad one before any layer
                        oci.parse_config(staging.read(digest), f"{ref}: config {digest}")
            pending = Pending(
                mdigest,
                names=[f"{ref.name}:{ref.tag}"] if ref.tag else [],
                repo_digests=[f"{ref.name}@{top_digest}"],
            )
            return store.commit(staging, [pending])[0]
    finally:
        client.close()


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
