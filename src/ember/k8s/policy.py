"""The admission webhook's policy: which runtime class a pod gets, and what to
do when the class cannot run it.

A policy is a YAML (or JSON, which is YAML) file; every key is optional and
unknown keys are errors, so a typo cannot silently turn a rule off::

    defaultClass: ember-qemu          # null = leave unmatched pods on the node's default runtime
    classes:                          # runtime class name -> Ember backend
      ember-qemu: qemu
      ember-fc: firecracker
    routeOrder: [ember-qemu, ember-fc]
    podAnnotation: ember.io/runtime-class     # pod asks for a class (or "none")
    namespaceLabel: ember.io/runtime-class    # namespace picks a class (or "none")
    allowPodOptOut: false             # honour podAnnotation "none"?
    namespaceRules:                   # first match wins
      - selector: {matchLabels: {team: ml}}
        class: ember-fc
    exclude:
      namespaces: [kube-system, kube-public, kube-node-lease]
      hostNetwork: true               # hostNetwork pods stay on the default runtime
      podsWithClass: true             # never re-route a pod that names a class
    onUnsupported: route              # route | deny
    features:                         # per feature id: route | deny | forbid
      hostPath: deny
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ember.errors import EmberError
from ember.k8s.features import BACKENDS, BY_ID

ACTIONS = ("route", "deny", "forbid")
OPT_OUT = "none"
_SELECTOR_OPS = ("In", "NotIn", "Exists", "DoesNotExist")


class PolicyError(EmberError):
    """The policy file cannot be read or is not a valid policy."""


@dataclass(frozen=True)
class Selector:
    """A Kubernetes label selector (matchLabels + matchExpressions)."""

    match_labels: dict[str, str] = field(default_factory=dict)
    expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for key, op, values in self.expressions:
            present = key in labels
            if op == "In" and not (present and labels[key] in values):
                return False
            if op == "NotIn" and present and labels[key] in values:
                return False
            if op == "Exists" and not present:
                return False
            if op == "DoesNotExist" and present:
                return False
        return True


@dataclass(frozen=True)
class Rule:
    selector: Selector
    runtime_class: str | None


@dataclass(frozen=True)
class Policy:
    default_class: str | None = "ember-qemu"
    classes: dict[str, str] = field(
        default_factory=lambda: {"ember-qemu": "qemu", "ember-fc": "firecracker"})
    route_order: tuple[str, ...] = ()
    pod_annotation: str = "ember.io/runtime-class"
    namespace_label: str = "ember.io/runtime-class"
    allow_pod_opt_out: bool = False
    namespace_rules: tuple[Rule, ...] = ()
    exclude_namespaces: tuple[str, ...] = ("kube-system", "kube-public", "kube-node-lease")
    exclude_host_network: bool = True
    exclude_pods_with_class: bool = True
    on_unsupported: str = "route"
    features: dict[str, str] = field(default_factory=dict)

    def action(self, feature_id: str) -> str:
        return self.features.get(feature_id, self.on_unsupported)

    def routing_order(self) -> tuple[str, ...]:
        return self.route_order or tuple(self.classes)


_TOP_KEYS = {"apiVersion", "kind", "defaultClass", "classes", "routeOrder", "podAnnotation",
             "namespaceLabel", "allowPodOptOut", "namespaceRules", "exclude", "onUnsupported",
             "features"}


def _check_keys(obj: dict, allowed: set[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise PolicyError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(allowed))})")


def _typed(obj: dict, key: str, kind: type | tuple, where: str):
    value = obj[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise PolicyError(f"{where}.{key}: expected {names}, got {value!r}")
    return value


def _str_list(obj: dict, key: str, where: str) -> tuple[str, ...]:
    items = _typed(obj, key, list, where)
    if not all(isinstance(i, str) for i in items):
        raise PolicyError(f"{where}.{key}: expected a list of strings")
    return tuple(items)


def _selector(raw: object, where: str) -> Selector:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a label selector mapping")
    _check_keys(raw, {"matchLabels", "matchExpressions"}, where)
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise PolicyError(f"{where}.matchLabels: expected a mapping of strings")
    exprs = []
    for i, e in enumerate(raw.get("matchExpressions") or []):
        ew = f"{where}.matchExpressions[{i}]"
        if not isinstance(e, dict):
            raise PolicyError(f"{ew}: expected a mapping")
        _check_keys(e, {"key", "operator", "values"}, ew)
        if e.get("operator") not in _SELECTOR_OPS:
            raise PolicyError(f"{ew}.operator: must be one of {', '.join(_SELECTOR_OPS)}")
        if not isinstance(e.get("key"), str):
            raise PolicyError(f"{ew}.key: expected a string")
        values = _str_list(e, "values", ew) if "values" in e else ()
        exprs.append((e["key"], e["operator"], values))
    return Selector(dict(labels), tuple(exprs))


def _class_ref(value: object, classes: dict[str, str], where: str) -> str | None:
    if value is None or value == OPT_OUT:
        return None
    if not isinstance(value, str) or value not in classes:
        raise PolicyError(f"{where}: {value!r} is not one of the policy's classes "
                          f"({', '.join(classes)})")
    return value


def policy_from_dict(raw: object, where: str = "policy") -> Policy:
    """Validate a parsed policy document and build a :class:`Policy`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a mapping at the top level")
    _check_keys(raw, _TOP_KEYS, where)
    base = Policy()
    classes = dict(base.classes)
    if "classes" in raw:
        classes = _typed(raw, "classes", dict, where)
        if not classes:
            raise PolicyError(f"{where}.classes: needs at least one class")
        for name, backend in classes.items():
            if backend not in BACKENDS:
                raise PolicyError(f"{where}.classes.{name}: backend must be one of "
                                  f"{', '.join(BACKENDS)}, not {backend!r}")
    kw: dict = {"classes": classes}
    if "defaultClass" in raw:
        kw["default_class"] = _class_ref(raw["defaultClass"], classes, f"{where}.defaultClass")
    elif base.default_class not in classes:
        kw["default_class"] = next(iter(classes))
    if "routeOrder" in raw:
        order = _str_list(raw, "routeOrder", where)
        for name in order:
            _class_ref(name, classes, f"{where}.routeOrder")
        kw["route_order"] = order
    for key, attr in (("podAnnotation", "pod_annotation"), ("namespaceLabel", "namespace_label")):
        if key in raw:
            kw[attr] = _typed(raw, key, str, where)
    if "allowPodOptOut" in raw:
        kw["allow_pod_opt_out"] = _typed(raw, "allowPodOptOut", bool, where)
    rules = []
    for i, r in enumerate(_typed(raw, "namespaceRules", list, where)
                          if "namespaceRules" in raw else []):
        rw = f"{where}.namespaceRules[{i}]"
        if not isinstance(r, dict) or "class" not in r or "selector" not in r:
            raise PolicyError(f"{rw}: needs 'selector' and 'class'")
        _check_keys(r, {"selector", "class"}, rw)
        rules.append(Rule(_selector(r["selector"], f"{rw}.selector"),
                          _class_ref(r["class"], classes, f"{rw}.class")))
    kw["namespace_rules"] = tuple(rules)
    if "exclude" in raw:
        ex = _typed(raw, "exclude", dict, where)
        _check_keys(ex, {"namespaces", "hostNetwork", "podsWithClass"}, f"{where}.exclude")
        if "namespaces" in ex:
            kw["exclude_namespaces"] = _str_list(ex, "namespaces", f"{where}.exclude")
        if "hostNetwork" in ex:
            kw["exclude_host_network"] = _typed(ex, "hostNetwork", bool, f"{where}.exclude")
        if "podsWithClass" in ex:
            kw["exclude_pods_with_class"] = _typed(ex, "podsWithClass", bool, f"{where}.exclude")
    if "onUnsupported" in raw:
        if raw["onUnsupported"] not in ("route", "deny"):
            raise PolicyError(f"{where}.onUnsupported: must be route or deny, "
                              f"not {raw['onUnsupported']!r}")
        kw["on_unsupported"] = raw["onUnsupported"]
    if "features" in raw:
        feats = _typed(raw, "features", dict, where)
        for fid, action in feats.items():
            if fid not in BY_ID:
                raise PolicyError(f"{where}.features.{fid}: unknown feature "
                                  f"(see `ember k8s features`)")
            if action not in ACTIONS:
                raise PolicyError(f"{where}.features.{fid}: action must be one of "
                                  f"{', '.join(ACTIONS)}, not {action!r}")
        kw["features"] = dict(feats)
    return Policy(**kw)


