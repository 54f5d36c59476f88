"""Failures that need a VM (or its absence): one line, exit 125, nothing left.

Each case points Ember at a broken set-up through its own config file (cold
boot, no template) and checks the message names the problem, then that no
QEMU, jail, disk or state folder survived.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import ember_bin, qemu_pids

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(300)]


def _run_with_config(ember_env, tmp_path: Path, config: str, *args: str):
    cfg = tmp_path / "config.toml"
    cfg.write_text(config)
    env = dict(ember_env.env, EMBER_CONFIG=str(cfg))
    return subprocess.run([ember_bin(), *args], capture_output=True, env=env, timeout=240,
                          check=False)


def _assert_clean(ember_env) -> None:
    assert not list((ember_env.state_dir / "sandboxes").glob("*/state.json"))
    assert not qemu_pids(str(ember_env.state_dir))
    disks = ember_env.cfg().disks_dir
    assert not disks.exists() or not any(
        (disks / d.name).exists() for d in (ember_env.state_dir / "sandboxes").glob("*"))


@pytest.mark.parametrize("config, words", [
    ('[vm]\nqemu_binary = "/nonexistent/qemu"\nsnapshot = false\n', "qemu not found"),
    ('[guest]\nkernel = "/nonexistent/vmlinuz"\n', "/nonexistent/vmlinuz"),
    ('[vm]\nsnapshot = false\nboot_timeout = 1\n', "did not boot within 1s; guest console"),
    # init runs `sleep` instead of the agent: the VM boots but nobody answers
    ('[vm]\nsnapshot = false\nboot_timeout = 12\n[guest]\nextra_cmdline = "-- sleep 600"\n',
     "did not boot within 12s"),
    # the root device never appears: init says so on the console and powers off
    ('[vm]\nsnapshot = false\n[guest]\nextra_cmdline = "root=/dev/vdz"\n',
     "ember-init-error"),
])
def test_broken_setups_fail_cleanly(ember_env, image, tmp_path, config, words):
    proc = _run_with_config(ember_env, tmp_path, config, "run", "--rm", image, "true")
    err = proc.stderr.decode()
    assert proc.returncode == 125, err
    assert err.startswith("ember: error: ") and err.count("\n") == 1, err
    assert words in err.lower(), err
    _assert_clean(ember_env)


def test_image_without_command(ember_env, tmp_path):
    from imagetools import busybox_rootfs

    root = busybox_rootfs(tmp_path / "rootfs")
    name = "localhost/no-cmd:1"
    proc = ember_env.run("image", "import-rootfs", str(root), "--name", name)
    assert proc.returncode == 0, proc.stderr
    try:
        proc = ember_env.run("run", "--rm", name)
        assert proc.returncode == 125
        assert b"image has no command" in proc.stderr
        assert ember_env.run("run", "--rm", name, "echo", "given").stdout == b"given\n"
    finally:
        ember_env.run("image", "rm", name)
    _assert_clean(ember_env)
