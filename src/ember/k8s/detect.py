"""Find which matrix features a pod uses, and where.

The webhook needs more than a yes/no: a denial must name each offending
volume or container, so each :class:`Usage` carries a short "where".
Detection reads only the pod object the API server sends; a PVC's volume mode
is known from the pod itself (block PVCs are used through ``volumeDevices``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

_COPIED = ("configMap", "secret", "projected", "downwardAPI")
# Resource names that are not devices: core resources and hugepages.
_CORE_RESOURCES = {"cpu", "memory", "ephemeral-storage", "storage", "pods"}
_KIND_LABEL = {"initContainers": "init container", "containers": "container",
               "ephemeralContainers": "ephemeral container"}
_APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"
_SECCOMP_ANNOTATIONS = ("seccomp.security.alpha.kubernetes.io/pod",
                        "container.seccomp.security.alpha.kubernetes.io/")


@dataclass(frozen=True)
class Usage:
    feature: str
    where: str

    def __str__(self) -> str:
        return f"{self.feature} ({self.where})"


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _containers(spec: dict) -> Iterator[tuple[str, dict]]:
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for c in _list(spec.get(kind)):
            yield kind, c


def _block_volume_names(spec: dict) -> set[str]:
    return {d.get("name") for _, c in _containers(spec) for d in _list(c.get("volumeDevices"))}


def _volume_usages(spec: dict) -> Iterator[Usage]:
    block = _block_volume_names(spec)
    for vol in _list(spec.get("volumes")):
        name = vol.get("name", "?")
        where = f'volume "{name}"'
        if "emptyDir" in vol:
            medium = _dict(vol.get("emptyDir")).get("medium", "")
            yield Usage("emptyDirMemory" if medium == "Memory" else "emptyDir", where)
        elif any(k in vol for k in _COPIED):
            yield Usage(next(k for k in _COPIED if k in vol), where)
        elif "hostPath" in vol:
            path = _dict(vol.get("hostPath")).get("path", "")
            yield Usage("hostPath", f"{where}, path {path}" if path else where)
        elif "persistentVolumeClaim" in vol or "ephemeral" in vol:
            yield Usage("pvcBlock" if name in block else "pvcFilesystem", where)
        elif "csi" in vol:
            yield Usage("csiEphemeral", where)
        else:
            kinds = [k for k in vol if k != "name"]
            yield Usage("otherVolume", f"{where} ({kinds[0]})" if kinds else where)


def _is_device_resource(name: str) -> bool:
    if name in _CORE_RESOURCES or name.startswith("hugepages-"):
        return False
    # Extended resources are domain-qualified names outside kubernetes.io.
    return "/" in name and not name.split("/", 1)[0].endswith("kubernetes.io")


def _container_usages(kind: str, c: dict) -> Iterator[Usage]:
    where = f'{_KIND_LABEL[kind]} "{c.get("name", "?")}"'
    if kind == "initContainers" and c.get("restartPolicy") == "Always":
        yield Usage("sidecarContainers", where)
    sc = _dict(c.get("securityContext"))
    if sc.get("privileged") is True:
        yield Usage("privileged", where)
    added = _dict(sc.get("capabilities")).get("add")
    if isinstance(added, list) and added:
        yield Usage("capabilitiesAdd", f"{where}: {', '.join(map(str, added))}")
    if sc.get("readOnlyRootFilesystem") is True:
        yield Usage("readOnlyRootFilesystem", where)
    yield from _security_usages(sc, where)
    res = _dict(c.get("resources"))
    names = set(_dict(res.get("limits"))) | set(_dict(res.get("requests")))
    for name in sorted(n for n in names if _is_device_resource(n)):
        yield Usage("devices", f"{where}: resource {name}")
    if any(n.startswith("hugepages-") for n in names):
        yield Usage("hugepages", where)
    if names & {"cpu", "memory"}:
        yield Usage("resourceLimits", where)
    if any(p.get("restartPolicy") == "NotRequired" for p in _list(c.get("resizePolicy"))):
        yield Usage("inPlaceResize", where)
    if any(k in c for k in ("livenessProbe", "readinessProbe", "startupProbe")):
        yield Usage("probes", where)


def _security_usages(sc: dict, where: str) -> Iterator[Usage]:
    """Fields shared by the pod-level and container-level security contexts."""
    if any(k in sc for k in ("runAsUser", "runAsGroup", "runAsNonRoot", "supplementalGroups")):
        yield Usage("runAsUser", where)
    if _dict(sc.get("seccompProfile")).get("type") in ("RuntimeDefault", "Localhost"):
        yield Usage("seccompProfile", where)
    if _dict(sc.get("appArmorProfile")).get("type") in ("RuntimeDefault", "Localhost"):
        yield Usage("appArmorProfile", where)


def _pod_usages(pod: dict, spec: dict) -> Iterator[Usage]:
    for key in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"):
        if spec.get(key) is True:
            yield Usage(key, "pod")
    sc = _dict(spec.get("securityContext"))
    yield from _security_usages(sc, "pod")
    if "fsGroup" in sc:
        yield Usage("fsGroup", "pod")
    sysctls = [s.get("name", "?") for s in _list(sc.get("sysctls"))]
    if sysctls:
        yield Usage("sysctls", f"pod: {', '.join(sysctls)}")
    if _list(spec.get("resourceClaims")):
        yield Usage("devices", "pod: resourceClaims")
    annotations = _dict(_dict(pod.get("metadata")).get("annotations"))
    for key in sorted(annotations):
        if key.startswith(_APPARMOR_ANNOTATION) and annotations[key] != "unconfined":
            yield Usage("appArmorProfile", f"annotation {key}")
        elif key.startswith(_SECCOMP_ANNOTATIONS) and annotations[key] != "unconfined":
            yield Usage("seccompProfile", f"annotation {key}")
    if _list(spec.get("initContainers")):
        yield Usage("initContainers", "pod")
    if _list(spec.get("ephemeralContainers")):
        yield Usage("ephemeralContainers", "pod")


def detect(pod: dict) -> list[Usage]:
    """Every matrix feature the pod uses, in a stable order, without repeats."""
    spec = _dict(pod.get("spec"))
    found: list[Usage] = []
    for usage in (*_pod_usages(pod, spec), *_volume_usages(spec)):
        found.append(usage)
    for kind, c in _containers(spec):
        found.extend(_container_usages(kind, c))
    return list(dict.fromkeys(found))


def new_ephemeral_containers(pod: dict, old_pod: object) -> list[dict]:
    """Ephemeral containers the update adds (they can never be changed or removed)."""
    old_spec = _dict(_dict(old_pod).get("spec"))
    before = {c.get("name") for c in _list(old_spec.get("ephemeralContainers"))}
    return [c for c in _list(_dict(pod.get("spec")).get("ephemeralContainers"))
            if c.get("name") not in before]


def detect_ephemeral(containers: list[dict]) -> list[Usage]:
    """The features a set of new ephemeral containers uses, the feature itself first."""
    found = [Usage("ephemeralContainers", "pod")]
    for c in containers:
        found.extend(_container_usages("ephemeralContainers", c))
    return list(dict.fromkeys(found))
