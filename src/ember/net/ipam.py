"""Container addresses on the ``ember0`` bridge, handed out under a file lock.

Every ``ember run --network bridge`` monitor asks for one address. Records
live under ``<state_dir>/net/ips/`` (one file per address, holding the
sandbox id), and allocation happens under ``<state_dir>/net/.lock``, so
concurrent CLI and monitor processes never hand out the same address. A
record whose sandbox folder is gone (the sandbox was removed while its
monitor was SIGKILLed and nobody cleaned up) is reclaimed on the next
allocation rather than leaking the address for ever.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ember.config import Config
from ember.errors import EmberError
from ember.util import atomic_write, file_lock

SUBNET = ipaddress.ip_network("10.88.0.0/16")
GATEWAY = ipaddress.ip_address("10.88.0.1")


def records_dir(cfg: Config) -> Path:
    return cfg.state_dir / "net" / "ips"


@contextmanager
def lock(cfg: Config) -> Iterator[None]:
    """Host-wide (per state dir) lock for addresses and the bridge's set-up."""
    with file_lock(cfg.state_dir / "net" / ".lock"):
        yield


def _owner(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def allocate(cfg: Config, sandbox_id: str, exclude: set[str] | frozenset = frozenset()) -> str:
    """The lowest free address after the gateway (and not in exclude); hold :func:`lock`."""
    d = records_dir(cfg)
    d.mkdir(parents=True, exist_ok=True)
    for host in SUBNET.hosts():
        if host == GATEWAY or str(host) in exclude:
            continue
        rec = d / str(host)
        if rec.exists():
            owner = _owner(rec)
            if owner == sandbox_id:
                return str(host)
            if owner and (cfg.sandboxes_dir / owner).is_dir():
                continue
        atomic_write(rec, sandbox_id.encode())
        return str(host)
    raise EmberError(f"no free address left in {SUBNET} for the ember0 bridge")


def release(cfg: Config, sandbox_id: str) -> None:
    """Drop every record held by sandbox_id (idempotent)."""
    d = records_dir(cfg)
    if not d.is_dir():
        return
    with lock(cfg):
        for rec in d.iterdir():
            if _owner(rec) == sandbox_id:
                try:
                    os.unlink(rec)
                except FileNotFoundError:
                    pass


def held_by(cfg: Config, sandbox_id: str) -> list[str]:
    """Addresses recorded for sandbox_id (what tests and `rm` check)."""
    d = records_dir(cfg)
    if not d.is_dir():
        return []
    return sorted(rec.name for rec in d.iterdir() if _owner(rec) == sandbox_id)
