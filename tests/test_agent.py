"""The guest agent on the host: real crun, real ext4 disks on loop devices.

The agent runs as a subprocess with --listen-unix, in its own mount namespace
(slave propagation, so host unmounts still reach it) where the host's hybrid
cgroup2 mount is hidden: crun refuses hybrid mode, the guest is pure v2 and
this host is v1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.errors import AgentError, CommandNotFound, CommandNotRunnable, NotFoundError
from ember.sandbox.agent_client import AgentClient

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not shutil.which("crun") or not os.path.exists("/bin/busybox"),
                       reason="needs crun and busybox-static"),
]

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="session")
def base_image(tmp_path_factory) -> Path:
    """An ext4 image of a busybox-static root filesystem, made without mounting."""
    d = tmp_path_factory.mktemp("busybox")
    root = d / "root"
    for sub in ("bin", "etc", "tmp", "proc", "sys", "dev", "home/user"):
        (root / sub).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], check=True, capture_output=True,
                             text=True).stdout.split()
    for name in applets:
        if name != "busybox":
            (root / "bin" / name).symlink_to("busybox")
    (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nuser:x:1000:\n")
    (root / "tmp").chmod(0o1777)
    img = d / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(root), str(img), "16M"], check=True,
                   capture_output=True)
    return img


@pytest.fixture(scope="session")
def base_spec(tmp_path_factory) -> dict:
    """crun's own default spec, made non-interactive."""
    d = tmp_path_factory.mktemp("spec")
    subprocess.run(["crun", "spec"], cwd=d, check=True)
    spec = json.loads((d / "config.json").read_text())
    spec["process"]["terminal"] = False
    return spec


def make_spec(base: dict, args: list[str], **process) -> dict:
    spec = json.loads(json.dumps(base))
    spec["process"]["args"] = args
    spec["process"].update(process)
    return spec


@pytest.fixture
def rootfs(base_image, tmp_path) -> dict:
    """A private copy of the image per test (two mounts of one ext4 would clash)."""
    img = tmp_path / "rootfs.ext4"
    shutil.copy(base_image, img)
    return {"kind": "path", "address": str(img)}


class Agent:
    def __init__(self, tmp: Path) -> None:
        self.base = tmp / "agent"
        self.sock = str(tmp / "agent.sock")
        cmd = ["unshare", "-m", "--propagation", "slave", "sh", "-c",
               'umount /sys/fs/cgroup/unified 2>/dev/null; exec "$@"', "sh",
               sys.executable, "-m", "ember.agent", "--listen-unix", self.sock,
               "--base-dir", str(self.base), "--disk-timeout", "0.5"]
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                     stderr=open(tmp / "agent.log", "wb"))
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == b"EMBER-AGENT-READY", (tmp / "agent.log").read_text()
        self.client = AgentClient.connect_unix(self.sock, timeout=5)

    def mounts(self) -> list[str]:
        with open(f"/proc/{self.proc.pid}/mountinfo") as f:
            return [line.split()[4] for line in f if str(self.base) in line]

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    a = Agent(tmp_path_factory.mktemp("agent"))
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def client(agent):
    """The agent's client; any container a test leaves is removed, then checked gone."""
    yield agent.client
    for p in agent.client.list_processes():
        agent.client.remove_container(p.container_id)
    assert agent.mounts() == []


def loop_devices(image: str) -> str:
    return subprocess.run(["losetup", "-j", image], capture_output=True, text=True).stdout


def run(client, cid, rootfs, spec, stdin=False) -> tuple[int, bytes, bytes]:
    client.create_container(cid, spec, rootfs, stdin=stdin)
    client.start_container(cid)
    status = client.wait_process(cid).exit_status
    out = b"".join(client.iter_output(cid))
    err = b"".join(client.iter_output(cid, stream="stderr"))
    return status, out, err


