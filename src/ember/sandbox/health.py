"""``--health-cmd``: the sandbox monitor checks the container's health, as Docker does.

Every ``--health-interval`` seconds the command runs in the container (as
``/bin/sh -c CMD``, with the container's own user, environment and working
directory, through the agent's ExecProcess); exit 0 is a pass, anything else
or taking longer than ``--health-timeout`` a failure. The status starts as
``starting``, becomes ``healthy`` on a pass and ``unhealthy`` after
``--health-retries`` failures in a row; failures within
``--health-start-period`` of the start do not count. The status is kept in
the sandbox record (``health``), which ``ember ps`` and ``inspect`` show.
"""

from __future__ import annotations

import copy
import json
import secrets
import signal
import sys
import threading
import time

from ember.errors import EmberError
from ember.sandbox.options import SPEC_NAME, RunOptions
from ember.sandbox.state import StateStore


class HealthChecker:
    def __init__(self, store: StateStore, sandbox_id: str, options: dict) -> None:
        self.store = store
        self.id = sandbox_id
        self.opts = RunOptions.from_record(options)
        self._thread: threading.Thread | None = None

    def start(self, vm, container_id: str, done: threading.Event) -> None:
        """Begin checking (once; a restarted container keeps its checker)."""
        if not self.opts.health_cmd or self._thread is not None:
            return
        self._set("starting")
        self._thread = threading.Thread(target=self._loop, args=(vm, container_id, done),
                                        daemon=True, name="health")
        self._thread.start()

    def _set(self, status: str) -> None:
        try:
            self.store.modify(self.id, lambda st: None if st.health == status
                              else {"health": status})
        except EmberError:
            pass  # being removed

    def _loop(self, vm, cid: str, done: threading.Event) -> None:
        began = time.monotonic()
        failures = 0
        status = "starting"
        while not done.wait(self.opts.health_interval):
            ok = self.probe(vm, cid, done)
            if done.is_set():
                return
            if ok:
                failures, status = 0, "healthy"
            elif time.monotonic() - began >= self.opts.health_start_period:
                failures += 1
                if failures >= self.opts.health_retries:
                    status = "unhealthy"
            self._set(status)

    def probe(self, vm, cid: str, done: threading.Event) -> bool:
        """One run of the health command: True when it exits 0 in time."""
        from ember.sandbox.agent_client import AgentClient

        rpc = vm.rpc
        if rpc is None:
            return False
        agent = AgentClient(rpc)
        try:
            spec = json.loads((self.store.dir(self.id) / SPEC_NAME).read_text())
            process = copy.deepcopy(spec["process"])
            process.pop("consoleSize", None)
            process.update(terminal=False, args=["/bin/sh", "-c", self.opts.health_cmd])
            exec_id = "health-" + secrets.token_hex(4)
            agent.exec_process(cid, exec_id, process)
        except (OSError, ValueError, KeyError, EmberError) as exc:
            print(f"ember-monitor {self.id[:12]}: health check did not start: {exc}",
                  file=sys.stderr, flush=True)
            return False
        result: list[int] = []

        def wait() -> None:
            try:
                result.append(agent.wait_process(cid, exec_id, timeout=None).exit_status)
            except (EmberError, OSError):
                result.append(-1)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(self.opts.health_timeout)
        if not result:  # too slow: a failure, and it must not pile up
            try:
                agent.signal_process(cid, exec_id, int(signal.SIGKILL))
            except (EmberError, OSError):
                pass
            return False
        return result[0] == 0
