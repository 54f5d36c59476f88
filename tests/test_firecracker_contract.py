"""The Firecracker contract: the OpenAPI checker and the fake's state rules.

These run in-process (no sockets) and fast; tests/test_firecracker.py drives
the real driver against the fake as a separate process.
"""

from __future__ import annotations

import json

import pytest
from ember_testing.fc_fake import FakeFirecracker

from ember.vmm.firecracker.contract import ContractError, default_spec_path, load

pytestmark = pytest.mark.skipif(not default_spec_path().exists(),
                                reason=f"Firecracker API description not found at "
                                       f"{default_spec_path()} (set EMBER_FC_SPEC)")


@pytest.fixture(scope="module")
def contract():
    return load()


@pytest.fixture
def files(tmp_path):
    out = {}
    for name in ("vmlinux", "initrd", "rootfs", "disk", "log", "metrics"):
        out[name] = tmp_path / name
        out[name].write_bytes(b"\0" * 4096)
    out["dir"] = tmp_path
    return out


@pytest.fixture
def fake(contract, files):
    vm = FakeFirecracker(contract, "test")
    vm.exit_hook = lambda code: None
    yield vm
    if vm.vsock is not None:
        vm.vsock.close()


def call(vm: FakeFirecracker, method: str, path: str, body=None) -> tuple[int, object]:
    raw = b"" if body is None else json.dumps(body).encode()
    return vm.handle(method, path, raw)


def ok(vm, method, path, body=None):
    status, answer = call(vm, method, path, body)
    assert status in (200, 204), answer
    return answer


def refused(vm, method, path, body=None) -> str:
    status, answer = call(vm, method, path, body)
    assert status == 400, (status, answer)
    return answer["fault_message"]


def boot(vm, files, drives=("root",)):
    ok(vm, "PUT", "/boot-source", {"kernel_image_path": str(files["vmlinux"]),
                                   "initrd_path": str(files["initrd"]),
                                   "boot_args": "console=ttyS0"})
    for d in drives:
        ok(vm, "PUT", f"/drives/{d}", {"drive_id": d, "path_on_host": str(files["rootfs"]),
                                       "is_root_device": d == "root", "is_read_only": True})
    ok(vm, "PUT", "/actions", {"action_type": "InstanceStart"})


# ---------------------------------------------------------------- validator
def test_accepts_what_the_description_allows(contract):
    op = contract.check("PUT", "/drives/ph3", {"drive_id": "ph3", "path_on_host": "/x",
                                               "is_root_device": False, "is_read_only": False,
                                               "cache_type": "Writeback", "io_engine": "Sync"})
    assert (op.template, op.params, op.operation_id) == (
        "/drives/{drive_id}", {"drive_id": "ph3"}, "putGuestDriveByID")
    contract.check("PATCH", "/vm", {"state": "Paused"})
    contract.check("PUT", "/snapshot/load", {"snapshot_path": "/s", "resume_vm": True,
                                             "mem_backend": {"backend_type": "File",
                                                             "backend_path": "/m"},
                                             "vsock_override": {"uds_path": "/v"}})
    contract.check("GET", "/")


@pytest.mark.parametrize("method,path,body,expect", [
    ("PUT", "/drive/root", {}, "Invalid request method and/or path: PUT /drive/root."),
    ("POST", "/actions", {"action_type": "InstanceStart"}, "Invalid request method"),
    ("PUT", "/actions", None, "Empty PUT request."),
    ("PUT", "/drives/root", {"drive_id": "root"}, "'is_root_device' is a required property"),
    ("PUT", "/drives/root", {"drive_id": "root", "is_root_device": "yes"},
     "is_root_device: 'yes' is not of type 'boolean'"),
    ("PUT", "/drives/root", {"drive_id": "root", "is_root_device": True, "io_engine": "Turbo"},
     "io_engine: 'Turbo' is not one of ['Sync', 'Async']"),
    ("PATCH", "/vm", {"state": "Stopped"}, "'Stopped' is not one of ['Paused', 'Resumed']"),
    ("PUT", "/actions", {"action_type": "Reboot"}, "'Reboot' is not one of"),
    ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 128},
     "33 is greater than the maximum of 32"),
    ("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/v"}, "2 is less than the minimum of 3"),
    ("PUT", "/logger", {"log_path": "/l", "colour": True},
     "Additional properties are not allowed ('colour' was unexpected)"),
    ("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_backend": {"backend_type": "File"}},
     "'backend_path' is a required property"),
])
def test_rejects_what_the_description_does_not(contract, method, path, body, expect):
    with pytest.raises(ContractError) as err:
        contract.check(method, path, body)
    assert expect in str(err.value)


def test_checks_answers_too(contract):
    op = contract.check("GET", "/")
    contract.check_response(op, 200, {"app_name": "Firecracker", "id": "a", "state": "Running",
                                      "vmm_version": "1.16.1"})
    with pytest.raises(ContractError, match="'Booting' is not one of"):
        contract.check_response(op, 200, {"app_name": "Firecracker", "id": "a",
                                          "state": "Booting", "vmm_version": "1"})
    with pytest.raises(ContractError, match="must have no body"):
        contract.check_response(contract.check("PATCH", "/vm", {"state": "Paused"}), 204,
                                {"x": 1})


