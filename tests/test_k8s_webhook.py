"""The admission webhook over real HTTPS, fed AdmissionReviews as the API server
sends them. The server runs as a subprocess (`python -m ember.k8s webhook`);
certificates are made with `cryptography`; patches are applied with the
`jsonpatch` library and the result validated against the Kubernetes schema.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonpatch
import kubernetes_validate
import pytest
import requests
import yaml
from kubernetes_validate.utils import latest_version

from ember.k8s.certs import make_ca, make_server_cert, write_certs

K8S = latest_version()
TEST_POLICY = {
    "defaultClass": "ember-fc",
    "classes": {"ember-qemu": "qemu", "ember-fc": "firecracker"},
    "routeOrder": ["ember-fc", "ember-qemu"],
    "namespaceRules": [{"selector": {"matchLabels": {"isolation": "full"}},
                        "class": "ember-qemu"}],
    "exclude": {"namespaces": ["kube-system"], "hostNetwork": True, "podsWithClass": True},
    "onUnsupported": "route",
    "features": {"hostPath": "deny", "privileged": "forbid"},
}
NS_LABELS = {"team-a": {"isolation": "full"}, "optout": {"ember.io/runtime-class": "none"},
             "fcns": {"ember.io/runtime-class": "ember-qemu"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict[str, Path]:
    return write_certs(tmp_path_factory.mktemp("tls"), ["localhost", "127.0.0.1"])


@contextmanager
def webhook(tls: dict[str, Path], workdir: Path, *extra: str):
    """Run the webhook as a real process until the block ends; yields its base URL."""
    with webhook_process(tls, workdir, *extra) as (url, _):
        yield url


@contextmanager
def webhook_process(tls: dict[str, Path], workdir: Path, *extra: str):
    """Like webhook(), yielding (base URL, process)."""
    port = free_port()
    log = workdir / f"webhook-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ember.k8s", "webhook", "--tls-cert", str(tls["cert"]),
             "--tls-key", str(tls["key"]), "--host", "127.0.0.1", "--port", str(port), *extra],
            stdout=out, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"webhook exited: {log.read_text()}")
            try:
                if requests.get(url + "/healthz", verify=str(tls["ca"]), timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"webhook did not start: {log.read_text()}")
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tls, tmp_path_factory):
    d = tmp_path_factory.mktemp("webhook")
    (d / "policy.yaml").write_text(yaml.safe_dump(TEST_POLICY))
    (d / "ns.json").write_text(json.dumps(NS_LABELS))
    with webhook(tls, d, "--policy", str(d / "policy.yaml"),
                 "--namespace-labels", str(d / "ns.json")) as url:
        yield url


def make_pod(name: str = "web", namespace: str = "default", **spec_extra) -> dict:
    """A pod as the API server hands it to webhooks: defaulted, with the
    service-account token volume the ServiceAccount admission plugin adds."""
    annotations = spec_extra.pop("annotations", None)
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": None,
                     "labels": {"app": name}},
        "spec": {
            "containers": [{
                "name": "app", "image": "localhost/app:1", "imagePullPolicy": "IfNotPresent",
                "resources": {}, "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": True,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
            }],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst", "serviceAccountName": "default",
            "serviceAccount": "default", "securityContext": {},
            "schedulerName": "default-scheduler", "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority", "priority": 0,
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {
                "defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt",
                                   "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
        },
        "status": {"phase": "Pending", "qosClass": "BestEffort"},
    }
    if annotations is not None:
        pod["metadata"]["annotations"] = annotations
    pod["spec"].update(spec_extra)
    return pod


def make_review(pod: dict, namespace: str | None = None, operation: str = "CREATE",
                version: str = "v1") -> dict:
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    ns = namespace or pod.get("metadata", {}).get("namespace", "default")
    return {"apiVersion": f"admission.k8s.io/{version}", "kind": "AdmissionReview",
            "request": {"uid": str(uuid.uuid4()), "kind": gvk, "resource": gvr,
                        "requestKind": gvk, "requestResource": gvr,
                        "name": pod.get("metadata", {}).get("name", ""), "namespace": ns,
                        "operation": operation,
                        "userInfo": {"username": "kubernetes-admin",
                                     "groups": ["system:masters", "system:authenticated"]},
                        "object": pod, "oldObject": None, "dryRun": False,
                        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}}


def post(url: str, tls, review, endpoint: str = "mutate") -> dict:
    resp = requests.post(f"{url}/{endpoint}", json=review, verify=str(tls["ca"]), timeout=10)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["apiVersion"] == review["apiVersion"]
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == review["request"]["uid"]
    return answer["response"]


def patched(pod: dict, response: dict) -> dict:
    """Apply the response's patch the way the API server does, and validate the pod."""
    assert response["allowed"] is True
    if "patch" not in response:
        return pod
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    result = jsonpatch.apply_patch(copy.deepcopy(pod), ops)
    kubernetes_validate.validate(result, K8S, strict=True)
    assert "overhead" not in result["spec"], "the webhook must never set spec.overhead"
    return result