def load_policy(path: str | Path | None) -> Policy:
    """The policy in ``path``, or the default policy when no path is given."""
    if path is None:
        return Policy()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"policy {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML or JSON"
        raise PolicyError(f"policy {path}: {problem}{at}") from None
    return policy_from_dict(raw, f"policy {path}")


def policy_to_dict(p: Policy) -> dict:
    """The effective policy as a document (for `ember k8s webhook --print-policy`)."""
    return json.loads(json.dumps({
        "defaultClass": p.default_class,
        "classes": p.classes,
        "routeOrder": list(p.routing_order()),
        "podAnnotation": p.pod_annotation,
        "namespaceLabel": p.namespace_label,
        "allowPodOptOut": p.allow_pod_opt_out,
        "namespaceRules": [
            {"selector": {"matchLabels": r.selector.match_labels,
                          "matchExpressions": [{"key": k, "operator": o, "values": list(v)}
                                               for k, o, v in r.selector.expressions]},
             "class": r.runtime_class or OPT_OUT}
            for r in p.namespace_rules],
        "exclude": {"namespaces": list(p.exclude_namespaces),
                    "hostNetwork": p.exclude_host_network,
                    "podsWithClass": p.exclude_pods_with_class},
        "onUnsupported": p.on_unsupported,
        "features": p.features,
    }))
