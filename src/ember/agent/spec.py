"""Turning the host's OCI spec into the bundle's config.json inside the guest.

The host knows the image and the user's options; only the guest knows where
the disks are mounted. So the agent fills in root.path, resolves extra-disk
mounts (``"source": "ember-disk:N"`` means extra_disks[N]), and makes sure
the container gets its own namespaces and cgroup even if the host left them
out.
"""

from __future__ import annotations

import json
import re

from ember.ttrpc import Code, TTRPCError

REQUIRED_NAMESPACES = ("pid", "mount", "ipc", "uts")
DISK_SOURCE = "ember-disk:"
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


def prepare(raw: bytes, container_id: str, rootfs: str, rootfs_readonly: bool,
            disks: list[str]) -> dict:
    """The config.json for a container, ready for crun."""
    spec = parse_json(raw, "OCI spec")
    check_process(spec.get("process"), "OCI spec")
    root = spec.get("root") if isinstance(spec.get("root"), dict) else {}
    spec["root"] = {"path": rootfs, "readonly": bool(root.get("readonly")) or rootfs_readonly}
    linux = spec.setdefault("linux", {})
    if not isinstance(linux, dict):
        raise TTRPCError(Code.INVALID_ARGUMENT, "OCI spec: linux must be an object")
    namespaces = linux.setdefault("namespaces", [])
    have = {ns.get("type") for ns in namespaces if isinstance(ns, dict)}
    for ns in REQUIRED_NAMESPACES:
        if ns not in have:
            namespaces.append({"type": ns})
    if not linux.get("cgroupsPath"):
        linux["cgroupsPath"] = f"/ember/{container_id}"
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
