"""containerd-shim-ember-v2 under a real containerd 1.6, driven with `ctr`.

Each test boots one micro-VM (a few seconds under TCG with a VM template), so
several checks share one container where they can.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from google.protobuf import any_pb2
from shimtools import (
    BUSYBOX,
    RUNTIME,
    kill_all,
    leftovers,
    new_workdir,
    private_containerd,
    remove_workdir,
    shims,
    vmms,
)

from ember.shim.proto import task_pb2
from ember.ttrpc import Client, Code, TTRPCError

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.containerd,
              pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ctrd(guest_assets):
    with private_containerd() as env:
        yield env


def wait_until(cond, timeout: float = 60, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def task_status(c, cid: str) -> str:
    for line in c.ctr("task", "ls").stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return parts[-1]
    return ""


def assert_clean(c, work: Path) -> None:
    assert wait_until(lambda: not leftovers(work), 30), leftovers(work)


class Events:
    """`ctr events` in the background: the topics containerd received, per container."""

    def __init__(self, c) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(["ctr", "--address", c.address, "events"],
                                     stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(0.3)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def topics(self, cid: str) -> list[str]:
        out = []
        for line in self.lines:
            f = line.split(None, 6)
            if len(f) == 7 and f[5].startswith("/tasks/") and f'"{cid}"' in f[6]:
                out.append(f[5])
        return out

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_ctr_run_rm_prints_guest_kernel_and_passes_exit_code(ctrd, guest_assets) -> None:
    c, work = ctrd
    res = c.ctr("run", "--rm", "--runtime", RUNTIME, BUSYBOX, "t-run", "sh", "-c",
                "uname -r; cat; echo to-stderr >&2; exit 7", input=b"from-stdin\n", check=False)
    assert res.returncode == 7, res.stderr
    release, piped = res.stdout.split()
    assert release == guest_assets.kernel_release and piped == "from-stdin"
    assert release != os.uname().release
    assert "to-stderr" in res.stderr
    assert_clean(c, work)


def test_ctr_task_exec_ps_metrics_pause_resume_kill(ctrd) -> None:
    c, work = ctrd
    ev = Events(c)
    cid = "t-life"
    try:
        c.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX, cid, "sh", "-c", "sleep 1000")
        assert task_status(c, cid) == "RUNNING"
        # What containerd reads from the bundle: the shim's address (a real unix:// path).
        bundle = Path(c.dir) / "state" / "io.containerd.runtime.v2.task" / c.namespace / cid
        address = (bundle / "address").read_text()
        assert address.startswith("unix:///") and Path(address[7:]).exists()
        assert Path(json.loads((bundle / "ember-shim.json").read_text())["pod_dir"]).is_dir()

        ex = c.ctr("task", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo hi-$((6*7)); exit 3",
                   check=False)
        assert ex.returncode == 3 and ex.stdout.strip() == "hi-42", ex
        bad = c.ctr("task", "exec", "--exec-id", "e2", cid, "/no/such/binary", check=False)
        assert bad.returncode != 0 and "no/such/binary" in bad.stderr

        ps = c.ctr("task", "ps", cid).stdout.split()
        assert any(tok.isdigit() for tok in ps), ps
        metrics = c.ctr("task", "metrics", cid).stdout
        assert "memory.usage_in_bytes" in metrics and "pids.current" in metrics, metrics

        # Update (ctr 1.6 has no command for it: ask the shim as containerd would).
        res_any = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/"
                              "LinuxResources",
                              value=json.dumps({"memory": {"limit": 100 << 20}}).encode())
        with Client.connect_unix(address[7:]) as shim:
            shim.call("containerd.task.v2.Task", "Update",
                      task_pb2.UpdateTaskRequest(id=cid, resources=res_any), timeout=30)
            with pytest.raises(TTRPCError) as err:
                shim.call("containerd.task.v2.Task", "Update", task_pb2.UpdateTaskRequest(
                    id=cid, resources=any_pb2.Any(value=b"[1]")), timeout=30)
            assert err.value.code == Code.INVALID_ARGUMENT
        limit = [ln.split()[-1] for ln in c.ctr("task", "metrics", cid).stdout.splitlines()
                 if ln.startswith("memory.limit_in_bytes")]
        assert limit == [str(100 << 20)], limit

        c.ctr("task", "pause", cid)
        assert task_status(c, cid) == "PAUSED"
        c.ctr("task", "resume", cid)
        assert task_status(c, cid) == "RUNNING"
        again = c.ctr("task", "exec", "--exec-id", "e3", cid, "echo", "after-resume")
        assert again.stdout.strip() == "after-resume"

        c.ctr("task", "kill", "--all", "-s", "SIGKILL", cid)
        assert wait_until(lambda: task_status(c, cid) == "STOPPED", 30)
        twice = c.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        # As runc's shim answers: the process is already gone (NotFound).
        assert twice.returncode != 0 and "already finished: not found" in twice.stderr, twice
        assert c.ctr("task", "exec", "--exec-id", "e4", cid, "true", check=False).returncode != 0

        c.ctr("task", "delete", cid)
        c.ctr("container", "rm", cid)
        wait_until(lambda: "/tasks/delete" in ev.topics(cid), 10)
    finally:
        ev.stop()
        c.ctr("task", "delete", "-f", cid, check=False)
        c.ctr("container", "rm", cid, check=False)
    topics = ev.topics(cid)
    expected = ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
                "/tasks/exit", "/tasks/exec-added", "/tasks/paused", "/tasks/resumed",
                "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit", "/tasks/exit",
                "/tasks/delete"]
    filtered = [t for t in topics if t in expected]
    assert filtered[:2] == expected[:2] and filtered[-2:] == ["/tasks/exit", "/tasks/delete"], topics
    assert topics.index("/tasks/paused") < topics.index("/tasks/resumed")
    assert_clean(c, work)


class PtyCtr:
    """A `ctr` command on a pseudo-terminal, as a user at a terminal runs it."""

    def __init__(self, c, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(["ctr", "--address", c.address, "--namespace",
                                      c.namespace, *args], stdin=slave, stdout=slave,
                                     stderr=slave, start_new_session=True)
        os.close(slave)
        self.seen = b""

    def read_until(self, marker: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while marker not in self.seen and time.monotonic() < deadline:
            r, _, _ = select.select([self.master], [], [], 0.2)
            if r:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:
                    break
        return marker in self.seen

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def test_ctr_run_tty_gives_a_working_shell(ctrd) -> None:
    c, work = ctrd
    shell = PtyCtr(c, "run", "-t", "--rm", "--runtime", RUNTIME, BUSYBOX, "t-tty", "sh")
    try:
        # The shell's prompt shows once the VM is up; then it answers like a terminal.
        assert shell.read_until(b"#", 240), shell.seen
        shell.type(b"test -t 0 && echo tty-$((6*7))\n")
        assert shell.read_until(b"tty-42", 30), shell.seen
        # A second terminal into the same container: `ctr task exec -t`.
        ex = PtyCtr(c, "task", "exec", "-t", "--exec-id", "x1", "t-tty", "sh", "-c",
                    "test -t 1 && echo exec-tty-$((7*6)); exit 2")
        try:
            assert ex.read_until(b"exec-tty-42", 60), ex.seen
            assert ex.proc.wait(30) == 2
        finally:
            ex.close()
        shell.type(b"exit 5\n")
        assert shell.proc.wait(60) == 5
    finally:
        shell.close()
    assert_clean(c, work)


def test_shim_sigkill_then_containerd_delete_cleans_up(ctrd) -> None:
    c, work = ctrd
    cid = "t-crash"
    c.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX, cid, "sleep", "1000")
    try:
        shim, qemus = shims(work), vmms(work)
        assert len(shim) == 1 and len(qemus) == 1
        os.kill(shim[0].pid, signal.SIGKILL)
        # containerd sees the connection drop and runs `containerd-shim-ember-v2 delete`.
        assert wait_until(lambda: not psutil.pid_exists(qemus[0].pid)
                          or qemus[0].status() == psutil.STATUS_ZOMBIE, 60)
        assert wait_until(lambda: task_status(c, cid) in ("", "STOPPED", "UNKNOWN"), 30)
        c.ctr("task", "delete", cid, check=False)
        c.ctr("container", "rm", cid)
    finally:
        c.ctr("task", "delete", "-f", cid, check=False)
        c.ctr("container", "rm", cid, check=False)
    assert_clean(c, work)
    # containerd itself is fine: it starts the next shim at once.
    res = c.ctr("run", "--rm", "--runtime", RUNTIME, BUSYBOX, "t-after", "echo", "alive")
    assert res.stdout.strip() == "alive"
    assert_clean(c, work)


def test_block_snapshotter_rootfs_is_attached_in_place(guest_assets) -> None:
    """With ember-snapshotter the container's writes land in its snapshot image itself."""
    from ember_testing.containerd import ContainerdInstance, proxy_snapshotter
    from ember_testing.mounts import loops_under
    from ember_testing.oci import build_oci_archive, busybox_layer
    from ember_testing.snapshotter import SnapshotterProcess
    from shimtools import ember_config_file, shim_env

    work = new_workdir()
    sn = SnapshotterProcess(work / "sn", pool_size="2g", image_size="256m")
    c = None
    try:
        (work / "st").mkdir()
        # Jailed (the default): the snapshotter's pool is another file system, so the
        # jailed QEMU gets the snapshot image as a descriptor rather than a hard link.
        env = {**shim_env(work / "st"),
               "EMBER_CONFIG": str(ember_config_file(work, work / "st", jailer=True))}
        c = ContainerdInstance(work / "ctrd", proxy_snapshotter("ember", sn.address), env=env)
        tar = build_oci_archive(work / "bb.tar", BUSYBOX, [busybox_layer()])
        c.ctr("images", "import", "--snapshotter", "ember", str(tar))
        cid = "t-block"
        res = c.ctr("run", "--snapshotter", "ember", "--runtime", RUNTIME, BUSYBOX, cid,
                    "sh", "-c", "echo written-in-vm > /proof; cat /etc/os-release")
        assert "ember-test" in res.stdout
        mount = c.ctr("snapshots", "--snapshotter", "ember", "mounts", "/mnt", cid).stdout
        image = next(tok for tok in mount.split() if tok.endswith(".ext4"))
        seen = subprocess.run(["debugfs", "-R", "cat /proof", image], capture_output=True)
        assert seen.stdout == b"written-in-vm\n", seen
        c.ctr("container", "rm", cid)

        def ours() -> list[str]:  # the snapshotter's own pool (a loop-mounted XFS) stays
            return [x for x in leftovers(work) if str(work / "sn") not in x
                    and x not in {f"loop {d}" for d in loops_under(work / "sn")}]
        assert wait_until(lambda: not ours(), 30), ours()
    finally:
        if c is not None:
            c.stop()
        sn.close()
        kill_all(work)
        remove_workdir(work)


