"""The statuses a sandbox can be in, as its record (``state.json``) spells them.

A :class:`Status` is a ``str``: records on disk, ``ember ps`` and ``inspect``
show the same words as before there was an enum, and a record written with a
plain string loads as the member of that name. A word that is not a status
(a record written by something else) is refused with a one-line reason, so
the record reads as unreadable (``unknown``) rather than as a sandbox in a
state nothing here knows how to handle.
"""

from __future__ import annotations

import enum


class Status(enum.StrEnum):
    CREATING = "creating"  # the record exists; the monitor boots the VM
    RUNNING = "running"  # the container was started (the monitor's Watch)
    PAUSED = "paused"  # the VM is paused (ember pause)
    EXITED = "exited"  # the container ended, its exit code recorded
    DEAD = "dead"  # the monitor (or the VM) is gone without recording an exit
    UNKNOWN = "unknown"  # the record cannot be read (the reason in ``error``)

    @classmethod
    def parse(cls, value: object) -> Status:
        """The member named by a record's value; ValueError naming it otherwise."""
        if isinstance(value, str):
            try:
                return cls(value)
            except ValueError:
                pass
        raise ValueError(f"unknown status {value!r}")


# What may still hold a VM, a monitor or a creator at work.
LIVE = (Status.RUNNING, Status.PAUSED, Status.CREATING)
# The container's end is known (or can no longer be learned).
ENDED = (Status.EXITED, Status.DEAD)
# A VM that runs (paused or not): what exec, stop and kill act on.
UP = (Status.RUNNING, Status.PAUSED)
