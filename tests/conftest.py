"""Shared fixtures: the guest-asset cache, an isolated Ember state dir, leak checks.

Guest assets and VM templates are built once per machine into the shared
cache (/var/lib/ember, or $EMBER_DATA_DIR) and reused by every test and every
CI run; each test that runs sandboxes gets its own short state directory
(Unix socket paths are limited to 107 bytes) and is checked afterwards for
leaked QEMU processes, mounts and loop devices.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def ember_bin() -> str:
    venv = Path(sys.executable).parent / "ember"
    return str(venv) if venv.exists() else "ember"


def qemu_pids(marker: str = "") -> list[int]:
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if (p.info["name"] or "").startswith("qemu-system") and marker in " ".join(
                    p.info["cmdline"] or []):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


def loop_devices() -> set[str]:
    """Loop devices as "NAME BACKING-FILE" strings (other tests may run beside us)."""
    out = subprocess.run(["losetup", "-a", "-O", "NAME,BACK-FILE", "--noheadings"],
                         capture_output=True, text=True, check=False).stdout
    return {" ".join(line.split()[:2]) for line in out.splitlines() if line.strip()}


def mounts() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line.split()[1] for line in f}


@pytest.fixture(scope="session", autouse=True)
def ember0_left_as_found():
    """The whole run leaves the host's ember0 as it found it. Any test may start a
    sandbox on the bridge (`--network bridge`), which creates ember0 and, like
    docker0, leaves it; if the run made it, it goes (with its iptables rules) at
    the end, and a bridge still in use then is a leaked sandbox."""
    if os.geteuid() != 0:
        yield
        return
    from ember.net.bridge import BRIDGE, remove_bridge

    had_bridge = Path(f"/sys/class/net/{BRIDGE}").exists()
    yield
    if not had_bridge and Path(f"/sys/class/net/{BRIDGE}").exists():
        assert remove_bridge(), f"{BRIDGE} still in use after the tests: a sandbox leaked"


@pytest.fixture(scope="session")
def guest_assets():
    """Build (or reuse) the guest kernel/initrd/rootfs in the shared cache."""
    from ember.config import load_config
    from ember.guest.build import build_guest

    return build_guest(load_config(), progress=False)


class EmberEnv:
    """An isolated state dir and a helper to run the real `ember` CLI."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.env = dict(os.environ)
        self.env["EMBER_STATE_DIR"] = str(state_dir)

    def run(self, *args: str, input: bytes | None = None, timeout: float = 240,
            check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run([ember_bin(), *args], input=input, capture_output=True,
                              env=self.env, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ember {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode()}")
        return proc

    def cfg(self):
        from ember.config import load_config

        old = os.environ.get("EMBER_STATE_DIR")
        os.environ["EMBER_STATE_DIR"] = str(self.state_dir)
        try:
            return load_config()
        finally:
            if old is None:
                os.environ.pop("EMBER_STATE_DIR", None)
            else:
                os.environ["EMBER_STATE_DIR"] = old


@pytest.fixture
def ember_env(guest_assets):
    """A fresh state dir; afterwards, every sandbox is removed and leaks are asserted."""
    before_loops, before_mounts = loop_devices(), mounts()
    state = Path(tempfile.mkdtemp(prefix="emb-", dir="/tmp"))
    env = EmberEnv(state)
    try:
        yield env
    finally:
        sandboxes = state / "sandboxes"
        leftovers = [d.name for d in sandboxes.iterdir() if d.is_dir()] if sandboxes.is_dir() else []
        for sid in leftovers:
            env.run("rm", "-f", sid, timeout=60)
        leaked_qemu = [p for sid in leftovers for p in qemu_pids(f"ember-{sid[:12]}")]
        for pid in leaked_qemu:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        shutil.rmtree(state, ignore_errors=True)
        assert not leaked_qemu, f"QEMU processes left behind: {leaked_qemu}"
        ours = ("/var/lib/ember", str(state))
        new_loops = [d for d in loop_devices() - before_loops if any(o in d for o in ours)]
        new_mounts = [m for m in mounts() - before_mounts if m.startswith(ours)]
        assert not new_loops, f"loop devices left behind: {new_loops}"
        assert not new_mounts, f"mounts left behind: {new_mounts}"


# One tag per test session: sessions that share the data directory (CI and a
# developer's run) must not remove each other's image when they finish.
E2E_IMAGE = f"localhost/ember-e2e:s{os.getpid()}"


@pytest.fixture(scope="session")
def image(tmp_path_factory, guest_assets):
    """A busybox image built here as an OCI layout tar and imported with `ember image import`."""
    from imagetools import busybox_rootfs, write_oci_layout_tar

    tmp = tmp_path_factory.mktemp("img")
    root = busybox_rootfs(tmp / "rootfs")
    tar = write_oci_layout_tar(
        tmp / "image.tar", [root], ref=E2E_IMAGE,
        config={"Env": ["PATH=/bin:/usr/bin", "GREETING=from-image"], "WorkingDir": "/srv",
                "Cmd": ["sh", "-c", "echo default-cmd"]},
    )
    proc = subprocess.run([ember_bin(), "image", "import", str(tar)], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    yield E2E_IMAGE
    subprocess.run([ember_bin(), "image", "rm", E2E_IMAGE], capture_output=True, check=False)