def test_plain_pod_gets_the_default_class(server, tls):
    pod = make_pod()
    kubernetes_validate.validate(pod, K8S, strict=True)  # the fixture itself is a valid pod
    resp = post(server, tls, make_review(pod))
    result = patched(pod, resp)
    assert result["spec"]["runtimeClassName"] == "ember-fc"
    assert result["metadata"]["annotations"]["ember.io/admission"].startswith("ember-fc:")
    assert result["spec"]["containers"] == pod["spec"]["containers"]


def test_patch_escapes_slashes_in_annotation_keys(server, tls):
    pod = make_pod(annotations={"team.example.com/owner": "a~b"})
    resp = post(server, tls, make_review(pod))
    ops = json.loads(base64.b64decode(resp["patch"]))
    assert {"op": "add", "path": "/spec/runtimeClassName", "value": "ember-fc"} in ops
    paths = [op["path"] for op in ops]
    assert "/metadata/annotations/ember.io~1admission" in paths
    result = patched(pod, resp)
    assert result["metadata"]["annotations"]["team.example.com/owner"] == "a~b"
    assert "ember.io/admission" in result["metadata"]["annotations"]


def test_block_pvc_is_denied_since_no_class_attaches_it(server, tls):
    pod = make_pod(volumes=[{"name": "raw", "persistentVolumeClaim": {"claimName": "disk"}}])
    pod["spec"]["containers"][0]["volumeDevices"] = [{"name": "raw", "devicePath": "/dev/xvdb"}]
    resp = post(server, tls, make_review(pod))
    assert resp["allowed"] is False and "patch" not in resp
    assert "volumeMode Block" in resp["status"]["message"]


def test_hostpath_is_denied_with_the_feature_and_reason(server, tls):
    pod = make_pod(volumes=[{"name": "logs", "hostPath": {"path": "/var/log"}}])
    resp = post(server, tls, make_review(pod))
    assert resp["allowed"] is False and "patch" not in resp
    msg = resp["status"]["message"]
    assert resp["status"]["code"] == 403
    assert 'hostPath volume (volume "logs", path /var/log)' in msg
    assert "Firecracker has no filesystem-sharing device" in msg
    assert "policy says deny" in msg


def test_gpu_pod_is_denied_when_no_class_can_run_it(server, tls):
    pod = make_pod()
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    resp = post(server, tls, make_review(pod))
    assert resp["allowed"] is False
    msg = resp["status"]["message"]
    assert "resource nvidia.com/gpu" in msg and "no other Ember class supports them" in msg
    assert "Firecracker has no device passthrough" in msg


def test_every_unsupported_feature_is_listed(server, tls):
    pod = make_pod(hostIPC=True, volumes=[{"name": "d", "persistentVolumeClaim": {
        "claimName": "c"}}, {"name": "e", "csi": {"driver": "x"}}])
    msg = post(server, tls, make_review(pod))["status"]["message"]
    for text in ("hostIPC (pod)", 'PersistentVolumeClaim, volumeMode Filesystem (volume "d")',
                 'CSI ephemeral inline volume (volume "e")'):
        assert text in msg


