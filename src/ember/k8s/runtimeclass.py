"""RuntimeClass manifests for Ember's two backends.

``handler`` is the CRI runtime handler the node's containerd config names
(``ember`` → QEMU, ``ember-fc`` → Firecracker); ``scheduling.nodeSelector``
keeps pods off nodes the installer has not set up; ``overhead.podFixed``
comes from a measurement (see :mod:`ember.k8s.overhead`), or from values the
user passes explicitly — never from a constant baked in here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from ember.errors import EmberError

NODE_LABEL = "ember.io/runtime"
FC_NODE_LABEL = "ember.io/firecracker"


@dataclass(frozen=True)
class ClassInfo:
    name: str
    handler: str
    backend: str
    node_selector: dict[str, str]


CLASSES = (
    ClassInfo("ember-qemu", "ember", "qemu", {NODE_LABEL: "true"}),
    ClassInfo("ember-fc", "ember-fc", "firecracker", {NODE_LABEL: "true", FC_NODE_LABEL: "true"}),
)
_MEMORY_RE = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_CPU_RE = re.compile(r"^(\d+m|\d+(\.\d+)?)$")


def check_quantity(kind: str, value: str) -> str:
    pattern = _MEMORY_RE if kind == "memory" else _CPU_RE
    if not pattern.match(value):
        example = "160Mi" if kind == "memory" else "250m"
        raise EmberError(f"invalid {kind} quantity {value!r} (e.g. {example})")
    return value


def select(names: tuple[str, ...]) -> list[ClassInfo]:
    known = {c.name: c for c in CLASSES}
    for n in names:
        if n not in known:
            raise EmberError(f"unknown runtime class {n!r} (known: {', '.join(known)})")
    return [c for c in CLASSES if not names or c.name in names]


def overhead_for(info: ClassInfo, cache: dict[str, dict], memory: str | None,
                 cpu: str | None) -> dict[str, str]:
    """podFixed for one class: explicit values win, else the measurement."""
    measured = cache.get(info.backend, {}).get("podFixed", {})
    fixed = {"memory": memory or measured.get("memory"), "cpu": cpu or measured.get("cpu")}
    missing = [k for k, v in fixed.items() if not v]
    if missing:
        raise EmberError(
            f"no measured overhead for {info.name} ({info.backend}): run "
            f"`ember k8s overhead --measure` on a node with the {info.backend} backend, "
            f"or pass --{' and --'.join(missing)}")
    return {k: check_quantity(k, str(v)) for k, v in fixed.items()}


def manifest(info: ClassInfo, pod_fixed: dict[str, str]) -> dict:
    return {
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {"name": info.name,
                     "labels": {"app.kubernetes.io/part-of": "ember",
                                "ember.io/backend": info.backend}},
        "handler": info.handler,
        "overhead": {"podFixed": pod_fixed},
        "scheduling": {"nodeSelector": dict(info.node_selector)},
    }


def render(classes: list[ClassInfo], cache: dict[str, dict], memory: str | None = None,
           cpu: str | None = None) -> str:
    docs = [manifest(c, overhead_for(c, cache, memory, cpu)) for c in classes]
    return yaml.safe_dump_all(docs, sort_keys=False)
