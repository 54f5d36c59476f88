"""Helpers for tests that need container images, made here in Python.

The machine cannot reach public registries, so tests build their images from
Debian's busybox-static (plus hand-made layers with whiteouts), write them as
OCI layouts or `docker save` tars, and can push them to a real
`docker-registry` started on loopback (optionally behind a real bearer-token
server with TLS). Other test modules import these helpers.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from ember.image.auth import parse_challenge
from ember.image.demo import build_busybox_rootfs

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---- layers ------------------------------------------------------------------------


@dataclass
class Entry:
    """One tar member: kind is file, dir, symlink, hardlink, char, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    dev: tuple[int, int] = (0, 0)


def file(
    name: str, data: bytes | str = b"", mode: int = 0o644, uid: int = 0, gid: int = 0
) -> Entry:
    return Entry(
        name, "file", data.encode() if isinstance(data, str) else data, mode=mode, uid=uid, gid=gid
    )


def directory(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(name, "dir", mode=mode, uid=uid, gid=gid)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, "symlink", target=target, mode=0o777)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, "hardlink", target=target)


def chardev(name: str, major: int, minor: int, mode: int = 0o666) -> Entry:
    return Entry(name, "char", mode=mode, dev=(major, minor))


def whiteout(path: str) -> Entry:
    parent, _, base = path.rstrip("/").rpartition("/")
    return file(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque(dirpath: str) -> Entry:
    return file(f"{dirpath.rstrip('/')}/.wh..wh..opq")


_KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return subprocess.run(
            ["zstd", "-q", "-c"], input=data, capture_output=True, check=True
        ).stdout
    return data


def layer(entries: list[Entry], how: str = "gzip") -> bytes:
    """A layer tar from entries, compressed with gzip, zstd or not at all ("none")."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _KINDS[e.kind]
            info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, 1_700_000_000
            info.linkname = e.target
            info.devmajor, info.devminor = e.dev
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return compress(buf.getvalue(), how)


def layer_from_dir(root: Path, how: str = "gzip") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname=".")
    return compress(buf.getvalue(), how)


@functools.cache
def busybox_layer(how: str = "gzip") -> bytes:
    """The busybox rootfs as one layer (built once per test session)."""
    with tempfile.TemporaryDirectory(prefix="imagetools-") as tmp:
        return layer_from_dir(build_busybox_rootfs(Path(tmp) / "rootfs"), how)


def _sniff(data: bytes) -> str:
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


def _uncompressed(data: bytes) -> bytes:
    kind = _sniff(data)
    if kind == "gzip":
        return gzip.decompress(data)
    if kind == "zstd":
        return subprocess.run(
            ["zstd", "-q", "-dc"], input=data, capture_output=True, check=True
        ).stdout
    return data


# ---- images --------------------------------------------------------------------------


@dataclass
class TestImage:
    """An image as bytes: its config, layers and manifest, ready to write or push."""

    __test__ = False  # not a pytest test class

    config: bytes
    layers: list[bytes]
    manifest: bytes
    blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return digest_of(self.config)

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    @property
    def config_doc(self) -> dict:
        return json.loads(self.config)


def make_image(
    layers: list[bytes],
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
    env: list[str] | None = None,
    workdir: str | None = None,
    user: str | None = None,
    arch: str = "amd64",
    docker: bool = False,
) -> TestImage:
    """Assemble an image; ``docker=True`` uses Docker schema2 media types."""
    run: dict = {"Env": env or ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}
    for key, value in (
        ("Cmd", cmd),
        ("Entrypoint", entrypoint),
        ("WorkingDir", workdir),
        ("User", user),
    ):
        if value is not None:
            run[key] = value
    config = {
        "created": "2024-01-02T03:04:05Z",
        "architecture": arch,
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [digest_of(_uncompressed(la)) for la in layers]},
    }
    config_bytes = json.dumps(config).encode()
    layer_type = (
        (lambda d: "application/vnd.docker.image.rootfs.diff.tar.gzip")
        if docker
        else (lambda d: LAYER_MEDIA[_sniff(d)])
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": {
            "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
            "digest": digest_of(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {"mediaType": layer_type(la), "digest": digest_of(la), "size": len(la)} for la in layers
        ],
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    blobs = {digest_of(b): b for b in [config_bytes, manifest_bytes, *layers]}
    return TestImage(config_bytes, layers, manifest_bytes, blobs)


def busybox_image(**kwargs: object) -> TestImage:
    kwargs.setdefault("cmd", ["sh"])
    return make_image([busybox_layer()], **kwargs)  # type: ignore[arg-type]


def write_oci_layout(
    dest: Path, images: list[tuple[TestImage, str | None]], as_tar: bool = False
) -> Path:
    """Write an OCI image layout folder (or a tar of it when ``as_tar``) with named images."""
    folder = dest.with_suffix("") if as_tar else dest
    blob_dir = folder / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for image, ref_name in images:
        for digest, data in image.blobs.items():
            (blob_dir / digest.split(":")[1]).write_bytes(data)
        entry = {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest)}
        if ref_name:
            entry["annotations"] = {"org.opencontainers.image.ref.name": ref_name}
        entries.append(entry)
    (folder / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (folder / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))
    if not as_tar:
        return folder
    with tarfile.open(dest, "w") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name)
    shutil.rmtree(folder)
    return dest


def busybox_rootfs(dest: Path) -> Path:
    """A busybox-static root filesystem folder (the demo image's content) at ``dest``."""
    return build_busybox_rootfs(dest)


def write_oci_layout_tar(
    dest: Path,
    layers: list[Path | bytes],
    ref: str | None = None,
    config: dict | None = None,
) -> Path:
    """An OCI layout tar of one image: each layer a rootfs folder (or layer bytes).

    ``config`` holds the run settings in OCI config spelling (Cmd, Entrypoint,
    Env, WorkingDir, User); ``ref`` becomes the image's name when imported.
    """
    blobs = [layer_from_dir(la) if isinstance(la, Path) else la for la in layers]
    run = config or {}
    img = make_image(
        blobs,
        cmd=run.get("Cmd"),
        entrypoint=run.get("Entrypoint"),
        env=run.get("Env"),
        workdir=run.get("WorkingDir"),
        user=run.get("User"),
    )
    return write_oci_layout(dest, [(img, ref)], as_tar=True)


def write_docker_save(dest: Path, image: TestImage, repo_tags: list[str]) -> Path:
    """Write a legacy `docker save` tar: manifest.json, <id>.json, <layer>/layer.tar."""
    members: dict[str, bytes] = {}
    config_name = image.id.split(":")[1] + ".json"
    members[config_name] = image.config
    layer_names = []
    for i, blob in enumerate(image.layers):
        name = f"{hashlib.sha256(f'{image.id}-{i}'.encode()).hexdigest()}/layer.tar"
        members[name] = _uncompressed(blob)
        layer_names.append(name)
    members["manifest.json"] = json.dumps(
        [{"Config": config_name, "RepoTags": repo_tags, "Layers": layer_names}]
    ).encode()
    with tarfile.open(dest, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


# ---- a real registry on loopback ------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Registry:
    host: str  # "127.0.0.1:PORT"
    proc: subprocess.Popen
    log: Path
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"


@contextmanager
def run_registry(
    workdir: Path,
    token_auth: dict | None = None,
    tls: Pki | None = None,
    ip: str = "127.0.0.1",
) -> Iterator[Registry]:
    """Start Debian's docker-registry on <ip>:<free port>; always stopped on exit.

    ``token_auth``: {"realm", "service", "issuer", "rootcertbundle"} for bearer auth.
    ``tls``: serve HTTPS with the PKI's server certificate (valid for 127.0.0.1 and .2).
    """
    port = free_port(ip)
    storage = workdir / "registry-data"
    storage.mkdir(parents=True, exist_ok=True)
    lines = [
        "version: 0.1",
        "log:",
        "  level: error",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        f"  filesystem:\n    rootdirectory: {storage}",
        "  delete:\n    enabled: true",
        "http:",
        f"  addr: {ip}:{port}",
        f"  secret: {uuid.uuid4().hex}",
    ]
    if tls:
        lines += ["  tls:", f"    certificate: {tls.server_cert}", f"    key: {tls.server_key}"]
    if token_auth:
        lines += ["auth:", "  token:"] + [f"    {k}: {v}" for k, v in token_auth.items()]
    config = workdir / "registry.yml"
    config.write_text("\n".join(lines) + "\n")
    log = workdir / "registry.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    reg = Registry(f"{ip}:{port}", proc, log, "https" if tls else "http")
    verify = str(tls.ca_pem) if tls else True
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {log.read_text()[-2000:]}")
            try:
                if requests.get(f"{reg.url}/v2/", timeout=1, verify=verify).status_code in (
                    200,
                    401,
                ):
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("docker-registry did not start within 15 s")
            time.sleep(0.05)
        yield reg
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class _Pusher:
    """Minimal registry client for pushing, with the same bearer flow a user's docker has."""

    def __init__(self, host: str, auth: tuple[str, str] | None, ca: str | None) -> None:
        self.base = host if "://" in host else f"http://{host}"  # "HOST:PORT" or a URL
        self.auth = auth
        self.verify = ca or True
        self.session = requests.Session()
        self.token: str | None = None

    def request(self, method: str, url: str, **kw: object) -> requests.Response:
        for _ in range(2):
            headers = dict(kw.pop("headers", {}) or {})  # type: ignore[call-overload]
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            resp = self.session.request(
                method, url, headers=headers, timeout=30, verify=self.verify, **kw
            )  # type: ignore[arg-type]
            if resp.status_code != 401:
                return resp
            kw["headers"] = headers
            _, params = parse_challenge(resp.headers["WWW-Authenticate"])
            tok = requests.get(
                params["realm"],
                params={"service": params["service"], "scope": params.get("scope", "")},
                auth=self.auth,
                verify=self.verify,
                timeout=30,
            )
            tok.raise_for_status()
            self.token = tok.json()["token"]
        return resp

    def put_blob(self, repo: str, data: bytes) -> None:
        digest = digest_of(data)
        if self.request("HEAD", f"{self.base}/v2/{repo}/blobs/{digest}").status_code == 200:
            return
        start = self.request("POST", f"{self.base}/v2/{repo}/blobs/uploads/")
        assert start.status_code == 202, start.text
        location = start.headers["Location"]
        if location.startswith("/"):
            location = self.base + location
        sep = "&" if "?" in location else "?"
        done = self.request(
            "PUT",
            f"{location}{sep}digest={digest}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert done.status_code == 201, done.text

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> None:
        resp = self.request(
            "PUT",
            f"{self.base}/v2/{repo}/manifests/{ref}",
            data=body,
            headers={"Content-Type": media_type},
        )
        assert resp.status_code == 201, resp.text


def push_image(
    host: str,
    repo: str,
    tag: str | None,
    image: TestImage,
    auth: tuple[str, str] | None = None,
    ca: str | None = None,
) -> None:
    """Push blobs (POST upload, PUT ?digest=) then the manifest, by tag or by digest.

    ``host`` is "HOST:PORT" (plain HTTP) or a base URL such as ``https://HOST:PORT``.
    """
    pusher = _Pusher(host, auth, ca)
    for data in [image.config, *image.layers]:
        pusher.put_blob(repo, data)
    media = json.loads(image.manifest)["mediaType"]
    pusher.put_manifest(repo, tag or image.digest, image.manifest, media)


def push_index(
    host: str, repo: str, tag: str, images: list[tuple[TestImage, str]], docker: bool = False
) -> bytes:
    """Push several images and a manifest list naming each one's arch; return the list."""
    entries = []
    for image, arch in images:
        push_image(host, repo, None, image)
        entries.append(
            {
                "mediaType": json.loads(image.manifest)["mediaType"],
                "digest": image.digest,
                "size": len(image.manifest),
                "platform": {"architecture": arch, "os": "linux"},
            }
        )
    media = DOCKER_LIST if docker else OCI_INDEX
    body = json.dumps({"schemaVersion": 2, "mediaType": media, "manifests": entries}).encode()
    _Pusher(host, None, None).put_manifest(repo, tag, body, media)
    return body


# ---- a bearer-token server with real TLS ----------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Pki:
    """A test CA, a TLS server cert for 127.0.0.1/.2, and a token-signing key/cert."""

    dir: Path
    ca_pem: Path
    server_cert: Path
    server_key: Path
    signing_cert: Path
    signing_key: rsa.RSAPrivateKey
    signing_der: bytes


def make_pki(dest: Path) -> Pki:
    dest.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key, issuer_name, issuer_key, ca: bool, san: bool):  # type: ignore[no-untyped-def]
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_name or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "127.0.0.2")]
                ),
                critical=False,
            )
        return builder.sign(issuer_key or key, hashes.SHA256())

    def new_key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    ca_key = new_key()
    ca = cert("ember test CA", ca_key, None, None, ca=True, san=False)
    srv_key = new_key()
    srv = cert("127.0.0.1", srv_key, ca.subject, ca_key, ca=False, san=True)
    sign_key = new_key()
    sign = cert("ember token signer", sign_key, None, None, ca=True, san=False)
    pem = serialization.Encoding.PEM
    paths = {
        "ca.pem": ca.public_bytes(pem),
        "server.pem": srv.public_bytes(pem),
        "server.key": srv_key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ),
        "signing.pem": sign.public_bytes(pem),
    }
    for name, data in paths.items():
        (dest / name).write_bytes(data)
    return Pki(
        dest,
        dest / "ca.pem",
        dest / "server.pem",
        dest / "server.key",
        dest / "signing.pem",
        sign_key,
        sign.public_bytes(serialization.Encoding.DER),
    )