def test_privileged_is_forbidden_by_policy(server, tls):
    pod = make_pod()
    pod["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    resp = post(server, tls, make_review(pod))
    assert resp["allowed"] is False
    assert 'policy forbids these pod features: privileged containers (container "app")' \
        in resp["status"]["message"]


def _privileged_with_host_root(**spec) -> dict:
    """The review's attack: a privileged pod with hostPath /, escaping Ember somehow."""
    pod = make_pod(volumes=[{"name": "root", "hostPath": {"path": "/"}}], **spec)
    pod["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    return pod


@pytest.mark.parametrize("namespace,pod", [
    ("default", _privileged_with_host_root(hostNetwork=True)),
    ("default", _privileged_with_host_root(runtimeClassName="runc")),
    ("default", _privileged_with_host_root(runtimeClassName="ember-qemu")),
    ("optout", _privileged_with_host_root()),
], ids=["hostNetwork", "other-class", "ember-class", "namespace-opt-out"])
def test_forbid_applies_whatever_the_runtime_class(server, tls, namespace, pod):
    for endpoint in ("mutate", "validate"):
        resp = post(server, tls, make_review(pod, namespace), endpoint)
        assert resp["allowed"] is False, (endpoint, resp)
        assert 'policy forbids these pod features: privileged containers (container "app")' \
            in resp["status"]["message"]
        assert "patch" not in resp


def test_excluded_namespaces_stay_outside_the_policy(server, tls):
    """System namespaces (also left out by the webhook configuration) run privileged daemons."""
    pod = _privileged_with_host_root(namespace="kube-system", hostNetwork=True)
    resp = post(server, tls, make_review(pod, "kube-system"))
    assert resp["allowed"] is True and "patch" not in resp


def ephemeral_review(running: dict, *added: dict) -> dict:
    """What `kubectl debug` makes the API server send: an UPDATE of the subresource."""
    review = make_review(running, operation="UPDATE")
    updated = copy.deepcopy(running)
    updated["spec"]["ephemeralContainers"] = [
        *running["spec"].get("ephemeralContainers", []), *added]
    request = review["request"]
    request.update(subResource="ephemeralcontainers", object=updated, oldObject=running)
    request["resource"] = {"group": "", "version": "v1", "resource": "pods"}
    return review


def test_ephemeral_containers_are_reviewed(server, tls):
    running = make_pod(runtimeClassName="ember-fc")
    debugger = {"name": "debugger", "image": "localhost/busybox:1", "targetContainerName": "app",
                "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}
    for endpoint in ("mutate", "validate"):
        resp = post(server, tls, ephemeral_review(running, debugger), endpoint)
        assert resp["allowed"] is True and "patch" not in resp, resp
        root = dict(debugger, name="root", securityContext={"privileged": True})
        resp = post(server, tls, ephemeral_review(running, root), endpoint)
        assert resp["allowed"] is False and "patch" not in resp
        assert 'privileged containers (ephemeral container "root")' in resp["status"]["message"]
    # A pod off Ember (runc, hostNetwork...) gets the forbid rules too.
    off = make_pod(runtimeClassName="runc", hostNetwork=True)
    resp = post(server, tls, ephemeral_review(off, root))
    assert resp["allowed"] is False and "policy forbids" in resp["status"]["message"]
    # Only the containers this update adds are judged.
    with_root = copy.deepcopy(running)
    with_root["spec"]["ephemeralContainers"] = [root]
    assert post(server, tls, ephemeral_review(with_root, debugger))["allowed"] is True


@pytest.mark.parametrize("namespace,pod", [
    ("kube-system", make_pod(namespace="kube-system")),
    ("default", make_pod(hostNetwork=True)),
    ("default", make_pod(runtimeClassName="runc")),
    ("optout", make_pod(namespace="optout")),
], ids=["kube-system", "hostNetwork", "other-class", "namespace-opt-out"])
def test_excluded_pods_are_untouched(server, tls, namespace, pod):
    resp = post(server, tls, make_review(pod, namespace))
    assert resp["allowed"] is True
    assert "patch" not in resp and "status" not in resp


def test_pod_that_names_an_ember_class_keeps_it_but_is_checked(server, tls):
    ok = make_pod(runtimeClassName="ember-qemu")
    assert "patch" not in post(server, tls, make_review(ok))
    bad = make_pod(runtimeClassName="ember-fc", volumes=[{"name": "r", "persistentVolumeClaim": {
        "claimName": "c"}}])
    bad["spec"]["containers"][0]["volumeDevices"] = [{"name": "r", "devicePath": "/dev/b"}]
    resp = post(server, tls, make_review(bad))
    assert resp["allowed"] is False
    assert "ember-fc (firecracker) cannot run this pod (the pod names this class)" in \
        resp["status"]["message"]


@pytest.mark.parametrize("namespace,annotations,expected", [
    ("team-a", None, "ember-qemu"),            # namespace rule on label isolation=full
    ("fcns", None, "ember-qemu"),              # namespace label names the class
    ("default", {"ember.io/runtime-class": "ember-qemu"}, "ember-qemu"),  # pod annotation
    ("team-a", {"ember.io/runtime-class": "ember-fc"}, "ember-fc"),  # annotation wins
    ("default", {"ember.io/runtime-class": "none"}, "ember-fc"),  # opt-out not allowed
])
def test_class_from_labels_annotations_and_default(server, tls, namespace, annotations,
                                                   expected):
    pod = make_pod(namespace=namespace, annotations=annotations)
    resp = post(server, tls, make_review(pod))
    assert patched(pod, resp)["spec"]["runtimeClassName"] == expected


def test_v1beta1_review_is_answered_in_v1beta1(server, tls):
    resp = post(server, tls, make_review(make_pod(), version="v1beta1"))
    assert resp["allowed"] is True and resp["patchType"] == "JSONPatch"


def test_validate_gives_the_same_verdict_without_a_patch(server, tls):
    plain = post(server, tls, make_review(make_pod()), "validate")
    assert plain["allowed"] is True and "patch" not in plain
    assert any("would set runtimeClassName ember-fc" in w for w in plain["warnings"])
    denied = post(server, tls, make_review(make_pod(
        volumes=[{"name": "h", "hostPath": {"path": "/"}}])), "validate")
    assert denied["allowed"] is False and "hostPath" in denied["status"]["message"]


def test_update_and_caveats(server, tls):
    resp = post(server, tls, make_review(make_pod(), operation="UPDATE"))
    assert resp == {"uid": resp["uid"], "allowed": True}
    pod = make_pod()
    pod["spec"]["containers"][0]["securityContext"] = {
        "appArmorProfile": {"type": "RuntimeDefault"}}
    resp = post(server, tls, make_review(pod))
    assert any("AppArmor" in w for w in resp["warnings"])


def test_not_a_pod_is_disallowed_with_a_message(server, tls):
    review = make_review(make_pod())
    review["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    review["request"]["object"] = {"apiVersion": "apps/v1", "kind": "Deployment",
                                   "metadata": {"name": "d"}, "spec": {}}
    resp = post(server, tls, review)
    assert resp["allowed"] is False and resp["status"]["code"] == 400
    assert "only admits core/v1 Pods" in resp["status"]["message"]
    review = make_review(make_pod())
    review["request"]["object"] = {"apiVersion": "v1", "kind": "Pod", "spec": {"x": 1}}
    assert "no spec.containers" in post(server, tls, review)["status"]["message"]
    review = make_review(make_pod())
    del review["request"]["object"]
    assert post(server, tls, review)["status"]["message"] == \
        "AdmissionReview request has no object"


def _bad_bodies() -> list[tuple[str, bytes, str]]:
    good = make_review(make_pod())
    no_uid = copy.deepcopy(good)
    del no_uid["request"]["uid"]
    wrong_kind = dict(good, kind="Pod")
    wrong_version = dict(good, apiVersion="admission.k8s.io/v2")
    no_request = {k: v for k, v in good.items() if k != "request"}
    return [("not-json", b"{not json", "not JSON"),
            ("binary", b"\xff\xfe\x00", "not JSON"),
            ("array", b"[1, 2]", "not a JSON object"),
            ("wrong-kind", json.dumps(wrong_kind).encode(), "kind must be AdmissionReview"),
            ("wrong-version", json.dumps(wrong_version).encode(), "apiVersion must be"),
            ("no-request", json.dumps(no_request).encode(), "has no request"),
            ("no-uid", json.dumps(no_uid).encode(), "has no uid"),
            ("oversized", b" " * (3 * 1024 * 1024 + 1), "over the"),
            ("deeply-nested", b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
             "nested too deeply"),
            *[(f"wrong-type-{name}", json.dumps(body).encode(), needle)
              for name, body, needle in _wrongly_typed(good)]]


def _wrongly_typed(good: dict) -> list[tuple[str, dict, str]]:
    """Reviews whose pod fields have JSON types no API server would send."""
    cases = []
    for name, edit, needle in [
        ("annotations", lambda r: r["object"]["metadata"].update(annotations=["a"]),
         "metadata.annotations must be an object, not an array"),
        ("annotation-value", lambda r: r["object"]["metadata"].update(
            annotations={"a": [[[["deep"]]]]}), "metadata.annotations.a must be a string"),
        ("containers", lambda r: r["object"]["spec"].update(containers="app"),
         "spec.containers must be an array"),
        ("container", lambda r: r["object"]["spec"].update(containers=[["app"]]),
         "spec.containers[0] must be an object"),
        ("hostNetwork", lambda r: r["object"]["spec"].update(hostNetwork="yes"),
         "spec.hostNetwork must be a boolean"),
        ("runtimeClassName", lambda r: r["object"]["spec"].update(runtimeClassName=["runc"]),
         "spec.runtimeClassName must be a string"),
        ("privileged", lambda r: r["object"]["spec"]["containers"][0].update(
            securityContext={"privileged": "true"}), "securityContext.privileged"),
        ("namespace", lambda r: r.update(namespace={"a": 1}), "request: field namespace must be a string"),
        ("kind", lambda r: r.update(kind="Pod"), "request: field kind must be an object"),
        ("subResource", lambda r: r.update(subResource=5), "field subResource"),
    ]:
        review = copy.deepcopy(good)
        edit(review["request"])
        cases.append((name, review, needle))
    return cases


def test_malformed_requests_get_400_and_the_server_stays_up(server, tls):
    for name, body, message in _bad_bodies():
        for endpoint in ("mutate", "validate"):
            resp = requests.post(f"{server}/{endpoint}", data=body, verify=str(tls["ca"]),
                                 headers={"Content-Type": "application/json"}, timeout=10)
            assert resp.status_code == 400, (name, resp.text)
            assert message in resp.json()["error"], (name, resp.text)
    assert requests.post(f"{server}/nope", data=b"{}", verify=str(tls["ca"]),
                         timeout=5).status_code == 404
    # Garbage that is not even TLS, and a client that connects and says nothing.
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1]))) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        s.settimeout(5)
        try:
            s.recv(100)
        except (ConnectionResetError, TimeoutError):
            pass
    # Still serving, and still correct.
    assert requests.get(f"{server}/healthz", verify=str(tls["ca"]), timeout=5).text == "ok\n"
    assert post(server, tls, make_review(make_pod()))["allowed"] is True


