"""Turning the host's OCI spec into the bundle's config.json inside the guest.

The host knows the image and the user's options; only the guest knows where
the disks are mounted. So the agent fills in root.path, resolves extra-disk
mounts (``"source": "ember-disk:N"`` means extra_disks[N]), resolves pod
namespaces (``"path": "ember-sandbox:ID"`` means container ID's, see
``resolve_namespaces``), and makes sure the container gets its own namespaces
and cgroup even if the host left them out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from ember.agent import devices
from ember.ttrpc import Code, TTRPCError

REQUIRED_NAMESPACES = ("pid", "mount", "ipc", "uts")
DISK_SOURCE = "ember-disk:"
# A namespace path the shim writes for "the namespace of that container of the pod":
# only the agent knows guest pids.
SANDBOX_NS = "ember-sandbox:"
POD_NAMESPACES = ("ipc", "uts", "pid")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_id(kind: str, value: str, allow_empty: bool = False) -> None:
    if allow_empty and value == "":
        return
    if not ID_RE.match(value):
        raise TTRPCError(Code.INVALID_ARGUMENT,
                         f"invalid {kind} {value!r}: use 1-128 letters, digits, '_', '.', '-'")


def parse_json(raw: bytes, what: str) -> dict:
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"{what} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise TTRPCError(Code.INVALID_ARGUMENT, f"{what} must be a JSON object")
    return obj


def check_process(proc: object, what: str) -> dict:
    if not isinstance(proc, dict):
        raise TTRPCError(Code.INVALID_ARGUMENT, f"{what} has no process object")
    args = proc.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise TTRPCError(Code.INVALID_ARGUMENT, f"{what}: process.args must be a non-empty list of strings")
    return proc


def resolve_namespaces(namespaces: list, container_id: str,
                       init_pid: Callable[[str], int | None] | None) -> set[str]:
    """Turn each ``ember-sandbox:ID`` namespace path into ``/proc/<pid>/ns/<type>``.

    A pod's app containers share the sandbox container's UTS, IPC and (when the
    pod asks) PID namespaces; the host names the sandbox, and the namespace is
    that of its init here. ``init_pid`` gives a running container's init pid.
    Returns the types of the namespaces joined.
    """
    joined: set[str] = set()
    for ns in namespaces:
        path = ns.get("path") if isinstance(ns, dict) else None
        if not isinstance(path, str) or not path.startswith(SANDBOX_NS):
            continue
        kind, owner = ns.get("type"), path[len(SANDBOX_NS):]
        if kind not in POD_NAMESPACES:
            raise TTRPCError(Code.INVALID_ARGUMENT,
                             f"OCI spec: a {kind} namespace cannot be shared with the sandbox "
                             f"(only {', '.join(POD_NAMESPACES)})")
        if owner == container_id:
            raise TTRPCError(Code.INVALID_ARGUMENT,
                             f"container {container_id!r} cannot join its own {kind} namespace")
        pid = init_pid(owner) if init_pid is not None else None
        if not pid:
            raise TTRPCError(Code.FAILED_PRECONDITION,
                             f"container {container_id!r} joins the {kind} namespace of sandbox "
                             f"container {owner!r}, which is not running in this VM")
        ns["path"] = f"/proc/{pid}/ns/{kind}"
        joined.add(kind)
    return joined


def prepare(raw: bytes, container_id: str, rootfs: str, rootfs_readonly: bool,
            disks: list[str], init_pid: Callable[[str], int | None] | None = None) -> dict:
    """The config.json for a container, ready for crun.

    ``init_pid`` resolves pod namespaces (see ``resolve_namespaces``).
    """
    spec = parse_json(raw, "OCI spec")
    check_process(spec.get("process"), "OCI spec")
    root = spec.get("root")
    if not isinstance(root, dict):
        root = {}
    spec["root"] = {"path": rootfs, "readonly": bool(root.get("readonly")) or rootfs_readonly}
    linux = spec.setdefault("linux", {})
    if not isinstance(linux, dict):
        raise TTRPCError(Code.INVALID_ARGUMENT, "OCI spec: linux must be an object")
    namespaces = linux.setdefault("namespaces", [])
    if not isinstance(namespaces, list):
        raise TTRPCError(Code.INVALID_ARGUMENT, "OCI spec: linux.namespaces must be a list")
    if "uts" in resolve_namespaces(namespaces, container_id, init_pid):
        spec.pop("hostname", None)  # the pod's hostname is the sandbox's to set
    have = {ns.get("type") for ns in namespaces if isinstance(ns, dict)}
    for ns in REQUIRED_NAMESPACES:
        if ns not in have:
            namespaces.append({"type": ns})
    if not linux.get("cgroupsPath"):
        linux["cgroupsPath"] = f"/ember/{container_id}"
    if devices.allows_all(spec):  # privileged: the guest's devices (never the host's)
        linux["devices"] = devices.guest_devices()
    for m in spec.get("mounts") or []:
        src = m.get("source", "") if isinstance(m, dict) else ""
        if src.startswith(DISK_SOURCE):
            idx = src[len(DISK_SOURCE):]
            if not idx.isdigit() or int(idx) >= len(disks):
                raise TTRPCError(Code.INVALID_ARGUMENT,
                                 f"OCI spec mount {m.get('destination')!r} names {src!r} "
                                 f"but only {len(disks)} extra disk(s) were given")
            m["source"] = disks[int(idx)]
            m.setdefault("type", "bind")
            opts = m.setdefault("options", [])
            if "bind" not in opts and "rbind" not in opts:
                opts.append("rbind")
    return spec
