"""Measure what a sandbox costs the node beyond the RAM its guest was given.

Kubernetes charges a pod its containers' requests plus the RuntimeClass's
``overhead.podFixed``; for a VM runtime that overhead is the VMM and the shim.
Guessing it either wastes nodes or lets them overcommit, so Ember measures it:
start a real sandbox, then for each of its host processes take the
proportional set size (PSS: shared libraries split fairly between sandboxes)
and subtract the part of QEMU's guest-RAM mapping the guest has touched —
that RAM belongs to the pod's own memory request, not to the overhead. CPU is
the processes' CPU time over a few idle seconds.

The result is cached in ``<data_dir>/k8s-overhead.json`` per backend, and
``ember k8s runtimeclass`` reads it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from ember.config import Config
from ember.errors import EmberError
from ember.util import atomic_write_json

CACHE_NAME = "k8s-overhead.json"
MIB = 1 << 20
# A guest-RAM mapping is the guest size, give or take alignment slack.
RAM_SLACK = 8 * MIB


@dataclass
class ProcessCost:
    pid: int
    name: str
    pss: int
    uss: int
    guest_pss: int  # part of pss that is guest RAM the guest touched


def guest_ram_pss(pid: int, guest_bytes: int) -> int:
    """PSS of the process's guest-RAM mapping, 0 if it has none.

    The guest-RAM mapping is the one whose size is the guest's RAM (up to
    alignment slack); of several candidates, the largest resident one wins.
    """
    best = 0
    size = pss = 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    if guest_bytes <= size <= guest_bytes + RAM_SLACK:
                        best = max(best, pss)
                    lo, hi = head.split("-")
                    size, pss = int(hi, 16) - int(lo, 16), 0
                elif head == "Pss:":
                    pss = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0
    if guest_bytes <= size <= guest_bytes + RAM_SLACK:
        best = max(best, pss)
    return best


def process_costs(pids: list[int], guest_bytes: int) -> list[ProcessCost]:
    """Memory of each live process; processes that are gone are skipped."""
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            info = p.memory_full_info()
            name = p.name()
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            raise EmberError(f"overhead: no permission to read memory of pid {pid} "
                             "(run as root)") from None
        out.append(ProcessCost(pid, name, info.pss, info.uss, guest_ram_pss(pid, guest_bytes)))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def vmm_accel(pids: list[int]) -> str | None:
    """The accelerator a QEMU among ``pids`` runs with: TCG costs far more than KVM,
    so a measurement says which one it saw."""
    opts = _accel_opts(pids)
    return opts[0] if opts else None


def vmm_tb_size(pids: list[int]) -> int | None:
    """The TCG translation cache (MiB) a QEMU among ``pids`` runs with: a started VM
    keeps it resident, so a measurement says which size it saw."""
    for opt in _accel_opts(pids)[1:]:
        key, _, value = opt.partition("=")
        if key == "tb-size" and value.isdigit():
            return int(value)
    return None


def _accel_opts(pids: list[int]) -> list[str]:
    for pid in pids:
        try:
            args = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        for flag, value in zip(args, args[1:], strict=False):
            if flag == "-accel":
                return value.split(",")
    return []


def jailer_waiters(pids: list[int]) -> list[int]:
    """The jailer's resident waiter above each jailed VMM: it lives as long as the
    sandbox, so its memory is overhead too."""
    found = []
    for pid in pids:
        try:
            parent = psutil.Process(pid).parent()
            if (parent is not None and parent.pid not in pids and parent.pid not in found
                    and any(a.endswith("waiter.py") for a in parent.cmdline())):
                found.append(parent.pid)
        except psutil.Error:
            continue
    return found


def sample(pids: list[int], guest_bytes: int, seconds: float) -> dict:
    """Measure live processes: memory now, CPU averaged over ``seconds``."""
    if not pids:
        raise EmberError("overhead: the sandbox reported no host processes")
    before, t0 = cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)
    used, elapsed = cpu_seconds(pids) - before, time.monotonic() - t0
    costs = process_costs(pids, guest_bytes)
    if not costs:
        raise EmberError("overhead: the sandbox's processes exited while being measured")
    pss = sum(c.pss for c in costs)
    guest = sum(c.guest_pss for c in costs)
    return {
        "memory_bytes": max(0, pss - guest),
        "cpu_millicores": round(1000 * used / elapsed, 1),
        "guest_memory_bytes": guest_bytes,
        "guest_touched_bytes": guest,
        "sample_seconds": round(elapsed, 2),
        "processes": [c.__dict__ for c in costs],
    }


def recommended(m: dict) -> dict[str, str]:
    """podFixed quantities: memory rounded up to MiB, CPU up to a millicore."""
    return {"memory": f"{max(1, math.ceil(m['memory_bytes'] / MIB))}Mi",
            "cpu": f"{max(1, math.ceil(m['cpu_millicores']))}m"}


def measure(cfg: Config, image: str, memory: str, cpus: int, seconds: float,
            settle: float = 2.0) -> dict:
    """Start a real sandbox, measure it, always remove it."""
    try:
        from ember.api import Sandbox  # the integrator's public API
    except ImportError as exc:
        raise EmberError(f"overhead: ember.api.Sandbox is not available ({exc})") from None
    # create() returns once the container runs; the sandbox lives on in its
    # own monitor process until remove(). Its VM gets a pod's translation
    # cache ([vm] pod_tcg_tb_size_mib), which a started VM keeps resident.
    pod_cfg = copy.deepcopy(cfg)
    pod_cfg.vm.tcg_tb_size_mib = cfg.vm.pod_tcg_tb_size_mib
    sb = Sandbox.create(image, ["sleep", "600"], memory=memory, cpus=cpus, cfg=pod_cfg)
    try:
        pids: list[int] = list(sb.host_pids())
        pids += jailer_waiters(pids)
        guest = int(sb.guest_memory_bytes())
        time.sleep(settle)
        accel = vmm_accel(pids) or cfg.vm.accel
        tb_size = vmm_tb_size(pids)
        result = sample(pids, guest, seconds)
    finally:
        sb.remove(force=True)
    result.update(backend=cfg.vm.hypervisor, accel=accel, tcg_tb_size_mib=tb_size, image=image,
                  measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    result["podFixed"] = recommended(result)
    return result


def cache_path(cfg: Config) -> Path:
    return cfg.data_dir / CACHE_NAME


def load_cache(cfg: Config) -> dict[str, dict]:
    """Measurements by backend; {} when none was made. A corrupt file is an error."""
    path = cache_path(cfg)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise EmberError(f"overhead cache {path} is unreadable ({exc}): run "
                         "`ember k8s overhead --measure` again") from None
    if not isinstance(data, dict):
        raise EmberError(f"overhead cache {path} is not a JSON object")
    return data


def save(cfg: Config, result: dict) -> Path:
    data = load_cache(cfg)
    data[result["backend"]] = result
    atomic_write_json(cache_path(cfg), data)
    return cache_path(cfg)
