"""Give a forked process the command line it would have had if it had been exec'd.

Ember forks each sandbox's monitor from a Python process that already holds its
modules (:mod:`ember.sandbox.forkserver`), so that the pages those modules fill
stay shared between all sandboxes. Without an exec, ``/proc/PID/cmdline`` would still show the parent's;
but ``ember ps``, clean-up, tests and operators find a sandbox's processes by
their command lines (``-m ember.sandbox.monitor --id ID``).

``prctl(PR_SET_MM)`` would move the argument area, but it needs
CAP_SYS_RESOURCE, which root in a container often lacks. So this does what
setproctitle(3) does: it overwrites the area the process was exec'd with. When
the area's last byte is not NUL, the kernel reports it as one string up to its
first NUL, and readers (psutil, ps) split that at spaces. The fork server is
exec'd with room to spare (:data:`ROOM`), which every process forked from it
inherits.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

ROOM = 2048  # bytes of argument area a forking parent is exec'd with (a padding argument)


def _arg_area() -> tuple[int, int]:
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[45]), int(fields[46])  # arg_start, arg_end (proc(5) fields 48, 49)


def room() -> int:
    """How long a command line :func:`set_cmdline` can give this process."""
    start, end = _arg_area()
    return end - start - 2  # the NUL after it, and the non-NUL last byte


def check(argv: Sequence[str]) -> bytes:
    """What :func:`set_cmdline` would write; ValueError if an argument holds a
    space or a NUL (the result would not split back into the same list) or the
    whole does not fit the room."""
    if any(not a or " " in a or "\0" in a for a in argv):
        raise ValueError("a command line to show cannot hold empty arguments, spaces or NULs")
    text = " ".join(argv).encode()
    if len(text) > room():
        raise ValueError(f"a command line of {len(text)} bytes does not fit in {room()}")
    return text


def set_cmdline(argv: Sequence[str]) -> None:
    """Make ``/proc/self/cmdline`` read as ``argv`` (ValueError: see :func:`check`)."""
    text = check(argv)
    start, end = _arg_area()
    size = end - start
    area = text + b"\0" * (size - len(text) - 1) + b"."  # a non-NUL last byte: one string
    ctypes.memmove(start, area, size)
