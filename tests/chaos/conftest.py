"""Tools of the chaos suite (issue 13, point 6): kill, corrupt, race, then check.

Every case ends the same way: ``ember ps -a`` must tell the truth
(:meth:`Chaos.assert_truthful`: every sandbox folder listed, ``running``
only with a live monitor and VM, ``dead`` only without a monitor, with the
right words about the VM), ``ember rm -f`` must succeed (or say "no such
sandbox" for one that is truly gone), and :func:`ember_testing.leftovers.leftovers`
must find nothing of the sandbox on the host: no process, jail folder,
cgroup, netns, link, mount, loop device or file.

Test hooks used here (``ember.util.pause_for_test``): ``EMBER_TEST_PAUSE=STAGE``
makes a monitor or CLI stop at STAGE and say so on stderr; the test kills it
there, or creates the ``EMBER_TEST_RESUME`` file to let it go on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from conftest import EmberEnv, ember_bin
from ember_testing.leftovers import leftovers

LIVE = ("running", "paused", "creating")


def monitor_pids(sid: str) -> list[int]:
    """Sandbox monitors of ``sid``, by command line (independently of Ember's code)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        argv = p.info["cmdline"] or []
        if (p.info["status"] != psutil.STATUS_ZOMBIE and "ember.sandbox.monitor" in argv
                and sid in argv):
            out.append(p.pid)
    return out


def vmm_pids(sid: str) -> list[int]:
    """QEMU processes of ``sid`` (``-name ember-SHORT``)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status", "name"]):
        argv = p.info["cmdline"] or []
        if (p.info["status"] != psutil.STATUS_ZOMBIE and (p.info["name"] or "").startswith("qemu")
                and f"ember-{sid[:12]}" in argv):
            out.append(p.pid)
    return out


def waiter_pids(sid: str) -> list[int]:
    """The jailer's resident waiter of ``sid`` (``waiter.py VMM_PID JAIL_DIR ...``)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        argv = p.info["cmdline"] or []
        if (p.info["status"] != psutil.STATUS_ZOMBIE and any(a.endswith("/waiter.py") for a in argv)
                and any(a.endswith("/" + sid) for a in argv)):
            out.append(p.pid)
    return out


def wait_for(what: str, check: Callable[[], object], timeout: float = 120,
             step: float = 0.02) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Chaos(EmberEnv):
    """An isolated state dir, the real `ember` CLI, and the checks every case ends with."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.seen: set[str] = set()  # every sandbox id met: checked for leftovers at the end
        self.children: list[subprocess.Popen] = []
        self.logs = state_dir.parent / f"{state_dir.name}-logs"
        self.logs.mkdir()
        self.resume_file = self.logs / "resume"

    @property
    def sandboxes(self) -> Path:
        return self.state_dir / "sandboxes"

    def start(self, *args: str, pause: str = "", log: str = "") -> subprocess.Popen:
        """Start `ember ARGS` in the background; with pause, it (and the monitor it
        spawns) stops at that test-hook stage. Its stderr goes to the file ``log``."""
        env = dict(self.env)
        if pause:
            env["EMBER_TEST_PAUSE"] = pause
            env["EMBER_TEST_RESUME"] = str(self.resume_file)
        err = open(self.logs / (log or f"cli-{len(self.children)}.err"), "wb")
        with err:
            proc = subprocess.Popen([ember_bin(), *args], env=env, stdout=subprocess.PIPE,
                                    stderr=err, stdin=subprocess.DEVNULL)
        proc.err_path = err.name  # type: ignore[attr-defined]
        self.children.append(proc)
        return proc

    def stderr_of(self, proc: subprocess.Popen) -> str:
        return Path(proc.err_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def folders(self) -> list[str]:
        if not self.sandboxes.is_dir():
            return []
        return sorted(d.name for d in self.sandboxes.iterdir() if not d.name.startswith("."))

    def ps(self) -> list[dict]:
        proc = self.run("ps", "-a", "--json", timeout=60, check=True)
        listed = json.loads(proc.stdout)
        self.seen.update(p["id"] for p in listed)
        return listed

    def status(self, ref: str) -> str:
        return next((p["status"] for p in self.ps() if ref in (p["name"], p["id"])), "")

    def one_sandbox(self, timeout: float = 60) -> str:
        """The id of the only sandbox folder, once it exists."""
        sid = wait_for("a sandbox folder", lambda: self.folders(), timeout)[0]  # type: ignore[index]
        self.seen.add(sid)
        return sid

    def run_detached(self, name: str, image: str, *cmd: str, network: str = "none") -> dict:
        proc = self.run("run", "-d", "--name", name, "--network", network, image,
                        *(cmd or ("sleep", "600")))
        assert proc.returncode == 0, proc.stderr.decode()
        info = json.loads(self.run("inspect", name, check=True).stdout)[0]
        self.seen.add(info["id"])
        return info

    def wait_paused(self, path: Path, stage: str, timeout: float = 120) -> None:
        def text() -> str:
            return path.read_text(errors="replace") if path.exists() else ""

        try:
            wait_for(f"the test pause at {stage} in {path}",
                     lambda: f"test pause at {stage}" in text(), timeout, 0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it says: {text()[-2000:]!r}") from None

    # ------------------------------------------------------------ the checks
    def assert_truthful(self) -> list[dict]:
        """`ember ps -a` lists exactly the sandbox folders, with statuses that match
        the processes on the host. Retried briefly: a monitor may be recording."""
        problems: list[str] = []
        for _ in range(50):
            listed, folders = self.ps(), self.folders()
            problems = self._untruths(listed, folders)
            if not problems:
                return listed
            time.sleep(0.1)
        raise AssertionError("ember ps -a does not tell the truth: " + "; ".join(problems))

    @staticmethod
    def _untruths(listed: list[dict], folders: list[str]) -> list[str]:
        problems = []
        if sorted(p["id"] for p in listed) != folders:
            problems.append(f"lists {[p['id'][:12] for p in listed]}, folders are "
                            f"{[f[:12] for f in folders]}")
        for p in listed:
            sid, status, error = p["id"], p["status"], p.get("error") or ""
            monitors, vmms = monitor_pids(sid), vmm_pids(sid)
            label = f"{sid[:12]} ({status}, {error!r})"
            if status in ("running", "paused") and not (monitors and vmms):
                problems.append(f"{label}: monitor {monitors}, VM {vmms}")
            if status == "creating" and p.get("monitor_pid") and not monitors:
                problems.append(f"{label}: its monitor is gone")
            if status in ("dead", "exited") and monitors:
                problems.append(f"{label}: monitor {monitors} still runs")
            if status == "dead" and bool(vmms) != ("still runs" in error):
                problems.append(f"{label}: VM {vmms}")
            if status == "unknown" and not error.startswith("record unreadable"):
                problems.append(f"{label}: no reason given")
        return problems

    def force_remove(self, ref: str, sid: str) -> subprocess.CompletedProcess:
        """`ember rm -f REF` succeeds, or says "no such sandbox" of one truly gone."""
        proc = self.run("rm", "-f", ref, timeout=120)
        err = proc.stderr.decode()
        if proc.returncode != 0:
            assert "no such sandbox" in err, (proc.returncode, err)
            assert sid not in self.folders(), err
        return proc

    def assert_clean(self, sid: str, timeout: float = 10) -> None:
        """Nothing of the sandbox is left on the host (processes take a moment to
        be reaped, cgroups to empty)."""
        deadline = time.monotonic() + timeout
        while (left := leftovers(sid, self.cfg())) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == [], f"sandbox {sid[:12]} left behind: {left}"

    def finish(self, ref: str, sid: str) -> None:
        """The end of every case: truthful ps -a, rm -f, nothing left, an empty ps -a."""
        self.assert_truthful()
        self.force_remove(ref, sid)
        self.assert_clean(sid)
        assert sid not in {p["id"] for p in self.assert_truthful()}

    def teardown(self) -> list[str]:
        for p in self.children:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout:
                p.stdout.close()
        self.resume_file.touch()
        for sid in set(self.folders()) | self.seen:
            self.run("rm", "-f", sid, timeout=120)
        found = [line for sid in sorted(self.seen) for line in leftovers(sid, self.cfg())]
        for sid in self.seen:  # leave the host clean for the next test even so
            for pid in monitor_pids(sid) + vmm_pids(sid) + waiter_pids(sid):
                sigkill(pid)
        return found


@contextmanager
def chaos_env() -> Iterator[Chaos]:
    state = Path(tempfile.mkdtemp(prefix="emc-", dir="/tmp"))
    env = Chaos(state)
    try:
        yield env
    finally:
        found = env.teardown()
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(env.logs, ignore_errors=True)
        assert found == [], f"left behind after the test: {found}"


@pytest.fixture
def chaos():
    """A fresh state dir; afterwards every sandbox met is removed and checked."""
    with chaos_env() as env:
        yield env
