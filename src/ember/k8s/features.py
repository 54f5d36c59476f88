"""The Kubernetes feature matrix: what each Ember backend can do for a pod.

A micro-VM runtime cannot honour every pod feature (Firecracker has no
filesystem sharing, no device passthrough, no hotplug). Rather than let a pod
fail on the node, Ember keeps one list, as data, that three things read: the
admission webhook (to route or refuse pods), ``docs/kubernetes-support.md``
(generated from it, so the published list cannot drift), and ``ember k8s
features``. Feature ids are the keys a webhook policy uses.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("qemu", "firecracker")

SUPPORTED = "supported"
CAVEAT = "caveat"
UNSUPPORTED = "unsupported"
STATUSES = (SUPPORTED, CAVEAT, UNSUPPORTED)

REQUIRED = "required"
NICE = "nice-to-have"
BY_DESIGN = "not-supported-by-design"
PRIORITIES = (REQUIRED, NICE, BY_DESIGN)


@dataclass(frozen=True)
class Support:
    """How one backend handles one feature, and why."""

    status: str
    priority: str
    reason: str


@dataclass(frozen=True)
class Feature:
    """One pod feature, with its support on every backend."""

    id: str
    title: str
    category: str
    qemu: Support
    firecracker: Support

    def on(self, backend: str) -> Support:
        if backend not in BACKENDS:
            raise KeyError(f"unknown backend {backend!r}")
        return getattr(self, backend)


def _f(fid: str, title: str, category: str, qemu: Support, fc: Support | None = None) -> Feature:
    return Feature(fid, title, category, qemu, fc or qemu)


_S, _C, _U = SUPPORTED, CAVEAT, UNSUPPORTED
_NO_FS_SHARE_FC = Support(
    _U, BY_DESIGN, "Firecracker has no filesystem-sharing device (no virtio-fs or 9p)"
)
_COPIED = (
    "files are copied into the guest through the agent (no host filesystem is shared); "
    "updates to the source object reach the guest on the next copy, not instantly"
)

FEATURES: tuple[Feature, ...] = (
    # --- volumes -------------------------------------------------------------
    _f("emptyDir", "emptyDir volume (disk)", "Volumes",
       Support(_S, REQUIRED, "a per-pod scratch disk attached as a block device and "
               "formatted in the guest; sizeLimit becomes the disk size")),
    _f("emptyDirMemory", "emptyDir volume (medium: Memory)", "Volumes",
       Support(_C, REQUIRED, "a tmpfs inside the guest: it counts against the guest's RAM "
               "(the pod's memory limit), not the node's page cache")),
    _f("configMap", "configMap volume", "Volumes", Support(_C, REQUIRED, _COPIED)),
    _f("secret", "secret volume", "Volumes",
       Support(_C, REQUIRED, _COPIED + "; kept on a guest tmpfs, never on a disk image")),
    _f("projected", "projected volume (incl. service account tokens)", "Volumes",
       Support(_C, REQUIRED, _COPIED + "; rotated tokens are re-copied")),
    _f("downwardAPI", "downwardAPI volume", "Volumes", Support(_C, REQUIRED, _COPIED)),
    _f("hostPath", "hostPath volume", "Volumes",
       Support(_U, BY_DESIGN, "it would share a host directory with the VM; Ember shares "
               "no host filesystem with a guest, which is what the VM boundary is for"),
       _NO_FS_SHARE_FC),
    _f("pvcFilesystem", "PersistentVolumeClaim, volumeMode Filesystem", "Volumes",
       Support(_U, NICE, "kubelet mounts the volume on the node; passing a mounted "
               "filesystem into the guest needs virtio-fs, which Ember does not use yet"),
       _NO_FS_SHARE_FC),
    _f("pvcBlock", "PersistentVolumeClaim, volumeMode Block", "Volumes",
       Support(_S, NICE, "the raw device is given to the guest as a virtio-blk drive when "
               "the sandbox starts"),
       Support(_U, NICE, "Firecracker cannot hotplug drives, and Ember's pre-boot "
               "placeholder drives are reserved for container root filesystems")),
    _f("csiEphemeral", "CSI ephemeral inline volume", "Volumes",
       Support(_U, NICE, "the CSI driver mounts a filesystem on the node; passing it in "
               "needs virtio-fs, which Ember does not use yet"),
       _NO_FS_SHARE_FC),
    _f("otherVolume", "other node-mounted volumes (nfs, iscsi, cephfs, ...)", "Volumes",
       Support(_U, NICE, "mounted by kubelet on the node; passing a mounted filesystem "
               "into the guest needs virtio-fs, which Ember does not use yet"),
       _NO_FS_SHARE_FC),
    # --- host namespaces and privileges --------------------------------------
    _f("hostNetwork", "hostNetwork", "Host access",
       Support(_U, BY_DESIGN, "the guest has its own kernel and network stack; it cannot "
               "join the node's network namespace")),
    _f("hostPID", "hostPID", "Host access",
       Support(_U, BY_DESIGN, "the guest kernel has its own process table; host processes "
               "are not visible from a VM")),
    _f("hostIPC", "hostIPC", "Host access",
       Support(_U, BY_DESIGN, "System V IPC and POSIX shared memory live in the guest "
               "kernel; they cannot be shared with the host")),
    _f("privileged", "privileged containers", "Host access",
       Support(_C, NICE, "privilege applies inside the guest only: all capabilities and "
               "the guest's devices, never the host's")),
    _f("capabilitiesAdd", "added Linux capabilities", "Host access",
       Support(_S, REQUIRED, "granted by the guest kernel, so they cannot act on the host")),
    _f("devices", "host devices and extended resources (GPUs, DRA claims)", "Host access",
       Support(_U, NICE, "device passthrough needs VFIO on a PCI bus; Ember's microvm "
               "machine has no PCI bus"),
       Support(_U, BY_DESIGN, "Firecracker has no device passthrough")),
    _f("shareProcessNamespace", "shareProcessNamespace", "Host access",
       Support(_S, NICE, "all of a pod's containers run in one guest; the agent gives them "
               "one PID namespace")),
    _f("sysctls", "sysctls", "Host access",
       Support(_S, NICE, "set in the pod's own guest kernel, so even 'unsafe' sysctls "
               "affect only the pod")),
    # --- security context ----------------------------------------------------
    _f("seccompProfile", "seccomp profiles", "Security context",
       Support(_C, REQUIRED, "enforced by the guest kernel; Localhost profiles must exist "
               "on the node and are copied in; the VMM runs under Ember's own filter")),
    _f("appArmorProfile", "AppArmor profiles", "Security context",
       Support(_C, NICE, "the guest kernel runs without AppArmor, so the profile is not "
               "enforced inside the VM; the VM boundary is the isolation")),
    _f("runAsUser", "runAsUser / runAsGroup / runAsNonRoot / supplementalGroups",
       "Security context", Support(_S, REQUIRED, "applied by the agent when it starts the "
                                   "process in the guest")),
    _f("fsGroup", "fsGroup", "Security context",
       Support(_C, REQUIRED, "ownership is set inside the guest when the agent mounts a "
               "volume; fsGroupChangePolicy OnRootMismatch is treated as Always")),
    _f("readOnlyRootFilesystem", "readOnlyRootFilesystem", "Security context",
       Support(_S, REQUIRED, "the container's root block device is mounted read-only in "
               "the guest")),
    # --- resources -----------------------------------------------------------
    _f("resourceLimits", "CPU and memory requests/limits", "Resources",
       Support(_C, REQUIRED, "limits size the guest (vCPUs, RAM) and its cgroups; the VMM "
               "and shim are charged to the pod through RuntimeClass overhead")),
    _f("inPlaceResize", "in-place pod resize (resizePolicy)", "Resources",
       Support(_C, NICE, "takes effect in the guest's cgroups up to the size the guest "
               "booted with: the microvm machine cannot hot-add CPUs or memory"),
       Support(_C, NICE, "takes effect in the guest's cgroups up to the size the guest "
               "booted with: Firecracker has no CPU or memory hotplug")),
    _f("hugepages", "hugepages", "Resources",
       Support(_C, NICE, "the guest reserves huge pages out of its own RAM; host backing "
               "uses ordinary pages")),
    # --- containers and operations -------------------------------------------
    _f("initContainers", "init containers", "Containers",
       Support(_S, REQUIRED, "run in order in the pod's guest before the app containers")),
    _f("sidecarContainers", "sidecar containers (init, restartPolicy: Always)", "Containers",
       Support(_S, NICE, "started in the pod's guest and kept running beside the app "
               "containers")),
    _f("ephemeralContainers", "ephemeral (debug) containers", "Containers",
       Support(_C, NICE, "started in the pod's guest by the agent; they see the pod, "
               "never the node")),
    _f("probes", "liveness / readiness / startup probes", "Containers",
       Support(_C, REQUIRED, "network probes reach the guest like any pod traffic; exec "
               "probes go through the agent and need a few hundred ms")),
    _f("execAttach", "exec and attach", "Operations",
       Support(_S, REQUIRED, "served by the guest agent over the VM's control channel")),
    _f("logs", "container logs", "Operations",
       Support(_S, REQUIRED, "stdout and stderr are streamed from the guest to the CRI "
               "log file")),
    _f("portForward", "port-forward", "Operations",
       Support(_C, REQUIRED, "containerd dials localhost inside the pod's network namespace "
               "on the host, which is not the guest (its eth0 is joined to the guest's NIC by "
               "a tc redirect): forward to the pod IP with a Service instead, for now")),
)

BY_ID: dict[str, Feature] = {f.id: f for f in FEATURES}


def feature(fid: str) -> Feature:
    """The feature with this id; KeyError names the known ids."""
    try:
        return BY_ID[fid]
    except KeyError:
        raise KeyError(f"unknown feature {fid!r}") from None


def check_matrix() -> None:
    """Assert the data is well-formed: a typo in a status must not reach a user."""
    seen: set[str] = set()
    for f in FEATURES:
        assert f.id not in seen, f"duplicate feature {f.id}"
        seen.add(f.id)
        for backend in BACKENDS:
            s = f.on(backend)
            assert s.status in STATUSES, f"{f.id}/{backend}: status {s.status!r}"
            assert s.priority in PRIORITIES, f"{f.id}/{backend}: priority {s.priority!r}"
            assert s.reason and not s.reason.endswith("."), f"{f.id}/{backend}: reason"
            if s.priority == BY_DESIGN:
                assert s.status == UNSUPPORTED, f"{f.id}/{backend}: by design but supported"
