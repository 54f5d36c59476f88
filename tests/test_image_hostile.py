"""Hostile images, archives and registries (issue 11, point 5).

Each attack from the security review is replayed here: it must fail with one
line ``ember: error: ...`` and exit 125 (or an ImageError where no CLI command
reaches the code), and leave the image store and the flattened-image cache
exactly as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ember_bin
from imagetools import (
    OCI_INDEX,
    OCI_MANIFEST,
    compress,
    digest_of,
    directory,
    file,
    layer,
    make_image,
    whiteout,
    write_docker_save,
    write_oci_layout,
)

from ember.config import Config
from ember.errors import ImageError
from ember.image.store import ImageStore
from ember.storage import rootfs as rootfs_mod
from ember.storage.rootfs import flatten

pytestmark = pytest.mark.timeout(180)


# ---- the store, before and after ----------------------------------------------------------


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return Config(data_dir=tmp_path / "data", state_dir=tmp_path / "state")


@pytest.fixture
def store(cfg: Config, tmp_path: Path) -> ImageStore:
    """A store that already holds one image, flattened: the attacks must not touch it."""
    st = ImageStore(cfg)
    img = make_image([layer([directory("etc"), file("etc/hostname", "good")])], cmd=["true"])
    st.import_archive(write_oci_layout(tmp_path / "good", [(img, "localhost/good:1")]))
    flatten(st, st.resolve("localhost/good:1"))
    return st


def snapshot(cfg: Config) -> dict[str, tuple]:
    """Every path under the data dir with its type, mode and content hash."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(cfg.data_dir):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            digest: object = ""
            if stat.S_ISREG(st.st_mode) and st.st_size > 1 << 20:  # flattened images: sparse GiBs
                digest = (st.st_ino, st.st_size, st.st_blocks, st.st_mtime_ns)
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(cfg.data_dir))] = (st.st_mode, digest)
    return out