def test_tls_is_real(server, tls, tmp_path):
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{server}/healthz", timeout=5)  # not signed by a system CA
    other_ca, _ = make_ca("someone-else")
    (tmp_path / "other.pem").write_bytes(other_ca)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{server}/healthz", verify=str(tmp_path / "other.pem"), timeout=5)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(server.replace("https", "http") + "/healthz", timeout=5)


def test_metrics_count_reviews(server, tls):
    before = requests.get(f"{server}/metrics", verify=str(tls["ca"]), timeout=5).text
    post(server, tls, make_review(make_pod()))
    after = requests.get(f"{server}/metrics", verify=str(tls["ca"]), timeout=5)
    assert after.headers["Content-Type"].startswith("text/plain")

    def count(text: str) -> float:
        for line in text.splitlines():
            if line.startswith('ember_webhook_reviews_total{endpoint="mutate",result="set"}'):
                return float(line.split()[-1])
        return 0.0
    assert count(after.text) == count(before) + 1
    assert "ember_webhook_bad_requests_total" in after.text
    assert "ember_webhook_review_seconds_bucket" in after.text


def test_default_policy_when_none_is_given(tls, tmp_path):
    with webhook(tls, tmp_path) as url:
        pod = make_pod(namespace="kube-system")
        assert "patch" not in post(url, tls, make_review(pod))
        pod = make_pod()
        assert patched(pod, post(url, tls, make_review(pod)))["spec"]["runtimeClassName"] \
            == "ember-qemu"
        pod = make_pod(volumes=[{"name": "raw", "persistentVolumeClaim": {"claimName": "d"}}])
        pod["spec"]["containers"][0]["volumeDevices"] = [{"name": "raw", "devicePath": "/dev/b"}]
        resp = post(url, tls, make_review(pod))
        assert resp["allowed"] is False and "no other Ember class" in resp["status"]["message"]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.k8s", *args], capture_output=True,
                          text=True, timeout=60)


