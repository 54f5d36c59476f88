"""Publishing task events to containerd, in order, without ever blocking a request.

containerd learns that a task exited (and CRI that a pod container died) only
from the events its shims publish, so every event matters and their order
matters more: /tasks/create before /tasks/start before /tasks/exit before
/tasks/delete. One worker thread drains a FIFO queue, so callers only enqueue.

Transport, as containerd 1.6 expects of a v2 shim: a ttrpc call
``containerd.services.events.ttrpc.v1.Events/Forward`` on ``$TTRPC_ADDRESS``;
if that fails, the publish binary (``containerd --address A publish --topic T
--namespace NS`` with the Any on stdin). CRI-O gives no address at all: then
events are simply not sent.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import threading
import time
from typing import TYPE_CHECKING

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from ember.shim.proto import events_pb2 as ev
from ember.shim.proto import forward_pb2
from ember.ttrpc import Client, ConnectionClosed, TTRPCError

if TYPE_CHECKING:
    from ember.sandbox.events import PodEvents

log = logging.getLogger("ember.shim.events")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
TTRPC_RETRY_AFTER = 30.0  # seconds on the fallback after $TTRPC_ADDRESS failed

TOPICS: dict[type[Message], str] = {
    ev.TaskCreate: "/tasks/create",
    ev.TaskStart: "/tasks/start",
    ev.TaskExit: "/tasks/exit",
    ev.TaskDelete: "/tasks/delete",
    ev.TaskExecAdded: "/tasks/exec-added",
    ev.TaskExecStarted: "/tasks/exec-started",
    ev.TaskOOM: "/tasks/oom",
    ev.TaskPaused: "/tasks/paused",
    ev.TaskResumed: "/tasks/resumed",
}


def pack(event: Message) -> any_pb2.Any:
    """An Any with containerd's bare type URL (no type.googleapis.com/ prefix)."""
    return any_pb2.Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())


def timestamp(t_ns: int | None = None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns() if t_ns is None else t_ns)
    return ts


class Publisher:
    """Sends events to containerd from one thread, in the order they were queued."""

    def __init__(self, namespace: str, ttrpc_address: str, containerd_address: str = "",
                 publish_binary: str = "") -> None:
        self.namespace = namespace
        self.ttrpc_address = ttrpc_address.removeprefix("unix://")
        self.containerd_address = containerd_address
        self.publish_binary = publish_binary
        self._queue: queue.Queue[tuple[str, any_pb2.Any, int] | None] = queue.Queue()
        self._client: Client | None = None
        self._ttrpc_down_until = 0.0
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="shim-events", daemon=True)
        self._thread.start()
        self.node: PodEvents | None = None  # the node's own event log

    def _to_node(self, topic: str, event: Message) -> None:
        if self.node is not None:
            self.node.task(topic, event.container_id,
                           exec_id=getattr(event, "exec_id", "") or getattr(event, "id", ""),
                           bundle=getattr(event, "bundle", ""),
                           exit_status=getattr(event, "exit_status", None))

    @property
    def enabled(self) -> bool:
        return bool(self.ttrpc_address or (self.publish_binary and self.containerd_address))

    def publish(self, event: Message) -> None:
        topic = TOPICS[type(event)]
        self._to_node(topic, event)
        if not self.enabled:
            log.debug("no containerd address: dropping %s", topic)
            return
        with self._idle:
            self._pending += 1
        self._queue.put((topic, pack(event), time.time_ns()))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event was sent (or given up on)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        if self._client is not None:
            self._client.close()

    # ------------------------------------------------------------- worker
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            topic, any_msg, t_ns = item
            try:
                self._send(topic, any_msg, t_ns)
            except Exception:  # noqa: BLE001 - one lost event must not stop the others
                log.exception("publishing %s failed", topic)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _send(self, topic: str, any_msg: any_pb2.Any, t_ns: int) -> None:
        if self.ttrpc_address and time.monotonic() >= self._ttrpc_down_until:
            env = forward_pb2.Envelope(timestamp=timestamp(t_ns), namespace=self.namespace,
                                       topic=topic, event=any_msg)
            req = forward_pb2.ForwardRequest(envelope=env)
            for _attempt in range(2):
                try:
                    if self._client is None or self._client.closed:
                        self._client = Client.connect_unix(self.ttrpc_address, timeout=0.5)
                    self._client.call(EVENTS_SERVICE, "Forward", req, timeout=10.0)
                    return
                except (ConnectionClosed, OSError) as exc:
                    log.warning("forwarding %s to %s: %s", topic, self.ttrpc_address, exc)
                    self._client = None
                except TTRPCError as exc:
                    log.warning("containerd refused %s: %s", topic, exc)
                    break
            # Unreachable: use the publish binary for a while instead of waiting each time.
            self._ttrpc_down_until = time.monotonic() + TTRPC_RETRY_AFTER
        self._publish_binary(topic, any_msg)

    def _publish_binary(self, topic: str, any_msg: any_pb2.Any) -> None:
        if not (self.publish_binary and self.containerd_address):
            log.warning("event %s lost: no way to reach containerd", topic)
            return
        cmd = [self.publish_binary, "--address", self.containerd_address, "publish",
               "--topic", topic, "--namespace", self.namespace]
        try:
            res = subprocess.run(cmd, input=any_msg.SerializeToString(), capture_output=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("publish binary for %s: %s", topic, exc)
            return
        if res.returncode != 0:
            log.warning("publish binary for %s: %s", topic,
                        res.stderr.decode(errors="replace").strip())
