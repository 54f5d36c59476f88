"""Pod namespaces in the guest, host sharing refused, and signals that must not be lost.

No VM here: the shim's spec rewriting and refusals, the agent's resolution of
``ember-sandbox:`` namespace paths, the agent's held signals (with a real
process as PID 1 of a new PID namespace), and the shim's Kill answers for an
exited process, as containerd's runc shim gives them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from ember.agent import signals
from ember.agent import spec as agent_spec
from ember.config import load_config
from ember.errors import NotFoundError
from ember.shim import guestspec, podns
from ember.shim.events import Publisher
from ember.shim.service import TaskService
from ember.shim.state import RUNNING, Container, Proc
from ember.ttrpc import Code, TTRPCError

SANDBOX = "a" * 64
CRI_APP = {"io.kubernetes.cri.container-type": "container",
           "io.kubernetes.cri.sandbox-id": SANDBOX}
CRI_SANDBOX = {"io.kubernetes.cri.container-type": "sandbox",
               "io.kubernetes.cri.sandbox-id": SANDBOX}
SHIM = os.getpid()  # containerd's "sandbox pid" for an Ember pod is the shim's


def cri_app(pid_shared: bool) -> dict:
    """An app container's namespaces as containerd 1.6's CRI plugin writes them."""
    ns = [{"type": "pid"} if not pid_shared else {"type": "pid", "path": f"/proc/{SHIM}/ns/pid"},
          {"type": "ipc", "path": f"/proc/{SHIM}/ns/ipc"},
          {"type": "uts", "path": f"/proc/{SHIM}/ns/uts"},
          {"type": "mount"},
          {"type": "network", "path": f"/proc/{SHIM}/ns/net"}]
    return {"process": {"args": ["top"]}, "annotations": dict(CRI_APP),
            "linux": {"namespaces": ns}}


def cri_sandbox(*without: str) -> dict:
    ns = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
          {"type": "network", "path": "/var/run/netns/cni-1234"}]
    return {"process": {"args": ["/pause"]}, "annotations": dict(CRI_SANDBOX),
            "hostname": "test-hostname",
            "linux": {"namespaces": [n for n in ns if n["type"] not in without],
                      "sysctl": {"kernel.shm_rmid_forced": "1"}}}


# ------------------------------------------------------------- spec rewriting
@pytest.mark.parametrize("pid_shared", [False, True])
def test_app_container_joins_the_sandbox_namespaces(pid_shared: bool) -> None:
    out, _ = guestspec.for_guest(cri_app(pid_shared), "app1")
    ns = {n["type"]: n for n in out["linux"]["namespaces"]}
    marker = agent_spec.SANDBOX_NS + SANDBOX
    assert ns["ipc"] == {"type": "ipc", "path": marker}
    assert ns["uts"] == {"type": "uts", "path": marker}
    assert ns["pid"] == ({"type": "pid", "path": marker} if pid_shared else {"type": "pid"})
    assert ns["mount"] == {"type": "mount"}
    assert "network" not in ns  # the guest's network is the pod's


def test_sandbox_keeps_its_own_namespaces_hostname_and_sysctls() -> None:
    out, _ = guestspec.for_guest(cri_sandbox(), SANDBOX)
    assert out["linux"]["namespaces"] == [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                                          {"type": "mount"}]
    assert out["hostname"] == "test-hostname"
    assert out["linux"]["sysctl"] == {"kernel.shm_rmid_forced": "1"}


def test_crio_annotations_are_understood() -> None:
    spec = cri_app(True)
    spec["annotations"] = {"io.kubernetes.cri-o.ContainerType": "container",
                           "io.kubernetes.cri-o.SandboxID": "podx"}
    spec["linux"]["namespaces"][1]["path"] = "/var/run/ipcns/8a6c"  # CRI-O pins namespaces
    out, _ = guestspec.for_guest(spec, "app1")
    assert {n["type"]: n.get("path") for n in out["linux"]["namespaces"]}["ipc"] == \
        agent_spec.SANDBOX_NS + "podx"


def test_lone_container_paths_are_dropped_as_before() -> None:
    spec = {"process": {"args": ["sh"]},
            "linux": {"namespaces": [{"type": "ipc", "path": "/run/ember-test/ns/ipc"},
                                     {"type": "user"}, {"type": "pid"}]}}
    out, _ = guestspec.for_guest(spec, "c1")
    assert out["linux"]["namespaces"] == [{"type": "ipc"}, {"type": "pid"}]


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kind, field", [("network", "hostNetwork"), ("pid", "hostPID"),
                                         ("ipc", "hostIPC")])
def test_pod_in_a_host_namespace_is_refused(kind: str, field: str) -> None:
    with pytest.raises(podns.HostSharingError) as e:
        guestspec.for_guest(cri_sandbox(kind), SANDBOX)
    assert field in e.value.message and "a VM cannot share" in e.value.message
    assert "\n" not in e.value.message and e.value.code == Code.INVALID_ARGUMENT


def test_sandbox_pointing_at_the_host_namespace_is_refused() -> None:
    spec = cri_sandbox()
    spec["linux"]["namespaces"][-1]["path"] = "/proc/self/ns/net"
    with pytest.raises(podns.HostSharingError, match="host's network namespace"):
        podns.refuse_host_sharing(spec)


def test_ctr_run_refused_only_when_it_clearly_asks_for_the_host() -> None:
    lone = {"process": {"args": ["sh"]}, "linux": {"namespaces": [{"type": "pid"}]}}
    podns.refuse_host_sharing(lone)  # ctr run --net-host: today's behaviour, the guest's network
    lone["linux"]["namespaces"].append({"type": "network", "path": "/proc/self/ns/net"})
    with pytest.raises(podns.HostSharingError, match=r"/proc/self/ns/net"):
        podns.refuse_host_sharing(lone)


def test_app_container_paths_to_the_shim_are_not_host_sharing() -> None:
    podns.refuse_host_sharing(cri_app(True))  # they name the sandbox, which runs in the VM


@pytest.mark.parametrize("opt", ["rshared", "shared", "rslave", "slave"])
def test_shared_or_slave_propagation_is_refused(opt: str) -> None:
    spec = cri_app(False)
    spec["mounts"] = [{"destination": "/data", "type": "bind", "source": "/srv/data",
                       "options": ["rbind", opt, "rw"]}]
    with pytest.raises(podns.HostSharingError) as e:
        podns.refuse_host_sharing(spec)
    assert e.value.message == (f"mount /data asks for {opt} propagation: "
                               "a VM cannot share the host's mounts")
    spec["mounts"][0]["options"] = ["rbind", "rprivate", "rw"]
    podns.refuse_host_sharing(spec)


# ------------------------------------------------------- agent: resolution
def _raw(namespaces: list) -> bytes:
    return json.dumps({"process": {"args": ["top"]}, "hostname": "app-host",
                       "linux": {"namespaces": namespaces}}).encode()


def test_agent_resolves_sandbox_namespaces_to_its_init() -> None:
    marker = agent_spec.SANDBOX_NS + "pod1"
    raw = _raw([{"type": "ipc", "path": marker}, {"type": "uts", "path": marker},
                {"type": "pid", "path": marker}, {"type": "mount"}])
    out = agent_spec.prepare(raw, "app", "/r", False, [], {"pod1": 4242}.get)
    assert {n["type"]: n.get("path") for n in out["linux"]["namespaces"]} == {
        "ipc": "/proc/4242/ns/ipc", "uts": "/proc/4242/ns/uts", "pid": "/proc/4242/ns/pid",
        "mount": None}
    assert "hostname" not in out  # the pod's hostname is the sandbox's
    assert agent_spec.prepare(_raw([]), "app", "/r", False, [])["hostname"] == "app-host"


@pytest.mark.parametrize("ns, lookup, code, words", [
    ({"type": "ipc", "path": "ember-sandbox:pod1"}, {}, Code.FAILED_PRECONDITION,
     "sandbox container 'pod1', which is not running"),
    ({"type": "ipc", "path": "ember-sandbox:pod1"}, None, Code.FAILED_PRECONDITION,
     "not running in this VM"),
    ({"type": "network", "path": "ember-sandbox:pod1"}, {"pod1": 5}, Code.INVALID_ARGUMENT,
     "network namespace cannot be shared"),
    ({"type": "uts", "path": "ember-sandbox:app"}, {"app": 5}, Code.INVALID_ARGUMENT,
     "its own uts namespace"),
])
def test_agent_refuses_unresolvable_namespaces(ns, lookup, code, words) -> None:
    with pytest.raises(TTRPCError) as e:
        agent_spec.prepare(_raw([ns]), "app", "/r", False, [],
                           None if lookup is None else lookup.get)
    assert e.value.code == code and words in e.value.message


# ------------------------------------------------------ agent: held signals
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare for a PID namespace")

LATE_HANDLER = ("import signal, sys, time; time.sleep({delay}); "
                "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); time.sleep(60)")


@contextlib.contextmanager
def _namespace_init(delay: float) -> Iterator[tuple[subprocess.Popen, int]]:
    """A Python program as PID 1 of a new PID namespace, catching SIGTERM after delay.

    Yields (unshare's process, the program's pid); both are killed afterwards.
    """
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", sys.executable,
                             "-c", LATE_HANDLER.format(delay=delay)])
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(proc.pid).children():
            assert time.monotonic() < deadline, "unshare started no child"
            time.sleep(0.01)
        yield proc, psutil.Process(proc.pid).children()[0].pid
    finally:
        proc.kill()
        proc.wait()


@needs_root
def test_signal_to_a_starting_namespace_init_is_held_until_caught() -> None:
    with _namespace_init(1.0) as (proc, pid):
        assert signals.would_be_lost(pid, signal.SIGTERM)
        assert not signals.would_be_lost(pid, signal.SIGKILL)
        started = time.monotonic()
        signals.send_when_caught(pid, signal.SIGTERM, lambda: proc.poll() is None, "t")
        assert time.monotonic() - started < 0.5, "holding must not block the caller"
        assert proc.wait(15) == 7  # the handler ran: the signal was not lost
        assert time.monotonic() - started < 10


@needs_root
def test_signal_sent_at_once_is_lost_without_holding() -> None:
    """The kernel behaviour the holding works around."""
    with _namespace_init(1.0) as (proc, pid):
        os.kill(pid, signal.SIGTERM)
        time.sleep(2.0)
        assert proc.poll() is None, "a namespace init without a handler ignores SIGTERM"
        assert not signals.would_be_lost(pid, signal.SIGTERM)  # now it catches it


@needs_root
def test_held_signal_gives_up_when_the_process_exits() -> None:
    with _namespace_init(60.0) as (proc, pid):
        t = signals.send_when_caught(pid, signal.SIGTERM, lambda: proc.poll() is None, "t")
        proc.kill()
        proc.wait()
        t.join(5)
        assert not t.is_alive()
        assert _wait_gone(pid), "--kill-child: the program goes with unshare"


def _wait_gone(pid: int, timeout: float = 5) -> bool:
    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + timeout
    while not gone():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_an_ordinary_process_is_signalled_at_once() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert not signals.would_be_lost(proc.pid, signal.SIGTERM)
    finally:
        proc.kill()
        proc.wait()
    assert not signals.would_be_lost(proc.pid, signal.SIGTERM)  # gone: nothing to hold


# ------------------------------------------------------ shim: Kill answers
class _Agent:
    def signal_process(self, *args, **kwargs) -> None:
        raise NotFoundError("process c1 is not running")


class _VM:
    agent = _Agent()


@pytest.fixture
def service(tmp_path: Path):
    svc = TaskService(load_config(), tmp_path, "c1", "default", Publisher("default", ""),
                      lambda: None)
    proc = Proc("c1", "", pid=os.getpid())
    svc._containers["c1"] = Container("c1", str(tmp_path), True, proc)
    return svc, proc


def _kill(svc: TaskService, **kw) -> TTRPCError:
    from ember.shim.proto import task_pb2 as pb

    with pytest.raises(TTRPCError) as e:
        svc.Kill(pb.KillRequest(id="c1", signal=15, **kw), None)
    return e.value


def test_kill_of_a_container_created_but_never_run_ends_it(service) -> None:
    """A containerd-CRI app container is made in the guest only at Start: a kill
    before that (containerd's clean-up of a failed start) ends it at once, with
    runc's status for the signal, and a second kill is "already finished"."""
    from ember.shim.proto import task_pb2 as pb

    svc, proc = service
    svc._containers["c1"].pending = ({}, None)
    svc.Kill(pb.KillRequest(id="c1", signal=9), None)  # no agent call: _VM is not set
    assert proc.exited.is_set() and proc.exit_status == 137
    assert _kill(svc).code == Code.NOT_FOUND


def test_kill_of_an_exited_process_is_not_found(service) -> None:
    svc, proc = service
    proc.mark_exited(0)
    proc.exited.set()
    err = _kill(svc)
    assert err.code == Code.NOT_FOUND and "already finished" in err.message


def test_kill_the_guest_no_longer_runs_is_not_found_at_once(service) -> None:
    svc, proc = service
    proc.status = RUNNING
    svc.pod.vm = _VM()
    started = time.monotonic()
    err = _kill(svc)
    assert err.code == Code.NOT_FOUND and "already finished" in err.message
    assert time.monotonic() - started < 0.5
    assert _kill(svc, exec_id="nope").code == Code.NOT_FOUND


# ------------------------------------------- agent with crun (no VM, root)
import test_agent  # noqa: E402  (its agent-on-the-host fixtures, reused here)

agent, client = test_agent.agent, test_agent.client
base_image, base_spec, make_spec = test_agent.base_image, test_agent.base_spec, test_agent.make_spec

crun_agent = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("crun")
                                or not os.path.exists("/bin/busybox"),
                                reason="needs root, crun and busybox-static")