def _one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("ember k8s: ")
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("content,needle", [
    ("defaultClass: [unclosed", "line 1"),
    ("classes: {ember-qemu: xen}", "backend must be one of qemu, firecracker"),
    ("features: {hostpath: deny}", "features.hostpath: unknown feature"),
    ("features: {hostPath: maybe}", "action must be one of route, deny, forbid"),
    ("defaultClas: ember-qemu", "unknown key 'defaultClas'"),
    ("defaultClass: gvisor", "'gvisor' is not one of the policy's classes"),
    ("namespaceRules: [{selector: {matchExpressions: [{key: a, operator: Near}]}, "
     "class: ember-fc}]", "operator: must be one of"),
    ("- just\n- a list\n", "expected a mapping at the top level"),
    ('{"exclude": {"hostNetwork": "yes"}}', "exclude.hostNetwork: expected bool"),
])
def test_bad_policy_is_a_one_line_error(tls, tmp_path, content, needle):
    bad = tmp_path / "policy.yaml"
    bad.write_text(content)
    res = _run_cli("webhook", "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"]),
                   "--policy", str(bad), "--port", str(free_port()))
    _one_line_error(res, str(bad), needle)


def test_missing_policy_file(tls, tmp_path):
    res = _run_cli("webhook", "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"]),
                   "--policy", str(tmp_path / "nope.yaml"))
    _one_line_error(res, "nope.yaml", "No such file")


