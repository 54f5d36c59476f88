"""ember.sandbox.forkserver: sandbox monitors forked from one warm process.

A forked monitor must be indistinguishable from an exec'd one where a user or
Ember's own clean-up looks (its command line, exit status, output, the
descriptors it holds), share the server's memory, and the server must leave
nothing behind: it goes when idle, with its socket, and a dead or refusing
server only means the monitor is exec'd.
"""

from __future__ import annotations

import json
import os
import resource
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

from ember import proctitle
from ember.sandbox import forkserver

NO_SUCH = "0" * 64


def _servers(state: Path) -> list[psutil.Process]:
    """Fork servers started for this state folder (their first environment says so)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if (p.info["cmdline"] or [])[1:] == ["-P", "-m", "ember.sandbox.forkserver"] and \
                    p.environ().get("EMBER_STATE_DIR") == str(state):
                found.append(p)
        except (psutil.Error, IndexError):
            continue
    return found


def _ended(p: psutil.Process) -> bool:
    """Gone, or a zombie (a server this test process started is its child)."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    return check()


@pytest.fixture
def state():
    # Unix socket paths are short: not under pytest's tmp_path.
    path = Path(tempfile.mkdtemp(prefix="emb-fs-", dir="/tmp"))
    try:
        yield path
    finally:
        for p in _servers(path):
            p.kill()
        subprocess.run(["rm", "-rf", str(path)], check=False)


def _env(state: Path, idle: str = "1") -> dict[str, str]:
    return dict(os.environ, EMBER_STATE_DIR=str(state), EMBER_FORKSERVER_IDLE=idle)


def _monitor_argv(ready_w: int) -> list[str]:
    return [sys.executable, "-P", "-m", "ember.sandbox.monitor", "--id", NO_SUCH,
            "--ready-fd", str(ready_w)]


def _spawn(state: Path, env: dict[str, str]) -> tuple[forkserver.Spawned | None, int, Path]:
    ready_r, ready_w = os.pipe()
    log = state / "monitor.log"
    try:
        with open(log, "ab") as out:
            child = forkserver.spawn(state, _monitor_argv(ready_w), env, out.fileno(),
                                     (ready_w,))
    finally:
        os.close(ready_w)
    return child, ready_r, log


def test_a_forked_monitor_ends_as_an_execd_one_would(state):
    """Same exit status and output as `python -m ember.sandbox.monitor` for a sandbox
    that does not exist, and the ready pipe sees its end: nothing else holds it."""
    child, ready_r, log = _spawn(state, _env(state))
    assert child is not None, "the fork server did not start"
    try:
        assert child.wait(60) == 1
        assert os.read(ready_r, 100) == b""
    finally:
        os.close(ready_r)
    assert f"NotFoundError: no such sandbox: {NO_SUCH}" in log.read_text()
    execd = subprocess.run(_monitor_argv(1), env=_env(state), capture_output=True, text=True,
                           timeout=60, check=False)
    assert execd.returncode == 1 and "NotFoundError: no such sandbox" in execd.stderr


def test_the_server_leaves_when_idle_and_takes_its_socket(state):
    child, ready_r, _ = _spawn(state, _env(state, idle="1"))
    os.close(ready_r)
    assert child is not None and child.wait(60) == 1
    sock = forkserver.socket_path(state)
    assert _wait(lambda: not sock.exists() and not _servers(state)), \
        f"server still there: {sock.exists()}, {_servers(state)}"
    assert sorted(os.listdir(state)) == ["monitor.log"]  # no lock or temp file either


def test_a_killed_server_is_replaced(state):
    child, ready_r, _ = _spawn(state, _env(state, idle="30"))
    os.close(ready_r)
    assert child is not None and child.wait(60) == 1
    first = _servers(state)
    assert len(first) == 1
    first[0].send_signal(signal.SIGKILL)
    first[0].wait(10)
    assert forkserver.socket_path(state).exists()  # stale: nobody answers it
    child, ready_r, _ = _spawn(state, _env(state, idle="30"))
    os.close(ready_r)
    assert child is not None and child.wait(60) == 1
    second = _servers(state)
    assert len(second) == 1 and second[0].pid != first[0].pid