def _disk(base_image: Path, tmp_path: Path, name: str) -> dict:
    img = tmp_path / f"{name}.ext4"
    shutil.copy(base_image, img)
    return {"kind": "path", "address": str(img)}


def _pod_spec(base: dict, args: list[str], sandbox: str = "", pid: bool = False) -> dict:
    spec = make_spec(base, args, env=["PATH=/bin"])
    shared = ("ipc", "uts", "pid") if pid else ("ipc", "uts")
    spec["linux"]["namespaces"] = [
        {"type": n["type"], "path": agent_spec.SANDBOX_NS + sandbox}
        if sandbox and n["type"] in shared else n
        for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    return spec


def _output(client, cid: str, exec_id: str = "") -> str:
    return b"".join(client.iter_output(cid, exec_id)).decode()


@crun_agent
@pytest.mark.root
@pytest.mark.parametrize("pid_shared", [False, True])
def test_agent_app_container_shares_the_sandbox_namespaces(client, base_image, base_spec,
                                                          tmp_path, pid_shared) -> None:
    sb = _pod_spec(base_spec, ["sleep", "300"])
    sb["hostname"] = "pod-host"
    sb["linux"]["sysctl"] = {"kernel.shm_rmid_forced": "1"}
    client.create_container("sb", sb, _disk(base_image, tmp_path, "sb"))
    client.start_container("sb")
    probe = "hostname; cat /proc/sys/kernel/shm_rmid_forced; readlink /proc/self/ns/ipc; " \
            "readlink /proc/1/ns/pid; cat /proc/1/cmdline"
    app = _pod_spec(base_spec, ["sh", "-c", probe], sandbox="sb", pid=pid_shared)
    client.create_container("app", app, _disk(base_image, tmp_path, "app"))
    client.start_container("app")
    assert client.wait_process("app").exit_status == 0
    host, sysctl, ipc, pidns, init = _output(client, "app").split("\n")[:5]
    client.exec_process("sb", "e1", {"args": ["sh", "-c", "readlink /proc/self/ns/ipc; "
                                              "readlink /proc/self/ns/pid"],
                                     "cwd": "/", "env": ["PATH=/bin"]})
    assert client.wait_process("sb", "e1").exit_status == 0
    sb_ipc, sb_pid = _output(client, "sb", "e1").split()
    assert (host, sysctl, ipc) == ("pod-host", "1", sb_ipc)
    assert (pidns == sb_pid) is pid_shared
    assert init.startswith("sleep") is pid_shared  # the sandbox's init is PID 1 when shared


@crun_agent
@pytest.mark.root
def test_agent_refuses_to_join_a_sandbox_that_is_not_there(client, agent, base_image,
                                                           base_spec, tmp_path) -> None:
    from ember.errors import AgentError

    app = _pod_spec(base_spec, ["true"], sandbox="nosuch")
    with pytest.raises(AgentError, match="sandbox container 'nosuch', which is not running"):
        client.create_container("app", app, _disk(base_image, tmp_path, "app"))
    assert agent.mounts() == []


@crun_agent
@pytest.mark.root
def test_agent_sigterm_right_after_start_is_not_lost(client, base_image, base_spec,
                                                     tmp_path) -> None:
    # sh is PID 1 and has no TERM handler until the trap, a second after start.
    script = 'sleep 1; trap "exit 7" TERM; while :; do sleep 0.1; done'
    client.create_container("trap", _pod_spec(base_spec, ["sh", "-c", script]),
                            _disk(base_image, tmp_path, "trap"))
    client.start_container("trap")
    started = time.monotonic()
    client.signal_process("trap", "", signal.SIGTERM)
    assert time.monotonic() - started < 1.0, "SignalProcess must not wait for the handler"
    assert client.wait_process("trap").exit_status == 7
    assert time.monotonic() - started < 10


# ------------------------------------------- the pod's namespace holder (ember.agent.podholder)
def _holder_spec(base: dict, marker: str, **linux) -> dict:
    """A CRI sandbox spec as the shim hands it on: its image's args, its user."""
    spec = _pod_spec(base, ["/bin/sleep", marker])
    spec["process"]["user"] = {"uid": 65535, "gid": 65535}
    spec["hostname"] = "pod-host"
    spec["linux"].update(linux)
    return spec


def _pid_of(client, cid: str) -> int:
    return next(p.pid for p in client.list_processes() if p.container_id == cid and not p.exec_id)


def _held_by(marker: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


@crun_agent
@pytest.mark.root
@pytest.mark.parametrize("pid_shared", [False, True])
def test_agent_holds_a_pods_namespaces_without_running_its_image(client, agent, base_image,
                                                                 base_spec, tmp_path,
                                                                 pid_shared) -> None:
    marker = f"{2147483000 + os.getpid() % 600}"
    sb = _holder_spec(base_spec, marker, sysctl={"kernel.shm_rmid_forced": "1",
                                                 "fs.mqueue.msg_max": "100"})
    started = time.monotonic()
    client.create_container("sb", sb, None, hold_namespaces=True)
    client.start_container("sb")
    assert time.monotonic() - started < 2, "no disk, no crun: it takes milliseconds"
    holder = psutil.Process(_pid_of(client, "sb"))
    assert holder.uids().real == 65535
    status = Path(f"/proc/{holder.pid}/status").read_text()
    assert "CapEff:\t0000000000000000" in status and "CapBnd:\t0000000000000000" in status
    assert "NoNewPrivs:\t1" in status
    assert " ".join(holder.cmdline()) == f"/bin/sleep {marker}"
    probe = ("hostname; cat /proc/sys/kernel/shm_rmid_forced /proc/sys/fs/mqueue/msg_max; "
             "readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts; readlink /proc/self/ns/pid; "
             "tr '\\0' ' ' < /proc/1/cmdline; echo; grep ^Uid /proc/1/status | cut -f2")
    app = _pod_spec(base_spec, ["sh", "-c", probe], sandbox="sb", pid=pid_shared)
    client.create_container("app", app, _disk(base_image, tmp_path, "app"))
    client.start_container("app")
    assert client.wait_process("app").exit_status == 0
    lines = _output(client, "app").split("\n")
    host, shm, mq, ipc, uts, pidns, init, init_uid = (ln.strip() for ln in lines[:8])
    assert (host, shm, mq) == ("pod-host", "1", "100")
    assert ipc == os.readlink(f"/proc/{holder.pid}/ns/ipc")
    assert uts == os.readlink(f"/proc/{holder.pid}/ns/uts")
    assert (pidns == os.readlink(f"/proc/{holder.pid}/ns/pid")) is pid_shared
    if pid_shared:  # PID 1 of the pod: the sandbox's command line and user, as with runc
        assert (init, init_uid) == (f"/bin/sleep {marker}", "65535")
    # Nothing runs in it: no image, no root to exec in.
    from ember.errors import AgentError
    with pytest.raises(AgentError, match="the pod's sandbox: Ember holds its namespaces"):
        client.exec_process("sb", "e1", {"args": ["true"], "cwd": "/", "env": []})
    client.remove_container("app")
    client.remove_container("sb")
    assert not holder.is_running() or holder.status() == psutil.STATUS_ZOMBIE
    assert not _held_by(marker) and not (agent.base / "containers" / "sb").exists()


@crun_agent
@pytest.mark.root
def test_a_root_holder_keeps_no_capability(client, base_spec) -> None:
    """runc gives a root pause its default capabilities; the holder keeps none."""
    spec = _holder_spec(base_spec, "2147483603")
    spec["process"]["user"] = {"uid": 0, "gid": 0}
    client.create_container("sb", spec, None, hold_namespaces=True)
    status = Path(f"/proc/{_pid_of(client, 'sb')}/status").read_text()
    assert "Uid:\t0\t0\t0\t0" in status
    for field in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert f"{field}:\t0000000000000000" in status, status
    assert "NoNewPrivs:\t1" in status
    client.remove_container("sb")


@crun_agent
@pytest.mark.root
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 0), (signal.SIGINT, 0),
                                         (signal.SIGKILL, 137)])
