"""Policy semantics, decided without HTTP (the webhook tests cover the wire)."""

from __future__ import annotations

import copy

import jsonpatch
import pytest

from ember.k8s.admission import class_patch, escape_pointer
from ember.k8s.decide import decide, decide_ephemeral
from ember.k8s.policy import Policy, PolicyError, policy_from_dict, policy_to_dict


def pod(**spec) -> dict:
    annotations = spec.pop("annotations", None)
    p = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
         "spec": {"containers": [{"name": "a", "image": "x"}], **spec}}
    if annotations is not None:
        p["metadata"]["annotations"] = annotations
    return p


BLOCK = {"volumes": [{"name": "b", "persistentVolumeClaim": {"claimName": "c"}}],
         "containers": [{"name": "a", "image": "x",
                         "volumeDevices": [{"name": "b", "devicePath": "/dev/b"}]}]}
# A feature QEMU carries (with a caveat) and Firecracker cannot: routed between classes.
HOSTPATH = {"volumes": [{"name": "h", "hostPath": {"path": "/srv/conf"}}],
            "containers": [{"name": "a", "image": "x",
                            "volumeMounts": [{"name": "h", "mountPath": "/conf",
                                              "readOnly": True}]}]}


def apply(p: dict, policy: Policy, ns: str = "default", labels: dict | None = None) -> dict:
    d = decide(p, ns, labels or {}, policy)
    assert d.allowed, d.message
    return jsonpatch.apply_patch(copy.deepcopy(p), class_patch(p, d)) if d.set_class else p


def test_escape_pointer_follows_rfc6901_order():
    assert escape_pointer("a/b") == "a~1b"
    assert escape_pointer("a~b") == "a~0b"
    assert escape_pointer("~1") == "~01"  # ~ first, so "~1" does not become "/"
    doc = {"m": {"x~1/y": 1}}
    path = "/m/" + escape_pointer("x~1/y")
    assert jsonpatch.apply_patch(doc, [{"op": "replace", "path": path, "value": 2}]) == {
        "m": {"x~1/y": 2}}


def test_pods_with_class_can_be_overridden_by_policy():
    policy = policy_from_dict({"exclude": {"podsWithClass": False}})
    p = pod(runtimeClassName="runc")
    d = decide(p, "default", {}, policy)
    ops = class_patch(p, d)
    assert ops[0] == {"op": "replace", "path": "/spec/runtimeClassName", "value": "ember-qemu"}
    assert apply(p, policy)["spec"]["runtimeClassName"] == "ember-qemu"
    # With the default policy the same pod is left alone.
    assert decide(p, "default", {}, Policy()).result == "excluded"


def test_pod_opt_out_only_when_policy_allows():
    p = pod(annotations={"ember.io/runtime-class": "none"})
    d = decide(p, "default", {}, Policy())
    assert d.set_class and any("ignored pod annotation" in w for w in d.warnings)
    d = decide(p, "default", {}, policy_from_dict({"allowPodOptOut": True}))
    assert d.allowed and not d.set_class and d.result == "unchanged"


def test_namespace_rules_with_expressions_first_match_wins():
    policy = policy_from_dict({"defaultClass": None, "namespaceRules": [
        {"selector": {"matchExpressions": [{"key": "tier", "operator": "In",
                                            "values": ["prod", "stage"]},
                                           {"key": "legacy", "operator": "DoesNotExist"}]},
         "class": "ember-qemu"},
        {"selector": {"matchExpressions": [{"key": "fast", "operator": "Exists"}]},
         "class": "ember-fc"},
        {"selector": {"matchExpressions": [{"key": "tier", "operator": "NotIn",
                                            "values": ["dev"]}]},
         "class": "none"},
    ]})
    cases = [({"tier": "prod"}, "ember-qemu"), ({"tier": "prod", "legacy": "1", "fast": ""},
                                                "ember-fc"),
             ({"tier": "dev"}, None), ({"tier": "test"}, None)]
    for labels, expected in cases:
        d = decide(pod(), "ns", labels, policy)
        assert d.runtime_class == expected, labels


def test_on_unsupported_deny_and_per_feature_override():
    fc = {"defaultClass": "ember-fc"}
    assert apply(pod(**HOSTPATH), policy_from_dict(fc))["spec"]["runtimeClassName"] \
        == "ember-qemu"
    d = decide(pod(**HOSTPATH), "default", {}, policy_from_dict({**fc, "onUnsupported": "deny"}))
    assert not d.allowed and "policy says deny" in d.message
    d = decide(pod(**HOSTPATH), "default", {}, policy_from_dict(
        {**fc, "onUnsupported": "deny", "features": {"hostPath": "route"}}))
    assert d.allowed and d.runtime_class == "ember-qemu" and d.result == "routed"


