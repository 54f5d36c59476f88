"""The Firecracker driver through its whole life, against the fake Firecracker.

The driver really execs a ``firecracker`` executable (ember_testing.fc_fake)
and configures it over HTTP on its Unix API socket; the fake checks every
request against the published OpenAPI description and Firecracker's state
rules and records it. Its hybrid vsock socket relays ``CONNECT 1024`` to a
real ember agent process (``--listen-unix``), so the agent channel is the one
the sandbox layer uses. After each test the recorded requests are checked
again here, against the contract, and no fake process may be left running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from ember_testing.fc_fake import read_log, write_fake_binary

from ember.errors import VMError
from ember.sandbox.agent_client import AgentClient
from ember.vmm.base import Drive, VMSpec
from ember.vmm.firecracker import FirecrackerOptions, FirecrackerVMM
from ember.vmm.firecracker import drives as fc_drives
from ember.vmm.firecracker.contract import default_spec_path
from ember.vmm.firecracker.contract import load as load_contract

pytestmark = pytest.mark.skipif(not default_spec_path().exists(),
                                reason=f"Firecracker API description not found at "
                                       f"{default_spec_path()} (set EMBER_FC_SPEC)")


@pytest.fixture(scope="module")
def agent_sock():
    """A real ember agent serving a Unix socket: the 'guest' behind the fake's vsock."""
    d = Path(tempfile.mkdtemp(prefix="fcag", dir="/tmp"))
    sock = d / "agent.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.agent", "--listen-unix", str(sock),
         "--base-dir", str(d / "base")],
        stdout=subprocess.PIPE, stderr=open(d / "agent.log", "wb"))
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == b"EMBER-AGENT-READY", (d / "agent.log").read_text()
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def _fake_pids(marker: str) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


class Env:
    """Temp dir with guest-asset stand-ins, the fake binary and its request log."""

    def __init__(self, root: Path, monkeypatch, agent_sock: Path) -> None:
        self.root = root
        self.binary = str(write_fake_binary(root / "bin"))
        self.log = root / "requests.jsonl"
        (root / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 8188)  # loaded as is
        for name in ("initrd.img", "rootfs.ext4"):
            (root / name).write_bytes(b"\0" * 8192)
        monkeypatch.setenv("EMBER_FC_FAKE_LOG", str(self.log))
        monkeypatch.setenv("EMBER_FC_FAKE_GUEST", f"1024={agent_sock}")
        for var in ("EMBER_FC_FAKE_BOOT_DELAY", "EMBER_FC_FAKE_HANG", "EMBER_FC_FAKE_FAIL_START",
                    "EMBER_FC_FAKE_IGNORE_CAD"):
            monkeypatch.delenv(var, raising=False)
        self.vms: list[FirecrackerVMM] = []

    def spec(self, name: str = "vm", **kw) -> VMSpec:
        return VMSpec(vm_id=f"t-{name}", kernel=self.root / "vmlinux",
                      initrd=self.root / "initrd.img", rootfs=self.root / "rootfs.ext4",
                      cmdline="console=ttyS0 root=/dev/vda ro", work_dir=self.root / name, **kw)

    def vm(self, name: str = "vm", placeholders: int = 4, api_timeout: float = 10.0,
           options: FirecrackerOptions | None = None, **kw) -> FirecrackerVMM:
        vm = FirecrackerVMM(self.spec(name, **kw), binary=self.binary,
                            placeholder_drives=placeholders, api_timeout=api_timeout,
                            options=options)
        self.vms.append(vm)
        return vm

    def disk(self, name: str, size: int = 1 << 20) -> Path:
        path = self.root / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def requests(self) -> list[dict]:
        return read_log(self.log)


@pytest.fixture
def env(monkeypatch, agent_sock):
    root = Path(tempfile.mkdtemp(prefix="fc", dir="/tmp"))  # short: Unix socket paths
    e = Env(root, monkeypatch, agent_sock)
    try:
        yield e
    finally:
        for vm in e.vms:
            vm.kill()
        leftover = _fake_pids(str(root))
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        assert leftover == [], "fake firecracker processes left running"
    contract = load_contract()
    for req in e.requests():  # every request the driver sent, checked here once more
        if req["status"] < 300:
            contract.check(req["method"], req["path"], req["body"])


