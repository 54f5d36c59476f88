"""Where a pod's shim lives, and which pod a container belongs to.

Kept apart from the rest of the shim so that ``containerd-shim-ember-v2
start``, which containerd runs once for every container of a pod and waits
for, imports little: it only finds the pod folder and dials the socket there.
(With the whole shim imported, each ``start`` took ~170 ms before it printed.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.config import Config

MAX_SOCKET_PATH = 106
POINTER = "ember-shim.json"  # in each bundle: where its pod folder is

ANN_TYPE = "io.kubernetes.cri.container-type"
ANN_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
# CRI-O says the same with its own names.
CRIO_TYPE = "io.kubernetes.cri-o.ContainerType"
CRIO_SANDBOX_ID = "io.kubernetes.cri-o.SandboxID"


def short_key(*parts: str, n: int = 16) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:n]


def pod_dir(cfg: Config, containerd_address: str, namespace: str, group_id: str) -> Path:
    """The folder of the pod that ``group_id`` (the sandbox id) names."""
    return cfg.state_dir / "shim" / short_key(containerd_address, namespace, group_id)


def socket_path(pod: Path) -> Path:
    return pod / "shim.sock"


def pod_identity(annotations: dict) -> tuple[bool, str]:
    """(joins an existing pod?, sandbox id) from containerd's or CRI-O's annotations."""
    ctype = annotations.get(ANN_TYPE) or annotations.get(CRIO_TYPE) or ""
    sandbox = annotations.get(ANN_SANDBOX_ID) or annotations.get(CRIO_SANDBOX_ID) or ""
    return ctype == "container" and bool(sandbox), sandbox
