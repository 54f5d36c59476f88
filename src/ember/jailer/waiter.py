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


def status_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main(argv: list[str]) -> int:
    vmm, jail, leaves = int(argv[0]), argv[1], argv[2:]

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(vmm, signum)
        except ProcessLookupError:
            pass

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
    return status_code(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
