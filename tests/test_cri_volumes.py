"""Kubelet-style volumes through containerd's CRI plugin, with runc and with Ember.

The test lays volumes out on the "node" as the kubelet does (emptyDir,
configMap with its atomic ``..data`` swap, a 24 MiB read-only volume, a
termination-log file, a writable hostPath, a filesystem PVC) and runs the
same pod with handler ``runc`` and ``ember``: what a user notices must be
the same, and what Ember cannot carry (a writable PVC) is refused when
containerd creates the task (CRI StartContainer) with the mount named.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import test_cri
from shimtools import BUSYBOX, discard_pod, leftovers

from ember.cri import api_pb2 as api
from ember.cri.client import CRIClient

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.containerd,
              pytest.mark.timeout(900)]

cri, _wait = test_cri.cri, test_cri._wait
VOLUME_DISKS = Path("/var/lib/ember/shim-volumes")


def _atomic_write(vol: Path, stamp: str, files: dict[str, str]) -> None:
    """The kubelet's atomic writer: a timestamped folder, then ..data swapped by rename."""
    gen = vol / f"..{stamp}"
    gen.mkdir()
    for name, text in files.items():
        (gen / name).write_text(text)
    old = os.readlink(vol / "..data") if (vol / "..data").is_symlink() else None
    (vol / "..data_tmp").symlink_to(gen.name)
    os.replace(vol / "..data_tmp", vol / "..data")
    for name in files:
        if not (vol / name).is_symlink():
            (vol / name).symlink_to(f"..data/{name}")
    if old:
        shutil.rmtree(vol / old)


class Node:
    """A kubelet's pod folder on this host."""

    def __init__(self, root: Path) -> None:
        self.root = root
        vols = root / "volumes"
        self.cache = vols / "kubernetes.io~empty-dir" / "cache"
        self.mem = vols / "kubernetes.io~empty-dir" / "mem"  # medium: Memory
        self.cfg = vols / "kubernetes.io~configmap" / "cfg"
        self.copied = [vols / f"kubernetes.io~{kind}" / kind
                       for kind in ("secret", "projected", "downward-api")]
        self.pvc = vols / "kubernetes.io~csi" / "pvc-1" / "mount"
        self.big = root / "big-ro"
        self.hostpath = root / "hostpath"
        self.termlog = root / "containers" / "term" / "0"
        for d in (self.cache, self.mem, self.cfg, self.pvc, self.big, self.hostpath,
                  self.termlog.parent, *self.copied):
            d.mkdir(parents=True)
        os.chmod(self.cache, 0o777)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(self.mem)],
                       check=True)
        _atomic_write(self.cfg, "gen1", {"mode": "old"})
        for d in self.copied:
            _atomic_write(d, "gen1", {"token": f"{d.name}-value"})
            # fsGroup: the kubelet gives the files the pod's group on the node.
            os.chown(d / "..gen1" / "token", 0, 2345)
            os.chmod(d / "..gen1" / "token", 0o440)
        (self.big / "blob").write_bytes(os.urandom(24 << 20))
        self.big_md5 = hashlib.md5((self.big / "blob").read_bytes()).hexdigest()
        (self.hostpath / "seed").write_text("seeded\n")
        self.termlog.write_text("")


def _mount(host: Path, path: str, readonly: bool = False) -> api.Mount:
    return api.Mount(host_path=str(host), container_path=path, readonly=readonly)


def _create(client: CRIClient, pod: str, name: str, command: list[str], mounts: list[api.Mount],
            attempt: int = 0, annotations: dict | None = None) -> str:
    config = api.ContainerConfig(
        metadata=api.ContainerMetadata(name=name, attempt=attempt),
        image=api.ImageSpec(image=BUSYBOX), command=command, mounts=mounts,
        annotations=annotations or {}, linux=api.LinuxContainerConfig())
    resp = client.runtime.CreateContainer(api.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=client._pod_configs[pod]),
        timeout=client.timeout)
    return resp.container_id


def _sh(client: CRIClient, cid: str, script: str) -> str:
    r = client.exec_sync(cid, ["sh", "-c", script])
    assert r.exit_code == 0, (script, r.stdout, r.stderr)
    return r.stdout.decode()


