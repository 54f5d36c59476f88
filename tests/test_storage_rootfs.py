"""Flattening images into ext4 block images, and per-container writable disks.

Images are checked with debugfs (reads the ext4 file directly: no mount).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagetools import (
    busybox_layer,
    chardev,
    directory,
    file,
    hardlink,
    layer,
    make_image,
    opaque,
    symlink,
    whiteout,
    write_oci_layout,
)

from ember.config import Config
from ember.errors import ImageError
from ember.image.store import Image, ImageStore
from ember.storage.ext4 import make_ext4
from ember.storage.rootfs import flatten, prepare_writable

pytestmark = pytest.mark.root  # chown, mknod and setuid bits need root


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(Config(data_dir=tmp_path / "data", state_dir=tmp_path / "state"))


def debugfs(image: Path, request: str) -> str:
    res = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def ls(image: Path, path: str) -> set[str]:
    out = debugfs(image, f"ls -l {path}")
    names = set()
    for line in out.splitlines():
        m = re.match(r"^\s*\d+\s+\d+\s+\(\d+\)\s+\d+\s+\d+\s+.*\d\d:\d\d (.+)$", line)
        if m and m.group(1) not in (".", ".."):
            names.add(m.group(1))
    return names


def stat(image: Path, path: str) -> dict[str, str]:
    out = debugfs(image, f"stat {path}")
    info: dict[str, str] = {}
    for key in ("Inode", "Type", "Mode", "User", "Group", "Links", "Size"):
        m = re.search(rf"\b{key}:\s*(\S+)", out)
        if m:
            info[key] = m.group(1)
    m = re.search(r"Device major/minor number: (\d+):(\d+)", out)
    if m:
        info["dev"] = f"{int(m.group(1))}:{int(m.group(2))}"
    m = re.search(r'Fast link dest: "(.*)"', out)
    if m:
        info["link"] = m.group(1)
    return info


def cat(image: Path, path: str) -> str:
    return debugfs(image, f"cat {path}")


def add(store: ImageStore, tmp_path: Path, layers: list[bytes], name: str) -> Image:
    img = make_image(layers, cmd=["sh"])
    [image] = store.import_archive(
        write_oci_layout(tmp_path / name.replace("/", "_"), [(img, name)])
    )
    return image


def leftovers(store: ImageStore) -> list[str]:
    d = store.cfg.rootfs_dir
    return sorted(p.name for p in d.iterdir() if p.name != ".lock") if d.exists() else []


def test_layers_whiteouts_and_metadata(store: ImageStore, tmp_path: Path) -> None:
    lower = layer(
        [
            directory("a"),
            file("a/x", "x"),
            file("a/y", "y"),
            directory("a/sub"),
            file("a/sub/z", "z"),
            directory("b"),
            file("b/gone", "gone"),
            file("b/stays", "stays"),
            file("keep", "old"),
            file("suid", "#!", mode=0o4755, uid=1000, gid=1000),
            directory("private", mode=0o700, uid=1000, gid=100),
            hardlink("keep-link", "keep"),
            symlink("abs-link", "/keep"),
            directory("dev"),
            chardev("dev/null", 1, 3),
            directory("tmp", mode=0o1777),
            directory(".wh..wh.plnk"),  # AUFS bookkeeping found in old docker images
            file(".wh..wh.plnk/1.2", "x"),
        ],
        how="gzip",
    )
    upper = layer(
        [
            whiteout("b/gone"),
            opaque("a"),
            file("a/new", "new"),
            file("keep", "new contents"),
        ],
        how="none",
    )
    top = layer([directory("c"), file("c/top", "top")], how="zstd")
    image = add(store, tmp_path, [lower, upper, top], "localhost/layers:1")
    ext4 = flatten(store, image)
    assert ext4 == store.rootfs_path(image.id)
    assert ls(ext4, "/b") == {"stays"}
    assert not any(name.startswith(".wh.") for name in ls(ext4, "/"))
    assert ls(ext4, "/a") == {"new"}  # opaque: x, y and sub/ from below are hidden
    assert cat(ext4, "/keep") == "new contents"
    assert cat(ext4, "/c/top") == "top"
    suid = stat(ext4, "/suid")
    assert (suid["Mode"], suid["User"], suid["Group"]) == ("04755", "1000", "1000")
    private = stat(ext4, "/private")
    assert (private["Type"], private["Mode"], private["User"], private["Group"]) == (
        "directory",
        "0700",
        "1000",
        "100",
    )
    assert stat(ext4, "/tmp")["Mode"] == "01777"
    # The hard link was made in the lower layer, before "keep" was replaced above it.
    link = stat(ext4, "/keep-link")
    assert link["Links"] == "1" and cat(ext4, "/keep-link") == "old"
    assert stat(ext4, "/abs-link")["link"] == "/keep"
    dev = stat(ext4, "/dev/null")
    assert dev["Type"] == "character" and dev["dev"] == "1:3"
    root = stat(ext4, "/")
    assert (root["User"], root["Group"]) == ("0", "0")
    assert leftovers(store) == [ext4.name]  # staging removed


def test_leftovers_of_a_killed_flatten_are_removed(store: ImageStore, tmp_path: Path) -> None:
    image = add(store, tmp_path, [layer([file("a", "a")])], "localhost/k:1")
    rootfs_dir = store.cfg.rootfs_dir
    (rootfs_dir / ".staging-0123456789ab-xyz" / "etc").mkdir(parents=True)
    (rootfs_dir / f".{'0' * 64}.ext4.abc.tmp").write_bytes(b"half an image")
    ext4 = flatten(store, image)
    assert leftovers(store) == [ext4.name]


def test_hardlinks_share_an_inode(store: ImageStore, tmp_path: Path) -> None:
    image = add(
        store, tmp_path, [layer([file("one", "data"), hardlink("two", "one")])], "localhost/hl:1"
    )
    ext4 = flatten(store, image)
    one, two = stat(ext4, "/one"), stat(ext4, "/two")
    assert one["Inode"] == two["Inode"] and one["Links"] == "2"


def test_busybox_image_is_sparse_and_cached(store: ImageStore, tmp_path: Path) -> None:
    image = add(store, tmp_path, [busybox_layer()], "localhost/bb:1")
    ext4 = flatten(store, image)
    st = ext4.stat()
    assert st.st_size >= 1 << 30  # room for the container's writes
    assert st.st_blocks * 512 < 16 << 20  # but only the content is allocated
    assert stat(ext4, "/bin/sh")["link"] == "/bin/busybox"
    fsck = subprocess.run(["e2fsck", "-fn", str(ext4)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # Inode tables marked zeroed: the guest will not zero them lazily into the overlay.
    groups = subprocess.run(["dumpe2fs", str(ext4)], capture_output=True, text=True).stdout
    group_lines = [ln for ln in groups.splitlines() if re.match(r"^Group \d+:", ln)]
    assert group_lines and all("ITABLE_ZEROED" in ln for ln in group_lines)
    assert ls(ext4, "/etc") >= {"passwd", "group"}
    started = time.monotonic()
    assert flatten(store, image) == ext4
    assert time.monotonic() - started < 0.05
    assert ext4.stat().st_mtime == st.st_mtime
    store.remove("localhost/bb:1")
    assert not ext4.exists()


def test_path_traversal_is_refused(store: ImageStore, tmp_path: Path) -> None:
    image = add(
        store, tmp_path, [layer([file("ok", "1"), file("../escape", "x")])], "localhost/evil:1"
    )
    with pytest.raises(ImageError, match=r"unsafe path '\.\./escape'"):
        flatten(store, image)
    assert not (store.cfg.rootfs_dir.parent / "escape").exists()
    assert leftovers(store) == []


def test_symlinks_cannot_lead_out_of_the_rootfs(store: ImageStore, tmp_path: Path) -> None:
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    evil = [
        symlink("out", str(host_dir)),  # absolute: must mean <rootfs>/<host_dir>
        symlink("up", "../../../../../../.."),
        file("out/pwned", "1"),
        file("up/tmp-pwned", "2"),
        file("/abs-name", "3"),
    ]
    image = add(store, tmp_path, [layer(evil)], "localhost/evil:2")
    ext4 = flatten(store, image)
    assert list(host_dir.iterdir()) == []
    assert cat(ext4, f"{host_dir}/pwned") == "1"
    assert cat(ext4, "/tmp-pwned") == "2"
    assert cat(ext4, "/abs-name") == "3"


def test_corrupt_layer_in_store_fails_cleanly(store: ImageStore, tmp_path: Path) -> None:
    image = add(store, tmp_path, [layer([file("a", "a" * 100000)])], "localhost/c:1")
    blob = store.blob_path(image.layers[0].digest)
    data = blob.read_bytes()
    blob.write_bytes(data[:20] + b"\0" * 200 + data[220:])  # disk corruption after import
    with pytest.raises(ImageError, match=r"layer 1/1 .*corrupt layer"):
        flatten(store, image)
    assert leftovers(store) == []


def test_writable_disk_is_qcow2_overlay_on_ext4(store: ImageStore, tmp_path: Path) -> None:
    base = tmp_path / "base.ext4"
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hi")
    make_ext4(src, base, 64 << 20, journal=True)
    disk = prepare_writable(base, tmp_path / "c1" / "disk.qcow2")
    assert disk.format == "qcow2"  # the host's ext4 cannot reflink
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(disk.path)], capture_output=True, check=True
        ).stdout
    )
    assert info["backing-filename"] == str(base) and info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == base.stat().st_size
    # Writes land in the overlay; the shared base stays as it was.
    before = base.read_bytes()
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", str(disk.path)],
        check=True,
        capture_output=True,
    )
    assert base.read_bytes() == before
    read = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 64k", str(disk.path)],
        capture_output=True,
        text=True,
    )
    assert "Pattern verification failed" not in read.stdout and read.returncode == 0
    with pytest.raises(ImageError, match="already exists"):
        prepare_writable(base, disk.path)
    with pytest.raises(ImageError, match="does not exist"):
        prepare_writable(tmp_path / "missing.ext4", tmp_path / "d2")
    assert not (tmp_path / "d2").exists()


def test_writable_disk_time_does_not_grow_with_base(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"\0" * 4096)
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 1 << 30)  # 1 GiB of allocated content
    assert big.stat().st_blocks * 512 >= 1 << 30

    def best_of(base: Path) -> float:
        times = []
        for i in range(3):
            started = time.monotonic()
            disk = prepare_writable(base, tmp_path / f"{base.stem}-{i}.disk")
            times.append(time.monotonic() - started)
            assert disk.path.stat().st_blocks * 512 < 1 << 20  # O(1) space too
        return min(times)

    try:
        t_tiny, t_big = best_of(tiny), best_of(big)
    finally:
        big.unlink()  # a real GiB: do not leave it in pytest's kept temp folders
    assert t_big < t_tiny * 3 + 0.05, (t_tiny, t_big)


def test_make_ext4_errors(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="mkfs.ext4 failed"):
        make_ext4(tmp_path / "no-such-dir", tmp_path / "x.ext4", 32 << 20)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def xfs_dir(tmp_path: Path) -> Iterator[Path]:
    """A reflink-capable XFS, loop-mounted for the test and always unmounted after."""
    backing = tmp_path / "xfs.img"
    with open(backing, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(backing)], check=True)
    mnt = tmp_path / "xfs"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)  # autoclear frees the loop device
        backing.unlink()


def test_writable_disk_is_reflink_clone_on_xfs(xfs_dir: Path) -> None:
    base = xfs_dir / "base.ext4"
    with open(base, "wb") as f:
        f.write(os.urandom(64 << 20))
    os.chmod(base, 0o444)
    before = os.statvfs(xfs_dir)
    disk = prepare_writable(base, xfs_dir / "c1.raw")
    after = os.statvfs(xfs_dir)
    assert disk.format == "raw"
    used = (before.f_bfree - after.f_bfree) * before.f_frsize
    assert used < 4 << 20  # the clone shares the base's 64 MiB
    assert disk.path.read_bytes() == base.read_bytes()
    with open(disk.path, "r+b") as f:  # writing the clone leaves the base alone
        f.write(b"changed")
    assert base.read_bytes()[:7] != b"changed"
