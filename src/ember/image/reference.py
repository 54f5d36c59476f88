"""Docker-style image references, parsed and normalized.

Users type short names ("busybox", "alpine:3.19", "localhost:5000/x/y@sha256:...");
the store and the registry client need one canonical spelling so that the same
image is never stored twice under two names. We follow Docker's rules: a first
path component containing "." or ":" (or equal to "localhost") is a registry
host, otherwise the registry is docker.io; single-component Docker Hub names
live under "library/"; a reference with neither tag nor digest means ":latest".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ember.errors import ImageError

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$"
)
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_MAX = 255


@dataclass(frozen=True)
class Reference:
    """A normalized reference: registry host, repository path, tag and/or digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The full repository name, e.g. ``docker.io/library/busybox``."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def familiar(self) -> str:
        """The short spelling Docker shows users (``busybox:latest``)."""
        return familiar_name(str(self))


def _bad(text: str, why: str) -> ImageError:
    return ImageError(f"invalid reference format: {text!r}: {why}")


def parse_reference(text: str) -> Reference:
    """Parse and normalize ``text``; raise ImageError on anything malformed."""
    if not isinstance(text, str) or not text:
        raise _bad(str(text), "empty reference")
    if text != text.strip() or any(c.isspace() for c in text):
        raise _bad(text, "contains whitespace")
    remainder, digest = text, None
    if "@" in remainder:
        remainder, digest = remainder.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise _bad(text, "digest must be sha256: followed by 64 lowercase hex digits")
    tag = None
    slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise _bad(text, f"invalid tag {tag!r}")
    if not remainder:
        raise _bad(text, "missing repository name")
    first, _, rest = remainder.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        registry, path = first, rest
        if not _DOMAIN_RE.match(registry):
            raise _bad(text, f"invalid registry host {registry!r}")
    else:
        registry, path = DEFAULT_REGISTRY, remainder
    if registry == "index.docker.io":
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    for component in path.split("/"):
        if not _PATH_COMPONENT_RE.match(component):
            if component.lower() != component and _PATH_COMPONENT_RE.match(component.lower()):
                raise _bad(text, "repository name must be lowercase")
            raise _bad(text, f"invalid repository component {component!r}")
    if len(registry) + 1 + len(path) > _NAME_MAX:
        raise _bad(text, f"repository name longer than {_NAME_MAX} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)


def normalize(text: str) -> str:
    """The canonical string form of a reference."""
    return str(parse_reference(text))


def familiar_name(full: str) -> str:
    """Shorten ``docker.io/library/x:t`` to ``x:t`` the way Docker displays it."""
    prefix = f"{DEFAULT_REGISTRY}/"
    if full.startswith(prefix):
        full = full[len(prefix) :]
        if full.startswith("library/") and "/" not in full[len("library/") :].split(":")[0]:
            full = full[len("library/") :]
    return full
