"""`--cpus` reaches the VMM's jail cgroup, not only the container inside the guest.

Unit part: the jail spec SandboxVM builds carries cpu.max (v2) or
cpu.cfs_period_us then cpu.cfs_quota_us (v1), in that order all the way to the
jailer's cgroup plan, and nothing CPU-related without a limit; the shim passes
a lone container's own limit and leaves CRI pods to the pod cgroup. Root part:
a jailed `ember run --cpus 0.5` has its QEMU in a cgroup whose quota is half a
CPU, removed with the sandbox; bad --cpus fails with one line and leaves nothing.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path

import pytest

from ember.config import Config
from ember.errors import EmberError
from ember.jailer import cgroups
from ember.sandbox.vm import SandboxVM


def _cfg(version: int) -> Config:
    cfg = Config()
    cfg.jailer.enabled = True
    cfg.jailer.cgroup_version = version
    return cfg


def _cpu_settings(version: int, cpus: float | None) -> list[tuple[str, str]]:
    vm = SandboxVM(_cfg(version), "cpu-unit-test", Path("/nonexistent"), 1, 256, cpus=cpus)
    spec = vm.jail_spec("tcg")
    return [(k, v) for k, v in spec.cgroups.items() if k.startswith("cpu")]


@pytest.mark.parametrize("cpus, quota", [(0.5, 50000), (1, 100000), (1.5, 150000),
                                         (2.00001, 200001), (0.001, 1000)])
def test_jail_spec_carries_the_cpu_limit(cpus, quota):
    assert _cpu_settings(2, cpus) == [("cpu.max", f"{quota} 100000")]
    # v1: the period is written first (the jailer keeps this order), then the quota.
    assert _cpu_settings(1, cpus) == [("cpu.cfs_period_us", "100000"),
                                      ("cpu.cfs_quota_us", str(quota))]
    assert quota == max(1000, math.ceil(cpus * 100000))


def test_no_cpu_limit_no_cpu_files():
    assert _cpu_settings(1, None) == [] and _cpu_settings(2, None) == []
    vm = SandboxVM(_cfg(1), "cpu-unit-test", Path("/nonexistent"), 1, 256)
    assert vm.cpus is None
    assert set(vm.jail_spec("tcg").cgroups) == {"memory.limit_in_bytes", "pids.max"}


@pytest.mark.parametrize("cpus", [0, -1, float("nan")])
def test_sandbox_vm_refuses_a_limit_that_is_not_positive(cpus):
    with pytest.raises(EmberError, match="invalid cpu limit"):
        SandboxVM(_cfg(1), "cpu-unit-test", Path("/nonexistent"), 1, 256, cpus=cpus)


def test_order_survives_the_jailer_command_line_and_maps_to_the_cpu_hierarchy():
    from ember.jailer.api import build_argv
    from ember.jailer.main import parse

    spec = SandboxVM(_cfg(1), "cpu-unit-test", Path("/nonexistent"), 1, 256,
                     cpus=0.25).jail_spec("tcg")
    spec.args = ["-version"]
    parsed = parse(build_argv(spec)[1:])
    assert list(parsed.cgroups.items()) == list(spec.cgroups.items())
    names = list(parsed.cgroups)
    assert names.index("cpu.cfs_period_us") < names.index("cpu.cfs_quota_us")
    if cgroups.v1_mount("cpu") is None or cgroups.v1_mount("memory") is None:
        pytest.skip("no cgroup v1 cpu and memory hierarchies here")
    plan = cgroups.CgroupPlan(1, "ember", spec.id, list(parsed.cgroups.items()))
    assert cgroups.v1_mount("cpu") / "ember" / spec.id in plan.targets()
    assert plan._leaf_for("cpu.cfs_quota_us") == cgroups.v1_mount("cpu") / "ember" / spec.id


def test_shim_passes_a_lone_containers_limit_only():
    from ember.shim.layout import ANN_SANDBOX_ID, ANN_TYPE
    from ember.shim.pod import ANN_CPU_PERIOD, ANN_CPU_QUOTA, vmm_cpu_limit

    lone = {"linux": {"resources": {"cpu": {"quota": 50000, "period": 100000}}}}
    assert vmm_cpu_limit(lone, {}) == 0.5
    assert vmm_cpu_limit({"linux": {"resources": {"cpu": {"quota": 150000}}}}, {}) == 1.5
    assert vmm_cpu_limit({"linux": {"resources": {"cpu": {"quota": -1}}}}, {}) is None
    assert vmm_cpu_limit({"process": {}}, {}) is None
    # A CRI pod: the kubelet's pod cgroup (limit + Pod Overhead) already bounds the VMM.
    pod = {ANN_TYPE: "sandbox", ANN_SANDBOX_ID: "abc", ANN_CPU_QUOTA: "50000",
           ANN_CPU_PERIOD: "100000"}
    assert vmm_cpu_limit(lone, pod) is None


def test_old_records_have_no_cpu_limit(tmp_path):
    from ember.sandbox.state import StateStore

    cfg = Config()
    cfg.state_dir = tmp_path
    store = StateStore(cfg)
    (store.dir("a" * 64)).mkdir(parents=True)
    (store.dir("a" * 64) / "state.json").write_text(
        json.dumps({"id": "a" * 64, "name": "old", "vcpus": 2, "memory_mib": 300}))
    assert store.load("a" * 64).cpus is None


# ------------------------------------------------------------------ real VMs


def _cpu_leaf(jail: dict) -> Path:
    parent, jail_id = jail.get("parent_cgroup") or "ember", jail["id"]
    if cgroups.detect_version() == 2:
        return cgroups.v2_mount() / parent / jail_id
    return cgroups.v1_mount("cpu") / parent / jail_id


def _cgroup_of(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(",") or (not names and controller == ""):
            return path
    return ""


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(400)
def test_jailed_run_puts_the_cpu_limit_on_the_vmm_cgroup(ember_env, image):
    proc = ember_env.run("run", "-d", "--cpus", "0.5", image, "sleep", "300")
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.decode().strip()
    info = json.loads(ember_env.run("inspect", sid, check=True).stdout)[0]
    assert info["cpus"] == 0.5 and info["vcpus"] == 1
    jail, pid = info["jail"], info["vmm_pid"]
    assert jail, "the sandbox must be jailed (the default)"
    leaf = _cpu_leaf(jail)
    if cgroups.detect_version() == 2:
        assert (leaf / "cpu.max").read_text().split() == ["50000", "100000"]
        assert _cgroup_of(pid, "") == f"/{jail.get('parent_cgroup') or 'ember'}/{jail['id']}"
    else:
        assert (leaf / "cpu.cfs_period_us").read_text().strip() == "100000"
        assert (leaf / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert _cgroup_of(pid, "cpu") == f"/{jail.get('parent_cgroup') or 'ember'}/{jail['id']}"
    assert leaf in cgroups.jail_cgroup_dirs(jail.get("parent_cgroup") or "ember", jail["id"])

    proc = ember_env.run("exec", sid, "cat", "/sys/fs/cgroup/cpu.max")  # the guest side stays
    assert proc.returncode == 0 and proc.stdout.split() == [b"50000", b"100000"], proc

    assert ember_env.run("rm", "-f", sid).returncode == 0
    assert not leaf.exists(), "cpu cgroup left behind"


@pytest.mark.root
@pytest.mark.parametrize("value", ["0", "-1", "nan", "1000000"])
def test_bad_cpus_fails_with_one_line_and_leaves_nothing(ember_env, image, value):
    proc = ember_env.run("run", "--rm", f"--cpus={value}", image, "true")
    assert proc.returncode == 125
    err = proc.stderr.decode().strip()
    assert f"invalid --cpus {value}" in err and len(err.splitlines()) == 1, err
    assert ember_env.run("ps", "-a", "-q").stdout.strip() == b""
    sandboxes = ember_env.state_dir / "sandboxes"
    assert not sandboxes.is_dir() or not [d for d in sandboxes.iterdir() if d.is_dir()]


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(400)
def test_shim_lone_container_limit_reaches_the_jail_cgroup(guest_assets, tmp_path):
    """`ctr run --cpus 0.5` style: the container's own quota goes on the pod VM's VMM."""
    import tempfile

    from ember.config import load_config
    from ember.shim.pod import Pod

    cfg = load_config()
    cfg.jailer.enabled = True
    pod_dir = Path(tempfile.mkdtemp(prefix="emb-pod-", dir="/tmp"))
    (pod_dir / "vm").mkdir()
    group = f"cpupod{uuid.uuid4().hex[:10]}"
    spec = {"process": {"args": ["sh"]},
            "linux": {"resources": {"cpu": {"quota": 50000, "period": 100000}}}}
    pod = Pod(cfg, pod_dir, group)
    try:
        pod.boot(spec, {})
        assert pod.jailed
        leaf = _cpu_leaf({"parent_cgroup": cfg.jailer.parent_cgroup, "id": group})
        if cgroups.detect_version() == 2:
            assert (leaf / "cpu.max").read_text().split() == ["50000", "100000"]
        else:
            assert (leaf / "cpu.cfs_quota_us").read_text().strip() == "50000"
            assert (leaf / "cpu.cfs_period_us").read_text().strip() == "100000"
    finally:
        pod.shutdown()
        shutil.rmtree(pod_dir, ignore_errors=True)
    assert not cgroups.jail_cgroup_dirs(cfg.jailer.parent_cgroup, group)
