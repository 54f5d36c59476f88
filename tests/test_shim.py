"""containerd-shim-ember-v2 without a VM: the start/delete protocol, error codes,
events (through a real containerd), rootfs conversion, spec rewriting, sizing.

The VM-booting end-to-end tests are in test_shim_containerd.py and test_cri.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from ember_testing.mounts import loops_under, mounts_under

from ember.config import Config
from ember.sandbox.podcgroup import expand_systemd_slice, pod_cgroup
from ember.shim import guestspec, rootfs
from ember.shim.events import Publisher
from ember.shim.pod import vm_size
from ember.shim.proto import events_pb2 as ev
from ember.shim.proto import task_pb2 as pb
from ember.ttrpc import Client, Code, TTRPCError

SHIM = [sys.executable, "-m", "ember.shim.main"]
TASK = "containerd.task.v2.Task"


@pytest.fixture
def state_dir():
    d = Path(tempfile.mkdtemp(prefix="emb-sh-", dir="/tmp"))
    try:
        yield d
    finally:
        for p in psutil.process_iter(["cmdline"]):
            if str(d) in " ".join(p.info["cmdline"] or []):
                p.kill()
        subprocess.run(["rm", "-rf", str(d)], check=False)


def shim_cmd(*args: str, bundle: Path, state: Path, stdin: bytes = b"",
             timeout: float = 20, env_extra: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    env = {**os.environ, "EMBER_STATE_DIR": str(state), **(env_extra or {})}
    env.pop("TTRPC_ADDRESS", None)
    return subprocess.run([*SHIM, "-namespace", "ns1", "-address", str(state / "ctrd.sock"),
                           "-publish-binary", "/usr/bin/containerd", *args], cwd=bundle,
                          input=stdin, capture_output=True, timeout=timeout, env=env)


def start_shim(bundle: Path, state: Path, cid: str = "c1") -> tuple[str, Client]:
    t0 = time.monotonic()
    res = shim_cmd("-id", cid, "start", bundle=bundle, state=state)
    assert res.returncode == 0, res.stderr.decode()
    # containerd waits for start's output to close: the server must not hold it.
    assert time.monotonic() - t0 < 10
    address = res.stdout.decode()
    return address, Client.connect_unix(address.removeprefix("unix://"))


def test_start_prints_unix_address_and_serves(state_dir: Path) -> None:
    bundle = state_dir / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{not json")
    address, client = start_shim(bundle, state_dir)
    with client:
        # unix:// keeps containerd from dialling an abstract socket; Unix paths are short.
        assert address.startswith("unix:///") and "\n" not in address
        assert len(address.removeprefix("unix://")) <= 106
        assert (bundle / "address").read_text() == address
        # A second start for the same id finds the running server instead of a new one.
        again = shim_cmd("-id", "c1", "start", bundle=bundle, state=state_dir)
        assert again.stdout.decode() == address

        # Bad input gets containerd's error codes and the shim stays up.
        cases = [
            ("Create", pb.CreateTaskRequest(id="c1", bundle=str(bundle)), Code.INVALID_ARGUMENT),
            ("Create", pb.CreateTaskRequest(id="../x", bundle=str(bundle)), Code.INVALID_ARGUMENT),
            ("State", pb.StateRequest(id="c1", exec_id="nope"), Code.NOT_FOUND),
            ("Kill", pb.KillRequest(id="nope", signal=9), Code.NOT_FOUND),
            ("Wait", pb.WaitRequest(id="nope"), Code.NOT_FOUND),
            ("Checkpoint", pb.CheckpointTaskRequest(id="c1"), Code.UNIMPLEMENTED),
        ]
        for method, req, code in cases:
            with pytest.raises(TTRPCError) as err:
                client.call(TASK, method, req, timeout=10)
            assert err.value.code == code, (method, err.value)
        (bundle / "config.json").write_text(json.dumps({"process": {"args": []}}))
        with pytest.raises(TTRPCError) as err:
            client.call(TASK, "Create", pb.CreateTaskRequest(id="c1", bundle=str(bundle)))
        assert err.value.code == Code.INVALID_ARGUMENT and "process.args" in err.value.message
        # Nothing half-made stays behind a failed Create.
        pod = Path(address.removeprefix("unix://")).parent
        assert not (pod / "c").exists() or not any((pod / "c").iterdir())

        client.call(TASK, "Shutdown", pb.ShutdownRequest(id="c1"), timeout=10)
    deadline = time.monotonic() + 10
    while pod.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pod.exists(), "the shim did not clean its folder on shutdown"


def test_delete_is_fast_idempotent_and_reports_a_kill(state_dir: Path) -> None:
    bundle = state_dir / "b2"
    bundle.mkdir()
    address, client = start_shim(bundle, state_dir, "c2")
    pod = Path(address.removeprefix("unix://")).parent
    shim_pid = json.loads((pod / "pod.json").read_text())["shim_pid"]
    client.close()
    psutil.Process(shim_pid).kill()
    psutil.Process(shim_pid).wait(5)
    for _ in range(2):  # containerd may run it more than once
        t0 = time.monotonic()
        res = shim_cmd("-id", "c2", "-bundle", str(bundle), "delete", bundle=bundle,
                       state=state_dir)
        assert res.returncode == 0, res.stderr.decode()
        assert time.monotonic() - t0 < 5
        resp = pb.DeleteResponse.FromString(res.stdout)
        assert resp.exit_status == 137 and resp.exited_at.seconds > 0
        assert not pod.exists()


def test_start_of_a_pods_second_container_finds_its_shim_and_loads_no_vm_code(
        state_dir: Path) -> None:
    """containerd runs `start` for every container of a pod and waits for it: for a
    member it must only find the pod's shim. It answers with the pod's address,
    and (Python's own import log) never loads the VM, fork-server or task code."""
    from google.protobuf import any_pb2

    from ember.shim.proto import options_pb2

    sandbox = state_dir / "sb"
    sandbox.mkdir()
    address, client = start_shim(sandbox, state_dir, "sb1")
    with client:
        member = state_dir / "member"
        member.mkdir()
        (member / "config.json").write_text(json.dumps({"annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "sb1"}}))
        options = any_pb2.Any(type_url="containerd.runc.v1.Options",
                              value=options_pb2.Options().SerializeToString())
        env_extra = {"PYTHONPROFILEIMPORTTIME": "1"}
        res = shim_cmd("-id", "c9", "start", bundle=member, state=state_dir,
                       stdin=options.SerializeToString(), env_extra=env_extra)
        assert res.returncode == 0, res.stderr.decode()
        assert res.stdout.decode() == address
        loaded = {line.rsplit("|", 1)[1].strip() for line in res.stderr.decode().splitlines()
                  if line.startswith("import time:") and "|" in line}
        assert "ember.shim.layout" in loaded  # the log is there
        heavy = {"ember.sandbox.vm", "ember.sandbox.forkserver", "ember.shim.service",
                 "ember.shim.pod", "ember.shim.proto.task_pb2", "ember.ttrpc", "pyroute2"}
        assert not loaded & heavy, sorted(loaded & heavy)
        client.call(TASK, "Shutdown", pb.ShutdownRequest(id="sb1"), timeout=10)


@pytest.mark.parametrize("prefix,type_key,id_key", [
    ("io.kubernetes.cri.", "container-type", "sandbox-id"),   # containerd's CRI
    ("io.kubernetes.cri-o.", "ContainerType", "SandboxID"),   # CRI-O
])
def test_start_of_a_pod_member_without_its_sandbox_fails_cleanly(
        state_dir: Path, prefix: str, type_key: str, id_key: str) -> None:
    bundle = state_dir / "b3"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["true"]}, "annotations": {
        prefix + type_key: "container", prefix + id_key: "nosuchsandbox"}}))
    res = shim_cmd("-id", "c3", "start", bundle=bundle, state=state_dir)
    assert res.returncode == 1
    assert b"sandbox nosuchsandbox" in res.stderr and res.stderr.count(b"\n") == 1
    assert not (state_dir / "shim").exists() or not any((state_dir / "shim").iterdir())


