"""Where the webhook gets namespace labels from.

An AdmissionReview for a pod names the namespace but does not carry its
labels, and namespace-label policy needs them. Two sources:

* :class:`KubeNamespaces` reads ``GET /api/v1/namespaces/{name}`` from the
  API server with the pod's service-account token (in-cluster), caching each
  answer for a short TTL so a burst of pods costs one request;
* :class:`FileNamespaces` reads a YAML/JSON file ``{namespace: {label: value}}``
  (for tests, or clusters where the webhook may not read namespaces), and
  re-reads it when it changes.

Both always add ``kubernetes.io/metadata.name``, which the API server sets on
every namespace.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from urllib.parse import quote

import requests
import yaml

from ember.errors import EmberError

NAME_LABEL = "kubernetes.io/metadata.name"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class NamespaceLookupError(EmberError):
    """Namespace labels could not be had; the pod cannot be judged."""


class NoNamespaces:
    """No label source: only the name label, so label rules never match."""

    def labels(self, namespace: str) -> dict[str, str]:
        return {NAME_LABEL: namespace}


def _check_label_map(raw: object, where: str) -> dict[str, dict[str, str]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
            isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
            for v in raw.values()):
        raise NamespaceLookupError(f"{where}: expected {{namespace: {{label: value}}}}")
    return {str(k): dict(v) for k, v in raw.items()}


class FileNamespaces:
    """Labels from a file, re-read when its mtime changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime = -1.0
        self._data = self._read()  # fail at start-up, not on the first pod

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            st = self.path.stat()
            raw = yaml.safe_load(self.path.read_text())
        except OSError as exc:
            raise NamespaceLookupError(
                f"namespace labels {self.path}: {exc.strerror or exc}") from None
        except yaml.YAMLError:
            raise NamespaceLookupError(
                f"namespace labels {self.path}: not valid YAML or JSON") from None
        self._mtime = st.st_mtime
        return _check_label_map(raw, f"namespace labels {self.path}")

    def labels(self, namespace: str) -> dict[str, str]:
        with self._lock:
            try:
                if self.path.stat().st_mtime != self._mtime:
                    self._data = self._read()
            except (OSError, NamespaceLookupError):
                pass  # keep serving the last good copy while the file is rewritten
            found = dict(self._data.get(namespace, {}))
        found[NAME_LABEL] = namespace
        return found


class KubeNamespaces:
    """Labels read from the Kubernetes API, cached for ``ttl`` seconds."""

    def __init__(self, server: str, token_file: str | Path, ca_file: str | Path | None,
                 ttl: float = 30.0, timeout: float = 2.0) -> None:
        self.server = server.rstrip("/")
        self.token_file = Path(token_file)
        self.verify: str | bool = str(ca_file) if ca_file else True
        self.ttl = ttl
        self.timeout = timeout
        self._cache: dict[str, tuple[float, dict[str, str]]] = {}
        self._lock = threading.Lock()
        if not self.token_file.is_file():
            raise NamespaceLookupError(f"kube api: token file {self.token_file} does not exist")

    @classmethod
    def in_cluster(cls) -> KubeNamespaces:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise NamespaceLookupError(
                "kube api: not in a cluster (KUBERNETES_SERVICE_HOST is not set)")
        if ":" in host:
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", SA_DIR / "token", SA_DIR / "ca.crt")

    def labels(self, namespace: str) -> dict[str, str]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(namespace)
        if hit and now - hit[0] < self.ttl:
            return dict(hit[1])
        # The token is re-read every time: bound service-account tokens rotate.
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise NamespaceLookupError(f"kube api: token file {self.token_file}: "
                                       f"{exc.strerror or exc}") from None
        url = f"{self.server}/api/v1/namespaces/{quote(namespace, safe='')}"
        try:
            # A plain get per miss: misses are rare (TTL cache) and a shared
            # Session is not guaranteed thread-safe.
            resp = requests.get(url, timeout=self.timeout, verify=self.verify, headers={
                "Authorization": f"Bearer {token}", "Accept": "application/json"})
        except requests.RequestException as exc:
            raise NamespaceLookupError(f"kube api: cannot read namespace {namespace}: "
                                       f"{type(exc).__name__}") from None
        if resp.status_code != 200:
            raise NamespaceLookupError(f"kube api: reading namespace {namespace} gave HTTP "
                                       f"{resp.status_code}")
        try:
            labels = resp.json().get("metadata", {}).get("labels") or {}
        except (ValueError, AttributeError):
            raise NamespaceLookupError(f"kube api: namespace {namespace}: not JSON") from None
        labels = {str(k): str(v) for k, v in labels.items()}
        labels[NAME_LABEL] = namespace
        with self._lock:
            self._cache[namespace] = (now, labels)
        return dict(labels)
