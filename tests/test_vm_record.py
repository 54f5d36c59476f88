"""The one VM crash record (state.json's and pod.json's VM part) and the one
VM release that `ember rm` and the shim's `delete` run from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.config import load_config
from ember.sandbox.cleanup import release_vm
from ember.sandbox.record import PodRecord, VMRecord
from ember.sandbox.state import SandboxState


def test_state_and_pod_records_share_the_vm_fields(tmp_path: Path) -> None:
    vm_fields = set(VMRecord.__dataclass_fields__)
    assert vm_fields <= set(SandboxState.__dataclass_fields__)
    assert vm_fields <= set(PodRecord.__dataclass_fields__)
    rec = PodRecord(shim_pid=7, group="g" * 64, vmm_kind="firecracker", vmm_pid=9,
                    jail={"id": "x"}, netns="/var/run/netns/n", cgroups_created=["/a"])
    rec.write(tmp_path)
    assert PodRecord.read(tmp_path) == rec
    assert json.loads((tmp_path / "pod.json").read_text())["vmm_kind"] == "firecracker"


def test_old_or_broken_pod_records_still_read(tmp_path: Path) -> None:
    # What a shim of before the shared record wrote: jail and netns could be null.
    (tmp_path / "pod.json").write_text(json.dumps(
        {"shim_pid": 5, "group": "abc", "vmm_pid": None, "jail": None, "netns": None,
         "cgroups_created": [], "unknown_key": 1}))
    rec = PodRecord.read(tmp_path)
    assert (rec.shim_pid, rec.group, rec.jail, rec.netns) == (5, "abc", {}, "")
    (tmp_path / "pod.json").write_text("{not json")
    assert PodRecord.read(tmp_path) == PodRecord()
    (tmp_path / "pod.json").write_text("[1, 2]")
    assert PodRecord.read(tmp_path) == PodRecord()


def _fake_vmm(vm_dir: Path) -> subprocess.Popen:
    """A process whose command line names the VM folder, as an unjailed VMM's does."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(vm_dir)])


@pytest.mark.root
def test_release_kills_an_unjailed_vmm_only_if_it_names_the_vm(tmp_path: Path,
                                                                monkeypatch) -> None:
    monkeypatch.setenv("EMBER_STATE_DIR", str(tmp_path / "state"))
    cfg = load_config()
    vm_dir = tmp_path / "vm"
    mine, other = _fake_vmm(vm_dir), _fake_vmm(tmp_path / "someone-else")
    try:
        # A record whose pid is someone else's process (pid reuse): left alone.
        release_vm(cfg, "a" * 64, VMRecord(vmm_pid=other.pid, vm_dir=str(vm_dir)))
        assert other.poll() is None
        release_vm(cfg, "a" * 64, VMRecord(vmm_pid=mine.pid, vm_dir=str(vm_dir)))
        assert mine.wait(timeout=5) == -9
        # Idempotent: the same release again finds nothing to do.
        release_vm(cfg, "a" * 64, VMRecord(vmm_pid=mine.pid, vm_dir=str(vm_dir)))
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()


@pytest.mark.root
def test_release_removes_the_cgroups_the_record_names(tmp_path: Path, monkeypatch) -> None:
    from ember.sandbox import podcgroup

    roots = podcgroup.hierarchies()
    if not roots:
        pytest.skip("no cgroup hierarchy")
    monkeypatch.setenv("EMBER_STATE_DIR", str(tmp_path / "state"))
    path = f"/ember-test-record-{os.getpid()}-{int(time.time())}"
    created = podcgroup.enter(path, [])
    try:
        assert created and all(Path(c).is_dir() for c in created)
        release_vm(load_config(), "b" * 64, VMRecord(cgroups_created=created))
        assert not any(Path(c).exists() for c in created)
    finally:
        podcgroup.remove(created)
