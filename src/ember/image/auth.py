"""Registry credentials, TLS trust and the WWW-Authenticate dance.

Registries answer an anonymous request with 401 and a challenge; for
``Bearer realm=...,service=...,scope=...`` we fetch a token from the realm
(sending the user's password there only if the realm is https or on the
registry's own host: a plain-http realm elsewhere is refused) and retry.
Credentials come from ``EMBER_REGISTRY_AUTH=user:pass`` or a Docker-style
``~/.docker/config.json``. TLS uses the system CA store plus an optional
``EMBER_REGISTRY_CA`` file, so a private registry's CA can be trusted without
touching the host's store.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from ember.errors import ImageError

_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
DOCKER_HUB_KEYS = (
    "https://index.docker.io/v1/",
    "index.docker.io",
    "docker.io",
    "registry-1.docker.io",
)


class _TrustAdapter(HTTPAdapter):
    """Verify TLS against the system store (not certifi's) plus an optional extra CA."""

    def __init__(self, extra_ca: str | None) -> None:
        self._ctx = ssl.create_default_context()
        if extra_ca:
            try:
                self._ctx.load_verify_locations(cafile=extra_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ImageError(
                    f"EMBER_REGISTRY_CA={extra_ca}: cannot load CA file ({exc})"
                ) from None
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["ssl_context"] = self._ctx
        return super().init_poolmanager(*args, **kwargs)


def make_session() -> requests.Session:
    session = requests.Session()
    session.mount("https://", _TrustAdapter(os.environ.get("EMBER_REGISTRY_CA") or None))
    session.headers["User-Agent"] = "ember"
    return session


def credentials_for(registry: str) -> tuple[str, str] | None:
    """(user, password) for a registry host, or None for anonymous access."""
    env = os.environ.get("EMBER_REGISTRY_AUTH")
    if env:
        user, sep, password = env.partition(":")
        if not sep or not user:
            raise ImageError("EMBER_REGISTRY_AUTH must be user:password")
        return user, password
    config_dir = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    path = Path(config_dir) / "config.json"
    try:
        auths = json.loads(path.read_text()).get("auths") or {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        raise ImageError(f"{path}: unreadable docker config ({exc})") from None
    keys = [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/"]
    if registry == "docker.io":
        keys = list(DOCKER_HUB_KEYS)
    for key in keys:
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise ImageError(
                    f"{path}: auth entry for {key} is not base64 user:password"
                ) from None
            return user, password
        if entry.get("username"):
            return entry["username"], entry.get("password", "")
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split ``Bearer realm="x",service="y"`` into ("bearer", {realm: x, service: y})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM_RE.finditer(rest)
    }
    return scheme.lower(), params


def registry_error(resp: requests.Response) -> str:
    """The registry's own error text (OCI error body), or the HTTP status."""
    try:
        errors = resp.json().get("errors") or []
        text = "; ".join(
            str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict)
        )
    except (ValueError, AttributeError):
        text = ""
    return text or f"HTTP {resp.status_code}"


class Authorizer:
    """Produces the Authorization header for one registry, refreshing it on 401."""

    def __init__(self, session: requests.Session, registry: str, repository: str) -> None:
        self.session = session
        self.registry = registry
        self.repository = repository
        self.creds = credentials_for(registry)
        self.header: str | None = None

    def _need_login(self) -> ImageError:
        return ImageError(
            f"registry {self.registry} requires authentication for {self.repository} "
            "(set EMBER_REGISTRY_AUTH=user:password or add it to ~/.docker/config.json)"
        )

    def challenge(self, resp: requests.Response) -> None:
        """React to a 401: compute a new Authorization header or explain why we cannot."""
        scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if not self.creds:
                raise self._need_login()
            raw = f"{self.creds[0]}:{self.creds[1]}".encode()
            self.header = "Basic " + base64.b64encode(raw).decode()
        elif scheme == "bearer" and params.get("realm"):
            self.header = "Bearer " + self._token(params)
        else:
            raise ImageError(
                f"registry {self.registry}: unsupported authentication challenge {scheme or 'none'!r}"
            )

    def _realm_may_have_credentials(self, realm: str) -> bool:
        """Only an https realm, or one on the registry's own host, may see the password.

        The realm comes from the registry's answer; over plain http it could name
        any host, and sending Basic credentials there would hand them out.
        """
        url = urlsplit(realm)
        if url.scheme == "https":
            return True
        return url.scheme == "http" and (url.hostname or "") == registry_hostname(self.registry)

    def _token(self, params: dict[str, str]) -> str:
        realm = params["realm"]
        if urlsplit(realm).scheme not in ("http", "https"):
            raise ImageError(f"registry {self.registry}: token realm {realm!r} is not an http(s) URL")
        if self.creds and not self._realm_may_have_credentials(realm):
            raise ImageError(
                f"registry {self.registry}: token realm {realm} is plain http on another host; "
                "refusing to send credentials there"
            )
        query = {"scope": params.get("scope") or f"repository:{self.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        try:
            resp = self.session.get(realm, params=query, auth=self.creds, timeout=30)
        except requests.RequestException as exc:
            raise ImageError(f"cannot reach token server {realm}: {short_reason(exc)}") from None
        if resp.status_code in (401, 403):
            if self.creds:
                raise ImageError(
                    f"registry {self.registry}: login failed for user {self.creds[0]!r} "
                    f"(token server answered {resp.status_code}: wrong username or password?)"
                )
            raise self._need_login()
        if resp.status_code != 200:
            raise ImageError(f"token server {realm} failed: {registry_error(resp)}")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise ImageError(f"token server {realm} returned no token")
        return token

    def denied(self) -> ImageError:
        """The error for a 401 that survives a fresh token."""
        if self.creds:
            return ImageError(
                f"registry {self.registry}: access to {self.repository} denied for user {self.creds[0]!r}"
            )
        return self._need_login()


def registry_hostname(registry: str) -> str:
    """The host part of a registry name: "[::1]:5000" -> "::1", "r.io:443" -> "r.io"."""
    if registry.startswith("["):
        return registry[1:].split("]", 1)[0]
    return registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry


def short_reason(exc: BaseException) -> str:
    """One line out of requests' nested exception text."""
    reason: BaseException | None = exc
    while reason is not None and reason.args and isinstance(reason.args[0], BaseException):
        reason = reason.args[0]
    text = str(getattr(reason, "reason", None) or reason or exc)
    text = " ".join(text.split())
    return text[:300]
