"""`ember check` tells the truth about Firecracker, KVM and the rest.

This machine has no Firecracker: check must say so, name the setting, and —
when the configuration selects Firecracker — report the host as not ready.
Ember's own test fake must never pass for a Firecracker.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from ember_testing.fc_fake import write_fake_binary

from ember.cli.check import check_cmd, check_kvm


@pytest.fixture
def run_check(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("EMBER_CONFIG", raising=False)

    def run(config: str = "", fc_bin: str | None = None) -> tuple[int, dict]:
        cfg = tmp_path / "config.toml"
        cfg.write_text(config)
        monkeypatch.setenv("EMBER_CONFIG", str(cfg))
        if fc_bin is None:
            monkeypatch.delenv("EMBER_FIRECRACKER_BIN", raising=False)
        else:
            monkeypatch.setenv("EMBER_FIRECRACKER_BIN", fc_bin)
        result = CliRunner().invoke(check_cmd, ["--json"])
        return result.exit_code, json.loads(result.output)

    return run


def by_name(report: dict) -> dict:
    return {c["name"]: c for c in report["checks"]}


def test_absent_firecracker_is_reported_as_missing(run_check, tmp_path):
    code, report = run_check(fc_bin=str(tmp_path / "nowhere" / "firecracker"))
    fc = by_name(report)["firecracker"]
    assert fc["status"] == "missing"
    assert "not found" in fc["detail"] and "EMBER_FIRECRACKER_BIN" in fc["detail"]
    assert {"qemu", "kvm", "crun", "guest assets"} <= set(by_name(report))


def test_selecting_absent_firecracker_makes_the_host_not_ready(run_check, tmp_path):
    code, report = run_check('[vm]\nhypervisor = "firecracker"\n',
                             fc_bin=str(tmp_path / "nowhere"))
    assert code == 1 and report["ready"] is False and report["hypervisor"] == "firecracker"


def test_the_test_fake_is_not_mistaken_for_firecracker(run_check, tmp_path):
    fake = write_fake_binary(tmp_path / "bin")
    code, report = run_check('[vm]\nhypervisor = "firecracker"\n', fc_bin=str(fake))
    fc = by_name(report)["firecracker"]
    assert fc["status"] == "warn" and "test fake" in fc["detail"]
    assert report["ready"] is False


def test_kvm_check_opens_the_device_for_real(tmp_path):
    missing = check_kvm(str(tmp_path / "kvm"))
    assert missing.status == "missing" and "does not exist" in missing.detail
    not_kvm = tmp_path / "not-kvm"
    not_kvm.write_bytes(b"")
    broken = check_kvm(str(not_kvm))
    assert broken.status == "error" and "does not work" in broken.detail


def test_human_output_is_one_line_per_finding(run_check, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_FIRECRACKER_BIN", str(tmp_path / "none"))
    result = CliRunner().invoke(check_cmd, [])
    lines = result.output.strip().splitlines()
    assert any(line.startswith("MISSING  firecracker") for line in lines)
    assert lines[-1].startswith("hypervisor 'qemu': ")