def test_policy_check_prints_the_effective_policy(tls, tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps(TEST_POLICY))
    res = _run_cli("webhook", "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"]),
                   "--policy", str(good), "--check")
    assert res.returncode == 0, res.stderr
    eff = json.loads(res.stdout)
    assert eff["defaultClass"] == "ember-fc" and eff["features"]["hostPath"] == "deny"


def test_bad_certificates_are_one_line_errors(tls, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    ca, ca_key = make_ca()
    _, other_key = make_server_cert(ca, ca_key, ["localhost"])
    other = tmp_path / "other.key"
    other.write_bytes(other_key)
    cases = [
        ((tmp_path / "missing.crt", tls["key"]), ("missing.crt", "No such file")),
        ((tls["cert"], tmp_path / "missing.key"), ("missing.key", "No such file")),
        ((garbage, tls["key"]), ("garbage.pem", "cannot use TLS certificate")),
        ((tls["cert"], other), ("other.key", "KEY_VALUES_MISMATCH")),
    ]
    for (cert, key), needles in cases:
        res = _run_cli("webhook", "--tls-cert", str(cert), "--tls-key", str(key),
                       "--port", str(free_port()))
        _one_line_error(res, *needles)


def test_port_in_use_is_a_one_line_error(tls):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        res = _run_cli("webhook", "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"]),
                       "--host", "127.0.0.1", "--port", str(s.getsockname()[1]))
    _one_line_error(res, "cannot listen on 127.0.0.1")


