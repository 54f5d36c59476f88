"""Signals to a namespace init that arrive before the program can take them.

A container's init is PID 1 of its PID namespace, and the kernel discards a
signal such a process has no handler for (only SIGKILL and SIGSTOP from an
ancestor namespace get through). Right after StartContainer the program is
often still starting (exec, dynamic loading, an interpreter's start-up, all
slow under TCG), so a prompt SIGTERM from StopContainer would be lost and
the stop would wait out its whole grace period. So such a signal is held and
sent as soon as /proc/<pid> shows the program takes it: a handler (SigCgt),
the signal blocked for signalfd (SigBlk), or the program waiting in
sigtimedwait (wchan), as an init such as tini (``ember run --init``) does;
for at most ``HOLD_MAX`` seconds, from a thread: SignalProcess answers at once.
A program that never installs a handler gets the signal at the deadline,
which the kernel then discards exactly as it would have at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger("ember.agent.signals")

HOLD_MAX = 30.0
POLL_FIRST = 0.01
POLL_MAX = 0.1
_UNBLOCKABLE = (signal.SIGKILL, signal.SIGSTOP)


def _status(pid: int) -> dict[str, str]:
    """The fields of /proc/<pid>/status ({} when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def is_namespace_init(status: dict[str, str]) -> bool:
    """PID 1 of its innermost PID namespace (NSpid's last field)."""
    nspid = status.get("NSpid", "").split()
    return bool(nspid) and nspid[-1] == "1"


def catches(status: dict[str, str], sig: int, pid: int | None = None) -> bool:
    """Whether the process takes sig: a handler installed, sig blocked (a blocked
    signal stays pending for signalfd, even to a namespace init), or (given its
    pid) the process waiting for signals in sigtimedwait, which unblocks the
    signals it waits for while it waits."""
    try:
        mask = int(status.get("SigCgt", "0"), 16) | int(status.get("SigBlk", "0"), 16)
    except ValueError:
        return False
    return bool(mask >> (sig - 1) & 1) or (pid is not None and _in_sigwait(pid))


def _in_sigwait(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip().startswith("do_sigtimedwait")  # or .isra.0 etc.
    except OSError:
        return False


def would_be_lost(pid: int, sig: int) -> bool:
    """True when the kernel would discard sig sent to pid now (an init without a handler)."""
    if sig in _UNBLOCKABLE or sig <= 0:
        return False
    st = _status(pid)
    return bool(st) and is_namespace_init(st) and not catches(st, sig, pid)


def send_when_caught(pid: int, sig: int, alive: Callable[[], bool], name: str,
                     hold_max: float = HOLD_MAX) -> threading.Thread:
    """Send sig to pid once it catches sig (or at the deadline); stop if it exits first.

    ``alive`` must be false once pid is reaped, so a reused pid is never signalled.
    """
    def run() -> None:
        deadline = time.monotonic() + hold_max
        pause = POLL_FIRST
        while alive() and time.monotonic() < deadline:
            st = _status(pid)
            if not st:
                return
            if catches(st, sig, pid):
                break
            time.sleep(pause)
            pause = min(pause * 2, POLL_MAX)
        else:
            if not alive():
                return
            log.info("%s never caught signal %d; sending it anyway", name, sig)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    t = threading.Thread(target=run, name=f"signal-{name}-{sig}", daemon=True)
    t.start()
    return t
