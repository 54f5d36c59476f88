"""`pull` against a real docker-registry on loopback, anonymous and behind bearer-token auth."""

from __future__ import annotations

import base64
import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagetools import (
    Registry,
    TokenServer,
    busybox_layer,
    digest_of,
    file,
    free_port,
    layer,
    make_image,
    make_pki,
    push_image,
    push_index,
    run_registry,
)

from ember.config import Config
from ember.errors import ImageError
from ember.image.store import ImageStore

pytestmark = [pytest.mark.registry, pytest.mark.timeout(120)]


@pytest.fixture(autouse=True)
def no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The user's own docker login or CA must not leak into these tests."""
    for var in ("EMBER_REGISTRY_AUTH", "EMBER_REGISTRY_CA"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "docker-config"
    empty.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(empty))


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with (
        tempfile.TemporaryDirectory(prefix="ember-registry-") as tmp,
        run_registry(Path(tmp)) as reg,
    ):
        yield reg


@pytest.fixture(scope="module")
def bb_layer() -> bytes:
    return busybox_layer()


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(Config(data_dir=tmp_path / "data", state_dir=tmp_path / "state"))


def blobs(store: ImageStore) -> list[str]:
    d = store.root / "blobs" / "sha256"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def assert_empty(store: ImageStore) -> None:
    assert store.list() == [] and blobs(store) == []
    tmp = store.root / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_pull_anonymous(registry: Registry, store: ImageStore, bb_layer: bytes, capsys) -> None:  # noqa: ANN001
    img = make_image([bb_layer, layer([file("etc/motd", "pulled\n")])], cmd=["cat", "/etc/motd"])
    push_image(registry.host, "library/bb", "1", img)
    ref = f"{registry.host}/library/bb:1"
    image = store.pull(ref, progress=True)
    assert image.id == img.id
    assert image.manifest_digest == img.digest
    assert image.names == [ref]
    assert image.repo_digests == [f"{registry.host}/library/bb@{img.digest}"]
    assert store.inspect(ref)["Config"]["Cmd"] == ["cat", "/etc/motd"]
    assert sorted(blobs(store)) == sorted(d[7:] for d in img.blobs)
    # by digest too, and by the repo digest recorded at pull time
    again = store.pull(f"{registry.host}/library/bb@{img.digest}")
    assert again.id == img.id
    assert store.resolve(f"{registry.host}/library/bb@{img.digest}").id == img.id
    # rm garbage-collects everything the pull brought in
    store.remove(img.id)
    assert_empty(store)


def test_pull_docker_schema2(registry: Registry, store: ImageStore, bb_layer: bytes) -> None:
    img = make_image([bb_layer], cmd=["sh"], docker=True)
    push_image(registry.host, "docker/style", "v2", img)
    image = store.pull(f"{registry.host}/docker/style:v2")
    assert image.id == img.id
    assert image.layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-list"])
def test_manifest_list_resolves_to_amd64(
    registry: Registry, store: ImageStore, docker: bool
) -> None:
    arm = make_image([layer([file("arch", "arm64")])], arch="arm64", docker=docker)
    amd = make_image([layer([file("arch", "amd64")])], arch="amd64", docker=docker)
    index = push_index(
        registry.host, "multi/arch", "1", [(arm, "arm64"), (amd, "amd64")], docker=docker
    )
    image = store.pull(f"{registry.host}/multi/arch:1")
    assert image.id == amd.id
    assert image.config["architecture"] == "amd64"
    index_digest = digest_of(index)
    assert image.repo_digests == [f"{registry.host}/multi/arch@{index_digest}"]
    assert arm.id[7:] not in blobs(store)


def test_manifest_list_without_amd64(registry: Registry, store: ImageStore) -> None:
    arm = make_image([layer([file("arch", "arm64")])], arch="arm64")
    push_index(registry.host, "only/arm", "1", [(arm, "arm64")])
    with pytest.raises(
        ImageError, match=r"no linux/amd64 image in the manifest list \(has linux/arm64\)"
    ):
        store.pull(f"{registry.host}/only/arm:1")
    assert_empty(store)


def test_unknown_tag_and_unreachable_registry(registry: Registry, store: ImageStore) -> None:
    with pytest.raises(ImageError, match="manifest unknown"):
        store.pull(f"{registry.host}/library/bb:no-such-tag")
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(ImageError, match=f"cannot reach registry {dead}"):
        store.pull(f"{dead}/x/y:1")
    with pytest.raises(ImageError, match="invalid reference format"):
        store.pull(f"{registry.host}/UPPER:1")
    assert_empty(store)