def test_bad_namespace_label_file(tls, tmp_path):
    bad = tmp_path / "ns.yaml"
    bad.write_text("team-a: [not, a, mapping]")
    res = _run_cli("webhook", "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"]),
                   "--namespace-labels", str(bad))
    _one_line_error(res, "namespace labels", "expected {namespace: {label: value}}")


# --- namespace labels from the Kubernetes API ---------------------------------
# A real API server cannot run here, so a fake one stands in; it checks each
# request against the API's contract (GET /api/v1/namespaces/{name}, bearer
# token) and answers with Namespace objects that are validated against the
# Kubernetes schema before they are sent.

class _FakeKubeAPI(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ctx: ssl.SSLContext, token: str, namespaces: dict) -> None:
        super().__init__(("127.0.0.1", 0), _FakeKubeHandler)
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.token = token
        self.namespaces = namespaces
        self.seen: list[str] = []
        self.violations: list[str] = []


class _FakeKubeHandler(BaseHTTPRequestHandler):
    server: _FakeKubeAPI

    def log_message(self, *args) -> None:
        pass

    def _json(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._json(code, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                          "status": "Failure", "message": message, "reason": reason,
                          "code": code})

    def do_GET(self) -> None:  # noqa: N802
        self.server.seen.append(self.path)
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self._status(401, "Unauthorized", "Unauthorized")
            return
        if "application/json" not in self.headers.get("Accept", ""):
            self.server.violations.append(f"Accept {self.headers.get('Accept')}")
        m = re.fullmatch(r"/api/v1/namespaces/([a-z0-9]([-a-z0-9]*[a-z0-9])?)", self.path)
        if not m:
            self.server.violations.append(f"path {self.path}")
            self._status(404, "NotFound", "the server could not find the requested resource")
            return
        name = m.group(1)
        if name not in self.server.namespaces:
            self._status(404, "NotFound", f'namespaces "{name}" not found')
            return
        ns = {"apiVersion": "v1", "kind": "Namespace",
              "metadata": {"name": name, "uid": str(uuid.uuid4()), "resourceVersion": "42",
                           "creationTimestamp": "2026-01-01T00:00:00Z",
                           "labels": {"kubernetes.io/metadata.name": name,
                                      **self.server.namespaces[name]}},
              "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}
        kubernetes_validate.validate(ns, K8S, strict=True)
        self._json(200, ns)


@pytest.fixture
def kube_api(tls, tmp_path):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(tls["cert"]), str(tls["key"]))
    api = _FakeKubeAPI(ctx, "s3cret-token", {"team-a": {"isolation": "full"}, "plain": {}})
    thread = threading.Thread(target=api.serve_forever, daemon=True)
    thread.start()
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    try:
        yield api, f"https://127.0.0.1:{api.server_address[1]}", token
    finally:
        api.shutdown()
        api.server_close()
        thread.join(5)


def test_namespace_labels_from_the_api_server(tls, tmp_path, kube_api):
    api, api_url, token = kube_api
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(TEST_POLICY))
    with webhook(tls, tmp_path, "--policy", str(tmp_path / "policy.yaml"), "--kube-api",
                 api_url, "--kube-token-file", str(token), "--kube-ca", str(tls["ca"])) as url:
        for _ in range(2):
            pod = make_pod(namespace="team-a")
            assert patched(pod, post(url, tls, make_review(pod)))["spec"][
                "runtimeClassName"] == "ember-qemu"
        assert api.seen == ["/api/v1/namespaces/team-a"]  # the second pod hit the cache
        pod = make_pod(namespace="kube-system")
        assert "patch" not in post(url, tls, make_review(pod))
        assert api.seen == ["/api/v1/namespaces/team-a"]  # excluded: nothing to look up
        pod = make_pod(namespace="plain")
        assert patched(pod, post(url, tls, make_review(pod)))["spec"][
            "runtimeClassName"] == "ember-fc"
        resp = post(url, tls, make_review(make_pod(namespace="ghost")))
        assert resp["allowed"] is False and resp["status"]["code"] == 500
        assert "reading namespace ghost gave HTTP 404" in resp["status"]["message"]
        token.write_text("rotated-token")  # re-read per request: now refused
        resp = post(url, tls, make_review(make_pod(namespace="other")))
        assert "gave HTTP 401" in resp["status"]["message"]
        api.token = "rotated-token"
        resp = post(url, tls, make_review(make_pod(namespace="plain")))
        assert resp["allowed"] is True  # cached from before
    assert api.violations == []


