"""Decide, for one pod, which runtime class it gets or why it is refused.

Pure logic, no HTTP: the webhook feeds it a pod, its namespace and that
namespace's labels. Order of precedence:

0. ``forbid`` features are refused on every pod the webhook reviews, whatever
   class it names or gets (hostNetwork, another runtime, an opt-out): forbid
   is a cluster rule, not a property of Ember's classes. Only a namespace in
   ``exclude.namespaces`` (system daemons, kept in step with the webhook
   configuration's namespaceSelector) is outside the policy altogether;
1. exclusions (listed namespaces, hostNetwork pods, pods that already name a
   class which is not Ember's) leave the pod alone;
2. a pod that names an Ember class keeps it (unless ``podsWithClass: false``,
   then policy decides) and is only checked;
3. otherwise the class comes from the pod annotation, then the namespace
   label, then the first matching namespace rule, then ``defaultClass``;
4. features the class cannot run are routed to another class or denied, per
   feature, per the policy.

Ephemeral containers added to a running pod (``pods/ephemeralcontainers``)
are checked by :func:`decide_ephemeral`: forbidden features are refused, and
on an Ember class so is what its backend cannot run (the pod cannot move).

It never touches ``spec.overhead``: the RuntimeClass admission plugin fills
that in from the class after all mutating webhooks ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.k8s.detect import Usage, detect, detect_ephemeral, new_ephemeral_containers
from ember.k8s.features import CAVEAT, REQUIRED, UNSUPPORTED, feature
from ember.k8s.policy import OPT_OUT, Policy
from ember.util import as_dict

ADMISSION_ANNOTATION = "ember.io/admission"
MAX_WARNINGS = 5


@dataclass
class Decision:
    allowed: bool
    result: str  # excluded | unchanged | checked | set | routed | denied
    runtime_class: str | None = None
    set_class: bool = False  # whether the patch must write runtimeClassName
    why: str = ""
    message: str = ""
    warnings: list[str] = field(default_factory=list)


def _problems(usages: list[Usage], backend: str) -> list[Usage]:
    return [u for u in usages if feature(u.feature).on(backend).status == UNSUPPORTED]


def _explain(usages: list[Usage], backend: str) -> str:
    return "; ".join(f"{feature(u.feature).title} ({u.where}): {feature(u.feature).on(backend).reason}"
                     for u in usages)


def _caveats(usages: list[Usage], cls: str, backend: str) -> list[str]:
    seen: dict[str, Usage] = {}
    for u in usages:
        support = feature(u.feature).on(backend)
        # Caveats of required features are the expected VM behaviour; warning
        # about them on every pod would only teach users to ignore warnings.
        if support.status == CAVEAT and support.priority != REQUIRED:
            seen.setdefault(u.feature, u)
    notes = [f"{cls}: {feature(fid).title}: {feature(fid).on(backend).reason}"
             for fid in seen]
    return notes[:MAX_WARNINGS]


def _requested_class(pod: dict, ns_labels: dict[str, str], policy: Policy
                     ) -> tuple[str | None, str]:
    """The class policy gives this pod, and where that choice came from."""
    meta = as_dict(pod.get("metadata"))
    annotations = as_dict(meta.get("annotations"))
    asked = annotations.get(policy.pod_annotation)
    if asked == OPT_OUT and policy.allow_pod_opt_out:
        return None, f"pod annotation {policy.pod_annotation}={OPT_OUT}"
    if isinstance(asked, str) and asked in policy.classes:
        return asked, f"pod annotation {policy.pod_annotation}"
    labelled = ns_labels.get(policy.namespace_label)
    if labelled == OPT_OUT:
        return None, f"namespace label {policy.namespace_label}={OPT_OUT}"
    if labelled in policy.classes:
        return labelled, f"namespace label {policy.namespace_label}"
    for i, rule in enumerate(policy.namespace_rules):
        if rule.selector.matches(ns_labels):
            return rule.runtime_class, f"namespace rule {i}"
    return policy.default_class, "default class"


def _unknown_asks(pod: dict, ns_labels: dict[str, str], policy: Policy) -> list[str]:
    """Warnings for annotations/labels naming classes the policy does not know."""
    meta = as_dict(pod.get("metadata"))
    annotations = as_dict(meta.get("annotations"))
    out = []
    asked = annotations.get(policy.pod_annotation)
    if asked is not None and asked not in policy.classes and not (
            asked == OPT_OUT and policy.allow_pod_opt_out):
        out.append(f"ember: ignored pod annotation {policy.pod_annotation}={asked!r}: "
                   f"not an allowed class")
    return out


def _forbidden(usages: list[Usage], policy: Policy, what: str) -> str | None:
    """The denial message when the policy forbids any of these usages."""
    forbidden = [u for u in usages if policy.action(u.feature) == "forbid"]
    if not forbidden:
        return None
    listed = "; ".join(f"{feature(u.feature).title} ({u.where})" for u in forbidden)
    return f"ember: policy forbids these {what}: {listed}"


def decide(pod: dict, namespace: str, ns_labels: dict[str, str], policy: Policy) -> Decision:
    """The verdict for one pod (same for the mutating and validating endpoints)."""
    spec = as_dict(pod.get("spec"))
    if namespace in policy.exclude_namespaces:
        return Decision(True, "excluded", why=f"namespace {namespace} is excluded")
    usages = detect(pod)
    forbidden = _forbidden(usages, policy, "pod features")
    if forbidden:
        own = spec.get("runtimeClassName")
        return Decision(False, "denied", own if isinstance(own, str) else None,
                        why="policy forbids a feature", message=forbidden)
    if spec.get("hostNetwork") is True and policy.exclude_host_network:
        return Decision(True, "excluded", why="hostNetwork pods are excluded")
    own = _dict_get(spec, "runtimeClassName")
    pinned = bool(own) and own in policy.classes and policy.exclude_pods_with_class
    if own and not pinned and policy.exclude_pods_with_class:
        return Decision(True, "excluded", runtime_class=own,
                        why=f"pod names runtime class {own}")
    warnings = _unknown_asks(pod, ns_labels, policy)
    target: str | None
    if pinned and own:
        target, why = own, "pod names the class"
    else:
        target, why = _requested_class(pod, ns_labels, policy)
        if target is None:
            return Decision(True, "unchanged", why=why, warnings=warnings)
    backend = policy.classes[target]
    problems = _problems(usages, backend)
    routed_from = None
    if problems:
        must_deny = pinned or any(policy.action(u.feature) == "deny" for u in problems)
        alternative = None if must_deny else next(
            (c for c in policy.routing_order()
             if c != target and not _problems(usages, policy.classes[c])), None)
        if alternative is None:
            tail = ("the pod names this class" if pinned else
                    "policy says deny" if must_deny else "no other Ember class supports them")
            return Decision(False, "denied", target, why=why, message=(
                f"ember: runtime class {target} ({backend}) cannot run this pod ({tail}): "
                f"{_explain(problems, backend)}"))
        routed_from, target = target, alternative
        backend = policy.classes[target]
    warnings += _caveats(usages, target, backend)
    if routed_from:
        names = ", ".join(dict.fromkeys(u.feature for u in problems))
        why = f"routed from {routed_from}: it does not support {names}"
        return Decision(True, "routed", target, set_class=True, why=why, warnings=warnings)
    if own == target:
        return Decision(True, "checked", target, why=why, warnings=warnings)
    return Decision(True, "set", target, set_class=True, why=why, warnings=warnings)


def decide_ephemeral(pod: dict, old_pod: object, namespace: str, policy: Policy) -> Decision:
    """The verdict for ephemeral containers added to a running pod.

    The pod's class is fixed by now, so nothing is routed: forbidden features
    are refused, and so is what the pod's Ember backend cannot run.
    """
    if namespace in policy.exclude_namespaces:
        return Decision(True, "excluded", why=f"namespace {namespace} is excluded")
    added = new_ephemeral_containers(pod, old_pod)
    if not added:
        return Decision(True, "unchanged", why="no new ephemeral container")
    usages = detect_ephemeral(added)
    forbidden = _forbidden(usages, policy, "ephemeral container features")
    own = _dict_get(pod, "spec", "runtimeClassName")
    if forbidden:
        return Decision(False, "denied", own, why="policy forbids a feature", message=forbidden)
    if own not in policy.classes:
        return Decision(True, "unchanged", own, why="the pod is not on an Ember class")
    backend = policy.classes[own]
    problems = _problems(usages, backend)
    if problems:
        return Decision(False, "denied", own, why="pod's class", message=(
            f"ember: runtime class {own} ({backend}) cannot run these ephemeral containers: "
            f"{_explain(problems, backend)}"))
    return Decision(True, "checked", own, why="ephemeral containers checked",
                    warnings=_caveats(usages, own, backend))


def _dict_get(doc: dict, *keys: str) -> str | None:
    """A nested string field, or None when any level is missing or of another type."""
    value: object = doc
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None
