"""Kill -9 in a CRI pod's life (issue 13, point 7), then let containerd clean up.

For each stage of a pod (VM up with no container, a container created, a
container running) the shim or the jailed QEMU is SIGKILLed (the QEMU is
the shim's own child, exec'd in place by its jailer helper: there is no waiter
between them). The kubelet's answer is then replayed through containerd's CRI
plugin (StopPodSandbox, RemovePodSandbox), and the host is checked: no shim,
QEMU or waiter, no mount, loop device, pod folder, jail folder or cgroup of
the pod, and the pod's network namespace is gone. The kubelet must also see
the truth before it cleans up: a container whose VM died is EXITED.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import test_cri
from shimtools import BUSYBOX, discard_pod, ember_processes, leftovers, shims, vmms

from ember.cri import api_pb2 as api

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.containerd, pytest.mark.chaos,
              pytest.mark.timeout(600)]

cri, _wait, _netns_of = test_cri.cri, test_cri._wait, test_cri._netns_of

STAGES = ("pod", "created", "running")
VICTIMS = ("shim", "vmm")


def waiters(work: Path) -> list[psutil.Process]:
    """The jailer waiters (``python -I -S .../jailer/waiter.py PID JAIL ...``) of this test."""
    return [p for p in ember_processes(work) if "jailer/waiter.py" in p.info["cmd"]]


def cgroups_of(pod: str) -> list[str]:
    """Cgroup folders (any hierarchy) named after the pod: its own and its VMM's jail."""
    out = subprocess.run(["find", "/sys/fs/cgroup", "-maxdepth", "5", "-type", "d",
                          "-name", f"*{pod[:32]}*"], capture_output=True, text=True).stdout
    return out.split()


def _victim(work: Path, victim: str) -> psutil.Process:
    found = {"shim": shims, "vmm": vmms}[victim](work)
    assert len(found) == 1, (victim, [p.info["cmd"] for p in ember_processes(work)])
    return found[0]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("victim", VICTIMS)
def test_sigkill_in_a_pod_then_containerd_cleanup_leaves_nothing(cri, stage, victim) -> None:
    _, work, client = cri
    pod = client.run_pod(f"chaos-{victim}-{stage}", runtime_handler="ember")
    cid = ""
    try:
        netns = _netns_of(client, pod)
        if stage != "pod":
            cid = client.create_container(pod, "app", BUSYBOX, ["sleep", "1000"])
        if stage == "running":
            client.start_container(cid)
        vmm = _victim(work, "vmm")
        assert vmm.ppid() == _victim(work, "shim").pid and not waiters(work), \
            "QEMU is the shim's own child, with no waiter between"
        os.kill(_victim(work, victim).pid, signal.SIGKILL)
        # Whoever died, the VM does not run on unmanaged: a dead shim takes QEMU
        # with it (PDEATHSIG), a dead QEMU is noticed by its shim.
        assert _wait(lambda: not psutil.pid_exists(vmm.pid)
                     or vmm.status() == psutil.STATUS_ZOMBIE, 60), "the VM outlived its owner"
        if stage == "running":
            assert _wait(lambda: client.container_status(cid).state == api.CONTAINER_EXITED,
                         60), "the kubelet would think the container still runs"
        client.stop_pod(pod)
        client.remove_pod(pod)
    finally:
        discard_pod(client, pod)  # a no-op on the happy path
    assert _wait(lambda: not leftovers(work) and not waiters(work), 30), \
        leftovers(work) + [p.info["cmd"] for p in waiters(work)]
    assert _wait(lambda: not cgroups_of(pod), 15), cgroups_of(pod)
    assert not os.path.exists(netns), f"the pod's network namespace {netns} is left"
