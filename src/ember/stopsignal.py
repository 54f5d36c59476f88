"""Waiting for a stop signal without running anything inside the signal handler.

Python runs a signal handler in the main thread between two bytecodes,
wherever that thread happens to be. A handler that takes a lock can deadlock
if the main thread held that lock at that moment: ``threading.Event.set()``
takes the event's condition lock, ``threading.Thread.start()`` takes
threading's registry lock, and both are held briefly by ordinary main-thread
code (an ``Event.wait`` before it blocks, a ``Thread.start`` of its own). The
window is narrow, but a daemon that does not stop on SIGTERM is the failure a
supervisor sees, so Ember's daemons take no lock in a handler at all.

Here Python's C-level handler writes the signal's number to a pipe
(:func:`signal.set_wakeup_fd`) and the Python-level handler does nothing. A
wait is a ``select`` on that pipe: a signal that came before the wait is still
in the pipe, and nothing runs inside the handler that could block. There is
one wake-up fd per process, so there is one :class:`StopSignals` per process,
made in the main thread. A child forked without exec drops both (see
``_forget``): the pipe is shared across fork, and a child's signal must not
read as the parent's.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable


def _nothing(signum, frame) -> None:
    """Caught, so that the default action (death) does not happen; the wake-up
    pipe carries the news."""


class StopSignals:
    """Catch ``signals`` (SIGTERM and SIGINT by default) and wait for one."""

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = frozenset(int(s) for s in signals)
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._received: int | None = None
        signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in self.signals:
            signal.signal(sig, _nothing)
        # A child forked without exec (pyroute2's NetNS helper, for one) would
        # share the pipe: its SIGTERM would read here as ours. In the child the
        # pipe and the handlers go, so a stop signal there does what it would
        # have done without us.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in self.signals:
            signal.signal(sig, signal.SIG_DFL)
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        """The first stop signal received (its number), or None after ``timeout``
        seconds without one. Safe to call from any thread, any number at once:
        the select runs without a lock, and once a stop is seen the pipe is
        kept readable, so every other waiter wakes too."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._received is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._r], [], [], left)
            if not ready:
                break
            with self._lock:  # one reader of the pipe at a time; never taken by a handler
                try:
                    data = os.read(self._r, 256)
                except BlockingIOError:
                    continue  # another waiter read it
                stops = [b for b in data if b in self.signals]
                if stops and self._received is None:
                    self._received = stops[0]
                if self._received is not None:
                    os.write(self._w, b"\0")  # not a signal number: a latch for the others
        return self._received

    def on_signal(self, action: Callable[[int], object], name: str = "stop-signal") -> None:
        """Run ``action(signum)`` in a daemon thread, started now (not in a
        handler), once a stop signal comes."""
        threading.Thread(target=lambda: action(self.wait() or 0), name=name,
                         daemon=True).start()
