"""End-to-end: `ember run` and friends on a real QEMU micro-VM (TCG).

The image is built in the test as an OCI layout tar (busybox-static) with its
own Env and WorkingDir, and imported with `ember image import`, as a user
would import an image built elsewhere.
"""

from __future__ import annotations

import json
import os
import platform
import pty
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ember_bin, qemu_pids

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(600)]

def test_run_prints_guest_kernel_and_passes_exit_codes(ember_env, image, guest_assets):
    proc = ember_env.run("run", "--rm", image, "uname", "-r")
    assert proc.returncode == 0, proc.stderr
    release = proc.stdout.decode().strip()
    assert release == guest_assets.kernel_release
    assert release != platform.release()

    proc = ember_env.run("run", "--rm", image, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert proc.returncode == 7
    assert proc.stdout == b"out\n"
    assert proc.stderr == b"err\n"

    proc = ember_env.run("run", "--rm", image)  # the image's own Cmd, Env, WorkingDir
    assert proc.stdout == b"default-cmd\n"
    proc = ember_env.run("run", "--rm", image, "sh", "-c", "echo $GREETING; pwd")
    assert proc.stdout.decode().split() == ["from-image", "/srv"]
    assert ember_env.run("ps", "-a", "-q").stdout.strip() == b""


def test_stdin_env_workdir_user(ember_env, image):
    proc = ember_env.run("run", "-i", "--rm", image, "cat", input=b"hi\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hi\n"

    proc = ember_env.run("run", "--rm", "-e", "FOO=bar", "-e", "GREETING=override", "-w", "/tmp",
                         "-u", "1000:1001", image,
                         "sh", "-c", "echo $FOO $GREETING; pwd; id -u; id -g; hostname")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().split("\n")
    assert lines[0] == "bar override"
    assert lines[1:4] == ["/tmp", "1000", "1001"]
    assert len(lines[4]) == 12  # hostname is the short sandbox id, as in Docker


def test_detached_lifecycle(ember_env, image):
    proc = ember_env.run("run", "-d", "--name", "web", image, "sh", "-c",
                         "echo started; trap 'echo bye; exit 3' TERM; while true; do sleep 1; done")
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.decode().strip()
    assert len(sid) == 64

    ps = json.loads(ember_env.run("ps", "--json", check=True).stdout)
    assert [(p["name"], p["status"]) for p in ps] == [("web", "running")]
    info = json.loads(ember_env.run("inspect", "web", check=True).stdout)[0]
    assert qemu_pids(f"ember-{sid[:12]}") == [info["vmm_pid"]]

    deadline = time.monotonic() + 30
    while b"started" not in ember_env.run("logs", "web").stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ember_env.run("logs", "web").stdout == b"started\n"

    proc = ember_env.run("exec", "web", "sh", "-c", "echo in-exec; exit 4")
    assert (proc.returncode, proc.stdout) == (4, b"in-exec\n")
    proc = ember_env.run("exec", "-i", "web", "cat", input=b"via exec stdin")
    assert proc.stdout == b"via exec stdin"

    proc = ember_env.run("kill", "-s", "TERM", "web")
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ps = json.loads(ember_env.run("ps", "-a", "--json", check=True).stdout)
        if ps[0]["status"] == "exited":
            break
        time.sleep(0.2)
    assert (ps[0]["status"], ps[0]["exit_code"]) == ("exited", 3)
    assert ember_env.run("logs", "web").stdout == b"started\nbye\n"
    assert not qemu_pids(f"ember-{sid[:12]}"), "the VM must stop when its container exits"
    assert ember_env.run("exec", "web", "true").returncode == 125

    proc = ember_env.run("image", "rm", image)
    assert proc.returncode == 125 and b"in use by sandbox web" in proc.stderr
    assert ember_env.run("rm", "web").returncode == 0
    assert ember_env.run("ps", "-a", "-q").stdout.strip() == b""
    assert not (ember_env.state_dir / "sandboxes" / sid).exists()


def test_errors_are_one_line_and_leave_nothing(ember_env, image):
    cases = [
        (("run", "--rm", "localhost/nope:1", "true"), 125, "image not found"),
        (("run", "--rm", "UPPER/Case::bad", "true"), 125, "invalid reference"),
        (("run", "--rm", image, "no-such-command"), 127, "no-such-command"),
        (("run", "--rm", image, "/etc/passwd"), 126, ""),
        (("run", "--rm", "-u", "alice", image, "true"), 125, "invalid user"),
        (("run", "--rm", "-m", "1k", image, "true"), 125, "too small"),
        (("exec", "nope", "true"), 125, "no such sandbox"),
    ]
    for args, code, words in cases:
        proc = ember_env.run(*args)
        err = proc.stderr.decode()
        assert proc.returncode == code, (args, proc.returncode, err)
        assert err.count("\n") == 1 and err.startswith("ember: error: "), (args, err)
        assert words in err.lower(), (args, err)
    assert ember_env.run("ps", "-a", "-q").stdout.strip() == b""
    assert not list((ember_env.state_dir / "sandboxes").glob("*/state.json"))


def test_state_survives_cli_crash_and_rm_f_cleans_dead_vmm(ember_env, image):
    cli = subprocess.Popen([ember_bin(), "run", "--name", "crashy", image, "sleep", "300"],
                           env=ember_env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ps = json.loads(ember_env.run("ps", "--json").stdout or b"[]")
        if ps and ps[0]["status"] == "running":
            break
        time.sleep(0.2)
    cli.kill()
    cli.wait()
    ps = json.loads(ember_env.run("ps", "--json", check=True).stdout)
    assert [(p["name"], p["status"]) for p in ps] == [("crashy", "running")]

    info = ps[0]
    os.kill(info["monitor_pid"], signal.SIGKILL)
    os.kill(info["vmm_pid"], signal.SIGKILL)
    time.sleep(0.5)
    ps = json.loads(ember_env.run("ps", "-a", "--json", check=True).stdout)
    assert ps[0]["status"] == "dead"
    assert ember_env.run("rm", "-f", "crashy").returncode == 0
    assert ember_env.run("ps", "-a", "-q").stdout.strip() == b""
    assert not any(ember_env.cfg().disks_dir.glob(info["id"]))


def test_signals_reach_the_container(ember_env, image):
    cli = subprocess.Popen(
        [ember_bin(), "run", "--rm", image, "sh", "-c",
         "trap 'echo got-term; exit 42' TERM; echo ready; while true; do sleep 1; done"],
        env=ember_env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert cli.stdout.readline() == b"ready\n"
    cli.send_signal(signal.SIGTERM)
    out, _ = cli.communicate(timeout=60)
    assert cli.returncode == 42
    assert out == b"got-term\n"


def test_tty_gives_a_real_terminal(ember_env, image):
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(ember_env.env)
        os.execvp(ember_bin(), [ember_bin(), "run", "--rm", "-t", "-i", image, "sh", "-c",
                                "tty; stty size; read x; echo got:$x"])
    out = b""
    deadline = time.monotonic() + 120
    while b"\n" not in out.split(b"/dev/pts", 1)[-1] and time.monotonic() < deadline:
        out += os.read(fd, 1024)
    os.write(fd, b"typed\r")
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert "/dev/pts/" in text
    assert "got:typed" in text
    assert os.waitstatus_to_exitcode(status) == 0


def test_python_api(ember_env, image, monkeypatch):
    import ember

    monkeypatch.setenv("EMBER_STATE_DIR", str(ember_env.state_dir))
    result = ember.run(image, ["sh", "-c", "cat; echo done >&2"], stdin=b"api-in")
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"api-in", b"done\n")
    sb = ember.Sandbox.create(image, ["sleep", "300"], name="api")
    try:
        res = sb.exec(["sh", "-c", "echo $GREETING"])
        assert (res.exit_code, res.stdout) == (0, b"from-image\n")
        assert ember.Sandbox.get("api").status == "running"
    finally:
        sb.remove(force=True)
    assert ember.Sandbox.list() == []


def test_stop_and_logs_follow(ember_env, image):
    proc = ember_env.run("run", "-d", "--name", "chatty", image, "sh", "-c",
                         "echo one; sleep 2; echo two >&2")
    assert proc.returncode == 0, proc.stderr
    follow = ember_env.run("logs", "-f", "chatty", timeout=60)  # returns when it exits
    assert (follow.stdout, follow.stderr) == (b"one\n", b"two\n")
    ps = json.loads(ember_env.run("ps", "-a", "--json", check=True).stdout)
    assert (ps[0]["status"], ps[0]["exit_code"]) == ("exited", 0)

    # PID 1 in its namespace ignores SIGTERM: stop falls back to SIGKILL after -t.
    ember_env.run("run", "-d", "--name", "stubborn", image, "sleep", "300", check=True)
    started = time.monotonic()
    assert ember_env.run("stop", "-t", "1", "stubborn").returncode == 0
    assert time.monotonic() - started < 30
    ps = {p["name"]: p for p in json.loads(ember_env.run("ps", "-a", "--json").stdout)}
    assert (ps["stubborn"]["status"], ps["stubborn"]["exit_code"]) == ("exited", 137)
    assert ember_env.run("rm", "chatty", "stubborn").returncode == 0


def test_oom_killed_container_is_reported(ember_env, image):
    proc = ember_env.run("run", "-d", "--name", "hog", "-m", "16m", image,
                         "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1")
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = json.loads(ember_env.run("inspect", "hog", check=True).stdout)[0]
        if info["status"] == "exited":
            break
        time.sleep(0.2)
    assert (info["exit_code"], info["oom_killed"]) == (137, True)
    assert b"OOM killed" in ember_env.run("ps", "-a").stdout
    assert ember_env.run("rm", "hog").returncode == 0


def test_detached_rm_removes_itself_after_exit(ember_env, image):
    proc = ember_env.run("run", "-d", "--rm", image, "sh", "-c", "sleep 1")
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 60
    while ember_env.run("ps", "-a", "-q").stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert ember_env.run("ps", "-a", "-q").stdout.strip() == b""


def test_vm_dying_under_a_running_container(ember_env, image):
    """QEMU killed from outside: the monitor records it, rm leaves nothing behind."""
    proc = ember_env.run("run", "-d", "--name", "doomed", image, "sleep", "300")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(ember_env.run("inspect", "doomed", check=True).stdout)[0]
    os.kill(info["vmm_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = json.loads(ember_env.run("inspect", "doomed", check=True).stdout)[0]
        if info["status"] == "dead":
            break
        time.sleep(0.2)
    assert info["status"] == "dead"
    assert "VMM exited unexpectedly" in info["error"]
    assert not qemu_pids(f"ember-{info['id'][:12]}")
    assert ember_env.run("exec", "doomed", "true").returncode == 125
    assert ember_env.run("rm", "doomed").returncode == 0
    if info.get("jail"):
        jail = Path(info["jail"]["chroot_base_dir"]) / "qemu-system-x86_64" / info["jail"]["id"]
        assert not jail.exists()
