"""Start-up trace: ``EMBER_TRACE=1`` (or ``ember --debug``) prints when each
phase of a sandbox start ran, on the CLI's stderr.

A start crosses three processes (CLI, sandbox monitor, jailer/VMM), so every
line is timed against one clock: wall time relative to the CLI process's own
start (``EMBER_TRACE_T0``, inherited by its children). The monitor writes its
lines to a copy of the CLI's stderr it inherits as ``EMBER_TRACE_FD``; its
stderr is monitor.log. One line per phase::

    ember-trace:    12.3 ->   98.7 ms (  86.4 ms) cli

Standard library only and cheap when off: it is imported by the monitor and
the CLI on every start.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "EMBER_TRACE"
T0_ENV = "EMBER_TRACE_T0"
FD_ENV = "EMBER_TRACE_FD"


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def process_start() -> float:
    """This process's start as wall-clock time (the kernel's 10 ms ticks)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def begin() -> None:
    """In the CLI: make this process's start time the trace's zero for it and its children."""
    if enabled() and T0_ENV not in os.environ:
        os.environ[T0_ENV] = repr(process_start())


def _t0() -> float:
    try:
        return float(os.environ[T0_ENV])
    except (KeyError, ValueError):
        return process_start()


def mark(phase: str, start: float, end: float | None = None) -> None:
    """Record that ``phase`` ran from ``start`` to ``end`` (time.time() values)."""
    if not enabled():
        return
    end = time.time() if end is None else end
    t0 = _t0()
    line = (f"ember-trace: {(start - t0) * 1000:8.1f} -> {(end - t0) * 1000:8.1f} ms "
            f"({(end - start) * 1000:7.1f} ms) {phase}\n")
    try:
        fd = int(os.environ.get(FD_ENV, "2"))
        os.write(fd, line.encode())
    except (OSError, ValueError):
        pass  # the CLI is gone (teardown after it exited): nobody to tell


@contextmanager
def span(phase: str) -> Iterator[None]:
    """Time the block as ``phase`` (also when it raises)."""
    if not enabled():
        yield
        return
    start = time.time()
    try:
        yield
    finally:
        mark(phase, start)


def child_fd() -> int | None:
    """For a child whose stderr is a log: a copy of our trace output to inherit."""
    if not enabled():
        return None
    try:
        return os.dup(int(os.environ.get(FD_ENV, "2")))
    except (OSError, ValueError):
        return None