def test_vm_dying_under_a_task_reports_its_exit(ctrd) -> None:
    """QEMU killed from outside: the task exits (255), delete still cleans up."""
    c, work = ctrd
    cid = "t-vmdie"
    c.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX, cid, "sleep", "1000")
    try:
        (qemu,) = vmms(work)
        qemu.kill()
        assert wait_until(lambda: task_status(c, cid) == "STOPPED", 30)
        gone = c.ctr("task", "delete", cid)
        assert "exit code 255" in gone.stderr, gone.stderr
        c.ctr("container", "rm", cid)
    finally:
        c.ctr("task", "delete", "-f", cid, check=False)
        c.ctr("container", "rm", cid, check=False)
    assert_clean(c, work)


def test_oom_kill_is_reported_before_the_exit(ctrd) -> None:
    """A container over its memory limit: exit 137, and /tasks/oom precedes /tasks/exit."""
    c, work = ctrd
    events = Events(c)
    try:
        res = c.ctr("run", "--rm", "--runtime", RUNTIME, "--memory-limit", str(16 << 20),
                    BUSYBOX, "t-oom", "busybox", "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1",
                    check=False)
        assert res.returncode == 137, (res.returncode, res.stderr)
        assert wait_until(lambda: "/tasks/delete" in events.topics("t-oom"), 30)
        topics = events.topics("t-oom")
        assert "/tasks/oom" in topics, topics
        assert topics.index("/tasks/oom") < topics.index("/tasks/exit"), topics
    finally:
        events.stop()
    assert_clean(c, work)



