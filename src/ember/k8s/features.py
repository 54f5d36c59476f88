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
    proof: str = ""  # the test(s) that show it through containerd's CRI plugin


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
    "copied into guest memory and kept in sync: a change on the node reaches the "
    "container within about a second, and the kubelet's atomic ..data swap stays atomic"
)
_VOL = "tests/test_cri_volumes.py::test_kubelet_volumes_behave_as_under_runc"
_POD = "tests/test_cri_pod.py"
_CT = "critest "

FEATURES: tuple[Feature, ...] = (
    # --- volumes -------------------------------------------------------------
    _f("emptyDir", "emptyDir volume (disk)", "Volumes",
       Support(_S, REQUIRED, "one sparse ext4 disk per volume and pod, shared by the pod's "
               "containers and kept across container restarts; its size is the pod annotation "
               "ember.io/emptydir-size.NAME (default 10 GiB), since the kubelet does not pass "
               "sizeLimit to the runtime", _VOL)),
    _f("emptyDirMemory", "emptyDir volume (medium: Memory)", "Volumes",
       Support(_C, REQUIRED, "a tmpfs inside the guest: it counts against the guest's RAM "
               "(the pod's memory limit), not the node's page cache", _VOL)),
    _f("configMap", "configMap volume", "Volumes", Support(_C, REQUIRED, _COPIED, _VOL)),
    _f("secret", "secret volume", "Volumes",
       Support(_C, REQUIRED, _COPIED + "; kept in guest memory, never on a disk image", _VOL)),
    _f("projected", "projected volume (incl. service account tokens)", "Volumes",
       Support(_C, REQUIRED, _COPIED + "; rotated tokens are re-copied", _VOL)),
    _f("downwardAPI", "downwardAPI volume", "Volumes", Support(_C, REQUIRED, _COPIED, _VOL)),
    _f("hostPath", "hostPath volume", "Volumes",
       Support(_C, NICE, "read-only: copied (packed into a read-only image above 16 MiB); "
               "writable: a two-way copy of at most 16 MiB whose writes reach the node at every "
               "exec and container exit and every 0.5 s (not instantly, and the last writer "
               "of a file wins); a larger writable one is refused when the task is created",
               _VOL + "; " + _CT + "'starting container with volume' (and 'when host path "
               "is a symlink', 'rprivate')"),
       _NO_FS_SHARE_FC),
    _f("pvcFilesystem", "PersistentVolumeClaim, volumeMode Filesystem", "Volumes",
       Support(_U, NICE, "kubelet mounts the volume on the node and it may be shared and "
               "large; Ember shares no filesystem with the guest, so a writable one is "
               "refused when the task is created (read-only ones are copied like hostPath)"),
       _NO_FS_SHARE_FC),
    _f("pvcBlock", "PersistentVolumeClaim, volumeMode Block", "Volumes",
       Support(_U, NICE, "the host block device is not attached to the guest yet: a "
               "non-privileged container asking for one is refused when its task is created"),
       Support(_U, NICE, "Firecracker cannot hotplug drives, and Ember's pre-boot "
               "placeholder drives are reserved for container root filesystems")),
    _f("csiEphemeral", "CSI ephemeral inline volume", "Volumes",
       Support(_U, NICE, "the CSI driver mounts a filesystem on the node; a writable one "
               "is refused like a filesystem PVC"),
       _NO_FS_SHARE_FC),
    _f("otherVolume", "other node-mounted volumes (nfs, iscsi, cephfs, ...)", "Volumes",
       Support(_U, NICE, "mounted by kubelet on the node; a writable one is refused like a "
               "filesystem PVC"),
       _NO_FS_SHARE_FC),
    _f("lvmThinPool", "image layers and container roots on an LVM thin pool", "Volumes",
       Support(_C, NICE, "ember-snapshotter --backend lvm (containerd's snapshotter setting): "
               "every snapshot a thin LV, attached to the guest as the device itself; the node "
               "kernel needs device-mapper (dm-thin-pool), so here it is proved inside an "
               "Ember VM: the backend's tests and containerd's snapshotter suite (20 pass, "
               "1 skipped as for overlayfs), in every CI run",
               "tests/test_snapshotter_lvm.py::test_lvm_backend_in_a_vm"),
       Support(_U, NICE, "no test shows a thin LV attached to a Firecracker guest yet")),
    # --- host namespaces and privileges --------------------------------------
    _f("hostNetwork", "hostNetwork", "Host access",
       Support(_U, BY_DESIGN, "the guest has its own kernel and network stack; it cannot "
               "join the node's network namespace (RunPodSandbox is refused at once)")),
    _f("hostPID", "hostPID", "Host access",
       Support(_U, BY_DESIGN, "the guest kernel has its own process table; host processes "
               "are not visible from a VM (RunPodSandbox is refused at once)")),
    _f("hostIPC", "hostIPC", "Host access",
       Support(_U, BY_DESIGN, "System V IPC and POSIX shared memory live in the guest "
               "kernel; they cannot be shared with the host (RunPodSandbox is refused)")),
    _f("mountPropagation", "mountPropagation HostToContainer / Bidirectional", "Host access",
       Support(_U, BY_DESIGN, "the guest has its own mount table: rslave/rshared mounts "
               "are refused when the task is created")),
    _f("privileged", "privileged containers", "Host access",
       Support(_C, NICE, "privilege applies inside the guest only: all capabilities, the "
               "guest's devices and its kernel modules (loaded on demand), never the host's",
               _CT + "'Privileged is true'; tests/test_guest_modules.py")),
    _f("capabilitiesAdd", "added Linux capabilities", "Host access",
       Support(_S, REQUIRED, "granted by the guest kernel, so they cannot act on the host",
               _CT + "'adding capability', 'adding ALL capabilities'")),
    _f("devices", "host devices and extended resources (GPUs, DRA claims)", "Host access",
       Support(_U, NICE, "device passthrough needs VFIO on a PCI bus; Ember's microvm "
               "machine has no PCI bus"),
       Support(_U, BY_DESIGN, "Firecracker has no device passthrough")),
    _f("shareProcessNamespace", "shareProcessNamespace", "Host access",
       Support(_S, NICE, "all of a pod's containers run in one guest and join the pod "
               "container's PID namespace there", _CT + "'PodPID'; " + _POD)),
    _f("sysctls", "sysctls", "Host access",
       Support(_S, NICE, "set in the pod's own guest kernel (the pod's IPC and UTS "
               "namespaces are shared by its containers), so even 'unsafe' sysctls affect "
               "only the pod", _CT + "'safe sysctls', 'unsafe sysctls'; " + _POD)),
    # --- security context ----------------------------------------------------
    _f("seccompProfile", "seccomp profiles", "Security context",
       Support(_C, REQUIRED, "enforced by the guest kernel; Localhost profiles must exist "
               "on the node and are copied in; the VMM runs under Ember's own filter",
               _CT + "'SeccompProfilePath' and 'docker/default' specs")),
    _f("appArmorProfile", "AppArmor profiles", "Security context",
       Support(_C, NICE, "the guest kernel loads no AppArmor policy, so the profile is "
               "dropped, not enforced inside the VM; the VM boundary is the isolation",
               "tests/test_shim.py::test_guest_spec_drops_host_paths_and_leaves_mounts_to_the_volumes, "
               "tests/test_run_privileged.py::test_the_guest_kernel_loads_no_apparmor_policy")),
    _f("runAsUser", "runAsUser / runAsGroup / runAsNonRoot / supplementalGroups",
       "Security context", Support(_S, REQUIRED, "applied by the agent when it starts the "
                                   "process in the guest",
                                   _CT + "'RunAsUser', 'RunAsGroup', 'SupplementalGroups'")),
    _f("fsGroup", "fsGroup", "Security context",
       Support(_C, REQUIRED, "the kubelet sets group ownership on the node; copies and "
               "emptyDir disks keep the node's owners and modes", _VOL)),
    _f("readOnlyRootFilesystem", "readOnlyRootFilesystem", "Security context",
       Support(_S, REQUIRED, "the container's root block device is mounted read-only in "
               "the guest", _CT + "'ReadOnlyRootfs is true'")),
    # --- resources -----------------------------------------------------------
    _f("resourceLimits", "CPU and memory requests/limits", "Resources",
       Support(_C, REQUIRED, "limits size the guest (vCPUs, RAM) and its cgroups; the VMM "
               "and shim are charged to the pod through RuntimeClass overhead",
               "tests/test_cri.py::test_pod_with_two_containers_runs_in_one_vm")),
    _f("inPlaceResize", "in-place pod resize (resizePolicy)", "Resources",
       Support(_U, NICE, "no test shows it yet (the guest could only shrink within the "
               "size it booted with: the microvm machine cannot hot-add CPUs or memory)"),
       Support(_U, NICE, "no test shows it yet (Firecracker has no CPU or memory hotplug)")),
    _f("hugepages", "hugepages", "Resources",
       Support(_U, NICE, "no test shows it yet: the guest would have to reserve huge "
               "pages out of its own RAM")),
    # --- containers and operations -------------------------------------------
    _f("initContainers", "init containers", "Containers",
       Support(_S, REQUIRED, "containers that run to completion one after another in the "
               "pod's guest (the kubelet orders them)", _VOL)),
    _f("sidecarContainers", "sidecar containers (init, restartPolicy: Always)", "Containers",
       Support(_S, NICE, "started in the pod's guest and kept running beside the app "
               "containers", _CT + "'when running multiple containers in a pod'; " + _POD)),
    _f("ephemeralContainers", "ephemeral (debug) containers", "Containers",
       Support(_C, NICE, "started in the pod's guest; they see the pod, never the node; "
               "targeting one container's PID namespace joins the pod's",
               _CT + "'ContainerPID', 'PodPID'")),
    _f("probes", "liveness / readiness / startup probes", "Containers",
       Support(_C, REQUIRED, "network probes reach the guest like any pod traffic; exec "
               "probes go through the agent and need a few hundred ms",
               _CT + "'execSync', 'execSync with timeout'; "
               "tests/test_cri.py::test_pod_network_reaches_the_host_through_the_vm")),
    _f("execAttach", "exec and attach", "Operations",
       Support(_S, REQUIRED, "served by the guest agent over the VM's control channel",
               _CT + "'exec with tty=...', 'attach'")),
    _f("logs", "container logs", "Operations",
       Support(_S, REQUIRED, "stdout and stderr are streamed from the guest to the CRI "
               "log file", _CT + "'starting container with log', 'reopening container log'")),
    _f("portForward", "port-forward", "Operations",
       Support(_S, REQUIRED, "the shim serves the guest's listening TCP ports on localhost "
               "in the pod's network namespace, where containerd dials, over the agent "
               "channel", _CT + "'portforward'; "
               "tests/test_portforward.py::test_cri_port_forward_reaches_the_guest")),
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
            if s.status != UNSUPPORTED:
                assert s.proof, f"{f.id}/{backend}: a claim needs the test that proves it"
            if s.priority == BY_DESIGN:
                assert s.status == UNSUPPORTED, f"{f.id}/{backend}: by design but supported"