def test_a_server_whose_code_changed_refuses_and_leaves(state):
    """A module it loaded changed on disk (an upgrade): the next request is refused
    (the spawner execs), the server gives up its socket and goes, and the request
    after that gets a new server."""
    import ember.errors

    child, ready_r, _ = _spawn(state, _env(state, idle="30"))
    os.close(ready_r)
    assert child is not None and child.wait(60) == 1
    first = _servers(state)
    assert len(first) == 1
    module = Path(ember.errors.__file__)
    before = module.stat()
    try:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        child, ready_r, _ = _spawn(state, _env(state, idle="30"))
        os.close(ready_r)
        assert child is None
        assert _wait(lambda: not forkserver.socket_path(state).exists()
                     and _ended(first[0]))
    finally:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    child, ready_r, _ = _spawn(state, _env(state, idle="1"))
    os.close(ready_r)
    assert child is not None and child.wait(60) == 1
    assert [p.pid for p in _servers(state)] != [first[0].pid]


def test_off_means_exec(state, monkeypatch):
    monkeypatch.setenv("EMBER_FORKSERVER", "0")
    child, ready_r, _ = _spawn(state, _env(state))
    os.close(ready_r)
    assert child is None and not _servers(state)


def test_only_monitors_are_served(state):
    """Anything but `python -m ember.sandbox.monitor` is refused before a server starts."""
    out = os.open(os.devnull, os.O_WRONLY)
    try:
        assert forkserver.spawn(state, [sys.executable, "-c", "print(1)"], _env(state),
                                out, ()) is None
        assert forkserver.spawn(state, [sys.executable, "-m", "http.server"], _env(state),
                                out, ()) is None
    finally:
        os.close(out)
    assert not _servers(state)


@pytest.mark.root
def test_other_users_cannot_reach_the_server(state):
    child, ready_r, _ = _spawn(state, _env(state, idle="30"))
    os.close(ready_r)
    assert child is not None and child.wait(60) == 1
    sock = forkserver.socket_path(state)
    assert sock.stat().st_mode & 0o777 == 0o600
    os.chmod(state, 0o755)  # let the other user get as far as the socket itself
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setresuid(65534, 65534, 65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(str(sock))
            code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1


def test_a_stale_server_is_noticed(tmp_path):
    """A module the server loaded changed on disk: it would fork old code."""
    mod = tmp_path / "m.py"
    mod.write_text("x = 1\n")
    a, b = socket.socketpair()
    try:
        server = forkserver.Server(a, str(tmp_path / "none.sock"))
        server.loaded = {str(mod): mod.stat().st_mtime}
        assert not server.stale()
        os.utime(mod, (1, 1))
        assert server.stale()
        mod.unlink()
        assert server.stale()
    finally:
        a.close()
        b.close()


def test_a_hard_limit_above_the_servers_is_left_to_an_exec():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert forkserver._can_set({"RLIMIT_NOFILE": [soft, hard]})
    assert forkserver._can_set({"RLIMIT_NOFILE": [min(soft, 64), 64]})
    if hard != resource.RLIM_INFINITY:
        assert not forkserver._can_set({"RLIMIT_NOFILE": [soft, hard + 1]})
        assert not forkserver._can_set({"RLIMIT_NOFILE": [soft, resource.RLIM_INFINITY]})


SHOW = r"""
import os, psutil
from conftest import ember_bin

from ember import proctitle
try:
    proctitle.set_cmdline(os.environ["WANT"].split("|"))
except ValueError as e:
    print("ERR", e)
print(psutil.Process().cmdline())
"""


@pytest.mark.parametrize("wanted, shown", [
    ("python3|-m|ember.sandbox.monitor|--id|abc", "['python3', '-m', 'ember.sandbox.monitor', "
                                                  "'--id', 'abc']"),
    ("has space|x", "ERR a command line to show cannot hold"),
    ("x" * (4 * proctitle.ROOM), "ERR a command line of"),  # more than it was given
])
def test_a_command_line_shows_as_given_or_is_refused(wanted, shown):
    out = subprocess.run([sys.executable, "-c", SHOW, "-" * proctitle.ROOM],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path),
                                  WANT=wanted)).stdout
    assert out.startswith(shown), out


