"""What runs on this node, as the metrics collector sees it. Read only.

* ``ember run`` sandboxes: one folder per sandbox under
  ``<state_dir>/sandboxes`` (``StateStore.read``: the refreshed record, never
  written). Their agent is reached through the sandbox monitor's ``api.sock``,
  which forwards every ``ember.agent.v1.Agent`` method to the guest (the one
  connection to the guest is the monitor's).
* containerd pods: one folder per pod under ``<state_dir>/shim`` with the
  shim's ``pod.json`` (shim and VMM pids, cgroup, jail) and
  ``containers/<id>.json`` (each container's bundle, whose ``config.json``
  carries the CRI annotations: Kubernetes namespace, pod and container
  names). Their agent is reached through the shim's own ttrpc socket
  (``shim.sock``), where the shim serves ``ember.agent.v1.Agent/GuestStats``
  next to containerd's task API: the pod VM's agent channel is the shim's alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ember.config import Config
from ember.cri.annotations import (
    ANN_CONTAINER_NAME,
    ANN_CONTAINER_TYPE,
    ANN_HANDLERS,
    ANN_POD_NAME,
    ANN_POD_NAMESPACE,
    CRIO_CONTAINER_NAME,
    CRIO_POD_NAME,
    CRIO_POD_NAMESPACE,
)
from ember.sandbox.status import Status
from ember.vmm import process_kind

# Every per-sandbox series carries these labels, in this order.
LABELS = ("id", "name", "kind", "k8s_namespace", "k8s_pod", "runtime_class", "hypervisor")



@dataclass
class Target:
    kind: str  # "sandbox" (ember run) or "pod" (containerd shim)
    id: str
    name: str
    status: Status  # a pod's too: creating, running or dead
    hypervisor: str = ""
    socket: Path | None = None  # ttrpc socket that answers ember.agent.v1.Agent/GuestStats
    vmm_pid: int | None = None
    started: float = 0.0  # unix time
    k8s_namespace: str = ""
    k8s_pod: str = ""
    runtime_class: str = ""
    cgroup_scope: str = ""  # the sandbox's own host cgroup (the jail's, or the pod's)
    veth: str = ""  # ember run --network bridge: the host end of its veth (root netns)
    netns: str = ""  # pods: the pod's network namespace, where the VM's tap is
    containers: dict[str, str] = field(default_factory=dict)  # guest container id -> name
    exit_code: int | None = None
    oom_killed: bool = False
    error: str = ""
    finished: float | None = None

    def label_values(self) -> list[str]:
        return [self.id, self.name, self.kind, self.k8s_namespace, self.k8s_pod,
                self.runtime_class, self.hypervisor]


def vmm_process(pid: int | None, not_before: float = 0.0) -> psutil.Process | None:
    """The VMM's process if ``pid`` still is a hypervisor started no earlier than
    ``not_before`` (a reused pid is someone else's)."""
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        name = proc.name()
        if process_kind(name) is None:
            return None
        if not_before and proc.create_time() < not_before - 2:
            return None
        return proc
    except psutil.Error:
        return None


def _jail_scope(jail: dict | None) -> str:
    if not isinstance(jail, dict) or not jail.get("id"):
        return ""
    parent = str(jail.get("parent_cgroup") or "").strip("/")
    return "/" + "/".join(p for p in (parent, str(jail["id"])) if p)


def sandboxes(cfg: Config) -> list[Target]:
    """``ember run`` sandboxes from their records (refreshed, never written)."""
    from ember.errors import NotFoundError
    from ember.net.bridge import veth_name
    from ember.sandbox.state import StateStore

    store = StateStore(cfg)
    try:
        names = sorted(os.listdir(store.root))
    except OSError:
        return []
    out = []
    for entry in names:
        if entry.startswith(".") or not (store.root / entry).is_dir():
            continue  # the lock file, folders being made or removed
        try:
            st = store.read(entry)
        except NotFoundError:
            continue  # removed meanwhile
        out.append(Target(
            kind="sandbox", id=st.id, name=st.name, status=st.status,
            hypervisor=st.vmm_kind, socket=store.dir(st.id) / "api.sock",
            vmm_pid=st.vmm_pid, started=st.created, cgroup_scope=_jail_scope(st.jail),
            veth=veth_name(st.id) if st.network == "bridge" else "",
            containers={st.id: st.name}, exit_code=st.exit_code, oom_killed=st.oom_killed,
            error=st.error, finished=st.finished,
        ))
    return out


class PodFinder:
    """containerd pods from the shim's pod folders; bundle annotations are cached."""

    def __init__(self, cfg: Config) -> None:
        self.root = cfg.state_dir / "shim"
        self._annotations: dict[str, dict] = {}  # bundle path -> annotations

    def _bundle_annotations(self, bundle: str) -> dict:
        if bundle in self._annotations:
            return self._annotations[bundle]
        try:
            spec = json.loads((Path(bundle) / "config.json").read_text())
            ann = spec.get("annotations") if isinstance(spec, dict) else None
            ann = {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}
        except (OSError, ValueError):
            return {}  # not there yet: look again next time
        self._annotations[bundle] = ann
        return ann

    def pods(self) -> list[Target]:
        from ember.shim.manager import shim_alive
        from ember.shim.pod import read_record

        try:
            dirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        except OSError:
            return []
        out, bundles = [], set()
        for pdir in dirs:
            rec = read_record(pdir)
            group = rec.group
            if not group or not shim_alive(rec):
                continue  # a dead shim's folder: containerd's `delete` cleans it up
            containers, pod_ann = {}, {}
            for f in sorted((pdir / "containers").glob("*.json")):
                try:
                    crec = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                bundle = str(crec.get("bundle") or "")
                bundles.add(bundle)
                ann = self._bundle_annotations(bundle) if bundle else {}
                cid = f.stem
                if cid == group:
                    pod_ann = ann
                if ann.get(ANN_CONTAINER_TYPE) == "sandbox":
                    name = "POD"  # the kubelet's name for a pod's sandbox container
                else:
                    name = ann.get(ANN_CONTAINER_NAME) or ann.get(CRIO_CONTAINER_NAME) or cid[:12]
                containers[cid] = name
            vmm_pid = rec.vmm_pid
            proc = vmm_process(vmm_pid)
            status = Status.CREATING if not vmm_pid else \
                (Status.RUNNING if proc is not None else Status.DEAD)
            try:
                started = proc.create_time() if proc is not None else \
                    (pdir / "pod.json").stat().st_mtime
            except (psutil.Error, OSError):
                started = 0.0
            hypervisor = rec.vmm_kind
            if not hypervisor and proc is not None:  # a record from before vmm_kind
                try:
                    hypervisor = process_kind(proc.name()) or ""
                except psutil.Error:
                    pass
            scope = _jail_scope(rec.jail) or str(rec.cgroup or "")
            out.append(Target(
                kind="pod", id=group, name=pod_ann.get(ANN_POD_NAME)
                or pod_ann.get(CRIO_POD_NAME) or group[:12],
                status=status, hypervisor=hypervisor, socket=pdir / "shim.sock",
                vmm_pid=vmm_pid, started=started,
                k8s_namespace=pod_ann.get(ANN_POD_NAMESPACE) or pod_ann.get(CRIO_POD_NAMESPACE, ""),
                k8s_pod=pod_ann.get(ANN_POD_NAME) or pod_ann.get(CRIO_POD_NAME, ""),
                runtime_class=next((pod_ann[a] for a in ANN_HANDLERS if pod_ann.get(a)), ""),
                cgroup_scope=scope, containers=containers, netns=rec.netns,
            ))
        for gone in set(self._annotations) - bundles:
            del self._annotations[gone]
        return out