class TokenServer:
    """An HTTPS token endpoint (Docker token auth spec) that signs RS256 JWTs.

    It grants the requested actions to users with the right password and answers
    401 to anyone else, like a real auth server would.
    """

    service = "ember-test-registry"
    issuer = "ember-test-issuer"

    def __init__(self, pki: Pki, users: dict[str, str]) -> None:
        self.pki = pki
        self.users = users
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                user = outer._check(self.headers.get("Authorization", ""))
                outer.requests.append({"path": url.path, "query": query, "user": user})
                if url.path != "/token" or user is None:
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"details":"invalid credentials"}')
                    return
                body = json.dumps(
                    {"token": outer.sign(user, query.get("scope", "")), "expires_in": 300}
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.server_cert, pki.server_key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        return f"https://127.0.0.1:{self.httpd.server_address[1]}/token"

    def registry_auth(self) -> dict:
        return {
            "realm": self.realm,
            "service": self.service,
            "issuer": self.issuer,
            "rootcertbundle": str(self.pki.signing_cert),
        }

    def _check(self, header: str) -> str | None:
        if not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return None
        return user if self.users.get(user) == password else None

    def sign(self, user: str, scope: str) -> str:
        access = []
        for item in scope.split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self.pki.signing_der).decode()],
        }
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 60,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = self.pki.signing_key.sign(
            signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{signing_input}.{_b64url(signature)}"

    def __enter__(self) -> TokenServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
