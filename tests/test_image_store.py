"""The image store: archive imports, rootfs imports, names, removal and garbage collection."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from imagetools import (
    busybox_image,
    busybox_layer,
    busybox_rootfs,
    digest_of,
    file,
    layer,
    make_image,
    write_docker_save,
    write_oci_layout,
    write_oci_layout_tar,
)

from ember.config import Config
from ember.errors import ImageError
from ember.image.store import ImageStore


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(Config(data_dir=tmp_path / "data", state_dir=tmp_path / "state"))


@pytest.fixture(scope="module")
def bb_layer() -> bytes:
    return busybox_layer()


def blob_names(store: ImageStore) -> set[str]:
    d = store.root / "blobs" / "sha256"
    return {p.name for p in d.iterdir()} if d.exists() else set()


def assert_store_empty(store: ImageStore) -> None:
    """Nothing of a failed import may remain: no blobs, no index entry, no staging."""
    assert store.list() == []
    assert blob_names(store) == set()
    staging = store.root / "tmp"
    assert not staging.exists() or list(staging.iterdir()) == []


def test_import_oci_dir_keeps_config(store: ImageStore, bb_layer: bytes, tmp_path: Path) -> None:
    img = make_image(
        [bb_layer],
        cmd=["echo", "hi"],
        entrypoint=["/bin/sh", "-c"],
        env=["PATH=/bin", "A=1"],
        workdir="/tmp",
        user="nobody",
    )
    layout = write_oci_layout(tmp_path / "layout", [(img, "localhost/demo:1")])
    [image] = store.import_archive(layout)
    assert image.id == img.id
    assert image.manifest_digest == img.digest
    assert image.names == ["localhost/demo:1"]
    assert [la.digest for la in image.layers] == [
        d["digest"] for d in json.loads(img.manifest)["layers"]
    ]
    info = store.inspect("localhost/demo:1")
    assert info["Id"] == img.id
    assert info["RepoTags"] == ["localhost/demo:1"]
    assert info["Os"] == "linux" and info["Architecture"] == "amd64"
    assert info["Created"] == "2024-01-02T03:04:05Z"
    assert info["Size"] == len(bb_layer)
    assert info["Config"] == {
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo", "hi"],
        "Env": ["PATH=/bin", "A=1"],
        "WorkingDir": "/tmp",
        "User": "nobody",
    }
    # Every way a user can name it finds the same image.
    for ref in ("localhost/demo:1", img.id, img.id[7:], img.id[7:19], img.id[7:11]):
        assert store.resolve(ref).id == img.id
    with pytest.raises(ImageError, match="image not found"):
        store.resolve(img.id[7:10])  # three hex digits are too few to pick an image
    assert blob_names(store) == {d[7:] for d in img.blobs}


def test_import_oci_tar_bare_tag_and_explicit_name(
    store: ImageStore, bb_layer: bytes, tmp_path: Path
) -> None:
    img = busybox_image()
    archive = write_oci_layout(tmp_path / "image.tar", [(img, "latest")], as_tar=True)
    [unnamed] = store.import_archive(archive)
    # A bare tag does not say which repository: the image is found by id only.
    assert unnamed.names == []
    assert store.resolve(img.id[7:19]).id == img.id
    [named] = store.import_archive(archive, name="localhost/bb:2")
    assert named.id == img.id and named.names == ["localhost/bb:2"]
    assert len(store.list()) == 1


def test_import_docker_save(store: ImageStore, bb_layer: bytes, tmp_path: Path) -> None:
    extra = layer([file("hello.txt", "hello\n")])
    img = make_image([bb_layer, extra], cmd=["cat", "/hello.txt"])
    archive = write_docker_save(tmp_path / "saved.tar", img, ["busybox:test", "localhost/x:1"])
    [image] = store.import_archive(archive)
    assert image.id == img.id
    assert image.names == ["docker.io/library/busybox:test", "localhost/x:1"]
    assert store.inspect("busybox:test")["RepoTags"] == ["busybox:test", "localhost/x:1"]
    assert store.resolve("busybox:test").config["config"]["Cmd"] == ["cat", "/hello.txt"]
    # docker save stores layers uncompressed; their digests are the config's diff_ids.
    assert [la.digest for la in image.layers] == img.config_doc["rootfs"]["diff_ids"]


def test_oci_blob_digest_mismatch_leaves_nothing(store: ImageStore, tmp_path: Path) -> None:
    img = make_image([layer([file("a", "good")]), layer([file("b", "good")])])
    layout = write_oci_layout(tmp_path / "layout", [(img, "localhost/bad:1")])
    bad = json.loads(img.manifest)["layers"][1]["digest"]
    evil = layer([file("b", "evil")])
    good_size = json.loads(img.manifest)["layers"][1]["size"]
    evil = (evil + bytes(good_size))[:good_size]  # the declared size, other bytes
    (layout / "blobs" / "sha256" / bad[7:]).write_bytes(evil)
    with pytest.raises(ImageError, match=f"blob {bad}: digest mismatch"):
        store.import_archive(layout)
    assert_store_empty(store)


def test_docker_save_layer_mismatch_names_layer(store: ImageStore, tmp_path: Path) -> None:
    img = make_image([layer([file("a", "good")])])
    archive = write_docker_save(tmp_path / "saved.tar", img, ["x:1"])
    # Rewrite the archive with a different layer.tar under the same name.
    members = {}
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            members[m.name] = tar.extractfile(m).read()  # type: ignore[union-attr]
    layer_name = next(n for n in members if n.endswith("layer.tar"))
    members[layer_name] = layer([file("a", "evil")], how="none")
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageError, match=f"layer {layer_name}: digest mismatch"):
        store.import_archive(bad)
    assert_store_empty(store)


def test_truncated_archive(store: ImageStore, bb_layer: bytes, tmp_path: Path) -> None:
    archive = write_oci_layout(
        tmp_path / "image.tar", [(busybox_image(), "localhost/t:1")], as_tar=True
    )
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ImageError, match="image.tar: not a readable image archive \\(unexpected end of data\\)"
    ):
        store.import_archive(archive)
    assert_store_empty(store)


def test_not_an_archive(store: ImageStore, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ImageError, match="junk.tar: not a readable image archive"):
        store.import_archive(junk)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ImageError, match="neither an OCI image layout"):
        store.import_archive(empty_dir)
    with pytest.raises(ImageError, match="no such file"):
        store.import_archive(tmp_path / "missing.tar")
    assert_store_empty(store)


def test_unknown_image(store: ImageStore) -> None:
    with pytest.raises(ImageError, match="^image not found: nosuch:1$"):
        store.resolve("nosuch:1")
    with pytest.raises(ImageError, match="^image not found: nosuch$"):
        store.remove("nosuch")
    with pytest.raises(ImageError, match="^image not found: abcdef$"):
        store.inspect("abcdef")


def test_remove_collects_garbage(store: ImageStore, bb_layer: bytes, tmp_path: Path) -> None:
    one = make_image([bb_layer, layer([file("one", "1")])], cmd=["one"])
    two = make_image([bb_layer, layer([file("two", "2")])], cmd=["two"])
    store.import_archive(write_oci_layout(tmp_path / "l1", [(one, "localhost/one:1")]))
    store.import_archive(write_oci_layout(tmp_path / "l2", [(two, "localhost/two:1")]))
    cache = store.rootfs_path(one.id)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"flattened")  # what ember.storage.rootfs.flatten leaves
    assert store.remove("localhost/one:1") == [one.id]
    assert not cache.exists()
    shared = json.loads(one.manifest)["layers"][0]["digest"][7:]
    assert shared in blob_names(store)
    assert blob_names(store) == {d[7:] for d in two.blobs}
    with pytest.raises(ImageError, match="image not found"):
        store.resolve("localhost/one:1")
    store.remove(two.id[7:19])
    assert_store_empty(store)


def test_remove_name_of_multi_named_image_only_untags(store: ImageStore, tmp_path: Path) -> None:
    img = make_image([layer([file("a", "a")])])
    store.import_archive(write_docker_save(tmp_path / "s.tar", img, ["a:1", "b:1"]))
    assert store.remove("a:1") == []
    assert store.resolve("b:1").names == ["docker.io/library/b:1"]
    with pytest.raises(ImageError, match="image not found: a:1"):
        store.resolve("a:1")


def test_retag_drops_replaced_image(store: ImageStore, tmp_path: Path) -> None:
    old = make_image([layer([file("v", "1")])])
    new = make_image([layer([file("v", "2")])])
    store.import_archive(write_docker_save(tmp_path / "old.tar", old, ["app:1"]))
    store.import_archive(write_docker_save(tmp_path / "new.tar", new, ["app:1"]))
    assert [i.id for i in store.list()] == [new.id]
    assert store.resolve("app:1").id == new.id
    assert blob_names(store) == {i.id[7:] for i in store.list()} | {
        la.digest[7:] for la in store.list()[0].layers
    } | {store.list()[0].manifest_digest[7:]}


def test_import_rootfs_dir_and_tar(store: ImageStore, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("hi\n")
    os.symlink("motd", root / "etc" / "link")
    image = store.import_rootfs(root, "localhost/mine:1", cmd=["cat", "/etc/motd"], workdir="/etc")
    info = store.inspect("localhost/mine:1")
    assert info["Config"]["Cmd"] == ["cat", "/etc/motd"]
    assert info["Config"]["WorkingDir"] == "/etc"
    assert any(e.startswith("PATH=") for e in info["Config"]["Env"])
    with tarfile.open(store.blob_path(image.layers[0].digest)) as tar:
        names = {m.name: m for m in tar.getmembers()}
    assert names["./etc/motd"].isfile() and names["./etc/link"].issym()

    tar_path = tmp_path / "root.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(root, arcname=".")
    from_tar = store.import_rootfs(tar_path, "localhost/mine:tar", env=["X=1"])
    assert from_tar.config["config"]["Env"] == ["X=1"]
    assert (
        from_tar.config["rootfs"]["diff_ids"][0] != from_tar.layers[0].digest
    )  # gzip: diff_id differs


def test_import_rootfs_failures_leave_nothing(store: ImageStore, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive at all" * 100)
    with pytest.raises(ImageError, match="bad.tar: not a valid tar archive"):
        store.import_rootfs(bad, "localhost/bad:1")
    with pytest.raises(ImageError, match="invalid reference format"):
        store.import_rootfs(tmp_path, "Bad Name")
    with pytest.raises(ImageError, match="no such file"):
        store.import_rootfs(tmp_path / "nope", "localhost/x:1")
    assert_store_empty(store)


def test_concurrent_imports_all_land(store: ImageStore, tmp_path: Path) -> None:
    """Several processes may import at once: the lock keeps every index update."""
    archives = []
    for i in range(4):
        img = make_image([layer([file(f"f{i}", str(i))])])
        archives.append(write_docker_save(tmp_path / f"{i}.tar", img, [f"localhost/c:{i}"]))
    errors: list[BaseException] = []

    def run(path: Path) -> None:
        try:
            ImageStore(store.cfg).import_archive(path)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in archives]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(n for i in store.list() for n in i.names) == [
        f"localhost/c:{i}" for i in range(4)
    ]


def test_demo_module_makes_busybox_image(tmp_path: Path) -> None:
    env = dict(os.environ, EMBER_DATA_DIR=str(tmp_path / "data"), EMBER_CONFIG="/dev/null")
    res = subprocess.run(
        [sys.executable, "-m", "ember.image.demo", "ember-demo:latest"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    store = ImageStore(Config(data_dir=tmp_path / "data"))
    image = store.resolve("ember-demo:latest")
    assert res.stdout.strip() == image.id
    assert image.config["config"]["Cmd"] == ["sh"]
    with tarfile.open(store.blob_path(image.layers[0].digest)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["./bin/busybox"].isfile()
    assert members["./bin/sh"].issym() and members["./bin/sh"].linkname == "/bin/busybox"
    assert members["./tmp"].mode == 0o1777
    passwd = tar_read(store.blob_path(image.layers[0].digest), "./etc/passwd")
    assert passwd.startswith("root:x:0:0:") and "\nnobody:x:65534:" in passwd
    bad = subprocess.run(
        [sys.executable, "-m", "ember.image.demo", "Not Valid"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "invalid reference format" in bad.stderr


def tar_read(path: Path, name: str) -> str:
    with tarfile.open(path) as tar:
        return tar.extractfile(name).read().decode()  # type: ignore[union-attr]


def test_oci_layout_with_nested_index_picks_amd64(store: ImageStore, tmp_path: Path) -> None:
    """`skopeo copy --all`-style layouts: index.json -> image index -> per-arch manifests."""
    arm = make_image([layer([file("arch", "arm64")])], arch="arm64")
    amd = make_image([layer([file("arch", "amd64")])], arch="amd64")
    layout = write_oci_layout(tmp_path / "layout", [(amd, None)])
    nested = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": d,
                    "size": n,
                    "platform": {"os": "linux", "architecture": a},
                }
                for d, n, a in (
                    (arm.digest, len(arm.manifest), "arm64"),
                    (amd.digest, len(amd.manifest), "amd64"),
                )
            ],
        }
    ).encode()
    nested_digest = digest_of(nested)
    (layout / "blobs" / "sha256" / nested_digest[7:]).write_bytes(nested)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": nested_digest,
                "size": len(nested),
                "annotations": {"io.containerd.image.name": "localhost/multi:1"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    # arm64's blobs are absent, as in a layout copied for one platform only.
    [image] = store.import_archive(layout)
    assert image.id == amd.id and image.names == ["localhost/multi:1"]
    assert nested_digest[7:] not in blob_names(store)


def test_write_oci_layout_tar_helper_round_trips(store: ImageStore, tmp_path: Path) -> None:
    """The helper other suites (ember run) use to make their images."""
    root = busybox_rootfs(tmp_path / "rootfs")
    tar = write_oci_layout_tar(
        tmp_path / "image.tar",
        [root],
        ref="localhost/helper:1",
        config={"Env": ["A=1"], "WorkingDir": "/srv", "Cmd": ["sh", "-c", "true"]},
    )
    [image] = store.import_archive(tar)
    assert image.names == ["localhost/helper:1"]
    cfg = store.inspect("localhost/helper:1")["Config"]
    assert (cfg["Env"], cfg["WorkingDir"], cfg["Cmd"]) == (["A=1"], "/srv", ["sh", "-c", "true"])
