"""deploy/kubernetes/: every manifest validates against the Kubernetes schema,
and the pieces agree with each other and with the code (ports, paths,
handlers, policy, CLI flags). Also the certificate command and script."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509
from kubernetes_validate.utils import latest_version

from ember.k8s.certs import write_certs
from ember.k8s.cli import k8s_group
from ember.k8s.policy import policy_from_dict
from ember.k8s.runtimeclass import CLASSES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
K8S = latest_version()
VENV_BIN = str(Path(sys.executable).parent)


def load_all() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_every_manifest_validates_strictly():
    docs = load_all()
    assert len(docs) >= 12
    for doc in docs.values():
        kubernetes_validate.validate(doc, K8S, strict=True)
    # The validator is not a rubber stamp: a misspelt field fails.
    bad = dict(docs[("RuntimeClass", "ember-qemu")], handlr="ember")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S, strict=True)


def test_webhook_configurations_point_at_the_service():
    docs = load_all()
    svc = docs[("Service", "ember-webhook")]
    dep = docs[("Deployment", "ember-webhook")]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in port_names
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"][
        "labels"].items()
    for kind, path in (("MutatingWebhookConfiguration", "/mutate"),
                       ("ValidatingWebhookConfiguration", "/validate")):
        (hook,) = docs[(kind, "ember-runtime-class")]["webhooks"]
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["failurePolicy"] in ("Fail", "Ignore")
        assert 1 <= hook["timeoutSeconds"] <= 10
        ref = hook["clientConfig"]["service"]
        assert (ref["name"], ref["namespace"], ref["path"], ref["port"]) == (
            svc["metadata"]["name"], svc["metadata"]["namespace"], path,
            svc["spec"]["ports"][0]["port"])
        rule, *more = hook["rules"]
        assert rule["resources"] == ["pods"] and rule["operations"] == ["CREATE"]
        # Ephemeral containers are reviewed (validated; nothing to patch).
        wanted = [] if kind.startswith("Mutating") else [["pods/ephemeralcontainers"]]
        assert [r["resources"] for r in more] == wanted
        assert all(r["operations"] == ["UPDATE"] for r in more)
        excluded = next(e for e in hook["namespaceSelector"]["matchExpressions"]
                        if e["key"] == "kubernetes.io/metadata.name")
        assert excluded["operator"] == "NotIn"
        assert {"kube-system", dep["metadata"]["namespace"]} <= set(excluded["values"])


def test_deployment_command_line_and_policy_are_accepted(tmp_path):
    """Run the Deployment's own command line (paths mapped into a temp folder)."""
    docs = load_all()
    container = docs[("Deployment", "ember-webhook")]["spec"]["template"]["spec"][
        "containers"][0]
    assert container["command"] == ["ember", "k8s", "webhook"]
    policy_text = docs[("ConfigMap", "ember-webhook-policy")]["data"]["policy.yaml"]
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "policy.yaml").write_text(policy_text)
    write_certs(tmp_path / "tls", ["localhost"])
    (tmp_path / "ns.yaml").write_text("{}")
    args = []
    for arg in container["args"]:
        if arg == "--kube-api=in-cluster":  # no cluster here: same code path otherwise
            arg = f"--namespace-labels={tmp_path / 'ns.yaml'}"
        args.append(arg.replace("=/tls/", f"={tmp_path}/tls/").replace(
            "=/policy/", f"={tmp_path}/policy/"))
    res = subprocess.run([sys.executable, "-m", "ember.k8s", "webhook", *args, "--check"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert policy_from_dict(yaml.safe_load(policy_text)).features["hostPath"] == "deny"
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["scheme"]) == ("/healthz", "HTTPS")


def test_runtimeclasses_and_installer_agree_with_the_code():
    docs = load_all()
    for info in CLASSES:
        rc = docs[("RuntimeClass", info.name)]
        assert rc["handler"] == info.handler
        assert rc["scheduling"]["nodeSelector"] == info.node_selector
    script = docs[("ConfigMap", "ember-installer")]["data"]["install.sh"]
    subprocess.run(["sh", "-n"], input=script, text=True, check=True)
    toml_text = re.search(r"<<'TOML'\n(.*?)\nTOML\n", script, re.S).group(1)
    runtimes = tomllib.loads(toml_text)["plugins"]["io.containerd.grpc.v1.cri"][
        "containerd"]["runtimes"]
    assert set(runtimes) == {c.handler for c in CLASSES}
    configs = {"qemu": "/etc/ember/config.toml", "firecracker": "/etc/ember/firecracker.toml"}
    for info in CLASSES:
        rt = runtimes[info.handler]
        assert rt["runtime_type"] == "io.containerd.ember.v2"
        assert rt["privileged_without_host_devices"] is True
        path = rt["options"]["ConfigPath"]
        assert path == configs[info.backend]
        # the script writes that config, selecting the backend
        assert f"hypervisor = \"{info.backend}\"\\n' > $H{path}" in script
    for label in {k for c in CLASSES for k in c.node_selector}:
        assert f'\\"{label}\\"' in script or f'"{label}"' in script
    ds = docs[("DaemonSet", "ember-installer")]["spec"]["template"]["spec"]
    assert ds["serviceAccountName"] == "ember-installer"
    rules = docs[("ClusterRole", "ember-installer")]["rules"]
    assert any("nodes" in r["resources"] and "patch" in r["verbs"] for r in rules)


def _ca_and_cert(out: Path) -> tuple[x509.Certificate, x509.Certificate]:
    return (x509.load_pem_x509_certificate((out / "ca.crt").read_bytes()),
            x509.load_pem_x509_certificate((out / "tls.crt").read_bytes()))


def test_certs_command_makes_a_chain_and_fills_ca_bundle(tmp_path):
    out = tmp_path / "tls"
    res = CliRunner().invoke(k8s_group, ["certs", "--out", str(out), "--fill",
                                         str(DEPLOY / "webhook-configuration.yaml")])
    assert res.exit_code == 0, res.output
    subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "tls.crt")],
                   check=True, capture_output=True)
    ca, cert = _ca_and_cert(out)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "ember-webhook.ember-system.svc" in sans.get_values_for_type(x509.DNSName)
    assert (out / "tls.key").stat().st_mode & 0o777 == 0o600
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert len(docs) == 2
    for doc in docs:
        kubernetes_validate.validate(doc, K8S, strict=True)
        bundle = doc["webhooks"][0]["clientConfig"]["caBundle"]
        assert base64.b64decode(bundle) == (out / "ca.crt").read_bytes()


def test_certs_fill_without_webhooks_fails_and_writes_nothing(tmp_path):
    out = tmp_path / "tls"
    res = CliRunner().invoke(k8s_group, ["certs", "--out", str(out), "--fill",
                                         str(DEPLOY / "runtimeclasses.yaml")])
    assert res.exit_code != 0
    assert "no MutatingWebhookConfiguration" in res.output
    assert not out.exists()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_make_webhook_cert_script_dry_run(tmp_path):
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
    res = subprocess.run(["bash", str(DEPLOY / "make-webhook-cert.sh"), "--dry-run"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    bundles = {d["webhooks"][0]["clientConfig"]["caBundle"] for d in docs}
    assert len(bundles) == 1
    ca = x509.load_pem_x509_certificate(base64.b64decode(bundles.pop()))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(tmp_path.iterdir()) == []  # the key material was not left behind
