"""Node counters from lifecycle events: crashes, OOM kills, failures, start times.

The sandbox monitors, ``ember rm`` and the shims append every lifecycle event
to the node's event log (:mod:`ember.sandbox.events`); the collector follows
that log from where it was when the endpoint started (counters start at 0, as
Prometheus expects of a restarted exporter) and counts:

* ``ember_events_total{type,action}``: every event;
* ``ember_sandbox_crashes_total{kind}``: ``vmm`` from VMM crash events (``ember
  run`` sandboxes and pods alike), ``monitor`` and ``other`` from the sandbox
  records, since a dead monitor publishes nothing;
* ``ember_sandbox_oom_kills_total``: containers the guest's OOM killer ended;
* ``ember_errors_total{kind}``: vmm_crash, monitor_crash, oom_kill,
  restore_failure, boot_failure, other;
* ``ember_vm_start_seconds{kind,mode}``: how long each VM took to be ready,
  cold boots and template restores apart;
* ``ember_template_cache_lookups_total{result}``: hit, miss (built), busy
  (another process was building it), failed;
* ``ember_restore_floor_seconds``: the fastest template restore the log holds
  (read back at start too, so it does not wait for a new start).

Each crash and OOM kill is also one log line with the sandbox id.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ember.metrics.targets import Target
from ember.sandbox.events import EventLog, Tail
from ember.sandbox.status import Status

log = logging.getLogger("ember.metrics")

CRASH_KINDS = ("vmm", "monitor", "other")
ERROR_KINDS = ("vmm_crash", "monitor_crash", "oom_kill", "restore_failure", "boot_failure",
               "other")
LOOKUPS = ("hit", "miss", "busy", "failed")
START_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 60.0, 120.0)


def _seconds(rec: dict) -> float | None:
    try:
        value = float(rec["Actor"]["Attributes"].get("seconds", ""))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return value if value >= 0 else None


class Events:
    """The collector's event counters (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, event_log: EventLog | None = None) -> None:
        self.crashes = Counter("ember_sandbox_crashes", "Sandboxes whose VMM or monitor ended "
                               "without being stopped, by what died.", ["kind"],
                               registry=registry)
        self.ooms = Counter("ember_sandbox_oom_kills", "Containers killed by the guest's OOM "
                            "killer (their oom event).", registry=registry)
        self.errors = Counter("ember_errors", "Failures on this node, by kind.", ["kind"],
                              registry=registry)
        self.events = Counter("ember_events", "Lifecycle events published on this node.",
                              ["type", "action"], registry=registry)
        self.starts = Histogram("ember_vm_start_seconds", "Time for a sandbox's or pod's VM to "
                                "be ready (agent answering), cold boot or template restore.",
                                ["kind", "mode"], buckets=START_BUCKETS, registry=registry)
        self.lookups = Counter("ember_template_cache_lookups", "VM template lookups at start: "
                               "hit, miss (built then), busy (being built elsewhere: cold "
                               "boot), failed.", ["result"], registry=registry)
        self.floor = Gauge("ember_restore_floor_seconds", "The fastest VM template restore "
                           "(to agent ready) in the node's event log.", registry=registry)
        for kind in CRASH_KINDS:
            self.crashes.labels(kind)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        for result in LOOKUPS:
            self.lookups.labels(result)
        for kind in ("sandbox", "pod"):
            for mode in ("cold", "template"):
                self.starts.labels(kind, mode)
        self._floor: float | None = None
        self._lock = threading.Lock()
        self._seen: set[tuple[str, str]] = set()
        self._primed = False
        self._guest_ooms: dict[str, int] = {}
        self._tail: Tail | None = None
        if event_log is not None:
            for rec in event_log.read():  # history: only the restore floor looks back
                self._note_floor(rec)
            self._tail = Tail(event_log)  # from the end: counters start at 0

    # ------------------------------------------------------------ event log
    def _note_floor(self, rec: dict) -> None:
        attrs = rec.get("Actor", {}).get("Attributes", {})
        if (rec.get("Type"), rec.get("Action")) != ("vm", "boot") or \
                attrs.get("mode") != "template":
            return
        secs = _seconds(rec)
        if secs is not None and (self._floor is None or secs < self._floor):
            self._floor = secs
            self.floor.set(secs)

    def poll(self) -> None:
        """Count the events appended since the last poll."""
        if self._tail is None:
            return
        with self._lock:
            for rec in self._tail.poll():
                self.count(rec)

    def count(self, rec: dict) -> None:
        type_, action = str(rec.get("Type", "")), str(rec.get("Action", ""))
        attrs = rec.get("Actor", {}).get("Attributes", {})
        actor = str(rec.get("Actor", {}).get("ID", ""))
        kind = attrs.get("kind") or "sandbox"
        self.events.labels(type_, action).inc()
        if type_ == "vm" and action == "boot":
            secs = _seconds(rec)
            if secs is not None:
                self.starts.labels(kind, attrs.get("mode") or "cold").observe(secs)
            if attrs.get("template") in LOOKUPS:
                self.lookups.labels(attrs["template"]).inc()
            self._note_floor(rec)
        elif type_ == "vm" and action == "crash":
            self.crashes.labels("vmm").inc()
            self.errors.labels("vmm_crash").inc()
            log.warning("%s %s (%s) crashed (vmm): %s", kind, actor, attrs.get("name", ""),
                        attrs.get("error") or "no reason recorded")
        elif type_ == "vm" and action in ("restore_failed", "boot_failed"):
            self.errors.labels("restore_failure" if action == "restore_failed"
                               else "boot_failure").inc()
            log.warning("%s %s (%s): %s: %s", kind, actor, attrs.get("name", ""),
                        action.replace("_", " "), attrs.get("error", ""))
        elif type_ == "container" and action == "oom":
            self.ooms.inc()
            self.errors.labels("oom_kill").inc()
            where = f" in pod {attrs['pod']}" if attrs.get("pod") else ""
            log.warning("%s %s (%s)%s: container killed by the guest's OOM killer", kind, actor,
                        attrs.get("name", ""), where)

    # -------------------------------------------------------------- records
    @staticmethod
    def crash_kind(t: Target) -> str:
        if t.error.startswith("VMM exited unexpectedly"):
            return "vmm"
        if "sandbox monitor" in t.error and "gone" in t.error:
            return "monitor"
        return "other"

    def observe(self, targets: Iterable[Target]) -> None:
        """Sandboxes found dead whose monitor could not say so: counted once each, when
        first seen dead (the records there at start are the baseline). VMM crashes
        come from their events instead."""
        with self._lock:
            present = set()
            for t in targets:
                if t.kind != "sandbox" or t.status != Status.DEAD:
                    continue
                kind = self.crash_kind(t)
                if kind == "vmm":
                    continue
                key = (Status.DEAD, t.id)
                present.add(key)
                if key in self._seen:
                    continue
                self._seen.add(key)
                if self._primed:
                    self.crashes.labels(kind).inc()
                    self.errors.labels("monitor_crash" if kind == "monitor" else "other").inc()
                    log.warning("sandbox %s (%s) crashed (%s): %s", t.id, t.name, kind,
                                t.error or "no reason recorded")
            self._seen &= present
            self._primed = True

    def guest_oom_count(self, t: Target, count: int) -> None:
        """Log when a guest's kernel OOM-killed something since the last scrape."""
        with self._lock:
            before = self._guest_ooms.get(t.id)
            self._guest_ooms[t.id] = count
        if before is not None and count > before:
            log.warning("%s %s (%s): the guest's OOM killer killed %d process(es)", t.kind, t.id,
                        t.name, count - before)

    def forget(self, live_ids: set[str]) -> None:
        with self._lock:
            for gone in set(self._guest_ooms) - live_ids:
                del self._guest_ooms[gone]

    def close(self) -> None:
        if self._tail is not None:
            self._tail.close()
