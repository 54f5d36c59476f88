"""One reaper for every child of the agent.

The agent is PID 1 in the guest (and a child subreaper in host tests), so
every orphan lands on it and must be reaped, including container processes
whose exit statuses the host waits for. One thread calls waitpid(-1) and hands
each status to whoever registered that pid.

subprocess.Popen cannot be used next to such a reaper: its wait() races
waitpid(-1) and reports 0 for a child the reaper took first. So the agent
starts helpers with os.posix_spawn under the reaper's lock and registers the
pid before the reaper may dispatch its status.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("ember.agent.reaper")

PR_SET_CHILD_SUBREAPER = 36
_UNCLAIMED_TTL = 120.0
# Python ignores these; ignored dispositions survive exec, and a container must
# not start with SIGPIPE ignored.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class Exit:
    """The future exit of one pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._event = threading.Event()
        self.status: int | None = None  # raw wait status
        self.exited_at_ns = 0

    def _set(self, status: int, at_ns: int) -> None:
        self.status = status
        self.exited_at_ns = at_ns
        self._event.set()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    @property
    def exit_code(self) -> int:
        """Shell convention: the exit code, or 128+signal when killed."""
        if self.status is None:
            raise RuntimeError(f"pid {self.pid} has not exited")
        if os.WIFSIGNALED(self.status):
            return 128 + os.WTERMSIG(self.status)
        return os.waitstatus_to_exitcode(self.status)

    @property
    def signal(self) -> int:
        if self.status is not None and os.WIFSIGNALED(self.status):
            return os.WTERMSIG(self.status)
        return 0


def set_subreaper() -> None:
    """Make orphaned descendants re-parent to us (needed when not PID 1)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class Reaper:
    """Reaps all children and dispatches their statuses by pid."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, Exit] = {}
        self._unclaimed: dict[int, tuple[int, int, float]] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="reaper")
        self._thread.start()

    def spawn(self, argv: Sequence[str], stdin: int | None = None, stdout: int | None = None,
              stderr: int | None = None, env: dict[str, str] | None = None) -> Exit:
        """Start argv[0] (searched in PATH) with the given fds as its stdio."""
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            actions = [
                (os.POSIX_SPAWN_DUP2, devnull if fd is None else fd, target)
                for target, fd in enumerate((stdin, stdout, stderr))
            ]
            with self._lock:
                pid = os.posix_spawnp(argv[0], list(argv), env if env is not None
                                      else dict(os.environ), file_actions=actions,
                                      setsigdef=_DEFAULT_SIGNALS)
                ex = Exit(pid)
                self._watched[pid] = ex
        finally:
            os.close(devnull)
        self._wake.set()
        return ex

    def fork(self, fn: Callable[[], int], stdin: int, stdout: int, stderr: int) -> Exit:
        """Run fn() in a forked child with the given fds as its stdio; its return
        value is the exit code. Used where the work needs the agent's own code
        but must not change the agent (a chroot into a container: ember.agent.archive).
        The child keeps no other descriptor of the agent's.
        """
        with self._lock:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    for target, fd in enumerate((stdin, stdout, stderr)):
                        os.dup2(fd, target)
                    os.closerange(3, 1 << 16)
                    for sig in _DEFAULT_SIGNALS + (signal.SIGINT, signal.SIGTERM):
                        signal.signal(sig, signal.SIG_DFL)
                    code = fn()
                finally:
                    os._exit(code)
            ex = Exit(pid)
            self._watched[pid] = ex
        self._wake.set()
        return ex

    def watch(self, pid: int) -> Exit:
        """Future exit of a pid we did not spawn (a container init re-parented to us).

        If it was already reaped (it can die before crun's pid file is read),
        the kept status is returned.
        """
        with self._lock:
            ex = self._watched.get(pid)
            if ex is not None:
                return ex
            ex = Exit(pid)
            kept = self._unclaimed.pop(pid, None)
            if kept is not None:
                ex._set(kept[0], kept[1])
            else:
                self._watched[pid] = ex
        self._wake.set()
        return ex

    def run_command(self, argv: Sequence[str], timeout: float | None = 60.0,
                    input_fd: int | None = None) -> tuple[int, bytes]:
        """Run a helper to completion; returns (exit code, combined output)."""
        r, w = os.pipe()
        try:
            ex = self.spawn(argv, stdin=input_fd, stdout=w, stderr=w)
        except OSError:
            os.close(r)
            raise
        finally:
            os.close(w)
        chunks = []
        try:
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
        finally:
            os.close(r)
        if not ex.wait(timeout):
            try:
                os.kill(ex.pid, 9)
            except ProcessLookupError:
                pass
            ex.wait(5)
            return 124, b"".join(chunks) + b"\n(timed out)"
        return ex.exit_code, b"".join(chunks)

    def _run(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                # No child: sleep until spawn/fork/watch makes one (they
                # set the event after the fork). No timeout: an idle guest
                # must not wake itself (issue 14).
                self._wake.wait()
                self._wake.clear()
                continue
            except InterruptedError:
                continue
            if pid <= 0:
                continue
            now_ns = time.time_ns()
            with self._lock:
                ex = self._watched.pop(pid, None)
                if ex is None:
                    self._unclaimed[pid] = (status, now_ns, time.monotonic())
                    self._prune()
            if ex is not None:
                ex._set(status, now_ns)

    def _prune(self) -> None:
        cutoff = time.monotonic() - _UNCLAIMED_TTL
        for pid in [p for p, (_, _, t) in self._unclaimed.items() if t < cutoff]:
            del self._unclaimed[pid]
