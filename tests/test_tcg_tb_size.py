"""``[vm] tcg_tb_size_mib``: QEMU's translated-code cache per VM under TCG.

The default stays small for idle density (test_vm_memory checks the running
VMM); a VM that runs much code (the LVM proof's Python, Go and lvm) is given
more through the config file, and a bad value is one line naming the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.config import DEFAULT_POD_TCG_TB_MIB, DEFAULT_TCG_TB_MIB, load_config
from ember.errors import EmberError
from ember.vmm.base import VMSpec
from ember.vmm.qemu import QemuVMM


def _cfg(tmp_path: Path, text: str):
    f = tmp_path / "config.toml"
    f.write_text(text)
    return load_config(f)


def test_the_configured_size_reaches_qemus_argv(tmp_path):
    assert _cfg(tmp_path, "").vm.tcg_tb_size_mib == DEFAULT_TCG_TB_MIB == 32
    cfg = _cfg(tmp_path, "[vm]\ntcg_tb_size_mib = 256\n")
    spec = VMSpec(vm_id="x", kernel=Path("k"), initrd=Path("i"), rootfs=Path("r"), cmdline="",
                  work_dir=tmp_path, accel="tcg", tcg_tb_mib=cfg.vm.tcg_tb_size_mib)
    assert QemuVMM(spec)._accel_args() == ["-accel", "tcg,tb-size=256", "-cpu", "max"]
    spec.accel = "kvm"  # no translation cache with KVM
    assert "tb-size" not in " ".join(QemuVMM(spec)._accel_args())


@pytest.mark.parametrize("key", ["tcg_tb_size_mib", "pod_tcg_tb_size_mib"])
@pytest.mark.parametrize("value", ["0", "5000", '"big"', "true", "1.5"])
def test_a_bad_size_is_one_line_naming_the_key(tmp_path, key, value):
    with pytest.raises(EmberError) as exc:
        _cfg(tmp_path, f"[vm]\n{key} = {value}\n")
    assert exc.value.message.startswith(f"config vm.{key}: ")
    assert "\n" not in exc.value.message


def test_a_pods_vm_gets_the_pod_size_and_the_config_is_left_alone(tmp_path):
    """The shim's VMs take ``[vm] pod_tcg_tb_size_mib`` (a pod runs more code before
    its app starts); ``ember run`` keeps ``tcg_tb_size_mib``."""
    from ember.shim.pod import Pod

    cfg = _cfg(tmp_path, "")
    assert cfg.vm.pod_tcg_tb_size_mib == DEFAULT_POD_TCG_TB_MIB == 64
    pod = Pod(cfg, tmp_path, "g")
    assert pod._vm_config().vm.tcg_tb_size_mib == 64 and cfg.vm.tcg_tb_size_mib == 32
    pod.cgroup = "/kubepods/pod1"
    assert pod._vm_config().jailer.parent_cgroup == "kubepods/pod1"
    cfg = _cfg(tmp_path, "[vm]\npod_tcg_tb_size_mib = 48\n")
    assert Pod(cfg, tmp_path, "g")._vm_config().vm.tcg_tb_size_mib == 48


def test_a_sandboxs_monitor_gets_its_creators_size(tmp_path, monkeypatch):
    """The creator passes its size to the monitor it spawns (EMBER_TCG_TB_MIB, as it
    passes EMBER_ACCEL), so a caller's config object decides, not only the file:
    `ember k8s overhead --measure` starts its sandbox with the pod's size."""
    monkeypatch.setenv("EMBER_TCG_TB_MIB", "40")
    assert _cfg(tmp_path, "[vm]\ntcg_tb_size_mib = 24\n").vm.tcg_tb_size_mib == 40
    monkeypatch.setenv("EMBER_TCG_TB_MIB", "lots")
    with pytest.raises(EmberError, match="^config vm.tcg_tb_size_mib: .*'lots'"):
        _cfg(tmp_path, "")
