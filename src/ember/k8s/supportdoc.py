"""Render docs/kubernetes-support.md from the feature matrix.

The document is output, never edited by hand: a test regenerates it and fails
when the committed file differs, so the published list and what the webhook
enforces are the same list.
"""

from __future__ import annotations

from ember.k8s.features import (
    BACKENDS,
    BY_DESIGN,
    CAVEAT,
    FEATURES,
    NICE,
    REQUIRED,
    SUPPORTED,
    UNSUPPORTED,
)

BACKEND_TITLES = {"qemu": "QEMU (`ember-qemu`)", "firecracker": "Firecracker (`ember-fc`)"}
_STATUS_TEXT = {SUPPORTED: "supported", CAVEAT: "supported, with a caveat",
                UNSUPPORTED: "not supported"}
_SECTIONS = ((REQUIRED, "Required"), (NICE, "Nice to have"),
             (BY_DESIGN, "Not supported by design"))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The whole Markdown document, deterministic for a given matrix."""
    out = [
        "# Kubernetes feature support",
        "",
        "<!-- Generated from src/ember/k8s/features.py by"
        " `ember k8s features --write-doc docs/kubernetes-support.md`. Do not edit. -->",
        "",
        "Every pod that Ember runs gets its own micro-VM. Some pod features cannot cross",
        "that boundary, and some behave differently inside it. This list is the one the",
        "admission webhook enforces: a pod that uses a feature its runtime class does not",
        "support is routed to a class that does, or refused with the reasons below.",
        "",
        "Statuses: **supported**; **supported, with a caveat** (works, but differs from",
        "runc as described); **not supported** (the webhook routes or denies the pod, and",
        "the node refuses it with a one-line reason). Every supported row names the test",
        "that proves it through containerd's CRI plugin: a spec of the CRI validation",
        "suite (`critest`, run by `scripts/critest.sh` in CI) or a project test. The",
        "Firecracker column shares the guest, agent and shim with QEMU, but is checked",
        "only against a contract-checking fake Firecracker (no binary can be installed",
        "on the project's machines).",
        "",
        "## Summary",
        "",
        "| Feature | id | " + " | ".join(BACKEND_TITLES[b] for b in BACKENDS) + " |",
        "|---|---|" + "---|" * len(BACKENDS),
    ]
    for f in FEATURES:
        cells = [_STATUS_TEXT[f.on(b).status] for b in BACKENDS]
        out.append(f"| {_cell(f.title)} | `{f.id}` | " + " | ".join(cells) + " |")
    for backend in BACKENDS:
        out += ["", f"## {BACKEND_TITLES[backend]}"]
        for priority, heading in _SECTIONS:
            rows = [f for f in FEATURES if f.on(backend).priority == priority]
            out += ["", f"### {heading}", ""]
            if not rows:
                out.append("(none)")
                continue
            out += ["| Feature | Status | Why | Proven by |", "|---|---|---|---|"]
            for f in rows:
                s = f.on(backend)
                out.append(f"| {_cell(f.title)} (`{f.id}`) | {_STATUS_TEXT[s.status]} | "
                           f"{_cell(s.reason)} | {_cell(s.proof) or '-'} |")
    return "\n".join(out) + "\n"