# ------------------------------------------------------------- state rules
def test_pre_boot_calls_are_refused_after_start(fake, files):
    boot(fake, files)
    after = "The requested operation is not supported after starting the microVM."
    assert refused(fake, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}) == after
    assert refused(fake, "PUT", "/drives/x", {"drive_id": "x", "is_root_device": False,
                                              "path_on_host": str(files["disk"])}) == after
    assert refused(fake, "PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/x"}) == after
    assert refused(fake, "PUT", "/actions", {"action_type": "InstanceStart"}) == after
    assert refused(fake, "PUT", "/snapshot/load", {"snapshot_path": "/s",
                                                   "mem_file_path": "/m"}) == after
    assert ok(fake, "GET", "/")["state"] == "Running"


def test_post_boot_calls_are_refused_before_start(fake, files):
    before = "The requested operation is not supported before starting the microVM."
    ok(fake, "PUT", "/drives/ph0", {"drive_id": "ph0", "path_on_host": str(files["disk"]),
                                    "is_root_device": False, "is_read_only": False})
    assert refused(fake, "PATCH", "/drives/ph0", {"drive_id": "ph0",
                                                  "path_on_host": str(files["rootfs"])}) == before
    assert refused(fake, "PATCH", "/vm", {"state": "Paused"}) == before
    assert refused(fake, "PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == before
    assert refused(fake, "PUT", "/snapshot/create", {"snapshot_path": "/s",
                                                     "mem_file_path": "/m"}) == before
    assert ok(fake, "GET", "/")["state"] == "Not started"


def test_instance_start_needs_a_kernel(fake):
    assert "Missing kernel configuration" in refused(fake, "PUT", "/actions",
                                                     {"action_type": "InstanceStart"})


def test_drive_rules(fake, files):
    assert "does not match the id from the body" in refused(
        fake, "PUT", "/drives/a", {"drive_id": "b", "is_root_device": False,
                                   "path_on_host": str(files["disk"])})
    assert "alphanumeric characters and underscores" in refused(
        fake, "PUT", "/drives/a-b", {"drive_id": "a-b", "is_root_device": False,
                                     "path_on_host": str(files["disk"])})
    assert "No such file or directory" in refused(
        fake, "PUT", "/drives/a", {"drive_id": "a", "is_root_device": False,
                                   "path_on_host": str(files["dir"] / "absent")})
    boot(fake, files, drives=("root", "ph0"))
    assert "Invalid block device ID: nope" in refused(
        fake, "PATCH", "/drives/nope", {"drive_id": "nope", "path_on_host": str(files["disk"])})
    ok(fake, "PATCH", "/drives/ph0", {"drive_id": "ph0", "path_on_host": str(files["disk"])})
    assert fake.drives["ph0"]["path_on_host"] == str(files["disk"])


def test_only_one_root_device(fake, files):
    body = {"is_root_device": True, "path_on_host": str(files["rootfs"]), "is_read_only": True}
    ok(fake, "PUT", "/drives/a", {"drive_id": "a", **body})
    assert refused(fake, "PUT", "/drives/b", {"drive_id": "b", **body}) == \
        "A root block device already exists!"


def test_snapshot_load_only_on_a_fresh_process(contract, fake, files):
    ok(fake, "PUT", "/logger", {"log_path": str(files["log"])})
    ok(fake, "PUT", "/metrics", {"metrics_path": str(files["metrics"])})
    assert "Reinitialization of metrics" in refused(
        fake, "PUT", "/metrics", {"metrics_path": str(files["metrics"])})
    ok(fake, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    assert refused(fake, "PUT", "/snapshot/load", {
        "snapshot_path": "/s", "mem_file_path": "/m"}).startswith("Loading a microVM snapshot "
                                                                  "not allowed")


def test_snapshot_create_needs_a_paused_vm_and_loads_fresh(contract, fake, files):
    boot(fake, files)
    snap, mem = files["dir"] / "vm.snap", files["dir"] / "vm.mem"
    body = {"snapshot_path": str(snap), "mem_file_path": str(mem)}
    assert "not paused" in refused(fake, "PUT", "/snapshot/create", body)
    ok(fake, "PATCH", "/vm", {"state": "Paused"})
    ok(fake, "PUT", "/snapshot/create", body)
    fresh = FakeFirecracker(contract, "restored")
    assert "exactly one of" in refused(fresh, "PUT", "/snapshot/load", {
        "snapshot_path": str(snap), "mem_file_path": str(mem),
        "mem_backend": {"backend_type": "File", "backend_path": str(mem)}})
    ok(fresh, "PUT", "/snapshot/load", {"snapshot_path": str(snap),
                                        "mem_backend": {"backend_type": "File",
                                                        "backend_path": str(mem)}})
    assert ok(fresh, "GET", "/")["state"] == "Paused"
    assert refused(fresh, "PUT", "/boot-source", {"kernel_image_path": str(files["vmlinux"])}) \
        .endswith("after starting the microVM.")


def test_garbage_json_is_refused(fake):
    status, answer = fake.handle("PUT", "/vm", b"{not json")
    assert status == 400 and "deserializing the json body" in answer["fault_message"]


def test_mmds_needs_its_interface_first_and_balloon_fits_in_memory(fake):
    assert "does not correspond to any existing network interface" in refused(
        fake, "PUT", "/mmds/config", {"network_interfaces": ["eth0"]})
    assert "is empty" in refused(fake, "PUT", "/mmds/config", {"network_interfaces": []})
    assert "MMDS data store is not initialized" in refused(fake, "PATCH", "/mmds", {"a": 1})
    ok(fake, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    assert "too large" in refused(fake, "PUT", "/balloon", {"amount_mib": 512,
                                                            "deflate_on_oom": True})
    ok(fake, "PUT", "/balloon", {"amount_mib": 64, "deflate_on_oom": True})
