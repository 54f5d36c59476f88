"""Conformance of ember-snapshotter over gRPC, after containerd's snapshot
test suite: layer chains, views, remove ordering, duplicate keys, stat/update
of labels, usage, list, cleanup and restart — against a real server process
with its own XFS pool on a loop device (this host's /tmp is ext4).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from ember_testing.mounts import mounted, wait_loops_gone
from ember_testing.snapshotter import SnapshotterProcess, running_snapshotter
from google.protobuf import field_mask_pb2

from ember.snapshotter.mounts import BlockImage, block_image
from ember.snapshotter.proto import snapshots_pb2 as pb

pytestmark = [pytest.mark.root, pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, mount)")]

VIEW, ACTIVE, COMMITTED = pb.VIEW, pb.ACTIVE, pb.COMMITTED


@pytest.fixture
def sn(tmp_path):
    with running_snapshotter(tmp_path) as proc:
        yield proc


def prepare(stub, key, parent="", labels=None):
    return stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels or {})).mounts


def view(stub, key, parent=""):
    return stub.View(pb.ViewSnapshotRequest(key=key, parent=parent)).mounts


def commit(stub, name, key, labels=None):
    stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {}))


def stat(stub, key):
    return stub.Stat(pb.StatSnapshotRequest(key=key)).info


def remove(stub, key):
    stub.Remove(pb.RemoveSnapshotRequest(key=key))


def usage(stub, key):
    u = stub.Usage(pb.UsageRequest(key=key))
    return u.size, u.inodes


def names(stub, *filters):
    return sorted(i.name for r in stub.List(pb.ListSnapshotsRequest(filters=filters))
                  for i in r.info)


def code_of(fn, *args):
    with pytest.raises(grpc.RpcError) as exc:
        fn(*args)
    return exc.value.code(), exc.value.details()


def layer(stub, tmp_path, key, parent, change):
    """Prepare on ``parent``, mount, apply ``change(root)``, unmount, commit."""
    mounts = prepare(stub, f"{key}-active", parent)
    with mounted(mounts, tmp_path / "mnt") as root:
        change(root)
    commit(stub, key, f"{key}-active")


def test_layer_chain_several_deep_accumulates_changes(sn, tmp_path):
    stub = sn.stub()
    layer(stub, tmp_path, "l1", "", lambda r: ((r / "foo").write_text("foo\n"),
                                              (r / "a/b/c").mkdir(parents=True)))
    layer(stub, tmp_path, "l2", "l1", lambda r: ((r / "bar").write_text("bar\n"),
                                                (r / "foo").write_text("changed\n")))
    layer(stub, tmp_path, "l3", "l2", lambda r: subprocess.run(["rm", "-r", r / "a/b"], check=True))
    layer(stub, tmp_path, "l4", "l3", lambda r: (r / "bar").rename(r / "baz"))
    mounts = view(stub, "top", "l4")
    assert list(mounts[0].options) == ["ro", "loop"] and mounts[0].type == "ext4"
    with mounted(mounts, tmp_path / "view") as root:
        assert sorted(p.name for p in root.iterdir()) == ["a", "baz", "foo"]
        assert (root / "foo").read_text() == "changed\n"
        assert not (root / "a/b").exists()
        assert oct(root.stat().st_mode & 0o777) == "0o755"
    # The lower layers are untouched by their children's changes.
    with mounted(view(stub, "v1", "l1"), tmp_path / "v1") as root:
        assert (root / "foo").read_text() == "foo\n" and (root / "a/b/c").is_dir()
    # Transitivity of parents.
    assert [stat(stub, k).parent for k in ("l1", "l2", "l3", "l4", "top")] == \
        ["", "l1", "l2", "l3", "l4"]


def test_stat_kinds_times_and_parents(sn):
    stub = sn.stub()
    t0 = time.time()
    prepare(stub, "c1-a", labels={"x": "1"})
    commit(stub, "c1", "c1-a", labels={"y": "2"})
    prepare(stub, "a1", "c1")
    view(stub, "v1", "c1")
    view(stub, "v2")
    t1 = time.time()
    for key, kind, parent in [("c1", COMMITTED, ""), ("a1", ACTIVE, "c1"),
                              ("v1", VIEW, "c1"), ("v2", VIEW, "")]:
        info = stat(stub, key)
        assert (info.name, info.kind, info.parent) == (key, kind, parent)
        created = info.created_at.ToNanoseconds() / 1e9
        assert t0 <= created <= t1
        assert info.created_at == info.updated_at
    # Commit replaces the labels rather than inheriting them (containerd does).
    assert dict(stat(stub, "c1").labels) == {"y": "2"}
    assert code_of(stat, stub, "c1-a")[0] == grpc.StatusCode.NOT_FOUND


def test_same_key_twice_and_shared_namespace(sn):
    stub = sn.stub()
    prepare(stub, "base")
    commit(stub, "committed", "base")
    prepare(stub, "k", "committed")
    code, msg = code_of(prepare, stub, "k", "committed")
    assert code == grpc.StatusCode.ALREADY_EXISTS and "'k' already exists" in msg
    assert code_of(view, stub, "k", "committed")[0] == grpc.StatusCode.ALREADY_EXISTS
    view(stub, "vk", "committed")
    assert code_of(view, stub, "vk", "committed")[0] == grpc.StatusCode.ALREADY_EXISTS
    # Keys and committed names are one namespace.
    assert code_of(prepare, stub, "committed")[0] == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(commit, stub, "vk", "k")[0] == grpc.StatusCode.ALREADY_EXISTS
    assert names(stub) == ["committed", "k", "vk"]


def test_bad_parents_and_commits(sn):
    stub = sn.stub()
    prepare(stub, "active")
    view(stub, "view")
    code, msg = code_of(prepare, stub, "child", "active")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg == "parent 'active' is an active snapshot; only committed snapshots can be parents"
    assert code_of(prepare, stub, "child", "view")[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, msg = code_of(prepare, stub, "child", "nope")
    assert code == grpc.StatusCode.NOT_FOUND and "'nope' does not exist" in msg
    assert code_of(commit, stub, "c", "nope")[0] == grpc.StatusCode.NOT_FOUND
    code, msg = code_of(commit, stub, "c", "view")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not an active one" in msg
    commit(stub, "c", "active")
    assert code_of(commit, stub, "c2", "c")[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(prepare, stub, "")[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, msg = code_of(lambda: stub.Mounts(pb.MountsRequest(key="c")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "committed" in msg
    assert code_of(lambda: stub.Mounts(pb.MountsRequest(key="nope")))[0] == \
        grpc.StatusCode.NOT_FOUND
    # Nothing half-made was left by the refused calls.
    assert names(stub) == ["c", "view"] and len(sn.images()) == 2


def test_mounts_match_prepare_and_view(sn):
    stub = sn.stub()
    active = prepare(stub, "a")
    assert stub.Mounts(pb.MountsRequest(key="a")).mounts == active
    m = active[0]
    assert (m.type, list(m.options)) == ("ext4", ["rw", "loop"])
    assert Path(m.source).is_file() and m.source.startswith(str(sn.root))
    commit(stub, "c", "a")
    assert view(stub, "v", "c")[0].options == ["ro", "loop"]


def test_mounts_are_block_images_for_the_shim(sn, tmp_path):
    stub = sn.stub()
    m = prepare(stub, "a")[0]
    img = block_image(m.type, m.source, list(m.options))
    assert img == BlockImage(m.source, "ext4", readonly=False)
    commit(stub, "c", "a")
    v = view(stub, "v", "c")[0]
    assert block_image(v.type, v.source, list(v.options)).readonly
    # Not block images: overlay mounts, an ext4 file without "loop", a missing file.
    assert block_image("overlay", "overlay", ["lowerdir=/x"]) is None
    assert block_image("ext4", v.source, ["ro"]) is None
    assert block_image("ext4", str(tmp_path / "gone.ext4"), ["rw", "loop"]) is None


def test_pool_grows_online_when_asked(sn):
    stub = sn.stub()
    prepare(stub, "a")
    pool = sn.root / "pool"
    before = os.statvfs(pool).f_blocks * os.statvfs(pool).f_frsize
    sn.stop()
    sn.args[sn.args.index("--pool-size") + 1] = "3g"
    sn.start()
    after = os.statvfs(pool).f_blocks * os.statvfs(pool).f_frsize
    assert before < 2 << 30 < after <= 3 << 30
    assert "grew the pool" in sn.log_tail()
    assert stat(sn.stub(), "a").kind == ACTIVE
    sn.stop()
    sn.args[sn.args.index("--pool-size") + 1] = "1g"  # XFS cannot shrink: kept
    sn.start()
    assert os.statvfs(pool).f_blocks * os.statvfs(pool).f_frsize == after


def test_view_is_read_only(sn, tmp_path):
    stub = sn.stub()
    layer(stub, tmp_path, "c", "", lambda r: (r / "f").write_text("x"))
    with mounted(view(stub, "v", "c"), tmp_path / "v") as root:
        with pytest.raises(OSError) as exc:
            (root / "g").write_text("y")
        assert exc.value.errno == 30  # EROFS


def test_remove_ordering_and_files(sn, tmp_path):
    stub = sn.stub()
    prepare(stub, "base-a")
    commit(stub, "base", "base-a")
    prepare(stub, "mid-a", "base")
    commit(stub, "mid", "mid-a")
    prepare(stub, "top", "mid")
    assert len(sn.images()) == 3
    code, msg = code_of(remove, stub, "mid")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "parent of 1" in msg
    assert code_of(remove, stub, "nope")[0] == grpc.StatusCode.NOT_FOUND
    remove(stub, "top")
    remove(stub, "mid")
    remove(stub, "base")
    assert names(stub) == [] and sn.images() == []


def test_update_labels_with_field_masks(sn):
    stub = sn.stub()
    prepare(stub, "c-a")
    commit(stub, "c", "c-a")

    def update(labels, *paths):
        info = pb.Info(name="c", parent="ignored", labels=labels)
        return stub.Update(pb.UpdateSnapshotRequest(
            info=info, update_mask=field_mask_pb2.FieldMask(paths=paths))).info

    created = stat(stub, "c").created_at
    u = update({"l1": "v1", "l2": "v2", "l3": "v3"})
    assert dict(u.labels) == {"l1": "v1", "l2": "v2", "l3": "v3"}
    assert u.parent == "" and u.created_at == created and u.updated_at != created
    u = update({"l1": "updated", "l4": "v4"}, "labels.l1", "labels.l2")
    assert dict(u.labels) == {"l1": "updated", "l3": "v3"}
    u = update({"l4": "v4"}, "labels")
    assert dict(u.labels) == {"l4": "v4"}
    code, msg = code_of(update, {}, "parent")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'parent'" in msg
    assert dict(stat(stub, "c").labels) == {"l4": "v4"}
    with pytest.raises(grpc.RpcError) as exc:
        stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="nope")))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_usage_counts_written_bytes_and_inodes(sn, tmp_path):
    stub = sn.stub()
    layer(stub, tmp_path, "base", "", lambda r: (r / "big").write_bytes(os.urandom(4 << 20)))
    base_size, base_inodes = usage(stub, "base")
    assert base_size >= 4 << 20 and base_inodes >= 1
    prepare(stub, "child", "base")
    size, inodes = usage(stub, "child")
    assert size < 1 << 20 and inodes == 0  # a clone costs (almost) nothing
    with mounted(stub.Mounts(pb.MountsRequest(key="child")).mounts, tmp_path / "m") as root:
        for i in range(3):
            (root / f"f{i}").write_bytes(os.urandom(3 << 20))
    size, inodes = usage(stub, "child")
    assert 9 << 20 <= size < 16 << 20
    assert inodes == 3
    commit(stub, "c", "child")
    assert usage(stub, "c") == (size, inodes)
    assert usage(stub, "base") == (base_size, base_inodes)
    assert code_of(usage, stub, "nope")[0] == grpc.StatusCode.NOT_FOUND


def test_list_with_filters(sn):
    stub = sn.stub()
    prepare(stub, "c-a", labels={})
    commit(stub, "c", "c-a", labels={"containerd.io/gc.root": "x", "team": "a"})
    prepare(stub, "a", "c", labels={"team": "b"})
    view(stub, "v", "c")
    assert names(stub) == ["a", "c", "v"]
    assert names(stub, "kind==committed") == ["c"]
    assert names(stub, "parent==c") == ["a", "v"]
    assert names(stub, 'labels."containerd.io/gc.root"') == ["c"]
    assert names(stub, "labels.team==b") == ["a"]
    assert names(stub, "labels.team~=^[ab]$,kind!=active") == ["c"]
    assert names(stub, "name==v", "name==a") == ["a", "v"]
    code, msg = code_of(names, stub, "name==")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid filter" in msg


def test_cleanup_removes_orphaned_images_only(sn):
    stub = sn.stub()
    prepare(stub, "keep")
    images = sn.root / "pool" / "images"
    (images / "99.ext4").write_bytes(b"orphan")
    (images / ".7.ext4.tmp").write_bytes(b"half-made")
    stub.Cleanup(pb.CleanupRequest())
    assert sn.images() == ["1.ext4"]
    assert stat(stub, "keep").kind == ACTIVE


def test_restart_keeps_everything(sn, tmp_path):
    stub = sn.stub()
    layer(stub, tmp_path, "c", "", lambda r: (r / "data").write_text("kept\n"))
    stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="c", labels={"k": "v"})))
    prepare(stub, "a", "c")
    before = {i.name: i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info}
    assert sn.stop() == 0
    sn.start()  # the pool is still mounted; a restart after reboot remounts it
    stub = sn.stub()
    after = {i.name: i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info}
    assert after == before
    with mounted(stub.Mounts(pb.MountsRequest(key="a")).mounts, tmp_path / "m") as root:
        assert (root / "data").read_text() == "kept\n"
    # Remount from cold: pool unmounted (as after a reboot), then restarted.
    sn.stop()
    subprocess.run(["umount", str(sn.root / "pool")], check=True)
    sn.start()
    assert names(sn.stub()) == ["a", "c"]


def test_refuses_new_snapshots_when_full_and_stays_up(tmp_path):
    proc = SnapshotterProcess(tmp_path / "sn", "--min-free", "64m", pool_size="512m")
    try:
        stub = proc.stub()
        prepare(stub, "a")
        pool = proc.root / "pool"
        st = os.statvfs(pool)
        filler = pool / "filler"
        free = st.f_bavail * st.f_frsize
        # XFS allocates the blocks without writing them: costs the host nothing.
        subprocess.run(["fallocate", "-l", str(free - (32 << 20)), str(filler)], check=True)
        code, msg = code_of(prepare, stub, "b")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert msg.startswith("snapshot storage is full:") and str(pool) in msg
        assert stat(stub, "a").kind == ACTIVE  # still serving
        assert proc.images() == ["1.ext4"]  # nothing half-made
        filler.unlink()
        prepare(stub, "b")
    finally:
        proc.close()


def test_root_on_a_reflink_filesystem_is_used_directly(tmp_path):
    xfs = tmp_path / "xfs.img"
    with open(xfs, "wb") as f:
        f.truncate(400 << 20)
    subprocess.run(["mkfs.xfs", "-q", str(xfs)], check=True)
    mnt = tmp_path / "sn"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(xfs), str(mnt)], check=True)
    proc = None
    try:
        proc = SnapshotterProcess(mnt)
        m = prepare(proc.stub(), "a")[0]
        assert m.source == str(mnt / "root" / "images" / "1.ext4")
        assert not (mnt / "root" / "pool.img").exists()
    finally:
        if proc:
            proc.stop()
        subprocess.run(["umount", str(mnt)], check=True)


def test_cli_errors_leave_nothing_behind(tmp_path):
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "ember.snapshotter.main", *args],
                              capture_output=True, text=True, timeout=60)

    r = run("--root", str(tmp_path / "r"))
    assert r.returncode == 2 and "--address is required" in r.stderr
    r = run("--root", str(tmp_path / "r"), "--address", str(tmp_path / "s"), "--image-size", "big")
    assert r.returncode == 2 and "invalid size 'big'" in r.stderr
    r = run("--root", str(tmp_path / "r2"), "--address", str(tmp_path / "s"), "--pool-size", "10m")
    assert r.returncode == 125 and "too small" in r.stderr
    assert not (tmp_path / "r2" / "pool.img").exists() and not wait_loops_gone(tmp_path)
    proc = SnapshotterProcess(tmp_path / "sn")
    try:
        r = run("--root", str(proc.root), "--address", str(tmp_path / "other.sock"))
        assert r.returncode == 125 and "already serving" in r.stderr
        assert not (tmp_path / "other.sock").exists()
        assert run("--root", str(proc.root), "--release").returncode == 125  # still serving
        proc.stop()
        r = run("--root", str(proc.root), "--release")
        assert r.returncode == 0 and r.stdout.startswith("released")
        assert not os.path.ismount(proc.root / "pool") and not wait_loops_gone(tmp_path)
        assert run("--root", str(proc.root), "--release").stdout == "nothing mounted\n"
    finally:
        proc.close()


def test_used_inodes_reads_the_superblock_as_dumpe2fs_does(tmp_path):
    import re

    from ember.snapshotter.usage import used_inodes

    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(7):
        (tree / f"f{i}").write_text(str(i))
    img = tmp_path / "fs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), "16m"], check=True)
    out = subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True, text=True,
                         check=True).stdout
    count = int(re.search(r"^Inode count:\s+(\d+)", out, re.M).group(1))
    free = int(re.search(r"^Free inodes:\s+(\d+)", out, re.M).group(1))
    assert used_inodes(img) == count - free >= 7 + 11  # the files and ext4's reserved inodes
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(4096))
    assert used_inodes(junk) == 0 and used_inodes(tmp_path / "missing") == 0


def test_sigterm_as_soon_as_it_accepts_is_a_clean_stop(tmp_path):
    """containerd's suite stops a snapshotter right after a quick subtest: the
    signal handlers are in place before the socket accepts, so that SIGTERM
    is a clean stop (exit 0, "stopping" logged), never the default death."""
    for i in range(3):
        with running_snapshotter(tmp_path / f"s{i}") as proc:
            t0 = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(30) == 0, proc.log_tail()
            assert time.monotonic() - t0 < 10, proc.log_tail()
            log = proc.log_path.read_text()
            assert "stopping" in log and "stopped" in log and "Thread 0x" not in log
