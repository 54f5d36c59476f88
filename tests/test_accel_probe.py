"""The accelerator probe's cache (ember.vmm.qemu.accel.resolve_accel).

The probe boots the guest kernel under TCG and KVM (~6 s here), so its verdict
must be found again by every later start of the same set-up, including when
two set-ups share a data dir. The boots themselves are replaced by a counter:
what is checked here is when the probe runs, not what it measures.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from ember.vmm.qemu import accel


@pytest.fixture
def probes(monkeypatch):
    """Count probe boots; KVM "boots" faster than TCG, so the verdict is kvm."""
    runs: list[tuple[str, str]] = []

    def fake_probe(binary, kernel, which, timeout, cmdline):
        runs.append((which, cmdline))
        time.sleep(0.05)
        return 1.0 if which == "kvm" else 2.0

    monkeypatch.setattr(accel, "_probe", fake_probe)
    monkeypatch.setattr(accel, "_kvm_usable", lambda: True)
    return runs


@pytest.fixture
def kernel(tmp_path):
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"kernel")
    return path


def test_two_setups_sharing_a_data_dir_probe_once_each(tmp_path, kernel, probes):
    for _ in range(3):
        for cmdline in ("console=ttyS0 a=1", "console=ttyS0 b=2"):
            assert accel.resolve_accel("auto", "qemu", kernel, tmp_path, cmdline) == "kvm"
    # Two boots (TCG and KVM) per set-up, not per start.
    assert sorted(probes) == sorted([("tcg", "console=ttyS0 a=1"), ("kvm", "console=ttyS0 a=1"),
                                     ("tcg", "console=ttyS0 b=2"), ("kvm", "console=ttyS0 b=2")])
    record = json.loads((tmp_path / "accel-probe.json").read_text())
    assert record["accel"] == "kvm" and record["tcg_s"] == 2.0  # what `ember check` reads
    assert len(record["verdicts"]) == 2


def test_a_record_from_before_the_list_is_still_used(tmp_path, kernel, probes):
    accel.resolve_accel("auto", "qemu", kernel, tmp_path, "x")
    record = json.loads((tmp_path / "accel-probe.json").read_text())
    del record["verdicts"]
    record["accel"] = "tcg"  # so a reuse is told from a new probe's "kvm"
    (tmp_path / "accel-probe.json").write_text(json.dumps(record))
    probes.clear()
    assert accel.resolve_accel("auto", "qemu", kernel, tmp_path, "x") == "tcg"
    assert probes == []


def test_only_the_newest_verdicts_are_kept(tmp_path, kernel, probes):
    for i in range(accel.KEEP_VERDICTS + 2):
        accel.resolve_accel("auto", "qemu", kernel, tmp_path, f"c{i}")
    record = json.loads((tmp_path / "accel-probe.json").read_text())
    assert len(record["verdicts"]) == accel.KEEP_VERDICTS
    probes.clear()
    accel.resolve_accel("auto", "qemu", kernel, tmp_path, f"c{accel.KEEP_VERDICTS + 1}")
    assert probes == []  # the newest is kept
    accel.resolve_accel("auto", "qemu", kernel, tmp_path, "c0")
    assert len(probes) == 2  # the oldest was dropped, so it is probed again


def test_a_damaged_cache_is_probed_again_and_rewritten(tmp_path, kernel, probes):
    (tmp_path / "accel-probe.json").write_text("{not json")
    assert accel.resolve_accel("auto", "qemu", kernel, tmp_path, "x") == "kvm"
    assert len(probes) == 2
    assert json.loads((tmp_path / "accel-probe.json").read_text())["accel"] == "kvm"
    (tmp_path / "accel-probe.json").write_text(json.dumps({"verdicts": "nonsense"}))
    assert accel.resolve_accel("auto", "qemu", kernel, tmp_path, "x") == "kvm"
    assert len(probes) == 4


def test_starts_racing_with_no_verdict_probe_once(tmp_path, kernel, probes):
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(
        accel.resolve_accel("auto", "qemu", kernel, tmp_path, "x"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == ["kvm"] * 4
    assert len(probes) == 2


def test_a_set_accelerator_or_no_kvm_never_probes(tmp_path, kernel, probes, monkeypatch):
    assert accel.resolve_accel("tcg", "qemu", kernel, tmp_path, "x") == "tcg"
    assert accel.resolve_accel("kvm", "qemu", kernel, tmp_path, "x") == "kvm"
    monkeypatch.setattr(accel, "_kvm_usable", lambda: False)
    assert accel.resolve_accel("auto", "qemu", kernel, tmp_path, "x") == "tcg"
    assert probes == [] and not (tmp_path / "accel-probe.json").exists()