def test_publisher_without_address_drops_events_quietly() -> None:
    pub = Publisher("k8s.io", "", "", "")  # CRI-O gives no address
    assert not pub.enabled
    pub.publish(ev.TaskExit(container_id="x", exit_status=1))
    assert pub.flush(1.0)
    pub.close()


# ------------------------------------------------------------ events via containerd
@pytest.fixture(scope="module")
def containerd():
    from ember_testing.containerd import ContainerdInstance

    if os.geteuid() != 0:
        pytest.skip("needs root")
    d = Path(tempfile.mkdtemp(prefix="emb-ev-", dir="/tmp"))
    c = ContainerdInstance(d / "c")
    try:
        yield c
    finally:
        c.stop()
        subprocess.run(["rm", "-rf", str(d)], check=False)


def _collect_events(c, n: int, timeout: float = 20) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(["ctr", "--address", c.address, "events"], stdout=subprocess.PIPE,
                            text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
    threading.Thread(target=read, daemon=True).start()
    time.sleep(0.5)  # subscribed
    return proc, lines


@pytest.mark.containerd
@pytest.mark.root
@pytest.mark.parametrize("via", ["ttrpc", "publish-binary"])
def test_events_reach_containerd_in_order(containerd, via: str) -> None:
    proc, lines = _collect_events(containerd, 4)
    try:
        ttrpc = containerd.address + ".ttrpc" if via == "ttrpc" else "/nonexistent/ttrpc.sock"
        pub = Publisher("ns-" + via, ttrpc, containerd.address, "/usr/bin/containerd")
        cid = f"ev-{via}"
        pub.publish(ev.TaskCreate(container_id=cid, bundle="/b", pid=42))
        pub.publish(ev.TaskStart(container_id=cid, pid=42))
        pub.publish(ev.TaskExit(container_id=cid, id=cid, pid=42, exit_status=3))
        pub.publish(ev.TaskDelete(container_id=cid, pid=42, exit_status=3))
        assert pub.flush(20)
        pub.close()
        deadline = time.monotonic() + 10
        while sum(cid in ln for ln in lines) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    mine = [ln for ln in lines if cid in ln]
    # "DATE TIME +0000 UTC NAMESPACE TOPIC {payload as JSON}"
    fields = [ln.split(None, 6) for ln in mine]
    assert [f[5] for f in fields] == ["/tasks/create", "/tasks/start", "/tasks/exit",
                                      "/tasks/delete"], lines
    assert all(f[4] == "ns-" + via for f in fields)
    # containerd decoded the payloads: only possible with the bare type URL.
    assert json.loads(fields[2][6])["exit_status"] == 3


# ----------------------------------------------------------------- pure functions
def test_vm_size_from_annotations_plus_base() -> None:
    cfg = Config()
    cfg.vm.memory_mib, cfg.vm.vcpus = 256, 1
    ann = {"io.kubernetes.cri.sandbox-id": "s", "io.kubernetes.cri.sandbox-memory": str(128 << 20),
           "io.kubernetes.cri.sandbox-cpu-quota": "50000",
           "io.kubernetes.cri.sandbox-cpu-period": "100000"}
    assert vm_size(cfg, {}, ann) == (2, 384)
    assert vm_size(cfg, {}, {"io.kubernetes.cri.sandbox-id": "s"}) == (1, 256)
    lone = {"linux": {"resources": {"memory": {"limit": 64 << 20}}}}
    assert vm_size(cfg, lone, {}) == (1, 320)
    from ember.shim.pod import SizeError

    with pytest.raises(SizeError, match="sandbox-memory"):
        vm_size(cfg, {}, {**ann, "io.kubernetes.cri.sandbox-memory": "lots"})


def test_pod_cgroup_from_cgroups_path() -> None:
    assert pod_cgroup("/kubepods/besteffort/pod123/abc") == "/kubepods/besteffort/pod123"
    assert pod_cgroup("/default/c1") == "/default"
    assert pod_cgroup("/c1") is None and pod_cgroup("") is None
    assert pod_cgroup("kubepods-besteffort-pod1.slice:cri-containerd:abc") == \
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice"
    assert expand_systemd_slice("-.slice") == "/"


def test_guest_spec_drops_host_paths_and_leaves_mounts_to_the_volumes(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    vol = tmp_path / "vol"
    (vol / "sub").mkdir(parents=True)
    (vol / "sub" / "a").write_text("A")
    spec = {
        "process": {"args": ["sh"], "apparmorProfile": "cri-containerd.apparmor.d"},
        "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
        "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"},
                                 {"type": "pid", "path": "/proc/77/ns/pid"}, {"type": "mount"}],
                  "cgroupsPath": "/kubepods/pod1/c1"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/etc/hosts", "type": "bind", "source": str(hosts),
                    "options": ["rbind", "rprivate", "rw"]},
                   {"destination": "/data", "type": "bind", "source": str(vol),
                    "options": ["rbind"]},
                   {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm",
                    "options": ["rbind"]},
                   {"destination": "/gone", "type": "bind", "source": "/nonexistent/x",
                    "options": ["rbind"]}],
    }
    out, files = guestspec.for_guest(spec, "c1")
    assert spec["linux"]["namespaces"][0]["path"]  # the original is left alone
    assert all("path" not in ns for ns in out["linux"]["namespaces"])
    assert out["linux"]["cgroupsPath"] == "/ember/c1"
    assert "hooks" not in out and "apparmorProfile" not in out["process"]
    # Mounts are carried by ember.shim.volumes (tests/test_volumes.py), not here.
    assert out["mounts"] == spec["mounts"] and files == []