def test_kube_api_options_are_checked(tls, tmp_path):
    res = _run_cli("webhook", "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"]),
                   "--kube-api", "https://127.0.0.1:1")
    _one_line_error(res, "--kube-api URL needs --kube-token-file")
    res = _run_cli("webhook", "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"]),
                   "--kube-api", "https://127.0.0.1:1", "--kube-token-file",
                   str(tmp_path / "none"))
    _one_line_error(res, "token file", "does not exist")
    res = subprocess.run([sys.executable, "-m", "ember.k8s", "webhook", "--tls-cert",
                          str(tls["cert"]), "--tls-key", str(tls["key"]), "--kube-api",
                          "in-cluster"], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items()
                              if k != "KUBERNETES_SERVICE_HOST"})
    _one_line_error(res, "not in a cluster")


def test_sigterm_stops_the_server_cleanly(tls, tmp_path):
    port = free_port()
    log = tmp_path / "w.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ember.k8s", "webhook", "--tls-cert", str(tls["cert"]),
             "--tls-key", str(tls["key"]), "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"https://127.0.0.1:{port}"
        for _ in range(200):
            try:
                requests.get(url + "/healthz", verify=str(tls["ca"]), timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        assert post(url, tls, make_review(make_pod()))["allowed"] is True
        proc.terminate()
        assert proc.wait(15) == 0, log.read_text()
        assert "webhook stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True once the server closed (EOF or reset) the connection within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def test_slow_clients_cannot_exhaust_the_server(tls, tmp_path):
    """400 silent clients: bounded threads, each dropped after its deadline, healthz stays up."""
    psutil = pytest.importorskip("psutil")
    workers, deadline = 4, 2.0
    with webhook_process(tls, tmp_path, "--workers", str(workers),
                         "--request-timeout", str(deadline)) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        idle_threads = psutil.Process(proc.pid).num_threads()
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(400)]
        try:
            time.sleep(0.5)
            assert psutil.Process(proc.pid).num_threads() <= idle_threads
            start = time.monotonic()
            assert all(_closed_within(c, deadline * 3) for c in clients)
            assert time.monotonic() - start < deadline * 3
        finally:
            for c in clients:
                c.close()
        resp = requests.get(url + "/healthz", verify=str(tls["ca"]), timeout=5)
        assert resp.text == "ok\n"
        metrics = requests.get(url + "/metrics", verify=str(tls["ca"]), timeout=5).text
        assert "ember_webhook_dropped_connections_total" in metrics


def test_a_trickling_client_is_cut_at_its_deadline(tls, tmp_path):
    """One byte a second keeps a per-read timeout happy, not the connection's deadline."""
    deadline = 2.0
    with webhook(tls, tmp_path, "--request-timeout", str(deadline)) as url:
        ctx = ssl.create_default_context(cafile=str(tls["ca"]))
        raw = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            start = time.monotonic()
            cut = False
            for byte in b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" * 4:
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    cut = True
                    break
                time.sleep(0.3)
                if time.monotonic() - start > deadline * 3:
                    break
            cut = cut or _closed_within(s, 1.0)
            assert cut and time.monotonic() - start < deadline + 2.5
        assert requests.get(url + "/healthz", verify=str(tls["ca"]), timeout=5).ok