def test_forbid_applies_on_every_class():
    policy = policy_from_dict({"features": {"sysctls": "forbid"}})
    p = pod(securityContext={"sysctls": [{"name": "kernel.shm_rmid_forced", "value": "1"}]})
    d = decide(p, "default", {}, policy)
    assert not d.allowed and "sysctls (pod: kernel.shm_rmid_forced)" in d.message


@pytest.mark.parametrize("spec,ns,labels", [
    ({"hostNetwork": True}, "default", {}),
    ({"runtimeClassName": "runc"}, "default", {}),
    ({"annotations": {"ember.io/runtime-class": "none"}}, "default", {}),
    ({}, "optout", {"ember.io/runtime-class": "none"}),
], ids=["hostNetwork", "other-class", "pod-opt-out", "namespace-opt-out"])
def test_forbid_applies_to_pods_ember_leaves_alone(spec, ns, labels):
    """forbid is a cluster rule: escaping Ember's classes does not escape it."""
    policy = policy_from_dict({"allowPodOptOut": True, "features": {"privileged": "forbid"}})
    p = pod(**spec)
    p["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    d = decide(p, ns, labels, policy)
    assert not d.allowed and d.result == "denied" and "privileged containers" in d.message
    p["spec"]["containers"][0]["securityContext"] = {}
    assert decide(p, ns, labels, policy).allowed  # without it: excluded / unchanged as before
    p["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    assert decide(p, "kube-system", {}, policy).result == "excluded"


def test_ephemeral_containers_are_judged_by_the_pods_class():
    policy = policy_from_dict({"features": {"privileged": "forbid"}})
    running = pod(runtimeClassName="ember-fc")
    gpu = {"name": "dbg", "resources": {"limits": {"nvidia.com/gpu": 1}}}
    added = copy.deepcopy(running)
    added["spec"]["ephemeralContainers"] = [gpu]
    d = decide_ephemeral(added, running, "default", policy)
    assert not d.allowed and "ember-fc (firecracker) cannot run these ephemeral containers" \
        in d.message and 'ephemeral container "dbg"' in d.message
    # On runc the backend's limits do not apply; forbid rules still would.
    other = copy.deepcopy(added)
    other["spec"]["runtimeClassName"] = "runc"
    assert decide_ephemeral(other, running, "default", policy).allowed
    other["spec"]["ephemeralContainers"][0]["securityContext"] = {"privileged": True}
    assert not decide_ephemeral(other, running, "default", policy).allowed
    # Containers already there are not judged again.
    assert decide_ephemeral(added, added, "default", policy).result == "unchanged"


def test_patch_for_pods_without_metadata_or_annotations():
    p = pod()
    del p["metadata"]
    out = apply(p, Policy())
    assert out["metadata"]["annotations"]["ember.io/admission"].startswith("ember-qemu")
    q = pod(annotations={"ember.io/admission": "stale"})
    ops = class_patch(q, decide(q, "default", {}, Policy()))
    assert ops[1]["op"] == "replace" and ops[1]["path"] == "/metadata/annotations/ember.io~1admission"


def test_policy_round_trips_and_rejects_bad_shapes():
    raw = {"defaultClass": "ember-fc", "routeOrder": ["ember-fc", "ember-qemu"],
           "namespaceRules": [{"selector": {"matchLabels": {"a": "b"}}, "class": "none"}],
           "exclude": {"namespaces": ["x"], "hostNetwork": False, "podsWithClass": False},
           "onUnsupported": "deny", "features": {"hostPath": "forbid"}}
    p = policy_from_dict(raw)
    assert policy_from_dict(policy_to_dict(p)) == p
    for bad, needle in [({"classes": {}}, "at least one class"),
                        ({"routeOrder": ["ember-zz"]}, "routeOrder"),
                        ({"namespaceRules": [{"class": "ember-fc"}]}, "needs 'selector'"),
                        ({"onUnsupported": "forbid"}, "must be route or deny"),
                        ({"exclude": {"namespace": []}}, "unknown key 'namespace'"),
                        ({"allowPodOptOut": "yes"}, "expected bool")]:
        with pytest.raises(PolicyError, match=needle):
            policy_from_dict(bad)
    # A policy with only its own classes falls back to its first class as default.
    assert policy_from_dict({"classes": {"vm": "qemu"}}).default_class == "vm"


def test_policies_in_the_docs_are_valid():
    """docs/kubernetes.md spells out the default policy and an example: both must load."""
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "kubernetes.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    assert len(blocks) == 2
    assert policy_to_dict(policy_from_dict(blocks[0])) == policy_to_dict(Policy())
    example = policy_from_dict(blocks[1])
    assert example.default_class == "ember-fc" and example.action("privileged") == "forbid"
