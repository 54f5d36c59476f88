"""Kubernetes' path: a CRI client (as a kubelet) -> containerd's CRI plugin -> our shim.

RunPodSandbox with runtime handler ``ember`` boots one VM for the pod; two
containers join it (same guest boot id), ExecSync runs in each, and after
StopPodSandbox + RemovePodSandbox nothing is left: no QEMU, no shim, no mount,
no loop device, no pod cgroup the shim made. A second pod checks the crash
path: the shim SIGKILLed mid-pod, containerd's `delete` cleans up. A third
checks pod networking: the container has the IP CNI gave the pod and reaches
an HTTP server the test runs on the host end of the pod's ptp link.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import grpc
import psutil
import pytest
from shimtools import (
    BUSYBOX,
    discard_pod,
    ember_processes,
    leftovers,
    private_containerd,
    shims,
    vmms,
)

from ember.config import load_config
from ember.cri import api_pb2 as api
from ember.cri.client import CRIClient

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.containerd,
              pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cri(guest_assets):
    with private_containerd(cri=True) as (c, work), CRIClient(c.address) as client:
        try:
            yield c, work, client
        finally:
            try:
                pods = client.runtime.ListPodSandbox(api.ListPodSandboxRequest()).items
            except grpc.RpcError:
                pods = []  # CRI did not come up; containerd is stopped below anyway
            for pod in pods:
                discard_pod(client, pod.id)


def _cgroup_of(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return path
    return ""


def _netns_of(client: CRIClient, pod: str) -> str:
    """The pod's network namespace (CNI's), from containerd's verbose sandbox info."""
    resp = client.runtime.PodSandboxStatus(
        api.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=30)
    spec = json.loads(resp.info["info"])["runtimeSpec"]
    path = next(ns["path"] for ns in spec["linux"]["namespaces"] if ns["type"] == "network")
    assert path.startswith("/var/run/netns/") or path.startswith("/run/netns/"), path
    return path


def _qdiscs(netns: str) -> str:
    return subprocess.run(["nsenter", f"--net={netns}", "tc", "qdisc", "show"],
                          capture_output=True, text=True, check=True).stdout