# ------------------------------------------------------------------- rootfs
def _debugfs_cat(image: Path, path: str) -> bytes:
    res = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True)
    return res.stdout


@pytest.mark.root
def test_overlay_mounts_become_a_cached_base_and_a_private_overlay(tmp_path: Path) -> None:
    low1, low2 = tmp_path / "l1", tmp_path / "l2"
    (low1 / "etc").mkdir(parents=True)
    (low1 / "etc" / "motd").write_text("one\n")
    (low1 / "etc" / "gone").write_text("x\n")
    (low2 / "etc").mkdir(parents=True)
    (low2 / "etc" / "motd").write_text("two\n")
    os.mknod(low2 / "etc" / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # overlay whiteout
    upper, work = tmp_path / "up", tmp_path / "wk"
    upper.mkdir()
    work.mkdir()
    m = rootfs.MountSpec("overlay", "overlay", [f"lowerdir={low2}:{low1}", f"upperdir={upper}",
                                                f"workdir={work}"])
    cache = tmp_path / "cache"
    d1 = rootfs.prepare([m], tmp_path / "bundle", tmp_path / "c1", cache)
    d2 = rootfs.prepare([m], tmp_path / "bundle", tmp_path / "c2", cache)
    assert d1.format == "qcow2" and d1.owned and d1.path != d2.path
    bases = list(cache.glob("*.ext4"))
    assert len(bases) == 1, "the layer stack must be flattened once"
    assert _debugfs_cat(bases[0], "/etc/motd") == b"two\n"
    assert _debugfs_cat(bases[0], "/etc/gone") == b""
    assert not mounts_under(tmp_path) and not loops_under(tmp_path)

    # Something in the upper dir (copied image volumes): the merged view is copied instead.
    (upper / "vol").mkdir()
    (upper / "vol" / "f").write_text("up\n")
    d3 = rootfs.prepare([m], tmp_path / "bundle", tmp_path / "c3", cache)
    assert d3.format == "raw" and _debugfs_cat(d3.path, "/vol/f") == b"up\n"
    assert not mounts_under(tmp_path)

    # The layers are gone (image removed): the stale base is evicted on the next build.
    subprocess.run(["rm", "-rf", str(low1), str(low2)], check=True)
    low3 = tmp_path / "l3"
    low3.mkdir()
    (low3 / "f").write_text("3")
    m3 = rootfs.MountSpec("bind", str(low3), ["rbind", "ro"])
    rootfs.prepare([m3], tmp_path / "bundle", tmp_path / "c4", cache)
    rootfs.cached_base([str(low3)], cache, tmp_path / "mnt")
    assert bases[0] not in list(cache.glob("*.ext4"))


def test_block_snapshotter_mounts_are_attached_without_copy(tmp_path: Path) -> None:
    img = tmp_path / "snap.ext4"
    img.write_bytes(b"\0" * 4096)
    d = rootfs.prepare([rootfs.MountSpec("ext4", str(img), ["rw", "loop"])], tmp_path,
                       tmp_path / "c", tmp_path / "cache")
    assert d.path == img and d.format == "raw" and not d.owned and not d.readonly
    with pytest.raises(rootfs.RootfsError, match="not supported"):
        rootfs.prepare([rootfs.MountSpec("nfs", "srv:/x", [])], tmp_path, tmp_path / "c",
                       tmp_path / "cache")
    with pytest.raises(rootfs.RootfsError, match="does not exist"):
        rootfs.prepare([rootfs.MountSpec("ext4", str(tmp_path / "none.ext4"), ["loop"])],
                       tmp_path, tmp_path / "c", tmp_path / "cache")
    with pytest.raises(rootfs.RootfsError, match="not a loop device"):
        rootfs.loop_backing_file("/dev/null")


@pytest.mark.root
def test_loop_device_mount_resolves_to_its_file(tmp_path: Path) -> None:
    img = tmp_path / "snap.ext4"
    subprocess.run(["truncate", "-s", "8M", str(img)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        d = rootfs.prepare([rootfs.MountSpec("ext4", dev, [])], tmp_path, tmp_path / "c",
                           tmp_path / "cache")
        assert d.path == img and not d.owned
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.containerd
@pytest.mark.root
def test_deploy_snippet_registers_the_ember_handlers_with_cri(tmp_path: Path) -> None:
    """deploy/containerd/ember-runtime.toml, as shipped, loads into containerd 1.6's CRI."""
    from ember_testing.containerd import ContainerdInstance

    from ember.cri import api_pb2 as api
    from ember.cri.client import CRIClient

    snippet = (Path(__file__).parent.parent / "deploy/containerd/ember-runtime.toml").read_text()
    snippet = snippet.replace("version = 2\n", "")  # the instance's config says it already
    d = Path(tempfile.mkdtemp(prefix="emb-dp-", dir="/tmp"))
    try:
        with ContainerdInstance(d / "c", snippet, cri=True) as c, CRIClient(c.address) as cri:
            status = cri.runtime.Status(api.StatusRequest(verbose=True), timeout=30)
            config = json.loads(status.info["config"])
            runtimes = config["containerd"]["runtimes"]
            assert runtimes["ember"]["runtimeType"] == "io.containerd.ember.v2"
            assert runtimes["ember-fc"]["options"]["ConfigPath"] == "/etc/ember/firecracker.toml"
            assert config["restrictOOMScoreAdj"] is True
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)
