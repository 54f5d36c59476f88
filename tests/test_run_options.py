"""`ember run` options with Docker's semantics, on real micro-VMs: capabilities,
read-only root, hostname, /etc/hosts, DNS, --env-file, --restart (in the same VM),
--stop-signal/--stop-timeout, health checks, --pull against a real registry on
loopback; and ember wait, rename, port, top, ps. Bad values: one line, exit 125,
nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import ember_bin
from imagetools import busybox_layer, file, layer, make_image, push_image, run_registry

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(900)]


def _inspect(ember_env, name: str) -> dict:
    return json.loads(ember_env.run("inspect", name, check=True).stdout)[0]


def _until(what, timeout: float = 60, step: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)


def _nothing_left(ember_env) -> None:
    assert ember_env.run("ps", "-a", "-q").stdout == b""
    sandboxes = ember_env.state_dir / "sandboxes"
    assert not sandboxes.exists() or [p.name for p in sandboxes.iterdir()
                                      if not p.name.startswith(".")] == []


def test_caps_read_only_hostname_hosts_dns_env_file(ember_env, image, tmp_path):
    env_file = tmp_path / "app.env"
    env_file.write_text("# settings\nMODE=from-file\n\nKEEP=file\nHOST_ONLY\nUNSET_ONE\n")
    ember_env.env["HOST_ONLY"] = "from-host"
    ember_env.env.pop("UNSET_ONE", None)
    proc = ember_env.run(
        "run", "--rm", "--read-only", "--hostname", "web.example", "--add-host", "db:10.1.2.3",
        "--add-host", "cache=10.1.2.4", "--dns", "9.9.9.9", "--cap-drop", "chown",
        "--cap-add", "NET_ADMIN", "--env-file", str(env_file), "-e", "MODE=from-e", image,
        "sh", "-c",
        "hostname; cat /etc/hostname; grep -v localhost /etc/hosts; cat /etc/resolv.conf; "
        "grep CapEff /proc/self/status; echo $MODE $KEEP $HOST_ONLY ${UNSET_ONE-unset}; "
        "touch /probe 2>&1; echo written > /dev/shm/ok && cat /dev/shm/ok; "
        "chown 1 /dev/shm/ok 2>&1; true")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[:2] == ["web.example", "web.example"]
    assert lines[2:5] == ["127.0.1.1\tweb.example", "10.1.2.3\tdb", "10.1.2.4\tcache"]
    assert lines[5] == "nameserver 9.9.9.9"
    # Docker's default set (0xa80425fb) without CAP_CHOWN (bit 0), with CAP_NET_ADMIN (bit 12).
    assert lines[6].split() == ["CapEff:", f"{(0xa80425fb & ~1) | (1 << 12):016x}"]
    assert lines[7] == "from-e file from-host unset"  # -e after --env-file wins
    assert "Read-only file system" in lines[8]  # --read-only refuses writes to /
    assert lines[9] == "written"  # the tmpfs mounts stay writable
    assert "Operation not permitted" in lines[10]  # chown without CAP_CHOWN

    # ALL: every capability, or none; without options the image's /etc files stay.
    proc = ember_env.run("run", "--rm", "--cap-drop", "ALL", image, "sh", "-c",
                         "grep CapEff /proc/self/status; hostname; touch /probe && echo rw; "
                         "grep Seccomp: /proc/self/status")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode().splitlines()
    assert out[0].split() == ["CapEff:", "0" * 16]
    assert len(out[1]) == 12 and out[2] == "rw"  # short id; root writable by default
    # No seccomp filter in the guest, unlike Docker's default profile (README says so).
    assert out[3].split() == ["Seccomp:", "0"]


def test_restart_on_failure_twice_in_the_same_vm(ember_env, image):
    ember_env.run("run", "-d", "--name", "flaky", "--restart", "on-failure:2", image, "sh",
                  "-c", "echo x >> /runs; echo run $(wc -l < /runs); exit 3", check=True)
    vmm = _inspect(ember_env, "flaky")["vmm_pid"]
    assert _until(lambda: ember_env.run("wait", "flaky").stdout) == b"3\n"
    info = _inspect(ember_env, "flaky")
    assert (info["status"], info["exit_code"], info["restart_count"]) == ("exited", 3, 2)
    # One VM all along, and the disk kept what each run wrote.
    assert ember_env.run("logs", "flaky").stdout.decode().split("\n")[:3] == \
        ["run 1", "run 2", "run 3"]
    assert vmm and not os.path.exists(f"/proc/{vmm}")
    ps = ember_env.run("ps", "-a").stdout.decode()
    assert "exited (3), 2 restarts" in ps

    # A clean exit is not restarted by on-failure.
    ember_env.run("run", "-d", "--name", "fine", "--restart", "on-failure", image, "true",
                  check=True)
    assert ember_env.run("wait", "fine").stdout == b"0\n"
    assert _inspect(ember_env, "fine")["restart_count"] == 0


def test_restart_always_until_stopped_with_the_stop_signal(ember_env, image):
    ember_env.run("run", "-d", "--name", "svc", "--restart", "always", "--stop-signal", "USR1",
                  image, "sh", "-c",
                  "trap 'echo got-usr1; exit 42' USR1; echo up; sleep 1; exit 0", check=True)
    _until(lambda: _inspect(ember_env, "svc")["restart_count"] >= 2)  # exits 0, still restarted
    ember_env.run("stop", "svc", check=True)
    info = _until(lambda: (i := _inspect(ember_env, "svc"))["status"] == "exited" and i)
    count = info["restart_count"]
    assert info["stop_requested"] is True
    time.sleep(2)
    assert _inspect(ember_env, "svc")["restart_count"] == count  # stopped by hand: stays down

    # --stop-timeout: a container that ignores the stop signal is killed after 1 s.
    ember_env.run("run", "-d", "--name", "stubborn", "--stop-timeout", "1", image, "sh", "-c",
                  "trap '' TERM; echo ready; while :; do sleep 1; done", check=True)
    _until(lambda: b"ready" in ember_env.run("logs", "stubborn").stdout)
    began = time.monotonic()
    ember_env.run("stop", "stubborn", check=True)
    assert time.monotonic() - began < 8
    assert _inspect(ember_env, "stubborn")["exit_code"] == 137


def test_health_check_in_ps(ember_env, image):
    ember_env.run("run", "-d", "--name", "doc", "--health-cmd", "test -f /ready",
                  "--health-interval", "0.5", "--health-retries", "2", image, "sh", "-c",
                  "sleep 1000", check=True)
    assert "running (starting)" in ember_env.run("ps").stdout.decode() or \
        _inspect(ember_env, "doc")["health"] == "unhealthy"
    _until(lambda: _inspect(ember_env, "doc")["health"] == "unhealthy")
    assert "running (unhealthy)" in ember_env.run("ps").stdout.decode()
    ember_env.run("exec", "doc", "touch", "/ready", check=True)
    _until(lambda: _inspect(ember_env, "doc")["health"] == "healthy")
    assert "running (healthy)" in ember_env.run("ps").stdout.decode()


def test_wait_rename_port_top_ps(ember_env, image):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ember_env.run("run", "-d", "--name", "one", "--network", "bridge", "-p",
                  f"127.0.0.1:{port}:80", image, "sh", "-c",
                  "sleep 1000 & echo x > /written.txt; sleep 4; exit 7", check=True)
    assert ember_env.run("port", "one").stdout == f"80/tcp -> 127.0.0.1:{port}\n".encode()
    assert ember_env.run("port", "one", "80").stdout == f"127.0.0.1:{port}\n".encode()
    proc = ember_env.run("port", "one", "81")
    assert proc.returncode == 125 and proc.stderr.count(b"\n") == 1

    top = ember_env.run("top", "one")
    assert top.returncode == 0, top.stderr
    assert "sleep 1000" in top.stdout.decode() and top.stdout.startswith(b"PID")

    ps = ember_env.run("ps", "-s").stdout.decode().splitlines()
    assert "PORTS" in ps[0] and "SIZE" in ps[0]
    assert f"127.0.0.1:{port}->80/tcp" in ps[1] and "(virtual " in ps[1]

    # rename: the new name works at once, the old one is free again.
    ember_env.run("rename", "one", "two", check=True)
    assert _inspect(ember_env, "two")["name"] == "two"
    assert ember_env.run("inspect", "one").returncode != 0
    assert (ember_env.state_dir / "sandboxes" / _inspect(ember_env, "two")["id"]
            / "name").read_text() == "two\n"

    began = time.monotonic()
    proc = ember_env.run("wait", "two")
    assert (proc.returncode, proc.stdout) == (0, b"7\n")
    assert time.monotonic() - began > 1  # it blocked until the exit
    assert ember_env.run("wait", "two").stdout == b"7\n"  # and answers after it


def test_rename_races_and_errors(ember_env, image):
    ember_env.run("run", "-d", "--name", "a", image, "sleep", "1000", check=True)
    ember_env.run("run", "-d", "--name", "b", image, "sleep", "1000", check=True)
    for args, text in ((["a", "b"], b"already in use"), (["a", "bad/name"], b"invalid"),
                       (["nosuch", "c"], b"no such sandbox")):
        proc = ember_env.run("rename", *args)
        assert proc.returncode == 125 and text in proc.stderr
        assert proc.stderr.count(b"\n") == 1
    # Two renames to one name at once: exactly one wins.
    procs = [subprocess.Popen([ember_bin(), "rename", src, "same"], env=ember_env.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for src in ("a", "b")]
    codes = sorted(p.wait(60) for p in procs)
    assert codes == [0, 125]
    names = sorted(p["name"] for p in json.loads(ember_env.run("ps", "--json").stdout))
    assert names in (["a", "same"], ["b", "same"])


BAD = [
    (["--restart", "sometimes"], "invalid --restart 'sometimes'"),
    (["--restart", "always:3"], "only on-failure takes a retry count"),
    (["--restart", "on-failure:x"], "the retry count must be a number"),
    (["--restart", "always", "--rm"], "conflicting options: --restart always and --rm"),
    (["--cap-add", "FLY"], "invalid capability 'FLY'"),
    (["--dns", "dns.example"], "invalid --dns 'dns.example'"),
    (["--add-host", "db"], "invalid --add-host 'db'"),
    (["--hostname", "bad_host!"], "invalid --hostname"),
    (["--stop-signal", "SIGNOPE"], "invalid --stop-signal 'SIGNOPE'"),
    (["--stop-timeout", "-5"], "invalid --stop-timeout -5"),
    (["--health-cmd", "true", "--health-retries", "0"], "invalid --health-retries 0"),
    (["--health-cmd", "true", "--health-interval", "0"], "invalid --health-interval 0"),
    (["--pull", "sometimes"], "invalid --pull 'sometimes'"),
    (["--env-file", "/nonexistent/app.env"], "--env-file /nonexistent/app.env"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[a[0][0] + str(i) for i, a in
                                                      enumerate(BAD)])
def test_bad_values_are_one_line_and_leave_nothing(ember_env, image, args, message):
    proc = ember_env.run("run", "-d", *args, image, "true")
    assert proc.returncode == 125, proc
    assert proc.stderr.decode().startswith("ember: error: ")
    assert proc.stderr.count(b"\n") == 1 and message in proc.stderr.decode(), proc.stderr
    _nothing_left(ember_env)


def test_stats_wait_on_missing_and_dead(ember_env, image):
    ember_env.run("run", "-d", "--name", "dead", image, "true", check=True)
    assert ember_env.run("wait", "dead").stdout == b"0\n"
    for verb in (["top", "dead"], ["stats", "--no-stream", "dead"], ["wait", "nosuch"],
                 ["port", "nosuch"], ["top", "nosuch"]):
        proc = ember_env.run(*verb)
        assert proc.returncode == 125 and proc.stderr.count(b"\n") == 1, (verb, proc)


@pytest.mark.registry
def test_pull_policies_against_a_registry(ember_env, guest_assets):
    bb = busybox_layer()
    repo = f"ember-pull-test-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="ember-registry-") as tmp, \
            run_registry(Path(tmp)) as reg:
        ref = f"{reg.host}/{repo}:v1"

        def push(text: str) -> None:
            img = make_image([bb, layer([file("etc/motd", text + "\n")])],
                             cmd=["cat", "/etc/motd"])
            push_image(reg.host, repo, "v1", img)

        try:
            proc = ember_env.run("run", "--rm", "--pull", "never", ref)
            assert proc.returncode == 125 and b"--pull never" in proc.stderr
            assert proc.stderr.count(b"\n") == 1
            _nothing_left(ember_env)
            push("one")
            proc = ember_env.run("run", "--rm", ref)  # --pull missing: pulled now
            assert (proc.returncode, proc.stdout) == (0, b"one\n"), proc.stderr
            push("two")
            assert ember_env.run("run", "--rm", ref).stdout == b"one\n"  # local one used
            assert ember_env.run("run", "--rm", "--pull", "never", ref).stdout == b"one\n"
            proc = ember_env.run("run", "--rm", "--pull", "always", ref)
            assert (proc.returncode, proc.stdout) == (0, b"two\n"), proc.stderr
            proc = ember_env.run("run", "--rm", "--pull", "always", f"{reg.host}/{repo}:nope")
            assert proc.returncode == 125 and proc.stderr.count(b"\n") == 1
            _nothing_left(ember_env)
        finally:
            ember_env.run("image", "rm", ref)


def test_init_runs_tini_as_pid_1(ember_env, image):
    # PID 1 is the guest's static tini, bind-mounted (read-only root too), and the
    # exit code passes through.
    proc = ember_env.run("run", "--rm", "--init", "--read-only", image, "sh", "-c",
                         "tr '\\0' ' ' < /proc/1/cmdline; exit 5")
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout.startswith(b"/sbin/docker-init -- sh -c")
    # Orphans are reaped: the command becomes a process that never waits (sleep);
    # without --init the orphan stays a zombie under it, with --init tini reaps it.
    zombies = {}
    for name, flags in (("plain", []), ("inited", ["--init"])):
        ember_env.run("run", "-d", "--name", name, *flags, image, "sh", "-c",
                      "sh -c 'sleep 0.3 &'; exec sleep 60", check=True)
        time.sleep(2)
        ps = ember_env.run("exec", name, "ps", "-o", "stat").stdout.decode().split()
        zombies[name] = ps.count("Z")
    assert zombies == {"plain": 1, "inited": 0}
    # The stop signal reaches the program through tini (which waits in sigtimedwait:
    # the agent must not hold the signal as if PID 1 could not take it).
    ember_env.run("run", "-d", "--name", "tin", "--init", image, "sh", "-c",
                  "trap 'echo term; exit 9' TERM; echo up; while :; do sleep 0.2; done",
                  check=True)
    _until(lambda: b"up" in ember_env.run("logs", "tin").stdout)
    began = time.monotonic()
    ember_env.run("stop", "tin", check=True)
    assert time.monotonic() - began < 5
    assert ember_env.run("wait", "tin").stdout == b"9\n"
    assert ember_env.run("logs", "tin").stdout == b"up\nterm\n"


SIGWAIT_INIT = ("import signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "
                "sys.exit(8 if signal.sigtimedwait({signal.SIGTERM}, 60) else 1)")


def test_agent_sends_at_once_to_an_init_waiting_in_sigtimedwait():
    """tini's way (no handler; signals fetched with sigtimedwait, which unblocks them
    while it waits): the agent's signal holding must see it takes SIGTERM."""
    from ember.agent import signals

    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", sys.executable,
                             "-c", SIGWAIT_INIT])
    try:
        pid = _until(lambda: (c := psutil.Process(proc.pid).children()) and c[0].pid, 10, 0.01)
        _until(lambda: Path(f"/proc/{pid}/wchan").read_text().startswith("do_sigtimedwait"),
               10, 0.01)
        assert not signals.would_be_lost(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(10) == 8  # taken by sigtimedwait: not lost
    finally:
        proc.kill()
        proc.wait()