def ember_env(cfg: Config, tmp_path: Path, auth: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("EMBER_REGISTRY_AUTH", None)
    env.pop("EMBER_REGISTRY_CA", None)
    env["EMBER_DATA_DIR"], env["EMBER_STATE_DIR"] = str(cfg.data_dir), str(cfg.state_dir)
    docker_cfg = tmp_path / "docker-config"
    docker_cfg.mkdir(exist_ok=True)
    env["DOCKER_CONFIG"] = str(docker_cfg)
    if auth:
        env["EMBER_REGISTRY_AUTH"] = auth
    return env


def ember_fails(cfg: Config, tmp_path: Path, *args: str, auth: str | None = None) -> str:
    """Run the CLI; it must print exactly one ``ember: error:`` line and exit 125."""
    res = subprocess.run(
        [ember_bin(), *args], env=ember_env(cfg, tmp_path, auth),
        capture_output=True, text=True, timeout=120,
    )
    lines = res.stderr.splitlines()
    assert res.returncode == 125, (res.returncode, res.stdout, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("ember: error: "), res.stderr
    return lines[0]


def ember_images_works(cfg: Config, tmp_path: Path) -> str:
    res = subprocess.run(
        [ember_bin(), "images"], env=ember_env(cfg, tmp_path),
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


# ---- layers: whiteouts and sparse files -----------------------------------------------------


def add_image(store: ImageStore, tmp_path: Path, layers: list[bytes], name: str):  # noqa: ANN201
    layout = write_oci_layout(tmp_path / name.replace("/", "_"), [(make_image(layers), name)])
    (image,) = store.import_archive(layout)
    return image


@pytest.mark.parametrize("name", [".wh..", ".wh...", "etc/.wh..", "etc/.wh...", "etc/.wh."])
def test_whiteout_escaping_its_folder_is_refused(
    store: ImageStore, cfg: Config, tmp_path: Path, name: str
) -> None:
    """`.wh...` once resolved to the staging folder's parent and deleted every cached image."""
    image = add_image(
        store, tmp_path,
        [layer([directory("etc"), file("etc/passwd", "root")]), layer([file(name)])],
        "localhost/evil:1",
    )
    before = snapshot(cfg)
    with pytest.raises(ImageError, match="unsafe whiteout") as exc:
        flatten(store, image)
    assert "\n" not in str(exc.value) and exc.value.exit_code == 125
    assert snapshot(cfg) == before  # the good image's cached rootfs is still there
    assert store.rootfs_path(store.resolve("localhost/good:1").id).is_file()


def test_ordinary_whiteouts_still_apply(store: ImageStore, tmp_path: Path) -> None:
    image = add_image(
        store, tmp_path,
        [layer([directory("etc"), file("etc/a", "1"), file("etc/b", "2")]),
         layer([whiteout("etc/a")])],
        "localhost/wh:1",
    )
    out = subprocess.run(["debugfs", "-R", "ls /etc", str(flatten(store, image))],
                         capture_output=True, text=True).stdout
    assert " b " in f" {out} " and " a " not in f" {out} "


def sparse_layer(tmp_path: Path, fmt: str, size: int, data: dict[int, bytes]) -> bytes:
    """A layer made by GNU tar -S from a sparse file: a few KB for ``size`` bytes."""
    src = tmp_path / f"sparse-src-{fmt}"
    src.mkdir()
    with open(src / "big", "wb") as f:
        f.truncate(size)
        for offset, chunk in data.items():
            f.seek(offset)
            f.write(chunk)
    tar = tmp_path / f"sparse-{fmt}.tar"
    subprocess.run(["tar", f"--format={fmt}", "-S", "-cf", str(tar), "-C", str(src), "big"],
                   check=True)
    return compress(tar.read_bytes(), "gzip")


def bytes_written() -> int:
    """What this process passed to write(2) so far (/proc/self/io wchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def ext4_stat(image: Path, path: str) -> dict[str, str]:
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)],
                         capture_output=True, text=True).stdout
    return {k: m.group(1) for k in ("Size", "Blockcount")
            if (m := re.search(rf"\b{k}: (\d+)", out))}


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_4gib_file_keeps_its_holes(
    store: ImageStore, cfg: Config, tmp_path: Path, fmt: str
) -> None:
    """A ~20 KB layer holding a sparse 4 GiB file once wrote 4.2 GB at flatten."""
    blob = sparse_layer(tmp_path, fmt, 4 << 30, {12345: b"head", (4 << 30) - 4: b"tail"})
    assert len(blob) < 64 << 10
    image = add_image(store, tmp_path, [blob], f"localhost/sparse-{fmt}:1")
    written = bytes_written()
    start = time.monotonic()
    ext4 = flatten(store, image)
    assert bytes_written() - written < 16 << 20
    assert time.monotonic() - start < 60
    info = ext4_stat(ext4, "/big")
    assert int(info["Size"]) == 4 << 30
    assert int(info["Blockcount"]) * 512 < 1 << 20
    assert ext4.stat().st_blocks * 512 < 256 << 20


def test_sparse_and_zero_filled_files_keep_their_content(
    store: ImageStore, tmp_path: Path
) -> None:
    """Holes are only skipped, never lost: data around them reads back exactly."""
    data = {0: b"start", 3 << 20: b"middle" * 1000, (8 << 20) - 3: b"end"}
    blob = sparse_layer(tmp_path, "gnu", 8 << 20, data)
    zeros = layer([file("zeros", bytes(32 << 20) + b"x")])  # a plain member: 32 MiB of zeros
    image = add_image(store, tmp_path, [blob, zeros], "localhost/sparse-content:1")
    ext4 = flatten(store, image)
    got = subprocess.run(["debugfs", "-R", "cat /big", str(ext4)], capture_output=True).stdout
    want = bytearray(8 << 20)
    for offset, chunk in data.items():
        want[offset:offset + len(chunk)] = chunk
    assert got == bytes(want)
    info = ext4_stat(ext4, "/zeros")
    assert int(info["Size"]) == (32 << 20) + 1
    assert int(info["Blockcount"]) * 512 < 1 << 20  # zero runs became holes


def test_staging_and_store_are_private(
    store: ImageStore, cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user cannot reach an image's files while they are unpacked, nor any blob."""
    seen: list[tuple[int, int, int]] = []
    real_apply = rootfs_mod.apply_layer

    def spy(root: Path, blob: Path, what: str) -> None:
        seen.append(tuple(stat.S_IMODE(p.stat().st_mode)  # type: ignore[arg-type]
                          for p in (root, root.parent, root.parent.parent)))
        real_apply(root, blob, what)

    monkeypatch.setattr(rootfs_mod, "apply_layer", spy)
    image = add_image(store, tmp_path, [layer([file("suid", "x", mode=0o4755)])], "localhost/s:1")
    ext4 = flatten(store, image)
    assert seen == [(0o755, 0o700, 0o700)]  # image "/", staging folder, rootfs cache
    out = subprocess.run(["debugfs", "-R", "stat /", str(ext4)], capture_output=True, text=True)
    assert "Mode:  0755" in out.stdout
    assert stat.S_IMODE(cfg.images_dir.stat().st_mode) == 0o700
    for blob in (cfg.images_dir / "blobs" / "sha256").iterdir():
        assert stat.S_IMODE(blob.stat().st_mode) & 0o077 == 0, blob


# ---- archives: docker save and OCI layouts ------------------------------------------------


def docker_save_dir(tmp_path: Path, edit: Callable[[list[dict]], None]) -> Path:
    """A `docker save` folder whose manifest.json ``edit`` may tamper with."""
    img = make_image([layer([file("a", "a")])])
    tar = write_docker_save(tmp_path / "save.tar", img, ["localhost/saved:1"])
    folder = tmp_path / "save"
    with tarfile.open(tar) as t:
        t.extractall(folder)  # our own archive (3.11.2's tarfile has no filter= yet)
    entries = json.loads((folder / "manifest.json").read_text())
    edit(entries)
    (folder / "manifest.json").write_text(json.dumps(entries))
    return folder


def _outside(tmp_path: Path) -> Path:
    """A valid config outside the archive folder, that an escape would read."""
    img = make_image([layer([file("a", "a")])])
    secret = tmp_path / "outside" / "config.json"
    secret.parent.mkdir(exist_ok=True)
    secret.write_bytes(img.config)
    return secret


@pytest.mark.parametrize("attack", ["absolute", "dotdot", "layer-dotdot", "symlink"])
def test_docker_save_reads_only_inside_its_folder(
    store: ImageStore, cfg: Config, tmp_path: Path, attack: str
) -> None:
    outside = _outside(tmp_path)

    def edit(entries: list[dict]) -> None:
        if attack == "absolute":
            entries[0]["Config"] = str(outside)
        elif attack == "dotdot":
            entries[0]["Config"] = "../outside/config.json"
        elif attack == "layer-dotdot":
            entries[0]["Layers"] = ["../outside/config.json"]
        else:
            entries[0]["Config"] = "link.json"

    folder = docker_save_dir(tmp_path, edit)
    if attack == "symlink":
        (folder / "link.json").symlink_to(outside)
    before = snapshot(cfg)
    line = ember_fails(cfg, tmp_path, "image", "import", str(folder))
    assert "outside" in line or "inside the archive" in line
    assert snapshot(cfg) == before


def test_docker_save_folder_with_inner_symlinks_still_imports(
    store: ImageStore, tmp_path: Path
) -> None:
    """Old `docker save` output links layers to each other inside the folder: that is fine."""
    folder = docker_save_dir(tmp_path, lambda entries: None)
    entries = json.loads((folder / "manifest.json").read_text())
    real = entries[0]["Layers"][0]
    (folder / "linked").mkdir()
    (folder / "linked" / "layer.tar").symlink_to(Path("..") / real)
    entries[0]["Layers"] = ["linked/layer.tar"]
    (folder / "manifest.json").write_text(json.dumps(entries))
    (image,) = store.import_archive(folder)
    assert image.names == ["localhost/saved:1"]


def oci_layout_with(tmp_path: Path, edit: Callable[[dict, dict, dict], bytes | None]) -> Path:
    """An OCI layout whose index, manifest and config ``edit`` may rewrite (digests follow).

    ``edit`` may return bytes to use as the config blob instead of the config dict.
    """
    img = make_image([layer([file("a", "a")])])
    config, manifest = json.loads(img.config), json.loads(img.manifest)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": "", "size": 0,
         "annotations": {"org.opencontainers.image.ref.name": "localhost/hostile:1"}}]}
    replaced = edit(index, manifest, config)
    config_bytes = replaced if isinstance(replaced, bytes) else dumps(config)
    folder = tmp_path / "layout"
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for data in img.layers:
        (blobs / digest_of(data)[7:]).write_bytes(data)
    (blobs / digest_of(config_bytes)[7:]).write_bytes(config_bytes)
    if isinstance(manifest.get("config"), dict):
        manifest["config"].update(digest=digest_of(config_bytes), size=len(config_bytes))
    manifest_bytes = dumps(manifest)
    (blobs / digest_of(manifest_bytes)[7:]).write_bytes(manifest_bytes)
    index["manifests"][0].update(digest=digest_of(manifest_bytes), size=len(manifest_bytes))
    (folder / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def _deep(depth: int) -> str:
    """A marker that :func:`dumps` turns into ``depth`` nested arrays (json.dumps cannot)."""
    return f"@@deep-{depth}@@"


def dumps(doc: object) -> bytes:
    text = json.dumps(doc)
    for depth in map(int, re.findall(r'"@@deep-(\d+)@@"', text)):
        text = text.replace(f'"@@deep-{depth}@@"', "[" * depth + '"x"' + "]" * depth)
    return text.encode()


OCI_ATTACKS: dict[str, Callable[[dict, dict, dict], object]] = {
    "config is an array": lambda i, m, c: b'["not", "an", "object"]',
    "layer size is a string": lambda i, m, c: m["layers"][0].update(size="12"),
    "layer size is fractional": lambda i, m, c: m["layers"][0].update(size=1.5),
    "layer size is a boolean": lambda i, m, c: m["layers"][0].update(size=True),
    "layer without a size": lambda i, m, c: m["layers"][0].pop("size"),
    "layer larger than its size": lambda i, m, c: m["layers"][0].update(size=10),
    "annotations are a list": lambda i, m, c: m.update(annotations=["a"]),
    "index annotations are a string": lambda i, m, c: i["manifests"][0].update(annotations="x"),
    "platform is a string": lambda i, m, c: i["manifests"][0].update(platform="linux/amd64"),
    "deeply nested": lambda i, m, c: m.update(annotations={"a": _deep(100_000)}),
    "nested within the parser's reach": lambda i, m, c: m.update(annotations={"a": _deep(500)}),
    "Env is a string": lambda i, m, c: c["config"].update(Env="PATH=/bin"),
    "Cmd holds a number": lambda i, m, c: c["config"].update(Cmd=["sh", 1]),
    "diff_ids are not digests": lambda i, m, c: c["rootfs"].update(diff_ids=[1]),
}


@pytest.mark.parametrize("attack", list(OCI_ATTACKS))
def test_malformed_oci_metadata_is_refused_before_commit(
    store: ImageStore, cfg: Config, tmp_path: Path, attack: str
) -> None:
    layout = oci_layout_with(tmp_path, OCI_ATTACKS[attack])  # type: ignore[arg-type]
    before = snapshot(cfg)
    ember_fails(cfg, tmp_path, "image", "import", str(layout))
    assert snapshot(cfg) == before
    assert "localhost/good" in ember_images_works(cfg, tmp_path)


# ---- a hostile registry -------------------------------------------------------------------


class FakeRegistry:
    """Speaks just enough of the distribution API, and lies as told.

    ``blobs`` maps digests to bytes or to a generator factory (an endless
    stream); ``sent`` counts what each blob request really wrote; ``auth``
    records the Authorization header of every request (the token endpoint's too).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes | Callable[[], Iterator[bytes]]] = {}
        self.sent: dict[str, int] = {}
        self.auth: list[tuple[str, str]] = []
        self.challenge: str | None = None  # WWW-Authenticate for unauthenticated /v2 calls
        self.token = "tok-" + os.urandom(8).hex()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer.auth.append((self.path, self.headers.get("Authorization", "")))
                outer.serve(self)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return "{}:{}".format(*self.httpd.server_address[:2])

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        if path.startswith("/token"):
            return self._send(h, 200, json.dumps({"token": self.token}).encode(), "application/json")
        if self.challenge and h.headers.get("Authorization") != f"Bearer {self.token}":
            h.send_response(401)
            h.send_header("WWW-Authenticate", self.challenge)
            h.end_headers()
            return None
        if path == "/v2/":
            return self._send(h, 200, b"{}", "application/json")
        _, _, rest = path.partition("/v2/")
        repo_kind, _, ref = rest.rpartition("/")
        if repo_kind.endswith("/manifests") and ref in self.manifests:
            body, media = self.manifests[ref]
            return self._send(h, 200, body, media)
        if repo_kind.endswith("/blobs") and ref in self.blobs:
            return self._stream(h, ref)
        return self._send(h, 404, b'{"errors":[{"code":"NOT_FOUND","message":"unknown"}]}',
                          "application/json")

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, body: bytes, media: str) -> None:
        h.send_response(code)
        h.send_header("Content-Type", media)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _stream(self, h: BaseHTTPRequestHandler, digest: str) -> None:
        """No Content-Length: the body ends when the connection closes, as HTTP/1.0 allows."""
        source = self.blobs[digest]
        chunks = source() if callable(source) else iter([source])
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        self.sent[digest] = 0
        with contextlib.suppress(OSError):
            for chunk in chunks:
                h.wfile.write(chunk)
                self.sent[digest] += len(chunk)

    def put(self, repo: str, tag: str, manifest: dict, blobs: dict[str, bytes]) -> str:
        body = dumps(manifest)
        self.manifests[tag] = (body, manifest.get("mediaType", OCI_MANIFEST))
        self.manifests[digest_of(body)] = self.manifests[tag]
        self.blobs.update(blobs)
        return f"{self.host}/{repo}:{tag}"

    def __enter__(self) -> FakeRegistry:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    with FakeRegistry() as reg:
        yield reg


def image_doc() -> tuple[dict, dict[str, bytes]]:
    img = make_image([layer([file("a", "a")])])
    return json.loads(img.manifest), {digest_of(b): b for b in [img.config, *img.layers]}


def endless() -> Iterator[bytes]:
    chunk = os.urandom(1 << 16)
    for _ in range((300 << 20) // len(chunk)):  # 300 MB, as in the review
        yield chunk


def test_layer_larger_than_its_descriptor_is_cut_off(
    fake: FakeRegistry, store: ImageStore, cfg: Config, tmp_path: Path
) -> None:
    manifest, blobs = image_doc()
    victim = manifest["layers"][0]["digest"]
    blobs[victim] = endless  # type: ignore[assignment]
    ref = fake.put("big/layer", "1", manifest, blobs)
    before = snapshot(cfg)
    line = ember_fails(cfg, tmp_path, "pull", "-q", ref)
    assert "larger than" in line
    time.sleep(0.5)  # let the server notice the closed connection
    assert fake.sent[victim] < 16 << 20, fake.sent[victim]
    assert snapshot(cfg) == before


@pytest.mark.parametrize("size", ["missing", "12", 1.5, True, -1, 1 << 70])
def test_layer_without_a_usable_size_is_never_fetched(
    fake: FakeRegistry, store: ImageStore, cfg: Config, tmp_path: Path, size: object
) -> None:
    manifest, blobs = image_doc()
    victim = manifest["layers"][0]["digest"]
    blobs[victim] = endless  # type: ignore[assignment]
    if size == "missing":
        del manifest["layers"][0]["size"]
    else:
        manifest["layers"][0]["size"] = size
    ref = fake.put("no/size", "1", manifest, blobs)
    before = snapshot(cfg)
    line = ember_fails(cfg, tmp_path, "pull", "-q", ref)
    assert "layers[0].size" in line
    assert victim not in fake.sent
    assert snapshot(cfg) == before


REGISTRY_ATTACKS: dict[str, Callable[[dict, dict[str, bytes]], object]] = {
    "annotations are a list": lambda m, b: m.update(annotations=["x"]),
    "annotation value is an object": lambda m, b: m.update(annotations={"a": {"b": 1}}),
    "deeply nested": lambda m, b: m.update(annotations={"a": _deep(100_000)}),
    "config descriptor is a string": lambda m, b: m.update(config="sha256:00"),
    "layers is an object": lambda m, b: m.update(layers={}),
}


@pytest.mark.parametrize("attack", list(REGISTRY_ATTACKS))
def test_malformed_manifest_from_registry(
    fake: FakeRegistry, store: ImageStore, cfg: Config, tmp_path: Path, attack: str
) -> None:
    manifest, blobs = image_doc()
    REGISTRY_ATTACKS[attack](manifest, blobs)
    ref = fake.put("bad/manifest", "1", manifest, blobs)
    before = snapshot(cfg)
    ember_fails(cfg, tmp_path, "pull", "-q", ref)
    assert fake.sent == {}  # refused before any blob was fetched
    assert snapshot(cfg) == before


def test_config_that_is_a_json_array_is_never_committed(
    fake: FakeRegistry, store: ImageStore, cfg: Config, tmp_path: Path
) -> None:
    """It used to be committed, after which `ember images` failed for everyone."""
    manifest, blobs = image_doc()
    config = b'["a", "json", "array"]'
    manifest["config"].update(digest=digest_of(config), size=len(config))
    blobs[digest_of(config)] = config
    ref = fake.put("array/config", "1", manifest, blobs)
    before = snapshot(cfg)
    line = ember_fails(cfg, tmp_path, "pull", "-q", ref)
    assert "expected a JSON object" in line
    assert manifest["layers"][0]["digest"] not in fake.sent  # refused before the layers
    assert snapshot(cfg) == before
    assert "localhost/good" in ember_images_works(cfg, tmp_path)


@pytest.mark.parametrize("platform", ["linux/amd64", ["linux"], {"os": 1, "architecture": "amd64"}])
def test_index_with_malformed_platform(
    fake: FakeRegistry, store: ImageStore, cfg: Config, tmp_path: Path, platform: object
) -> None:
    manifest, blobs = image_doc()
    fake.put("idx/app", "inner", manifest, blobs)
    body = fake.manifests["inner"][0]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest_of(body), "size": len(body),
         "platform": platform}]}
    ref = fake.put("idx/app", "1", index, {})
    before = snapshot(cfg)
    line = ember_fails(cfg, tmp_path, "pull", "-q", ref)
    assert "manifests[0].platform" in line
    assert snapshot(cfg) == before


def test_plain_http_realm_on_another_host_gets_no_credentials(
    fake: FakeRegistry, store: ImageStore, cfg: Config, tmp_path: Path
) -> None:
    with FakeRegistry("127.0.0.2") as thief:
        manifest, blobs = image_doc()
        ref = fake.put("private/app", "1", manifest, blobs)
        fake.challenge = f'Bearer realm="http://{thief.host}/token",service="x"'
        before = snapshot(cfg)
        line = ember_fails(cfg, tmp_path, "pull", "-q", ref, auth="alice:s3cret")
        assert "refusing to send credentials" in line
        assert all("Basic" not in header for _, header in thief.auth), thief.auth
        assert all("Basic" not in header for _, header in fake.auth), fake.auth
        assert snapshot(cfg) == before


def test_plain_http_realm_on_the_registry_host_gets_them(
    fake: FakeRegistry, store: ImageStore, cfg: Config, tmp_path: Path
) -> None:
    """A local registry with its token server beside it keeps working."""
    manifest, blobs = image_doc()
    ref = fake.put("private/app", "1", manifest, blobs)
    fake.challenge = f'Bearer realm="http://{fake.host}/token",service="x"'
    res = subprocess.run([ember_bin(), "pull", "-q", ref],
                         env=ember_env(cfg, tmp_path, "alice:s3cret"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    token_calls = [h for p, h in fake.auth if p.startswith("/token")]
    assert token_calls and token_calls[0].startswith("Basic ")
