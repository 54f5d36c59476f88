"""Guest asset builder: package resolution, module order, initrd format, the
cache (key, no-op rebuilds, rebuild on change, atomicity) and user overrides.

The build tests use Debian's real packages and tools; the shared cache
(/var/lib/ember or $EMBER_DATA_DIR) is built once by conftest's
``guest_assets`` fixture, and tests that need a private data dir start from
hard links of it, so only one test builds anything a second time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ember.config import Config, load_config
from ember.errors import GuestError
from ember.guest import build, debs, initrd, kernel

# --------------------------------------------------------------- pure parts

APT_DEPENDS = """\
crun
  Depends: libc6
  Depends: libsystemd0
    libelogind0
readline-common
 |Depends: dpkg
  Depends: install-info
libpython3.11-stdlib
  Depends: libreadline8
 |Depends: media-types
  Depends: mime-support
  Depends: <libgdbm-virtual>
    libgdbm6
libreadline8
  Depends: readline-common
  Depends: libc6
libsystemd0
  Depends: libc6
libc6
  Depends: libgcc-s1
libgcc-s1
<libgdbm-virtual>
libgdbm6
  Depends: libc6
"""


def test_closure_takes_first_alternative_and_skips_package_tools():
    graph = debs.parse_depends(APT_DEPENDS)
    names = debs.closure(["crun", "libpython3.11-stdlib"], graph)
    assert names == sorted(
        [
            "crun",
            "libc6",
            "libgcc-s1",
            "libsystemd0",
            "libpython3.11-stdlib",
            "libreadline8",
            "libgdbm6",
        ]
    )
    # Excluded names never enter, whichever alternative apt lists first.
    assert not {"dpkg", "install-info", "readline-common", "libelogind0", "mime-support"} & set(
        names
    )


def test_module_load_order_puts_dependencies_first():
    dep = (
        "kernel/drivers/virtio/virtio.ko:\n"
        "kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/scsi/scsi_common.ko:\n"
        "kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko\n"
        "kernel/drivers/scsi/virtio_scsi.ko: kernel/drivers/scsi/scsi_mod.ko "
        "kernel/drivers/scsi/scsi_common.ko kernel/drivers/virtio/virtio_ring.ko "
        "kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko\n"
    )
    order = kernel.load_order(
        dep, ("virtio_scsi", "virtio_rng", "ext4"), "kernel/fs/ext4/ext4.ko\n"
    )
    names = [p.rsplit("/", 1)[1] for p in order]
    assert names.index("virtio.ko") < names.index("virtio_ring.ko") < names.index("virtio_scsi.ko")
    assert (
        names.index("scsi_common.ko") < names.index("scsi_mod.ko") < names.index("virtio_scsi.ko")
    )
    assert "virtio-rng.ko" in names and len(names) == len(set(names)) == 6
    with pytest.raises(GuestError, match="guest kernel has no module virtio_pmem"):
        kernel.load_order(dep, ("virtio_pmem",))


def test_initrd_is_a_newc_archive_cpio_reads(tmp_path):
    busybox = Path("/bin/busybox")
    ko = tmp_path / "virtio.ko"
    ko.write_bytes(b"\x7fELF fake module")
    out = tmp_path / "initrd.img"
    groups = {"transport": ["virtio"], "0x0002": ["virtio", "virtio_blk"], "always": []}
    initrd.build_initrd(out, busybox, [ko], groups, "/usr/lib/ember")
    listing = subprocess.run(
        ["cpio", "-itv"], input=out.read_bytes(), capture_output=True, check=True
    ).stdout.decode()
    lines = {
        line.split()[-1] if "->" not in line else line.split()[-3]: line
        for line in listing.splitlines()
    }
    assert lines["dev/console"].startswith("crw")
    assert lines["init"].startswith("-rwxr-xr-x")
    assert lines["bin/sh"].startswith("lrwx")
    assert "lib/modules/virtio.ko" in lines
    extracted = tmp_path / "x"
    extracted.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=out.read_bytes(), cwd=extracted, check=True)
    assert (extracted / "bin/busybox").read_bytes() == busybox.read_bytes()
    init = (extracted / "init").read_text()
    assert "\nload virtio\n" in init and "\t0x0002) load virtio virtio_blk ;;\n" in init
    assert "PYTHONPATH=/usr/lib/ember" in init
    assert "@MODULES@" not in init and "@PYTHONPATH@" not in init
    # The script is valid sh.
    subprocess.run(["busybox", "sh", "-n", str(extracted / "init")], check=True)


def test_host_tsc_rate_comes_from_bogomips():
    cpuinfo = "processor : 0\nflags : fpu tsc constant_tsc nonstop_tsc\nbogomips : 5192.27\n"
    assert build.host_tsc_khz(cpuinfo) == 2596135
    assert build.host_tsc_khz("flags : fpu tsc\nbogomips : 5192.27\n") is None
    assert build.host_tsc_khz("flags : tsc constant_tsc\n") is None


def test_cmdline_carries_extra_arguments():
    cfg = Config()
    cfg.guest.extra_cmdline = "ember.debug=1"
    line = build.kernel_cmdline(cfg)
    assert line.startswith("console=ttyS0 reboot=t panic=-1 root=/dev/vda ro quiet")
    assert line.endswith(" ember.debug=1")


def test_a_vm_gets_the_extra_arguments_once(tmp_path, monkeypatch):
    """[guest] extra_cmdline reaches the kernel once, and last: it was appended
    a second time, and init_on_free=1 after it, so with `-- CMD` that became an
    argument of CMD (and the guest ran without it)."""
    from ember.sandbox.vm import SandboxVM

    cfg = Config()
    cfg.vm.accel = "tcg"
    cfg.jailer.enabled = False
    cfg.guest.extra_cmdline = "ember.debug=1 -- sleep 600"
    assets = build.GuestAssets(tmp_path / "k", tmp_path / "i", tmp_path / "r", "6.1", "key",
                               build.kernel_cmdline(cfg))
    monkeypatch.setattr(build, "current_assets", lambda _cfg: assets)
    spec = SandboxVM(cfg, "t-cmdline", tmp_path, 1, 256).base_spec()
    words = spec.cmdline.split()
    assert words.count("ember.debug=1") == 1 and words.count("--") == 1, spec.cmdline
    assert words.index("init_on_free=1") < words.index("--")
    assert spec.cmdline.endswith(" -- sleep 600")


def test_key_follows_package_versions_and_local_code():
    a = {"libc6": debs.Package("libc6", "2.36-9", "amd64", "aa")}
    b = {"libc6": debs.Package("libc6", "2.36-10", "amd64", "bb")}
    local = build.local_digest()
    assert build.local_digest() == local  # stable
    assert build.build_key(local, a) == build.build_key(local, dict(a))
    assert build.build_key(local, a) != build.build_key(local, b)
    assert build.build_key(local, a) != build.build_key("other", a)


# ---------------------------------------------------------------- overrides


def _cfg(data_dir: Path) -> Config:
    cfg = Config()
    cfg.data_dir = data_dir
    return cfg


def test_missing_override_is_a_one_line_error(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.guest.kernel = str(tmp_path / "no-such-bzImage")
    for call in (build.build_guest, build.current_assets):
        with pytest.raises(GuestError) as err:
            call(cfg)
        assert (
            str(err.value)
            == f"config guest.kernel: {tmp_path}/no-such-bzImage does not exist or is not a file"
        )
    cfg.guest.kernel = str(tmp_path)  # a directory is no kernel either
    with pytest.raises(GuestError, match="guest.kernel: .* is not a file"):
        build.current_assets(cfg)
    assert not (tmp_path / "guest").exists()  # nothing built, nothing left behind


def test_full_override_needs_no_build(tmp_path):
    cfg = _cfg(tmp_path / "data")
    for what in ("kernel", "initrd", "rootfs"):
        (tmp_path / what).write_bytes(b"x")
        setattr(cfg.guest, what, str(tmp_path / what))
    assets = build.build_guest(cfg, progress=False)
    assert assets == build.current_assets(cfg)
    assert assets.kernel == tmp_path / "kernel" and assets.rootfs == tmp_path / "rootfs"
    assert assets.key.startswith("user-") and assets.kernel_release == ""
    assert not (tmp_path / "data").exists()
    info = build.guest_info(cfg)
    assert info["files"]["kernel"]["user_override"] is True and info["built"] is False


def test_not_built_is_reported(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(GuestError) as err:
        build.current_assets(cfg)
    assert str(err.value) == "guest assets not built: run `ember guest build`"
    assert build.guest_info(cfg)["built"] is False


# -------------------------------------------------------------- real builds


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture
def private_cache(guest_assets, tmp_path):
    """A data dir holding hard links of the shared build: 'built' at no cost."""
    shared = guest_assets.kernel.parent.parent
    cfg = _cfg(tmp_path / "data")
    cfg.guest_dir.mkdir(parents=True)
    for name in ("debs", guest_assets.key):
        shutil.copytree(shared / name, cfg.guest_dir / name, copy_function=_link_or_copy)
    shutil.copy(shared / "resolve.json", cfg.guest_dir / "resolve.json")
    (cfg.guest_dir / "current").write_text(json.dumps({"key": guest_assets.key}))
    return cfg


@pytest.mark.root
def test_second_build_is_a_no_op(guest_assets):
    cfg = load_config()
    before = {p.name: p.stat().st_mtime_ns for p in guest_assets.kernel.parent.iterdir()}
    started = time.monotonic()
    again = build.build_guest(cfg, progress=False)
    assert time.monotonic() - started < 5.0  # no apt, no unpacking: milliseconds
    assert again == guest_assets == build.current_assets(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in again.kernel.parent.iterdir()} == before
    info = build.guest_info(cfg)
    assert info["key"] == guest_assets.key and info["up_to_date"] is True
    assert info["kernel_release"].endswith("-cloud-amd64")
    assert set(info["files"]) == {"kernel", "initrd", "rootfs"}
    assert info["packages"]["crun"] and info["packages"]["python3.11-minimal"].startswith("3.11")


@pytest.mark.root
@pytest.mark.timeout(300)
def test_changed_input_rebuilds_and_collects_the_old_build(
    private_cache, guest_assets, monkeypatch
):
    cfg = private_cache
    old_key = guest_assets.key
    assert build.build_guest(cfg, progress=False).key == old_key  # linked copy counts as built
    stale = cfg.guest_dir / f".build-{old_key}-interrupted"
    stale.mkdir()

    # The agent's code changed: current_assets refuses the stale build...
    real = build.local_digest()
    monkeypatch.setattr(build, "local_digest", lambda: real + "-changed")
    with pytest.raises(GuestError, match="out of date .* run `ember guest build`"):
        build.current_assets(cfg)

    # ...and a build makes a new one, reusing the cached .debs (no download).
    monkeypatch.setattr(debs, "_apt_update", lambda: pytest.fail("apt-get update was run"))
    debs_before = {p.name: p.stat().st_ino for p in (cfg.guest_dir / "debs").iterdir()}
    new = build.build_guest(cfg, progress=False)
    assert new.key != old_key and new == build.current_assets(cfg)
    assert {p.name: p.stat().st_ino for p in (cfg.guest_dir / "debs").iterdir()} == debs_before
    for f in (new.kernel, new.initrd, new.rootfs):
        assert f.stat().st_size > 1 << 20
    left = sorted(p.name for p in cfg.guest_dir.iterdir())
    assert left == sorted([new.key, "debs", "current", "resolve.json", ".lock"])
    # The shared build the links came from is untouched.
    assert guest_assets.rootfs.exists() and guest_assets.kernel.exists()
    # The rootfs is a clean, journal-less ext4 with the agent inside.
    subprocess.run(["e2fsck", "-fn", str(new.rootfs)], check=True, capture_output=True)
    ls = subprocess.run(
        ["debugfs", "-R", "ls -p /usr/lib/ember/ember/agent", str(new.rootfs)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "/__main__.py/" in ls


@pytest.mark.root
@pytest.mark.timeout(300)
def test_failed_build_leaves_nothing_behind(private_cache, guest_assets, monkeypatch):
    cfg = private_cache
    monkeypatch.setattr(build, "local_digest", lambda: "force-a-new-key")

    def broken(out, *args, **kwargs):
        out.write_bytes(b"half an initrd")  # a partial file, as a crash would leave
        raise GuestError("initrd: No space left on device")

    monkeypatch.setattr(build.initrd, "build_initrd", broken)
    with pytest.raises(GuestError, match="No space left"):
        build.build_guest(cfg, progress=False)
    left = sorted(p.name for p in cfg.guest_dir.iterdir())
    assert left == sorted([guest_assets.key, "debs", "current", "resolve.json", ".lock"])
    assert json.loads((cfg.guest_dir / "current").read_text())["key"] == guest_assets.key


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(debs, "_apt_update", lambda: pytest.fail("apt-get update was run"))
    bogus = debs.Package("ember-no-such-package", "1.0", "amd64", "00")
    with pytest.raises(GuestError) as err:
        debs.download([bogus], tmp_path / "debs")
    assert "\n" not in str(err.value) and str(err.value).startswith("apt-get download:")
    assert list((tmp_path / "debs").iterdir()) == []


@pytest.mark.root
def test_partial_override_replaces_only_that_file(private_cache, guest_assets, tmp_path):
    cfg = private_cache
    own = tmp_path / "my-rootfs.ext4"
    own.write_bytes(b"x")
    cfg.guest.rootfs = str(own)
    assets = build.current_assets(cfg)
    assert assets.rootfs == own
    assert assets.kernel.name == "vmlinuz" and assets.key == guest_assets.key
    assert assets.kernel_release == guest_assets.kernel_release
    info = build.guest_info(cfg)
    assert info["overrides"] == {"rootfs": str(own)}
    assert info["files"]["rootfs"]["user_override"] and not info["files"]["kernel"]["user_override"]