def _shim_log_of(c, cid: str) -> str:
    bundle = Path(c.dir) / "state" / "io.containerd.runtime.v2.task" / c.namespace / cid
    pod = Path(json.loads((bundle / "ember-shim.json").read_text())["pod_dir"])
    return (pod / "shim.log").read_text()


def _remove(c, cid: str) -> None:
    c.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
    wait_until(lambda: task_status(c, cid) in ("STOPPED", ""), 60)
    c.ctr("task", "delete", cid, check=False)
    c.ctr("container", "delete", cid, check=False)


def test_ember_trace_times_a_pods_phases_in_its_shim_log(guest_assets, monkeypatch) -> None:
    """EMBER_TRACE=1 in containerd's environment: the shim writes when each phase
    of the pod's start ran to shim.log, in order."""
    monkeypatch.setenv("EMBER_TRACE", "1")
    with private_containerd() as (c, _work):
        cid = "t-trace"
        c.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX, cid, "sleep", "1000")
        try:
            lines = [ln for ln in _shim_log_of(c, cid).splitlines()
                     if ln.startswith("ember-trace:")]
            phases = [ln.rsplit(")", 1)[1].strip() for ln in lines]
            want = ["jail", "restore", "agent ready", "disk attach", "container create",
                    "container start"]
            assert [p for p in phases if p in want] == want, lines
            assert "rootfs prepare" in phases, lines
        finally:
            _remove(c, cid)


def test_no_trace_without_the_flag(ctrd) -> None:
    c, _work = ctrd
    assert os.environ.get("EMBER_TRACE", "") in ("", "0")
    cid = "t-notrace"
    c.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX, cid, "sleep", "1000")
    try:
        log = _shim_log_of(c, cid)
        assert "serving pod" in log and "ember-trace:" not in log, log
    finally:
        _remove(c, cid)