def accepted(env: Env) -> list[str]:
    reqs = env.requests()
    refused = [(r["method"], r["path"], r["fault"]) for r in reqs if r["status"] >= 300]
    assert refused == [], f"the fake refused requests: {refused}"
    return [f"{r['method']} {r['path']}" for r in reqs]


def test_whole_life_in_an_order_firecracker_accepts(env):
    vm = FirecrackerVMM(env.spec("vm", vcpus=2), binary=env.binary, placeholder_drives=2)
    env.vms.append(vm)
    vm.spec.vm_id = "t_vm.1"  # Firecracker's --id takes letters, digits and '-' only
    vm.start()
    assert vm.pid and not vm.exited()
    assert vm.api.get("/") == {"app_name": "Firecracker", "id": "t-vm-1", "state": "Running",
                               "vmm_version": "1.16.1"}
    assert vm.api.get("/machine-config")["vcpu_count"] == 2
    with AgentClient(vm.connect_agent(timeout=10)) as agent:
        details = agent.wait_ready(10)
        assert details.agent_version  # a real agent answered through CONNECT 1024 / OK
        assert agent.list_processes() == []

    a, b = env.disk("a.img", 2 << 20), env.disk("b.img", 3 << 20)
    dev_a = vm.add_drive(Drive("c1", a))
    dev_b = vm.add_drive(Drive("c2", b, readonly=True))
    st = os.stat(a)
    assert dev_a.kind == "fcdisk"
    assert dev_a.address == f"{st.st_dev}{st.st_rdev}{st.st_ino}"[:20] + ":4096"
    assert dev_b.address.endswith(":6144") and dev_b.address != dev_a.address
    vm.remove_drive("c1")
    vm.remove_drive("c1")  # idempotent
    vm.pause()
    vm.resume()
    vm.stop(timeout=5)
    assert vm.exited() and vm.wait(1) == 0

    calls = accepted(env)
    start = calls.index("PUT /actions")
    assert calls[:3] == ["GET /", "PUT /logger", "PUT /metrics"]
    assert set(calls[3:start]) >= {"PUT /machine-config", "PUT /boot-source",
                                   "PUT /drives/root", "PUT /drives/ph0", "PUT /drives/ph1",
                                   "PUT /vsock"}
    assert all(c.startswith(("PATCH", "PUT /actions", "GET")) for c in calls[start:])
    patches = [r for r in env.requests() if r["method"] == "PATCH"
               and r["path"].startswith("/drives/")]
    assert [(p["path"], Path(p["body"]["path_on_host"]).name) for p in patches] == [
        ("/drives/ph0", "a.img"), ("/drives/ph1", "b.img"), ("/drives/ph0", "ph0.img")]
    assert env.requests()[-1]["body"] == {"action_type": "SendCtrlAltDel"}
    assert "[fake guest] booting: console=ttyS0 root=/dev/vda ro reboot=k" in vm.console_tail()
    # nothing of the driver's own is left: sockets, placeholder files
    assert sorted(p.name for p in (env.root / "vm").iterdir()) == [
        "console.log", "firecracker.log", "metrics.json", "vmm.log"]


def test_snapshot_then_restore_in_a_fresh_process(env):
    vm = env.vm("tpl", placeholders=2)
    vm.start()
    disk = env.disk("held.img")
    vm.add_drive(Drive("held", disk))
    snap = env.root / "snaps" / "tpl.snap"
    vm.save_snapshot(snap)
    assert snap.exists() and snap.with_name("tpl.snap.mem").exists()
    vm.kill()

    restored = env.vm("new", placeholders=7, restore_from=snap)  # layout comes from the snapshot
    restored.start()
    with AgentClient(restored.connect_agent(timeout=10)) as agent:
        assert agent.wait_ready(10).agent_version
    assert len(restored.pool.slots) == 2
    assert restored.pool.find("held").path == disk.resolve()
    restored.remove_drive("held")
    restored.kill()

    calls = accepted(env)
    second = env.requests()[calls.index("PUT /snapshot/create") + 1:]
    assert [f"{r['method']} {r['path']}" for r in second][:6] == [
        "GET /", "PUT /logger", "PUT /metrics", "PUT /snapshot/load", "PATCH /drives/ph1",
        "PATCH /vm"]
    load = second[3]["body"]
    assert load["vsock_override"] == {"uds_path": str(env.root / "new" / "agent.sock")}
    assert load["mem_backend"]["backend_type"] == "File"
    # the free slot now points at the new VM's own placeholder, not the template's
    assert second[4]["body"]["path_on_host"] == str(env.root / "new" / "fc-drives" / "ph1.img")


