"""End to end on a real Firecracker, wherever one can run.

Runs only when ``EMBER_FIRECRACKER_BIN`` names a real Firecracker (not Ember's
test fake) and /dev/kvm works; otherwise every test here is skipped with the
reason. Two parts:

* the driver alone on the real guest assets: boot, agent over hybrid vsock,
  placeholder patching, pause/resume, snapshot and restore, stop;
* the whole `ember run` suite of tests/test_run.py, collected again here with
  ``vm.hypervisor = "firecracker"`` in the configuration, so the same checks
  that pass on QEMU must pass on Firecracker.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest
import test_run

from ember.cli.check import check_kvm


def _why_not() -> str | None:
    binary = os.environ.get("EMBER_FIRECRACKER_BIN")
    if not binary:
        return "EMBER_FIRECRACKER_BIN is not set (no Firecracker on this machine)"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except OSError as exc:
        return f"EMBER_FIRECRACKER_BIN={binary} does not run: {exc}"
    if out.returncode != 0 or "ember test fake" in out.stdout:
        return f"EMBER_FIRECRACKER_BIN={binary} is not a real Firecracker"
    kvm = check_kvm()
    if kvm.status != "ok":
        return f"Firecracker needs KVM: {kvm.detail}"
    return None


REASON = _why_not()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or ""),
              pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(600)]


def _toml(data: dict) -> str:
    """Just enough TOML for Ember's two-level configuration."""
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    top = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
              for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(top + tables) + "\n"


@pytest.fixture(scope="module", autouse=True)
def firecracker_config():
    """Select Firecracker for everything in this module, keeping the rest of the config."""
    old = os.environ.get("EMBER_CONFIG")
    data: dict = {}
    if old:
        data = tomllib.loads(Path(old).read_text())
    data.setdefault("vm", {})["hypervisor"] = "firecracker"
    fd, path = tempfile.mkstemp(prefix="ember-fc-", suffix=".toml")
    os.write(fd, _toml(data).encode())
    os.close(fd)
    os.environ["EMBER_CONFIG"] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("EMBER_CONFIG", None)
        else:
            os.environ["EMBER_CONFIG"] = old
        os.unlink(path)


def test_driver_on_real_firecracker(guest_assets, tmp_path):
    from ember.config import load_config
    from ember.sandbox.agent_client import AgentClient
    from ember.sandbox.vm import SandboxVM, make_vmm
    from ember.vmm.base import Drive
    from ember.vmm.firecracker import FirecrackerVMM

    cfg = load_config()
    work = Path(tempfile.mkdtemp(prefix="fce", dir="/tmp"))
    spec = SandboxVM(cfg, "fce2e", work, 1, 256).base_spec()
    vm = make_vmm(cfg, spec)
    assert isinstance(vm, FirecrackerVMM)
    restored = None
    try:
        vm.start()
        with AgentClient(vm.connect_agent(cfg.vm.boot_timeout)) as agent:
            assert agent.wait_ready(30).kernel_release == guest_assets.kernel_release
        disk = tmp_path / "disk.img"
        subprocess.run(["mkfs.ext4", "-q", str(disk), "8M"], check=True)
        dev = vm.add_drive(Drive("c1", disk))
        assert dev.kind == "fcdisk"
        vm.remove_drive("c1")
        vm.pause()
        vm.resume()
        snap = tmp_path / "snap" / "vm.snap"
        vm.save_snapshot(snap)
        vm.kill()
        spec2 = SandboxVM(cfg, "fce2f", work / "r", 1, 256).base_spec()
        spec2.restore_from = snap
        restored = make_vmm(cfg, spec2)
        restored.start()
        with AgentClient(restored.connect_agent(30)) as agent:
            assert agent.wait_ready(30).agent_version
        restored.stop(timeout=10)
        assert restored.exited()
    finally:
        vm.kill()
        if restored is not None:
            restored.kill()
        subprocess.run(["rm", "-rf", str(work)], check=False)


# The QEMU end-to-end suite, again, on Firecracker (the `image` fixture is in conftest).
globals().update({name: fn for name, fn in vars(test_run).items()
                  if name.startswith("test_") and callable(fn)})
