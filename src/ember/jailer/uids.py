"""Which host ids a jailed VMM must never get.

A VMM's uid is used as its gid too, so an id is unusable when it is a user
in /etc/passwd, a group in /etc/group, or inside a range delegated to some
user in /etc/subuid or /etc/subgid (rootless containers map their processes
and files there: a VMM sharing such an id could signal them or own their
files). Checked at every allocation, since users and delegations come and go.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "no change" to the kernel: never an id


@dataclass
class Reserved:
    """Ids named in the account files: single ids and [start, end) ranges."""

    ids: set[int] = field(default_factory=set)
    ranges: list[tuple[int, int]] = field(default_factory=list)

    def __contains__(self, some_id: int) -> bool:
        return some_id in self.ids or any(lo <= some_id < hi for lo, hi in self.ranges)


def _lines(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _number(text: str) -> int | None:
    return int(text) if text.strip().isdigit() else None


def reserved_ids(etc: str | os.PathLike = "/etc") -> Reserved:
    """Every id /etc/passwd, /etc/group, /etc/subuid and /etc/subgid use or delegate."""
    etc = Path(etc)
    out = Reserved()
    for name in ("passwd", "group"):
        for fields in _lines(etc / name):
            number = _number(fields[2]) if len(fields) > 2 else None
            if number is not None:
                out.ids.add(number)
    for name in ("subuid", "subgid"):
        for fields in _lines(etc / name):
            start, count = (_number(f) for f in (fields + ["", ""])[1:3])
            if start is not None and count:
                out.ranges.append((start, start + count))
    return out
