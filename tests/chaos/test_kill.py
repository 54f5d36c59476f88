"""SIGKILL of every process of `ember run` at every stage (issue 13, points 1 and 6).

Start: the CLI of `run -d` right after its record is made and before it spawns
a monitor (``EMBER_TEST_PAUSE=recorded``: the record goes by the next `ps`), at
four points of the start (its record made, the monitor spawned, QEMU started, the boot recorded) and after a fixed delay;
the monitor paused right after QEMU started and before anything of QEMU was
recorded (``EMBER_TEST_PAUSE=vmm-started``), with its CLI alive (which then
removes the failed start) and killed at the same moment (the sandbox is
``dead``, its jailed VM gone with its monitor, its jail left for `rm -f`); the monitor and its CLI while the
monitor boots a VM template build (``template-started``: a memory size no
template exists for), whose VM must go with the sandbox; QEMU at the
``vmm-started`` point.

Running (one VM per case, booted three at a time; the monitor and the first
`rm -f` cases on the ember0 bridge): the `exec` and `logs -f` CLIs, then
the monitor with an `exec` and a `logs -f` attached (the jailed QEMU, its child
with no waiter between, goes with it); QEMU (its jail folder and cgroups must
go without `rm`); `ember rm -f` itself at
each of its stages (``rm-killed``, ``rm-cleaned``, ``rm-renamed``) and after a
delay, followed by a second `rm -f`.

Each case ends with conftest's checks: a truthful `ps -a`, a successful
`rm -f`, and no leftover of the sandbox on the host.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from .conftest import chaos_env, monitor_pids, sigkill, vmm_pids, wait_for, waiter_pids

pytestmark = [pytest.mark.chaos, pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(600)]


def _record(env, sid: str) -> dict:
    try:
        return json.loads((env.sandboxes / sid / "state.json").read_bytes())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------- start
CLI_STAGES = {
    "record": lambda env, sid: True,  # the sandbox folder exists
    "monitor": lambda env, sid: monitor_pids(sid),
    "vmm": lambda env, sid: vmm_pids(sid),
    "booted": lambda env, sid: _record(env, sid).get("vmm_pid"),
}


@pytest.mark.parametrize("stage", [*CLI_STAGES, "after-2s"])
def test_cli_killed_during_start(chaos, image, stage):
    cli = chaos.start("run", "-d", "--name", "victim", image, "sleep", "600")
    if stage in CLI_STAGES:
        sid = chaos.one_sandbox()
        wait_for(stage, lambda: CLI_STAGES[stage](chaos, sid), 180, 0.005)
    else:
        time.sleep(2)
    sigkill(cli.pid)
    cli.wait()
    if not chaos.folders():
        assert stage == "after-2s"  # killed before it made anything
        chaos.assert_truthful()
        return
    sid = chaos.one_sandbox()
    chaos.finish("victim", sid)


def test_cli_killed_before_monitor(chaos, image):
    """Killed after its record exists and before it spawned a monitor (the
    ``recorded`` pause): nothing would ever serve or remove the sandbox, so
    `ps -a` says so at once and removes the record; the name is free again."""
    cli = chaos.start("run", "-d", "--name", "victim", image, "sleep", "600", pause="recorded")
    chaos.wait_paused(Path(cli.err_path), "recorded", 120)
    [sid] = chaos.folders()
    st = _record(chaos, sid)
    assert st["status"] == "creating" and st["creator_pid"] == cli.pid, st
    sigkill(cli.pid)
    cli.wait()
    assert chaos.assert_truthful() == [] and chaos.folders() == []
    chaos.assert_clean(sid)


@pytest.mark.parametrize("cli_alive", [True, False], ids=["cli-alive", "cli-killed"])
def test_monitor_killed_during_boot(chaos, image, cli_alive):
    network = "none" if cli_alive else "bridge"  # a netns, veth and address to leave behind
    cli = chaos.start("run", "-d", "--name", "victim", "--network", network, image, "sleep", "600",
                      pause="vmm-started")
    sid = chaos.one_sandbox()
    chaos.wait_paused(chaos.sandboxes / sid / "monitor.log", "vmm-started", 300)
    assert vmm_pids(sid) and not waiter_pids(sid), "QEMU runs, in place: no waiter"
    assert not _record(chaos, sid).get("vmm_pid"), "nothing of QEMU is recorded yet"
    [monitor] = monitor_pids(sid)
    if not cli_alive:
        # Both at once: stopped first, the monitor cannot see its creator go and
        # tear the start down itself (which it would: an abandoned start).
        os.kill(monitor, signal.SIGSTOP)
        sigkill(cli.pid)
        cli.wait()
    sigkill(monitor)
    if cli_alive:  # the CLI sees its monitor die, says so and removes the sandbox
        assert cli.wait(120) == 125, chaos.stderr_of(cli)
        assert chaos.stderr_of(cli).count("\n") == 1, chaos.stderr_of(cli)
    else:
        wait_for("QEMU to die with its monitor", lambda: not vmm_pids(sid), 10, 0.05)
        [entry] = chaos.assert_truthful()
        assert entry["status"] == "dead" and "its VM are gone" in entry["error"], entry
    chaos.finish("victim", sid)


def _memory_without_template() -> int:
    """A guest memory size (MiB) no cached VM template has, so the start must
    build one: a random pick alone collided with templates earlier runs left."""
    from ember.api import GUEST_OVERHEAD_MIB
    from ember.config import load_config

    taken = set()
    for meta in load_config().templates_dir.glob("*/meta.json"):
        try:
            taken.add(int(json.loads(meta.read_text())["spec"]["memory_mib"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    free = [m for m in range(100, 500) if m + GUEST_OVERHEAD_MIB not in taken]
    assert free, "every memory size from 100 to 499 MiB has a cached template"
    return free[secrets.randbelow(len(free))]


def test_monitor_killed_during_template_build(chaos, image):
    """A memory size no template exists for: the monitor first boots a template VM
    (cold, seconds long) and is killed, with its CLI, while that VM runs."""
    memory = f"{_memory_without_template()}m"
    cli = chaos.start("run", "-d", "--name", "victim", "--memory", memory, image, "sleep", "600",
                      pause="template-started")
    sid = chaos.one_sandbox()
    chaos.wait_paused(chaos.sandboxes / sid / "monitor.log", "template-started", 300)
    [monitor] = monitor_pids(sid)
    spawned = psutil.Process(monitor).children(recursive=True)
    assert any(p.name().startswith("qemu") for p in spawned), "a template VM runs"
    os.kill(monitor, signal.SIGSTOP)
    sigkill(cli.pid)
    cli.wait()
    sigkill(monitor)
    chaos.finish("victim", sid)
    assert not [p for p in spawned if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_vmm_killed_during_boot(chaos, image):
    cli = chaos.start("run", "-d", "--name", "victim", image, "sleep", "600", pause="vmm-started")
    sid = chaos.one_sandbox()
    chaos.wait_paused(chaos.sandboxes / sid / "monitor.log", "vmm-started", 300)
    for pid in vmm_pids(sid):
        sigkill(pid)
    chaos.resume_file.touch()
    assert cli.wait(120) == 125, chaos.stderr_of(cli)
    chaos.finish("victim", sid)


# ------------------------------------------------------------------- running
RUNNING = ["monitor", "vmm", "rm-killed", "rm-cleaned", "rm-renamed", "rm-after-1s"]
BRIDGED = ("monitor", "rm-killed")  # with a netns, veth and address to leave behind


@pytest.fixture(scope="module")
def running(guest_assets, image):
    """One running sandbox per case, named after it, booted three at a time."""
    with chaos_env() as env:
        def boot(name: str) -> dict:
            return env.run_detached(name, image, "sh", "-c", "echo up; exec sleep 600",
                                    network="bridge" if name in BRIDGED else "none")

        with ThreadPoolExecutor(3) as pool:
            infos = dict(zip(RUNNING, pool.map(boot, RUNNING), strict=True))
        yield env, infos


def _jail_leftovers(env, sid: str) -> list[str]:
    from ember_testing.leftovers import leftovers

    return [line for line in leftovers(sid, env.cfg())
            if line.startswith(("jail folder", "cgroup"))]


def test_cli_then_monitor_killed_while_running(running):
    env, infos = running
    info = infos["monitor"]
    sid = info["id"]
    wait_for("the container's output", lambda: b"up" in env.run("logs", "monitor").stdout)
    # An exec and a logs -f CLI killed mid-way: the sandbox does not notice.
    victims = [env.start("exec", "monitor", "sleep", "600"), env.start("logs", "-f", "monitor")]
    time.sleep(1.5)
    for p in victims:
        sigkill(p.pid)
        p.wait()
    proc = env.run("exec", "monitor", "echo", "still")
    assert (proc.returncode, proc.stdout) == (0, b"still\n"), proc.stderr
    # Then the monitor, with an exec and a logs -f attached: both end with one line.
    followers = [env.start("exec", "monitor", "sleep", "600"), env.start("logs", "-f", "monitor")]
    time.sleep(1.5)
    assert all(p.poll() is None for p in followers)
    [vmm] = vmm_pids(sid)
    assert psutil.Process(vmm).ppid() == info["monitor_pid"] and not waiter_pids(sid)
    sigkill(info["monitor_pid"])
    wait_for("QEMU to die with its monitor (PDEATHSIG)", lambda: not vmm_pids(sid), 10, 0.05)
    for p in followers:
        assert p.wait(30) == 125, env.stderr_of(p)
        err = env.stderr_of(p)
        assert err.count("\n") == 1 and "dead" in err, err
    entry = next(p for p in env.assert_truthful() if p["id"] == sid)
    assert entry["status"] == "dead" and "its VM are gone" in entry["error"], entry
    env.finish("monitor", sid)


def test_vmm_killed_while_running(running):
    env, infos = running
    sid = infos["vmm"]["id"]
    for pid in vmm_pids(sid):
        sigkill(pid)
    wait_for("status dead", lambda: env.status("vmm") == "dead", 60, 0.2)
    entry = next(p for p in env.assert_truthful() if p["id"] == sid)
    assert "VMM exited" in entry["error"], entry
    wait_for("the monitor to remove the jail", lambda: not _jail_leftovers(env, sid), 10, 0.1)
    env.finish("vmm", sid)


@pytest.mark.parametrize("stage", ["rm-killed", "rm-cleaned", "rm-renamed", "rm-after-1s"])
def test_rm_killed_midway(running, stage):
    env, infos = running
    sid = infos[stage]["id"]
    if stage == "rm-after-1s":
        rm = env.start("rm", "-f", stage)
        time.sleep(1)
    else:
        rm = env.start("rm", "-f", stage, pause=stage)
        env.wait_paused(Path(rm.err_path), stage, 120)
    sigkill(rm.pid)
    rm.wait()
    env.finish(stage, sid)
