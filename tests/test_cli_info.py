"""`ember check --json` and `ember info [--json]`: clean values, stable keys.

check: one JSON document whose keys do not depend on what the host has (null
for unknown), the accelerator probe's boot times rounded and with units in
the human output, never a ``None``. info: counts a real sandbox by status
from an isolated state dir, and fails with one line (exit 125) on a bad
config or a data dir that is not a directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

from conftest import ember_bin

CHECK_VALUES = {
    "qemu": {"path", "version"},
    "kvm": {"device", "api_version"},
    "accel probe": {"configured", "chosen", "recorded", "kvm_boot_s", "tcg_boot_s",
                    "measured_at"},
    "firecracker": {"path", "version"},
    "crun": {"path", "version"},
    "guest assets": {"built", "up_to_date", "key", "kernel_release"},
}
INFO_KEYS = {"ember_version", "python", "qemu", "firecracker", "hypervisor", "accel", "jailer",
             "guest_assets", "templates", "sandboxes", "images", "data_dir", "state_dir",
             "config_file"}
UNROUNDED = re.compile(r"\d\.\d{4,}")


def _ember(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.pop("EMBER_ACCEL", None)
    config = tmp_path / "config.toml"
    if not config.exists():
        config.write_text("")
    full.update({"EMBER_CONFIG": str(config), "EMBER_DATA_DIR": str(tmp_path / "data"),
                 "EMBER_STATE_DIR": str(tmp_path / "state"),
                 "EMBER_FIRECRACKER_BIN": str(tmp_path / "no-firecracker")})
    full.update(env)
    return subprocess.run([ember_bin(), *args], capture_output=True, text=True, env=full,
                          timeout=120, check=False)


def test_check_json_keys_and_clean_human_output(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "accel-probe.json").write_text(json.dumps(
        {"key": "k", "accel": "tcg", "kvm_s": None, "tcg_s": 1.234567891234}))

    proc = _ember(tmp_path, "check", "--json")
    assert proc.returncode == 1, proc.stderr  # no guest assets in this data dir
    report = json.loads(proc.stdout)
    assert set(report) == {"ready", "hypervisor", "accel", "summary", "checks"}
    assert report["ready"] is False and report["hypervisor"] == "qemu"
    assert set(report["accel"]) == {"configured", "chosen"}
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == set(CHECK_VALUES)
    for name, keys in CHECK_VALUES.items():
        assert set(checks[name]) == {"name", "status", "detail", "values"}
        assert set(checks[name]["values"]) == keys, name
    assert checks["firecracker"]["values"] == {"path": None, "version": None}
    assert checks["guest assets"]["values"]["built"] is False
    assert not UNROUNDED.search(proc.stdout)

    human = _ember(tmp_path, "check")
    assert human.returncode == 1
    assert "None" not in human.stdout and not UNROUNDED.search(human.stdout)
    lines = human.stdout.strip().splitlines()
    assert len(lines) == len(CHECK_VALUES) + 1
    assert "fake" not in human.stdout.lower()

    probe = checks["accel probe"]
    assert probe["values"]["configured"] == "auto"
    if checks["kvm"]["status"] == "ok":  # the recorded probe decides
        assert probe["values"] == {
            "configured": "auto", "chosen": "tcg", "recorded": True, "kvm_boot_s": None,
            "tcg_boot_s": 1.23, "measured_at": probe["values"]["measured_at"]}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", probe["values"]["measured_at"])
        line = next(ln for ln in lines if "accel probe" in ln)
        assert "kvm: does not boot (" in line and "tcg: boots in 1.2 s" in line
    else:  # without KVM there is nothing to probe: QEMU uses TCG
        assert probe["values"]["chosen"] == "tcg"


def test_check_json_says_null_when_the_probe_has_not_run(tmp_path):
    report = json.loads(_ember(tmp_path, "check", "--json").stdout)
    values = {c["name"]: c for c in report["checks"]}["accel probe"]["values"]
    assert values["kvm_boot_s"] is None and values["tcg_boot_s"] is None
    assert values["recorded"] is False and values["measured_at"] is None


def test_info_fails_in_one_line(tmp_path):
    (tmp_path / "data").write_text("not a directory")
    for args in (["info"], ["info", "--json"]):
        proc = _ember(tmp_path, *args)
        assert proc.returncode == 125 and proc.stdout == ""
        assert proc.stderr.splitlines() == [
            f"ember: error: data dir {tmp_path / 'data'} is not a directory"]

    (tmp_path / "data").unlink()
    (tmp_path / "config.toml").write_text("[vm\n")
    proc = _ember(tmp_path, "info", "--json")
    assert proc.returncode == 125 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("ember: error: config")


def test_info_on_an_empty_installation(tmp_path):
    proc = _ember(tmp_path, "info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert set(info) == INFO_KEYS
    assert info["sandboxes"]["total"] == 0
    assert set(info["sandboxes"]["by_status"]) >= {"running", "exited", "dead", "unknown"}
    assert info["data_dir"]["bytes"] is None and info["images"]["count"] == 0
    assert info["templates"] == {"count": 0, "bytes": 0}
    assert info["guest_assets"]["built"] is False
    human = _ember(tmp_path, "info")
    assert "None" not in human.stdout
    assert f"Data dir:      {tmp_path / 'data'}: absent" in human.stdout.splitlines()


def _info(ember_env) -> dict:
    return json.loads(ember_env.run("info", "--json", check=True).stdout)


def test_info_counts_a_real_sandbox(ember_env, image):
    before = _info(ember_env)
    assert before["sandboxes"]["total"] == 0
    proc = ember_env.run("run", "-d", "--name", "counted", image, "sleep", "600")
    assert proc.returncode == 0, proc.stderr

    info = _info(ember_env)
    assert info["sandboxes"]["total"] == 1 and info["sandboxes"]["by_status"]["running"] == 1
    assert info["images"]["count"] >= 1 and info["guest_assets"]["built"] is True
    assert info["state_dir"]["path"] == str(ember_env.state_dir)
    assert info["state_dir"]["bytes"] > 0 and info["data_dir"]["bytes"] > 0
    assert isinstance(info["templates"]["count"], int)
    assert info["accel"]["chosen"] in ("kvm", "tcg")  # a VM started: the choice is made
    human = ember_env.run("info", check=True).stdout.decode()
    assert "Sandboxes:     1 (1 running)" in human.splitlines()
    assert "None" not in human and not UNROUNDED.search(human)

    ember_env.run("kill", "counted", check=True)
    deadline = time.monotonic() + 60
    while _info(ember_env)["sandboxes"]["by_status"]["exited"] != 1:
        assert time.monotonic() < deadline, "the killed sandbox never showed as exited"
        time.sleep(0.5)
    assert _info(ember_env)["sandboxes"]["by_status"]["running"] == 0
