"""Docker's exec and terminal semantics (issue 15, points 6 and 7) on a real VM.

`ember exec` / `Sandbox.exec` start from the container's own environment,
working directory and user (flags override them); a terminal starts at the
caller's window size (no 0x0 race with a program that asks at once) and
follows SIGWINCH; `Sandbox.exec(stream=True)` yields output while the command
still runs.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import termios
import time

import pytest
from conftest import ember_bin

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(600)]


def _spawn_in_pty(env: dict, argv: list[str], rows: int, cols: int) -> tuple[int, int]:
    """Run argv on a new pty of rows x cols; (pid, master fd)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(env)
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.execvp(argv[0], argv)
    return pid, fd


def _read_until(fd: int, needle: bytes, timeout: float = 120) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out and time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out


def _finish(pid: int, fd: int) -> tuple[bytes, int]:
    out = _read_until(fd, b"\0never\0", 60)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return out, os.waitstatus_to_exitcode(status)


def test_exec_inherits_env_cwd_user_and_flags_override(ember_env, image):
    proc = ember_env.run("run", "-d", "--name", "ex", "-e", "MODE=prod", "-w", "/tmp",
                         "-u", "1000:100", image, "sleep", "600")
    assert proc.returncode == 0, proc.stderr
    out = ember_env.run("exec", "ex", "sh", "-c", "echo $MODE $GREETING; pwd; id -u; id -g")
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split("\n")[:4] == ["prod from-image", "/tmp", "1000", "100"]

    out = ember_env.run("exec", "-e", "MODE=dev", "-w", "/", "-u", "0:0", "ex",
                        "sh", "-c", "echo $MODE $GREETING; pwd; id -u")
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split("\n")[:3] == ["dev from-image", "/", "0"]

    # A relative working directory is one line of error, nothing started.
    bad = ember_env.run("exec", "-w", "tmp", "ex", "true")
    assert bad.returncode == 125
    assert bad.stderr.decode().count("\n") == 1 and "working directory" in bad.stderr.decode()
    assert ember_env.run("rm", "-f", "ex").returncode == 0


@pytest.mark.parametrize("how", ["run", "exec"])
def test_tty_starts_at_the_callers_size_and_follows_resizes(ember_env, image, how):
    script = "stty size; echo ready; read x; stty size; echo got:$x"
    if how == "run":
        argv = [ember_bin(), "run", "--rm", "-it", image, "sh", "-c", script]
    else:
        assert ember_env.run("run", "-d", "--name", "tt", image, "sleep", "600").returncode == 0
        argv = [ember_bin(), "exec", "-it", "tt", "sh", "-c", script]
    pid, fd = _spawn_in_pty(ember_env.env, argv, 33, 101)
    first = _read_until(fd, b"ready")
    assert b"33 101" in first, first  # at once: no 0x0 before the first resize
    # The kernel signals SIGWINCH to the CLI (the pty's foreground group); the
    # CLI passes the new size on to the container's terminal.
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 41, 123, 0, 0))
    time.sleep(3)
    os.write(fd, b"go\r")
    out, code = _finish(pid, fd)
    assert code == 0, out
    assert b"41 123" in out and b"got:go" in out, out


def test_api_exec_defaults_and_stream(ember_env, image, monkeypatch):
    import ember

    monkeypatch.setenv("EMBER_STATE_DIR", str(ember_env.state_dir))
    sb = ember.Sandbox.create(image, ["sleep", "600"], env=["MODE=api"], workdir="/tmp",
                              user="1000:100")
    try:
        res = sb.exec(["sh", "-c", "echo $MODE; pwd; id -u"])
        assert res.stdout.decode().split() == ["api", "/tmp", "1000"]
        res = sb.exec(["sh", "-c", "echo $MODE; pwd; id -u"], env=["MODE=x"], workdir="/",
                      user="0")
        assert res.stdout.decode().split() == ["x", "/", "0"]

        # stream=True: the first line arrives while the command still runs.
        started = time.monotonic()
        stream = sb.exec(["sh", "-c", "echo one; echo err >&2; sleep 5; echo two; exit 3"],
                         stream=True)
        seen: list[tuple[str, bytes, float]] = []
        for name, data in stream:
            seen.append((name, data, time.monotonic() - started))
        assert stream.exit_code == 3
        out = b"".join(d for n, d, _ in seen if n == "stdout")
        assert out == b"one\ntwo\n"
        assert b"".join(d for n, d, _ in seen if n == "stderr") == b"err\n"
        first_at = next(t for n, d, t in seen if d.startswith(b"one"))
        last_at = next(t for n, d, t in seen if b"two" in d)
        assert last_at - first_at >= 4, seen  # "one" came before the sleep ended

        with_stdin = sb.exec(["cat"], stdin=b"fed", stream=True)
        assert list(with_stdin) == [("stdout", b"fed")]
        assert with_stdin.wait() == 0
    finally:
        sb.remove(force=True)


def test_exec_output_ends_with_the_sandbox_death(ember_env, image, monkeypatch):
    """QEMU killed under two running execs: the output readers end (the agent connection
    closes), and neither passes that for the end of the command. `exec(stream=True)`
    raises the sandbox's death after the output it had; `ember exec` prints what it got,
    then a one-line error, exit 125."""
    import signal
    import subprocess

    import ember

    monkeypatch.setenv("EMBER_STATE_DIR", str(ember_env.state_dir))
    sb = ember.Sandbox.create(image, ["sleep", "600"])
    try:
        cli = subprocess.Popen([ember_bin(), "exec", sb.id, "sh", "-c", "echo cli; sleep 600"],
                               env=ember_env.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        stream = iter(sb.exec(["sh", "-c", "echo one; sleep 600"], stream=True))
        assert next(stream) == ("stdout", b"one\n")
        assert cli.stdout is not None and cli.stdout.readline() == b"cli\n"
        os.kill(sb.inspect()["vmm_pid"], signal.SIGKILL)
        with pytest.raises(ember.EmberError, match=f"sandbox {sb.name} is dead"):
            for item in stream:
                raise AssertionError(f"output after the VM died: {item}")
        _, err = cli.communicate(timeout=60)
        assert cli.returncode == 125, err
        assert err.decode().count("\n") == 1 and "is dead" in err.decode(), err
    finally:
        sb.remove(force=True)