def _run_pod_story(client: CRIClient, handler: str, node: Node) -> dict:
    """Everything a user would look at, as a dict to compare between handlers."""
    seen: dict = {}
    pod = client.run_pod(f"vol-{handler}", runtime_handler=handler)
    try:
        a = _create(client, pod, "a", ["sleep", "1000"], [
            _mount(node.cache, "/cache"), _mount(node.cfg, "/cfg", readonly=True),
            _mount(node.mem, "/mem"),
            *[_mount(d, f"/{d.name}", readonly=True) for d in node.copied],
            _mount(node.big, "/big", readonly=True), _mount(node.hostpath, "/host")])
        client.start_container(a)
        b = _create(client, pod, "b", ["sleep", "1000"], [_mount(node.cache, "/cache")])
        client.start_container(b)
        # emptyDir: one volume for the pod, both ways.
        _sh(client, a, "echo from-a > /cache/a")
        _sh(client, b, "echo from-b > /cache/b")
        seen["b reads a"] = _sh(client, b, "cat /cache/a")
        seen["a reads b"] = _sh(client, a, "cat /cache/b")
        seen["memory emptyDir"] = _sh(client, a, "stat -f -c %T /mem; df -k /mem | tail -1")
        seen["memory emptyDir"] = seen["memory emptyDir"].split()[0:3:2]  # type, size
        seen["secret/projected/downwardAPI"] = _sh(
            client, a, "for k in secret projected downward-api; do "
            "cat /$k/token; echo; stat -L -c '%g %a' /$k/token; done")
        # configMap: the kubelet's swap reaches the container, atomically, within 5 s.
        seen["cfg before"] = _sh(client, a, "cat /cfg/mode")
        _atomic_write(node.cfg, "gen2", {"mode": "new"})
        t0 = time.monotonic()
        assert _wait(lambda: _sh(client, a, "cat /cfg/mode") == "new", 5), "no swap in 5 s"
        seen["cfg swap within 5 s"] = time.monotonic() - t0 <= 5.5
        # A 24 MiB read-only volume is there, whole.
        seen["big md5"] = _sh(client, a, "md5sum /big/blob").split()[0] == node.big_md5
        seen["big read-only"] = client.exec_sync(a, ["sh", "-c", "echo x > /big/new"]).exit_code
        # A writable hostPath: the host sees what the container wrote.
        seen["hostpath seed"] = _sh(client, a, "cat /host/seed")
        _sh(client, a, f"echo {handler} > /host/written")
        seen["hostpath written"] = (node.hostpath / "written").read_text() == f"{handler}\n"
        (node.hostpath / "written").unlink()
        # The termination message reaches the host file the kubelet reads.
        t = _create(client, pod, "term", ["sh", "-c", "echo goodbye > /dev/termination-log; exit 3"],
                    [_mount(node.termlog, "/dev/termination-log")])
        client.start_container(t)
        assert _wait(lambda: client.container_status(t).state == api.CONTAINER_EXITED, 60)
        seen["exit code"] = client.container_status(t).exit_code
        seen["termination message"] = node.termlog.read_text()
        # A restarted container (a new attempt) finds the emptyDir as it was left.
        client.runtime.StopContainer(api.StopContainerRequest(container_id=a, timeout=0),
                                     timeout=client.timeout)
        a2 = _create(client, pod, "a", ["sleep", "1000"], [_mount(node.cache, "/cache")],
                     attempt=1)
        client.start_container(a2)
        seen["restart keeps emptyDir"] = _sh(client, a2, "cat /cache/a /cache/b")
        # A writable PVC cannot be carried by a VM: refused, with the mount named, when
        # containerd creates the task (CRI StartContainer: the runtime's Create).
        try:
            client.start_container(_create(client, pod, "pvc", ["true"],
                                           [_mount(node.pvc, "/data")]))
            seen["pvc"] = "created"
        except grpc.RpcError as exc:
            seen["pvc"] = exc.details()
        client.stop_pod(pod)
        client.remove_pod(pod)
    finally:
        discard_pod(client, pod)
    return seen


def test_kubelet_volumes_behave_as_under_runc(cri, tmp_path: Path) -> None:
    _, work, client = cri
    disks_before = set(VOLUME_DISKS.iterdir()) if VOLUME_DISKS.is_dir() else set()
    nodes = [Node(tmp_path / "runc"), Node(tmp_path / "ember")]
    try:
        runc = _run_pod_story(client, "runc", nodes[0])
        ember = _run_pod_story(client, "ember", nodes[1])
    finally:
        for node in nodes:
            subprocess.run(["umount", "-l", str(node.mem)], capture_output=True)
    assert runc.pop("pvc") == "created"  # runc shares the host's filesystem
    pvc = ember.pop("pvc")
    assert "mount /data: writable csi volume" in pvc and "\n" not in pvc, pvc
    assert ember == runc
    assert runc["b reads a"] == "from-a\n" and runc["termination message"] == "goodbye\n"
    assert runc["memory emptyDir"] == ["tmpfs", "8192"]
    assert "secret-value\n2345 440" in runc["secret/projected/downwardAPI"]
    assert runc["big read-only"] != 0 and runc["restart keeps emptyDir"] == "from-a\nfrom-b\n"
    assert _wait(lambda: not leftovers(work), 30), leftovers(work)
    disks_after = set(VOLUME_DISKS.iterdir()) if VOLUME_DISKS.is_dir() else set()
    assert disks_after <= disks_before, "the pod's volume disks were left behind"
