"""``--restart``: the sandbox monitor starts the container again, inside the same VM.

Docker's policies: ``no``; ``on-failure[:N]`` (a non-zero exit, at most N
restarts when N is given); ``always`` and ``unless-stopped`` (any exit).
Ember has no daemon that restarts with the host, so those two behave the
same. A container stopped or killed by hand (``ember stop``/``kill``, which
set ``stop_requested`` in the record) is not restarted, as in Docker.

A restart removes the container in the guest (its processes and mounts; the
disk stays attached), creates it again from the spec kept in the sandbox
folder (``spec.json``) on the same writable disk, so what it wrote stays, and
starts it. The VM, its network, published ports and log are kept. Restarts
are spaced as Docker spaces them: 100 ms, doubled after each one up to a
minute, back to 100 ms after a run of 10 s or more.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from ember.errors import EmberError
from ember.sandbox.options import SPEC_NAME, RunOptions, parse_restart
from ember.sandbox.state import StateStore

FIRST_DELAY_S = 0.1
MAX_DELAY_S = 60.0
RESET_AFTER_S = 10.0  # a run this long starts the delays again from the first


class Restarter:
    """Decides on and carries out restarts for one sandbox's monitor."""

    def __init__(self, store: StateStore, sandbox_id: str, options: dict) -> None:
        self.store = store
        self.id = sandbox_id
        self.policy, self.max_retries = parse_restart(RunOptions.from_record(options).restart)
        self.delay = FIRST_DELAY_S
        self.started_at = time.monotonic()

    @property
    def active(self) -> bool:
        return self.policy != "no"

    def wanted(self, exit_code: int) -> bool:
        """Whether the policy restarts a container that exited with ``exit_code``."""
        if not self.active:
            return False
        try:
            st = self.store.load(self.id)
        except EmberError:
            return False  # being removed
        if st.stop_requested:
            return False
        if self.policy == "on-failure":
            if exit_code == 0:
                return False
            if self.max_retries and st.restart_count >= self.max_retries:
                return False
        return True

    def _pause(self, stopping: Callable[[], bool]) -> bool:
        """The delay before a restart; False if a stop came meanwhile."""
        if time.monotonic() - self.started_at >= RESET_AFTER_S:
            self.delay = FIRST_DELAY_S
        deadline = time.monotonic() + self.delay
        self.delay = min(self.delay * 2, MAX_DELAY_S)
        while time.monotonic() < deadline:
            if stopping():
                return False
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return not stopping()

    def restart(self, agent, rootfs: dict, stopping: Callable[[], bool]) -> bool:
        """Remove, re-create and start the container; False when stopped meanwhile.

        ``agent`` is an AgentClient on the monitor's connection, ``rootfs``
        the container's disk as AttachDisk reported it, ``stopping()`` says
        whether the monitor (or a user's stop) is ending the sandbox.
        """
        def held() -> bool:
            if stopping():
                return True
            try:
                return self.store.load(self.id).stop_requested
            except EmberError:
                return True

        if not self._pause(held):
            return False
        from ember.sandbox.mounts import saved_disks

        folder = self.store.dir(self.id)
        spec = json.loads((folder / SPEC_NAME).read_text())
        agent.remove_container(self.id)
        agent.create_container(self.id, spec, rootfs, stdin=False, start=True,
                               extra_disks=saved_disks(folder))  # volumes, read-only copies
        self.started_at = time.monotonic()
        self.store.modify(self.id, lambda st: {"restart_count": st.restart_count + 1})
        return True
