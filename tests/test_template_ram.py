"""Shared template memory, the parts that need no VM (issue 14, point 4).

How QEMU is told to keep a template build's RAM in a file and to map it
copy-on-write on restore, that a QEMU without read-only private RAM (7.2)
keeps the old full-copy snapshot, and that a template's files (the state and
what the hypervisor writes beside it) appear together or not at all. The VM
side is tests/test_vm_memory.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.config import Config
from ember.errors import VMError
from ember.sandbox.template import TemplateCache
from ember.vmm.base import VMSpec
from ember.vmm.qemu import QemuVMM, snapshot


def spec(tmp_path: Path, **kw) -> VMSpec:
    return VMSpec(vm_id="t-ram", kernel=tmp_path / "k", initrd=tmp_path / "i",
                  rootfs=tmp_path / "r", cmdline="console=ttyS0", work_dir=tmp_path, **kw)


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


@pytest.fixture
def sharing(monkeypatch):
    monkeypatch.setattr(snapshot, "can_share_ram", lambda binary: True)


def test_a_template_build_keeps_its_ram_in_a_file_beside_the_snapshot(tmp_path, sharing):
    dest = tmp_path / "tpl" / "vm.state"
    dest.parent.mkdir()
    argv = QemuVMM(spec(tmp_path, memory_mib=256, snapshot_to=dest)).argv()
    ram = dest.parent / "vm.state.ram"
    assert option(argv, "-object")[-1] == (
        f"memory-backend-file,id=ram0,size=256M,mem-path={ram},share=on")
    assert option(argv, "-machine") == ["memory-backend=ram0"]
    assert ram.stat().st_size == 256 << 20 and ram.stat().st_blocks == 0  # sparse
    assert "-incoming" not in argv


def test_a_restore_maps_the_template_ram_read_only_and_private(tmp_path, sharing):
    state = tmp_path / "vm.state"
    state.write_bytes(b"stream")
    snapshot.ram_file(state).write_bytes(b"\0" * 4096)
    vmm = QemuVMM(spec(tmp_path, restore_from=state))
    argv = vmm.argv()
    assert option(argv, "-object")[-1].endswith(
        f"mem-path={snapshot.ram_file(state)},share=off,readonly=on,rom=off")
    assert option(argv, "-incoming") == ["defer"]  # x-ignore-shared is set over QMP first
    assert vmm._incoming == f"fd:{vmm._restore_fd}"
    os.close(vmm._restore_fd)


def test_a_snapshot_without_a_ram_file_restores_as_before(tmp_path, sharing):
    state = tmp_path / "vm.state"
    state.write_bytes(b"stream")
    vmm = QemuVMM(spec(tmp_path, restore_from=state))
    argv = vmm.argv()
    assert "-machine" not in argv and not any("memory-backend" in a for a in argv)
    assert option(argv, "-incoming") == [f"fd:{vmm._restore_fd}"]
    os.close(vmm._restore_fd)


def test_a_qemu_that_cannot_share_builds_full_snapshots(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "can_share_ram", lambda binary: False)
    dest = tmp_path / "vm.state"
    argv = QemuVMM(spec(tmp_path, snapshot_to=dest)).argv()
    assert "-machine" not in argv and not snapshot.ram_file(dest).exists()


def test_can_share_ram_asks_the_binary(tmp_path):
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho '  readonly=<bool>'\necho '  rom=<OnOffAuto>'\n")
    fake.chmod(0o755)
    old = tmp_path / "qemu-7.2"
    old.write_text("#!/bin/sh\necho '  readonly=<bool>'\necho '  share=<bool>'\n")
    old.chmod(0o755)
    assert snapshot.can_share_ram(str(fake))
    assert not snapshot.can_share_ram(str(old))
    assert not snapshot.can_share_ram(str(tmp_path / "missing"))


def test_a_comma_in_the_ram_path_is_escaped():
    [_, obj, _, _] = snapshot.memory_backend("/a,b/vm.state.ram", 64, build=False)
    assert "mem-path=/a,,b/vm.state.ram,share=off" in obj


def test_sealing_makes_the_ram_file_root_only_read_only_and_sparse(tmp_path):
    ram = tmp_path / "vm.state.ram"
    with open(ram, "wb") as f:
        f.write(b"\x01" * 4096 + b"\0" * (4 << 20) + b"\x02" * 4096)
    os.chmod(ram, 0o600)
    snapshot.seal_ram_file(ram)
    st = ram.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o444)
    assert st.st_blocks * 512 < 1 << 20  # the zero MiBs became a hole
    data = ram.read_bytes()
    assert data[:4096] == b"\x01" * 4096 and data[-4096:] == b"\x02" * 4096


def test_a_ram_file_that_cannot_be_sealed_is_a_one_line_error(tmp_path):
    with pytest.raises(VMError, match=r"cannot seal guest RAM file .*vm.state.ram"):
        snapshot.seal_ram_file(tmp_path / "vm.state.ram")


def test_a_ram_file_that_cannot_be_made_is_a_one_line_error(tmp_path, sharing):
    dest = tmp_path / "missing-dir" / "vm.state"
    with pytest.raises(VMError, match=r"cannot create guest RAM file .*vm.state.ram"):
        QemuVMM(spec(tmp_path, snapshot_to=dest)).argv()


# ------------------------------------------------------------ template cache
@pytest.fixture
def cache(tmp_path) -> TemplateCache:
    cfg = Config()
    cfg.data_dir = tmp_path / "data"
    cfg.state_dir = tmp_path / "state"
    return TemplateCache(cfg)


def test_a_template_moves_into_place_with_the_files_beside_its_state(cache, tmp_path):
    def build(_spec, _vm_id, _work, dest: Path) -> str:
        dest.write_bytes(b"stream")
        snapshot.ram_file(dest).write_bytes(b"ram")
        return "6.1"

    path = cache.get_or_build(spec(tmp_path), ["qemu"], build)
    assert path is not None and path.read_bytes() == b"stream"
    assert snapshot.ram_file(path).read_bytes() == b"ram"
    assert sorted(p.name for p in path.parent.iterdir()) == ["meta.json", "vm.state",
                                                            "vm.state.ram"]
    assert [p.name for p in cache.root.iterdir() if p.name.endswith(".tmp")] == []


def test_a_failed_or_crashed_build_leaves_nothing_a_restore_could_use(cache, tmp_path):
    def failing(_spec, _vm_id, _work, dest: Path) -> str:
        dest.write_bytes(b"half")
        snapshot.ram_file(dest).write_bytes(b"ram")
        raise VMError("boot failed")

    assert cache.get_or_build(spec(tmp_path), ["qemu"], failing) is None
    assert [p.name for p in cache.root.iterdir() if not p.name.endswith(".lock")] == []
    # A build killed half-way (no finally ran) leaves its staging folder: the next
    # build of that key removes it.
    from ember.sandbox.template import template_key

    key = template_key(spec(tmp_path), ["qemu"])
    stale = cache.root / f".{key}.99999999.tmp"
    stale.mkdir()
    (stale / "vm.state.ram").write_bytes(b"ram")
    path = cache.get_or_build(spec(tmp_path), ["qemu"],
                              lambda _s, _v, _w, dest: dest.write_bytes(b"ok") and "6.1")
    assert path is not None and path.read_bytes() == b"ok" and not stale.exists()


def _ok_build(_spec, _vm_id, _work, dest: Path) -> str:
    dest.write_bytes(b"ok")
    return "6.1"


def test_a_build_sweeps_what_day_old_killed_builds_and_gone_templates_left(cache, tmp_path):
    """Lock files of keys without a template, and staging folders of killed builds,
    a day old, go with the next build of any key; a fresh lock, a lock held by a
    build in progress, and the lock of a key whose template exists stay."""
    import fcntl
    import time

    from ember.sandbox.template import template_key

    day_ago = time.time() - 2 * 86400
    root = cache.root

    def old(p: Path) -> Path:
        os.utime(p, (day_ago, day_ago))
        return p

    have = cache.get_or_build(spec(tmp_path, vcpus=2), ["qemu"], _ok_build)
    assert have is not None
    have_lock = old(root / f".{have.parent.name}.lock")
    gone = root / ".a0a0a0a0a0a0a0a0a0a0a0a0.lock"
    gone.touch()
    old(gone)
    fresh = root / ".b1b1b1b1b1b1b1b1b1b1b1b1.lock"
    fresh.touch()
    busy = root / ".c2c2c2c2c2c2c2c2c2c2c2c2.lock"
    busy.touch()
    old(busy)
    killed = root / ".d3d3d3d3d3d3d3d3d3d3d3d3.4242.tmp"
    killed.mkdir()
    (killed / "vm.state.ram").write_bytes(b"ram")
    old(killed)
    with open(busy) as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        path = cache.get_or_build(spec(tmp_path), ["qemu"], _ok_build)
    assert path is not None and path.parent.name == template_key(spec(tmp_path), ["qemu"])
    assert not gone.exists() and not killed.exists()
    assert fresh.exists() and busy.exists() and have_lock.exists() and have.exists()


def test_a_lock_file_swept_while_waited_for_is_taken_again(cache, tmp_path, monkeypatch):
    """A builder that opened a key's lock file just before the sweep unlinked it
    must not build under that orphan: it takes the file now at the path."""
    import fcntl

    from ember.sandbox import template

    key = template_key_of(tmp_path)
    lock_path = cache.root / f".{key}.lock"
    real_flock = fcntl.flock
    locked: list[bool] = []  # per flock: was its file still at the path?

    def flock_after_a_sweep(f, op):
        if not locked:
            os.unlink(lock_path)  # the sweep won the race
        locked.append(os.path.exists(f"/proc/self/fd/{f.fileno()}")
                      and "(deleted)" not in os.readlink(f"/proc/self/fd/{f.fileno()}"))
        return real_flock(f, op)

    monkeypatch.setattr(template.fcntl, "flock", flock_after_a_sweep)
    lock = cache._lock(key, wait=True)
    assert lock is not None
    with lock:
        assert locked == [False, True]  # the orphan was let go, the file at the path taken
        assert os.fstat(lock.fileno()).st_ino == os.stat(lock_path).st_ino


def template_key_of(tmp_path: Path) -> str:
    from ember.sandbox.template import template_key

    return template_key(spec(tmp_path), ["qemu"])