def test_restore_from_something_that_is_not_a_snapshot(env):
    bogus = env.disk("bogus.snap", 100)
    vm = env.vm("r", restore_from=bogus)
    with pytest.raises(VMError, match=r"bogus.snap is not an Ember Firecracker snapshot"):
        vm.start()
    assert vm.pid is None  # found out before any process was started
    assert not (env.root / "r" / "fc-drives").exists()


def test_refused_request_becomes_a_one_line_error_and_nothing_is_left(env):
    (env.root / "rootfs.ext4").unlink()
    vm = env.vm("bad")
    with pytest.raises(VMError) as err:
        vm.start()
    msg = str(err.value)
    assert msg.startswith("firecracker refused PUT /drives/root: ")
    assert "No such file or directory" in msg and str(env.root / "rootfs.ext4") in msg
    assert "\n" not in msg
    assert vm.exited()
    assert not (env.root / "bad" / "firecracker.sock").exists()
    assert not (env.root / "bad" / "fc-drives").exists()


def test_missing_binary_names_the_setting(env):
    vm = FirecrackerVMM(env.spec("nobin"), binary=str(env.root / "no-firecracker"),
                        placeholder_drives=1)
    with pytest.raises(VMError, match=r"cannot be run.*EMBER_FIRECRACKER_BIN"):
        vm.start()


def test_firecracker_that_dies_at_start_says_why(env, monkeypatch):
    monkeypatch.setenv("EMBER_FC_FAKE_FAIL_START",
                       "Error: Kvm(Error opening /dev/kvm: Permission denied)")
    vm = env.vm("dies")
    with pytest.raises(VMError) as err:
        vm.start()
    assert "firecracker exited with code 1: Error: Kvm(Error opening /dev/kvm" in str(err.value)


def test_api_that_never_answers_times_out(env, monkeypatch):
    monkeypatch.setenv("EMBER_FC_FAKE_HANG", "PUT /actions")
    vm = env.vm("hang", api_timeout=1.0)
    start = time.monotonic()
    with pytest.raises(VMError, match=r"firecracker did not answer PUT /actions within 1s"):
        vm.start()
    assert time.monotonic() - start < 8
    assert vm.exited()  # killed, not left hanging


def test_agent_that_never_listens_times_out(env, monkeypatch):
    monkeypatch.setenv("EMBER_FC_FAKE_GUEST", "")
    vm = env.vm("deaf")
    vm.start()
    with pytest.raises(VMError, match=r"nothing answered on guest vsock port 1024 within 1s"):
        vm.connect_agent(timeout=1)
    vm.kill()


def test_agent_that_comes_up_late_is_waited_for(env, monkeypatch):
    monkeypatch.setenv("EMBER_FC_FAKE_BOOT_DELAY", "1.0")
    vm = env.vm("late")
    vm.start()
    start = time.monotonic()
    sock = vm.connect_agent(timeout=10)
    assert time.monotonic() - start >= 0.8
    with AgentClient(sock) as agent:
        assert agent.wait_ready(5).agent_version
    vm.kill()


def test_placeholder_pool_exhaustion_and_bad_drives(env):
    vm = env.vm("pool", placeholders=1)
    with pytest.raises(VMError, match="the VM is not running"):
        vm.add_drive(Drive("early", env.disk("early.img")))
    vm.start()
    a, b = env.disk("a.img"), env.disk("b.img")
    vm.add_drive(Drive("c1", a))
    with pytest.raises(VMError) as err:
        vm.add_drive(Drive("c2", b))
    assert "all 1 are in use" in str(err.value) and "vm.fc_placeholder_drives" in str(err.value)
    with pytest.raises(VMError, match="already attached"):
        vm.add_drive(Drive("c1", b))
    with pytest.raises(VMError, match="must be raw images"):
        vm.add_drive(Drive("q", b, format="qcow2"))
    with pytest.raises(VMError, match="no such image file"):
        vm.add_drive(Drive("n", env.root / "absent.img"))
    vm.remove_drive("c1")
    assert vm.add_drive(Drive("c2", b)).address.startswith(fc_drives.disk_serial(b))
    vm.kill()
    accepted(env)


