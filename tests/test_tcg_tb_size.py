"""``[vm] tcg_tb_size_mib``: QEMU's translated-code cache per VM under TCG.

The default stays small for idle density (test_vm_memory checks the running
VMM); a VM that runs much code (the LVM proof's Python, Go and lvm) is given
more through the config file, and a bad value is one line naming the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.config import DEFAULT_TCG_TB_MIB, load_config
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


@pytest.mark.parametrize("value", ["0", "5000", '"big"', "true", "1.5"])
def test_a_bad_size_is_one_line_naming_the_key(tmp_path, value):
    with pytest.raises(EmberError) as exc:
        _cfg(tmp_path, f"[vm]\ntcg_tb_size_mib = {value}\n")
    assert exc.value.message.startswith("config vm.tcg_tb_size_mib: ")
    assert "\n" not in exc.value.message
