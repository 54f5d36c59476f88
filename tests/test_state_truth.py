"""Truthful sandbox status, and records that lose no update (issue 13, points 2 and 4).

* Two processes hammering ``StateStore.update`` on different fields of one
  record lose none of them (the record lock).
* A sandbox folder whose ``state.json`` is empty, garbage or missing is still
  listed (``unknown``, with the reason), keeps its name, and ``ember rm -f``
  removes it and everything it ran: QEMU, the jail, its cgroups, the folder.
* A sandbox whose monitor was SIGKILLed is ``dead``; ``exec``, ``logs -f``
  and an attached ``run`` end at once with one line and exit 125.
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

from ember.config import load_config
from ember.errors import NotFoundError
from ember.sandbox.state import SandboxState, StateStore

ROUNDS = 300

HAMMER = textwrap.dedent("""
    import sys
    from ember.config import load_config
    from ember.sandbox.state import StateStore

    store = StateStore(load_config())
    sid, field, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    lost = 0
    for i in range(1, rounds + 1):
        if getattr(store.load(sid), field) != i - 1:
            lost += 1  # someone wrote back a stale copy of our field
        store.update(sid, **{field: i})
        store.modify(sid, lambda st: {"exit_code": st.exit_code + 1})
    print(lost)
""")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_STATE_DIR", str(tmp_path / "state"))
    return StateStore(load_config())


def _record(store: StateStore, name: str = "rec", **fields) -> SandboxState:
    st = SandboxState(id=os.urandom(32).hex(), name=name, **fields)
    with store.lock():
        store.create(st)
    return st


def test_concurrent_updates_lose_nothing(store):
    st = _record(store, vcpus=0, memory_mib=0, exit_code=0)
    env = dict(os.environ, EMBER_STATE_DIR=str(store.cfg.state_dir))
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, st.id, field, str(ROUNDS)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for field in ("vcpus", "memory_mib")]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err.decode()
        assert out.decode().strip() == "0", "updates lost by this writer"
    final = store.load(st.id)
    assert (final.vcpus, final.memory_mib, final.exit_code) == (ROUNDS, ROUNDS, 2 * ROUNDS)


def test_unreadable_records_are_listed_and_keep_their_name(store):
    st = _record(store, name="kept")
    state_json = store.dir(st.id) / "state.json"
    for damage, words in ((b"", "not a valid record"), (b"\x00garbage{", "not a valid record"),
                          (b"[1, 2]", "not a valid record"), (None, "state.json is missing")):
        if damage is None:
            state_json.unlink()
        else:
            state_json.write_bytes(damage)
        [listed] = store.all()
        assert (listed.id, listed.name, listed.status) == (st.id, "kept", "unknown")
        assert listed.error.startswith("record unreadable: ") and words in listed.error
        assert store.name_taken("kept")
        assert store.find("kept").id == store.find(st.id[:8]).id == st.id
        with pytest.raises(NotFoundError):
            store.update(st.id + "0", status="x")  # no folder: nothing is made
    with pytest.raises(Exception, match="already in use"):
        store.create(SandboxState(id=st.id, name="other"))


def test_dead_monitor_is_dead_whatever_the_record_says(store):
    st = _record(store, status="running")
    # A stand-in monitor: a process that names the sandbox (in its environment).
    monitor = subprocess.Popen(["sleep", "60"], env={"EMBER_SANDBOX": st.id})
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        started = psutil.Process(monitor.pid).create_time()
        store.update(st.id, monitor_pid=monitor.pid, monitor_started=started)
        assert store.read(st.id).status == "running"
        # The same pid with another start time is a reused pid: the monitor is gone.
        store.update(st.id, monitor_started=started - 100)
        assert store.read(st.id).status == "dead"
        store.update(st.id, monitor_pid=stranger.pid, monitor_started=None)
        assert store.read(st.id).status == "dead"  # a process of something else
        store.update(st.id, monitor_pid=monitor.pid)
        assert store.read(st.id).status == "running"
        monitor.kill()
        monitor.wait()
        dead = store.read(st.id)
        assert dead.status == "dead" and "sandbox monitor" in dead.error
        assert store.load(st.id).status == "running"  # the record itself is left as is
    finally:
        for p in (monitor, stranger):
            p.kill()
            p.wait()


def test_record_lock_is_not_steered_by_links(store, tmp_path):
    st = _record(store)
    target = tmp_path / "precious"
    target.write_text("keep me")
    os.chmod(target, 0o644)
    lock = store.dir(st.id) / "state.lock"
    lock.symlink_to(target)
    store.update(st.id, status="running")
    assert target.read_text() == "keep me" and not lock.is_symlink()
    lock.unlink()
    os.link(target, lock)  # a second link to some other file
    store.update(st.id, status="paused")
    assert target.read_text() == "keep me" and os.stat(target).st_nlink == 1
    assert (os.stat(lock).st_mode & 0o777) == 0o600
    assert store.load(st.id).status == "paused"


# ------------------------------------------------------------ real sandboxes

def _run_detached(ember_env, name: str, image: str) -> dict:
    proc = ember_env.run("run", "-d", "--name", name, image, "sleep", "300")
    assert proc.returncode == 0, proc.stderr
    return json.loads(ember_env.run("inspect", name, check=True).stdout)[0]


def _one_error_line(proc) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 125, (proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith("ember: error: "), err
    return err


def _jail_leftovers(info: dict) -> list[Path]:
    from ember.jailer.cgroups import jail_cgroup_dirs

    cfg = load_config()
    if not cfg.jailer.enabled:
        return []
    exec_name = os.path.basename(cfg.vm.qemu_binary)
    jail = Path(cfg.jailer.chroot_base_dir) / exec_name / info["id"]
    left = [jail] if jail.exists() else []
    return left + jail_cgroup_dirs(cfg.jailer.parent_cgroup or exec_name, info["id"])


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(600)
def test_unreadable_record_of_a_running_sandbox(ember_env, image):
    info = _run_detached(ember_env, "blind", image)
    sid, folder = info["id"], ember_env.state_dir / "sandboxes" / info["id"]
    assert qemu_pids(f"ember-{sid[:12]}")
    for damage in (b"", b"{not json", None):
        if damage is None:
            (folder / "state.json").unlink()
        else:
            (folder / "state.json").write_bytes(damage)
        ps = json.loads(ember_env.run("ps", "-a", "--json", check=True).stdout)
        assert [(p["id"], p["name"], p["status"]) for p in ps] == [(sid, "blind", "unknown")]
        assert ps[0]["error"].startswith("record unreadable")
        table = ember_env.run("ps", check=True).stdout.decode()
        assert "unknown (record unreadable" in table, table
        # The name stays taken; the sandbox cannot be used, only removed with force.
        assert "already in use" in _one_error_line(
            ember_env.run("run", "-d", "--name", "blind", image, "true"))
        assert "record unreadable" in _one_error_line(ember_env.run("exec", "blind", "true"))
        assert ember_env.run("rm", sid[:12]).returncode == 125
    started = time.monotonic()
    proc = ember_env.run("rm", "-f", sid[:12], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 60
    assert not qemu_pids(f"ember-{sid[:12]}")
    assert not [p for p in psutil.process_iter(["cmdline"])
                if sid in " ".join(p.info["cmdline"] or [])]
    assert not folder.exists()
    assert not (load_config().disks_dir / sid).exists()
    assert _jail_leftovers(info) == []
    assert ember_env.run("ps", "-a", "-q").stdout.strip() == b""


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(600)
def test_killed_monitor_makes_the_sandbox_dead(ember_env, image):
    attached = subprocess.Popen([ember_bin(), "run", "--name", "orphan", image, "sh", "-c",
                                 "echo up; sleep 300"],
                                env=ember_env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    followers: list[subprocess.Popen] = [attached]
    try:
        deadline = time.monotonic() + 120
        info: dict = {}
        while time.monotonic() < deadline and info.get("status") != "running":
            out = ember_env.run("inspect", "orphan").stdout
            info = json.loads(out)[0] if out.strip() else {}
            time.sleep(0.2)
        assert info.get("status") == "running", attached.stderr.read1().decode()
        while b"up" not in ember_env.run("logs", "orphan").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for args in (("logs", "-f", "orphan"), ("exec", "orphan", "sleep", "300")):
            followers.append(subprocess.Popen([ember_bin(), *args], env=ember_env.env,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        time.sleep(2)  # the exec is running in the guest
        assert all(p.poll() is None for p in followers)

        os.kill(info["monitor_pid"], signal.SIGKILL)
        ps = json.loads(ember_env.run("ps", "-a", "--json", check=True).stdout)
        assert [(p["name"], p["status"]) for p in ps] == [("orphan", "dead")]
        assert "monitor" in ps[0]["error"]
        assert b"dead" in ember_env.run("ps", "-a", check=True).stdout
        started = time.monotonic()
        proc = ember_env.run("exec", "orphan", "true", timeout=30)
        assert "is dead" in _one_error_line(proc)
        assert time.monotonic() - started < 10
        outs = []
        for p in followers:  # attached run, logs -f, running exec: all end at once
            out, err = p.communicate(timeout=20)
            assert p.returncode == 125, (p.args, p.returncode, err)
            assert err.count(b"\n") == 1 and b"dead" in err, (p.args, err)
            outs.append(out)
        assert outs[:2] == [b"up\n", b"up\n"]  # run and logs -f printed the output first
    finally:
        for p in followers:
            if p.poll() is None:
                p.kill()
                p.wait()
    proc = ember_env.run("rm", "orphan", timeout=120)  # dead: no -f needed
    assert proc.returncode == 0, proc.stderr
    assert not qemu_pids(f"ember-{info['id'][:12]}")
    assert _jail_leftovers(info) == []