def _wait(cond, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


def test_pod_with_two_containers_runs_in_one_vm(cri, guest_assets) -> None:
    c, work, client = cri
    assert client.version().runtime_name == "containerd"
    parent = f"/ember-cri-{uuid.uuid4().hex[:8]}"
    mem_cgroup_root = Path("/sys/fs/cgroup/memory")
    pod = client.run_pod("ember-pod", runtime_handler="ember", cgroup_parent=parent,
                         memory_bytes=256 << 20, cpu_quota=100000, cpu_period=100000)
    try:
        qemu, shim = vmms(work), shims(work)
        assert len(qemu) == 1 and len(shim) == 1, ember_processes(work)
        # The runtime's options.ConfigPath was honoured: its state_dir holds the pod.
        assert "EMBER_STATE_DIR" not in os.environ
        assert len(list((work / "st" / "shim").iterdir())) == 1
        # Pod Overhead pays for the VM: the VMM and the shim live in the pod's cgroup.
        if mem_cgroup_root.is_dir():
            # (a jailed VMM sits in its jail's cgroup below the pod's: <pod>/<id>)
            vmm_cg = _cgroup_of(qemu[0].pid, "memory")
            assert vmm_cg == parent or vmm_cg.startswith(parent + "/"), vmm_cg
            assert _cgroup_of(shim[0].pid, "memory") == parent

        ids = []
        for name in ("one", "two"):
            cid = client.create_container(pod, name, BUSYBOX, ["sleep", "1000"],
                                          env={"WHO": name})
            client.start_container(cid)
            ids.append(cid)
        assert len(vmms(work)) == 1 and len(shims(work)) == 1, \
            "the containers must join the pod's VM"

        boot_ids, who = [], []
        for cid in ids:
            r = client.exec_sync(cid, ["sh", "-c",
                                       "cat /proc/sys/kernel/random/boot_id; echo $WHO; uname -r"])
            assert r.exit_code == 0, r.stderr
            boot_id, name, release = r.stdout.decode().split()
            boot_ids.append(boot_id)
            who.append(name)
            assert release == guest_assets.kernel_release
        assert boot_ids[0] == boot_ids[1], "both containers must run in the same VM"
        assert who == ["one", "two"]
        bad = client.exec_sync(ids[0], ["sh", "-c", "exit 4"])
        assert bad.exit_code == 4

        # The VM is sized from the pod's resources on top of the configured base.
        mem = client.exec_sync(ids[0], ["cat", "/proc/meminfo"]).stdout.decode()
        total_kib = int(mem.split("MemTotal:")[1].split()[0])
        assert total_kib > load_config().vm.memory_mib * 1024, total_kib
        cpus = client.exec_sync(ids[0], ["sh", "-c", "cat /proc/cpuinfo"]).stdout.decode()
        assert cpus.count("processor") == min(load_config().vm.vcpus + 1,
                                              max(os.cpu_count() or 1, load_config().vm.vcpus))

        # The kubelet's container stats: containerd decodes the shim's cgroup Metrics.
        stats = client.runtime.ContainerStats(api.ContainerStatsRequest(container_id=ids[0]),
                                              timeout=60).stats
        assert stats.memory.working_set_bytes.value > 0 and stats.cpu.timestamp > 0

        st = client.container_status(ids[1])
        assert st.state == api.CONTAINER_RUNNING and st.metadata.name == "two"
        assert client.pod_status(pod).state == api.SANDBOX_READY

        client.stop_pod(pod)
        assert client.container_status(ids[0]).state == api.CONTAINER_EXITED
        assert client.pod_status(pod).state == api.SANDBOX_NOTREADY
        client.remove_pod(pod)
    finally:
        discard_pod(client, pod)  # already removed on the happy path
    assert _wait(lambda: not leftovers(work), 30), leftovers(work)
    assert not (mem_cgroup_root / parent.lstrip("/")).exists(), "pod cgroup left behind"


def test_shim_killed_mid_pod_is_cleaned_up_by_containerd(cri) -> None:
    c, work, client = cri
    pod = client.run_pod("ember-crash", runtime_handler="ember")
    try:
        cid = client.create_container(pod, "app", BUSYBOX, ["sleep", "1000"])
        client.start_container(cid)
        shim, qemu = shims(work), vmms(work)
        assert len(shim) == 1 and len(qemu) == 1
        netns = _netns_of(client, pod)
        assert "ingress" in _qdiscs(netns), "the pod's eth0 is not redirected to the VM"
        os.kill(shim[0].pid, signal.SIGKILL)
        assert _wait(lambda: not psutil.pid_exists(qemu[0].pid), 60), "VM survived its shim"
        assert _wait(lambda: client.container_status(cid).state == api.CONTAINER_EXITED, 30)
        # `delete` removed the tc redirect from CNI's netns (which CNI removes itself later).
        assert _wait(lambda: "ingress" not in _qdiscs(netns), 30), _qdiscs(netns)
        client.stop_pod(pod)
        client.remove_pod(pod)
    finally:
        discard_pod(client, pod)  # already removed on the happy path
    assert _wait(lambda: not leftovers(work), 30), leftovers(work)


def test_pod_network_reaches_the_host_through_the_vm(cri, tmp_path) -> None:
    c, work, client = cri
    pod = client.run_pod("ember-net", runtime_handler="ember")
    server = None
    try:
        pod_ip = client.pod_status(pod).network.ip
        assert pod_ip.startswith("10.77.0."), pod_ip  # the test's CNI subnet
        cid = client.create_container(pod, "app", BUSYBOX, ["sleep", "1000"])
        client.start_container(cid)
        addr = client.exec_sync(cid, ["busybox", "ip", "-o", "-4", "addr", "show", "eth0"])
        assert addr.exit_code == 0, addr.stderr
        assert f" {pod_ip}/" in addr.stdout.decode(), addr.stdout
        route = client.exec_sync(cid, ["busybox", "ip", "route", "show", "default"])
        route = route.stdout.decode()
        gateway = route.split("via")[1].split()[0]  # the host end of CNI's ptp link
        (tmp_path / "hello.txt").write_text("hello from the host\n")
        handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                    directory=str(tmp_path))
        server = http.server.ThreadingHTTPServer((gateway, 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://{gateway}:{server.server_address[1]}/hello.txt"
        # (no -T: this busybox-static's wget crashes with a time-out set)
        got = client.exec_sync(cid, ["busybox", "wget", "-O", "-", url])
        assert got.exit_code == 0, got.stderr
        assert got.stdout.decode() == "hello from the host\n"
        ping = client.exec_sync(cid, ["busybox", "ping", "-c", "1", "-W", "5", gateway])
        assert ping.exit_code == 0, ping.stdout + ping.stderr
        client.stop_pod(pod)
        client.remove_pod(pod)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        discard_pod(client, pod)  # already removed on the happy path
    assert _wait(lambda: not leftovers(work), 30), leftovers(work)
