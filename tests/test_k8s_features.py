"""The feature matrix, its generated document, and detection of features in pods."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from ember.k8s.cli import k8s_group
from ember.k8s.detect import detect
from ember.k8s.features import BACKENDS, BY_ID, FEATURES, UNSUPPORTED, check_matrix
from ember.k8s.supportdoc import render

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "kubernetes-support.md"

# What the issue requires the matrix to cover, at least.
REQUIRED_IDS = {
    "emptyDir", "emptyDirMemory", "configMap", "secret", "projected", "downwardAPI",
    "hostPath", "pvcFilesystem", "pvcBlock", "csiEphemeral", "hostNetwork", "hostPID",
    "hostIPC", "privileged", "capabilitiesAdd", "devices", "shareProcessNamespace", "sysctls",
    "seccompProfile", "appArmorProfile", "runAsUser", "fsGroup", "readOnlyRootFilesystem",
    "resourceLimits", "inPlaceResize", "hugepages", "ephemeralContainers", "execAttach",
    "logs", "portForward", "probes", "initContainers", "sidecarContainers",
}


def test_matrix_is_well_formed_and_complete():
    check_matrix()
    assert REQUIRED_IDS <= set(BY_ID)
    # Firecracker's known gaps are in the data, with reasons that say so.
    assert BY_ID["hostPath"].firecracker.status == UNSUPPORTED
    assert "filesystem" in BY_ID["pvcFilesystem"].firecracker.reason


def test_committed_doc_matches_the_data():
    assert DOC.read_text() == render(), (
        "docs/kubernetes-support.md is stale: run "
        "`ember k8s features --write-doc docs/kubernetes-support.md`")


def test_doc_lists_every_feature_under_each_backend():
    text = render()
    for f in FEATURES:
        # once in the summary, once per backend section
        assert text.count(f"`{f.id}`") == 1 + len(BACKENDS), f.id
        for b in BACKENDS:
            assert f.on(b).reason.replace("|", "\\|") in text


def test_write_doc_and_json_via_cli(tmp_path):
    out = tmp_path / "support.md"
    res = CliRunner().invoke(k8s_group, ["features", "--write-doc", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text() == render()
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left nothing behind
    res = CliRunner().invoke(k8s_group, ["features", "--json", "--backend", "firecracker"])
    data = json.loads(res.output)
    assert {d["id"] for d in data} == set(BY_ID)
    assert "qemu" not in data[0] and data[0]["firecracker"]["status"]


def test_python_m_ember_k8s_runs_as_a_program():
    res = subprocess.run([sys.executable, "-m", "ember.k8s", "features", "--backend", "qemu"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("portForward "))
    assert line.split()[1] == "supported"
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("pvcBlock "))
    assert line.split()[1] == "unsupported"
    res = subprocess.run([sys.executable, "-m", "ember.k8s", "features", "--backend", "xen"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "xen" in res.stderr


def _pod(spec: dict, annotations: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "annotations": annotations or {}}, "spec": spec}


def test_detect_names_each_feature_and_where():
    pod = _pod({
        "hostPID": True,
        "shareProcessNamespace": True,
        "securityContext": {"fsGroup": 2000, "sysctls": [{"name": "net.core.somaxconn",
                                                          "value": "1024"}]},
        "initContainers": [{"name": "side", "image": "x", "restartPolicy": "Always"}],
        "containers": [{
            "name": "app", "image": "x",
            "securityContext": {"privileged": True, "capabilities": {"add": ["NET_ADMIN"]},
                                "readOnlyRootFilesystem": True, "runAsUser": 1000},
            "resources": {"limits": {"nvidia.com/gpu": "1", "memory": "1Gi",
                                     "hugepages-2Mi": "4Mi"}},
            "volumeDevices": [{"name": "raw", "devicePath": "/dev/xvda"}],
            "resizePolicy": [{"resourceName": "cpu", "restartPolicy": "NotRequired"}],
            "livenessProbe": {"exec": {"command": ["true"]}},
        }],
        "volumes": [
            {"name": "scratch", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
            {"name": "host", "hostPath": {"path": "/etc"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "c"}},
            {"name": "raw", "persistentVolumeClaim": {"claimName": "b"}},
            {"name": "inline", "csi": {"driver": "d"}},
            {"name": "nfs", "nfs": {"server": "s", "path": "/"}},
            {"name": "cfg", "configMap": {"name": "c"}},
        ],
    }, {"container.apparmor.security.beta.kubernetes.io/app": "runtime/default"})
    found = {(u.feature, u.where) for u in detect(pod)}
    for expected in [
        ("hostPID", "pod"), ("shareProcessNamespace", "pod"), ("fsGroup", "pod"),
        ("sysctls", "pod: net.core.somaxconn"), ("sidecarContainers", 'init container "side"'),
        ("privileged", 'container "app"'), ("capabilitiesAdd", 'container "app": NET_ADMIN'),
        ("readOnlyRootFilesystem", 'container "app"'), ("runAsUser", 'container "app"'),
        ("devices", 'container "app": resource nvidia.com/gpu'), ("hugepages", 'container "app"'),
        ("resourceLimits", 'container "app"'), ("inPlaceResize", 'container "app"'),
        ("probes", 'container "app"'), ("emptyDir", 'volume "scratch"'),
        ("emptyDirMemory", 'volume "shm"'), ("hostPath", 'volume "host", path /etc'),
        ("pvcFilesystem", 'volume "data"'), ("pvcBlock", 'volume "raw"'),
        ("csiEphemeral", 'volume "inline"'), ("otherVolume", 'volume "nfs" (nfs)'),
        ("configMap", 'volume "cfg"'),
        ("appArmorProfile", "annotation container.apparmor.security.beta.kubernetes.io/app"),
    ]:
        assert expected in found, expected


def test_detect_plain_pod_and_garbage_fields():
    assert detect(_pod({"containers": [{"name": "a", "image": "x"}]})) == []
    # Wrong types in fields must not crash detection (the API server validated
    # the pod, but a webhook must not trust its input).
    odd = _pod({"containers": "nope", "volumes": [1, None, {"name": "v"}],
                "securityContext": [], "initContainers": [{"securityContext": "x"}]})
    assert [u.feature for u in detect(odd)] == ["initContainers", "otherVolume"]
