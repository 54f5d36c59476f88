"""The jailer's resident part: wait for the VMM, then remove its jail.

Once the VMM runs, ``ember-jailer`` execs this file with ``python -I -S`` —
same pid, so the VMM stays its child — because a bare interpreter holding
only the standard library takes about 4 MiB where the full jailer takes 11:
it lives as long as every sandbox does. Standard library only, so it runs
without site-packages; ember.jailer.cgroups imports ``rmdir_cgroup`` from here.

    python -I -S waiter.py VMM_PID JAIL_DIR [CGROUP_DIR...]

Exits with the VMM's status (128+N if signal N ended it).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)


def rmdir_cgroup(path: str | os.PathLike, timeout: float = 3.0) -> None:
    """Remove a cgroup, killing stragglers first; a cgroup with tasks cannot be removed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = f.read().split()
        except OSError:
            pids = []
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for signum (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return True


def deliver(pid: int, signum: int) -> bool:
    """Send a forwarded signal to the VMM as if it were not PID 1 of its namespace.

    The VMM is its PID namespace's init, and the kernel drops a signal that
    an init has no handler for; every forwarded signal would end an ordinary
    process, so one the VMM does not catch becomes SIGKILL. True if escalated.
    """
    escalate = not _catches(pid, signum)
    try:
        os.kill(pid, signal.SIGKILL if escalate else signum)
    except ProcessLookupError:
        return False
    return escalate


def status_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main(argv: list[str]) -> int:
    vmm, jail, leaves = int(argv[0]), argv[1], argv[2:]
    escalated: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if deliver(vmm, signum):
            escalated.append(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    # The jailer blocked these before exec; what arrived meanwhile is delivered now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    _, status = os.waitpid(vmm, 0)
    shutil.rmtree(jail, ignore_errors=True)
    for leaf in leaves:
        try:
            rmdir_cgroup(leaf)
        except OSError:
            pass
    return exit_code(status, escalated)


def exit_code(status: int, escalated: list[int]) -> int:
    """The VMM's status; a SIGKILL we escalated to reads as the signal we were sent."""
    if escalated and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return 128 + escalated[0]
    return status_code(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