def test_tampered_blob_is_rejected(registry: Registry, store: ImageStore, tmp_path: Path) -> None:
    img = make_image([layer([file("a", "a" * 5000)]), layer([file("b", "original")])])
    push_image(registry.host, "tamper/me", "1", img)
    victim = json.loads(img.manifest)["layers"][1]["digest"][7:]
    storage = next(registry.log.parent.glob("registry-data"))
    data = storage / "docker/registry/v2/blobs/sha256" / victim[:2] / victim / "data"
    size = json.loads(img.manifest)["layers"][1]["size"]
    data.write_bytes((layer([file("b", "evil")]) + bytes(size))[:size])  # same size, other bytes
    with pytest.raises(ImageError, match=f"blob sha256:{victim}: digest mismatch"):
        store.pull(f"{registry.host}/tamper/me:1")
    assert_empty(store)


# ---- bearer-token auth --------------------------------------------------------------------

USERS = {"alice": "s3cret"}


@pytest.fixture(scope="module")
def token_registry() -> Iterator[tuple[Registry, TokenServer]]:
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ember-registry-")))
        pki = make_pki(work / "pki")
        tokens = stack.enter_context(TokenServer(pki, USERS))
        reg = stack.enter_context(run_registry(work, token_auth=tokens.registry_auth()))
        img = make_image([layer([file("secret", "only for alice")])], cmd=["cat", "/secret"])
        push_image(reg.host, "private/app", "1", img, auth=("alice", "s3cret"), ca=str(pki.ca_pem))
        tokens.pushed = img  # type: ignore[attr-defined]
        yield reg, tokens


def test_pull_with_bearer_token(
    token_registry: tuple[Registry, TokenServer], store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, tokens = token_registry
    monkeypatch.setenv("EMBER_REGISTRY_AUTH", "alice:s3cret")
    monkeypatch.setenv("EMBER_REGISTRY_CA", str(tokens.pki.ca_pem))
    tokens.requests.clear()
    image = store.pull(f"{reg.host}/private/app:1")
    assert image.id == tokens.pushed.id  # type: ignore[attr-defined]
    assert tokens.requests, "the token server was never asked"
    asked = tokens.requests[-1]
    assert asked["user"] == "alice"
    assert asked["query"] == {
        "service": TokenServer.service,
        "scope": "repository:private/app:pull",
    }


def test_docker_config_credentials(
    token_registry: tuple[Registry, TokenServer],
    store: ImageStore,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    reg, tokens = token_registry
    cfg_dir = tmp_path / "dockercfg"
    cfg_dir.mkdir()
    auth = base64.b64encode(b"alice:s3cret").decode()
    (cfg_dir / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg_dir))
    monkeypatch.setenv("EMBER_REGISTRY_CA", str(tokens.pki.ca_pem))
    assert store.pull(f"{reg.host}/private/app:1").id == tokens.pushed.id  # type: ignore[attr-defined]


def test_wrong_password_missing_login_and_untrusted_ca(
    token_registry: tuple[Registry, TokenServer], store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, tokens = token_registry
    ref = f"{reg.host}/private/app:1"
    monkeypatch.setenv("EMBER_REGISTRY_CA", str(tokens.pki.ca_pem))
    monkeypatch.setenv("EMBER_REGISTRY_AUTH", "alice:wrong")
    with pytest.raises(
        ImageError, match=r"login failed for user 'alice' .*wrong username or password"
    ):
        store.pull(ref)
    monkeypatch.delenv("EMBER_REGISTRY_AUTH")
    with pytest.raises(
        ImageError, match=f"registry {reg.host} requires authentication for private/app"
    ):
        store.pull(ref)
    # Without the extra CA the token server's certificate is not trusted.
    monkeypatch.setenv("EMBER_REGISTRY_AUTH", "alice:s3cret")
    monkeypatch.delenv("EMBER_REGISTRY_CA")
    with pytest.raises(ImageError, match="certificate verify failed"):
        store.pull(ref)
    monkeypatch.setenv("EMBER_REGISTRY_AUTH", "no-colon")
    with pytest.raises(ImageError, match="EMBER_REGISTRY_AUTH must be user:password"):
        store.pull(ref)
    assert_empty(store)


def test_pull_over_https_with_extra_ca(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry that is not on localhost/127.0.0.1 is spoken to over verified HTTPS."""
    img = make_image([layer([file("tls", "yes")])])
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ember-registry-")))
        pki = make_pki(work / "pki")
        reg = stack.enter_context(run_registry(work, tls=pki, ip="127.0.0.2"))
        push_image(reg.url, "secure/app", "1", img, ca=str(pki.ca_pem))
        ref = f"{reg.host}/secure/app:1"
        with pytest.raises(
            ImageError,
            match=f"TLS error talking to registry {reg.host}: .*certificate verify failed",
        ):
            store.pull(ref)
        monkeypatch.setenv("EMBER_REGISTRY_CA", str(pki.ca_pem))
        assert store.pull(ref).id == img.id
        monkeypatch.setenv("EMBER_REGISTRY_CA", str(work / "missing.pem"))
        with pytest.raises(
            ImageError, match="EMBER_REGISTRY_CA=.*missing.pem: cannot load CA file"
        ):
            store.pull(ref)
