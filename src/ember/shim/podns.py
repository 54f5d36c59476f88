"""Linux namespaces of a pod in its VM, and the host sharing a VM cannot give.

The guest holds the whole pod. containerd's CRI plugin (like CRI-O) gives a
pod's app containers namespace entries that point at the sandbox (pause)
container's host process (``/proc/<pid>/ns/ipc``, ``uts``, and ``pid`` when
the pod shares its PID namespace). Those paths mean nothing in the guest, so
they become ``ember-sandbox:<sandbox id>``, which the agent resolves to the
sandbox container's init in the guest (``ember.agent.spec.resolve_namespaces``):
the pod's hostname, sysctls and shared memory then reach every container, as
with runc. Other paths are dropped: the container gets namespaces of its own.

What a VM cannot share is refused before anything is made, in one line: a
pod in the host's network, PID or IPC namespace (the CRI sandbox spec then
lacks that entry, or points at the host's), a container of ``ctr run`` whose
namespace path is the host's, and a bind mount asking for shared or slave
propagation (the host's mount table does not reach the guest).
"""

from __future__ import annotations

import os

from ember.agent.spec import POD_NAMESPACES, SANDBOX_NS
from ember.errors import EmberError
from ember.shim.layout import ANN_TYPE, CRIO_TYPE, pod_identity
from ember.ttrpc import Code
from ember.util import as_dict

HOST_SHARED = {"network": "hostNetwork", "pid": "hostPID", "ipc": "hostIPC"}
PROPAGATION = ("rshared", "shared", "rslave", "slave")


class HostSharingError(EmberError):
    """The spec asks for something of the host's that a VM cannot share."""

    code = Code.INVALID_ARGUMENT


def _namespaces(spec: dict) -> list[dict]:
    linux = as_dict(spec.get("linux"))
    return [ns for ns in linux.get("namespaces") or [] if isinstance(ns, dict)]


def is_sandbox(annotations: dict) -> bool:
    """A CRI pod's sandbox (pause) container, by containerd's or CRI-O's annotation."""
    return (annotations.get(ANN_TYPE) or annotations.get(CRIO_TYPE)) == "sandbox"


def is_host_namespace(path: str, kind: str) -> bool:
    """Whether path names the host's namespace of that kind (the same nsfs inode)."""
    proc_name = "net" if kind == "network" else kind
    try:
        st = os.stat(path)
    except OSError:
        return False
    for ref in (f"/proc/1/ns/{proc_name}", f"/proc/self/ns/{proc_name}"):
        try:
            host = os.stat(ref)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (host.st_dev, host.st_ino):
            return True
    return False


def refuse_host_sharing(spec: dict) -> None:
    """Raise HostSharingError for host namespaces or mount propagation in spec."""
    annotations = spec.get("annotations") or {}
    joining, _ = pod_identity(annotations)
    namespaces = _namespaces(spec)
    if is_sandbox(annotations):
        have = {ns.get("type") for ns in namespaces}
        for kind, field in HOST_SHARED.items():
            if kind not in have:
                raise HostSharingError(
                    f"the pod asks for {field} (the host's {kind} namespace): "
                    "a VM cannot share the host's namespaces")
    if not joining:  # an app container's paths name the sandbox's host process
        for ns in namespaces:
            ns_kind, path = ns.get("type"), ns.get("path")
            if isinstance(ns_kind, str) and ns_kind in HOST_SHARED and isinstance(path, str) \
                    and path and is_host_namespace(path, ns_kind):
                raise HostSharingError(
                    f"the container asks for the host's {ns_kind} namespace ({path}): "
                    "a VM cannot share the host's namespaces")
    for m in spec.get("mounts") or []:
        if not isinstance(m, dict):
            continue
        opts = [o for o in m.get("options") or [] if isinstance(o, str)]
        if m.get("type") != "bind" and "bind" not in opts and "rbind" not in opts:
            continue
        asked = [o for o in PROPAGATION if o in opts]
        if asked:
            raise HostSharingError(
                f"mount {m.get('destination')} asks for {asked[0]} propagation: "
                "a VM cannot share the host's mounts")


def guest_namespaces(spec: dict) -> list[dict]:
    """The namespace entries for the guest: pod namespaces marked, host paths dropped.

    User namespaces are left out (the guest has none to map), and so is a
    network namespace with a path: the guest's network is the pod's.
    """
    joining, sandbox = pod_identity(spec.get("annotations") or {})
    out = []
    for ns in _namespaces(spec):
        kind, path = ns.get("type"), ns.get("path")
        if kind == "user" or (kind == "network" and path):
            continue
        entry = {k: v for k, v in ns.items() if k != "path"}
        if joining and path and kind in POD_NAMESPACES:
            entry["path"] = SANDBOX_NS + sandbox
        out.append(entry)
    return out
