"""`ember run` with the VMM under ember-jailer (the default): what issue 5 checks.

While a sandbox runs, its QEMU (found from `ember inspect`) runs as a non-root
uid with no capabilities, no_new_privs and a seccomp filter, chrooted into its
jail, in its own mount namespace and in the requested cgroup with its limit
written; the container still works; after removal the jail and cgroup are gone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(300)]


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _cgroup(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    return ""


def test_vmm_is_confined_and_cleaned_up(ember_env, image):
    proc = ember_env.run("run", "-d", image, "sleep", "300")
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.decode().strip()
    info = json.loads(ember_env.run("inspect", sid, check=True).stdout)[0]
    pid = info["vmm_pid"]
    jail = info["jail"]
    assert jail, "the sandbox must record its jail"
    # The monitor forked the jailer's helper before its first thread: no exec.
    assert jail["launch"] == "in place", jail  # the helper became QEMU: no waiter

    st = _status(pid)
    assert st["Uid"].split()[0] != "0" and st["Gid"].split()[0] != "0"
    assert int(st["CapEff"], 16) == 0
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    root = Path(jail["chroot_base_dir"]) / "qemu-system-x86_64" / jail["id"] / "root"
    assert os.readlink(f"/proc/{pid}/root") == str(root)
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")

    cg = _cgroup(pid, "memory")
    assert cg == f"/ember/{jail['id']}"
    limit_file = Path("/sys/fs/cgroup/memory") / cg.lstrip("/") / "memory.limit_in_bytes"
    if limit_file.exists():  # cgroup v1 (this machine); v2 hosts write memory.max
        assert int(limit_file.read_text()) == (info["memory_mib"] + 256) << 20

    proc = ember_env.run("exec", sid, "sh", "-c", "echo inside; uname -r")
    assert proc.returncode == 0 and proc.stdout.startswith(b"inside\n"), proc.stderr

    assert ember_env.run("rm", "-f", sid).returncode == 0
    assert not root.parent.exists(), "jail directory left behind"
    assert not (Path("/sys/fs/cgroup/memory") / cg.lstrip("/")).exists(), "cgroup left behind"
    assert not Path(f"/proc/{pid}").exists()


def test_jailed_vmm_takes_a_disk_from_another_file_system(guest_assets, tmp_path):
    """A disk that cannot be hard-linked into the jail is handed over as a descriptor."""
    from imagetools import busybox_rootfs

    from ember.config import load_config
    from ember.sandbox.spec import ProcessOptions, build_spec
    from ember.sandbox.vm import SandboxVM
    from ember.storage.ext4 import make_ext4

    cfg = load_config()
    root = busybox_rootfs(tmp_path / "rootfs")
    disk = Path("/dev/shm") / f"ember-test-{os.getpid()}.ext4"  # tmpfs: not the jail's fs
    make_ext4(root, disk, 64 << 20, journal=True)
    work = Path(tempfile.mkdtemp(prefix="emb-fd-", dir="/tmp"))
    vm = SandboxVM(cfg, f"fdtest{os.getpid():010d}", work, 1, 512)
    try:
        vm.boot()
        assert vm.vmm is not None and vm.vmm.jail is not None
        _, dev = vm.attach_disk(disk, "raw")
        spec = build_spec({"config": {}}, ProcessOptions(
            command=["sh", "-c", "echo written > /x; cat /x"]), "h")
        vm.agent.create_container("c1", spec, {"kind": dev.kind, "address": dev.address})
        vm.agent.start_container("c1")
        assert vm.agent.wait_process("c1").exit_status == 0
        assert b"".join(vm.agent.iter_output("c1")) == b"written\n"
    finally:
        vm.kill()
        disk.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def test_an_exited_sandbox_keeps_no_jail(ember_env, image):
    """The jailed QEMU runs in place, with no waiter to remove its jail: when the
    container exits and the guest powers off, the monitor removes the jail
    folder and cgroup itself, before anyone runs `rm`, and its QEMU was its own
    child all along."""
    proc = ember_env.run("run", "-d", image, "sh", "-c", "sleep 3; exit 3")
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.decode().strip()
    info = json.loads(ember_env.run("inspect", sid, check=True).stdout)[0]
    jail, pid = info["jail"], info["vmm_pid"]
    assert _status(pid)["PPid"] == str(info["monitor_pid"])
    root = Path(jail["chroot_base_dir"]) / "qemu-system-x86_64" / jail["id"] / "root"
    cg = Path("/sys/fs/cgroup/memory") / _cgroup(pid, "memory").lstrip("/")
    assert root.is_dir() and cg.is_dir()
    try:
        for _ in range(600):
            info = json.loads(ember_env.run("inspect", sid, check=True).stdout)[0]
            if info["status"] == "exited":
                break
            __import__("time").sleep(0.1)
        assert (info["status"], info.get("exit_code")) == ("exited", 3), info
        assert not root.parent.exists(), "the exited sandbox's jail folder is left"
        assert not cg.exists(), "the exited sandbox's jail cgroup is left"
    finally:
        assert ember_env.run("rm", "-f", sid).returncode == 0
