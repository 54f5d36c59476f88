"""Pod volumes without filesystem sharing: how each host bind mount is carried,
and the copy sync that keeps the kubelet's atomic ``..data`` swap atomic.

The host side (ember.shim.volumes) is driven against the real guest side
(ember.agent.volumes) on a temp folder, so what a sync writes is what a
container would read.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.agent import volumes as guest
from ember.agent.proto import agent_pb2 as pb
from ember.shim import volumes
from ember.shim.volumes import PodVolumes, VolumeError, classify
from ember.ttrpc import TTRPCError


class LocalAgent:
    """The agent's volume RPCs, served in-process on a temp folder as /run/ember."""

    def __init__(self) -> None:
        self.v = guest.Volumes()
        self.calls: list[pb.SyncTreeRequest] = []

    def sync_tree(self, root, entries, remove=None, tmpfs=False, tmpfs_size=0):
        req = pb.SyncTreeRequest(root=root, entries=entries, remove=remove or [])
        self.calls.append(req)
        self.v.sync_tree(req)

    def read_file(self, path, max_bytes=0, offset=0):
        r = self.v.read_file(pb.ReadFileRequest(path=path, max_bytes=max_bytes, offset=offset))
        return r.data if r.exists else None

    def list_tree(self, root):
        return list(self.v.list_tree(pb.ListTreeRequest(root=root)).entries)


@pytest.fixture
def run_root(tmp_path, monkeypatch):
    root = tmp_path / "guest-run-ember"
    root.mkdir()
    monkeypatch.setattr(guest, "ROOT", str(root))
    monkeypatch.setattr(volumes, "GUEST_VOLUMES", f"{root}/volumes")
    monkeypatch.setattr(volumes, "GUEST_FILES", f"{root}/files")
    return root


def _bind(src, dest, *opts):
    return {"destination": dest, "type": "bind", "source": str(src),
            "options": ["rbind", *opts]}


def _atomic_writer(vol: Path, stamp: str, files: dict[str, str]) -> None:
    """What the kubelet does on the node: a timestamped dir, then swap ..data."""
    d = vol / f"..{stamp}"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    tmp = vol / "..data_tmp"
    tmp.symlink_to(d.name)
    old = os.readlink(vol / "..data") if (vol / "..data").is_symlink() else None
    os.replace(tmp, vol / "..data")
    for name in files:
        if not (vol / name).is_symlink():
            (vol / name).symlink_to(f"..data/{name}")
    if old:
        import shutil
        shutil.rmtree(vol / old)


def _kubelet_dir(tmp_path: Path, kind: str, name: str) -> Path:
    p = tmp_path / "pods" / "uid1" / "volumes" / f"kubernetes.io~{kind}" / name
    p.mkdir(parents=True)
    return p


def test_each_mount_is_carried_or_refused_by_kind(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    empty = _kubelet_dir(tmp_path, "empty-dir", "cache")
    cm = _kubelet_dir(tmp_path, "configmap", "cfg")
    small = tmp_path / "small"
    small.mkdir()
    (small / "a").write_text("A")
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob").write_bytes(os.urandom(24 << 20))
    assert classify({"destination": "/proc", "type": "proc", "source": "proc"}) == "keep"
    assert classify(_bind(hosts, "/etc/hosts", "rw")) == "file"
    assert classify(_bind(empty, "/cache", "rw")) == "emptydir"
    assert classify(_bind(cm, "/etc/cfg", "ro")) == "copy"
    assert classify(_bind(small, "/small", "ro")) == "copy"
    assert classify(_bind(big, "/big", "ro")) == "packed"  # never silently dropped
    (tmp_path / "shm").mkdir()
    assert classify(_bind(tmp_path / "shm", "/dev/shm")) == "shm"


@pytest.mark.parametrize("mount, message", [
    (lambda t: _bind(t / "pods/u/volumes/kubernetes.io~csi/pvc1", "/data", "rw"),
     "mount /data: writable csi volume"),
    (lambda t: _bind(t / "big", "/data", "rw"), "mount /data: writable host directory"),
    (lambda t: _bind(t / "data", "/data", "rshared"), "rshared propagation"),
    (lambda t: _bind(t / "data", "/data", "ro", "rslave"), "rslave propagation"),
    (lambda t: _bind(t / "nope", "/x", "ro"), "host path"),
])
def test_what_cannot_be_carried_is_refused_naming_the_mount(tmp_path, mount, message) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "pods/u/volumes/kubernetes.io~csi/pvc1").mkdir(parents=True)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "f").write_bytes(b"x" * (volumes.COPY_MAX_BYTES + 1))
    with pytest.raises(VolumeError, match=message) as e:
        classify(mount(tmp_path))
    assert "\n" not in str(e.value)


