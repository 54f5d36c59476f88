"""ember-snapshotter behind a real containerd 1.6 (proxy plugin): ctr unpacks
images into block snapshots, the snapshot commands work, a SIGKILL during an
unpack is survived, and removal leaves no image file or loop device behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from ember_testing.containerd import ContainerdInstance
from ember_testing.mounts import loops_under, mounts_under, wait_loops_gone
from ember_testing.oci import Entry, build_oci_archive, busybox_layer
from ember_testing.snapshotter import SnapshotterProcess

pytestmark = [pytest.mark.root, pytest.mark.containerd, pytest.mark.timeout(240),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (containerd, mounts)")]

REF = "localhost/ember-test/busybox:1"
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def shipped_proxy_config(address) -> str:
    """deploy/containerd/snapshotter.toml pointed at the test's socket, so the
    snippet users copy is the one containerd loads here."""
    text = (DEPLOY / "containerd" / "snapshotter.toml").read_text()
    assert tomllib.loads(text)["proxy_plugins"]["ember"]["type"] == "snapshot"
    return text.replace("/run/ember-snapshotter/snapshotter.sock", str(address))


def test_shipped_unit_and_snippet_agree():
    unit = (DEPLOY / "systemd" / "ember-snapshotter.service").read_text()
    snippet = tomllib.loads((DEPLOY / "containerd" / "snapshotter.toml").read_text())
    address = snippet["proxy_plugins"]["ember"]["address"]
    assert f"--address {address}" in unit and "Before=containerd.service" in unit


@pytest.fixture
def stack(tmp_path):
    sn = SnapshotterProcess(tmp_path / "sn")
    ctrd = None
    try:
        ctrd = ContainerdInstance(tmp_path / "ctrd", shipped_proxy_config(sn.address))
        yield sn, ctrd
    finally:
        if ctrd is not None:
            ctrd.stop()
        sn.close()
        assert not wait_loops_gone(tmp_path) and not mounts_under(tmp_path)


def snapshots(ctrd):
    """`ctr snapshots ls` as {key: (parent, kind)}."""
    out = ctrd.ctr("snapshots", "--snapshotter", "ember", "ls").stdout.splitlines()[1:]
    rows = [line.split() for line in out if line.strip()]
    return {r[0]: (r[1] if len(r) == 3 else "", r[-1]) for r in rows}


def remove_all(sn, ctrd, *refs):
    """Delete images (GC'ing their snapshots) and wait until no image file is left."""
    for ref in refs:
        ctrd.ctr("images", "rm", "--sync", ref)
    deadline = time.monotonic() + 20
    while sn.images() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert snapshots(ctrd) == {}
    assert sn.images() == []
    # Only the pool's own loop device is left while the snapshotter runs
    # (image loop devices detach asynchronously after containerd unmounts).
    pool_only = [str(sn.root / "pool.img")]
    while list(loops_under(sn.dir).values()) != pool_only and time.monotonic() < deadline + 5:
        time.sleep(0.05)
    assert list(loops_under(sn.dir).values()) == pool_only


def test_ctr_import_unpacks_into_block_snapshots(stack, tmp_path):
    sn, ctrd = stack
    image = build_oci_archive(tmp_path / "img.tar", REF, [
        busybox_layer(),
        [Entry("/etc/motd", b"hello from layer 2\n"), Entry("/bin/ls", whiteout=True)],
    ])
    out = ctrd.ctr("images", "import", "--snapshotter", "ember", str(image)).stdout
    assert f"unpacking {REF}" in out and "done" in out
    snaps = snapshots(ctrd)
    assert len(snaps) == 2 and {k for _, k in snaps.values()} == {"Committed"}
    top = next(k for k, (parent, _) in snaps.items() if parent)
    base = snaps[top][0]
    assert snaps[base] == ("", "Committed")
    assert len(sn.images()) == 2

    info = json.loads(ctrd.ctr("snapshots", "--snapshotter", "ember", "info", top).stdout)
    assert info["Kind"] == "Committed" and info["Parent"] == base
    usage = ctrd.ctr("snapshots", "--snapshotter", "ember", "usage").stdout
    sizes = {line.split()[0]: line.split()[1:] for line in usage.splitlines()[1:]}
    assert set(sizes) == {top, base}
    # The base layer holds busybox (1.9 MiB) and ~20 files and directories.
    size, unit, inodes = sizes[base]
    assert unit == "MiB" and float(size) >= 1.9 and int(inodes) >= 20

    # A container snapshot on top: mount it the way ctr says, look inside.
    ctrd.ctr("snapshots", "--snapshotter", "ember", "prepare", "c1", top)
    mnt = tmp_path / "rootfs"
    mnt.mkdir()
    cmd = ctrd.ctr("snapshots", "--snapshotter", "ember", "mounts", str(mnt), "c1").stdout
    assert cmd.startswith("mount -t ext4 ") and cmd.strip().endswith("-o rw,loop")
    subprocess.run(cmd, shell=True, check=True)
    try:
        run = subprocess.run(["chroot", str(mnt), "/bin/cat", "/etc/os-release", "/etc/motd"],
                             capture_output=True, text=True, check=True)
        assert "ember-test" in run.stdout and "hello from layer 2" in run.stdout
        assert not (mnt / "bin/ls").exists() and (mnt / "bin/cat").is_symlink()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert "c1" in snapshots(ctrd)
    ctrd.ctr("snapshots", "--snapshotter", "ember", "rm", "c1")
    out = ctrd.ctr("snapshots", "--snapshotter", "ember", "rm", base, check=False)
    assert out.returncode != 0 and "failed precondition" in out.stderr.lower()
    remove_all(sn, ctrd, REF)


def test_sigkill_during_unpack_then_unpack_again(stack, tmp_path):
    sn, ctrd = stack
    layers = [busybox_layer()] + [
        [Entry(f"/data/blob{i}", os.urandom(12 << 20))] for i in range(4)]
    image = build_oci_archive(tmp_path / "big.tar", REF, layers)
    ctr = subprocess.Popen(
        ["ctr", "--address", ctrd.address, "--namespace", ctrd.namespace, "images", "import",
         "--snapshotter", "ember", str(image)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Kill as soon as containerd has prepared the third layer's snapshot.
        deadline = time.monotonic() + 60
        while sn.log_tail(200).count("DEBUG ember.snapshotter.core: active") < 3:
            assert time.monotonic() < deadline and ctr.poll() is None, ctr.stdout.read()
            time.sleep(0.01)
        sn.kill()
        out, _ = ctr.communicate(timeout=60)
    finally:
        if ctr.poll() is None:
            ctr.kill()
            ctr.wait()
    assert ctr.returncode != 0 and "unavailable" in out, out
    sn.start()
    # containerd's gRPC client reconnects to the proxy with back-off, and fails
    # calls fast ("unavailable") until it has: retry the way a user would.
    deadline = time.monotonic() + 30
    while True:
        res = ctrd.ctr("images", "import", "--snapshotter", "ember", str(image), check=False)
        if res.returncode == 0 or "unavailable" not in (res.stderr + res.stdout) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert res.returncode == 0, res.stderr
    snaps = snapshots(ctrd)
    assert len(snaps) == 5 and all(kind == "Committed" for _, kind in snaps.values())
    top = next(k for k in snaps if k not in {p for p, _ in snaps.values()})
    # prepare, not view: ctr 1.6 labels only prepared snapshots as GC roots,
    # and the GC that follows the failed import would collect a view.
    ctrd.ctr("snapshots", "--snapshotter", "ember", "prepare", "check", top)
    mnt = tmp_path / "check"
    mnt.mkdir()
    cmd = ctrd.ctr("snapshots", "--snapshotter", "ember", "mounts", str(mnt), "check").stdout
    subprocess.run(cmd, shell=True, check=True)
    try:
        assert sorted(p.name for p in (mnt / "data").iterdir()) == \
            ["blob0", "blob1", "blob2", "blob3"]
        assert (mnt / "data/blob3").stat().st_size == 12 << 20
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    ctrd.ctr("snapshots", "--snapshotter", "ember", "rm", "check")
    remove_all(sn, ctrd, REF)


def test_ctr_run_with_runc_mounts_the_block_snapshot(stack, tmp_path):
    """containerd's own runc shim mounts ember's Mount (ext4 + "loop") as the
    rootfs: the mounts are standard, not something only Ember understands."""
    sn, ctrd = stack
    image = build_oci_archive(tmp_path / "img.tar", REF, [busybox_layer()])
    ctrd.ctr("images", "import", "--snapshotter", "ember", str(image))
    run = ctrd.ctr("run", "--snapshotter", "ember", "--rm", REF, "c1",
                   "/bin/sh", "-c", "cat /etc/os-release; echo x > /tmp/f; mount | grep ' / '")
    assert "ember-test" in run.stdout
    assert run.stdout.splitlines()[-1].startswith("/dev/loop")
    assert " ext4 " in run.stdout.splitlines()[-1] or "type ext4" in run.stdout
    assert "c1" not in snapshots(ctrd)  # --rm removed the container's snapshot
    remove_all(sn, ctrd, REF)
