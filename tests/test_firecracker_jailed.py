"""The Firecracker driver through ember-jailer, against the fake in a real jail.

ember-jailer builds ``<base>/firecracker/<id>/root``, binds what the driver
placed, drops to an unprivileged uid in a chroot and execs the fake
``firecracker`` (whose interpreter and code are bound in read-only). So every
path the driver sends must be a jail path that exists for that uid, the
sockets must be reached through the jail directory, a container disk must be
hard-linked in after start — and a snapshot taken in one jail must load in
another. Seccomp is off: the allow-list is Firecracker's, not Python's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import ember_testing
import pytest
from ember_testing.fc_fake import read_log, write_fake_binary

import ember
from ember.errors import VMError
from ember.jailer.api import JailSpec, Placement
from ember.sandbox.agent_client import AgentClient
from ember.vmm.base import Drive, VMSpec
from ember.vmm.firecracker import FirecrackerVMM
from ember.vmm.firecracker import drives as fc_drives
from ember.vmm.firecracker.contract import default_spec_path
from ember.vmm.firecracker.contract import load as load_contract

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="ember-jailer needs root"),
    pytest.mark.skipif(not default_spec_path().exists(),
                       reason=f"Firecracker API description not found at {default_spec_path()}"),
]

UID = 100123


def _ro(path: str, at: str | None = None) -> Placement:
    return Placement(path, at or path, "bind")


@pytest.fixture
def jail_env(tmp_path_factory):
    """A jail template able to run the Python fake, and a real agent behind its vsock."""
    root = Path(tempfile.mkdtemp(prefix="fcj", dir="/tmp"))
    os.chmod(root, 0o755)
    logdir = root / "log"
    logdir.mkdir()
    agent_dir = root / "agent"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.agent", "--listen-unix", str(agent_dir / "a.sock"),
         "--base-dir", str(agent_dir / "base")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().strip() == b"EMBER-AGENT-READY"  # type: ignore[union-attr]
        os.chmod(agent_dir / "a.sock", 0o666)
        src = str(Path(ember.__file__).resolve().parents[1])
        support = str(Path(ember_testing.__file__).resolve().parents[1])  # tests/
        binary = write_fake_binary(root / "bin", env={
            "EMBER_FC_FAKE_LOG": "/log/requests.jsonl",
            "EMBER_FC_FAKE_GUEST": "1024=/guest/agent.sock",
            "EMBER_FC_SPEC": "/spec/firecracker.yaml"})
        template = JailSpec(
            id="x", exec_file=str(binary), uid=UID, gid=UID, chroot_base_dir=str(root / "jails"),
            seccomp="off", parent_cgroup="ember-test-fc",
            files=[_ro("/usr"), _ro("/usr/lib", "/lib"), _ro("/usr/lib64", "/lib64"),
                   _ro(str(Path(sys.prefix))), _ro(src), _ro(support),
                   _ro(str(default_spec_path()), "/spec/firecracker.yaml"),
                   _ro(str(agent_dir / "a.sock"), "/guest/agent.sock"),
                   Placement(str(logdir), "/log", "bind", writable=True)])
        for name in ("vmlinux", "initrd.img", "rootfs.ext4"):
            (root / name).write_bytes((b"\x7fELF" if name == "vmlinux" else b"") + b"\0" * 8188)
        yield root, template, binary
    finally:
        proc.terminate()
        proc.wait(10)
        leftover = list((root / "jails").glob("*/*")) if (root / "jails").exists() else []
        subprocess.run(["rm", "-rf", str(root)], check=False)
        assert leftover == [], f"jails left behind: {leftover}"


def _spec(root: Path, template: JailSpec, name: str, **kw) -> VMSpec:
    return VMSpec(vm_id=f"t-{name}", kernel=root / "vmlinux", initrd=root / "initrd.img",
                  rootfs=root / "rootfs.ext4", cmdline="console=ttyS0",
                  work_dir=root / name, jailer=template, **kw)


def test_jailed_life_snapshot_and_restore(jail_env):
    root, template, binary = jail_env
    vm = FirecrackerVMM(_spec(root, template, "a"), binary=str(binary), placeholder_drives=2)
    restored = None
    try:
        vm.start()
        jail = root / "jails" / "firecracker" / "t-a" / "root"
        assert vm.api_socket == jail / "run" / "firecracker.sock"
        assert vm.pid and vm.pid != vm._proc.pid  # the VMM, not the jailer supervising it
        assert os.stat(f"/proc/{vm.pid}").st_uid == UID
        with AgentClient(vm.connect_agent(timeout=10)) as agent:
            assert agent.wait_ready(10).agent_version

        disk = root / "disk.img"
        disk.write_bytes(b"\0" * (1 << 20))
        dev = vm.add_drive(Drive("c1", disk))
        assert dev.address == f"{fc_drives.disk_serial(disk)}:2048"  # hard link: same inode
        assert disk.stat().st_uid == UID and disk.stat().st_nlink == 2
        vm.remove_drive("c1")
        assert disk.stat().st_uid == 0 and disk.stat().st_nlink == 1  # given back

        snap = root / "snaps" / "a.snap"
        vm.save_snapshot(snap)
        assert snap.exists() and snap.with_name("a.snap.mem").exists()
        vm.kill()
        assert not jail.exists()  # the jailer removed its jail

        restored = FirecrackerVMM(_spec(root, template, "b", restore_from=snap),
                                  binary=str(binary), placeholder_drives=2)
        restored.start()
        with AgentClient(restored.connect_agent(timeout=10)) as agent:
            assert agent.wait_ready(10).agent_version
        restored.stop(timeout=5)
        assert restored.exited()
    finally:
        vm.kill()
        if restored is not None:
            restored.kill()

    reqs = read_log(root / "log" / "requests.jsonl")
    refused = [(r["method"], r["path"], r["fault"]) for r in reqs if r["status"] >= 300]
    assert refused == []
    contract = load_contract()
    for r in reqs:
        contract.check(r["method"], r["path"], r["body"])
    paths = [r["body"].get("path_on_host") for r in reqs if r["path"].startswith("/drives/")]
    assert paths and all(p.startswith(("/rootfs", "/drives/", "/snapshot/")) for p in paths)
    load = next(r["body"] for r in reqs if r["path"] == "/snapshot/load")
    assert load["snapshot_path"] == "/snapshot/a.snap"
    assert load["vsock_override"] == {"uds_path": "/run/agent.sock"}


def test_jailed_disk_on_another_file_system_is_refused_clearly(jail_env):
    root, template, binary = jail_env
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(root).st_dev:
        pytest.skip("no second file system at /dev/shm")
    vm = FirecrackerVMM(_spec(root, template, "x"), binary=str(binary), placeholder_drives=1)
    other = Path(tempfile.mkdtemp(dir="/dev/shm")) / "disk.img"
    other.write_bytes(b"\0" * 4096)
    try:
        vm.start()
        with pytest.raises(VMError, match="same file system as jailer.chroot_base_dir"):
            vm.add_drive(Drive("c1", other))
        assert vm.pool.find("c1") is None
    finally:
        vm.kill()
        shutil.rmtree(other.parent)


def test_bad_jailer_settings_fail_at_start_with_the_jailers_words(jail_env):
    root, template, binary = jail_env
    template.uid = template.gid = 0  # the jailer refuses root unless allowed
    vm = FirecrackerVMM(_spec(root, template, "r"), binary=str(binary), placeholder_drives=1)
    with pytest.raises(VMError, match=r"exited with code 125: .*--uid 0"):
        vm.start()
    assert vm.exited()


def test_crash_record_and_config_find_a_killed_jailed_vm(jail_env, tmp_path, monkeypatch):
    """Everything of a jailed Firecracker VM dies at once (its waiter and the
    VMM, SIGKILL): the crash record names the jail (VMM.jail_record, the same
    record QEMU gives), and the cleanup `ember rm -f` runs, worked out from the
    id and the configuration alone, removes the jail folder and its cgroups."""
    import signal

    from ember.config import load_config
    from ember.jailer.api import jail_dir
    from ember.sandbox.vm import cleanup_jail

    root, template, binary = jail_env
    template.cgroups = {"pids.max": "512"}
    vm = FirecrackerVMM(_spec(root, template, "crash"), binary=str(binary), placeholder_drives=1)
    try:
        vm.start()
        record = vm.jail_record()
        assert record == {"id": "t-crash", "exec_file": str(binary), "uid": UID,
                          "chroot_base_dir": str(root / "jails"),
                          "parent_cgroup": "ember-test-fc"}
        folder = jail_dir(vm.jail)  # type: ignore[arg-type]
        assert folder.is_dir()
        vmm_pid = vm.pid
        os.kill(vm._proc.pid, signal.SIGKILL)  # the waiter first: nobody cleans up
        vm._proc.wait()
        os.kill(vmm_pid, signal.SIGKILL)
        assert folder.is_dir(), "the jail outlives its killed waiter"
        cgroups = list(Path("/sys/fs/cgroup").glob("*/ember-test-fc/t-crash*"))
        assert cgroups, "and so do its cgroups"
    except BaseException:
        vm.kill()
        raise
    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text(f'[vm]\nhypervisor = "firecracker"\nfirecracker_binary = "{binary}"\n'
                        f'[jailer]\nchroot_base_dir = "{root / "jails"}"\n')
    monkeypatch.setenv("EMBER_CONFIG", str(cfg_file))
    cleanup_jail(load_config(), "t-crash", parent_cgroup="ember-test-fc")
    assert not folder.exists()
    assert not any(p.exists() for p in cgroups)


def test_every_backend_declares_what_the_core_asks(tmp_path, monkeypatch):
    """What sandbox/ needs of a hypervisor before a VM exists comes from its
    driver class: binary, accelerator, snapshot support (VM templates for
    both), template inputs, jail record; an unknown name is one clear error."""
    from ember.config import load_config
    from ember.errors import EmberError
    from ember.vmm import HYPERVISORS, backend, configured, vmm_binaries
    from ember.vmm.base import binary_key

    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text('[vm]\nhypervisor = "firecracker"\nfirecracker_binary = "/opt/fc/fcbin"\n')
    monkeypatch.setenv("EMBER_CONFIG", str(cfg_file))
    cfg = load_config()
    assert configured(cfg) is FirecrackerVMM
    assert vmm_binaries(cfg) == ["/opt/fc/fcbin", cfg.vm.qemu_binary]
    assert FirecrackerVMM.choose_accel(cfg, tmp_path / "k", "") == "kvm"
    assert FirecrackerVMM.template_inputs(cfg) == ["/opt/fc/fcbin"]  # absent: by name only
    for name in HYPERVISORS:
        cls = backend(name)
        assert cls.kind == name and cls.supports_snapshots
        assert cls.configured_binary(cfg) == getattr(cfg.vm, binary_key(name))
    with pytest.raises(EmberError, match="unknown hypervisor 'bhyve'"):
        backend("bhyve")


def test_listing_the_vmm_binaries_imports_no_other_driver():
    """`ember run` (its cleanup paths) lists every VMM binary; with QEMU
    configured that must not import Firecracker's driver and HTTP client."""
    code = ("import sys; from ember.config import Config; from ember.vmm import vmm_binaries; "
            "print(vmm_binaries(Config())); "
            "print(sorted(m for m in sys.modules if m.startswith('ember.vmm.firecracker')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    binaries, imported = out.stdout.splitlines()
    assert binaries == "['qemu-system-x86_64', 'firecracker']" and imported == "[]", out.stdout