def test_echo_output_and_exit_code(client, agent, rootfs, base_spec):
    spec = make_spec(base_spec, ["sh", "-c", "echo hi; echo oops >&2; exit 3"])
    assert run(client, "echo", rootfs, spec) == (3, b"hi\n", b"oops\n")
    assert agent.mounts()  # still mounted until removed
    client.remove_container("echo")
    client.remove_container("echo")  # idempotent
    assert agent.mounts() == []
    assert not (agent.base / "containers" / "echo").exists()
    deadline = time.monotonic() + 5
    while loop_devices(rootfs["address"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loop_devices(rootfs["address"]) == ""


def test_create_with_start_is_one_call(client, agent, rootfs, base_spec):
    """CreateContainer(start=True) runs the process at once (crun run --detach):
    a process that exits before the call returns keeps its status and output,
    a second start is refused, and removal leaves nothing mounted."""
    spec = make_spec(base_spec, ["sh", "-c", "echo quick; echo err >&2; exit 5"])
    client.create_container("qs", spec, rootfs, start=True)
    assert client.wait_process("qs").exit_status == 5
    assert b"".join(client.iter_output("qs")) == b"quick\n"
    assert b"".join(client.iter_output("qs", stream="stderr")) == b"err\n"
    with pytest.raises(Exception, match="already started"):
        client.start_container("qs")
    client.remove_container("qs")
    assert agent.mounts() == []
    # A bad command fails the one call with the usual mapping, and cleans up.
    with pytest.raises(Exception, match="no-such-binary"):
        client.create_container("qb", make_spec(base_spec, ["/no-such-binary"]), rootfs,
                                start=True)
    assert agent.mounts() == []
    assert not (agent.base / "containers" / "qb").exists()


def test_environment_is_honoured(client, rootfs, base_spec):
    spec = make_spec(base_spec, ["sh", "-c", 'echo "$FOO"; pwd; id -u; id -g; hostname; ulimit -n'],
                     env=["PATH=/bin", "FOO=bar baz"], cwd="/home/user",
                     user={"uid": 1000, "gid": 1000},
                     rlimits=[{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 321}])
    spec["hostname"] = "boxy"
    status, out, _ = run(client, "env", rootfs, spec)
    assert status == 0
    assert out.decode().split("\n")[:6] == ["bar baz", "/home/user", "1000", "1000", "boxy", "321"]


def test_stdin_round_trip(client, rootfs, base_spec):
    client.create_container("cat", make_spec(base_spec, ["cat"]), rootfs, stdin=True)
    client.start_container("cat")
    assert client.write_stdin("cat", "", b"hello\n") == 6
    client.write_stdin("cat", "", b"world\n")
    client.close_stdin("cat")
    assert client.wait_process("cat").exit_status == 0
    assert b"".join(client.iter_output("cat")) == b"hello\nworld\n"


def test_signals_give_128_plus_signal(client, rootfs, base_spec):
    client.create_container("sig", make_spec(base_spec, ["sleep", "30"]), rootfs)
    client.start_container("sig")
    client.exec_process("sig", "e1", {"args": ["sleep", "30"], "cwd": "/", "env": ["PATH=/bin"]})
    client.signal_process("sig", "e1", signal.SIGTERM)
    r = client.wait_process("sig", "e1")
    assert (r.exit_status, r.signal) == (143, signal.SIGTERM)
    client.signal_process("sig", "", signal.SIGKILL)
    r = client.wait_process("sig")
    assert (r.exit_status, r.signal) == (137, signal.SIGKILL)
    assert abs(r.exited_at_ns - time.time_ns()) < 30e9
    with pytest.raises(NotFoundError, match="not running"):
        client.signal_process("sig", "", signal.SIGKILL)


def test_terminal_output_and_resize(client, rootfs, base_spec):
    spec = make_spec(base_spec, ["sh"], terminal=True, env=["PATH=/bin", "TERM=dumb"])
    client.create_container("tty", spec, rootfs, stdin=True)
    client.start_container("tty")
    client.tty_resize("tty", "", rows=33, cols=77)
    client.write_stdin("tty", "", b"tty; stty size; exit 4\n")
    assert client.wait_process("tty").exit_status == 4
    out = b"".join(client.iter_output("tty"))
    assert b"/dev/pts/0" in out and b"33 77\r\n" in out
    assert client.read_stderr("tty").eof  # one stream on a terminal


def test_exec_into_running_container(client, rootfs, base_spec):
    client.create_container("ex", make_spec(base_spec, ["sleep", "30"]), rootfs)
    client.start_container("ex")
    proc = {"args": ["sh", "-c", "echo from-exec; cat /proc/1/cmdline; exit 5"], "cwd": "/",
            "env": ["PATH=/bin"]}
    client.exec_process("ex", "e1", proc)
    assert client.wait_process("ex", "e1").exit_status == 5
    assert b"".join(client.iter_output("ex", "e1")) == b"from-exec\nsleep\x0030\x00"
    with pytest.raises(AgentError) as e:
        client.exec_process("ex", "e1", proc)
    assert e.value.code == 6
    with pytest.raises(CommandNotFound) as e:
        client.exec_process("ex", "e2", dict(proc, args=["nosuch"]))
    assert e.value.exit_code == 127
    with pytest.raises(CommandNotRunnable) as e:
        client.exec_process("ex", "e3", dict(proc, args=["/etc/passwd"]))
    assert e.value.exit_code == 126
    infos = {(p.container_id, p.exec_id): p for p in client.list_processes()}
    assert infos[("ex", "")].running and infos[("ex", "e1")].exit_status == 5
    assert ("ex", "e2") not in infos
    assert infos[("ex", "")].pid in client.list_pids("ex")


@pytest.mark.parametrize("args,err,code", [
    (["nosuch"], CommandNotFound, 127),
    (["/no/such/file"], CommandNotFound, 127),
    (["/etc/passwd"], CommandNotRunnable, 126),
])
def test_command_errors_map_to_exit_codes(client, agent, rootfs, base_spec, args, err, code):
    with pytest.raises(err) as e:
        client.create_container("bad", make_spec(base_spec, args), rootfs)
    assert e.value.exit_code == code and args[0] in e.value.message
    assert agent.mounts() == []  # nothing left behind
    assert not (agent.base / "containers" / "bad").exists()
    with pytest.raises(NotFoundError, match="bad"):
        client.wait_process("bad")


def test_bad_requests(client, agent, rootfs, base_spec, tmp_path):
    with pytest.raises(AgentError) as e:
        client.create_container("j", b"{not json", rootfs)
    assert e.value.code == 3 and "JSON" in e.value.message
    with pytest.raises(AgentError) as e:
        client.create_container("../x", make_spec(base_spec, ["true"]), rootfs)
    assert e.value.code == 3
    with pytest.raises(AgentError) as e:
        client.create_container("k", make_spec(base_spec, ["true"]),
                                {"kind": "floppy", "address": "a"})
    assert e.value.code == 3 and "floppy" in e.value.message
    with pytest.raises(NotFoundError, match="did not appear"):
        client.create_container("m", make_spec(base_spec, ["true"]),
                                {"kind": "path", "address": "/no/such/disk.img"})
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * (1 << 20))
    with pytest.raises(AgentError) as e:  # not an ext4 disk
        client.create_container("n", make_spec(base_spec, ["true"]),
                                {"kind": "path", "address": str(junk)})
    assert "mount" in e.value.message and loop_devices(str(junk)) == ""
    client.create_container("dup", make_spec(base_spec, ["true"]), rootfs)
    with pytest.raises(AgentError) as e:
        client.create_container("dup", make_spec(base_spec, ["true"]), rootfs)
    assert e.value.code == 6
    with pytest.raises(NotFoundError, match="nope"):
        client.read_stdout("dup", "nope")
    with pytest.raises(AgentError, match="stdin"):
        client.write_stdin("dup", "", b"x")
    client.remove_container("dup")
    assert agent.mounts() == [] and os.listdir(agent.base / "containers") == []


def test_stats_pause_update(client, rootfs, base_spec):
    spec = make_spec(base_spec, ["sh", "-c", "while true; do echo x; sleep 0.05; done"])
    client.create_container("st", spec, rootfs)
    client.start_container("st")
    time.sleep(0.2)
    st = client.stats_container("st")
    assert st.memory_usage > 0 and st.cpu_usage_ns > 0
    client.update_container("st", {"memory": {"limit": 64 << 20}})
    assert client.stats_container("st").memory_limit == 64 << 20
    client.pause_container("st")
    time.sleep(0.1)
    end = client.read_stdout("st", offset=1 << 40).offset
    time.sleep(0.4)
    assert client.read_stdout("st", offset=1 << 40).offset == end  # frozen: no output
    client.resume_container("st")
    assert client.read_stdout("st", offset=end, wait_ms=2000).data.startswith(b"x")
    client.remove_container("st", timeout_ms=100)


def test_guest_operations(client, tmp_path):
    d = client.wait_ready(5)
    assert d.cpus >= 1 and d.mem_total_bytes > 0 and d.crun_version.startswith("crun version")
    assert d.kernel_release == os.uname().release
    target = tmp_path / "a" / "b" / "f.txt"
    client.copy_file(str(target), b"one\n", mode=0o600, uid=1000, gid=1000, make_dirs=True)
    client.copy_file(str(target), b"two\n", append=True)
    st = target.stat()
    assert target.read_bytes() == b"one\ntwo\n"
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 1000, 1000)
    with pytest.raises(AgentError) as e:
        client.copy_file("relative/path", b"x")
    assert e.value.code == 3
    with pytest.raises(NotFoundError):
        client.copy_file(str(tmp_path / "missing" / "f"), b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    client.sync_guest(time_ns=0, entropy=os.urandom(64))


def test_destroy_sandbox_stops_agent(tmp_path, rootfs, base_spec):
    a = Agent(tmp_path)
    try:
        a.client.create_container("d", make_spec(base_spec, ["sleep", "30"]), rootfs)
        a.client.start_container("d")
        a.client.destroy_sandbox()
        assert a.proc.wait(10) == 0
        assert os.listdir(a.base / "containers") == []
    finally:
        a.stop()
    deadline = time.monotonic() + 5
    while loop_devices(rootfs["address"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loop_devices(rootfs["address"]) == ""


def test_stdin_close_is_not_stuck_behind_a_blocked_write(client, rootfs, base_spec):
    import threading

    client.create_container("nr", make_spec(base_spec, ["sleep", "30"]), rootfs, stdin=True)
    client.start_container("nr")
    errors = []

    def write():
        try:
            client.write_stdin("nr", "", b"x" * (1 << 20))  # nobody reads: fills the pipe
        except AgentError as e:
            errors.append(e)

    t = threading.Thread(target=write)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()
    start = time.monotonic()
    client.close_stdin("nr")
    t.join(5)
    assert not t.is_alive() and time.monotonic() - start < 2
    assert errors and "closed" in errors[0].message
    client.remove_container("nr")


def test_extra_disk_and_readonly_rootfs(client, agent, rootfs, base_image, base_spec, tmp_path):
    extra = tmp_path / "extra.ext4"
    shutil.copy(base_image, extra)
    spec = make_spec(base_spec, ["sh", "-c", "ls /home/etc/passwd; touch /home/new; touch /x"])
    spec["mounts"].append({"destination": "/home", "source": "ember-disk:0"})
    ro = dict(rootfs, readonly=True)
    client.create_container("xd", spec, ro, extra_disks=[{"kind": "path", "address": str(extra)}])
    client.start_container("xd")
    assert client.wait_process("xd").exit_status == 1  # the last touch fails
    assert b"".join(client.iter_output("xd")) == b"/home/etc/passwd\n"
    assert b"Read-only file system" in b"".join(client.iter_output("xd", stream="stderr"))
    assert len(agent.mounts()) == 2
    client.remove_container("xd")
    assert agent.mounts() == []
    out = subprocess.run(["debugfs", "-R", "ls -l /", str(extra)], capture_output=True, text=True)
    assert " new" in out.stdout  # written through to the extra disk


def test_signal_all_processes(client, rootfs, base_spec):
    client.create_container("all", make_spec(base_spec, ["sleep", "30"]), rootfs)
    client.start_container("all")
    client.exec_process("all", "e1", {"args": ["sleep", "30"], "cwd": "/", "env": ["PATH=/bin"]})
    client.signal_process("all", signal=signal.SIGKILL, all=True)
    assert client.wait_process("all", "e1").exit_status == 137
    assert client.wait_process("all").exit_status == 137


def test_output_is_drained_and_bounded(client, rootfs, base_spec):
    """Nobody reads while 12 MiB are written: the container does not block, the
    agent keeps the newest 8+ MiB, and a reader from 0 is told where data starts."""
    total = 12 << 20
    spec = make_spec(base_spec, ["sh", "-c", f"head -c {total} /dev/zero; echo end"])
    client.create_container("big", spec, rootfs)
    client.start_container("big")
    assert client.wait_process("big").exit_status == 0
    first = client.read_stdout("big", offset=0, max_bytes=16)
    assert 0 < first.offset <= total + 4 - (8 << 20)
    got = first.offset
    data = b""
    for chunk in client.iter_output("big", offset=first.offset):
        got += len(chunk)
        data = (data + chunk)[-4:]
    assert got == total + 4 and data == b"end\n"


def test_output_reader_ends_quietly_when_the_process_is_gone(client, rootfs, base_spec):
    """The output reader's policy against the real agent: a container removed while a
    reader waits on it ends the stream (End.GONE), after the bytes it had written."""
    from ember.sandbox.output import End

    client.create_container("gone", make_spec(base_spec, ["sh", "-c", "echo a; sleep 30"]),
                            rootfs)
    client.start_container("gone")
    reader = client.iter_output("gone", wait_ms=200)
    got = []
    for data in reader:
        got.append(data)
        client.remove_container("gone", timeout_ms=100)
    assert got == [b"a\n"] and reader.ended is End.GONE
