"""How container disks are found in a Firecracker guest, and the kernel it boots.

The guest side (ember.agent.fcdevices) reads /sys/block/vd*/serial and size;
no Firecracker guest runs on this machine, so those tests lay out the same
files in a temp dir. The serial the host predicts is checked against the
formula Firecracker uses (decimal st_dev, st_rdev, st_ino, cut to 20 bytes).
The kernel tests use the real Debian guest kernel when it is built.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from ember.agent import fcdevices
from ember.errors import VMError
from ember.vmm.firecracker import drives as fc_drives
from ember.vmm.firecracker import kernel as fc_kernel
from ember.vmm.qemu.machine import FIRMWARE, MACHINE


def make_sysfs(root: Path, name: str, serial: bytes, sectors: int) -> None:
    block = root / "sys" / "block" / name
    block.mkdir(parents=True, exist_ok=True)
    (block / "serial").write_bytes(serial)
    (block / "size").write_text(f"{sectors}\n")
    (root / "dev").mkdir(exist_ok=True)
    (root / "dev" / name).touch()


def find(root: Path, address: str) -> str | None:
    return fcdevices.find_device("fcdisk", address, sys_root=str(root / "sys"),
                                 dev_root=str(root / "dev"))


def test_host_prediction_matches_firecrackers_formula(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(3 << 20)
    st = os.stat(img)
    dev = fc_drives.guest_device(img)
    assert dev.kind == "fcdisk"
    assert dev.address == f"{str(st.st_dev) + str(st.st_rdev) + str(st.st_ino)}"[:20] + ":6144"


def test_guest_finds_the_disk_only_once_serial_and_size_match(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(2 << 20)
    address = fc_drives.guest_device(img).address
    serial = address.split(":")[0].encode()
    root = tmp_path / "guest"
    make_sysfs(root, "vda", b"1234567\0\0\0", 409600)  # the guest rootfs
    make_sysfs(root, "vdb", serial.ljust(20, b"\0"), 2048)  # patched, size not updated yet
    assert find(root, address) is None
    make_sysfs(root, "vdb", serial.ljust(20, b"\0"), 4096)  # capacity change processed
    assert find(root, address) == str(root / "dev" / "vdb")
    make_sysfs(root, "vdc", b"99999\0", 4096)
    assert find(root, address) == str(root / "dev" / "vdb")


@pytest.mark.parametrize("kind,address,message", [
    ("scsi", "1:0", "unknown block device kind 'scsi'"),
    ("fcdisk", "no-sectors", "bad fcdisk address"),
    ("fcdisk", "123:abc", "bad fcdisk address"),
    ("fcdisk", ":12", "bad fcdisk address"),
])
def test_bad_requests_are_refused(tmp_path, kind, address, message):
    with pytest.raises(ValueError, match=message):
        fcdevices.find_device(kind, address, sys_root=str(tmp_path))


def test_pool_accounting(tmp_path):
    pool = fc_drives.PlaceholderPool(tmp_path / "ph", 2)
    pool.create_files()
    assert sorted(p.name for p in (tmp_path / "ph").iterdir()) == ["ph0.img", "ph1.img"]
    assert all(s.placeholder.stat().st_blocks <= 8 for s in pool.slots)  # sparse
    a, b, c = (tmp_path / n for n in "abc")
    for p in (a, b, c):
        p.touch()
    assert pool.acquire("x", a).drive_id == "ph0"
    assert pool.acquire("y", b).drive_id == "ph1"
    with pytest.raises(VMError, match=r"all 2 are in use \(raise vm.fc_placeholder_drives\)"):
        pool.acquire("z", c)
    pool.release("x")
    assert pool.acquire("z", c).drive_id == "ph0"
    pool.remove_files()
    assert not (tmp_path / "ph").exists()
    with pytest.raises(VMError, match="must be 0 or more"):
        fc_drives.PlaceholderPool(tmp_path, -1)


# ------------------------------------------------------------------ kernel
def test_elf_kernels_are_used_as_they_are(tmp_path):
    elf = tmp_path / "vmlinux"
    elf.write_bytes(fc_kernel.ELF_MAGIC + b"\0" * 60)
    assert fc_kernel.loadable_kernel(elf, tmp_path / "fb") == elf


def test_other_files_are_refused_clearly(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(VMError, match=r"junk is neither an ELF vmlinux nor a bzImage"):
        fc_kernel.loadable_kernel(junk, tmp_path)


def _guest_kernel() -> Path | None:
    from ember.config import load_config
    from ember.errors import EmberError
    from ember.guest.build import current_assets

    cfg = load_config()
    try:
        return current_assets(cfg).kernel
    except EmberError:  # out of date for the agent is still a Debian kernel
        built = sorted(cfg.guest_dir.glob("*/vmlinuz"))
        return built[0] if built else None


@pytest.mark.vm
@pytest.mark.timeout(120)
def test_debian_bzimage_becomes_a_bootable_elf(tmp_path):
    kernel = _guest_kernel()
    if kernel is None:
        pytest.skip("guest assets are not built (run `ember guest build`)")
    copy = tmp_path / "vmlinuz"
    copy.write_bytes(kernel.read_bytes())  # the cache is written beside the kernel
    elf = fc_kernel.loadable_kernel(copy, tmp_path / "fb")
    data = elf.read_bytes()[:20]
    assert data[:4] == fc_kernel.ELF_MAGIC and int.from_bytes(data[18:20], "little") == 62
    assert fc_kernel.loadable_kernel(copy, tmp_path / "fb") == elf  # cached
    # The extracted ELF really is the kernel: QEMU boots it (PVH entry) to its banner.
    log = tmp_path / "console.log"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-M", MACHINE, "-bios", FIRMWARE,
         "-accel", "tcg", "-cpu", "max", "-m", "256", "-nodefaults", "-no-user-config",
         "-nographic", "-no-reboot", "-serial", f"file:{log}", "-kernel", str(elf),
         "-append", "console=ttyS0 panic=-1 rdinit=/none root=/dev/none"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if log.exists() and b"Linux version" in log.read_bytes():
                break
            time.sleep(0.2)
        assert b"Linux version" in log.read_bytes()
    finally:
        proc.kill()
        proc.wait()


def test_missing_kernel_is_one_clear_line(tmp_path):
    with pytest.raises(VMError, match=r"^kernel .*/absent: No such file or directory$"):
        fc_kernel.loadable_kernel(tmp_path / "absent", tmp_path)