def test_check_refuses_before_anything_is_made(tmp_path: Path) -> None:
    pvc = tmp_path / "pods/u/volumes/kubernetes.io~nfs/share"
    pvc.mkdir(parents=True)
    pv = PodVolumes(tmp_path / "disks")
    with pytest.raises(VolumeError, match="writable nfs volume"):
        pv.check({"mounts": [_bind(pvc, "/data", "rw")]})
    assert not (tmp_path / "disks").exists()


def test_block_volume_devices_are_refused_privileged_host_devices_dropped() -> None:
    dev = {"path": "/dev/xvda", "type": "b", "major": 7, "minor": 3}
    with pytest.raises(VolumeError, match="device /dev/xvda"):
        volumes.check_devices({"linux": {"devices": [dev]}})
    spec = {"linux": {"devices": [dev], "resources": {"devices": [{"allow": True,
                                                                   "access": "rwm"}]}}}
    volumes.check_devices(spec)
    assert spec["linux"]["devices"] == []


@pytest.mark.parametrize("text, value", [("512Mi", 512 << 20), ("1Gi", 1 << 30),
                                         ("2G", 2 * 10**9), ("4096", 4096)])
def test_parse_size(text, value) -> None:
    assert volumes.parse_size(text) == value


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(VolumeError, match="'lots'"):
        volumes.parse_size("lots")


