"""Who uses a named volume, and the volume API (``ember.Volume``).

The volumes themselves (sparse ext4 images, made whole or not at all) are
:mod:`ember.storage.volumes`; which sandboxes hold one is read from the sandbox
records, under the sandbox store's lock, so it is here, in the sandbox core.
A sandbox holds its volumes while it is live, or dead with its VM still
running; one read-write user at a time with no reader beside it, any number
of read-only users.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from pathlib import Path

from ember.config import Config
from ember.errors import EmberError
from ember.sandbox.state import SandboxState, StateStore, vmm_alive
from ember.sandbox.status import LIVE, Status
from ember.storage.volumes import VolumeInfo, VolumeStore


# --------------------------------------------------------------- users
def users(states: Iterable[SandboxState], name: str) -> list[tuple[SandboxState, bool]]:
    """(sandbox state, readonly) of every sandbox that mounts the volume and is live,
    or dead with its VM still running (a killed monitor's orphan still writes)."""
    out: list[tuple[SandboxState, bool]] = []
    for st in states:
        if st.status not in LIVE and not (st.status == Status.DEAD and vmm_alive(st)):
            continue
        for m in st.mounts:
            if m.get("kind") == "volume" and m.get("source") == name:
                out.append((st, bool(m.get("readonly"))))
    return out


def check_available(states: Iterable[SandboxState], name: str, readonly: bool) -> None:
    """Refuse a use that the volume's live users rule out (see the module docstring)."""
    holders = users(states, name)
    writers = [st for st, ro in holders if not ro]
    if writers:
        st = writers[0]
        raise EmberError(f"volume {name} is in use read-write by sandbox "
                         f"{st.name or st.short_id} ({_how(st)}): one sandbox at a time may "
                         "mount a volume read-write, and nobody beside it")
    if holders and not readonly:
        st = holders[0][0]
        raise EmberError(f"volume {name} is mounted read-only by sandbox "
                         f"{st.name or st.short_id} ({_how(st)}): it can be mounted read-write "
                         "only when no other sandbox uses it")


def _how(st: SandboxState) -> str:
    if st.status == Status.DEAD:
        return f"dead, but its VM still runs: ember rm -f {st.name or st.short_id}"
    return st.status


def referenced(states: Iterable[SandboxState], name: str) -> list[SandboxState]:
    """Every sandbox record (any status) that names the volume."""
    return [st for st in states
            if any(m.get("kind") == "volume" and m.get("source") == name for m in st.mounts)]


# ------------------------------------------------------- removal, the API
def remove_unused(cfg: Config, name: str) -> None:
    """Delete a volume that no sandbox record names, under the lock that orders
    every create (so no `ember run` takes it meanwhile)."""
    store, states = VolumeStore(cfg), StateStore(cfg)
    with states.lock():
        store.get(name)  # NotFoundError first
        refs = referenced(states.all(), name)
        if refs:
            who = ", ".join(st.name or st.short_id for st in refs[:3])
            raise EmberError(f"volume {name} is in use by sandbox {who}: remove the "
                             "sandbox first (ember rm)")
        store.remove(name)


def prune(cfg: Config) -> list[VolumeInfo]:
    """Delete every volume no sandbox record names; those deleted."""
    store, states = VolumeStore(cfg), StateStore(cfg)
    gone = []
    with states.lock():
        records = states.all()
        for v in store.list():
            if not referenced(records, v.name):
                store.remove(v.name)
                gone.append(v)
    return gone


class Volume:
    """A named volume, for programs (``ember.Volume``): what ``ember volume`` does.

    Example::

        vol = ember.Volume.create("cache", size="1g")
        sb = ember.Sandbox.create("app", ["sh"], volumes=["cache:/cache"])
        ...
        vol.remove()  # refused while a sandbox names it
    """

    def __init__(self, info: VolumeInfo, cfg: Config) -> None:
        self.cfg = cfg
        self._info = info

    @classmethod
    def create(cls, name: str, size: str | int | None = None,
               cfg: Config | None = None) -> Volume:
        """Make the volume (or return the existing one, as Docker does)."""
        from ember.config import load_config

        cfg = cfg or load_config()
        return cls(VolumeStore(cfg).create(name, size)[0], cfg)

    @classmethod
    def get(cls, name: str, cfg: Config | None = None) -> Volume:
        from ember.config import load_config

        cfg = cfg or load_config()
        return cls(VolumeStore(cfg).get(name), cfg)

    @classmethod
    def list(cls, cfg: Config | None = None) -> list[Volume]:
        from ember.config import load_config

        cfg = cfg or load_config()
        return [cls(v, cfg) for v in VolumeStore(cfg).list()]

    @classmethod
    def prune(cls, cfg: Config | None = None) -> builtins.list[str]:
        """Remove every volume no sandbox names; their names."""
        from ember.config import load_config

        return [v.name for v in prune(cfg or load_config())]

    @property
    def name(self) -> str:
        return self._info.name

    @property
    def size(self) -> int:
        return self._info.size

    @property
    def path(self) -> Path:
        return self._info.path

    def in_use_by(self) -> builtins.list[tuple[str, bool]]:
        """(sandbox name, readonly) of the sandboxes using it now."""
        return [(st.name, ro) for st, ro in users(StateStore(self.cfg).all(), self.name)]

    def inspect(self) -> dict:
        info = VolumeStore(self.cfg).get(self.name)
        return {**info.as_dict(), "in_use_by": [
            {"sandbox": n, "readonly": ro} for n, ro in self.in_use_by()]}

    def remove(self) -> None:
        """Delete it and its data; refused while any sandbox (even stopped) names it."""
        remove_unused(self.cfg, self.name)

    def __repr__(self) -> str:
        return f"Volume({self.name!r})"