def test_the_holder_ends_as_pause_does(client, base_spec, sig, status) -> None:
    client.create_container("sb", _holder_spec(base_spec, "2147483601"), None,
                            hold_namespaces=True)
    client.start_container("sb")
    client.signal_process("sb", "", sig)
    assert client.wait_process("sb", timeout=10).exit_status == status
    client.remove_container("sb")


@crun_agent
@pytest.mark.root
@pytest.mark.parametrize("sysctl, words", [
    ({"vm.swappiness": "1"}, "sysctl vm.swappiness is not namespaced"),
    ({"kernel.shm_rmid_forced": "1", "net.ipv4.no_such_knob": "1"},
     "sysctl net.ipv4.no_such_knob=1: No such file or directory"),
])
def test_a_sysctl_the_pod_cannot_have_is_one_line_and_leaves_nothing(client, agent, base_spec,
                                                                      sysctl, words) -> None:
    from ember.errors import AgentError
    marker = "2147483602"
    with pytest.raises(AgentError, match=words) as e:
        client.create_container("sb", _holder_spec(base_spec, marker, sysctl=sysctl), None,
                                hold_namespaces=True)
    assert "\n" not in str(e.value)
    assert not [p for p in client.list_processes() if p.container_id == "sb"]
    assert not _held_by(marker) and not (agent.base / "containers" / "sb").exists()
