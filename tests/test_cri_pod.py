"""A pod behaves like a Kubernetes pod: through containerd's CRI plugin, as the kubelet does.

Two containers of one pod see the pod's hostname, one IPC namespace (and the
pod's IPC sysctls), and each other's processes only when the pod shares its
PID namespace. A StopContainer right after StartContainer returns as soon as
the program exits, although its SIGTERM came before it caught SIGTERM. Kill
of an exited task answers "not found", as runc's shim does. A pod asking for
the host's network, PID or IPC namespace is refused at once, with the reason,
and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import grpc
import pytest
import test_cri
from shimtools import BUSYBOX, RUNTIME, discard_pod, leftovers, shims, vmms

from ember.cri import api_pb2 as api
from ember.cri.client import CRIClient

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.containerd,
              pytest.mark.timeout(900)]


# The CRI set-up of test_cri: a private containerd with the ember handler, pods discarded.
cri, _wait = test_cri.cri, test_cri._wait


def _namespaces(pid: int = api.CONTAINER, network: int = api.POD,
                ipc: int = api.POD) -> api.NamespaceOption:
    return api.NamespaceOption(network=network, pid=pid, ipc=ipc)


def run_pod(client: CRIClient, name: str, *, hostname: str = "",
            sysctls: dict[str, str] | None = None, **ns: int) -> str:
    """RunPodSandbox as the kubelet asks it, with namespace options and sysctls."""
    config = client.pod_config(name)
    config.hostname = hostname or name
    config.linux.security_context.namespace_options.CopyFrom(_namespaces(**ns))
    config.linux.sysctls.update(sysctls or {})
    resp = client.runtime.RunPodSandbox(
        api.RunPodSandboxRequest(config=config, runtime_handler="ember"), timeout=client.timeout)
    client._pod_configs[resp.pod_sandbox_id] = config
    return resp.pod_sandbox_id


def create(client: CRIClient, pod: str, name: str, command: list[str],
           pid: int = api.CONTAINER) -> str:
    config = api.ContainerConfig(
        metadata=api.ContainerMetadata(name=name, attempt=0), image=api.ImageSpec(image=BUSYBOX),
        command=command, linux=api.LinuxContainerConfig())
    config.linux.security_context.namespace_options.CopyFrom(_namespaces(pid=pid))
    resp = client.runtime.CreateContainer(api.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=client._pod_configs[pod]),
        timeout=client.timeout)
    client.start_container(resp.container_id)
    return resp.container_id


@contextlib.contextmanager
def pod_of(cri, name: str, **kw) -> Iterator[tuple[CRIClient, str]]:
    """A pod for one test; afterwards it is gone and nothing of it is left."""
    _, work, client = cri
    pod = run_pod(client, name, **kw)
    try:
        yield client, pod
    finally:
        discard_pod(client, pod)
    assert _wait(lambda: not leftovers(work), 30), leftovers(work)


def sh(client: CRIClient, cid: str, script: str) -> str:
    r = client.exec_sync(cid, ["sh", "-c", script])
    assert r.exit_code == 0, r.stderr
    return r.stdout.decode().strip()


def test_pod_hostname_ipc_and_sysctls_are_shared(cri) -> None:
    # Kubernetes' safe sysctls include network ones: the guest's network is the pod's.
    sysctls = {"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100",
               "net.ipv4.ip_local_port_range": "20000 30000"}
    with pod_of(cri, "ember-ns", hostname="pod-host", sysctls=sysctls) as (client, pod):
        one = create(client, pod, "one", ["sleep", "1001"])
        two = create(client, pod, "two", ["sleep", "1002"])
        probe = ("hostname; cat /etc/hostname; cat /proc/sys/kernel/shm_rmid_forced "
                 "/proc/sys/fs/mqueue/msg_max /proc/sys/net/ipv4/ip_local_port_range; "
                 "readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts")
        seen = [sh(client, cid, probe).split() for cid in (one, two)]
        assert seen[0] == seen[1], seen
        assert seen[0][:6] == ["pod-host", "pod-host", "1", "100", "20000", "30000"]
        # The pod's VM has the pod's translation cache ([vm] pod_tcg_tb_size_mib).
        argv = [" ".join(p.info["cmdline"]) for p in vmms(cri[1])]
        assert len(argv) == 1 and "tb-size=64" in argv[0], argv
        # Per-container PID namespaces (CRI CONTAINER mode): each sees only itself.
        assert "sleep 1002" not in sh(client, one, "ps -o args")
        assert "sleep 1001" not in sh(client, two, "ps -o args")


def test_share_process_namespace(cri) -> None:
    with pod_of(cri, "ember-pidns") as (client, pod):
        one = create(client, pod, "one", ["sleep", "1001"], pid=api.POD)
        two = create(client, pod, "two", ["sleep", "1002"], pid=api.POD)
        procs = sh(client, two, "ps -o args")
        assert "sleep 1001" in procs and "sleep 1002" in procs, procs
        # PID 1 is the pod's sandbox (pause) process, as with runc.
        assert sh(client, one, "tr '\\0' ' ' < /proc/1/cmdline") == "/bin/sleep 2147483647"
        # ... held by the agent: no capability, no way to gain one (runc's root pause
        # keeps its default set), a PID 1 with less power than the containers.
        status = sh(client, one, "grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/1/status")
        assert status.split() == ["CapEff:", "0" * 16, "CapBnd:", "0" * 16,
                                  "NoNewPrivs:", "1"], status


def test_stop_right_after_start_returns_when_the_program_exits(cri) -> None:
    with pod_of(cri, "ember-stop") as (client, pod):
        # PID 1 of its namespace, catching SIGTERM only two seconds after start.
        cid = create(client, pod, "trap",
                     ["sh", "-c", 'sleep 2; trap "exit 0" TERM; while :; do sleep 0.2; done'])
        started = time.monotonic()
        client.runtime.StopContainer(api.StopContainerRequest(container_id=cid, timeout=60),
                                     timeout=120)
        took = time.monotonic() - started
        st = client.container_status(cid)
        assert st.state == api.CONTAINER_EXITED
        assert st.exit_code == 0, "the program's own handler must have ended it, not SIGKILL"
        assert took < 20, f"StopContainer took {took:.1f}s of its 60s grace period"
        client.runtime.RemoveContainer(api.RemoveContainerRequest(container_id=cid),
                                       timeout=60)


def test_kill_after_exit_is_not_found(cri) -> None:
    """containerd's task API straight (ctr), as runc's shim answers it."""
    c, work, _ = cri
    name = "ember-exited"
    c.ctr("run", "-d", "--runtime", RUNTIME, "--runtime-config-path", str(work / "ember.toml"),
          BUSYBOX, name, "sh", "-c", "exit 3")
    try:
        assert _wait(lambda: "STOPPED" in c.ctr("task", "ls").stdout, 120), \
            c.ctr("task", "ls").stdout
        res = c.ctr("task", "kill", name, check=False)
        assert res.returncode != 0 and "already finished: not found" in res.stderr, res.stderr
        res = c.ctr("task", "kill", "--signal", "SIGKILL", name, check=False)
        assert "not found" in res.stderr, res.stderr
        c.ctr("task", "delete", name)
        assert "not found" in c.ctr("task", "kill", name, check=False).stderr
    finally:
        c.ctr("task", "delete", "--force", name, check=False)
        c.ctr("container", "delete", name, check=False)
    assert _wait(lambda: not leftovers(work), 30), leftovers(work)


@pytest.mark.parametrize("field, ns", [("hostNetwork", {"network": api.NODE}),
                                       ("hostPID", {"pid": api.NODE}),
                                       ("hostIPC", {"ipc": api.NODE})])
def test_host_namespaces_are_refused_and_leave_nothing(cri, field: str, ns: dict) -> None:
    _, work, client = cri
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        run_pod(client, f"ember-{field.lower()}", **ns)
    took = time.monotonic() - started
    msg = e.value.details()
    assert f"the pod asks for {field}" in msg and "a VM cannot share the host's" in msg, msg
    assert took < 30, f"the refusal took {took:.1f}s"
    assert _wait(lambda: not vmms(work) and not shims(work), 30), leftovers(work)
    assert _wait(lambda: not leftovers(work), 30), leftovers(work)
    assert not [p for p in client.runtime.ListPodSandbox(api.ListPodSandboxRequest()).items
                if p.metadata.name == f"ember-{field.lower()}"]


def test_a_pod_sysctl_outside_the_pods_namespaces_is_refused_and_leaves_nothing(cri) -> None:
    """The agent holds the sandbox's namespaces itself (ember.agent.podholder) and
    checks the pod's sysctls as runc and crun do: one line, nothing left."""
    _, work, client = cri
    for sysctls, words in (({"vm.swappiness": "10"}, "sysctl vm.swappiness is not namespaced"),
                           ({"net.ipv4.no_such_knob": "1"},
                            "sysctl net.ipv4.no_such_knob=1: No such file or directory")):
        with pytest.raises(grpc.RpcError) as e:
            run_pod(client, "ember-sysctl", sysctls=sysctls)
        assert words in e.value.details(), e.value.details()
        assert _wait(lambda: not vmms(work) and not shims(work), 30), leftovers(work)
        assert _wait(lambda: not leftovers(work), 30), leftovers(work)


def test_a_command_that_is_not_there_fails_its_start_and_the_pod_goes_on(cri) -> None:
    """An app container is run by one crun process at StartContainer (containerd's
    CRI plugin creates and starts the task in that one call): a missing command
    fails StartContainer naming it, as with runc, and the pod runs the next one."""
    with pod_of(cri, "ember-nocmd") as (client, pod):
        config = api.ContainerConfig(
            metadata=api.ContainerMetadata(name="bad", attempt=0),
            image=api.ImageSpec(image=BUSYBOX), command=["/no-such-binary"],
            linux=api.LinuxContainerConfig())
        cid = client.runtime.CreateContainer(api.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=client._pod_configs[pod]),
            timeout=client.timeout).container_id
        with pytest.raises(grpc.RpcError) as e:
            client.start_container(cid)
        assert "/no-such-binary" in e.value.details(), e.value.details()
        assert client.container_status(cid).state != api.CONTAINER_RUNNING
        client.runtime.RemoveContainer(api.RemoveContainerRequest(container_id=cid),
                                       timeout=60)
        good = create(client, pod, "good", ["sleep", "1000"])
        assert sh(client, good, "echo ok") == "ok"