@pytest.mark.root
def test_refused_patch_frees_the_slot(env):
    """An image Firecracker cannot open read-write (immutable, even for root) is refused."""
    vm = env.vm("ro", placeholders=1)
    vm.start()
    locked = env.disk("locked.img")
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        with pytest.raises(VMError) as err:
            vm.add_drive(Drive("c1", locked))
        assert str(err.value).startswith("firecracker refused PATCH /drives/ph0: ")
        assert "Permission denied" in str(err.value)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert vm.pool.find("c1") is None
    vm.add_drive(Drive("c2", env.disk("ok.img")))  # the slot was given back
    vm.kill()


def test_stop_kills_a_guest_that_ignores_ctrl_alt_del(env, monkeypatch):
    monkeypatch.setenv("EMBER_FC_FAKE_IGNORE_CAD", "1")
    vm = env.vm("stubborn")
    vm.start()
    start = time.monotonic()
    vm.stop(timeout=0.5)
    assert time.monotonic() - start >= 0.5
    assert vm.exited() and vm.wait(0) == -signal.SIGKILL
    assert env.requests()[-1]["body"] == {"action_type": "SendCtrlAltDel"}


def test_vm_that_died_is_reported_with_its_exit(env):
    vm = env.vm("crash")
    vm.start()
    os.kill(vm.pid, signal.SIGKILL)
    vm.wait(5)
    with pytest.raises(VMError, match="the VM is not running"):
        vm.add_drive(Drive("c1", env.disk("x.img")))
    with pytest.raises(VMError, match=r"firecracker killed by signal 9 \(SIGKILL\)"):
        vm.pause()
    with pytest.raises(VMError, match=r"firecracker killed by signal 9 \(SIGKILL\)"):
        vm.connect_agent(timeout=5)


def test_selected_by_config_with_binary_from_environment(env, monkeypatch):
    from ember.config import load_config
    from ember.sandbox.vm import make_vmm

    cfg_file = env.root / "config.toml"
    cfg_file.write_text('[vm]\nhypervisor = "firecracker"\nfc_placeholder_drives = 3\n')
    monkeypatch.setenv("EMBER_CONFIG", str(cfg_file))
    monkeypatch.setenv("EMBER_FIRECRACKER_BIN", env.binary)
    cfg = load_config()
    vm = make_vmm(cfg, env.spec("sel"))
    env.vms.append(vm)  # type: ignore[arg-type]
    assert isinstance(vm, FirecrackerVMM)
    assert vm.binary == env.binary and len(vm.pool.slots) == 3
    vm.start()
    assert "PUT /drives/ph2" in accepted(env)


@pytest.mark.root
def test_network_balloon_and_mmds(env):
    tap = f"fct{os.getpid() % 10000}"
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    try:
        opts = FirecrackerOptions(
            network_interfaces=[{"iface_id": "eth0", "host_dev_name": tap,
                                 "guest_mac": "06:00:ac:10:00:02"}],
            balloon_mib=64, mmds={"ember": {"sandbox": "t"}})
        vm = env.vm("net", options=opts)
        vm.start()
        vm.kill()
        calls = accepted(env)
        assert {"PUT /network-interfaces/eth0", "PUT /balloon", "PUT /mmds/config",
                "PUT /mmds"} <= set(calls)
        assert calls.index("PUT /mmds/config") > calls.index("PUT /network-interfaces/eth0")
    finally:
        subprocess.run(["ip", "link", "del", tap], check=False)
    bad = env.vm("badnet", options=FirecrackerOptions(
        network_interfaces=[{"iface_id": "eth0", "host_dev_name": "no-such-tap"}]))
    with pytest.raises(VMError, match=r"refused PUT /network-interfaces/eth0: .*not a tap"):
        bad.start()
    with pytest.raises(VMError, match="MMDS needs a network interface"):
        env.vm("nommds", options=FirecrackerOptions(mmds={"a": 1})).start()