def _monitor_of(sid: str) -> psutil.Process:
    found = [p for p in psutil.process_iter(["cmdline"])
             if (p.info["cmdline"] or [])[1:6] == ["-P", "-m", "ember.sandbox.monitor", "--id",
                                                   sid]]
    assert len(found) == 1, found
    return found[0]


def _shared_dirty_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Shared_Dirty:"))


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(600)
def test_sandbox_monitors_come_from_the_server_and_share_its_memory(ember_env, image):
    """Two sandboxes: both monitors are the server's children, show the command line
    an exec'd monitor has, have their CLI's folder, umask and open-file limit
    (027 and 777: the jailer once needed 022 and room for descriptor 1000), and
    share pages with it; with the server off, the monitor is exec'd and the
    sandbox works the same."""
    ember_env.env["EMBER_FORKSERVER_IDLE"] = "1"
    cwd = ember_env.state_dir / "here"
    cwd.mkdir()
    # A module left in the CLI's folder is never imported by a root monitor (python -P).
    planted = ember_env.state_dir / "planted-ran"
    (cwd / "argparse.py").write_text(f"open({str(planted)!r}, 'w').close()\n")
    soft_files = 777

    def spawner_setup() -> None:  # what an exec'd monitor would inherit from its CLI
        os.umask(0o027)
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (soft_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    def run_detached() -> str:
        run = subprocess.run([ember_bin(), "run", "-d", image, "sleep", "600"], cwd=cwd,
                             env=ember_env.env, preexec_fn=spawner_setup, capture_output=True,
                             timeout=240, check=False)
        assert run.returncode == 0, run.stderr
        return run.stdout.decode().strip()

    sids = [run_detached() for _ in range(2)]
    servers = _servers(ember_env.state_dir)
    assert len(servers) == 1, servers
    for sid in sids:
        monitor = _monitor_of(sid)
        assert monitor.ppid() == servers[0].pid
        argv = monitor.cmdline()
        assert Path(argv[0]).resolve() == Path(sys.executable).resolve(), argv
        assert argv[6] == "--ready-fd", argv
        assert _shared_dirty_kib(monitor.pid) > 2048  # the server's modules, not copies
        assert monitor.cwd() == str(cwd)
        assert monitor.rlimit(psutil.RLIMIT_NOFILE)[0] == soft_files
        with open(f"/proc/{monitor.pid}/status") as f:
            assert "Umask:\t0027\n" in f.read()
        assert ember_env.run("exec", sid, "echo", "hi", check=True).stdout == b"hi\n"
    ember_env.run("rm", "-f", *sids, check=True)
    assert _wait(lambda: not _servers(ember_env.state_dir)), "the server did not leave"

    ember_env.env["EMBER_FORKSERVER"] = "0"
    sid = run_detached()  # the same umask and limits work when exec'd (the jailer's too)
    monitor = _monitor_of(sid)
    assert monitor.cwd() == str(cwd) and monitor.rlimit(psutil.RLIMIT_NOFILE)[0] == soft_files
    assert not _servers(ember_env.state_dir)
    assert ember_env.run("exec", sid, "echo", "hi", check=True).stdout == b"hi\n"
    ember_env.run("rm", "-f", sid, check=True)
    assert not forkserver.socket_path(ember_env.state_dir).exists()
    assert not planted.exists()


def test_a_pods_shim_is_forked_too(state, monkeypatch):
    """`containerd-shim-ember-v2 start` has the fork server fork the pod's shim: it
    serves, shows its exec'd command line and, shut down, leaves with the server."""
    from test_shim import TASK, pb, start_shim

    monkeypatch.setenv("EMBER_FORKSERVER_IDLE", "1")
    bundle = state / "bundle"
    bundle.mkdir()
    address, client = start_shim(bundle, state)
    pod = Path(address.removeprefix("unix://")).parent
    with client:
        shim = psutil.Process(int(json.loads((pod / "pod.json").read_text())["shim_pid"]))
        assert shim.ppid() in [p.pid for p in _servers(state)]
        argv = shim.cmdline()
        assert argv[1:4] == ["-P", "-m", "ember.shim.main"] and "serve" in argv, argv
        assert shim.cwd() == str(pod)
        client.call(TASK, "Shutdown", pb.ShutdownRequest(id="c1"), timeout=10)
    assert _wait(lambda: not pod.exists() and not _servers(state)), "shim or server stayed"
