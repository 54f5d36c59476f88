"""Overhead measurement (on real processes: QEMU and Python children) and the
RuntimeClass manifests built from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import kubernetes_validate
import psutil
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from ember.config import DEFAULT_POD_TCG_TB_MIB
from ember.k8s import overhead
from ember.vmm.qemu.machine import FIRMWARE, MACHINE

MIB = 1 << 20
K8S = latest_version()


def _spawn(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(10)


def test_guest_ram_is_subtracted_and_cpu_sampled():
    """A child maps 'guest RAM' of 64 MiB and touches 16 MiB of it."""
    child = _spawn("""
        import mmap, time
        ram = mmap.mmap(-1, 64 << 20)
        for off in range(0, 16 << 20, 4096):
            ram[off] = 1
        print("ready", flush=True)
        time.sleep(60)
    """)
    try:
        r = overhead.sample([child.pid], 64 * MIB, 0.5)
        assert 15 * MIB <= r["guest_touched_bytes"] <= 17 * MIB
        (proc,) = r["processes"]
        assert proc["pss"] - proc["guest_pss"] == r["memory_bytes"]
        assert 1 * MIB < r["memory_bytes"] < 60 * MIB  # the interpreter, not the guest RAM
        assert r["cpu_millicores"] < 100  # it sleeps
        # A guest size that matches no mapping subtracts nothing.
        assert overhead.guest_ram_pss(child.pid, 1000 * MIB) == 0
    finally:
        _stop(child)


def test_busy_process_shows_cpu():
    child = _spawn("""
        print("ready", flush=True)
        while True:
            pass
    """)
    try:
        r = overhead.sample([child.pid], 64 * MIB, 1.0)
        assert r["cpu_millicores"] > 300
        assert r["guest_touched_bytes"] == 0
        assert overhead.recommended(r)["cpu"] == f"{int(-(-r['cpu_millicores'] // 1))}m"
    finally:
        _stop(child)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
def test_qemu_guest_ram_mapping_is_found():
    """-mem-prealloc touches every guest page: all of it must be recognised as guest RAM."""
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-M", MACHINE, "-bios", FIRMWARE,
         "-accel", "tcg", "-cpu", "max", "-m", "64", "-mem-prealloc", "-S", "-nodefaults",
         "-no-user-config", "-display", "none"], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        proc = psutil.Process(qemu.pid)
        for _ in range(100):
            if proc.memory_info().rss > 64 * MIB:
                break
            psutil.wait_procs([proc], timeout=0.1)
        r = overhead.sample([qemu.pid], 64 * MIB, 0.3)
        assert overhead.vmm_accel([qemu.pid]) == "tcg"
        assert r["guest_touched_bytes"] == 64 * MIB
        assert 1 * MIB < r["memory_bytes"] < 200 * MIB
    finally:
        _stop(qemu)


def test_gone_processes_and_empty_lists():
    dead = subprocess.Popen(["true"])
    dead.wait()
    with pytest.raises(overhead.EmberError, match="exited while being measured"):
        overhead.sample([dead.pid], MIB, 0.05)
    with pytest.raises(overhead.EmberError, match="no host processes"):
        overhead.sample([], MIB, 0.05)


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.k8s", *args], capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.fixture
def data_env(tmp_path) -> dict:
    return dict(os.environ, EMBER_DATA_DIR=str(tmp_path / "data"),
                EMBER_STATE_DIR=str(tmp_path / "state"))


def test_runtimeclass_without_measurement_says_what_to_do(data_env):
    res = _run(data_env, "runtimeclass")
    assert res.returncode != 0 and res.stdout == ""
    (line,) = res.stderr.strip().splitlines()
    assert "no measured overhead for ember-qemu (qemu)" in line
    assert "ember k8s overhead --measure" in line and "--memory and --cpu" in line
    res = _run(data_env, "overhead")
    assert res.returncode != 0 and "run `ember k8s overhead --measure`" in res.stderr


def test_runtimeclass_with_explicit_values(data_env):
    res = _run(data_env, "runtimeclass", "--memory", "200Mi", "--cpu", "150m")
    assert res.returncode == 0, res.stderr
    docs = list(yaml.safe_load_all(res.stdout))
    assert [d["metadata"]["name"] for d in docs] == ["ember-qemu", "ember-fc"]
    for d in docs:
        kubernetes_validate.validate(d, K8S, strict=True)
        assert d["overhead"]["podFixed"] == {"memory": "200Mi", "cpu": "150m"}
        assert d["scheduling"]["nodeSelector"]["ember.io/runtime"] == "true"
    assert [d["handler"] for d in docs] == ["ember", "ember-fc"]
    for bad, needle in ((["--memory", "lots", "--cpu", "1"], "invalid memory quantity 'lots'"),
                        (["--memory", "1Gi", "--cpu", "-3"], "invalid cpu quantity '-3'"),
                        (["--class", "ember-xen", "--memory", "1Gi", "--cpu", "1"],
                         "unknown runtime class 'ember-xen'")):
        res = _run(data_env, "runtimeclass", *bad)
        assert res.returncode != 0 and needle in res.stderr, res.stderr


def test_runtimeclass_uses_the_cached_measurement(data_env, tmp_path):
    child = _spawn("""
        import time
        print("ready", flush=True)
        time.sleep(60)
    """)
    try:
        result = overhead.sample([child.pid], 64 * MIB, 0.2)
    finally:
        _stop(child)
    result.update(backend="qemu", podFixed=overhead.recommended(result),
                  measured_at="2026-01-01T00:00:00Z")
    cache = Path(data_env["EMBER_DATA_DIR"]) / overhead.CACHE_NAME
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"qemu": result}))
    res = _run(data_env, "runtimeclass", "--class", "ember-qemu")
    assert res.returncode == 0, res.stderr
    (doc,) = yaml.safe_load_all(res.stdout)
    assert doc["overhead"]["podFixed"] == overhead.recommended(result)
    # Firecracker was never measured here: no silent guess for it.
    res = _run(data_env, "runtimeclass")
    assert res.returncode != 0 and "no measured overhead for ember-fc" in res.stderr
    res = _run(data_env, "overhead")
    assert res.returncode == 0 and res.stdout.startswith("qemu: memory ")
    cache.write_text("{truncated")
    res = _run(data_env, "runtimeclass", "--class", "ember-qemu")
    assert res.returncode != 0 and "is unreadable" in res.stderr


def _demo_ready() -> str | None:
    """Why the live measurement cannot run here, or None when it can."""
    try:
        from ember.api import Sandbox
    except ImportError as exc:
        return f"ember.api.Sandbox is missing ({exc})"
    for attr in ("create", "host_pids", "guest_memory_bytes", "remove"):
        if not hasattr(Sandbox, attr):
            return f"ember.api.Sandbox has no {attr}()"
    if os.geteuid() != 0:
        return "needs root"
    return None


@pytest.mark.vm
@pytest.mark.root
@pytest.mark.timeout(600)
def test_measure_a_real_sandbox(tmp_path):
    reason = _demo_ready()
    if reason:
        pytest.skip(reason)
    from ember.config import load_config

    shared = load_config()  # the shared guest-asset (and VM template) cache
    data = tmp_path / "data"
    data.mkdir()
    (data / "guest").symlink_to(shared.guest_dir)
    if shared.templates_dir.is_dir():  # else a template is made in tmp_path (slower)
        (data / "templates").symlink_to(shared.templates_dir)
    # Unix socket paths are short (108 bytes): the state dir cannot live in tmp_path.
    state = Path(tempfile.mkdtemp(prefix="ek8s-", dir="/tmp"))
    try:
        _measure(tmp_path, data, state)
    finally:
        # Whatever a failed create may have left running under our state dir.
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(state) in arg for arg in proc.info["cmdline"] or ()):
                proc.kill()
        shutil.rmtree(state, ignore_errors=True)


def _measure(tmp_path: Path, data: Path, state: Path) -> None:
    # TCG boots are slow on a busy 2-core machine: give the boot room.
    (tmp_path / "config.toml").write_text("[vm]\nboot_timeout = 240\n")
    env = dict(os.environ, EMBER_DATA_DIR=str(data), EMBER_STATE_DIR=str(state),
               EMBER_CONFIG=str(tmp_path / "config.toml"))
    subprocess.run([sys.executable, "-m", "ember.image.demo", "ember-demo:latest"], env=env,
                   check=True, capture_output=True, timeout=120)
    before = {p.pid for p in psutil.process_iter()}
    res = subprocess.run([sys.executable, "-m", "ember.k8s", "overhead", "--measure", "--json",
                          "--seconds", "3"], env=env, capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)["qemu"]
    names = {p["name"] for p in r["processes"]}
    assert any("qemu" in n for n in names), names
    # VMM, sandbox monitor and (jailed) the jailer's waiter: all that lives per sandbox.
    assert len(r["processes"]) == 3, r["processes"]
    assert r["guest_touched_bytes"] > 0
    assert 0 < r["memory_bytes"] < 512 * MIB
    assert r["memory_bytes"] == sum(p["pss"] for p in r["processes"]) - r["guest_touched_bytes"]
    assert r["cpu_millicores"] >= 0
    assert r["accel"] in ("tcg", "kvm")
    if r["accel"] == "tcg":  # measured with a pod's translation cache, which it keeps
        assert r["tcg_tb_size_mib"] == DEFAULT_POD_TCG_TB_MIB
    cached = json.loads((data / overhead.CACHE_NAME).read_text())["qemu"]
    assert cached["podFixed"] == overhead.recommended(r)
    # The sandbox is gone: no process of it is left, no state.
    procs = []
    for p in r["processes"]:
        try:
            procs.append(psutil.Process(p["pid"]))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)  # exiting processes get a moment
    assert [p.pid for p in alive if p.pid not in before and p.status() != "zombie"] == []
    assert [p for p in (state / "sandboxes").glob("*") if p.is_dir()] == []
    res = subprocess.run([sys.executable, "-m", "ember.k8s", "runtimeclass", "--class",
                          "ember-qemu"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    (doc,) = yaml.safe_load_all(res.stdout)
    assert doc["overhead"]["podFixed"] == cached["podFixed"]
