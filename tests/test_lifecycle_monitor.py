"""The monitor carries out --rm and abandoned starts; failed starts say what happened
(issue 13, points 3 and 5).

* ``run -d --rm`` needs no other process: the sandbox monitor removes the
  sandbox (VM, jail, cgroups, disks, folder) once the container exits.
* An attached ``run --rm`` still prints everything and exits with the code; if
  it is SIGKILLed, the sandbox is removed all the same when the container exits.
* A CLI killed while it starts a sandbox (before the container runs) leaves
  nothing within seconds: the monitor follows its creator through a pidfd.
* A start that fails because QEMU or the monitor was killed says so, with the
  logs' last lines, not "QMP socket ... did not come up" or a pointer to a
  monitor.log that the failed start removed.

The first tests need neither root nor a VM; the rest boot real sandboxes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import ember_bin, qemu_pids

from ember.errors import EmberError, VMError

VM = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(600)]


# ----------------------------------------------------------- no VM needed

def _fake_qemu(tmp_path: Path, body: str) -> Path:
    exe = tmp_path / "fake-qemu"
    exe.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    exe.chmod(0o755)
    return exe


def _spec(tmp_path: Path, restore: bool):
    from ember.vmm.base import VMSpec

    work = tmp_path / "vm"
    work.mkdir()
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    return VMSpec(vm_id="f" * 64, kernel=blob, initrd=blob, rootfs=blob, cmdline="",
                  work_dir=work, restore_from=blob if restore else None)


def test_describe_exit():
    from ember.vmm.base import describe_exit

    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(137) == "exited with code 137"
    assert describe_exit(137, supervised=True) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(1, supervised=True) == "exited with code 1"


def test_qemu_killed_while_restoring_says_so_at_once(tmp_path):
    """QEMU dies (SIGKILL) after dropping its QMP socket: the restore stops waiting
    for the socket at once and says how QEMU ended, with its last words."""
    from ember.vmm.qemu import QemuVMM

    exe = _fake_qemu(tmp_path, """
        import os, sys, time
        print("fake-qemu: loading the snapshot", file=sys.stderr, flush=True)
        os.closerange(3, 1024)  # the listening QMP socket goes: connects are refused
        time.sleep(0.3)
        os.kill(os.getpid(), 9)
    """)
    vm = QemuVMM(_spec(tmp_path, restore=True), binary=str(exe))
    started = time.monotonic()
    with pytest.raises(VMError) as err:
        vm.start()
    message = str(err.value)
    assert time.monotonic() - started < 5  # not the QMP connect time-out (15 s)
    assert "did not come up" not in message and "Errno" not in message, message
    assert message == "QEMU killed by signal 9 (SIGKILL): fake-qemu: loading the snapshot"


def test_qemu_dying_mid_command_says_how_it_ended(tmp_path):
    """QEMU accepts the QMP connection, then dies: not "connection closed" but how."""
    from ember.vmm.qemu import QemuVMM

    exe = _fake_qemu(tmp_path, """
        import os, time
        time.sleep(0.5)  # QMP connects (the inherited socket listens); no greeting comes
        os._exit(3)
    """)
    vm = QemuVMM(_spec(tmp_path, restore=True), binary=str(exe))
    with pytest.raises(VMError) as err:
        vm.start()
    assert str(err.value) == "QEMU exited with code 3", err.value


def test_monitor_dying_during_start_up_says_how_with_its_log(tmp_path, monkeypatch):
    """No report from the monitor: the error says how it ended and carries the last
    lines of monitor.log, since the failed start removes the folder."""
    monkeypatch.setenv("EMBER_STATE_DIR", str(tmp_path / "state"))
    from ember.api import Sandbox
    from ember.config import load_config
    from ember.sandbox.state import SandboxState, StateStore

    cfg = load_config()
    store = StateStore(cfg)
    st = SandboxState(id=os.urandom(32).hex(), name="x")
    with store.lock():
        store.create(st)
    sb = Sandbox(st, cfg)
    (sb.dir / "monitor.log").write_text("Traceback (most recent call last):\n"
                                        "  File x\nMemoryError: out of memory\n")
    (sb.dir / "console.log").write_text("[    0.1] Linux version 6.1\n")
    ready_r, ready_w = os.pipe()
    proc = subprocess.Popen(["sh", "-c", "kill -9 $$"], pass_fds=(ready_w,))
    os.close(ready_w)
    with pytest.raises(EmberError) as err:
        sb._wait_ready(proc, ready_r)
    message = err.value.message
    assert message.startswith("sandbox monitor exited during start-up "
                              "(killed by signal 9 (SIGKILL)); monitor log: "), message
    assert "MemoryError: out of memory" in message
    assert "guest console: [    0.1] Linux version 6.1" in message
    assert "\n" not in message and "see " not in message


def test_no_reaper_module():
    import importlib.util

    assert importlib.util.find_spec("ember.cli.reaper") is None


# ------------------------------------------------------------ real sandboxes

def _cfg(ember_env):
    return ember_env.cfg()


def _ids(ember_env) -> set[str]:
    root = ember_env.state_dir / "sandboxes"
    return {p.name for p in root.iterdir() if len(p.name) == 64} if root.is_dir() else set()


def _leftovers(ember_env, sid: str) -> list[str]:
    """What is left of sandbox sid anywhere on the host."""
    from ember.jailer.cgroups import jail_cgroup_dirs

    cfg = _cfg(ember_env)
    left = []
    for path in (ember_env.state_dir / "sandboxes" / sid, cfg.disks_dir / sid):
        if os.path.lexists(path):
            left.append(str(path))
    if cfg.jailer.enabled:
        for binary in (cfg.vm.qemu_binary, cfg.vm.firecracker_binary):
            exec_name = os.path.basename(binary)
            jail = Path(cfg.jailer.chroot_base_dir) / exec_name / sid
            if os.path.lexists(jail):
                left.append(str(jail))
            left += [str(d) for d in jail_cgroup_dirs(cfg.jailer.parent_cgroup or exec_name, sid)]
    for p in psutil.process_iter(["cmdline"]):
        argv = " ".join(p.info["cmdline"] or [])
        if sid in argv or f"ember-{sid[:12]}" in argv:
            left.append(f"process {p.pid}: {argv[:120]}")
    return left


def _wait_clean(ember_env, sids: set[str], within: float) -> float:
    """Seconds until nothing of sids is left (fails after `within`)."""
    started = time.monotonic()
    while True:
        left = [x for sid in sids for x in _leftovers(ember_env, sid)]
        if not left:
            return time.monotonic() - started
        assert time.monotonic() - started < within, left
        time.sleep(0.2)


def _ps_all(ember_env) -> list:
    return json.loads(ember_env.run("ps", "-a", "--json", check=True).stdout)


def _reapers() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if "ember.cli.reaper" in " ".join(p.info["cmdline"] or [])]


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(600)
def test_detached_rm_is_removed_by_the_monitor(ember_env, image):
    proc = ember_env.run("run", "-d", "--rm", image, "sh", "-c", "echo hi; sleep 3")
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.decode().strip()
    assert len(sid) == 64
    # Nothing but the monitor (and its VM) runs for it: no reaper, no CLI.
    monitor = [p for p in psutil.process_iter(["cmdline"])
               if "ember.sandbox.monitor" in (p.info["cmdline"] or [])
               and sid in (p.info["cmdline"] or [])]
    assert len(monitor) == 1
    assert not _reapers()
    # An idle monitor does not poll: well under 5% of a core.
    cpu = monitor[0].cpu_times()
    time.sleep(1.5)
    cpu2 = monitor[0].cpu_times()
    assert (cpu2.user + cpu2.system) - (cpu.user + cpu.system) < 0.075
    took = _wait_clean(ember_env, {sid}, within=60)
    assert not _reapers()
    assert _ps_all(ember_env) == []
    print(f"removed {took:.1f}s after the check")


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(600)
def test_attached_rm_prints_everything_and_leaves_nothing(ember_env, image):
    proc = ember_env.run("run", "--rm", image, "sh", "-c",
                         "seq 1 3000; echo err >&2; exit 3")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.decode().split() == [str(i) for i in range(1, 3001)]
    assert proc.stderr == b"err\n"
    assert _ids(ember_env) == set()  # removed before the CLI returned
    assert _ps_all(ember_env) == []
    assert not qemu_pids(str(ember_env.state_dir))


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(600)
def test_killed_attached_rm_cli_still_removes(ember_env, image):
    cli = subprocess.Popen([ember_bin(), "run", "--rm", image, "sh", "-c", "echo up; sleep 4"],
                           env=ember_env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert cli.stdout.readline() == b"up\n", cli.stderr.read1()
        [sid] = _ids(ember_env)
        cli.kill()
        cli.wait()
        # The container runs on, then the monitor removes everything.
        assert [p["status"] for p in _ps_all(ember_env)] == ["running"]
        _wait_clean(ember_env, {sid}, within=40)
        assert _ps_all(ember_env) == []
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()


def _kill_cli_during_start(ember_env, args: list[str], kill_when, env=None,
                           may_finish: bool = False) -> set[str]:
    """Start `ember run ARGS`, SIGKILL it when kill_when(seen ids) is true; the ids seen.
    With may_finish, a CLI that is done before that is fine (and not killed)."""
    cli = subprocess.Popen([ember_bin(), "run", *args], env=env or ember_env.env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 120
        while not kill_when(seen):
            if cli.poll() is not None:
                assert may_finish and cli.returncode == 0, (cli.returncode, cli.stderr.read())
                break
            assert time.monotonic() < deadline
            seen |= _ids(ember_env)
            time.sleep(0.01)
        cli.kill()
        cli.wait()
        seen |= _ids(ember_env)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    return seen


def _started_or_gone(ember_env, sids: set[str], within: float) -> bool:
    """After its CLI died: True if the sandbox had started (it runs on, as it should),
    False once nothing of it is left; fails if neither within `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        statuses = [p["status"] for p in _ps_all(ember_env)]
        if statuses == ["running"]:
            return True  # Watch came first: only `rm` removes it
        if not statuses and not [x for sid in sids for x in _leftovers(ember_env, sid)]:
            return False
        assert time.monotonic() < deadline, (statuses, [_leftovers(ember_env, s) for s in sids])
        time.sleep(0.2)


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(600)
@pytest.mark.parametrize("delay", [0.3, 0.6, 0.9, 1.2, 1.5])
def test_cli_killed_during_start_leaves_nothing(ember_env, image, delay):
    """Killed at a delay: the start had not finished (then nothing is left within
    seconds), or the container was started (then it runs, `ps` says so)."""
    t0 = time.monotonic()
    seen = _kill_cli_during_start(ember_env, ["-d", "--name", "abandoned", image, "sleep", "300"],
                                  lambda _seen: time.monotonic() - t0 >= delay, may_finish=True)
    t1 = time.monotonic()
    started = _started_or_gone(ember_env, seen, within=10)
    print(f"killed at {delay}s, sandboxes {len(seen)}: "
          f"{'started, runs on' if started else f'nothing left after {time.monotonic() - t1:.1f}s'}")
    if started:
        assert ember_env.run("exec", "abandoned", "true").returncode == 0
        assert ember_env.run("rm", "-f", "abandoned").returncode == 0
    _wait_clean(ember_env, seen, within=30)
    assert _ps_all(ember_env) == []
    assert not qemu_pids(str(ember_env.state_dir))
    # The name is free again.
    proc = ember_env.run("run", "--rm", "--name", "abandoned", image, "true")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(600)
def test_cli_killed_mid_boot_kills_the_booting_vm(ember_env, image, tmp_path):
    """Cold boot (seconds): the CLI dies as soon as QEMU runs; the monitor kills the
    booting VM rather than finishing the boot, and removes everything."""
    config = tmp_path / "config.toml"
    config.write_text("[vm]\nsnapshot = false\n")
    env = dict(ember_env.env, EMBER_CONFIG=str(config))

    def qemu_up(seen: set[str]) -> bool:
        return any(qemu_pids(f"ember-{sid[:12]}") for sid in seen)

    seen = _kill_cli_during_start(ember_env, ["-d", image, "sleep", "300"], qemu_up, env=env)
    assert len(seen) == 1
    took = _wait_clean(ember_env, seen, within=10)
    assert _ps_all(ember_env) == []
    print(f"clean {took:.1f}s after the CLI died mid-boot")


CREATOR = textwrap.dedent("""
    import sys, time
    from ember.api import Sandbox
    from ember.config import load_config
    from ember.sandbox.state import SandboxState, StateStore

    cfg = load_config()
    store = StateStore(cfg)
    st = SandboxState(id=sys.argv[1], name="halfway")
    with store.lock():
        store.create(st)
    sb = Sandbox(st, cfg)
    proc, ready = sb._spawn_monitor()
    sb._wait_ready(proc, ready)
    print("ready", flush=True)
    time.sleep(600)  # never starts a container
""")


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(600)
def test_creator_killed_after_the_vm_is_ready(ember_env, image):
    """The VM is ready and served, no container was started: the creator's death
    abandons the start."""
    sid = os.urandom(32).hex()
    creator = subprocess.Popen([sys.executable, "-c", CREATOR, sid], env=ember_env.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert creator.stdout.readline() == b"ready\n", creator.stderr.read()
        assert [p["status"] for p in _ps_all(ember_env)] == ["creating"]
        assert qemu_pids(f"ember-{sid[:12]}")
        creator.kill()
        creator.wait()
        took = _wait_clean(ember_env, {sid}, within=10)
        assert _ps_all(ember_env) == []
        print(f"clean {took:.1f}s after the creator died")
    finally:
        if creator.poll() is None:
            creator.kill()
            creator.wait()


def _one_error_line(returncode: int, err: str) -> str:
    assert returncode == 125, (returncode, err)
    assert err.count("\n") == 1 and err.startswith("ember: error: "), err
    return err


def _failed_start(ember_env, env: dict, image: str, kill) -> tuple[str, set[str]]:
    """`ember run --rm IMAGE true`, with kill(sandbox ids) called every 10 ms until it
    returns the ids it killed something of; the CLI's error line and those ids."""
    cli = subprocess.Popen([ember_bin(), "run", "--rm", image, "true"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed: set[str] = set()
    try:
        deadline = time.monotonic() + 120
        while not killed and cli.poll() is None and time.monotonic() < deadline:
            killed = kill(_ids(ember_env))
            time.sleep(0.01)
        _, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert killed, "the start was over before anything could be killed"
    return _one_error_line(cli.returncode, err.decode()), killed


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(600)
def test_qemu_killed_during_start_is_named(ember_env, image, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[vm]\nsnapshot = false\n")  # a cold boot: seconds to hit

    def kill_qemu(sids: set[str]) -> set[str]:
        hit = set()
        for sid in sids:
            for pid in qemu_pids(f"ember-{sid[:12]}"):
                os.kill(pid, signal.SIGKILL)
                hit.add(sid)
        return hit

    err, killed = _failed_start(ember_env, dict(ember_env.env, EMBER_CONFIG=str(config)),
                                image, kill_qemu)
    assert "QEMU exited during start (killed by signal 9 (SIGKILL))" in err, err
    assert "guest console" in err
    assert "did not come up" not in err and "monitor.log" not in err
    _wait_clean(ember_env, killed, within=10)


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(600)
def test_monitor_killed_during_start_is_named(ember_env, image):
    def kill_monitor(sids: set[str]) -> set[str]:
        hit: set[str] = set()
        for p in psutil.process_iter(["cmdline"]):
            argv = p.info["cmdline"] or []
            if "ember.sandbox.monitor" in argv and sids & set(argv):
                p.kill()
                hit |= sids & set(argv)
        return hit

    err, killed = _failed_start(ember_env, ember_env.env, image, kill_monitor)
    assert "sandbox monitor exited during start-up (killed by signal 9 (SIGKILL))" in err, err
    assert "monitor.log" not in err and "see " not in err
    _wait_clean(ember_env, killed, within=20)