def _guest_view(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_text()
    return out


def test_configmap_swap_reaches_the_guest_atomically(tmp_path: Path, run_root: Path) -> None:
    vol = _kubelet_dir(tmp_path, "configmap", "cfg")
    _atomic_writer(vol, "2026_1", {"mode": "old", "level": "1"})
    agent = LocalAgent()
    pv = PodVolumes(tmp_path / "disks")
    pv.pod = type("P", (), {"agent": agent, "vm": None})()
    mounts = pv.carry({"mounts": [_bind(vol, "/etc/cfg", "ro")]}, "c1")
    gdir = Path(mounts[0]["source"])
    assert gdir.is_relative_to(run_root)
    assert (gdir / "mode").read_text() == "old" and os.readlink(gdir / "..data") == "..2026_1"
    # A second container naming the same volume shares the copy.
    again = pv.carry({"mounts": [_bind(vol, "/cfg2", "ro")]}, "c2")
    assert again[0]["source"] == str(gdir)
    _atomic_writer(vol, "2026_2", {"mode": "new", "level": "2"})
    agent.calls.clear()
    assert pv.sync_once(pv._synced[0])
    assert (gdir / "mode").read_text() == "new" and (gdir / "level").read_text() == "2"
    assert not (gdir / "..2026_1").exists()  # the old generation is removed, last
    last = agent.calls[-1]
    assert [e.path for e in last.entries if e.kind == pb.TreeEntry.SYMLINK] == ["..data"]
    assert list(last.remove) == ["..2026_1"]
    # Nothing changed: no call at all.
    agent.calls.clear()
    assert not pv.sync_once(pv._synced[0]) and not agent.calls
    pv.close()


def test_large_copies_are_sent_in_frames_that_fit(tmp_path: Path, run_root: Path) -> None:
    src = tmp_path / "ro"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(bytes([i]) * (1 << 20))
    agent = LocalAgent()
    pv = PodVolumes(tmp_path / "disks")
    pv.pod = type("P", (), {"agent": agent, "vm": None})()
    [m] = pv.carry({"mounts": [_bind(src, "/ro", "ro")]}, "c1")
    assert len(agent.calls) >= 3
    assert all(sum(len(e.data) for e in c.entries) <= volumes.BATCH_BYTES for c in agent.calls)
    assert (Path(m["source"]) / "f5").read_bytes() == bytes([5]) * (1 << 20)
    pv.close()


def test_termination_message_is_written_back_to_the_host(tmp_path: Path,
                                                         run_root: Path) -> None:
    log = tmp_path / "termlog"
    log.write_text("")
    agent = LocalAgent()
    pv = PodVolumes(tmp_path / "disks")
    pv.pod = type("P", (), {"agent": agent, "vm": None})()
    [m] = pv.carry({"mounts": [_bind(log, "/dev/termination-log", "rw")]}, "c1")
    Path(m["source"]).write_text("bye: disk full\n")  # what the container writes
    pv.container_exited("c1")
    assert log.read_text() == "bye: disk full\n"
    pv.container_removed("c1")
    assert not Path(m["source"]).exists()


def test_guest_side_refuses_paths_outside_and_through_symlinks(run_root: Path) -> None:
    v = guest.Volumes()
    for root, rel in [("/etc", "x"), (f"{run_root}/../etc", "x"), (f"{run_root}/v", "../x"),
                      (f"{run_root}/v", "/abs")]:
        with pytest.raises(TTRPCError):
            v.sync_tree(pb.SyncTreeRequest(root=root, entries=[pb.TreeEntry(path=rel)]))
    (run_root / "v").mkdir()
    (run_root / "v" / "link").symlink_to("/etc")
    with pytest.raises(TTRPCError, match="symlink"):
        v.sync_tree(pb.SyncTreeRequest(root=f"{run_root}/v", entries=[
            pb.TreeEntry(path="link/passwd", data=b"x")]))
    with pytest.raises(TTRPCError):
        v.read_file(pb.ReadFileRequest(path=f"{run_root}/v/link"))
    assert not v.read_file(pb.ReadFileRequest(path=f"{run_root}/v/none")).exists


def test_writable_host_folder_is_a_two_way_copy(tmp_path: Path, run_root: Path) -> None:
    host = tmp_path / "hostdir"
    (host / "sub").mkdir(parents=True)
    (host / "sub" / "in").write_text("from host")
    agent = LocalAgent()
    pv = PodVolumes(tmp_path / "disks")
    pv.pod = type("P", (), {"agent": agent, "vm": None})()
    assert classify(_bind(host, "/data", "rw")) == "rwcopy"
    [m] = pv.carry({"mounts": [_bind(host, "/data", "rw")]}, "c1")
    g = Path(m["source"])
    assert (g / "sub" / "in").read_text() == "from host"
    # The container writes, makes a folder, deletes: the host sees it at the exec's exit.
    (g / "out").write_bytes(b"y" * (5 << 20))  # more than one read chunk
    (g / "newdir").mkdir()
    (g / "sub" / "in").unlink()
    pv.process_exited("c1", init=False)
    assert (host / "out").read_bytes() == b"y" * (5 << 20)
    assert (host / "newdir").is_dir() and not (host / "sub" / "in").exists()
    # ... and a host change still flows in, without echoing the guest's writes back.
    (host / "late").write_text("later")
    agent.calls.clear()
    assert pv.sync_once(pv._synced[0])
    assert (g / "late").read_text() == "later"
    assert [e.path for c in agent.calls for e in c.entries] == ["late"]
    # A symlink planted by the guest is copied as a link, never written through.
    (g / "esc").symlink_to(str(tmp_path / "outside"))
    (tmp_path / "outside").mkdir()
    pv.process_exited("c1", init=False)
    assert (host / "esc").is_symlink() and not list((tmp_path / "outside").iterdir())
    with pytest.raises(VolumeError, match="not a folder"):
        volumes.apply_to_host(host, "esc/x", pb.TreeEntry(path="esc/x"), b"z")
    pv.close()


@pytest.mark.root
def test_a_host_mount_made_inside_a_volume_is_not_copied(tmp_path: Path) -> None:
    """critest's rprivate spec: a mount the host makes in the volume after the
    container started must not show up in the container."""
    import subprocess

    vol, other = tmp_path / "vol", tmp_path / "other"
    (vol / "mnt").mkdir(parents=True)
    other.mkdir()
    (other / "flagFile").write_text("x")
    subprocess.run(["mount", "--bind", str(other), str(vol / "mnt")], check=True)
    try:
        tree = volumes.scan(vol)
    finally:
        subprocess.run(["umount", "-l", str(vol / "mnt")], check=True)
    assert "mnt" in tree and "mnt/flagFile" not in tree
