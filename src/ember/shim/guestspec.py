"""Rewriting containerd's OCI spec for a container that runs inside the VM.

containerd and the CRI plugin write the spec for a host container: namespace
paths under /proc of host processes, bind mounts of host files (/etc/hosts,
/etc/resolv.conf, /dev/termination-log, volumes), host cgroup paths, hooks
that are host binaries, an AppArmor profile. In the guest none of these exist.
So:

* namespaces keep their type but lose their path (the guest makes new ones),
  except a network namespace with a path (the pod's, made by CNI on the
  host): that entry goes, so the container shares the guest's network, which
  is the pod's (its NIC carries eth0's identity, see ember.net.podnet); and an
  app container's IPC, UTS and PID paths, which name the sandbox's: they join
  the sandbox container's in the guest (ember.shim.podns); host namespaces
  and shared/slave mount propagation are refused (podns.HostSharingError);
* bind mounts of host files and folders (volumes) are carried by
  ember.shim.volumes: copies kept in sync, pod-level disks and tmpfs, or a
  clear refusal; there is no filesystem sharing;
* the cgroup path becomes ``/ember/<id>`` inside the guest;
* hooks, AppArmor and SELinux labels are removed.
"""

from __future__ import annotations

import copy

from ember.shim import podns
from ember.shim.volumes import GuestFile


def for_guest(spec: dict, container_id: str) -> tuple[dict, list[GuestFile]]:
    """The spec to hand to the guest agent, and the host files it needs copied in."""
    podns.refuse_host_sharing(spec)
    out = copy.deepcopy(spec)
    process = out.get("process") or {}
    for key in ("apparmorProfile", "selinuxLabel"):
        process.pop(key, None)
    out.pop("hooks", None)
    linux = out.setdefault("linux", {})
    linux.pop("mountLabel", None)
    linux["namespaces"] = podns.guest_namespaces(out)
    linux["cgroupsPath"] = f"/ember/{container_id}"
    # Mounts are the pod volumes' business (ember.shim.volumes.PodVolumes.carry).
    return out, []
